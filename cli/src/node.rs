//! `strata node ...`: list nodes, stop and start them under `strata up`, or
//! run one in the foreground.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::up::stop_marker;
use crate::volume::human;
use strata_node::cluster::client;
use strata_node::cluster::{process_alive, ClusterFile};

/// Stops a node of the local cluster on purpose: `strata up` leaves it down
/// until `strata node start`. With `kill`, SIGKILL (a crash) instead of a
/// clean stop.
pub async fn stop(dir: &Path, cluster: &ClusterFile, name: &str, kill: bool) -> anyhow::Result<()> {
    let node = cluster.node(name)?;
    require_supervisor(dir, cluster)?;
    let marker = stop_marker(dir, name);
    std::fs::write(&marker, b"").with_context(|| format!("writing {}", marker.display()))?;
    let Some(pid) = node.pid.filter(|pid| process_alive(*pid)) else {
        println!("{name} is already stopped");
        return Ok(());
    };
    let signal = if kill { libc::SIGKILL } else { libc::SIGTERM };
    // SAFETY: signalling the node process that `strata up` started.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
    let deadline = Instant::now() + Duration::from_secs(15);
    while process_alive(pid) {
        if Instant::now() > deadline {
            bail!("{name} (pid {pid}) did not stop within 15s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("{} {name}", if kill { "killed" } else { "stopped" });
    Ok(())
}

/// Lets `strata up` start a node stopped with `strata node stop` again, and
/// waits until it serves.
pub async fn start(dir: &Path, cluster: &ClusterFile, name: &str) -> anyhow::Result<()> {
    let node = cluster.node(name)?.clone();
    require_supervisor(dir, cluster)?;
    let _ = std::fs::remove_file(stop_marker(dir, name));
    let deadline = Instant::now() + Duration::from_secs(30);
    while client::node_info(&node).await.is_err() {
        if Instant::now() > deadline {
            bail!(
                "{name} did not come up within 30s (see {})",
                dir.join(name).join("node.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("started {name}");
    Ok(())
}

fn require_supervisor(dir: &Path, cluster: &ClusterFile) -> anyhow::Result<()> {
    if !cluster.supervisor_pid.is_some_and(process_alive) {
        bail!(
            "`strata up` is not running in {}; nodes are started and stopped by it",
            dir.display()
        );
    }
    Ok(())
}

pub async fn list(cluster: &ClusterFile) -> anyhow::Result<()> {
    println!(
        "{:<8} {:<21} {:<7} {:<6} {:>10} {:>10} {:>8}",
        "NAME", "ADDRESS", "ZONE", "STATE", "USED", "FREE", "PID"
    );
    for node in &cluster.nodes {
        let pid = node
            .pid
            .filter(|pid| process_alive(*pid))
            .map_or("-".to_string(), |p| p.to_string());
        let (state, used, free) = match client::node_info(node).await {
            Ok(info) => ("up", human(info.used_bytes), human(info.free_bytes)),
            Err(_) => ("down", "-".to_string(), "-".to_string()),
        };
        println!(
            "{:<8} {:<21} {:<7} {:<6} {:>10} {:>10} {:>8}",
            node.name, node.grpc, node.zone, state, used, free, pid
        );
    }
    Ok(())
}
