//! `strata volume ...`: create, list, describe, resize, delete and export
//! replicated volumes, replace a replica by one on another node, and give
//! up a move.

use bytesize::ByteSize;

use strata_node::cluster::snapshots;
use strata_node::cluster::volumes::{self, Placement, VolumeReport};
use strata_node::cluster::ClusterFile;
use strata_proto::storage::TargetReplica;

#[derive(Debug, clap::Subcommand)]
pub enum VolumeCommand {
    /// Create a thin-provisioned volume with replicas on distinct nodes.
    Create {
        name: String,
        /// Size, e.g. 1GiB or 512MiB (with --from-snapshot: the snapshot's
        /// size unless larger).
        #[arg(long, required_unless_present = "from_snapshot")]
        size: Option<ByteSize>,
        /// Number of replicas, each on a different node (spread over zones;
        /// default 1).
        #[arg(long)]
        replicas: Option<usize>,
        /// Put the first replica on this node.
        #[arg(long, conflicts_with = "from_snapshot")]
        node: Option<String>,
        /// Start from this snapshot's data: one replica on each node that
        /// holds a copy of it, sharing its blocks (no data is copied).
        #[arg(long)]
        from_snapshot: Option<String>,
    },
    /// List volumes with their replicas and target.
    Ls,
    /// Show a volume's replicas, their states, the epoch and the target.
    Describe { name: String },
    /// Delete a volume and free its space on every node.
    Rm { name: String },
    /// Grow a volume.
    Resize {
        name: String,
        #[arg(long)]
        size: ByteSize,
    },
    /// Replace the volume's replica on a node (dead or alive) by a new one on
    /// another node, which gets a full copy while the volume serves I/O.
    ReplaceReplica {
        name: String,
        /// The node whose replica leaves.
        #[arg(long)]
        from: String,
        /// The node for the new replica (default: chosen like `create` does:
        /// a node without a replica of the volume, in an unused zone when
        /// there is one, with the most room).
        #[arg(long)]
        to: Option<String>,
    },
    /// Give up the move of a replica under way (a replace-replica of a
    /// healthy replica): the new replica is dropped, the old one stays.
    CancelMove { name: String },
    /// Open the volume's target (fencing any other) and print its NBD URI.
    Export {
        name: String,
        /// Node to serve the volume from (default: the current target's, or
        /// a node holding an in-sync replica).
        #[arg(long)]
        node: Option<String>,
    },
}

