//! How a component finds the storage nodes of its cluster, the same way in
//! both settings Strata runs in:
//!
//! * on one machine, `strata up` writes the cluster file (`DIR/cluster.json`)
//!   and passes its directory to every node (`--cluster-dir`);
//! * in Kubernetes, the storage nodes sit behind a headless Service, whose
//!   DNS name has one A record per storage node pod (`--storage-nodes
//!   strata-node:7400`); each address is asked what node it is.
//!
//! The CSI controller uses it to place and publish volumes; a storage node
//! uses it to choose where a replacement replica of a faulted one goes.
//! Either source is read again on every call, so nodes that restarted with
//! new addresses, or joined, are found.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use super::volumes::VolumeError;
use super::{client, ClusterFile, NodeEntry};

/// Where the storage nodes are found.
#[derive(Debug, Clone)]
pub enum Discovery {
    /// The cluster file that `strata up` writes (`DIR/cluster.json`).
    ClusterDir(PathBuf),
    /// gRPC addresses (`host:port`), each resolved on every call; a host
    /// name may stand for many nodes, as the name of a headless Service does
    /// in Kubernetes. Each address is asked for its node's name, zone and
    /// endpoints.
    Addresses(Vec<String>),
}

impl Discovery {
    /// The storage nodes as a cluster file, however they were found.
    /// UNAVAILABLE when none can be found.
    pub async fn cluster(&self) -> Result<ClusterFile, VolumeError> {
        match self {
            Discovery::ClusterDir(dir) => {
                ClusterFile::load(dir).map_err(|e| VolumeError::Unavailable(format!("{e:#}")))
            }
            Discovery::Addresses(addresses) => {
                let mut grpc: BTreeSet<SocketAddr> = BTreeSet::new();
                for address in addresses {
                    match tokio::net::lookup_host(address.as_str()).await {
                        Ok(found) => grpc.extend(found),
                        Err(err) => {
                            tracing::warn!(%address, %err, "storage node address does not resolve")
                        }
                    }
                }
                let nodes = futures::future::join_all(grpc.iter().map(|a| discover(*a))).await;
                let mut cluster = ClusterFile::default();
                for (address, node) in grpc.iter().zip(nodes) {
                    match node {
                        // One node can be reached under several addresses.
                        Ok(node) if cluster.nodes.iter().any(|n| n.name == node.name) => {}
                        Ok(node) => cluster.nodes.push(node),
                        Err(err) => {
                            tracing::warn!(%address, err = %format!("{err:#}"), "storage node not answering")
                        }
                    }
                }
                if cluster.nodes.is_empty() {
                    return Err(VolumeError::Unavailable(format!(
                        "no storage node answers at {}",
                        addresses.join(", ")
                    )));
                }
                Ok(cluster)
            }
        }
    }
}

/// `host:port` as the node reports it; a host name (an --advertise-host
/// that is not an address) falls back to the address the node answered on.
fn reported_addr(reported: &str, answered_on: SocketAddr) -> Option<SocketAddr> {
    reported.parse().ok().or_else(|| {
        let port = reported.rsplit_once(':')?.1.parse().ok()?;
        Some(SocketAddr::new(answered_on.ip(), port))
    })
}

/// The node behind one gRPC address, from what it says about itself.
async fn discover(grpc: SocketAddr) -> anyhow::Result<NodeEntry> {
    let probe = NodeEntry {
        name: grpc.to_string(),
        zone: String::new(),
        grpc,
        nbd: grpc,
        http: grpc,
        replication: None,
        pool: PathBuf::new(),
        pid: None,
    };
    let info = client::node_info(&probe).await?;
    let nbd = reported_addr(&info.nbd_address, grpc)
        .ok_or_else(|| anyhow::anyhow!("node at {grpc} reports a bad NBD address"))?;
    Ok(NodeEntry {
        name: info.name,
        zone: info.zone,
        grpc,
        nbd,
        // Nothing found this way uses a node's HTTP endpoint (metrics and
        // health are scraped by Kubernetes), and NodeInfo does not carry it.
        http: SocketAddr::new(grpc.ip(), 0),
        replication: reported_addr(&info.replication_address, grpc),
        pool: PathBuf::new(),
        pid: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reported_addresses_fall_back_to_the_address_that_answered() {
        let answered: SocketAddr = "10.0.0.7:7400".parse().unwrap();
        assert_eq!(
            reported_addr("10.0.0.8:10809", answered),
            Some("10.0.0.8:10809".parse().unwrap())
        );
        assert_eq!(
            reported_addr("node-7.example:10809", answered),
            Some("10.0.0.7:10809".parse().unwrap())
        );
        assert_eq!(reported_addr("garbage", answered), None);
    }
}
