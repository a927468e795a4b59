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
            for snapshot in snapshots::list(cluster).await? {
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
                    nodes(&snapshot)
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
