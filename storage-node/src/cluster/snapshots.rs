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
    /// Tells it from another snapshot that had the same name (see the
    /// proto's `Snapshot.uid`); every copy here has it.
    pub uid: u64,
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

/// Every snapshot the reachable nodes hold, by name. Two snapshots under
/// one name (see [`get`]) are listed apart. Fails only when no node answers.
pub async fn list(cluster: &ClusterFile) -> Result<Vec<SnapshotReport>, VolumeError> {
    let (copies, unreachable) = survey(cluster).await;
    if unreachable.len() == cluster.nodes.len() {
        return Err(VolumeError::Unavailable(
            "no storage node is reachable (is `strata up` running?)".into(),
        ));
    }
    let mut by_name: BTreeMap<(String, u64), SnapshotReport> = BTreeMap::new();
    for copy in copies {
        let report = by_name
            .entry((copy.snapshot.name.clone(), copy.snapshot.uid))
            .or_insert_with(|| SnapshotReport {
                name: copy.snapshot.name.clone(),
                uid: copy.snapshot.uid,
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

/// Snapshot `name`. When the nodes hold copies of two snapshots under the
/// name, it is refused: a volume made from both kinds of copy would have
/// replicas with different data. That happens when a node that was down
/// while the old snapshot was deleted comes back with its copy after a new
/// one was taken; `strata snapshot rm` deletes every copy of both.
pub async fn get(cluster: &ClusterFile, name: &str) -> Result<SnapshotReport, VolumeError> {
    let mut found: Vec<SnapshotReport> = list(cluster)
        .await?
        .into_iter()
        .filter(|s| s.name == name)
        .collect();
    match found.len() {
        0 => Err(VolumeError::SnapshotNotFound(name.to_string())),
        1 => Ok(found.remove(0)),
        _ => Err(conflict(name, &found)),
    }
}

/// The error for copies of several snapshots under one name.
fn conflict(name: &str, snapshots: &[SnapshotReport]) -> VolumeError {
    let kinds: Vec<String> = snapshots
        .iter()
        .map(|s| {
            let nodes: Vec<&str> = s.copies.iter().map(|c| c.node.name.as_str()).collect();
            format!(
                "one of volume {} taken at {} (unix time) on {}",
                s.volume,
                s.created_unix,
                nodes.join(", ")
            )
        })
        .collect();
    VolumeError::SnapshotConflict(format!(
        "the nodes hold copies of {} different snapshots named {name:?} ({}): a node kept an \
         old copy through a delete; `strata snapshot rm {name}` deletes them all",
        snapshots.len(),
        kinds.join("; ")
    ))
}

/// What [`create`] gives back.
#[derive(Debug, Clone)]
pub struct Created {
    pub snapshot: SnapshotReport,
    /// The snapshot was there already (a retry): nothing new was taken.
    pub existed: bool,
}

/// Takes snapshot `name` of `volume` on every in-sync replica, through the
/// volume's target (opened for the while where it is not open; the caller
/// keeps others from opening or closing the volume's target meanwhile).
/// Taking a snapshot that exists already of the same volume returns it
/// (retries are safe, also one that races the call it retries); of another
/// volume, it is refused. A failed attempt leaves no copies behind.
pub async fn create(
    cluster: &ClusterFile,
    volume: &str,
    name: &str,
) -> Result<Created, VolumeError> {
    crate::pool::validate_volume_name(name)
        .map_err(|e| VolumeError::Invalid(e.to_string().replace("volume name", "snapshot name")))?;
    match get(cluster, name).await {
        Ok(existing) if existing.volume == volume => {
            return Ok(Created {
                snapshot: existing,
                existed: true,
            })
        }
        Ok(existing) => {
            return Err(VolumeError::SnapshotExists {
                name: name.to_string(),
                volume: existing.volume,
            })
        }
        Err(VolumeError::SnapshotNotFound(_)) => {}
        Err(err) => return Err(err),
    }
    let report = volumes::get(cluster, volume).await?;
    let uid = crate::replication::target::new_snapshot_uid();
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
            uid,
        })
        .await;
    if opened {
        volumes::close_target_on(&node, volume).await;
    }
    let taken = match taken {
        Ok(response) => response.into_inner(),
        Err(status) => {
            remove_copies(cluster, name, uid).await;
            // Another call took the name meanwhile (a retry racing the call
            // it retries): each replica refused a second copy. That
            // snapshot is the one this call asked for.
            if let Ok(existing) = get(cluster, name).await {
                if existing.volume == volume && existing.uid != uid {
                    return Ok(Created {
                        snapshot: existing,
                        existed: true,
                    });
                }
            }
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
    };
    // The one just taken, even if a node that was down comes back with an
    // old copy under the name meanwhile.
    let snapshot = list(cluster)
        .await?
        .into_iter()
        .find(|s| s.name == name && s.uid == taken.uid)
        .ok_or_else(|| VolumeError::SnapshotNotFound(name.to_string()))?;
    Ok(Created {
        snapshot,
        existed: false,
    })
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
                uid: None,
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

/// Best effort: deletes the copies a failed snapshot `uid` left, and none
/// of another snapshot that has its name. A replica of an older build,
/// which fails the snapshot, takes its copy without the uid (as uid 0); no
/// snapshot of the name was there when this one began.
async fn remove_copies(cluster: &ClusterFile, name: &str, uid: u64) {
    for node in &cluster.nodes {
        if let Ok(mut c) = client::connect(node).await {
            for uid in [uid, 0] {
                let _ = c
                    .delete_snapshot(DeleteSnapshotRequest {
                        name: name.to_string(),
                        uid: Some(uid),
                    })
                    .await;
            }
        }
    }
}
