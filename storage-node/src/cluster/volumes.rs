//! Replicated volumes across the nodes of a cluster: placing replicas on
//! distinct nodes (spread over zones), creating, listing, resizing and
//! deleting them, opening a volume's target on a node, and replacing a
//! replica by a new one on another node. The CLI, the CSI controller and the
//! storage nodes (automatic replacement) go through here.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use strata_proto::storage::{
    CancelMoveRequest, CloseTargetRequest, CreateReplicaRequest, DeleteReplicaRequest,
    ListReplicasRequest, ListTargetsRequest, NodeInfo, OpenTargetRequest, ReplaceReplicaRequest,
    Replica, ReplicaMember, ReplicaRef, ResizeReplicaRequest, Target,
};
use tonic::Code;

use super::client;
use super::{ClusterFile, NodeEntry};
use crate::replication::wire::ExpectedReplica;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume {0:?} not found")]
    NotFound(String),
    #[error("volume {name:?} already exists (replicas on {nodes})")]
    AlreadyExists { name: String, nodes: String },
    #[error("{0}")]
    Invalid(String),
    /// Not enough nodes (or room on them) for the replicas asked for.
    #[error("{0}")]
    NoRoom(String),
    /// A node needed for the operation could not be reached or refused.
    #[error("{0}")]
    Unavailable(String),
    #[error("snapshot {0:?} not found")]
    SnapshotNotFound(String),
    #[error("snapshot {name:?} already exists (of volume {volume:?})")]
    SnapshotExists { name: String, volume: String },
    /// The nodes hold copies of more than one snapshot under the name.
    #[error("{0}")]
    SnapshotConflict(String),
    /// A node answered with an error.
    #[error("node {node}: {}", status.message())]
    Node { node: String, status: tonic::Status },
}

impl VolumeError {
    fn node(node: &NodeEntry, status: tonic::Status) -> VolumeError {
        VolumeError::Node {
            node: node.name.clone(),
            status,
        }
    }
}

/// One replica of a volume as its node reports it.
#[derive(Debug, Clone)]
pub struct ReplicaReport {
    pub node: NodeEntry,
    pub replica: Replica,
}

/// A replicated volume, gathered from every node that answered.
#[derive(Debug, Clone)]
pub struct VolumeReport {
    pub name: String,
    /// Which volume of this name (the highest uid found; see
    /// `Replica.volume_uid` in storage.proto).
    pub uid: u64,
    /// The largest replica's size: what a resize asked for last, and the size
    /// a new replica is made with. A resize that failed on some replicas
    /// leaves others smaller (see [`VolumeReport::smallest_replica_bytes`]).
    pub size_bytes: u64,
    /// Replicas found, by replica id (members of the newest config only).
    pub replicas: Vec<ReplicaReport>,
    /// Replicas that were replaced but whose node was down when they were
    /// removed from the volume: leftovers, deleted by the next replacement
    /// or `volume rm`.
    pub retired: Vec<ReplicaReport>,
    /// Replicas of an earlier volume of the same name, deleted while their
    /// node was down: not part of this volume in any way.
    pub earlier: Vec<ReplicaReport>,
    /// Members whose node did not answer.
    pub missing: Vec<ReplicaMember>,
    /// Targets open on it, newest epoch first (more than one only while an
    /// older, fenced target has not been closed).
    pub targets: Vec<(NodeEntry, Target)>,
}

impl VolumeReport {
    /// The in-sync set of the newest config any replica reports.
    pub fn in_sync(&self) -> BTreeSet<u32> {
        newest_config(&self.replicas)
            .map(|r| r.replica.in_sync.iter().copied().collect())
            .unwrap_or_default()
    }

    /// The size every replica found holds: a target serves no more than
    /// this (it serves the smallest in-sync replica's size). Below
    /// `size_bytes` after a resize that failed on some replicas, which a
    /// retry of the resize must not take for done.
    pub fn smallest_replica_bytes(&self) -> u64 {
        self.replicas
            .iter()
            .map(|r| r.replica.size_bytes)
            .min()
            .unwrap_or(0)
    }

    /// The size a resize asked for, while some replica found is still
    /// smaller (it reached only some of them; running it again grows the
    /// rest).
    pub fn unfinished_resize(&self) -> Option<u64> {
        (self.smallest_replica_bytes() < self.size_bytes).then_some(self.size_bytes)
    }

    /// The size the volume's clients see: what its open target serves, or,
    /// with none open, what the next target to open would serve (the
    /// smallest in-sync replica's size). Below `size_bytes` after a resize
    /// that reached only some replicas.
    pub fn served_bytes(&self) -> u64 {
        if let Some((_, target)) = self.active_target() {
            return target.size_bytes;
        }
        let in_sync = self.in_sync();
        self.replicas
            .iter()
            .filter(|r| in_sync.contains(&r.replica.replica_id))
            .map(|r| r.replica.size_bytes)
            .min()
            .unwrap_or_else(|| self.smallest_replica_bytes())
    }

    /// The members of the newest config any replica reports.
    pub fn members(&self) -> Vec<ReplicaMember> {
        newest_members(&self.replicas)
    }

    /// The member of the newest config being moved off its node, if any.
    pub fn leaving(&self) -> Option<u32> {
        newest_config(&self.replicas)
            .map(|r| r.replica.leaving_id)
            .filter(|&id| id != 0)
    }

    /// The target that owns the volume now, if it is open anywhere.
    pub fn active_target(&self) -> Option<&(NodeEntry, Target)> {
        self.targets.iter().find(|(_, t)| !t.fenced)
    }

    /// The retired replicas that can be deleted without losing a copy the
    /// volume may still count on. Not being named in the newest config is
    /// not enough: that config may have reached only some replicas (the grow
    /// that ends a move, say, persisted on the leaving replica or the
    /// successor alone), and a target that opens next, or the target that
    /// runs the change, could go on from the config before it, in which the
    /// replica is an in-sync member. So the newest config (over every
    /// replica found, retired ones too) must be settled: held by a majority
    /// of its own members and by a majority of the list it changed. That
    /// list is not known here; it is the new one plus the retired replica,
    /// minus at most one member it added, so both shapes are checked, the
    /// added member counted as a holder (the worst case). Once that config
    /// is settled, no later one names the replica again: ids are never
    /// reused.
    pub fn deletable(&self) -> Vec<&ReplicaReport> {
        let Some(newest) = self.newest_anywhere() else {
            return Vec::new();
        };
        let epoch = newest.replica.config_epoch;
        let members = &newest.replica.members;
        let n = members.len();
        let holding_members = self
            .replicas
            .iter()
            .chain(&self.retired)
            .filter(|r| r.replica.config_epoch == epoch && is_member(members, r))
            .count();
        if holding_members <= n / 2 {
            return Vec::new();
        }
        self.retired
            .iter()
            .filter(|retired| !is_member(members, retired))
            .filter(|retired| {
                let own = usize::from(retired.replica.config_epoch == epoch);
                // The old list was the new one plus this replica ...
                let old_size = n + 1;
                let removed_only = holding_members + own > old_size / 2;
                // ... or that with one member swapped for it.
                let swapped = holding_members - 1 + own > n / 2;
                removed_only && swapped
            })
            .collect()
    }

