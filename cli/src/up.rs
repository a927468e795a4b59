//! `strata up`: the whole system on one machine.
//!
//! Starts N storage nodes as child processes with file-backed pools under DIR,
//! writes `DIR/cluster.json` for the other commands, and stays in the
//! foreground. A node that dies is started again after a short delay, as
//! Kubernetes would restart its Pod. Ctrl-C (or SIGTERM) stops every node
//! cleanly. Running it again on the same DIR reopens the same pools.
//!
//! It also runs the local database controller (`strata db`): the
//! PostgreSQL clusters recorded in DIR/db run under it, and stop (instances
//! first, then their volumes detached) before the nodes do.

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytesize::ByteSize;

use crate::db::controller::DbController;
use strata_node::cluster::client;
use strata_node::cluster::{process_alive, ClusterFile, NodeEntry};

const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];
const RESTART_DELAY: Duration = Duration::from_secs(1);
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Number of storage nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Size of each node's pool file (new pools only).
    #[arg(long, default_value = "4GiB")]
    pub pool_size: ByteSize,
    /// I/O engine of the nodes: auto, io_uring or sync.
    #[arg(long, default_value = "auto")]
    pub io_engine: String,
    /// Zero-fill new pool files once, so writes never land in holes of a
    /// sparse file (much faster writes; costs the pool size in disk writes).
    #[arg(long)]
    pub preallocate: bool,
    /// How long a volume target waits for a replica before dropping it from
    /// the in-sync set, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub replica_timeout_ms: u64,
    /// Bytes per second a rebuild may copy to a replica, e.g. 100MiB (0: no limit).
    #[arg(long, default_value = "256MiB")]
    pub rebuild_rate: ByteSize,
    /// Seconds a replica may stay faulted before its volume's target
    /// replaces it by a new one on another node (0: never).
    #[arg(long, default_value_t = 600)]
    pub replace_faulted_after_secs: u64,
}

struct RunningNode {
    entry: NodeEntry,
    child: Option<Child>,
    restart_at: Option<Instant>,
    /// Its pool did not exist when this `strata up` began: nothing records
    /// its addresses yet, so it may be moved to other ports.
    fresh: bool,
}

pub async fn up(dir: &Path, args: UpArgs) -> anyhow::Result<()> {
    if args.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    // Handlers first: a Ctrl-C at any point from here on stops the nodes
    // cleanly instead of killing `strata up` and leaving them running.
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let mut cluster = ClusterFile::load_if_present(&dir)?.unwrap_or_default();
    if let Some(pid) = cluster.supervisor_pid.filter(|pid| process_alive(*pid)) {
        bail!(
            "a Strata cluster is already running in {} (strata up, pid {pid})",
            dir.display()
        );
    }
    if !cluster.nodes.is_empty() && cluster.nodes.len() != args.nodes {
        eprintln!(
            "note: {} already holds {} nodes; using those ({} requested)",
            dir.display(),
            cluster.nodes.len(),
            args.nodes
        );
    }
    while cluster.nodes.len() < args.nodes {
        let i = cluster.nodes.len();
        let name = format!("node-{}", i + 1);
        let [grpc, nbd, http, replication] = fresh_ports()?;
        cluster.nodes.push(NodeEntry {
            zone: ZONES[i % ZONES.len()].to_string(),
            grpc,
            nbd,
            http,
            replication: Some(replication),
            pool: dir.join(&name).join("pool.img"),
            name,
            pid: None,
        });
    }
    for node in &mut cluster.nodes {
        if node.replication.is_none() {
            let port = crate::ports::free_local_ports(1)?[0];
            node.replication = Some(SocketAddr::from(([127, 0, 0, 1], port)));
        }
    }
    cluster.supervisor_pid = Some(std::process::id());
    let mut nodes: Vec<RunningNode> = cluster
        .nodes
        .iter()
        .cloned()
        .map(|mut entry| {
            entry.pid = None;
            RunningNode {
                fresh: !entry.pool.exists(),
                entry,
                child: None,
                restart_at: None,
            }
        })
        .collect();
    for node in &mut nodes {
        // A fresh `strata up` runs every node, stopped on purpose before or not.
        let _ = std::fs::remove_file(stop_marker(&dir, &node.entry.name));
        start(node, &dir, &args)?;
    }
    save(&dir, &nodes)?;
    let ready = tokio::select! {
        ready = wait_until_ready(&mut nodes, &dir, &args) => ready,
        _ = interrupt.recv() => Err(anyhow::anyhow!("interrupted while starting")),
        _ = terminate.recv() => Err(anyhow::anyhow!("terminated while starting")),
    };
    if let Err(err) = ready {
        stop_all(&mut nodes);
        clear(&dir, &mut nodes)?;
        return Err(err);
    }
    // A node moved to other ports while starting.
    save(&dir, &nodes)?;
    print_endpoints(&dir, &nodes).await;
    let databases = DbController::start(dir.clone());

    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            _ = tick.tick() => {
                if supervise(&mut nodes, &dir, &args)? {
                    save(&dir, &nodes)?;
                }
            }
        }
    }
    // Databases first: their volumes live on the nodes.
    databases.stop().await;
    println!("stopping {} nodes...", nodes.len());
    stop_all(&mut nodes);
    clear(&dir, &mut nodes)?;
    println!("stopped");
    Ok(())
}

