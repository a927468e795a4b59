//! The README's walk-through, command for command, as a newcomer types it:
//! `strata up` in the current directory (so the default `./.strata`), then
//! volume commands and real NBD clients in another "terminal".

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use strata_system_tests::{strata_bin, strata_ok, tool_ok};

#[test]
fn the_readme_walkthrough_works() {
    let cwd = tempfile::tempdir().unwrap();
    let mut up = Command::new(strata_bin())
        .current_dir(cwd.path())
        .args(["up", "--pool-size", "2GiB"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // `strata up` says when it is ready.
    let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
    let mut banner = String::new();
    while !banner.contains("Press Ctrl-C to stop.") {
        let line = lines.next().expect("strata up exited early").unwrap();
        banner.push_str(&line);
        banner.push('\n');
    }
    assert!(banner.contains("Strata is up: 3 storage nodes"), "{banner}");
    let ls = strata_ok(cwd.path(), &["node", "ls"]);
    assert_eq!(ls.matches(" up ").count(), 3, "{ls}");
    assert!(cwd.path().join(".strata/cluster.json").exists());
    assert!(cwd.path().join(".strata/node-1/pool.img").exists());

    strata_ok(cwd.path(), &["volume", "create", "vol1", "--size", "1GiB"]);
    let uri = strata_ok(cwd.path(), &["volume", "export", "vol1"])
        .trim()
        .to_string();
    tool_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0xab 0 1M", "-c", "flush", &uri],
    );
    let read = tool_ok("qemu-io", &["-f", "raw", "-c", "read -P 0xab 0 1M", &uri]);
    assert!(read.contains("read 1048576/1048576 bytes"), "{read}");
    let info = tool_ok("nbdinfo", &[&uri]);
    assert!(info.contains("1073741824"), "{info}");
    let ls = strata_ok(cwd.path(), &["volume", "ls"]);
    let line = ls.lines().find(|l| l.starts_with("vol1")).unwrap();
    assert!(line.contains("1 GiB") && line.contains("1 MiB"), "{ls}");
    strata_ok(cwd.path(), &["volume", "resize", "vol1", "--size", "2GiB"]);
    assert!(tool_ok("nbdinfo", &["--size", &uri]).trim() == "2147483648");
    strata_ok(cwd.path(), &["volume", "rm", "vol1"]);
    assert!(!strata_ok(cwd.path(), &["volume", "ls"]).contains("vol1"));

    // Ctrl-C stops everything cleanly.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(up.id() as i32, libc::SIGINT) };
    let status = up.wait().unwrap();
    assert!(status.success(), "strata up exited with {status}");
}
