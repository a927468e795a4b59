//! The HTTP API of strata-instance: what it reports and what it is asked to do.
//! Shared by the server (the instance manager), the client the controller uses, and
//! the tests.
//!
//! - `GET /status`: an [`InstanceReport`]
//! - `GET /healthz`: 200 when postgres accepts connections, 503 otherwise
//! - `GET /metrics`: the report as Prometheus gauges
//! - `POST /promote`: promote this replica; answers with the new [`InstanceReport`]
//! - `POST /demote` with a [`PrimaryAddress`]: stop this primary cleanly and restart
//!   it as a replica of that address; answers with a [`DemoteReport`]
//! - `POST /follow` with a [`PrimaryAddress`]: stream from another primary
//! - `POST /replication` with a [`ReplicationSettings`]: peers and synchronous count

use serde::{Deserialize, Serialize};

use crate::lsn::Lsn;

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Replica,
}

/// Where a replica streams WAL from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PrimaryAddress {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for PrimaryAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// What an instance manager knows about its postgres.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct InstanceReport {
    pub name: String,
    pub role: Role,
    /// postgres accepts connections.
    pub ready: bool,
    pub timeline: Option<u32>,
    /// The primary's current WAL write position.
    pub current_lsn: Option<Lsn>,
    /// A replica's last WAL position received and flushed.
    pub received_lsn: Option<Lsn>,
    /// A replica's last WAL position replayed (visible to queries).
    pub replayed_lsn: Option<Lsn>,
    /// A replica's WAL received but not yet replayed, in bytes.
    pub replay_lag_bytes: Option<u64>,
    /// A replica's WAL receiver is connected and streaming.
    pub streaming: bool,
    /// The primary a replica follows.
    pub following: Option<PrimaryAddress>,
    pub postmaster_pid: Option<u32>,
    /// The primary's view of its standbys (pg_stat_replication).
    #[serde(default)]
    pub standbys: Vec<StandbyReport>,
    /// The cluster membership and synchronous count this instance works with.
    #[serde(default)]
    pub replication: Option<ReplicationSettings>,
}

impl InstanceReport {
    /// How far this instance has WAL: the most advanced instance is the one to promote.
    pub fn wal_position(&self) -> Option<Lsn> {
        match self.role {
            Role::Primary => self.current_lsn,
            // Received WAL is replayed before a promotion completes, so it counts.
            Role::Replica => match (self.received_lsn, self.replayed_lsn) {
                (Some(r), Some(p)) => Some(r.max(p)),
                (r, p) => r.or(p),
            },
        }
    }
}

/// One standby as the primary sees it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct StandbyReport {
    pub name: String,
    pub state: String,
    /// `sync`, `quorum`, `potential` or `async`.
    pub sync_state: String,
    pub flush_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
}

/// The answer to a demotion.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct DemoteReport {
    /// The last WAL position the old primary wrote (its shutdown checkpoint). The
    /// replica to promote must have received it for the switchover to lose nothing.
    pub final_lsn: Lsn,
    pub report: InstanceReport,
}

/// Which instances make up the cluster, and how many must confirm each commit.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ReplicationSettings {
    pub peers: Vec<String>,
    pub sync_replicas: u32,
}

/// An error answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ApiError {
    pub error: String,
}
