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

/// Why an instance manager failed, from the end of its log: its last
/// `Error: ...` line and the cause under it (anyhow's report).
pub fn exit_reason(instance_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log_path(instance_dir)).ok()?;
    let lines: Vec<&str> = text.lines().collect();
    let at = lines.iter().rposition(|l| l.starts_with("Error: "))?;
    let mut reason = lines[at].trim_start_matches("Error: ").to_string();
    // The first line under "Caused by:", without its number when there are several.
    let cause = lines[at + 1..]
        .iter()
        .skip_while(|l| l.trim() != "Caused by:")
        .nth(1)
        .map(|l| {
            let l = l.trim();
            match l.split_once(": ") {
                Some((n, rest)) if n.parse::<u32>().is_ok() => rest,
                _ => l,
            }
        });
    if let Some(cause) = cause {
        reason = format!("{reason}: {cause}");
    }
    // PostgreSQL, which writes to the same log, says why it stopped in its
    // last FATAL (or PANIC) line; the manager's error only has its status.
    let postgres = lines[..at].iter().rev().find_map(|l| {
        ["FATAL:", "PANIC:"]
            .iter()
            .find_map(|level| l.find(level).map(|i| l[i..].split_whitespace()))
            .map(|words| words.collect::<Vec<_>>().join(" "))
    });
    if let Some(postgres) = postgres {
        reason = format!("{reason} (postgres: {postgres})");
    }
    Some(reason)
}

/// Searchable by others: PostgreSQL runs as `postgres` when `strata up`
/// runs as root, and must reach its data and socket folders under DIR.
pub fn check_reachable_by_postgres(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    let dir = dir.canonicalize()?;
    for folder in dir.ancestors() {
        let mode = std::fs::metadata(folder)?.permissions().mode();
        if mode & 0o001 == 0 {
            anyhow::bail!(
                "PostgreSQL runs as the postgres user and cannot reach {}: {} is not \
                 searchable by others (chmod o+x {}, or use a --dir elsewhere)",
                dir.display(),
                folder.display(),
                folder.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_reason_of_a_failed_start_comes_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            log_path(dir.path()),
            "INFO initdb\nError: bootstrap\n\nCaused by:\n    initdb failed (exit status: 1): \
             Permission denied\n\nStack backtrace:\n   0: x\n",
        )
        .unwrap();
        assert_eq!(
            exit_reason(dir.path()).unwrap(),
            "bootstrap: initdb failed (exit status: 1): Permission denied"
        );
        std::fs::write(
            log_path(dir.path()),
            "2026-11-25 04:50:01 UTC [811] LOG:  could not bind IPv4 address \"127.0.0.1\"\n\
             2026-11-25 04:50:01 UTC [811] FATAL:  could not create any TCP/IP sockets\n\
             Error: bootstrap\n\nCaused by:\n    postgres exited: during start: exit status: 1\n",
        )
        .unwrap();
        assert_eq!(
            exit_reason(dir.path()).unwrap(),
            "bootstrap: postgres exited: during start: exit status: 1 \
             (postgres: FATAL: could not create any TCP/IP sockets)"
        );
        std::fs::write(log_path(dir.path()), "Error: binding the API\n").unwrap();
        assert_eq!(exit_reason(dir.path()).unwrap(), "binding the API");
        std::fs::write(log_path(dir.path()), "fine\n").unwrap();
        assert_eq!(exit_reason(dir.path()), None);
    }

    #[test]
    fn a_folder_postgres_cannot_reach_is_refused() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return; // PostgreSQL runs as the invoking user: nothing to check.
        }
        let outer = tempfile::tempdir().unwrap();
        let dir = outer.path().join("strata");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(outer.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let err = check_reachable_by_postgres(&dir).unwrap_err().to_string();
        assert!(err.contains("not searchable by others"), "{err}");
        std::fs::set_permissions(outer.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        check_reachable_by_postgres(&dir).unwrap();
    }
}
