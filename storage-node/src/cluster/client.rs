//! gRPC connections to the storage nodes of a cluster.

use std::time::Duration;

use strata_proto::storage::storage_node_client::StorageNodeClient;
use strata_proto::storage::{GetNodeInfoRequest, ListVolumesRequest, NodeInfo, Volume};
use tonic::transport::{Channel, Endpoint};

use super::{ClusterFile, NodeEntry};

pub type Client = StorageNodeClient<Channel>;

/// A client for one node; fails fast when the node does not answer.
pub async fn connect(node: &NodeEntry) -> anyhow::Result<Client> {
    let endpoint = Endpoint::from_shared(format!("http://{}", node.grpc))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(30));
    let channel = endpoint
        .connect()
        .await
        .map_err(|_| anyhow::anyhow!("node {} is not reachable at {}", node.name, node.grpc))?;
    Ok(StorageNodeClient::new(channel))
}

pub async fn node_info(node: &NodeEntry) -> anyhow::Result<NodeInfo> {
    let mut client = connect(node).await?;
    Ok(client
        .get_node_info(GetNodeInfoRequest {})
        .await
        .map_err(status_error)?
        .into_inner())
}

/// Every node's volumes; fails when any node cannot be asked, because a
/// missing node could hold the volume in question.
pub async fn all_volumes(cluster: &ClusterFile) -> anyhow::Result<Vec<(NodeEntry, Volume)>> {
    let mut out = Vec::new();
    for node in &cluster.nodes {
        let mut client = connect(node).await?;
        let volumes = client
            .list_volumes(ListVolumesRequest {})
            .await
            .map_err(status_error)?
            .into_inner()
            .volumes;
        out.extend(volumes.into_iter().map(|v| (node.clone(), v)));
    }
    Ok(out)
}

/// The node that holds volume `name`.
pub async fn find_volume(cluster: &ClusterFile, name: &str) -> anyhow::Result<(NodeEntry, Volume)> {
    all_volumes(cluster)
        .await?
        .into_iter()
        .find(|(_, v)| v.name == name)
        .ok_or_else(|| anyhow::anyhow!("volume {name:?} not found"))
}

/// A gRPC status as the one-line message the node wrote.
pub fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", status.message())
}
