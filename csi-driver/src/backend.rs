//! Every call the controller makes to the storage nodes goes through
//! [`VolumeBackend`]; [`ClusterBackend`] implements it with the replicated
//! volumes of `strata_node::cluster::volumes` (replicas on distinct nodes,
//! one volume target at a time), so the CSI logic never talks gRPC itself.
//!
//! CSI node ids are storage node names: ControllerPublishVolume opens the
//! volume's target on the storage node whose name is the CSI node id, and
//! the node plugin on that machine attaches its NBD export. In Kubernetes
//! both DaemonSets take the name from `spec.nodeName`, so the two agree.

use std::collections::BTreeSet;

use strata_node::cluster::snapshots::{self, SnapshotReport};
use strata_node::cluster::volumes::{self, Placement, VolumeError, VolumeReport};
pub use strata_node::cluster::Discovery;
use strata_node::cluster::{client, ClusterFile, NodeEntry};
use strata_node::replication::replica::HEADER_BYTES;
use strata_proto::storage::{CloseTargetRequest, GetNodeInfoRequest, NodeInfo};
use tonic::Code;

use crate::topology::ZoneChoice;

/// Failures are the storage side's own typed errors; `crate::error` is the
/// one place they become CSI codes.
pub type BackendResult<T> = Result<T, VolumeError>;

/// A replicated volume as the storage nodes report it.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendVolume {
    pub name: String,
    pub size_bytes: u64,
    /// Replicas the volume was created with.
    pub replicas: usize,
    /// Replicas in the newest in-sync set.
    pub in_sync: usize,
    /// Zones of the nodes holding its replicas, sorted, each once.
    pub zones: Vec<String>,
    /// The storage node (= CSI node id) whose target serves it, if open.
    pub published_on: Option<String>,
}

/// Room for new volumes.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Capacity {
    /// Bytes of volumes (of the asked replica count) that can still be
    /// provisioned.
    pub available_bytes: u64,
    /// The largest single volume that still fits.
    pub maximum_volume_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct CreateVolume {
    pub name: String,
    pub size_bytes: u64,
    pub replicas: u32,
    pub zones: ZoneChoice,
}

/// A snapshot of a replicated volume.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendSnapshot {
    pub name: String,
    pub source_volume: String,
    /// The volume's size when the snapshot was taken: the smallest volume
    /// that can be created from it.
    pub size_bytes: u64,
    pub created_unix: u64,
    /// Nodes holding a copy (a volume from it gets at most this many replicas).
    pub copies: usize,
}

#[derive(Debug, Clone)]
pub struct CreateFromSnapshot {
    pub name: String,
    pub snapshot: String,
    pub size_bytes: u64,
    /// At most this many replicas, on nodes holding a copy.
    pub replicas: u32,
    pub zones: ZoneChoice,
}

#[tonic::async_trait]
pub trait VolumeBackend: Send + Sync + 'static {
    async fn list(&self) -> BackendResult<Vec<BackendVolume>>;
    async fn get(&self, name: &str) -> BackendResult<Option<BackendVolume>>;
    async fn create(&self, request: &CreateVolume) -> BackendResult<BackendVolume>;
    /// NOT_FOUND when there is no such volume.
    async fn delete(&self, name: &str) -> BackendResult<()>;
    async fn resize(&self, name: &str, size_bytes: u64) -> BackendResult<BackendVolume>;
    /// Opens the volume's target on storage node `node` (fencing any other
    /// target); returns the NBD URI of its export. NOT_FOUND when there is no
    /// such volume or node.
    async fn publish(&self, name: &str, node: &str) -> BackendResult<String>;
    /// Closes the volume's target on `node` (on every node when None); Ok
    /// when none is open there.
    async fn unpublish(&self, name: &str, node: Option<&str>) -> BackendResult<()>;
    /// Room for volumes of `replicas` copies whose first copy is in `zone`
    /// (any zone when None).
    async fn capacity(&self, zone: Option<&str>, replicas: usize) -> BackendResult<Capacity>;
    async fn list_snapshots(&self) -> BackendResult<Vec<BackendSnapshot>>;
    /// Takes snapshot `name` of `volume`; returns the existing one when it
    /// was taken of the same volume already (SnapshotExists for another).
    async fn create_snapshot(&self, volume: &str, name: &str) -> BackendResult<BackendSnapshot>;
    /// SnapshotNotFound when there is no such snapshot.
    async fn delete_snapshot(&self, name: &str) -> BackendResult<()>;
    /// A volume holding the snapshot's data, its replicas on nodes that hold
    /// a copy of it (sharing its blocks).
    async fn create_from_snapshot(
        &self,
        request: &CreateFromSnapshot,
    ) -> BackendResult<BackendVolume>;
}

