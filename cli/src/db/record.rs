//! The files through which `strata db` and the local database controller in
//! `strata up` talk, in `DIR/db/NAME/` — the local stand-in for a
//! PostgresCluster custom resource:
//!
//! - `spec.json`: the desired cluster, written once by `strata db create`
//!   (instances, volume size, synchronous replication, the ports of every
//!   instance and of the two stable addresses, the generated passwords);
//! - `status.json`: what the controller observed (phase, primary, instances);
//! - `switchover.json`: a switchover asked for by `strata db switchover`;
//! - `deleting`: present once `strata db rm` asked for the cluster to go.
//!
//! Every file is replaced atomically, so a reader never sees half of one.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use strata_operator::instance_api::Role;

/// One instance of a local cluster, as planned at creation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstanceSpec {
    /// `NAME-N`, also the instance manager's `--name`.
    pub name: String,
    /// The Strata volume holding its data directory.
    pub volume: String,
    /// The storage node that serves the volume's target (the instance's node).
    pub node: String,
    pub pg_port: u16,
    pub api_port: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DbSpec {
    pub name: String,
    pub size_bytes: u64,
    /// Replicas of each instance's volume.
    pub volume_replicas: usize,
    /// How many standbys confirm each commit (0: asynchronous replication).
    pub sync_replicas: u32,
    pub instances: Vec<InstanceSpec>,
    /// The stable address that leads to the primary (the `-rw` Service).
    pub rw_port: u16,
    /// The stable address that leads to the replicas (the `-ro` Service).
    pub ro_port: u16,
    pub superuser_password: String,
    pub replication_password: String,
    pub app_password: String,
}

pub const APP_USER: &str = "app";
pub const APP_DATABASE: &str = "app";

impl DbSpec {
    pub fn uri(&self, read_only: bool) -> String {
        let port = if read_only {
            self.ro_port
        } else {
            self.rw_port
        };
        format!(
            "postgres://{APP_USER}:{}@127.0.0.1:{port}/{APP_DATABASE}",
            self.app_password
        )
    }

    pub fn instance(&self, name: &str) -> anyhow::Result<&InstanceSpec> {
        self.instances
            .iter()
            .find(|i| i.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = self.instances.iter().map(|i| i.name.as_str()).collect();
                anyhow::anyhow!(
                    "database {} has no instance {name:?} (instances: {})",
                    self.name,
                    names.join(", ")
                )
            })
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Volumes are being created and attached, instances bootstrapped.
    Creating,
    /// A primary and every instance ready.
    Ready,
    /// Serving, but some instance is not ready (restarting, catching up).
    Degraded,
    /// No primary (a failover is under way, or none is possible).
    Unavailable,
    /// The controller cannot make progress; `message` says why.
    Failed,
    /// `strata db rm` is tearing it down.
    Deleting,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = serde_json::to_value(self).expect("phases serialize");
        write!(f, "{}", text.as_str().unwrap_or("?"))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstanceStatus {
    pub name: String,
    pub node: String,
    /// None while the instance manager does not answer.
    pub role: Option<Role>,
    pub ready: bool,
    pub streaming: bool,
    pub timeline: Option<u32>,
    /// The primary's write position, a replica's received/replayed position.
    pub lsn: Option<String>,
    /// Bytes of WAL a replica has yet to replay, behind the primary.
    pub lag_bytes: Option<u64>,
    /// Process id of the instance manager (None while it is not running).
    pub pid: Option<u32>,
    /// The block device its data directory is mounted from.
    pub device: Option<String>,
    pub restarts: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SwitchoverResult {
    pub id: String,
    pub to: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DbStatus {
    pub phase: Phase,
    pub primary: Option<String>,
    pub instances: Vec<InstanceStatus>,
    pub message: Option<String>,
    /// Failovers the controller performed.
    pub failovers: u32,
    /// The outcome of the last switchover request.
    pub last_switchover: Option<SwitchoverResult>,
    /// Process id of the `strata up` that wrote this status.
    pub supervisor_pid: u32,
}

/// `strata db switchover`: `to` None lets the controller pick the most advanced replica.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SwitchoverRequest {
    pub id: String,
    pub to: Option<String>,
}

/// Where the files of the local databases live.
pub fn databases_dir(dir: &Path) -> PathBuf {
    dir.join("db")
}

/// The folder of one database: its records, and each instance's mount point and log.
#[derive(Debug, Clone)]
pub struct DbDir(pub PathBuf);

impl DbDir {
    pub fn new(dir: &Path, name: &str) -> DbDir {
        DbDir(databases_dir(dir).join(name))
    }

    pub fn spec_path(&self) -> PathBuf {
        self.0.join("spec.json")
    }
    pub fn status_path(&self) -> PathBuf {
        self.0.join("status.json")
    }
    pub fn switchover_path(&self) -> PathBuf {
        self.0.join("switchover.json")
    }
    pub fn deleting_path(&self) -> PathBuf {
        self.0.join("deleting")
    }
    pub fn instance_dir(&self, instance: &str) -> PathBuf {
        self.0.join(instance)
    }

    pub fn exists(&self) -> bool {
        self.spec_path().exists()
    }

    pub fn spec(&self) -> anyhow::Result<DbSpec> {
        read_json(&self.spec_path())
    }

    pub fn status(&self) -> anyhow::Result<Option<DbStatus>> {
        read_json_if_present(&self.status_path())
    }
}

/// The names of the databases recorded in DIR, sorted.
pub fn database_names(dir: &Path) -> anyhow::Result<Vec<String>> {
    let root = databases_dir(dir);
    let mut names = Vec::new();
    match std::fs::read_dir(&root) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry?;
                if entry.path().join("spec.json").exists() {
                    names.push(entry.file_name().to_string_lossy().into_owned());
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", root.display())),
    }
    names.sort();
    Ok(names)
}

pub fn read_json<T: DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

pub fn read_json_if_present<T: DeserializeOwned>(path: &Path) -> anyhow::Result<Option<T>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Replaces `path` atomically; the file is readable by its owner only, as
/// some of these hold passwords.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let name = path.file_name().context("a record path has a file name")?;
    let tmp = path.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(serde_json::to_string_pretty(value)?.as_bytes())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}
