//! `strata snapshot ...`: take, list and delete snapshots of replicated volumes.

use strata_node::cluster::snapshots;
use strata_node::cluster::ClusterFile;

use crate::volume::human;

#[derive(Debug, clap::Subcommand)]
pub enum SnapshotCommand {
    /// Take a copy-on-write snapshot of a volume on each in-sync replica.
    Create { volume: String, name: String },
    /// List snapshots with their volume and the nodes holding them.
    Ls,
    /// Delete a snapshot; volumes created from it keep their data.
    Rm { name: String },
}

pub async fn run(cluster: &ClusterFile, command: SnapshotCommand) -> anyhow::Result<()> {
    match command {
        SnapshotCommand::Create { volume, name } => {
            let snapshot = snapshots::create(cluster, &volume, &name).await?;
            println!(
                "created snapshot {} of volume {} on {}",
                snapshot.name,
                snapshot.volume,
                nodes(&snapshot)
            );
        }
        SnapshotCommand::Ls => {
            println!(
                "{:<24} {:<20} {:>10} {:>10} NODES",
                "NAME", "VOLUME", "SIZE", "EXCLUSIVE"
            );
            let all = snapshots::list(cluster).await?;
            // Copies of different snapshots under one name are listed apart.
            let mut per_name: std::collections::BTreeMap<&str, usize> = Default::default();
            for snapshot in &all {
                *per_name.entry(snapshot.name.as_str()).or_default() += 1;
            }
            let conflicts = per_name
                .into_iter()
                .filter(|&(_, n)| n > 1)
                .map(|(name, _)| name);
            for snapshot in &all {
                let exclusive = snapshot
                    .copies
                    .iter()
                    .map(|c| c.snapshot.exclusive_bytes)
                    .max()
                    .unwrap_or(0);
                println!(
                    "{:<24} {:<20} {:>10} {:>10} {}",
                    snapshot.name,
                    snapshot.volume,
                    human(snapshot.size_bytes),
                    human(exclusive),
                    nodes(snapshot)
                );
            }
            for name in conflicts {
                println!(
                    "note: the nodes hold copies of different snapshots named {name} (a node \
                     kept an old copy through a delete); no volume can be made from it until \
                     `strata snapshot rm {name}` deletes them all"
                );
            }
        }
        SnapshotCommand::Rm { name } => {
            snapshots::delete(cluster, &name).await?;
            println!("deleted snapshot {name}");
        }
    }
    Ok(())
}

fn nodes(snapshot: &snapshots::SnapshotReport) -> String {
    let nodes: Vec<&str> = snapshot
        .copies
        .iter()
        .map(|c| c.node.name.as_str())
        .collect();
    nodes.join(",")
}
