//! Instance manager processes — the local stand-in for the Pods: one
//! `strata-instance` per instance, started by `strata up` with the same
//! arguments the operator gives the container, its log in the instance's
//! folder. Its postgres dies with it (PR_SET_PDEATHSIG in strata-instance),
//! so a SIGKILLed instance manager is a lost instance, as a dead Pod is.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use strata_operator::instance_api::PrimaryAddress;

use super::record::{DbSpec, InstanceSpec, APP_DATABASE, APP_USER};

/// How long a SIGTERMed instance manager gets for postgres's fast shutdown.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The strata-instance executable: `STRATA_INSTANCE_BIN`, else the one next
/// to this `strata` (as cargo and the release archive lay them out), else PATH.
pub fn instance_manager_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("STRATA_INSTANCE_BIN") {
        return PathBuf::from(path);
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("strata-instance")));
    match beside {
        Some(path) if path.exists() => path,
        _ => PathBuf::from("strata-instance"),
    }
}

pub fn log_path(instance_dir: &Path) -> PathBuf {
    instance_dir.join("instance.log")
}

/// Starts the instance manager of `instance`; a replica of `primary` when given,
/// otherwise a primary (a new one on an empty data directory).
pub fn spawn(
    spec: &DbSpec,
    instance: &InstanceSpec,
    instance_dir: &Path,
    data_dir: &Path,
    primary: Option<&PrimaryAddress>,
) -> anyhow::Result<Child> {
    let log_path = log_path(instance_dir);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let peers: Vec<&str> = spec.instances.iter().map(|i| i.name.as_str()).collect();
    let bin = instance_manager_bin();
    let mut command = Command::new(&bin);
    command
        .args(["--name", &instance.name])
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--socket-dir")
        .arg(instance_dir.join("run"))
        .args(["--listen-address", "127.0.0.1"])
        .args(["--port", &instance.pg_port.to_string()])
        .args(["--api-listen", &format!("127.0.0.1:{}", instance.api_port)])
        .args(["--peers", &peers.join(",")])
        .args(["--sync-replicas", &spec.sync_replicas.to_string()])
        .args(["--app-database", APP_DATABASE, "--app-owner", APP_USER])
        .args(primary.map(|p| format!("--primary={p}")))
        .env("STRATA_SUPERUSER_PASSWORD", &spec.superuser_password)
        .env("STRATA_REPLICATION_PASSWORD", &spec.replication_password)
        .env("STRATA_APP_PASSWORD", &spec.app_password)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // PostgreSQL refuses to run as root.
        command.args(["--run-as", "postgres"]);
    }
    // Dies with `strata up`; a Ctrl-C in its terminal reaches only `strata up`.
    crate::up::supervised_child(&mut command);
    command
        .spawn()
        .with_context(|| format!("starting {} ({})", instance.name, bin.display()))
}

/// SIGKILL and reap: the instance is lost at once (fencing).
pub fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// SIGTERM: the instance manager makes postgres do a fast shutdown and exits.
pub fn terminate(child: &Child) {
    // SAFETY: signalling our own unreaped child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
}

/// Waits for a terminated instance manager; SIGKILL when it takes too long.
pub async fn wait_or_kill(child: &mut Child) -> Option<ExitStatus> {
    let deadline = Instant::now() + STOP_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            _ => {
                kill(child);
                return None;
            }
        }
    }
}

/// Waits (bounded) until a process is gone; SIGKILLs it when it lingers.
/// Used on the postmaster of a lost primary before another is promoted.
pub async fn ensure_gone(pid: u32, patience: Duration) {
    let deadline = Instant::now() + patience;
    while running(pid) {
        if Instant::now() > deadline {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A process that exists and is not a zombie (a dead postmaster whose parent
/// died may wait unreaped; it holds no files and serves nothing).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // The state follows the command name, which is in parentheses.
            let after = stat.rsplit_once(')')?.1;
            after.split_whitespace().next().map(|state| state != "Z")
        })
        .unwrap_or(false)
}