pub async fn run(cluster: &ClusterFile, command: VolumeCommand) -> anyhow::Result<()> {
    match command {
        VolumeCommand::Create {
            name,
            size,
            replicas,
            node,
            from_snapshot,
        } => {
            let size = size.map(|s| s.as_u64());
            let volume = match from_snapshot {
                Some(snapshot) => {
                    let snapshot = snapshots::get(cluster, &snapshot).await?;
                    if let Some(n) = replicas.filter(|n| *n != snapshot.copies.len()) {
                        anyhow::bail!(
                            "a volume from snapshot {} gets a replica on each of the {} nodes holding it, not {n}",
                            snapshot.name,
                            snapshot.copies.len()
                        );
                    }
                    volumes::create_from_snapshot(cluster, &name, &snapshot, size).await?
                }
                None => {
                    let placement = Placement {
                        replicas: replicas.unwrap_or(1),
                        zones: Vec::new(),
                        preferred_node: node,
                    };
                    if let Some(node) = &placement.preferred_node {
                        cluster.node(node)?;
                    }
                    let size = size.expect("clap requires --size without --from-snapshot");
                    volumes::create(cluster, &name, size, &placement).await?
                }
            };
            let nodes: Vec<&str> = volume
                .replicas
                .iter()
                .map(|r| r.node.name.as_str())
                .collect();
            println!(
                "created volume {} ({}) with {} replica{} on {}",
                volume.name,
                human(volume.size_bytes),
                nodes.len(),
                if nodes.len() == 1 { "" } else { "s" },
                nodes.join(", ")
            );
            Ok(())
        }
        VolumeCommand::Ls => list(cluster).await,
        VolumeCommand::Describe { name } => describe(&volumes::get(cluster, &name).await?),
        VolumeCommand::Rm { name } => {
            volumes::delete(cluster, &name).await?;
            println!("deleted volume {name}");
            Ok(())
        }
        VolumeCommand::Resize { name, size } => {
            let volume = volumes::resize(cluster, &name, size.as_u64()).await?;
            println!("volume {} is now {}", volume.name, human(volume.size_bytes));
            Ok(())
        }
        VolumeCommand::ReplaceReplica { name, from, to } => {
            cluster.node(&from)?;
            let outcome = volumes::replace_replica(cluster, &name, &from, to.as_deref()).await?;
            if outcome.planned.keep_until_copied {
                println!(
                    "moving the replica of {name} on {from} to {}; the target on {} copies the \
                     volume to it, and the replica on {from} stays in sync until the copy is \
                     done, then leaves and is deleted (progress: strata volume describe {name})",
                    outcome.planned.node.name, outcome.target_node
                );
                return Ok(());
            }
            println!(
                "replacing the replica of {name} on {from} by one on {}; the target on {} \
                 copies the volume to it (progress: strata volume describe {name})",
                outcome.planned.node.name, outcome.target_node
            );
            if !outcome.old_deleted {
                println!(
                    "the old replica on {from} could not be deleted (node unreachable); \
                     it is deleted once the node is back (with automatic replacement on), \
                     or by the next replacement or `strata volume rm`"
                );
            }
            Ok(())
        }
        VolumeCommand::CancelMove { name } => {
            let cancelled = volumes::cancel_move(cluster, &name).await?;
            println!(
                "cancelled the move of {name}: its replica stays on {}, and the new one on {} \
                 left the volume (change made by the target on {})",
                cancelled.stays, cancelled.dropped, cancelled.target_node
            );
            if !cancelled.dropped_deleted {
                println!(
                    "the new replica on {} could not be deleted (node unreachable); it is \
                     deleted once the node is back (with automatic replacement on), or by the \
                     next replacement or `strata volume rm`",
                    cancelled.dropped
                );
            }
            Ok(())
        }
        VolumeCommand::Export { name, node } => {
            let (_, target) = volumes::open_target(cluster, &name, node.as_deref()).await?;
            println!("{}", target.export_uri);
            Ok(())
        }
    }
}

/// "2/3 in sync", with a running rebuild's progress.
fn health(volume: &VolumeReport) -> String {
    let sync = sync_state(volume);
    match volume.unfinished_resize() {
        Some(size) => format!("{sync}, resize to {} unfinished", human(size)),
        None => sync,
    }
}

/// "2/3 in sync, rebuilding 42% (12 MiB)" and the like.
fn sync_state(volume: &VolumeReport) -> String {
    let members = volume.members().len();
    let in_sync = volume.in_sync().len();
    let rebuilds: Vec<String> = volume
        .active_target()
        .map(|(_, t)| {
            t.replicas
                .iter()
                .filter(|r| r.rebuilding)
                .map(rebuild_progress)
                .collect()
        })
        .unwrap_or_default();
    if in_sync == members {
        format!("{in_sync}/{members} in sync")
    } else if volume.leaving().is_some() {
        // A move: one member more than the volume keeps, until the copy.
        match rebuilds.is_empty() {
            true => format!("{in_sync}/{members} in sync, moving a replica"),
            false => format!(
                "{in_sync}/{members} in sync, moving a replica, {}",
                rebuilds.join(", ")
            ),
        }
    } else if !rebuilds.is_empty() {
        format!("{in_sync}/{members} in sync, {}", rebuilds.join(", "))
    } else {
        format!("{in_sync}/{members} in sync (degraded)")
    }
}

/// "rebuilding 42% (12 MiB)": extents copied of those that differ, and bytes.
fn rebuild_progress(replica: &TargetReplica) -> String {
    if replica.rebuild_extents_total == 0 && replica.rebuild_extents_copied == 0 {
        return "rebuilding (comparing)".to_string();
    }
    let percent = (replica.rebuild_extents_copied * 100)
        .checked_div(replica.rebuild_extents_total)
        .unwrap_or(100);
    format!(
        "rebuilding {percent}% ({})",
        human(replica.rebuild_bytes_copied)
    )
}

