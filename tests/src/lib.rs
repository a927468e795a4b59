//! Helpers for the system tests: they drive the `strata` binary as a user would.

pub mod manifests;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `strata` binary of this workspace's build (built on demand when a test
/// runs alone, e.g. `cargo test -p strata-system-tests`); `STRATA_BIN` overrides it.
pub fn strata_bin() -> PathBuf {
    workspace_bin("STRATA_BIN", "strata-cli", "strata")
}

/// The instance manager `strata up` runs for `strata db` (`STRATA_INSTANCE_BIN` overrides it).
pub fn strata_instance_bin() -> PathBuf {
    workspace_bin("STRATA_INSTANCE_BIN", "strata-operator", "strata-instance")
}

fn workspace_bin(env: &str, package: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    // Test binaries live in target/<profile>/deps; binaries one level up.
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = profile_dir.join(name);
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "-p", package, "--bin", name]);
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "building {name} failed");
    }
    bin
}

/// Runs `strata ARGS` in `cwd`; returns its output.
pub fn strata(cwd: &Path, args: &[&str]) -> Output {
    Command::new(strata_bin())
        .current_dir(cwd)
        .args(args)
        .output()
        .expect("run strata")
}

/// Runs `strata ARGS` in `cwd`, which must succeed; returns stdout.
pub fn strata_ok(cwd: &Path, args: &[&str]) -> String {
    let out = strata(cwd, args);
    assert!(
        out.status.success(),
        "strata {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `strata ARGS` in `cwd`, which must fail with one line on stderr
/// that contains `expected`.
pub fn strata_fails(cwd: &Path, args: &[&str], expected: &str) {
    let out = strata(cwd, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "strata {args:?} should fail");
    assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains(expected), "{args:?}: {stderr}");
}

/// Runs a client tool, which must succeed; returns stdout and stderr together.
pub fn tool_ok(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (see .ci/install-test-deps): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("Pattern verification failed"),
        "{program} {args:?} failed:\n{text}"
    );
    text
}