    /// The replica reporting the newest config, retired replicas included
    /// (one may hold the config that removed it, and no member yet).
    fn newest_anywhere(&self) -> Option<&ReplicaReport> {
        self.replicas
            .iter()
            .chain(&self.retired)
            .max_by_key(|r| r.replica.config_epoch)
    }

    /// The leftovers the target of volume uid `target_uid` at `target_epoch`
    /// deletes on its own (see [`delete_leftovers`]), and whether they are
    /// all the retired replicas that had joined; `None` unless the target is
    /// this volume's and its config is the newest.
    pub fn leftovers_of(
        &self,
        target_uid: u64,
        target_epoch: u64,
    ) -> Option<(Vec<&ReplicaReport>, bool)> {
        if self.uid != target_uid || self.newest_anywhere()?.replica.config_epoch != target_epoch {
            return None;
        }
        let joined = |r: &&ReplicaReport| r.replica.config_epoch > 0;
        let leftovers: Vec<&ReplicaReport> = self.deletable().into_iter().filter(joined).collect();
        let all = leftovers.len() == self.retired.iter().filter(joined).count();
        Some((leftovers, all))
    }
}

/// The replica that reports the newest config.
fn newest_config(replicas: &[ReplicaReport]) -> Option<&ReplicaReport> {
    replicas.iter().max_by_key(|r| r.replica.config_epoch)
}

fn newest_members(replicas: &[ReplicaReport]) -> Vec<ReplicaMember> {
    newest_config(replicas)
        .map(|r| r.replica.members.clone())
        .unwrap_or_default()
}

/// What every node holds: replicas and targets. Nodes that do not answer are
/// returned apart, so callers decide whether that matters.
struct Survey {
    replicas: Vec<ReplicaReport>,
    targets: Vec<(NodeEntry, Target)>,
    /// The nodes that did not answer, and why.
    unreachable: Vec<(NodeEntry, String)>,
    infos: Vec<(NodeEntry, NodeInfo)>,
}

/// How long the survey waits before asking a node that failed once again.
const SURVEY_RETRY: Duration = Duration::from_millis(250);

async fn survey(cluster: &ClusterFile) -> Survey {
    let asks = cluster.nodes.iter().map(|node| async move {
        // Once more after a failure: a node busy for a moment is not taken
        // for a dead one (which would, say, leave no spare node to choose).
        let answer = match ask_node(node).await {
            Err(_) => {
                tokio::time::sleep(SURVEY_RETRY).await;
                ask_node(node).await
            }
            answer => answer,
        };
        (node.clone(), answer)
    });
    let mut survey = Survey {
        replicas: Vec::new(),
        targets: Vec::new(),
        unreachable: Vec::new(),
        infos: Vec::new(),
    };
    for (node, answer) in futures::future::join_all(asks).await {
        match answer {
            Ok((info, replicas, targets)) => {
                survey.infos.push((node.clone(), info));
                survey
                    .replicas
                    .extend(replicas.into_iter().map(|replica| ReplicaReport {
                        node: node.clone(),
                        replica,
                    }));
                survey
                    .targets
                    .extend(targets.into_iter().map(|t| (node.clone(), t)));
            }
            Err(err) => {
                tracing::debug!(node = %node.name, error = %err, "node did not answer");
                survey.unreachable.push((node, format!("{err:#}")));
            }
        }
    }
    survey
}

/// What one node holds, and its info.
async fn ask_node(node: &NodeEntry) -> anyhow::Result<(NodeInfo, Vec<Replica>, Vec<Target>)> {
    let mut c = client::connect(node).await?;
    let info = c
        .get_node_info(strata_proto::storage::GetNodeInfoRequest {})
        .await?
        .into_inner();
    let replicas = c
        .list_replicas(ListReplicasRequest {})
        .await?
        .into_inner()
        .replicas;
    let targets = c
        .list_targets(ListTargetsRequest {})
        .await?
        .into_inner()
        .targets;
    Ok((info, replicas, targets))
}

/// Every replicated volume the reachable nodes know of, by name. Fails only
/// when no node answers.
pub async fn list(cluster: &ClusterFile) -> Result<Vec<VolumeReport>, VolumeError> {
    let survey = survey(cluster).await;
    reports(&survey)
}

/// The volumes a survey found.
fn reports(survey: &Survey) -> Result<Vec<VolumeReport>, VolumeError> {
    if survey.infos.is_empty() {
        return Err(VolumeError::Unavailable(
            "no storage node is reachable (is `strata up` running?)".into(),
        ));
    }
    let mut by_name: BTreeMap<String, VolumeReport> = BTreeMap::new();
    for report in survey.replicas.iter().cloned() {
        let entry = by_name
            .entry(report.replica.volume.clone())
            .or_insert_with(|| VolumeReport {
                name: report.replica.volume.clone(),
                uid: 0,
                size_bytes: 0,
                replicas: Vec::new(),
                retired: Vec::new(),
                earlier: Vec::new(),
                missing: Vec::new(),
                targets: Vec::new(),
            });
        entry.replicas.push(report);
    }
    for (node, target) in survey.targets.iter().cloned() {
        if let Some(volume) = by_name.get_mut(&target.volume) {
            volume.targets.push((node, target));
        }
    }
    for volume in by_name.values_mut() {
        volume.sort_out();
    }
    Ok(by_name.into_values().collect())
}