/// Addresses for a new node's four listeners: gRPC, NBD, HTTP, replication.
fn fresh_ports() -> anyhow::Result<[SocketAddr; 4]> {
    let ports = crate::ports::free_local_ports(4)?;
    let addr = |i: usize| SocketAddr::from(([127, 0, 0, 1], ports[i]));
    Ok([addr(0), addr(1), addr(2), addr(3)])
}

fn start(node: &mut RunningNode, dir: &Path, args: &UpArgs) -> anyhow::Result<()> {
    let e = &node.entry;
    let node_dir = dir.join(&e.name);
    std::fs::create_dir_all(&node_dir)?;
    let log_path = node_dir.join("node.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let exe = std::env::current_exe().context("finding the strata executable")?;
    let mut command = Command::new(exe);
    command
        .args(["node", "serve", "--name", &e.name, "--zone", &e.zone])
        .arg("--pool")
        .arg(&e.pool)
        .args(["--pool-size", &args.pool_size.as_u64().to_string()])
        .args(["--io-engine", &args.io_engine])
        .args(["--grpc-listen", &e.grpc.to_string()])
        .args(["--nbd-listen", &e.nbd.to_string()])
        .args(["--http-listen", &e.http.to_string()])
        .args(e.replication.map(|a| format!("--replication-listen={a}")))
        .args(["--replica-timeout-ms", &args.replica_timeout_ms.to_string()])
        .args(["--rebuild-rate", &args.rebuild_rate.as_u64().to_string()])
        .args([
            "--replace-faulted-after-secs",
            &args.replace_faulted_after_secs.to_string(),
        ])
        // The nodes find each other (for replacements) through the cluster file.
        .arg("--cluster-dir")
        .arg(dir)
        .args(args.preallocate.then_some("--preallocate"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    supervised_child(&mut command);
    let child = command
        .spawn()
        .with_context(|| format!("starting {}", e.name))?;
    node.entry.pid = Some(child.id());
    node.child = Some(child);
    node.restart_at = None;
    Ok(())
}

/// Ports a node was given are free when chosen, not when it binds them:
/// another process may take one in between. A new node is started again
/// on other ports, this many times.
const PORT_RETRIES: usize = 3;
/// How long one readiness probe of a starting node may take.
const READY_PROBE: Duration = Duration::from_secs(2);

async fn wait_until_ready(
    nodes: &mut [RunningNode],
    dir: &Path,
    args: &UpArgs,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    for node in nodes.iter_mut() {
        let mut port_retries = PORT_RETRIES;
        loop {
            // Briefly: whatever holds the port may not be the node, and the
            // node may have exited meanwhile.
            let answer = tokio::time::timeout(READY_PROBE, client::node_info(&node.entry)).await;
            if matches!(answer, Ok(Ok(_))) {
                break;
            }
            if let Some(status) = node
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let log = log_tail(&dir.join(&node.entry.name).join("node.log"), 10);
                if node.fresh && port_retries > 0 && log.contains("Address already in use") {
                    port_retries -= 1;
                    eprintln!(
                        "{}: a port chosen for it was taken meanwhile; starting it on other ports",
                        node.entry.name
                    );
                    let [grpc, nbd, http, replication] = fresh_ports()?;
                    node.entry.grpc = grpc;
                    node.entry.nbd = nbd;
                    node.entry.http = http;
                    node.entry.replication = Some(replication);
                    start(node, dir, args)?;
                    continue;
                }
                bail!(
                    "{} exited during start-up ({status}):\n{log}",
                    node.entry.name
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not answer within {:?}",
                    node.entry.name,
                    START_TIMEOUT
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Restarts nodes that died. True when a process id changed.
fn supervise(nodes: &mut [RunningNode], dir: &Path, args: &UpArgs) -> anyhow::Result<bool> {
    let mut changed = false;
    for node in nodes.iter_mut() {
        if let Some(child) = node.child.as_mut() {
            if let Some(status) = child.try_wait()? {
                eprintln!(
                    "{} exited ({status}); restarting in {:?}",
                    node.entry.name, RESTART_DELAY
                );
                node.child = None;
                node.entry.pid = None;
                node.restart_at = Some(Instant::now() + RESTART_DELAY);
                changed = true;
            }
        }
        let held = stop_marker(dir, &node.entry.name).exists();
        if held {
            // Stopped on purpose (`strata node stop`): stays down until
            // `strata node start` removes the marker.
            node.restart_at = None;
            continue;
        }
        if node.child.is_none() && node.restart_at.is_none() {
            node.restart_at = Some(Instant::now());
        }
        if node.child.is_none() && node.restart_at.is_some_and(|t| Instant::now() >= t) {
            start(node, dir, args)?;
            eprintln!(
                "{} restarted (pid {})",
                node.entry.name,
                node.entry.pid.unwrap_or(0)
            );
            changed = true;
        }
    }
    Ok(changed)
}

/// Makes `command` a child that dies with `strata up` (SIGTERM when it
/// exits, even by SIGKILL) in a process group of its own, so that a Ctrl-C
/// in the terminal reaches only `strata up`, which stops the databases
/// before the nodes under their volumes. Must be spawned from the main
/// thread: PR_SET_PDEATHSIG fires when the forking *thread* exits.
pub fn supervised_child(command: &mut Command) {
    let supervisor = std::process::id();
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes async-signal-safe system calls.
    unsafe {
        command.pre_exec(move || {
            libc::setpgid(0, 0);
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // `strata up` may have died before the line above took effect.
            if libc::getppid() as u32 != supervisor {
                return Err(std::io::Error::other("strata up exited"));
            }
            Ok(())
        })
    };
}

/// While this file exists in a node's directory, `strata up` does not
/// restart the node (`strata node stop` creates it, `strata node start`
/// removes it).
pub fn stop_marker(dir: &Path, node: &str) -> std::path::PathBuf {
    dir.join(node).join("stopped")
}

/// SIGTERM to every node, then SIGKILL to any still running after the timeout.
fn stop_all(nodes: &mut [RunningNode]) {
    for node in nodes.iter() {
        if let Some(child) = &node.child {
            // SAFETY: sending a signal to our own child process.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        }
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    for node in nodes.iter_mut() {
        if let Some(mut child) = node.child.take() {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        eprintln!("{} did not stop in time; killing it", node.entry.name);
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        node.entry.pid = None;
    }
}

fn save(dir: &Path, nodes: &[RunningNode]) -> anyhow::Result<()> {
    ClusterFile {
        supervisor_pid: Some(std::process::id()),
        nodes: nodes.iter().map(|n| n.entry.clone()).collect(),
    }
    .save(dir)
}

fn clear(dir: &Path, nodes: &mut [RunningNode]) -> anyhow::Result<()> {
    ClusterFile {
        supervisor_pid: None,
        nodes: nodes
            .iter()
            .map(|n| NodeEntry {
                pid: None,
                ..n.entry.clone()
            })
            .collect(),
    }
    .save(dir)
}

async fn print_endpoints(dir: &Path, nodes: &[RunningNode]) {
    println!("Strata is up: {} storage nodes", nodes.len());
    println!(
        "{:<8} {:<7} {:<8} {:<21} {:<21} {:<21} POOL",
        "NODE", "ZONE", "PID", "GRPC", "NBD", "HTTP"
    );
    for n in nodes {
        let e = &n.entry;
        println!(
            "{:<8} {:<7} {:<8} {:<21} {:<21} {:<21} {}",
            e.name,
            e.zone,
            e.pid.map_or("-".into(), |p| p.to_string()),
            e.grpc,
            e.nbd,
            e.http,
            e.pool.display()
        );
    }
    let dir_flag = dir_flag(dir);
    println!("Cluster file: {}", ClusterFile::path(dir).display());
    println!("Try: strata{dir_flag} volume create vol1 --size 1GiB && strata{dir_flag} volume export vol1");
    println!("Press Ctrl-C to stop.");
}

/// ` --dir DIR` unless DIR is the default `./.strata`.
fn dir_flag(dir: &Path) -> String {
    let default = std::env::current_dir()
        .map(|cwd| cwd.join(".strata"))
        .ok()
        .and_then(|p| p.canonicalize().ok());
    if default.as_deref() == Some(dir) {
        String::new()
    } else {
        format!(" --dir {}", dir.display())
    }
}

fn log_tail(path: &PathBuf, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