async fn list(cluster: &ClusterFile) -> anyhow::Result<()> {
    let volumes = volumes::list(cluster).await?;
    println!(
        "{:<20} {:>10} {:>10} {:<26} {:<36} EXPORT",
        "NAME", "SIZE", "ALLOCATED", "REPLICAS", "STATE"
    );
    for v in &volumes {
        let nodes: Vec<String> = v.members().into_iter().map(|m| m.node).collect();
        let allocated = v
            .replicas
            .iter()
            .map(|r| r.replica.allocated_bytes)
            .max()
            .unwrap_or(0);
        let target = match v.active_target() {
            Some((_, t)) => t.export_uri.clone(),
            None => "-".to_string(),
        };
        println!(
            "{:<20} {:>10} {:>10} {:<26} {:<36} {}",
            v.name,
            human(v.served_bytes()),
            human(allocated),
            nodes.join(","),
            health(v),
            target
        );
    }
    Ok(())
}

fn describe(volume: &VolumeReport) -> anyhow::Result<()> {
    print!("{}", description(volume));
    Ok(())
}

/// What `strata volume describe` prints.
fn description(volume: &VolumeReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let in_sync = volume.in_sync();
    let leaving = volume.leaving();
    let epoch = volume
        .replicas
        .iter()
        .map(|r| r.replica.config_epoch)
        .max()
        .unwrap_or(0);
    let _ = writeln!(out, "Name:      {}", volume.name);
    let served = volume.served_bytes();
    let _ = writeln!(out, "Size:      {}", human(served));
    if let Some(size) = volume.unfinished_resize() {
        let _ = writeln!(
            out,
            "Resize:    to {} reached only some replicas (the SIZE column); \
             `strata volume resize {} --size {size}` grows the rest",
            human(size),
            volume.name,
        );
    }
    let _ = writeln!(out, "Epoch:     {epoch}");
    let _ = writeln!(out, "State:     {}", health(volume));
    let _ = match volume.active_target() {
        Some((node, t)) => writeln!(
            out,
            "Target:    {} on {} (epoch {})",
            t.export_uri, node.name, t.epoch
        ),
        None => writeln!(
            out,
            "Target:    none (open one with `strata volume export {}`)",
            volume.name
        ),
    };
    let _ = writeln!(out, "Replicas:");
    let _ = writeln!(
        out,
        "  {:<4} {:<10} {:<32} {:>10} {:>10} {:>8}",
        "ID", "NODE", "STATE", "SIZE", "ALLOCATED", "EPOCH"
    );
    for member in volume.members() {
        let report = volume
            .replicas
            .iter()
            .find(|r| r.replica.replica_id == member.id);
        let (state, size, allocated, promised) = match report {
            None => (
                "unreachable".to_string(),
                "-".to_string(),
                "-".to_string(),
                "-".to_string(),
            ),
            Some(r) => {
                let rebuild = volume.active_target().and_then(|(_, t)| {
                    t.replicas
                        .iter()
                        .find(|tr| tr.member.as_ref().is_some_and(|m| m.id == member.id))
                        .filter(|tr| tr.rebuilding)
                });
                let state = if leaving == Some(member.id) {
                    match in_sync.contains(&member.id) {
                        true => "in-sync, leaving".to_string(),
                        false => "faulted, leaving".to_string(),
                    }
                } else if in_sync.contains(&member.id) {
                    "in-sync".to_string()
                } else if let Some(tr) = rebuild {
                    rebuild_progress(tr)
                } else if r.replica.size_bytes < served {
                    // Rebuilt only once a resize grows it (see Resize above).
                    "faulted, smaller than the volume".to_string()
                } else {
                    "faulted".to_string()
                };
                (
                    state,
                    human(r.replica.size_bytes),
                    human(r.replica.allocated_bytes),
                    r.replica.promised_epoch.to_string(),
                )
            }
        };
        let _ = writeln!(
            out,
            "  {:<4} {:<10} {:<32} {:>10} {:>10} {:>8}",
            member.id, member.node, state, size, allocated, promised
        );
    }
    for leftover in &volume.retired {
        let _ = writeln!(
            out,
            "Leftover:  replica {} on {} was replaced; its node was down then (deleted by \
             the volume's target, the next replacement or `strata volume rm`)",
            leftover.replica.replica_id, leftover.node.name
        );
    }
    for leftover in &volume.earlier {
        let _ = writeln!(
            out,
            "Leftover:  {} holds a replica of an earlier volume named {}, deleted while \
             the node was down; it is not part of this volume (`strata volume rm` deletes it \
             with the volume)",
            leftover.node.name, volume.name
        );
    }
    if let Some((_, t)) = volume.active_target() {
        if t.repaired_blocks > 0 {
            let _ = writeln!(
                out,
                "Repaired:  {} blocks after checksum failures",
                t.repaired_blocks
            );
        }
    }
    out
}