impl VolumeReport {
    /// Sorts the replicas found (all in `replicas`) into this volume's
    /// members, its retired replicas and those of an earlier volume of the
    /// same name, and finds the missing members.
    fn sort_out(&mut self) {
        // A volume deleted while a node was down left its replica there; a
        // newer volume of the same name has a higher uid. Its configs share
        // nothing with this one's: mixed in, the one with the higher epoch
        // would pass for the newest config of the volume.
        self.uid = self
            .replicas
            .iter()
            .map(|r| r.replica.volume_uid)
            .max()
            .unwrap_or(0);
        let uid = self.uid;
        let (this, earlier): (Vec<ReplicaReport>, Vec<ReplicaReport>) =
            std::mem::take(&mut self.replicas)
                .into_iter()
                .partition(|r| r.replica.volume_uid == uid);
        self.earlier = earlier;
        self.size_bytes = this.iter().map(|r| r.replica.size_bytes).max().unwrap_or(0);
        let members = newest_members(&this);
        let (current, retired) = this.into_iter().partition(|r| is_member(&members, r));
        self.replicas = current;
        self.retired = retired;
        self.replicas.sort_by_key(|r| r.replica.replica_id);
        self.targets
            .sort_by_key(|(_, t)| std::cmp::Reverse(t.epoch));
        let found: BTreeSet<u32> = self.replicas.iter().map(|r| r.replica.replica_id).collect();
        self.missing = self
            .members()
            .into_iter()
            .filter(|m| !found.contains(&m.id))
            .collect();
    }
}

/// Whether `replica` is the one `members` names: same id, on the same node.
fn is_member(members: &[ReplicaMember], replica: &ReplicaReport) -> bool {
    members
        .iter()
        .any(|m| m.id == replica.replica.replica_id && m.node == replica.node.name)
}

/// A uid for a new volume: its creation time in nanoseconds, so a volume
/// created after another of the same name was deleted has a higher one
/// (across hosts, as far as their clocks agree).
fn new_volume_uid() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |t| t.as_nanos() as u64)
        .max(1)
}

pub async fn get(cluster: &ClusterFile, name: &str) -> Result<VolumeReport, VolumeError> {
    list(cluster)
        .await?
        .into_iter()
        .find(|v| v.name == name)
        .ok_or_else(|| VolumeError::NotFound(name.to_string()))
}

/// Where the replicas of a new volume go.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    pub replicas: usize,
    /// Only nodes in these zones (any zone when empty).
    pub zones: Vec<String>,
    /// Put the first replica on this node.
    pub preferred_node: Option<String>,
}

/// Picks `placement.replicas` distinct nodes with room for `size` bytes:
/// first a node in a zone not used yet, then the node with the most room.
fn place(
    infos: &[(NodeEntry, NodeInfo)],
    size: u64,
    placement: &Placement,
    zones_in_use: &[String],
) -> Result<Vec<(NodeEntry, NodeInfo)>, VolumeError> {
    let room = |info: &NodeInfo| {
        info.provisionable_bytes
            .saturating_sub(info.provisioned_bytes)
    };
    let mut candidates: Vec<&(NodeEntry, NodeInfo)> = infos
        .iter()
        .filter(|(node, _)| placement.zones.is_empty() || placement.zones.contains(&node.zone))
        .filter(|(_, info)| room(info) >= size)
        .collect();
    if candidates.len() < placement.replicas {
        return Err(VolumeError::NoRoom(format!(
            "not enough space: {} replica{} of {} need{} as many nodes with that much room{}, \
             and {} of the {} reachable nodes have it",
            placement.replicas,
            if placement.replicas == 1 { "" } else { "s" },
            crate::pool::human(size),
            if placement.replicas == 1 { "s" } else { "" },
            if placement.zones.is_empty() {
                String::new()
            } else {
                format!(" in zones {}", placement.zones.join(", "))
            },
            candidates.len(),
            infos.len()
        )));
    }
    let mut chosen: Vec<(NodeEntry, NodeInfo)> = Vec::new();
    if let Some(preferred) = &placement.preferred_node {
        if let Some(i) = candidates.iter().position(|(n, _)| &n.name == preferred) {
            chosen.push(candidates.remove(i).clone());
        }
    }
    while chosen.len() < placement.replicas {
        let used_zones: BTreeSet<&str> = chosen
            .iter()
            .map(|(n, _)| n.zone.as_str())
            .chain(zones_in_use.iter().map(String::as_str))
            .collect();
        let best = candidates
            .iter()
            .enumerate()
            .max_by_key(|(_, (node, info))| (!used_zones.contains(node.zone.as_str()), room(info)))
            .map(|(i, _)| i)
            .expect("enough candidates");
        chosen.push(candidates.remove(best).clone());
    }
    Ok(chosen)
}

/// Creates a volume with replicas on distinct nodes. Nothing is left behind
/// when one of them cannot be created.
pub async fn create(
    cluster: &ClusterFile,
    name: &str,
    size: u64,
    placement: &Placement,
) -> Result<VolumeReport, VolumeError> {
    crate::pool::validate_volume_name(name).map_err(|e| VolumeError::Invalid(e.to_string()))?;
    if size == 0 {
        return Err(VolumeError::Invalid(
            "size must be greater than zero".into(),
        ));
    }
    if placement.replicas == 0 {
        return Err(VolumeError::Invalid("replicas must be at least 1".into()));
    }
    let survey = survey(cluster).await;
    check_absent(&survey, name)?;
    let chosen = place(&survey.infos, size, placement, &[])?;
    let nodes: Vec<(NodeEntry, String)> = chosen
        .into_iter()
        .map(|(node, info)| (node, info.replication_address))
        .collect();
    create_replicas(cluster, name, size, &nodes, None).await
}

/// ALREADY_EXISTS when a reachable node holds a replica named `name`.
fn check_absent(survey: &Survey, name: &str) -> Result<(), VolumeError> {
    let holders: Vec<&str> = survey
        .replicas
        .iter()
        .filter(|r| r.replica.volume == name)
        .map(|r| r.node.name.as_str())
        .collect();
    if !holders.is_empty() {
        return Err(VolumeError::AlreadyExists {
            name: name.to_string(),
            nodes: holders.join(", "),
        });
    }
    Ok(())
}

