//! `strata db` in local mode, end to end: `strata up` with three storage
//! nodes runs a three-instance PostgreSQL 15 cluster with synchronous
//! replication on replicated Strata volumes (nbdfuse + loop + ext4). A client
//! writes a ledger of numbered commits through the `strata db uri` address;
//! the primary's instance manager is SIGKILLed; the local controller fails
//! over; the client carries on through the same address, and every commit it
//! saw acknowledged is there. Then a switchover back, and `strata db rm`
//! leaves no process, mount, loop device or volume behind.
//!
//! Needs root (loop devices, mounts, FUSE), nbdfuse and PostgreSQL 15
//! (`.ci/install-test-deps`).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_system_tests::{
    strata_bin, strata_fails as fails, strata_instance_bin, strata_ok as ok,
};

const PATIENCE: Duration = Duration::from_secs(120);

fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One row of `strata db describe`'s instance table.
#[derive(Debug, Clone)]
struct Row {
    name: String,
    role: String,
    ready: bool,
    /// The storage node serving the instance's volume.
    node: String,
    pid: Option<u32>,
    lsn: String,
    device: String,
}

struct Described {
    text: String,
    primary: String,
    rows: Vec<Row>,
}

impl Described {
    fn row(&self, name: &str) -> &Row {
        self.rows
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("no row {name}: {}", self.text))
    }

    /// Every instance ready; the recorded primary is the only one with the primary role.
    fn all_ready(&self) -> bool {
        self.rows.iter().all(|r| {
            r.ready && (r.role == "primary") == (r.name == self.primary) && r.pid.is_some()
        })
    }
}

fn describe(cwd: &Path, name: &str) -> Described {
    let text = ok(cwd, &["db", "describe", name]);
    let primary = text
        .lines()
        .find_map(|l| l.strip_prefix("Primary:"))
        .expect("a Primary line")
        .trim()
        .to_string();
    let rows = text
        .lines()
        .skip_while(|l| !l.starts_with("Instances:"))
        .skip(2)
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            Row {
                name: f[0].to_string(),
                role: f[1].to_string(),
                ready: f[2] == "yes",
                node: f[3].to_string(),
                pid: f[4].parse().ok(),
                lsn: f[6].to_string(),
                device: f[f.len() - 1].to_string(),
            }
        })
        .collect();
    Described {
        text,
        primary,
        rows,
    }
}

fn wait_all_ready(cwd: &Path, name: &str) -> Described {
    wait_for("every instance ready", || {
        Some(describe(cwd, name)).filter(Described::all_ready)
    })
}

/// `ledger`: three instances, synchronous replication, 512 MiB volumes.
fn create_ledger_cluster(cwd: &Path) {
    let args = "db create ledger --instances 3 --sync --size 512MiB";
    let created = ok(cwd, &args.split(' ').collect::<Vec<_>>());
    assert!(created.contains("database ledger is ready"), "{created}");
}

fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// The postmaster of an instance, from postmaster.pid in its data directory.
fn postmaster_pid(dir: &Path, db: &str, instance: &str) -> u32 {
    let path = dir
        .join("db")
        .join(db)
        .join(instance)
        .join("volume/pgdata/postmaster.pid");
    let text = std::fs::read_to_string(&path).expect("postmaster.pid of a running instance");
    text.lines().next().unwrap().trim().parse().unwrap()
}

/// A client that commits `INSERT INTO ledger VALUES (n)` for n = first, first + 1, ...
/// through the read-write URI, reconnecting whenever the connection breaks,
/// and records every commit the server acknowledged.
struct LedgerWriter {
    acknowledged: Arc<Mutex<Vec<i64>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LedgerWriter {
    fn start(uri: String, first: i64) -> LedgerWriter {
        let acknowledged = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (acks, stopping) = (acknowledged.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let mut client = None;
                let mut n: i64 = first - 1;
                while !stopping.load(Ordering::Relaxed) {
                    if client.is_none() {
                        match tokio_postgres::connect(&uri, tokio_postgres::NoTls).await {
                            Ok((c, connection)) => {
                                tokio::spawn(connection);
                                client = Some(c);
                            }
                            Err(_) => {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                continue;
                            }
                        }
                    }
                    n += 1;
                    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&n];
                    let insert = client.as_ref().unwrap();
                    let insert = insert.execute("INSERT INTO ledger VALUES ($1)", &params);
                    match tokio::time::timeout(Duration::from_secs(10), insert).await {
                        Ok(Ok(1)) => acks.lock().unwrap().push(n),
                        // Unknown outcome: it may or may not be there.
                        _ => client = None,
                    }
                }
            });
        });
        LedgerWriter {
            acknowledged,
            stop,
            thread: Some(thread),
        }
    }

    fn count(&self) -> usize {
        self.acknowledged.lock().unwrap().len()
    }

    fn last(&self) -> Option<i64> {
        self.acknowledged.lock().unwrap().last().copied()
    }

    fn wait_for_more(&self, more: usize) {
        let target = self.count() + more;
        wait_for("acknowledged commits", || {
            (self.count() >= target).then_some(())
        });
    }

    fn finish(mut self) -> Vec<i64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.acknowledged.lock().unwrap().clone()
    }
}

