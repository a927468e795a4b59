//! How clients find and talk to the storage nodes of a cluster: the cluster
//! file that `strata up` writes (or the DNS name of a headless Service, see
//! `discovery`), and gRPC connections to the nodes. The CLI, the CSI driver
//! and the storage nodes themselves (to place replacement replicas) use it.

pub mod client;
mod discovery;
mod file;
pub mod snapshots;
pub mod volumes;

pub use discovery::Discovery;
pub use file::{process_alive, ClusterFile, NodeEntry, CLUSTER_FILE};