/// Creates replica i+1 of volume `name` on `nodes[i]` (a node and its
/// replication address), each from its copy of `from_snapshot` (a name and
/// uid) when given. Nothing is left behind when one of them cannot be
/// created.
async fn create_replicas(
    cluster: &ClusterFile,
    name: &str,
    size: u64,
    nodes: &[(NodeEntry, String)],
    from_snapshot: Option<(&str, u64)>,
) -> Result<VolumeReport, VolumeError> {
    let volume_uid = new_volume_uid();
    let members: Vec<ReplicaMember> = nodes
        .iter()
        .enumerate()
        .map(|(i, (node, address))| ReplicaMember {
            id: i as u32 + 1,
            node: node.name.clone(),
            address: address.clone(),
        })
        .collect();
    let mut created: Vec<(&NodeEntry, u32)> = Vec::new();
    for ((node, _), member) in nodes.iter().zip(&members) {
        let result = async {
            client::connect(node)
                .await
                .map_err(|e| VolumeError::Unavailable(e.to_string()))?
                .create_replica(CreateReplicaRequest {
                    volume: name.to_string(),
                    size_bytes: size,
                    replica_id: member.id,
                    members: members.clone(),
                    from_snapshot: from_snapshot.map_or("", |(s, _)| s).to_string(),
                    from_snapshot_uid: from_snapshot.map(|(_, uid)| uid),
                    replacement: false,
                    volume_uid,
                })
                .await
                .map_err(|status| VolumeError::node(node, status))
        }
        .await;
        if let Err(err) = result {
            for (node, replica_id) in created {
                let replica = ExpectedReplica {
                    replica_id,
                    volume_uid,
                };
                let _ = delete_replica_by_id(node, name, replica).await;
            }
            return Err(err);
        }
        created.push((node, member.id));
    }
    get(cluster, name).await
}

/// Creates volume `name` from snapshot `snapshot`: one replica on each node
/// holding a copy of the snapshot (so the clone shares the snapshot's blocks
/// and copies no data), with the snapshot's size unless `size` is larger.
pub async fn create_from_snapshot(
    cluster: &ClusterFile,
    name: &str,
    snapshot: &super::snapshots::SnapshotReport,
    size: Option<u64>,
) -> Result<VolumeReport, VolumeError> {
    crate::pool::validate_volume_name(name).map_err(|e| VolumeError::Invalid(e.to_string()))?;
    let size = match size {
        Some(size) if size < snapshot.size_bytes => {
            return Err(VolumeError::Invalid(format!(
                "a volume from snapshot {} needs at least {} (the snapshot's size); {} is smaller",
                snapshot.name,
                crate::pool::human(snapshot.size_bytes),
                crate::pool::human(size)
            )))
        }
        Some(size) => size,
        None => snapshot.size_bytes,
    };
    let survey = survey(cluster).await;
    check_absent(&survey, name)?;
    let nodes: Vec<(NodeEntry, String)> = snapshot
        .copies
        .iter()
        .filter_map(|copy| {
            let (node, info) = survey
                .infos
                .iter()
                .find(|(node, _)| node.name == copy.node.name)?;
            Some((node.clone(), info.replication_address.clone()))
        })
        .collect();
    if nodes.is_empty() {
        return Err(VolumeError::Unavailable(format!(
            "no node holding snapshot {} is reachable",
            snapshot.name
        )));
    }
    create_replicas(
        cluster,
        name,
        size,
        &nodes,
        Some((&snapshot.name, snapshot.uid)),
    )
    .await
}

/// A new, empty replica created to take the place of a member; not a member
/// until the volume's target makes the change.
#[derive(Debug, Clone)]
pub struct PlannedReplacement {
    pub volume: String,
    /// The member that leaves.
    pub remove: ReplicaMember,
    /// The new replica, and the node that holds it.
    pub member: ReplicaMember,
    pub node: NodeEntry,
    /// Whether the leaving member stays until the new one has a copy: it
    /// is in sync and its node answers, so the volume keeps its redundancy
    /// during the copy (`membership::plan_move`). A faulted or unreachable
    /// one is removed at once.
    pub keep_until_copied: bool,
}

/// Checks that the replica of `name` on node `from` can be replaced, and
/// creates its replacement on `to`, or on a node chosen as `create` would
/// (one that holds no replica of the volume, in a zone its other replicas
/// do not use when there is one, with the most room). `from` may be down.
/// A replica in sync on a node that answers is moved: it stays until the
/// new one has a full copy.
pub async fn create_replacement(
    cluster: &ClusterFile,
    name: &str,
    from: &str,
    to: Option<&str>,
) -> Result<PlannedReplacement, VolumeError> {
    if let Some(to) = to {
        cluster
            .node(to)
            .map_err(|e| VolumeError::Invalid(e.to_string()))?;
    }
    let survey = survey(cluster).await;
    let volume = reports(&survey)?
        .into_iter()
        .find(|v| v.name == name)
        .ok_or_else(|| VolumeError::NotFound(name.to_string()))?;
    let members = volume.members();
    let member_nodes: Vec<&str> = members.iter().map(|m| m.node.as_str()).collect();
    let remove = members
        .iter()
        .find(|m| m.node == from)
        .cloned()
        .ok_or_else(|| {
            VolumeError::Invalid(format!(
                "node {from} holds no replica of volume {name} (its replicas are on {})",
                member_nodes.join(", ")
            ))
        })?;
    let keep_until_copied = volume.in_sync().contains(&remove.id)
        && volume
            .replicas
            .iter()
            .any(|r| r.replica.replica_id == remove.id);
    if let Some(leaving) = volume.leaving() {
        if leaving == remove.id || keep_until_copied {
            let node = members
                .iter()
                .find(|m| m.id == leaving)
                .map_or("?", |m| m.node.as_str());
            return Err(VolumeError::Invalid(format!(
                "the replica of volume {name} on {node} is being moved already; \
                 wait until its successor is in sync (strata volume describe {name})"
            )));
        }
    }
    // Nodes with a replica of the volume, members or leftovers, cannot take
    // another one.
    let holders: BTreeSet<&str> = member_nodes
        .iter()
        .copied()
        .chain(volume.retired.iter().map(|r| r.node.name.as_str()))
        .chain(volume.earlier.iter().map(|r| r.node.name.as_str()))
        .collect();
    let candidates: Vec<(NodeEntry, NodeInfo)> = match to {
        Some(to) => {
            if holders.contains(to) {
                return Err(VolumeError::Invalid(format!(
                    "node {to} holds a replica of volume {name} already"
                )));
            }
            let found: Vec<_> = survey
                .infos
                .iter()
                .filter(|(node, _)| node.name == to)
                .cloned()
                .collect();
            if found.is_empty() {
                return Err(VolumeError::Unavailable(format!(
                    "node {to} is not reachable"
                )));
            }
            found
        }
        None => {
            let spare: Vec<_> = survey
                .infos
                .iter()
                .filter(|(node, _)| !holders.contains(node.name.as_str()))
                .cloned()
                .collect();
            if spare.is_empty() {
                let unreachable: Vec<String> = survey
                    .unreachable
                    .iter()
                    .map(|(node, why)| format!("{} ({why})", node.name))
                    .collect();
                let unreachable = match unreachable.is_empty() {
                    true => String::new(),
                    false => format!("; not reachable: {}", unreachable.join(", ")),
                };
                return Err(VolumeError::NoRoom(format!(
                    "no spare node for a new replica of volume {name}: every reachable node \
                     holds one already{unreachable}"
                )));
            }
            spare
        }
    };
    let zones_in_use: Vec<String> = members
        .iter()
        .filter(|m| m.id != remove.id)
        .filter_map(|m| cluster.node(&m.node).ok().map(|n| n.zone.clone()))
        .collect();
    let placement = Placement {
        replicas: 1,
        ..Placement::default()
    };
    let (node, info) = place(&candidates, volume.size_bytes, &placement, &zones_in_use)?
        .pop()
        .expect("one node placed");
    // Ids only grow, so a leftover replica never shares one with a member,
    // and a replica deleted since (a move given up) never shares one with
    // the new one: the replicas remember the highest id they were told of.
    let id = members
        .iter()
        .map(|m| m.id)
        .chain(volume.retired.iter().map(|r| r.replica.replica_id))
        .chain(
            volume
                .replicas
                .iter()
                .chain(&volume.retired)
                .map(|r| r.replica.highest_member_id),
        )
        .max()
        .unwrap_or(0)
        + 1;
    let member = ReplicaMember {
        id,
        node: node.name.clone(),
        address: info.replication_address.clone(),
    };
    // The member list the change will make (`plan_move` or `plan_replace`).
    let new_members: Vec<ReplicaMember> = if keep_until_copied {
        members.iter().cloned().chain([member.clone()]).collect()
    } else {
        members
            .iter()
            .map(|m| {
                if m.id == remove.id {
                    member.clone()
                } else {
                    m.clone()
                }
            })
            .collect()
    };
    client::connect(&node)
        .await
        .map_err(|e| VolumeError::Unavailable(e.to_string()))?
        .create_replica(CreateReplicaRequest {
            volume: name.to_string(),
            size_bytes: volume.size_bytes,
            replica_id: id,
            members: new_members,
            from_snapshot: String::new(),
            from_snapshot_uid: None,
            replacement: true,
            volume_uid: volume.uid,
        })
        .await
        .map_err(|status| VolumeError::node(&node, status))?;
    Ok(PlannedReplacement {
        volume: name.to_string(),
        remove,
        member,
        node,
        keep_until_copied,
    })
}

