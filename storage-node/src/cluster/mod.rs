//! How clients find and talk to the storage nodes of a cluster: the cluster
//! file that `strata up` writes, and gRPC connections to the nodes. The CLI
//! and the CSI driver both use it.

pub mod client;
mod file;
pub mod snapshots;
pub mod volumes;

pub use file::{process_alive, ClusterFile, NodeEntry, CLUSTER_FILE};