fn sql(uri: &str, query: &str) -> Vec<tokio_postgres::Row> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(uri, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting to {uri}: {e}"));
        tokio::spawn(connection);
        client
            .query(query, &[])
            .await
            .unwrap_or_else(|e| panic!("{query}: {e}"))
    })
}

fn assert_ledger_complete(uri: &str, acknowledged: &[i64]) {
    let present: std::collections::HashSet<i64> = sql(uri, "SELECT n FROM ledger")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let lost: Vec<i64> = acknowledged
        .iter()
        .copied()
        .filter(|n| !present.contains(n))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged commits lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
}

struct Up {
    child: Child,
}

impl Up {
    fn start(cwd: &Path) -> Up {
        let log = std::fs::File::create(cwd.join("up.log")).unwrap();
        let mut child = Command::new(strata_bin())
            .current_dir(cwd)
            .args(["up", "--pool-size", "3GiB"])
            .env("STRATA_INSTANCE_BIN", strata_instance_bin())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        loop {
            let line = lines.next().expect("strata up exited early").unwrap();
            if line.contains("Press Ctrl-C to stop.") {
                break;
            }
        }
        // Keep draining stdout so `strata up` never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Up { child }
    }

    fn interrupt(mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "strata up exited with {status}");
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: signalling our own child; SIGINT lets it detach the volumes.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
            let _ = self.child.wait();
        }
    }
}

#[test]
fn local_cluster_fails_over_without_losing_acknowledged_commits() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "needs root: loop devices, mounts and FUSE"
    );
    // Commands run in `cwd`, so they find the cluster in `cwd/.strata`.
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    let dir = cwd.join(".strata");

    fails(cwd, &["db", "create", "pg"], "no Strata cluster in");
    let up = Up::start(cwd);

    // Bad input: one clear line each, nothing created.
    let bad: [(&[&str], &str); 4] = [
        (&["--instances", "0"], "--instances must be at least 1"),
        (&["--size", "lots"], "invalid --size \"lots\""),
        (&["--size", "1MiB"], "too small"),
        (
            &["--instances", "1", "--sync"],
            "--sync needs at least 2 instances",
        ),
    ];
    for (flags, expected) in bad {
        fails(cwd, &[&["db", "create", "pg"], flags].concat(), expected);
    }
    fails(cwd, &["db", "create", "Pg!"], "invalid database name");
    for command in ["describe", "uri", "switchover", "rm"] {
        fails(cwd, &["db", command, "nope"], "no database named \"nope\"");
    }
    assert_eq!(ok(cwd, &["db", "ls"]).lines().count(), 1, "only the header");

    create_ledger_cluster(cwd);
    fails(
        cwd,
        &["db", "create", "ledger", "--instances", "2"],
        "already exists",
    );
    fails(
        cwd,
        &["db", "switchover", "ledger", "--to", "ledger-7"],
        "no instance",
    );
    let uri = ok(cwd, &["db", "uri", "ledger"]).trim().to_string();
    let ro_uri = ok(cwd, &["db", "uri", "ledger", "--ro"]).trim().to_string();
    assert!(uri.starts_with("postgres://app:"), "{uri}");
    assert_ne!(uri, ro_uri);

    let before = wait_all_ready(cwd, "ledger");
    assert_eq!(before.primary, "ledger-1", "{}", before.text);
    for row in &before.rows {
        assert!(row.device.starts_with("/dev/"), "{}", before.text);
        assert!(row.lsn.contains('/'), "{}", before.text);
    }
    let listed = ok(cwd, &["db", "ls"]);
    assert!(
        listed.contains("ledger") && listed.contains("3/3"),
        "{listed}"
    );
    // Every instance's data directory is on its own mounted Strata volume.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for i in 1..=3 {
        let point = dir.join(format!("db/ledger/ledger-{i}/volume"));
        assert!(
            mounts.contains(&format!(" {} ", point.display())),
            "{} is not mounted",
            point.display()
        );
    }
    let volumes = ok(cwd, &["volume", "ls"]);
    assert_eq!(volumes.matches("3/3 in sync").count(), 3, "{volumes}");

    sql(&uri, "CREATE TABLE ledger (n bigint PRIMARY KEY)");
    // The read-only address leads to a replica.
    let recovery: bool = sql(&ro_uri, "SELECT pg_is_in_recovery()")[0].get(0);
    assert!(recovery, "the read-only address reached the primary");

    let writer = LedgerWriter::start(uri.clone(), 1);
    writer.wait_for_more(100);

    // The loss of the primary: SIGKILL of its instance manager.
    let old = before.primary.clone();
    let old_manager = before.row(&old).pid.unwrap();
    let old_postmaster = postmaster_pid(&dir, "ledger", &old);
    let acked_before_kill = writer.last().unwrap();
    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(old_manager as i32, libc::SIGKILL) };
    let killed_at = Instant::now();
    wait_for("the old primary's postgres to die with its manager", || {
        process_gone(old_postmaster).then_some(())
    });
    wait_for("a commit after the failover", || {
        (writer.last().unwrap() > acked_before_kill + 1).then_some(())
    });
    let failover_time = killed_at.elapsed();
    writer.wait_for_more(100);
    let after = describe(cwd, "ledger");
    assert_ne!(after.primary, old, "{}", after.text);
    assert_eq!(after.row(&after.primary).role, "primary", "{}", after.text);
    assert!(after.text.contains("Failovers:   1"), "{}", after.text);
    let acknowledged = writer.finish();
    assert_ledger_complete(&uri, &acknowledged);
    eprintln!(
        "failover: {} commits acknowledged, first commit through the same URI {:?} after the SIGKILL",
        acknowledged.len(),
        failover_time
    );

    // The lost instance comes back as a replica of the new primary (pg_rewind).
    // The lost instance is back once all are ready again.
    let rejoined = wait_all_ready(cwd, "ledger");
    assert_eq!(rejoined.row(&old).role, "replica", "{}", rejoined.text);
    assert_ne!(rejoined.row(&old).pid, Some(old_manager));

    // Planned switchover back: nothing lost, the same URI leads to it.
    let switched = ok(cwd, &["db", "switchover", "ledger", "--to", &old]);
    assert!(
        switched.contains(&format!("{old} is the primary")),
        "{switched}"
    );
    assert_eq!(describe(cwd, "ledger").primary, old);
    fails(
        cwd,
        &["db", "switchover", "ledger", "--to", &old],
        "already the primary",
    );
    let writer = LedgerWriter::start(uri.clone(), 1_000_000);
    writer.wait_for_more(20);
    let more = writer.finish();
    assert_ledger_complete(&uri, &acknowledged);
    assert_ledger_complete(&uri, &more);
    let on_primary: bool = sql(&uri, "SELECT pg_is_in_recovery()")[0].get(0);
    assert!(!on_primary, "the read-write address reached a replica");

    // Removal: processes, mounts, loop devices and volumes are gone.
    let last = wait_all_ready(cwd, "ledger");
    let managers: Vec<u32> = last.rows.iter().filter_map(|r| r.pid).collect();
    let postmasters: Vec<u32> = (1..=3)
        .map(|i| postmaster_pid(&dir, "ledger", &format!("ledger-{i}")))
        .collect();
    let removed = ok(cwd, &["db", "rm", "ledger"]);
    assert!(removed.contains("deleted database ledger"), "{removed}");
    for pid in managers.iter().chain(&postmasters) {
        assert!(process_gone(*pid), "process {pid} outlived strata db rm");
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&dir.display().to_string()),
        "mounts left:\n{mounts}"
    );
    let loops = Command::new("losetup").arg("-a").output().unwrap();
    let loops = String::from_utf8_lossy(&loops.stdout);
    assert!(!loops.contains(&dir.display().to_string()), "{loops}");
    assert!(!ok(cwd, &["volume", "ls"]).contains("db-ledger"));
    assert_eq!(ok(cwd, &["db", "ls"]).lines().count(), 1);
    fails(cwd, &["db", "describe", "ledger"], "no database named");

    up.interrupt();
    fails(
        cwd,
        &["db", "create", "pg", "--instances", "2"],
        "strata up is not running",
    );
}