/// Deletes the replica of `volume` on `node`, once it is no longer a member.
pub async fn delete_replica_on(node: &NodeEntry, volume: &str) -> Result<(), VolumeError> {
    client::connect(node)
        .await
        .map_err(|e| VolumeError::Unavailable(e.to_string()))?
        .delete_replica(DeleteReplicaRequest {
            volume: volume.to_string(),
            only_if: None,
        })
        .await
        .map_err(|status| VolumeError::node(node, status))?;
    Ok(())
}

/// Deletes `replica` of `volume` on `node` if the node still holds it;
/// Ok(()) once it is gone. Another replica there (a later replacement put
/// one on that node, or the volume was created again under its name) is
/// left alone: the node checks, in the same step as the deletion.
pub async fn delete_replica_by_id(
    node: &NodeEntry,
    volume: &str,
    replica: ExpectedReplica,
) -> Result<(), VolumeError> {
    delete_if_held(node, volume, Some(replica)).await
}

/// Deletes the replica of `volume` on `node` (only `only_if` when given);
/// Ok(()) once the node holds none of that description, whether it deleted
/// one or had none.
async fn delete_if_held(
    node: &NodeEntry,
    volume: &str,
    only_if: Option<ExpectedReplica>,
) -> Result<(), VolumeError> {
    let deleted = client::connect(node)
        .await
        .map_err(|e| VolumeError::Unavailable(e.to_string()))?
        .delete_replica(DeleteReplicaRequest {
            volume: volume.to_string(),
            only_if: only_if.map(|replica| ReplicaRef {
                replica_id: replica.replica_id,
                volume_uid: replica.volume_uid,
            }),
        })
        .await;
    match deleted {
        Ok(_) => Ok(()),
        Err(status) if matches!(status.code(), Code::NotFound | Code::FailedPrecondition) => Ok(()),
        Err(status) => Err(VolumeError::node(node, status)),
    }
}

/// What `replace_replica` did.
#[derive(Debug, Clone)]
pub struct ReplaceOutcome {
    pub planned: PlannedReplacement,
    /// The node whose target drives the change and the rebuild.
    pub target_node: String,
    /// Whether the old replica's data was deleted (its node was reachable).
    pub old_deleted: bool,
}

/// Replaces the replica of `name` on node `from` (alive or dead) by a new
/// one on `to` or a node chosen by placement. The volume's target (opened
/// if the volume has none) changes the member list and then copies the
/// whole volume to the new replica while it serves I/O; this returns once
/// the member list changed. The old replica is deleted when its node is
/// reachable; otherwise it is a leftover the next replacement or `volume
/// rm` deletes.
pub async fn replace_replica(
    cluster: &ClusterFile,
    name: &str,
    from: &str,
    to: Option<&str>,
) -> Result<ReplaceOutcome, VolumeError> {
    let planned = create_replacement(cluster, name, from, to).await?;
    let result = async {
        let volume = get(cluster, name).await?;
        let (node, _) = match volume.active_target() {
            Some(active) => active.clone(),
            None => open_target(cluster, name, None).await?,
        };
        client::connect(&node)
            .await
            .map_err(|e| VolumeError::Unavailable(e.to_string()))?
            .replace_replica(ReplaceReplicaRequest {
                volume: name.to_string(),
                remove_id: planned.remove.id,
                replacement: Some(planned.member.clone()),
                keep_until_copied: planned.keep_until_copied,
            })
            .await
            .map_err(|status| VolumeError::node(&node, status))?;
        Ok::<_, VolumeError>(node)
    }
    .await;
    let target_node = match result {
        Ok(node) => node,
        Err(err) => {
            // The new replica is a leftover unless the change went through
            // after all (an answer lost on the way back).
            delete_retired(cluster, name).await;
            return Err(err);
        }
    };
    let old_deleted = delete_retired(cluster, name)
        .await
        .contains(&from.to_string());
    Ok(ReplaceOutcome {
        planned,
        target_node: target_node.name,
        old_deleted,
    })
}