pub struct ClusterBackend {
    discovery: Discovery,
}

fn unavailable(err: impl std::fmt::Display) -> VolumeError {
    VolumeError::Unavailable(err.to_string())
}

impl ClusterBackend {
    pub fn new(discovery: Discovery) -> ClusterBackend {
        ClusterBackend { discovery }
    }

    /// The storage nodes as a cluster file, however they were found.
    async fn cluster(&self) -> BackendResult<ClusterFile> {
        self.discovery.cluster().await
    }

    /// Node info of every node that answers.
    async fn infos(cluster: &ClusterFile) -> Vec<(NodeEntry, NodeInfo)> {
        let asks = cluster.nodes.iter().map(|node| async move {
            let info = async {
                client::connect(node)
                    .await?
                    .get_node_info(GetNodeInfoRequest {})
                    .await
                    .map_err(client::status_error)
            }
            .await;
            (node.clone(), info)
        });
        let mut infos = Vec::new();
        for (node, info) in futures::future::join_all(asks).await {
            match info {
                Ok(info) => infos.push((node, info.into_inner())),
                Err(err) => tracing::warn!(node = %node.name, %err, "storage node not answering"),
            }
        }
        infos
    }

    async fn report(cluster: &ClusterFile, name: &str) -> BackendResult<Option<VolumeReport>> {
        match volumes::get(cluster, name).await {
            Ok(report) => Ok(Some(report)),
            Err(VolumeError::NotFound(_)) => Ok(None),
            Err(err) => Err(err),
        }
    }
}

/// Bytes a node can still provision.
fn room(info: &NodeInfo) -> u64 {
    info.provisionable_bytes
        .saturating_sub(info.provisioned_bytes)
}

/// The data a new replica on the node can hold: each replica also keeps a
/// header block in the pool.
fn replica_room(info: &NodeInfo) -> u64 {
    room(info).saturating_sub(HEADER_BYTES)
}

fn backend_volume(cluster: &ClusterFile, report: &VolumeReport) -> BackendVolume {
    // Members on unreachable nodes still count for the zones: the cluster
    // file (or discovery) may know their node even when it is down.
    let zones: BTreeSet<String> = report
        .replicas
        .iter()
        .map(|r| r.node.zone.clone())
        .chain(
            report
                .missing
                .iter()
                .filter_map(|m| cluster.node(&m.node).ok().map(|n| n.zone.clone())),
        )
        .collect();
    BackendVolume {
        name: report.name.clone(),
        size_bytes: report.smallest_replica_bytes(),
        replicas: report.members().len().max(report.replicas.len()),
        in_sync: report.in_sync().len(),
        zones: zones.into_iter().collect(),
        published_on: report.active_target().map(|(node, _)| node.name.clone()),
    }
}

fn backend_snapshot(report: &SnapshotReport) -> BackendSnapshot {
    BackendSnapshot {
        name: report.name.clone(),
        source_volume: report.volume.clone(),
        size_bytes: report.size_bytes,
        created_unix: report.created_unix,
        copies: report.copies.len(),
    }
}

/// The node for the first replica: the one with the most room in the first
/// zone of `zones.order` that has room; None lets placement choose freely.
fn preferred_node(
    infos: &[(NodeEntry, NodeInfo)],
    size: u64,
    zones: &ZoneChoice,
) -> Option<String> {
    zones.order.iter().find_map(|zone| {
        infos
            .iter()
            .filter(|(node, info)| &node.zone == zone && replica_room(info) >= size)
            .max_by_key(|(_, info)| replica_room(info))
            .map(|(node, _)| node.name.clone())
    })
}

