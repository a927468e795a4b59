//! The cluster file that `strata up` writes into its directory
//! (`DIR/cluster.json`): where each node listens and which process runs it.
//! Every other command finds the cluster through it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

pub const CLUSTER_FILE: &str = "cluster.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeEntry {
    pub name: String,
    pub zone: String,
    pub grpc: SocketAddr,
    pub nbd: SocketAddr,
    pub http: SocketAddr,
    /// The replication endpoint (absent in files of older versions).
    #[serde(default)]
    pub replication: Option<SocketAddr>,
    pub pool: PathBuf,
    /// Process id while `strata up` runs the node.
    pub pid: Option<u32>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ClusterFile {
    /// Process id of the `strata up` that supervises the nodes, while it runs.
    pub supervisor_pid: Option<u32>,
    pub nodes: Vec<NodeEntry>,
}

impl ClusterFile {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(CLUSTER_FILE)
    }

    /// Reads the cluster file, or explains how to start a cluster.
    pub fn load(dir: &Path) -> anyhow::Result<ClusterFile> {
        let path = Self::path(dir);
        let text = std::fs::read_to_string(&path).map_err(|err| {
            if err.kind() == std::io::ErrorKind::NotFound {
                anyhow::anyhow!(
                    "no Strata cluster in {} (start one with `strata up --dir {}`)",
                    dir.display(),
                    dir.display()
                )
            } else {
                anyhow::anyhow!("reading {}: {err}", path.display())
            }
        })?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn load_if_present(dir: &Path) -> anyhow::Result<Option<ClusterFile>> {
        if Self::path(dir).exists() {
            Self::load(dir).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Replaces the file atomically so readers never see half of it.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let path = Self::path(dir);
        let tmp = dir.join(format!(".{CLUSTER_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    }

    pub fn node(&self, name: &str) -> anyhow::Result<&NodeEntry> {
        self.nodes.iter().find(|n| n.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
            anyhow::anyhow!("no node named {name:?} (nodes: {})", names.join(", "))
        })
    }
}

/// True when a process with this id exists.
pub fn process_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}
