//! Attaching an NBD export as a block device on this node.
//!
//! With the kernel's nbd module loaded (/sys/module/nbd exists) the export
//! is connected to a free /dev/nbdN by `nbd-client`. Without it, `nbdfuse`
//! serves the export as a file in a FUSE mount and a loop device is set up
//! over that file (`losetup`). nbdfuse runs in its own session so it outlives
//! a restart of the plugin; its pid is kept in the volume's state.
//!
//! Growing: the kernel device takes a new size with the NBD_SET_SIZE ioctl.
//! nbdfuse reads the export's size once, when it connects, so a loop device
//! over it only grows when the volume is attached again (next NodeStage).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::command::{self, CommandError};
use crate::mount;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("invalid NBD URI {0:?}: expected nbd://host:port/export")]
    BadUri(String),
    #[error("{0}")]
    Failed(String),
}

/// What was attached, as recorded in the volume's state file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Attachment {
    /// /dev/nbdN connected by nbd-client.
    KernelNbd { device: PathBuf },
    /// nbdfuse (pid) serving `file` in the FUSE mount `fuse_dir`, and the
    /// loop device over that file.
    Nbdfuse {
        fuse_dir: PathBuf,
        file: PathBuf,
        pid: u32,
        loop_device: PathBuf,
    },
}

impl Attachment {
    pub fn device(&self) -> &Path {
        match self {
            Attachment::KernelNbd { device } => device,
            Attachment::Nbdfuse { loop_device, .. } => loop_device,
        }
    }
}

/// host, port and export name of nbd://host:port/export.
pub fn parse_nbd_uri(uri: &str) -> Result<(String, u16, String), AttachError> {
    let bad = || AttachError::BadUri(uri.to_string());
    let rest = uri.strip_prefix("nbd://").ok_or_else(bad)?;
    let (authority, export) = rest.split_once('/').ok_or_else(bad)?;
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (host, port.parse().map_err(|_| bad())?),
        None => (authority, 10809),
    };
    if host.is_empty() || export.is_empty() {
        return Err(bad());
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok((host.to_string(), port, export.to_string()))
}

pub struct Attacher {
    /// Where nbdfuse mounts live (one directory per volume).
    work_dir: PathBuf,
}

fn kernel_nbd_available() -> bool {
    Path::new("/sys/module/nbd").exists()
}

/// True when `pid` is a live nbdfuse (not a recycled pid).
fn nbdfuse_alive(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmdline| {
            cmdline
                .split(|b| *b == 0)
                .next()
                .is_some_and(|argv0| argv0.ends_with(b"nbdfuse"))
        })
        .unwrap_or(false)
}

impl Attacher {
    pub fn new(state_dir: &Path) -> std::io::Result<Attacher> {
        let work_dir = state_dir.join("attach");
        std::fs::create_dir_all(&work_dir)?;
        Ok(Attacher { work_dir })
    }

    pub async fn attach(&self, volume_id: &str, uri: &str) -> Result<Attachment, AttachError> {
        parse_nbd_uri(uri)?;
        if kernel_nbd_available() {
            self.attach_kernel(uri).await
        } else {
            self.attach_nbdfuse(volume_id, uri).await
        }
    }

    async fn attach_kernel(&self, uri: &str) -> Result<Attachment, AttachError> {
        let (host, port, export) = parse_nbd_uri(uri)?;
        // A device is free while the kernel has no client pid for it; two
        // attaches racing for one device make nbd-client fail, then we retry.
        for _ in 0..3 {
            let Some(device) = free_nbd_device()? else {
                return Err(AttachError::Failed(
                    "no free /dev/nbdN: load nbd with more devices (modprobe nbd nbds_max=...)"
                        .into(),
                ));
            };
            let port = port.to_string();
            let dev = device.to_string_lossy().to_string();
            let args = ["-N", &export, &host, &port, &dev, "-b", "4096", "-persist"];
            match command::run("nbd-client", &args).await {
                Ok(_) => return Ok(Attachment::KernelNbd { device }),
                Err(err) => {
                    tracing::warn!(%err, device = %dev, "nbd-client failed; trying another device")
                }
            }
        }
        Err(AttachError::Failed(format!(
            "nbd-client could not connect {uri} to any free /dev/nbdN"
        )))
    }