/// The storage node serving the primary's volume dies (and stays down): the
/// primary's postgres sees I/O errors and its instance manager exits, a
/// replica is promoted, and the lost instance comes back on its volume
/// attached anew through a target on another node. No acknowledged commit is lost.
#[test]
fn local_cluster_survives_the_loss_of_the_primarys_storage_node() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "needs root");
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    let up = Up::start(cwd);
    create_ledger_cluster(cwd);
    let before = wait_all_ready(cwd, "ledger");
    let primary = before.row(&before.primary).clone();
    let uri = ok(cwd, &["db", "uri", "ledger"]).trim().to_string();
    sql(&uri, "CREATE TABLE ledger (n bigint PRIMARY KEY)");
    let writer = LedgerWriter::start(uri.clone(), 1);
    writer.wait_for_more(100);

    ok(cwd, &["node", "stop", &primary.node, "--kill"]);
    let after = wait_for("another primary", || {
        Some(describe(cwd, "ledger"))
            .filter(|d| d.primary != primary.name && d.row(&d.primary).role == "primary")
    });
    writer.wait_for_more(100);
    let acknowledged = writer.finish();
    assert_ledger_complete(&uri, &acknowledged);
    assert!(after.text.contains("Failovers:   1"), "{}", after.text);

    let back = wait_all_ready(cwd, "ledger");
    let lost = back.row(&primary.name);
    assert_eq!(lost.role, "replica", "{}", back.text);
    assert_ne!(lost.node, primary.node, "{}", back.text);

    ok(cwd, &["node", "start", &primary.node]);
    ok(cwd, &["db", "rm", "ledger"]);
    assert!(!ok(cwd, &["volume", "ls"]).contains("db-ledger"));
    up.interrupt();
}