/// Room for volumes of `replicas` copies on distinct nodes, the first in
/// `zone` (the others anywhere, as placement spreads them over zones).
///
/// The largest volume is the best over first nodes `f` in the zone of
/// min(room(f), the (replicas-1)-th largest room among the other nodes).
/// Every such volume takes its size from the zone at least once and from
/// the cluster `replicas` times, so what is available is the smaller of the
/// zone's room and the cluster's room over `replicas`.
pub fn capacity_of(rooms: &[(String, u64)], zone: Option<&str>, replicas: usize) -> Capacity {
    let replicas = replicas.max(1);
    let in_zone = |z: &str| zone.is_none_or(|want| want == z);
    let mut maximum = 0;
    for (i, (z, first)) in rooms.iter().enumerate() {
        if !in_zone(z) {
            continue;
        }
        let mut others: Vec<u64> = rooms
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, (_, r))| *r)
            .collect();
        others.sort_unstable_by(|a, b| b.cmp(a));
        let fits = match replicas {
            1 => *first,
            n => match others.get(n - 2) {
                Some(&other) => (*first).min(other),
                None => 0,
            },
        };
        maximum = maximum.max(fits);
    }
    if maximum == 0 {
        return Capacity::default();
    }
    let zone_room: u64 = rooms
        .iter()
        .filter(|(z, _)| in_zone(z))
        .map(|(_, r)| r)
        .sum();
    let cluster_room: u64 = rooms.iter().map(|(_, r)| r).sum();
    Capacity {
        available_bytes: zone_room.min(cluster_room / replicas as u64),
        maximum_volume_bytes: maximum,
    }
}

#[tonic::async_trait]
impl VolumeBackend for ClusterBackend {
    async fn list(&self) -> BackendResult<Vec<BackendVolume>> {
        let cluster = self.cluster().await?;
        let mut volumes: Vec<BackendVolume> = volumes::list(&cluster)
            .await?
            .iter()
            .map(|report| backend_volume(&cluster, report))
            .collect();
        volumes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(volumes)
    }

    async fn get(&self, name: &str) -> BackendResult<Option<BackendVolume>> {
        let cluster = self.cluster().await?;
        Ok(Self::report(&cluster, name)
            .await?
            .map(|report| backend_volume(&cluster, &report)))
    }

    async fn create(&self, request: &CreateVolume) -> BackendResult<BackendVolume> {
        let cluster = self.cluster().await?;
        let infos = Self::infos(&cluster).await;
        let placement = Placement {
            replicas: request.replicas as usize,
            zones: if request.zones.restricted {
                request.zones.order.clone()
            } else {
                Vec::new()
            },
            preferred_node: preferred_node(&infos, request.size_bytes, &request.zones),
        };
        let report =
            volumes::create(&cluster, &request.name, request.size_bytes, &placement).await?;
        Ok(backend_volume(&cluster, &report))
    }

    async fn delete(&self, name: &str) -> BackendResult<()> {
        let cluster = self.cluster().await?;
        volumes::delete(&cluster, name).await
    }

    async fn resize(&self, name: &str, size_bytes: u64) -> BackendResult<BackendVolume> {
        let cluster = self.cluster().await?;
        let report = volumes::resize(&cluster, name, size_bytes).await?;
        Ok(backend_volume(&cluster, &report))
    }

    async fn publish(&self, name: &str, node: &str) -> BackendResult<String> {
        let cluster = self.cluster().await?;
        if cluster.node(node).is_err() {
            let names: Vec<&str> = cluster.nodes.iter().map(|n| n.name.as_str()).collect();
            return Err(VolumeError::NotFound(format!(
                "CSI node {node:?}: no storage node of that name answers (nodes: {}); the volume \
                 target runs on the storage node named like the CSI node, so run strata-node there",
                names.join(", ")
            )));
        }
        let (_, target) = volumes::open_target(&cluster, name, Some(node)).await?;
        Ok(target.export_uri)
    }

    async fn unpublish(&self, name: &str, node: Option<&str>) -> BackendResult<()> {
        let cluster = self.cluster().await?;
        let Some(report) = Self::report(&cluster, name).await? else {
            return Ok(());
        };
        // Targets of unreachable nodes are not in the report: nothing can be
        // closed there now, and the next publish elsewhere fences them.
        for (entry, _) in report
            .targets
            .iter()
            .filter(|(n, _)| node.is_none_or(|node| n.name == node))
        {
            let closed = client::connect(entry)
                .await
                .map_err(unavailable)?
                .close_target(CloseTargetRequest {
                    volume: name.to_string(),
                })
                .await;
            match closed {
                Ok(_) => {}
                Err(status) if status.code() == Code::NotFound => {}
                Err(status) => {
                    return Err(VolumeError::Node {
                        node: entry.name.clone(),
                        status,
                    })
                }
            }
        }
        Ok(())
    }

