//! `strata node ...`: list nodes, or run one in the foreground.

use crate::volume::human;
use strata_node::cluster::client;
use strata_node::cluster::{process_alive, ClusterFile};

pub async fn list(cluster: &ClusterFile) -> anyhow::Result<()> {
    println!(
        "{:<8} {:<21} {:<7} {:<6} {:>10} {:>10} {:>8}",
        "NAME", "ADDRESS", "ZONE", "STATE", "USED", "FREE", "PID"
    );
    for node in &cluster.nodes {
        let pid = node
            .pid
            .filter(|pid| process_alive(*pid))
            .map_or("-".to_string(), |p| p.to_string());
        let (state, used, free) = match client::node_info(node).await {
            Ok(info) => ("up", human(info.used_bytes), human(info.free_bytes)),
            Err(_) => ("down", "-".to_string(), "-".to_string()),
        };
        println!(
            "{:<8} {:<21} {:<7} {:<6} {:>10} {:>10} {:>8}",
            node.name, node.grpc, node.zone, state, used, free, pid
        );
    }
    Ok(())
}
