//! Snapshots of replicated volumes across the cluster: taking one through the
//! volume's target (so every in-sync replica's copy holds the same data),
//! listing the copies the nodes hold, and deleting them. Volumes are created
//! from a snapshot by [`super::volumes::create_from_snapshot`].

use std::collections::BTreeMap;

use strata_proto::storage::{
    CreateSnapshotRequest, DeleteSnapshotRequest, ListSnapshotsRequest, Snapshot,
};
use tonic::Code;

use super::volumes::{self, VolumeError};
use super::{client, ClusterFile, NodeEntry};

/// One node's copy of a snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotCopy {
    pub node: NodeEntry,
    pub snapshot: Snapshot,
}

/// A snapshot of a replicated volume, gathered from the nodes holding it.
#[derive(Debug, Clone)]
pub struct SnapshotReport {
    pub name: String,
    /// The volume it was taken of (which may have been deleted since).
    pub volume: String,
    /// Size of the volume when it was taken.
    pub size_bytes: u64,
    pub created_unix: u64,
    pub copies: Vec<SnapshotCopy>,
}

/// Every node's snapshot copies, and the nodes that did not answer.
async fn survey(cluster: &ClusterFile) -> (Vec<SnapshotCopy>, Vec<NodeEntry>) {
    let asks = cluster.nodes.iter().map(|node| async move {
        let answer = async {
            let mut c = client::connect(node).await?;
            let snapshots = c
                .list_snapshots(ListSnapshotsRequest {})
                .await?
                .into_inner()
                .snapshots;
            anyhow::Ok(snapshots)
        }
        .await;
        (node.clone(), answer)
    });
    let mut copies = Vec::new();
    let mut unreachable = Vec::new();
    for (node, answer) in futures::future::join_all(asks).await {
        match answer {
            Ok(snapshots) => copies.extend(snapshots.into_iter().map(|snapshot| SnapshotCopy {
                node: node.clone(),
                snapshot,
            })),
            Err(_) => unreachable.push(node),
        }
    }
    (copies, unreachable)
}

/// Every snapshot the reachable nodes hold, by name. Fails only when no
/// node answers.
pub async fn list(cluster: &ClusterFile) -> Result<Vec<SnapshotReport>, VolumeError> {
    let (copies, unreachable) = survey(cluster).await;
    if unreachable.len() == cluster.nodes.len() {
        return Err(VolumeError::Unavailable(
            "no storage node is reachable (is `strata up` running?)".into(),
        ));
    }
    let mut by_name: BTreeMap<String, SnapshotReport> = BTreeMap::new();
    for copy in copies {
        let report = by_name
            .entry(copy.snapshot.name.clone())
            .or_insert_with(|| SnapshotReport {
                name: copy.snapshot.name.clone(),
                volume: copy.snapshot.volume.clone(),
                size_bytes: copy.snapshot.size_bytes,
                created_unix: copy.snapshot.created_unix,
                copies: Vec::new(),
            });
        report.created_unix = report.created_unix.min(copy.snapshot.created_unix);
        report.copies.push(copy);
    }
    Ok(by_name.into_values().collect())
}

pub async fn get(cluster: &ClusterFile, name: &str) -> Result<SnapshotReport, VolumeError> {
    list(cluster)
        .await?
        .into_iter()
        .find(|s| s.name == name)
        .ok_or_else(|| VolumeError::SnapshotNotFound(name.to_string()))
}

/// Takes snapshot `name` of `volume` on every in-sync replica, through the
/// volume's target (opened for the while where it is not open; the caller
/// keeps others from opening or closing the volume's target meanwhile).
/// Taking a snapshot that exists already of the same volume returns it
/// (retries are safe); of another volume, it is refused. A failed attempt
/// leaves no copies behind.
pub async fn create(
    cluster: &ClusterFile,
    volume: &str,
    name: &str,
) -> Result<SnapshotReport, VolumeError> {
    crate::pool::validate_volume_name(name)
        .map_err(|e| VolumeError::Invalid(e.to_string().replace("volume name", "snapshot name")))?;
    if let Some(existing) = list(cluster).await?.into_iter().find(|s| s.name == name) {
        if existing.volume == volume {
            return Ok(existing);
        }
        return Err(VolumeError::SnapshotExists {
            name: name.to_string(),
            volume: existing.volume,
        });
    }
    let report = volumes::get(cluster, volume).await?;
    // A volume nobody serves gets a target for the snapshot only, closed
    // again after: the volume must not look attached to a node.
    let (node, opened) = match report.active_target() {
        Some((node, _)) => (node.clone(), false),
        None => (volumes::open_target(cluster, volume, None).await?.0, true),
    };
    let taken = client::connect(&node)
        .await
        .map_err(|e| VolumeError::Unavailable(e.to_string()))?
        .create_snapshot(CreateSnapshotRequest {
            volume: volume.to_string(),
            name: name.to_string(),
        })
        .await;
    if opened {
        volumes::close_target_on(&node, volume).await;
    }
    if let Err(status) = taken {
        remove_copies(cluster, name).await;
        return Err(match status.code() {
            Code::ResourceExhausted => VolumeError::NoRoom(status.message().to_string()),
            Code::Unavailable | Code::FailedPrecondition => {
                VolumeError::Unavailable(status.message().to_string())
            }
            _ => VolumeError::Node {
                node: node.name.clone(),
                status,
            },
        });
    }
    get(cluster, name).await
}

/// Deletes every copy of the snapshot. Volumes created from it keep their
/// data. Fails (having deleted what it could) when a node is unreachable,
/// since it may hold a copy.
pub async fn delete(cluster: &ClusterFile, name: &str) -> Result<(), VolumeError> {
    let (copies, unreachable) = survey(cluster).await;
    let copies: Vec<&SnapshotCopy> = copies.iter().filter(|c| c.snapshot.name == name).collect();
    if copies.is_empty() && unreachable.is_empty() {
        return Err(VolumeError::SnapshotNotFound(name.to_string()));
    }
    for copy in copies {
        let deleted = client::connect(&copy.node)
            .await
            .map_err(|e| VolumeError::Unavailable(e.to_string()))?
            .delete_snapshot(DeleteSnapshotRequest {
                name: name.to_string(),
            })
            .await;
        match deleted {
            Ok(_) => {}
            Err(status) if status.code() == Code::NotFound => {}
            Err(status) => {
                return Err(VolumeError::Node {
                    node: copy.node.name.clone(),
                    status,
                })
            }
        }
    }
    if !unreachable.is_empty() {
        let nodes: Vec<&str> = unreachable.iter().map(|n| n.name.as_str()).collect();
        return Err(VolumeError::Unavailable(format!(
            "deleted the reachable copies of snapshot {name}; nodes {} did not answer and may hold one",
            nodes.join(", ")
        )));
    }
    Ok(())
}

/// Best effort: deletes the copies a failed snapshot left.
async fn remove_copies(cluster: &ClusterFile, name: &str) {
    for node in &cluster.nodes {
        if let Ok(mut c) = client::connect(node).await {
            let _ = c
                .delete_snapshot(DeleteSnapshotRequest {
                    name: name.to_string(),
                })
                .await;
        }
    }
}
