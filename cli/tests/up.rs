//! `strata up` and the CLI, end to end: real node processes, qemu-io on the exports.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn strata(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("--dir")
        .arg(dir)
        .args(args)
        .output()
        .unwrap()
}

/// Runs a command that must succeed; returns its stdout.
fn ok(dir: &Path, args: &[&str]) -> String {
    let out = strata(dir, args);
    assert!(
        out.status.success(),
        "strata {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Runs a command that must fail with one clear line on stderr; returns it.
fn fails(dir: &Path, args: &[&str]) -> String {
    let out = strata(dir, args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "strata {args:?} should fail");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    stderr
}

struct Up {
    child: Child,
    stdout: std::sync::Arc<std::sync::Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Up {
    /// Starts `strata up` and waits until it says it is up.
    fn start(dir: &Path, args: &[&str]) -> Up {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_strata"))
            .arg("--dir")
            .arg(dir)
            .arg("up")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let pipe = child.stdout.take().unwrap();
        let sink = stdout.clone();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let mut text = sink.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
        let up = Up {
            child,
            stdout,
            reader: Some(reader),
        };
        wait_for(|| up.stdout.lock().unwrap().contains("Press Ctrl-C to stop."));
        up
    }

    /// Ctrl-C: the nodes stop cleanly and `strata up` exits 0. Returns its output.
    fn interrupt(mut self) -> String {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().unwrap();
        self.reader.take().unwrap().join().unwrap();
        let stdout = self.stdout.lock().unwrap().clone();
        assert!(status.success(), "strata up exited with {status}: {stdout}");
        stdout
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for(mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check() {
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = cmd
        .arg(uri)
        .output()
        .expect("qemu-io (see .ci/install-test-deps)");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success()
            && !text.contains("Pattern verification failed")
            && !text.contains("failed:"),
        "qemu-io {commands:?}:\n{text}"
    );
    text
}

fn node_pid(dir: &Path, node: &str) -> u32 {
    let text = std::fs::read_to_string(dir.join("cluster.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == node)
        .and_then(|n| n["pid"].as_u64())
        .unwrap_or(0) as u32
}

#[test]
fn strata_up_serves_volumes_restarts_dead_nodes_and_reopens_its_pools() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    let up = Up::start(&dir, &["--nodes", "2", "--pool-size", "128MiB"]);

    // A second `strata up` on the same directory is refused.
    let second = Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("--dir")
        .arg(&dir)
        .args(["up", "--nodes", "2"])
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("already running"));

    let nodes = ok(&dir, &["node", "ls"]);
    assert!(
        nodes.contains("node-1") && nodes.contains("node-2"),
        "{nodes}"
    );
    assert!(
        nodes.contains("zone-a") && nodes.contains("zone-b"),
        "{nodes}"
    );
    assert_eq!(nodes.matches(" up ").count(), 2, "{nodes}");

    let created = ok(&dir, &["volume", "create", "vol1", "--size", "64MiB"]);
    assert!(
        created.contains("created volume vol1 (64 MiB)"),
        "{created}"
    );
    ok(
        &dir,
        &[
            "volume", "create", "vol2", "--size", "1MiB", "--node", "node-2",
        ],
    );
    let uri = ok(&dir, &["volume", "export", "vol1"]).trim().to_string();
    assert!(
        uri.starts_with("nbd://127.0.0.1:") && uri.ends_with("/vol1"),
        "{uri}"
    );
    qemu_io(
        &uri,
        &["write -P 0xa5 1M 2M", "write -P 0x5a 5000 3", "flush"],
    );
    qemu_io(&uri, &["read -P 0xa5 1M 2M", "read -P 0x5a 5000 3"]);

    let ls = ok(&dir, &["volume", "ls"]);
    let vol1 = ls.lines().find(|l| l.starts_with("vol1")).unwrap();
    assert!(vol1.contains("64 MiB") && vol1.contains(&uri), "{ls}");
    assert!(
        ls.lines()
            .any(|l| l.starts_with("vol2") && l.contains("node-2")),
        "{ls}"
    );

    // Errors: one line, non-zero exit, the reason in words.
    assert!(fails(&dir, &["volume", "create", "vol1", "--size", "1MiB"]).contains("already exists"));
    assert!(
        fails(&dir, &["volume", "create", "bad/name", "--size", "1MiB"])
            .contains("invalid volume name")
    );
    assert!(
        fails(&dir, &["volume", "create", "huge", "--size", "100GiB"]).contains("not enough space")
    );
    assert!(fails(
        &dir,
        &["volume", "create", "x", "--size", "1MiB", "--node", "node-9"]
    )
    .contains("no node named"));
    assert!(fails(&dir, &["volume", "rm", "nope"]).contains("not found"));
    assert!(fails(&dir, &["volume", "resize", "vol1", "--size", "1MiB"]).contains("shrinking"));
    let bad_size = strata(&dir, &["volume", "create", "y", "--size", "lots"]);
    assert!(!bad_size.status.success());

    let resized = ok(&dir, &["volume", "resize", "vol1", "--size", "96MiB"]);
    assert!(resized.contains("96 MiB"), "{resized}");
    ok(&dir, &["volume", "rm", "vol2"]);
    assert!(!ok(&dir, &["volume", "ls"]).contains("vol2"));

    // A node that dies is restarted by `strata up`, with its data.
    let node = if uri.contains(&format!("{}", node_port(&dir, "node-1"))) {
        "node-1"
    } else {
        "node-2"
    };
    let old_pid = node_pid(&dir, node);
    assert!(old_pid > 0);
    // SAFETY: SIGKILL to the node process that this test's `strata up` started.
    unsafe { libc::kill(old_pid as i32, libc::SIGKILL) };
    wait_for(|| {
        let pid = node_pid(&dir, node);
        pid != 0 && pid != old_pid && ok(&dir, &["node", "ls"]).matches(" up ").count() == 2
    });
    qemu_io(&uri, &["read -P 0xa5 1M 2M"]);

    // Ctrl-C stops everything; a second `strata up` reopens the same pools.
    let pids = [node_pid(&dir, "node-1"), node_pid(&dir, "node-2")];
    let stdout = up.interrupt();
    assert!(
        stdout.contains("Strata is up") && stdout.contains("stopped"),
        "{stdout}"
    );
    for pid in pids {
        // SAFETY: signal 0 only checks for existence.
        assert!(
            unsafe { libc::kill(pid as i32, 0) } != 0,
            "node {pid} still running"
        );
    }
    assert!(
        strata(&dir, &["volume", "ls"]).status.code() != Some(0),
        "no nodes, no listing"
    );

    let up = Up::start(&dir, &["--nodes", "2", "--pool-size", "128MiB"]);
    assert_eq!(
        ok(&dir, &["volume", "export", "vol1"]).trim(),
        uri,
        "same address after restart"
    );
    qemu_io(
        &uri,
        &[
            "read -P 0xa5 1M 2M",
            "read -P 0x5a 5000 3",
            "read -P 0 0 4k",
        ],
    );
    drop(up.interrupt());
}

fn node_port(dir: &Path, node: &str) -> u16 {
    let text = std::fs::read_to_string(dir.join("cluster.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let nbd = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == node)
        .unwrap()["nbd"]
        .as_str()
        .unwrap()
        .to_string();
    nbd.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn commands_without_a_cluster_say_how_to_start_one() {
    let tmp = tempfile::tempdir().unwrap();
    let err = fails(tmp.path(), &["volume", "ls"]);
    assert!(err.contains("strata up"), "{err}");
    let err = fails(tmp.path(), &["node", "ls"]);
    assert!(err.contains("no Strata cluster"), "{err}");
}

/// The ports `strata up` gives a new node are free when it picks them, not
/// necessarily when the node binds them (a concurrent test, or any program,
/// can take one in between). A new node that cannot bind one is started
/// again on other ports instead of failing the whole `strata up`.
#[test]
fn a_new_node_whose_port_was_taken_starts_on_other_ports() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    std::fs::create_dir_all(&dir).unwrap();
    // A cluster file naming a node that has never run, on a port held here.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let free = || {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().to_string()
    };
    let cluster = serde_json::json!({
        "supervisor_pid": null,
        "nodes": [{
            "name": "node-1",
            "zone": "zone-a",
            "grpc": taken.local_addr().unwrap().to_string(),
            "nbd": free(),
            "http": free(),
            "replication": free(),
            "pool": dir.join("node-1").join("pool.img"),
            "pid": null,
        }],
    });
    std::fs::write(dir.join("cluster.json"), cluster.to_string()).unwrap();

    let up = Up::start(&dir, &["--nodes", "1", "--pool-size", "64MiB"]);
    let text = std::fs::read_to_string(dir.join("cluster.json")).unwrap();
    let saved: serde_json::Value = serde_json::from_str(&text).unwrap();
    let grpc = saved["nodes"][0]["grpc"].as_str().unwrap().to_string();
    assert_ne!(grpc, taken.local_addr().unwrap().to_string());
    let nodes = ok(&dir, &["node", "ls"]);
    assert!(nodes.contains("node-1") && nodes.contains("up"), "{nodes}");
    let out = up.interrupt();
    assert!(out.contains("stopped"), "{out}");
}

#[test]
fn nodes_do_not_outlive_a_killed_strata_up() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    let mut up = Up::start(&dir, &["--nodes", "2", "--pool-size", "64MiB"]);
    let pids = [node_pid(&dir, "node-1"), node_pid(&dir, "node-2")];
    assert!(pids.iter().all(|p| *p > 0));
    up.child.kill().unwrap();
    up.child.wait().unwrap();
    wait_for(|| {
        // SAFETY: signal 0 only checks for existence.
        pids.iter()
            .all(|p| unsafe { libc::kill(*p as i32, 0) } != 0)
    });
}

#[test]
fn replicated_volume_survives_a_node_stopped_on_purpose() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    let up = Up::start(
        &dir,
        &[
            "--nodes",
            "3",
            "--pool-size",
            "128MiB",
            "--replica-timeout-ms",
            "1000",
        ],
    );
    let created = ok(
        &dir,
        &[
            "volume",
            "create",
            "db",
            "--size",
            "32MiB",
            "--replicas",
            "3",
        ],
    );
    assert!(created.contains("with 3 replicas on"), "{created}");
    assert!(fails(
        &dir,
        &[
            "volume",
            "create",
            "big",
            "--size",
            "1MiB",
            "--replicas",
            "4"
        ]
    )
    .contains("not enough space: 4 replicas"));
    let uri = ok(&dir, &["volume", "export", "db", "--node", "node-1"])
        .trim()
        .to_string();
    qemu_io(&uri, &["write -P 0x42 0 1M"]);

    // A crash that `strata up` does not repair: node-3 stays down.
    let stopped = ok(&dir, &["node", "stop", "node-3", "--kill"]);
    assert!(stopped.contains("killed node-3"), "{stopped}");
    qemu_io(&uri, &["write -P 0x43 1M 1M"]);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let nodes = ok(&dir, &["node", "ls"]);
    let node3 = nodes.lines().find(|l| l.starts_with("node-3")).unwrap();
    assert!(node3.contains("down"), "{nodes}");
    let described = ok(&dir, &["volume", "describe", "db"]);
    assert!(described.contains("2/3 in sync (degraded)"), "{described}");
    assert!(described.contains("unreachable"), "{described}");

    // Started again, it is caught up and back in sync.
    assert!(ok(&dir, &["node", "start", "node-3"]).contains("started node-3"));
    wait_for(|| ok(&dir, &["volume", "describe", "db"]).contains("3/3 in sync"));
    let described = ok(&dir, &["volume", "describe", "db"]);
    assert!(described.contains("on node-1"), "{described}");
    qemu_io(&uri, &["read -P 0x42 0 1M", "read -P 0x43 1M 1M"]);
    let ls = ok(&dir, &["volume", "ls"]);
    assert!(ls.contains("3/3 in sync"), "{ls}");
    drop(up.interrupt());
}

#[test]
fn snapshots_are_taken_listed_restored_and_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    let up = Up::start(&dir, &["--nodes", "2", "--pool-size", "128MiB"]);
    ok(
        &dir,
        &[
            "volume",
            "create",
            "db",
            "--size",
            "16MiB",
            "--replicas",
            "2",
        ],
    );
    let uri = ok(&dir, &["volume", "export", "db"]).trim().to_string();
    qemu_io(&uri, &["write -P 0x42 0 1M"]);
    let created = ok(&dir, &["snapshot", "create", "db", "monday"]);
    assert!(
        created.contains("created snapshot monday of volume db on node-"),
        "{created}"
    );
    // Again: the same snapshot, and the command says it is not a new one.
    let again = ok(&dir, &["snapshot", "create", "db", "monday"]);
    assert!(
        again.contains("snapshot monday of volume db exists already, taken"),
        "{again}"
    );
    qemu_io(&uri, &["write -P 0x43 0 1M"]);
    let ls = ok(&dir, &["snapshot", "ls"]);
    let line = ls.lines().find(|l| l.starts_with("monday")).unwrap();
    assert!(line.contains("db") && line.contains("16 MiB"), "{ls}");
    assert!(
        line.contains("node-1") && line.contains("node-2"),
        "a copy on each replica's node: {ls}"
    );

    let restored = ok(
        &dir,
        &["volume", "create", "db2", "--from-snapshot", "monday"],
    );
    assert!(restored.contains("with 2 replicas"), "{restored}");
    let uri2 = ok(&dir, &["volume", "export", "db2"]).trim().to_string();
    qemu_io(&uri2, &["read -P 0x42 0 1M"]);
    qemu_io(&uri, &["read -P 0x43 0 1M"]);

    ok(&dir, &["volume", "create", "other", "--size", "1MiB"]);
    assert!(fails(&dir, &["snapshot", "create", "other", "monday"]).contains("already exists"));
    assert!(fails(
        &dir,
        &["volume", "create", "db3", "--from-snapshot", "nope"]
    )
    .contains("snapshot \"nope\" not found"));
    assert!(fails(
        &dir,
        &[
            "volume",
            "create",
            "db3",
            "--from-snapshot",
            "monday",
            "--replicas",
            "1"
        ]
    )
    .contains("2 nodes holding it"));

    // The volume goes, its snapshot stays; the snapshot goes, the restored volume stays.
    ok(&dir, &["volume", "rm", "db"]);
    assert!(ok(&dir, &["snapshot", "ls"]).contains("monday"));
    assert!(ok(&dir, &["snapshot", "rm", "monday"]).contains("deleted snapshot monday"));
    assert!(fails(&dir, &["snapshot", "rm", "monday"]).contains("not found"));
    qemu_io(&uri2, &["read -P 0x42 0 1M"]);
    drop(up.interrupt());
}

#[test]
fn replace_replica_replaces_a_dead_nodes_replica_and_moves_a_live_one_unless_cancelled() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    // A slow rebuild, so its progress can be seen; no automatic replacement.
    let up = Up::start(
        &dir,
        &[
            "--nodes",
            "4",
            "--pool-size",
            "128MiB",
            "--replica-timeout-ms",
            "1000",
            "--rebuild-rate",
            "1MiB",
            "--replace-faulted-after-secs",
            "0",
        ],
    );
    // node-1 in zone-a, then the other zones: node-2 and node-3; node-4
    // (zone-a again) is the spare.
    let created = ok(
        &dir,
        &[
            "volume",
            "create",
            "db",
            "--size",
            "32MiB",
            "--replicas",
            "3",
            "--node",
            "node-1",
        ],
    );
    assert!(
        ["node-1", "node-2", "node-3"]
            .iter()
            .all(|n| created.contains(n))
            && !created.contains("node-4"),
        "{created}"
    );
    let uri = ok(&dir, &["volume", "export", "db", "--node", "node-1"])
        .trim()
        .to_string();
    qemu_io(&uri, &["write -P 0x42 0 3M"]);

    let replace = |args: &[&'static str]| [&["volume", "replace-replica"], args].concat();
    assert_eq!(
        fails(&dir, &replace(&["nope", "--from", "node-1"])),
        "error: volume \"nope\" not found\n"
    );
    assert!(fails(&dir, &replace(&["db", "--from", "node-4"]))
        .contains("node node-4 holds no replica of volume db"));
    assert!(fails(
        &dir,
        &replace(&["db", "--from", "node-1", "--to", "node-2"])
    )
    .contains("node node-2 holds a replica of volume db already"));

    ok(&dir, &["node", "stop", "node-3", "--kill"]);
    qemu_io(&uri, &["write -P 0x43 3M 1M"]);
    let replaced = ok(&dir, &replace(&["db", "--from", "node-3"]));
    assert!(replaced.contains("by one on node-4"), "{replaced}");
    assert!(replaced.contains("could not be deleted"), "{replaced}");
    // The copy of 4 MiB at 1 MiB/s shows its progress, then ends in sync.
    wait_for(|| ok(&dir, &["volume", "describe", "db"]).contains("rebuilding"));
    let ls = ok(&dir, &["volume", "ls"]);
    assert!(ls.contains("2/3 in sync, rebuilding"), "{ls}");
    wait_for(|| ok(&dir, &["volume", "describe", "db"]).contains("3/3 in sync"));
    let described = ok(&dir, &["volume", "describe", "db"]);
    let node4 = described
        .lines()
        .find(|l| l.contains("node-4"))
        .unwrap_or_else(|| panic!("{described}"));
    assert!(node4.contains("in-sync"), "{described}");
    assert!(!described.contains("node-3"), "{described}");
    qemu_io(&uri, &["read -P 0x42 0 3M", "read -P 0x43 3M 1M"]);

    // node-3 comes back with its old replica: a leftover, shown as such;
    // every node holds a replica of db now, so there is no spare.
    ok(&dir, &["node", "start", "node-3"]);
    let described = ok(&dir, &["volume", "describe", "db"]);
    let leftover = described
        .lines()
        .find(|l| l.starts_with("Leftover:"))
        .unwrap_or_else(|| panic!("{described}"));
    assert!(leftover.contains("on node-3 was replaced"), "{described}");
    assert!(fails(&dir, &replace(&["db", "--from", "node-1"]))
        .contains("no spare node for a new replica of volume db"));

    // The target deletes the leftover once node-3 answers; node-3 is a spare
    // again. A healthy replica is moved: it stays in sync during the copy.
    wait_for(|| !ok(&dir, &["volume", "describe", "db"]).contains("Leftover:"));
    let moved = ok(&dir, &replace(&["db", "--from", "node-2"]));
    assert!(
        moved.contains("moving the replica of db on node-2 to node-3"),
        "{moved}"
    );
    let described = ok(&dir, &["volume", "describe", "db"]);
    let node2 = described
        .lines()
        .find(|l| l.contains("node-2"))
        .unwrap_or_else(|| panic!("{described}"));
    assert!(node2.contains("in-sync, leaving"), "{described}");
    assert!(
        ok(&dir, &["volume", "ls"]).contains("3/4 in sync, moving a replica"),
        "{described}"
    );
    // Given up while the copy runs: node-2 keeps its replica, node-3 none.
    let cancelled = ok(&dir, &["volume", "cancel-move", "db"]);
    assert!(
        cancelled.contains(
            "cancelled the move of db: its replica stays on node-2, and the new one on node-3 \
             left the volume"
        ),
        "{cancelled}"
    );
    let described = ok(&dir, &["volume", "describe", "db"]);
    assert!(
        described.contains("3/3 in sync") && !described.contains("leaving"),
        "{described}"
    );
    assert!(!described.contains("node-3"), "{described}");
    assert_eq!(
        fails(&dir, &["volume", "cancel-move", "db"]),
        "error: no replica of volume \"db\" is being moved (a move that ended or was cancelled \
         shows in `strata volume describe db`)\n"
    );
    // Moved again, it goes this time.
    let moved = ok(&dir, &replace(&["db", "--from", "node-2"]));
    assert!(
        moved.contains("moving the replica of db on node-2 to node-3"),
        "{moved}"
    );
    wait_for(|| {
        let described = ok(&dir, &["volume", "describe", "db"]);
        described.contains("3/3 in sync") && !described.contains("node-2")
    });
    qemu_io(&uri, &["read -P 0x42 0 3M", "read -P 0x43 3M 1M"]);
    drop(up.interrupt());
}
