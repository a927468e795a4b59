//! strata-node: the storage node.
//!
//! A node owns one pool on a local device (or a file), keeps thin-provisioned
//! volumes in it, and serves each volume as an NBD export. Its control API is
//! gRPC; `/metrics` and `/healthz` are served over HTTP.

pub mod cluster;
pub mod daemon;
pub mod engine;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod nbd;
pub mod pool;
pub mod range_lock;
pub mod registry;
pub mod replication;
pub mod runtime;
pub mod target;
pub mod vectored;