/// What `cancel_move` did.
#[derive(Debug, Clone)]
pub struct CancelledMove {
    /// The node whose target made the change.
    pub target_node: String,
    /// The node of the replica that was being moved and stays.
    pub stays: String,
    /// The node of the new replica that left.
    pub dropped: String,
    /// Whether the new replica's data was deleted (its node was reachable).
    pub dropped_deleted: bool,
}

/// Gives up the move of a replica of `name` under way (see
/// [`replace_replica`]): the volume's target (opened if the volume has
/// none) takes the new replica out of the member list, and the replica
/// being moved stays where it was; then the new replica is deleted if its
/// node answers.
pub async fn cancel_move(cluster: &ClusterFile, name: &str) -> Result<CancelledMove, VolumeError> {
    let volume = get(cluster, name).await?;
    if volume.leaving().is_none() {
        return Err(VolumeError::Invalid(format!(
            "no replica of volume {name:?} is being moved (a move that ended or was \
             cancelled shows in `strata volume describe {name}`)"
        )));
    }
    let (node, _) = match volume.active_target() {
        Some(active) => active.clone(),
        None => open_target(cluster, name, None).await?,
    };
    let cancelled = client::connect(&node)
        .await
        .map_err(|e| VolumeError::Unavailable(e.to_string()))?
        .cancel_move(CancelMoveRequest {
            volume: name.to_string(),
        })
        .await
        .map_err(|status| VolumeError::node(&node, status))?
        .into_inner();
    let (Some(stays), Some(dropped)) = (cancelled.stays, cancelled.dropped) else {
        return Err(VolumeError::Unavailable(format!(
            "node {} cancelled the move but did not say which replicas",
            node.name
        )));
    };
    // Never in sync, so deleting it loses nothing. The target deletes it
    // too once the node answers, so it may be gone already (Ok then).
    let dropped_deleted = match cluster.node(&dropped.node) {
        Ok(entry) => delete_replica_by_id(
            entry,
            name,
            ExpectedReplica {
                replica_id: dropped.id,
                volume_uid: volume.uid,
            },
        )
        .await
        .is_ok(),
        Err(_) => false,
    };
    Ok(CancelledMove {
        target_node: node.name,
        stays: stays.node,
        dropped: dropped.node,
        dropped_deleted,
    })
}

/// Deletes the replicas of `name` that the newest config does not name
/// (replaced ones, and replacements that never joined), on the nodes that
/// answer, once that config is settled (see [`VolumeReport::deletable`]);
/// returns those nodes.
pub async fn delete_retired(cluster: &ClusterFile, name: &str) -> Vec<String> {
    let Ok(volume) = get(cluster, name).await else {
        return Vec::new();
    };
    delete_reports(name, volume.deletable()).await
}

/// What a volume's target deletes on its own: like [`delete_retired`], but
/// only while the newest config anywhere is the target's own (at
/// `target_epoch`) and the target is the volume's (of `target_uid`, not of
/// a deleted volume of the same name), and not the replacements that never
/// joined.
/// - A target deposed by a newer one, which may have added members this
///   one never heard of, deletes nothing.
/// - Replicas of an older volume of the same name, on a node that was down
///   when it was deleted, may report a higher epoch than the new volume's;
///   they do not make the new volume's replicas look replaced.
/// - A replacement that never joined may be one a replace is creating right
///   now, before it asks the target to add it.
///
/// Returns whether every retired replica that had joined is gone (false
/// when the configs were not settled, or a node did not answer or refused).
pub async fn delete_leftovers(volume: &VolumeReport, target_uid: u64, target_epoch: u64) -> bool {
    let Some((leftovers, all)) = volume.leftovers_of(target_uid, target_epoch) else {
        return false;
    };
    let found = leftovers.len();
    all && delete_reports(&volume.name, leftovers).await.len() == found
}

async fn delete_reports(name: &str, reports: Vec<&ReplicaReport>) -> Vec<String> {
    let mut deleted = Vec::new();
    for report in reports {
        // By id: the node may hold a new replica of the volume by now.
        let replica = ExpectedReplica {
            replica_id: report.replica.replica_id,
            volume_uid: report.replica.volume_uid,
        };
        match delete_replica_by_id(&report.node, name, replica).await {
            Ok(()) => {
                tracing::info!(volume = name, node = %report.node.name, "deleted a replaced replica");
                deleted.push(report.node.name.clone());
            }
            Err(err) => tracing::warn!(
                volume = name,
                node = %report.node.name,
                %err,
                "could not delete a replaced replica"
            ),
        }
    }
    deleted
}

/// Opens the volume's target on `node` (default: a node holding an in-sync
/// replica, so one copy is read locally), fencing any other target, and
/// closes targets the new one replaced.
pub async fn open_target(
    cluster: &ClusterFile,
    name: &str,
    node: Option<&str>,
) -> Result<(NodeEntry, Target), VolumeError> {
    let volume = get(cluster, name).await?;
    let in_sync = volume.in_sync();
    let node = match node {
        Some(node) => cluster
            .node(node)
            .map_err(|e| VolumeError::Invalid(e.to_string()))?
            .clone(),
        None => match volume.active_target() {
            Some((node, _)) => node.clone(),
            None => volume
                .replicas
                .iter()
                .find(|r| in_sync.contains(&r.replica.replica_id))
                .or(volume.replicas.first())
                .map(|r| r.node.clone())
                .ok_or_else(|| VolumeError::NotFound(name.to_string()))?,
        },
    };
    let seeds = volume.members().into_iter().map(|m| m.address).collect();
    let target = client::connect(&node)
        .await
        .map_err(|e| VolumeError::Unavailable(e.to_string()))?
        .open_target(OpenTargetRequest {
            volume: name.to_string(),
            seeds,
        })
        .await
        .map_err(|status| match status.code() {
            Code::Unavailable => VolumeError::Unavailable(status.message().to_string()),
            _ => VolumeError::node(&node, status),
        })?
        .into_inner();
    for (other, _) in volume.targets.iter().filter(|(n, _)| n.name != node.name) {
        close_target_on(other, name).await;
    }
    Ok((node, target))
}

pub(super) async fn close_target_on(node: &NodeEntry, name: &str) {
    if let Ok(mut c) = client::connect(node).await {
        let _ = c
            .close_target(CloseTargetRequest {
                volume: name.to_string(),
            })
            .await;
    }
}

