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
            // Taking a snapshot that exists already (of the same volume) is
            // taken for a retry and returns it: said so, with its age, so an
            // old one is not mistaken for a new one.
            let snapshots::Created { snapshot, existed } =
                snapshots::create(cluster, &volume, &name).await?;
            if existed {
                println!(
                    "snapshot {} of volume {} exists already, taken {} ago, on {}: nothing new \
                     was taken (`strata snapshot rm {}` first for a new one)",
                    snapshot.name,
                    snapshot.volume,
                    age(snapshot.created_unix),
                    nodes(&snapshot),
                    snapshot.name
                );
            } else {
                println!(
                    "created snapshot {} of volume {} on {}",
                    snapshot.name,
                    snapshot.volume,
                    nodes(&snapshot)
                );
            }
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

/// How long ago `unix` (seconds) was, roughly: "40s", "12m", "5h", "3d".
fn age(unix: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let secs = now.saturating_sub(unix);
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_rounded_down_to_their_largest_unit() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert_eq!(age(now), "0s");
        assert_eq!(age(now - 150), "2m");
        assert_eq!(age(now - 3 * 3600 - 5), "3h");
        assert_eq!(age(now - 2 * 86400), "2d");
        // A clock behind the node's: no negative age.
        assert_eq!(age(now + 100), "0s");
    }
}