    async fn capacity(&self, zone: Option<&str>, replicas: usize) -> BackendResult<Capacity> {
        let cluster = self.cluster().await?;
        let rooms: Vec<(String, u64)> = Self::infos(&cluster)
            .await
            .iter()
            .map(|(node, info)| (node.zone.clone(), replica_room(info)))
            .collect();
        Ok(capacity_of(&rooms, zone, replicas))
    }

    async fn list_snapshots(&self) -> BackendResult<Vec<BackendSnapshot>> {
        let cluster = self.cluster().await?;
        let mut listed: Vec<BackendSnapshot> = snapshots::list(&cluster)
            .await?
            .iter()
            .map(backend_snapshot)
            .collect();
        // A snapshot id is its name. Copies of two snapshots of one name (an
        // old copy that a node kept through a delete) are listed once, as
        // the newer, so that ids stay unique and pages do not skip; creating
        // a volume from it is refused until an operator deletes them.
        listed.sort_by(|a, b| {
            a.name
                .cmp(&b.name)
                .then(b.created_unix.cmp(&a.created_unix))
        });
        listed.dedup_by(|later, kept| later.name == kept.name);
        Ok(listed)
    }

    async fn create_snapshot(&self, volume: &str, name: &str) -> BackendResult<BackendSnapshot> {
        let cluster = self.cluster().await?;
        Ok(backend_snapshot(
            &snapshots::create(&cluster, volume, name).await?.snapshot,
        ))
    }

    async fn delete_snapshot(&self, name: &str) -> BackendResult<()> {
        let cluster = self.cluster().await?;
        snapshots::delete(&cluster, name).await
    }

    async fn create_from_snapshot(
        &self,
        request: &CreateFromSnapshot,
    ) -> BackendResult<BackendVolume> {
        let cluster = self.cluster().await?;
        let mut snapshot = snapshots::get(&cluster, &request.snapshot).await?;
        // Copies in the preferred zones first; only those zones when restricted.
        let rank = |zone: &str| request.zones.order.iter().position(|z| z == zone);
        snapshot
            .copies
            .retain(|c| !request.zones.restricted || rank(&c.node.zone).is_some());
        snapshot
            .copies
            .sort_by_key(|c| rank(&c.node.zone).unwrap_or(usize::MAX));
        snapshot.copies.truncate(request.replicas.max(1) as usize);
        if snapshot.copies.is_empty() {
            return Err(VolumeError::NoRoom(format!(
                "snapshot {} has no copy in zones {}; a volume from it is placed where its copies are",
                request.snapshot,
                request.zones.order.join(", ")
            )));
        }
        let report = volumes::create_from_snapshot(
            &cluster,
            &request.name,
            &snapshot,
            Some(request.size_bytes),
        )
        .await?;
        Ok(backend_volume(&cluster, &report))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rooms(pairs: &[(&str, u64)]) -> Vec<(String, u64)> {
        pairs.iter().map(|(z, r)| (z.to_string(), *r)).collect()
    }

    #[test]
    fn capacity_counts_every_copy_and_needs_enough_nodes() {
        let r = rooms(&[("a", 100), ("b", 60), ("c", 30)]);
        // One copy: the zone's room, its biggest node.
        assert_eq!(
            capacity_of(&r, Some("a"), 1),
            Capacity {
                available_bytes: 100,
                maximum_volume_bytes: 100
            }
        );
        assert_eq!(capacity_of(&r, None, 1).available_bytes, 190);
        // Two copies, first in a: the second goes on b (60).
        assert_eq!(
            capacity_of(&r, Some("a"), 2),
            Capacity {
                available_bytes: 95,
                maximum_volume_bytes: 60
            }
        );
        // Three copies: the third-largest node limits the size; the
        // cluster's room is shared by three copies.
        assert_eq!(
            capacity_of(&r, Some("c"), 3),
            Capacity {
                available_bytes: 30,
                maximum_volume_bytes: 30
            }
        );
        assert_eq!(capacity_of(&r, None, 3).available_bytes, 63);
        // More copies than nodes, or a zone without nodes: nothing fits.
        assert_eq!(capacity_of(&r, None, 4), Capacity::default());
        assert_eq!(capacity_of(&r, Some("z"), 1), Capacity::default());
    }
}