/// Deletes the volume: its targets, then every replica. Fails (having
/// deleted what it could) when a replica's node is unreachable.
pub async fn delete(cluster: &ClusterFile, name: &str) -> Result<(), VolumeError> {
    let volume = get(cluster, name).await?;
    for (node, _) in &volume.targets {
        close_target_on(node, name).await;
    }
    for report in volume
        .replicas
        .iter()
        .chain(&volume.retired)
        .chain(&volume.earlier)
    {
        delete_replica_on(&report.node, name).await?;
    }
    // A member missing from the survey is on a node that did not answer, or
    // that answered without listing it: a replica whose header it cannot
    // read, which it deletes only with its volume. Asked again here.
    let mut remaining = Vec::new();
    for member in &volume.missing {
        let deleted = match cluster.node(&member.node) {
            Ok(node) => delete_if_held(node, name, None).await.is_ok(),
            Err(_) => false,
        };
        if !deleted {
            remaining.push(member.node.as_str());
        }
    }
    if !remaining.is_empty() {
        return Err(VolumeError::Unavailable(format!(
            "deleted the reachable replicas of {name}; the ones on {} remain (nodes down)",
            remaining.join(", ")
        )));
    }
    Ok(())
}

/// Grows every replica, then has the open target (if any) take the new size;
/// its clients stay connected.
pub async fn resize(
    cluster: &ClusterFile,
    name: &str,
    size: u64,
) -> Result<VolumeReport, VolumeError> {
    let volume = get(cluster, name).await?;
    if !volume.missing.is_empty() {
        return Err(VolumeError::Unavailable(format!(
            "cannot resize {name} while replicas on {} are unreachable",
            volume
                .missing
                .iter()
                .map(|m| m.node.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    for report in &volume.replicas {
        client::connect(&report.node)
            .await
            .map_err(|e| VolumeError::Unavailable(e.to_string()))?
            .resize_replica(ResizeReplicaRequest {
                volume: name.to_string(),
                size_bytes: size,
            })
            .await
            .map_err(|status| VolumeError::node(&report.node, status))?;
    }
    if let Some((node, _)) = volume.active_target() {
        open_target(cluster, name, Some(&node.name)).await?;
    }
    get(cluster, name).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The report of replica `id` on node-`id`, holding the config at
    /// `epoch` with `members`.
    fn replica(id: u32, epoch: u64, members: &[u32]) -> ReplicaReport {
        let node = format!("node-{id}");
        let addr: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        ReplicaReport {
            node: NodeEntry {
                name: node.clone(),
                zone: String::new(),
                grpc: addr,
                nbd: addr,
                http: addr,
                replication: None,
                pool: Default::default(),
                pid: None,
            },
            replica: Replica {
                volume: "db".into(),
                replica_id: id,
                node,
                config_epoch: epoch,
                promised_epoch: epoch,
                in_sync: members.to_vec(),
                members: members
                    .iter()
                    .map(|&m| ReplicaMember {
                        id: m,
                        node: format!("node-{m}"),
                        address: String::new(),
                    })
                    .collect(),
                ..Default::default()
            },
        }
    }

    fn volume(replicas: Vec<ReplicaReport>, retired: Vec<ReplicaReport>) -> VolumeReport {
        VolumeReport {
            name: "db".into(),
            uid: 0,
            size_bytes: 0,
            replicas,
            retired,
            earlier: Vec::new(),
            missing: Vec::new(),
            targets: Vec::new(),
        }
    }

    fn deletable_ids(volume: &VolumeReport) -> Vec<u32> {
        volume
            .deletable()
            .iter()
            .map(|r| r.replica.replica_id)
            .collect()
    }

    #[test]
    fn a_moved_replica_is_deletable_only_once_the_config_without_it_is_settled() {
        // Replica 2 is moved to 4: {1, 2, 3, 4} at epoch 5, then the grow
        // of 4 makes {1, 3, 4} at epoch 6 and leaves 2 out.
        let moving = [1, 2, 3, 4];
        let moved = [1, 3, 4];
        let leaving = replica(2, 5, &moving);

        // Epoch 6 reached the successor only: a target opening now may go on
        // from epoch 5, where 2 is in sync. It stays.
        let early = volume(
            vec![
                replica(1, 5, &moving),
                replica(3, 5, &moving),
                replica(4, 6, &moved),
            ],
            vec![leaving.clone()],
        );
        assert_eq!(deletable_ids(&early), Vec::<u32>::new());

        // On two of three new members: a majority of the new list, but two
        // of the old four is not a majority of it. Still kept.
        let half = volume(
            vec![
                replica(1, 6, &moved),
                replica(3, 5, &moving),
                replica(4, 6, &moved),
            ],
            vec![leaving.clone()],
        );
        assert_eq!(deletable_ids(&half), Vec::<u32>::new());

        // On all three: settled, 2 can go.
        let settled = volume(
            vec![
                replica(1, 6, &moved),
                replica(3, 6, &moved),
                replica(4, 6, &moved),
            ],
            vec![leaving],
        );
        assert_eq!(deletable_ids(&settled), vec![2]);

        // Epoch 6 reached the leaving replica alone: it is the newest config
        // anywhere, held by no member. Neither the CLI nor the target, still
        // at epoch 5, deletes it.
        let only_leaving = volume(
            vec![
                replica(1, 5, &moving),
                replica(3, 5, &moving),
                replica(4, 5, &moving),
            ],
            vec![replica(2, 6, &moved)],
        );
        assert_eq!(deletable_ids(&only_leaving), Vec::<u32>::new());
        assert!(only_leaving.leftovers_of(0, 5).is_none());

        // The leaving replica and two new members took it: three of the old
        // four, two of the new three. Settled.
        let with_leaving = volume(
            vec![
                replica(1, 6, &moved),
                replica(3, 5, &moving),
                replica(4, 6, &moved),
            ],
            vec![replica(2, 6, &moved)],
        );
        assert_eq!(deletable_ids(&with_leaving), vec![2]);
    }

    #[test]
    fn replicas_of_an_earlier_volume_of_the_same_name_are_kept_apart() {
        // "db" (uid 100) lived on nodes 1 to 3 and was opened many times
        // (epoch 9); it was deleted while node-3 was down. The new "db"
        // (uid 200) is on nodes 4 to 6, at epoch 2.
        let mut old = replica(3, 9, &[1, 2, 3]);
        old.replica.volume_uid = 100;
        let new: Vec<ReplicaReport> = [4, 5, 6]
            .into_iter()
            .map(|id| {
                let mut r = replica(id, 2, &[4, 5, 6]);
                r.replica.volume_uid = 200;
                r
            })
            .collect();
        let mut found = volume(vec![old].into_iter().chain(new).collect(), Vec::new());
        found.sort_out();
        assert_eq!(found.uid, 200);
        let ids = |reports: &[ReplicaReport]| -> Vec<u32> {
            reports.iter().map(|r| r.replica.replica_id).collect()
        };
        // Without the uid, the old replica's epoch 9 was the newest config:
        // its members would have been the volume's, nodes 4 to 6 leftovers.
        assert_eq!(ids(&found.replicas), vec![4, 5, 6]);
        assert_eq!(ids(&found.earlier), vec![3]);
        assert!(found.retired.is_empty());
        assert!(found.missing.is_empty());
        let members: Vec<u32> = found.members().iter().map(|m| m.id).collect();
        assert_eq!(members, vec![4, 5, 6]);
        assert_eq!(
            found.leftovers_of(200, 2).map(|(l, all)| (l.len(), all)),
            Some((0, true))
        );
        // The old volume's target, if one still ran, sweeps nothing.
        assert!(found.leftovers_of(100, 2).is_none());
    }

    #[test]
    fn an_even_member_list_needs_a_majority_of_both_lists() {
        // A 2-replica volume moved from 2 to 3: {1, 2, 3}, then {1, 3}. The
        // leaving replica and the successor hold {1, 3}: two of the old
        // three, but one of the new two. Not settled.
        let two = volume(
            vec![replica(1, 7, &[1, 2, 3]), replica(3, 8, &[1, 3])],
            vec![replica(2, 8, &[1, 3])],
        );
        assert_eq!(deletable_ids(&two), Vec::<u32>::new());

        // During a move of 2 to 4, member 1 is replaced by 5: {1, 2, 3, 4}
        // to {5, 2, 3, 4}. 1, 5 and 2 hold it: three of five replicas, but
        // two of each four-member list. Not settled.
        let during_move = volume(
            vec![
                replica(5, 9, &[5, 2, 3, 4]),
                replica(2, 9, &[5, 2, 3, 4]),
                replica(3, 8, &[1, 2, 3, 4]),
                replica(4, 8, &[1, 2, 3, 4]),
            ],
            vec![replica(1, 9, &[5, 2, 3, 4])],
        );
        assert_eq!(deletable_ids(&during_move), Vec::<u32>::new());
    }

    #[test]
    fn a_replaced_replica_and_a_replacement_that_never_joined_go_once_settled() {
        // 3 replaced by 4 at epoch 3; 3 still holds epoch 2.
        let after = [1, 2, 4];
        let replaced = replica(3, 2, &[1, 2, 3]);
        let settled = volume(
            vec![
                replica(1, 3, &after),
                replica(2, 3, &after),
                replica(4, 3, &after),
            ],
            vec![replaced.clone()],
        );
        assert_eq!(deletable_ids(&settled), vec![3]);
        // The new replica's node did not answer: two of the four that the
        // change involved hold it, which settles nothing for sure.
        let unsure = volume(
            vec![replica(1, 3, &after), replica(2, 3, &after)],
            vec![replaced],
        );
        assert_eq!(deletable_ids(&unsure), Vec::<u32>::new());

        // A replacement created for a change that never reached anyone
        // (it reports the empty epoch-0 config of a new replica).
        let before = [1, 2, 3];
        let mut stray = replica(5, 0, &[1, 2, 3, 5]);
        stray.replica.in_sync.clear();
        let never_joined = volume(
            vec![
                replica(1, 2, &before),
                replica(2, 2, &before),
                replica(3, 2, &before),
            ],
            vec![stray],
        );
        assert_eq!(deletable_ids(&never_joined), vec![5]);
    }

    #[test]
    fn a_target_deletes_leftovers_only_while_its_config_is_the_newest() {
        let after = [1, 2, 4];
        let settled = volume(
            vec![
                replica(1, 3, &after),
                replica(2, 3, &after),
                replica(4, 3, &after),
            ],
            vec![replica(3, 2, &[1, 2, 3])],
        );
        let ids = |found: Option<(Vec<&ReplicaReport>, bool)>| {
            found.map(|(l, all)| {
                (
                    l.iter().map(|r| r.replica.replica_id).collect::<Vec<_>>(),
                    all,
                )
            })
        };
        assert_eq!(ids(settled.leftovers_of(0, 3)), Some((vec![3], true)));
        // A deposed target, at an older epoch, deletes nothing.
        assert_eq!(ids(settled.leftovers_of(0, 2)), None);
        // The target of a deleted volume of the same name (a lower uid),
        // still running on a node that was cut off, deletes nothing, even
        // at the same epoch.
        assert_eq!(ids(settled.leftovers_of(7, 3)), None);

        // Replicas of an older volume of the same name (epoch 9, on nodes
        // 7 to 9), made before volumes had uids, make the new volume's
        // replicas look retired: the target of the new one, at epoch 3,
        // leaves everything alone.
        let old = [7, 8, 9];
        let reborn = volume(
            vec![
                replica(7, 9, &old),
                replica(8, 9, &old),
                replica(9, 9, &old),
            ],
            vec![
                replica(1, 3, &after),
                replica(2, 3, &after),
                replica(4, 3, &after),
            ],
        );
        assert_eq!(ids(reborn.leftovers_of(0, 3)), None);

        // A replacement being created (epoch 0, nothing in sync) is not the
        // target's to delete, and does not keep it sweeping.
        let mut creating = replica(5, 0, &[1, 2, 4, 5]);
        creating.replica.in_sync.clear();
        let busy = volume(
            vec![
                replica(1, 3, &after),
                replica(2, 3, &after),
                replica(4, 3, &after),
            ],
            vec![creating],
        );
        assert_eq!(ids(busy.leftovers_of(0, 3)), Some((vec![], true)));
    }

    #[test]
    fn the_one_replica_of_a_volume_is_deletable_once_it_took_its_removal() {
        // A 1-replica volume moved from 1 to 2: the change needs both, and
        // the old replica holds the config that leaves it out.
        let moved = volume(vec![replica(2, 4, &[2])], vec![replica(1, 4, &[2])]);
        assert_eq!(deletable_ids(&moved), vec![1]);
        // It did not take it: the change may not be complete.
        let unsure = volume(vec![replica(2, 4, &[2])], vec![replica(1, 3, &[1, 2])]);
        assert_eq!(deletable_ids(&unsure), Vec::<u32>::new());
    }
}
