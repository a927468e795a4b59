//! Running PostgreSQL's programs as children of the instance manager: as the
//! unprivileged user postgres insists on, and tied to our life with
//! PR_SET_PDEATHSIG, so a SIGKILLed instance manager never leaves a postgres behind
//! that still accepts writes (the same promise a container gives when it dies).

use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::process::Command;
use tokio::sync::watch;

use super::error::InstanceError;

/// The OS user postgres runs as when the instance manager is started as root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    /// Looks a user up in the passwd database.
    pub fn lookup(user: &str) -> Result<Self, InstanceError> {
        let name = CString::new(user).map_err(|_| InstanceError::UnknownUser(user.into()))?;
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call and buf outlives pwd's use.
        let rc = unsafe {
            libc::getpwnam_r(
                name.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        if rc != 0 || result.is_null() {
            return Err(InstanceError::UnknownUser(user.into()));
        }
        Ok(Self {
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        })
    }

    /// The user to drop to, or `None` when we already are an unprivileged user.
    pub fn resolve(user: Option<&str>) -> Result<Option<Self>, InstanceError> {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        match user {
            None if euid == 0 => Err(InstanceError::Invalid(
                "postgres refuses to run as root: pass --run-as USER".into(),
            )),
            None => Ok(None),
            Some(user) => {
                let ids = Self::lookup(user)?;
                if euid == 0 {
                    Ok(Some(ids))
                } else if euid == ids.uid {
                    Ok(None)
                } else {
                    Err(InstanceError::Invalid(format!(
                        "--run-as {user} needs the instance manager to start as root or as {user}"
                    )))
                }
            }
        }
    }

    /// Makes `path` and everything below it belong to this user.
    pub fn chown_recursive(&self, path: &Path) -> Result<(), InstanceError> {
        std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid))
            .map_err(|e| InstanceError::io(format!("chown {}", path.display()), e))?;
        if path.is_dir() && !path.is_symlink() {
            let entries = std::fs::read_dir(path)
                .map_err(|e| InstanceError::io(format!("reading {}", path.display()), e))?;
            for entry in entries {
                let entry = entry
                    .map_err(|e| InstanceError::io(format!("reading {}", path.display()), e))?;
                self.chown_recursive(&entry.path())?;
            }
        }
        Ok(())
    }
}

/// Creates `dir` (mode 0700, as postgres wants for its data and socket dirs) owned
/// by the user postgres runs as.
pub fn ensure_private_dir(dir: &Path, run_as: Option<RunAs>) -> Result<(), InstanceError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| InstanceError::io(format!("creating {}", dir.display()), e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| InstanceError::io(format!("chmod {}", dir.display()), e))?;
    if let Some(ids) = run_as {
        ids.chown_recursive(dir)?;
    }
    Ok(())
}

/// A command for one of PostgreSQL's programs that runs as `run_as` and dies with us.
pub fn pg_command(program: &Path, run_as: Option<RunAs>) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir("/").stdin(Stdio::null());
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure only makes async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(ids) = run_as {
                // Supplementary groups first: after setuid we may no longer drop them.
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(ids.gid) != 0
                    || libc::setuid(ids.uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // After the setuid above: the kernel clears the parent-death signal on
            // every change of credentials.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // We may have died between fork and prctl; then nobody would kill the child.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    cmd
}

/// Runs a tool to completion and answers its output; its stderr becomes the error
/// when it fails.
pub async fn run_tool(mut cmd: Command, tool: &str) -> Result<String, InstanceError> {
    let output = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .map_err(|e| InstanceError::io(format!("starting {tool}"), e))?;
    if output.status.success() {
        // Some tools (pg_rewind) report on stderr even when all is well.
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        // The last lines say what went wrong; the whole log can be long.
        let tail: Vec<&str> = stderr.lines().rev().take(8).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Err(InstanceError::Tool {
            tool: tool.into(),
            status: output.status.to_string(),
            stderr: tail.join("\n"),
        })
    }
}

/// How to ask the postmaster to stop (see "Shutting Down the Server" in the docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownMode {
    /// SIGINT: abort sessions, write a shutdown checkpoint, send all WAL to standbys.
    Fast,
    /// SIGQUIT: exit at once; the next start runs crash recovery.
    Immediate,
}

/// A running postmaster, the child of this process.
pub struct Postmaster {
    pid: u32,
    exit: watch::Receiver<Option<ExitStatus>>,
    /// Set before we stop it, so its exit is not mistaken for a crash.
    expected_exit: Arc<AtomicBool>,
}

impl Postmaster {
    /// Starts `postgres -D data_dir`. `on_crash` is called when it exits without being
    /// asked to.
    pub fn spawn(
        postgres: &Path,
        data_dir: &Path,
        run_as: Option<RunAs>,
        on_crash: impl FnOnce(ExitStatus) + Send + 'static,
    ) -> Result<Self, InstanceError> {
        let mut cmd = pg_command(postgres, run_as);
        cmd.arg("-D").arg(data_dir);
        let mut child = cmd
            .spawn()
            .map_err(|e| InstanceError::io("starting postgres".to_string(), e))?;
        let pid = child.id().expect("a child that was just spawned has a pid");
        let (tx, exit) = watch::channel(None);
        let expected_exit = Arc::new(AtomicBool::new(false));
        let expected = expected_exit.clone();
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(status) => status,
                Err(e) => {
                    tracing::error!(error = %e, "waiting for postgres");
                    return;
                }
            };
            tracing::info!(pid, %status, "postgres exited");
            let _ = tx.send(Some(status));
            if !expected.load(Ordering::SeqCst) {
                on_crash(status);
            }
        });
        Ok(Self {
            pid,
            exit,
            expected_exit,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The exit status once the postmaster has exited.
    pub fn exited(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    /// Sends a signal without waiting; used to pass SIGTERM/SIGINT on.
    pub fn signal(&self, signal: libc::c_int) {
        if self.exited().is_none() {
            // SAFETY: kill has no memory preconditions; the pid is our unreaped child.
            unsafe { libc::kill(self.pid as libc::pid_t, signal) };
        }
    }

    /// Stops the postmaster and waits for it; an immediate shutdown follows a fast
    /// one that takes longer than `patience`.
    pub async fn stop(
        mut self,
        mode: ShutdownMode,
        patience: Duration,
    ) -> Result<ExitStatus, InstanceError> {
        self.expected_exit.store(true, Ordering::SeqCst);
        let signal = match mode {
            ShutdownMode::Fast => libc::SIGINT,
            ShutdownMode::Immediate => libc::SIGQUIT,
        };
        self.signal(signal);
        match tokio::time::timeout(patience, self.wait()).await {
            Ok(status) => status,
            Err(_) => {
                tracing::warn!(
                    pid = self.pid,
                    "postgres did not stop in time; immediate shutdown"
                );
                self.signal(libc::SIGQUIT);
                self.wait().await
            }
        }
    }

    /// Marks the coming exit as expected (the whole instance manager is stopping).
    pub fn expect_exit(&self) {
        self.expected_exit.store(true, Ordering::SeqCst);
    }

    pub async fn wait(&mut self) -> Result<ExitStatus, InstanceError> {
        let status = self
            .exit
            .wait_for(Option::is_some)
            .await
            .map_err(|_| InstanceError::PostgresExited("its supervisor task ended".into()))?;
        Ok(status.expect("waited for Some"))
    }
}