    async fn attach_nbdfuse(&self, volume_id: &str, uri: &str) -> Result<Attachment, AttachError> {
        let fuse_dir = self.work_dir.join(volume_id);
        std::fs::create_dir_all(&fuse_dir)?;
        // A mount left by an nbdfuse that died with its connection.
        mount::unmount(&fuse_dir).await?;
        let file = fuse_dir.join("disk");
        let log_path = self.work_dir.join(format!("{volume_id}.nbdfuse.log"));
        let log = std::fs::File::create(&log_path)?;
        let mut child = std::process::Command::new("nbdfuse");
        child
            .arg(&file)
            .arg(uri)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: setsid is async-signal-safe. nbdfuse gets its own session
        // so that stopping the plugin (and its process group) leaves the
        // attached volume working.
        unsafe {
            child.pre_exec(|| {
                libc::setsid();
                Ok(())
            })
        };
        let mut child = child.spawn().map_err(|source| CommandError::Spawn {
            program: "nbdfuse".into(),
            source,
        })?;
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if std::fs::metadata(&file).is_ok_and(|m| m.is_file() && m.len() > 0) {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(AttachError::Failed(format!(
                    "nbdfuse {uri} exited ({status}): {}",
                    log.trim()
                )));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let _ = mount::unmount(&fuse_dir).await;
                return Err(AttachError::Failed(format!(
                    "nbdfuse did not present {uri} within 15 s (is /dev/fuse available?)"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Reap nbdfuse when it exits while this plugin still runs.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        let file_arg = file.to_string_lossy().to_string();
        let loop_device = match command::run("losetup", &["--find", "--show", &file_arg]).await {
            Ok(device) => PathBuf::from(device),
            Err(err) => {
                let _ = mount::unmount(&fuse_dir).await;
                return Err(err.into());
            }
        };
        Ok(Attachment::Nbdfuse {
            fuse_dir,
            file,
            pid,
            loop_device,
        })
    }

    /// Whether the attachment still serves its device.
    pub async fn is_alive(&self, attachment: &Attachment) -> bool {
        match attachment {
            Attachment::KernelNbd { device } => nbd_device_connected(device),
            Attachment::Nbdfuse {
                fuse_dir,
                file,
                pid,
                loop_device,
            } => {
                nbdfuse_alive(*pid)
                    && mount::is_mount_point(fuse_dir).unwrap_or(false)
                    && loop_backing_file(loop_device).await.as_deref() == Some(file.as_path())
            }
        }
    }

    /// Takes the device down; what is already gone is skipped.
    pub async fn detach(&self, attachment: &Attachment) -> Result<(), AttachError> {
        match attachment {
            Attachment::KernelNbd { device } => {
                if nbd_device_connected(device) {
                    command::run("nbd-client", &["-d", &device.to_string_lossy()]).await?;
                }
            }
            Attachment::Nbdfuse {
                fuse_dir,
                file,
                pid,
                loop_device,
            } => {
                if loop_backing_file(loop_device).await.as_deref() == Some(file.as_path()) {
                    command::run("losetup", &["-d", &loop_device.to_string_lossy()]).await?;
                }
                // Unmounting ends nbdfuse once its in-flight requests are done.
                mount::unmount(fuse_dir).await?;
                let deadline = Instant::now() + Duration::from_secs(10);
                while nbdfuse_alive(*pid) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if nbdfuse_alive(*pid) {
                    // SAFETY: signalling a process checked to be our nbdfuse.
                    unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
                }
                let _ = std::fs::remove_dir(fuse_dir);
            }
        }
        Ok(())
    }

    /// Makes the device take the export's current size; returns the size.
    pub async fn refresh_size(
        &self,
        attachment: &Attachment,
        uri: &str,
    ) -> Result<u64, AttachError> {
        match attachment {
            Attachment::KernelNbd { device } => {
                let size: u64 = command::run("nbdinfo", &["--size", uri])
                    .await?
                    .parse()
                    .map_err(|_| {
                        AttachError::Failed(format!("nbdinfo --size {uri}: not a number"))
                    })?;
                set_nbd_size(device, size)?;
            }
            Attachment::Nbdfuse { loop_device, .. } => {
                command::run("losetup", &["-c", &loop_device.to_string_lossy()]).await?;
            }
        }
        Ok(mount::device_size(attachment.device()).await?)
    }
}

/// The file a loop device is bound to, if any.
async fn loop_backing_file(loop_device: &Path) -> Option<PathBuf> {
    let out = command::run(
        "losetup",
        &[
            "--noheadings",
            "--output",
            "BACK-FILE",
            &loop_device.to_string_lossy(),
        ],
    )
    .await
    .ok()?;
    let path = out.trim();
    (!path.is_empty()).then(|| PathBuf::from(path.trim_end_matches(" (deleted)")))
}

fn nbd_device_connected(device: &Path) -> bool {
    device
        .file_name()
        .map(|name| Path::new("/sys/block").join(name).join("pid").exists())
        .unwrap_or(false)
}

fn free_nbd_device() -> std::io::Result<Option<PathBuf>> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/block")?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("nbd"))
        .collect();
    names.sort_by_key(|n| n[3..].parse::<u32>().unwrap_or(u32::MAX));
    Ok(names
        .into_iter()
        .map(|n| PathBuf::from("/dev").join(n))
        .find(|d| !nbd_device_connected(d)))
}

/// NBD_SET_SIZE: the kernel nbd device takes the export's new size while
/// connected (nbd-client has no option for it).
fn set_nbd_size(device: &Path, size: u64) -> Result<(), AttachError> {
    use std::os::fd::AsRawFd;
    const NBD_SET_SIZE: libc::c_ulong = 0xab02; // _IO(0xab, 2)
    let file = std::fs::OpenOptions::new().read(true).open(device)?;
    // SAFETY: NBD_SET_SIZE takes the size in bytes as its argument.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), NBD_SET_SIZE, size as libc::c_ulong) };
    if rc != 0 {
        return Err(AttachError::Io(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_uris_are_split_into_host_port_and_export() {
        assert_eq!(
            parse_nbd_uri("nbd://127.0.0.1:10810/pvc-1").unwrap(),
            ("127.0.0.1".into(), 10810, "pvc-1".into())
        );
        assert_eq!(
            parse_nbd_uri("nbd://node-a/vol").unwrap(),
            ("node-a".into(), 10809, "vol".into())
        );
        assert!(parse_nbd_uri("http://x/y").is_err());
        assert!(parse_nbd_uri("nbd://host:port/v").is_err());
        assert!(parse_nbd_uri("nbd://host:1/").is_err());
    }
}
