//! The README's walk-through, command for command, as a newcomer types it:
//! `strata up` in the current directory (so the default `./.strata`), then
//! volume commands and real NBD clients in another "terminal".

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use strata_system_tests::{strata, strata_bin, strata_ok, tool_ok};

#[test]
fn the_readme_walkthrough_works() {
    let cwd = tempfile::tempdir().unwrap();
    let mut up = Command::new(strata_bin())
        .current_dir(cwd.path())
        .args(["up", "--pool-size", "2GiB"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ls = strata(cwd.path(), &["node", "ls"]);
        let text = String::from_utf8_lossy(&ls.stdout).to_string();
        if ls.status.success() && text.matches(" up ").count() == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "strata up did not come up: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
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
