//! strata-csi: the CSI driver in front of Strata storage nodes.
//!
//! One binary serves the CSI Identity service and, by `--mode`, the
//! Controller service (volumes on the storage nodes, through [`backend`]),
//! the Node service (attaching NBD exports as block devices, formatting and
//! mounting them), or both, over a unix socket.

pub mod attach;
pub mod backend;
pub mod command;
pub mod controller;
pub mod error;
pub mod identity;
pub mod inflight;
pub mod mount;
pub mod node;
pub mod server;
pub mod state;
pub mod topology;

/// The driver's name, as Kubernetes' CSIDriver object and StorageClasses name it.
pub const DRIVER_NAME: &str = "csi.strata.io";

/// What publish_context carries from ControllerPublishVolume to the node:
/// the NBD export the node attaches.
pub const PUBLISH_CONTEXT_NBD_URI: &str = "nbdUri";