pub use strata_node::pool::human;

#[cfg(test)]
mod tests {
    use super::*;
    use strata_node::cluster::volumes::ReplicaReport;
    use strata_node::cluster::NodeEntry;
    use strata_proto::storage::{Replica, ReplicaMember, Target};

    const MIB: u64 = 1 << 20;

    fn node(name: &str) -> NodeEntry {
        NodeEntry {
            name: name.to_string(),
            zone: "zone-a".to_string(),
            grpc: "127.0.0.1:1".parse().unwrap(),
            nbd: "127.0.0.1:2".parse().unwrap(),
            http: "127.0.0.1:3".parse().unwrap(),
            replication: None,
            pool: "/pool".into(),
            pid: None,
        }
    }

    /// A volume "db" whose replica on node-N holds `sizes[N-1]` bytes, with
    /// `in_sync` in sync.
    fn volume(sizes: &[u64], in_sync: &[u32]) -> VolumeReport {
        let members: Vec<ReplicaMember> = (1..=sizes.len() as u32)
            .map(|id| ReplicaMember {
                id,
                node: format!("node-{id}"),
                address: String::new(),
            })
            .collect();
        let replicas = sizes
            .iter()
            .zip(1u32..)
            .map(|(&size_bytes, id)| ReplicaReport {
                node: node(&format!("node-{id}")),
                replica: Replica {
                    volume: "db".to_string(),
                    replica_id: id,
                    node: format!("node-{id}"),
                    size_bytes,
                    config_epoch: 2,
                    in_sync: in_sync.to_vec(),
                    members: members.clone(),
                    ..Default::default()
                },
            })
            .collect();
        VolumeReport {
            name: "db".to_string(),
            uid: 1,
            size_bytes: sizes.iter().copied().max().unwrap(),
            replicas,
            retired: Vec::new(),
            earlier: Vec::new(),
            missing: Vec::new(),
            targets: Vec::new(),
        }
    }

    #[test]
    fn a_volume_whose_resize_reached_one_replica_shows_the_size_it_serves() {
        let v = volume(&[32 * MIB, 16 * MIB, 16 * MIB], &[1, 2, 3]);
        assert_eq!(v.served_bytes(), 16 * MIB);
        assert_eq!(health(&v), "3/3 in sync, resize to 32 MiB unfinished");
        let text = description(&v);
        assert!(text.contains("Size:      16 MiB\n"), "{text}");
        assert!(
            text.contains("strata volume resize db --size 33554432` grows the rest"),
            "{text}"
        );
        let sizes: Vec<&str> = text
            .lines()
            .filter(|l| l.trim_start().starts_with(['1', '2', '3']))
            .map(|l| l.split_whitespace().nth(3).unwrap())
            .collect();
        assert_eq!(sizes, ["32", "16", "16"], "{text}");
    }

    #[test]
    fn a_replica_left_smaller_than_the_volume_says_why_it_is_not_rebuilt() {
        let mut v = volume(&[32 * MIB, 32 * MIB, 16 * MIB], &[1, 2]);
        v.targets.push((
            node("node-1"),
            Target {
                volume: "db".to_string(),
                node: "node-1".to_string(),
                epoch: 3,
                export_uri: "nbd://127.0.0.1:2/db".to_string(),
                size_bytes: 32 * MIB,
                ..Default::default()
            },
        ));
        assert_eq!(v.served_bytes(), 32 * MIB);
        assert_eq!(
            health(&v),
            "2/3 in sync (degraded), resize to 32 MiB unfinished"
        );
        let text = description(&v);
        assert!(text.contains("Size:      32 MiB\n"), "{text}");
        let third = text.lines().find(|l| l.contains("node-3")).unwrap();
        assert!(third.contains("faulted, smaller than the volume"), "{text}");
    }

    #[test]
    fn a_volume_whose_replicas_agree_has_no_resize_note() {
        let v = volume(&[32 * MIB, 32 * MIB, 32 * MIB], &[1, 2, 3]);
        assert_eq!(health(&v), "3/3 in sync");
        let text = description(&v);
        assert!(!text.contains("Resize:"), "{text}");
        assert!(text.contains("Size:      32 MiB\n"), "{text}");
    }
}
