//! Replication of a volume over N replicas on distinct nodes
//! (DESIGN.md, "Replication and consistency").
//!
//! * `membership`: the pure decisions of epoch fencing and in-sync sets, and
//!   `model`, a test that explores crashes, restarts, partitions and competing
//!   targets over them.
//! * `wire`: the framing of the replication protocol.
//! * `replica`: a node's copy of a volume, with its persisted membership
//!   state (`header`: how that state is kept on the device); `server`: the
//!   endpoint through which targets reach it.
//! * `client` and `target`: the volume target that serves the NBD export and
//!   drives the replicas (`crate::range_lock` orders its overlapping
//!   writes); `lease` keeps a deposed target from serving stale reads.

pub mod client;
mod header;
pub mod lease;
pub mod membership;
pub mod replica;
pub mod server;
pub mod target;
pub mod wire;

#[cfg(test)]
mod model;

pub use replica::{Member, Replica, Replicas};
pub use target::{TargetOptions, VolumeTarget};
