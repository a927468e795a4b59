//! Snapshots and clones: read-only copies of a volume's block map that share
//! its data blocks, and writable volumes started from such a copy.
//!
//! Taking a snapshot copies the map (8 bytes per mapped block), adds a
//! reference to every block it names and writes a checkpoint; no data moves.
//! The volume's later writes go to new blocks as always (copy-on-write), so
//! the snapshot keeps seeing the old ones. A block returns to the free space
//! when the last map naming it lets go of it.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use super::format::{SnapshotRecord, VolumeRecord, BLOCK_SIZE_U64};
use super::map::BlockMap;
use super::{
    now_unix, volume_info, Pool, PoolError, State, VolumeInfo, VolumeState, MAX_VOLUME_NAME,
};
use crate::range_lock::RangeLock;

pub(super) struct SnapshotState {
    pub name: String,
    /// The volume it was taken of, by the name it had then.
    pub source: String,
    pub size: u64,
    pub created_unix: u64,
    pub map: BlockMap,
}

impl SnapshotState {
    pub fn from_record(record: &SnapshotRecord, map: BlockMap) -> Self {
        SnapshotState {
            name: record.image.name.clone(),
            source: record.source.clone(),
            size: record.image.size,
            created_unix: record.image.created_unix,
            map,
        }
    }

    pub fn record(&self, id: u64) -> SnapshotRecord {
        SnapshotRecord {
            source: self.source.clone(),
            image: VolumeRecord {
                id,
                name: self.name.clone(),
                size: self.size,
                created_unix: self.created_unix,
                blocks: self.map.iter().collect(),
            },
        }
    }
}

/// A snapshot's properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: u64,
    pub name: String,
    /// The volume it was taken of.
    pub source: String,
    /// Size of the volume when the snapshot was taken.
    pub size: u64,
    /// Bytes of data the snapshot refers to (shared or not).
    pub referenced: u64,
    /// Bytes only this snapshot holds: what deleting it gives back.
    pub exclusive: u64,
    pub created_unix: u64,
}

impl Pool {
    /// Takes a snapshot of `volume` holding every write that completed before
    /// this call, durable when this returns.
    pub async fn create_snapshot(
        &self,
        volume: &str,
        name: &str,
    ) -> Result<SnapshotInfo, PoolError> {
        self.create_snapshot_unless(volume, name, |existing| existing == name)
            .await
    }

    /// [`Pool::create_snapshot`], refused with `SnapshotExists` when a
    /// snapshot whose name `clashes` exists: checked under the same lock as
    /// the creation, so two calls cannot both pass.
    pub async fn create_snapshot_unless(
        &self,
        volume: &str,
        name: &str,
        clashes: impl Fn(&str) -> bool,
    ) -> Result<SnapshotInfo, PoolError> {
        check_internal_name("snapshot", name)?;
        // Writes in flight finish first: once the map is copied its blocks
        // are shared, and none may still be being overwritten in place.
        let gate = self.snapshot_gate.write().await;
        let id = {
            let mut guard = self.state.lock().expect("state lock");
            let state = &mut *guard;
            if state
                .snapshots
                .values()
                .any(|s| s.name == name || clashes(&s.name))
            {
                return Err(PoolError::SnapshotExists(name.to_string()));
            }
            let source = state
                .volumes
                .values()
                .find(|v| v.name == volume)
                .ok_or_else(|| PoolError::NotFound(volume.to_string()))?;
            self.check_metadata_room(state, source.map.mapped_blocks())?;
            let map = source.map.clone();
            self.add_refs(&map);
            let snapshot = SnapshotState {
                name: name.to_string(),
                source: volume.to_string(),
                size: source.size.load(std::sync::atomic::Ordering::Relaxed),
                created_unix: now_unix(),
                map,
            };
            let id = state.next_volume_id;
            state.next_volume_id += 1;
            state.snapshots.insert(id, snapshot);
            id
        };
        drop(gate);
        if let Err(err) = self.checkpoint().await {
            self.forget_snapshot(id);
            return Err(err);
        }
        tracing::info!(volume, snapshot = name, "created snapshot");
        Ok(self.snapshot_info(name).expect("just created"))
    }

    /// Deletes a snapshot; blocks no other map names return to the free space.
    /// Volumes cloned from it keep their data.
    pub async fn delete_snapshot(&self, name: &str) -> Result<(), PoolError> {
        // As for volumes: no commit may free the blocks before the
        // checkpoint without the snapshot is durable.
        let mut commit = self.commit.lock().await;
        let (id, snapshot) = {
            let mut state = self.state.lock().expect("state lock");
            let id = state
                .snapshots
                .iter()
                .find(|(_, s)| s.name == name)
                .map(|(id, _)| *id)
                .ok_or_else(|| PoolError::SnapshotNotFound(name.to_string()))?;
            (id, state.snapshots.remove(&id).expect("snapshot present"))
        };
        let frees = snapshot.map.iter().map(|(_, e)| e.pba).collect();
        if let Err(err) = self.checkpoint_locked(&mut commit, frees, &[]).await {
            // The durable state may still have it: it stays, blocks and all.
            self.state
                .lock()
                .expect("state lock")
                .snapshots
                .insert(id, snapshot);
            return Err(err);
        }
        tracing::info!(snapshot = name, "deleted snapshot");
        Ok(())
    }

    /// Removes a snapshot whose creation failed from memory; its references
    /// go with the next commit.
    fn forget_snapshot(&self, id: u64) {
        let mut state = self.state.lock().expect("state lock");
        if let Some(snapshot) = state.snapshots.remove(&id) {
            state
                .pending_frees
                .extend(snapshot.map.iter().map(|(_, e)| e.pba));
        }
    }

    pub fn list_snapshots(&self) -> Vec<SnapshotInfo> {
        let state = self.state.lock().expect("state lock");
        let mut out: Vec<SnapshotInfo> = state
            .snapshots
            .iter()
            .map(|(id, s)| self.describe_snapshot(*id, s))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    pub fn snapshot_info(&self, name: &str) -> Option<SnapshotInfo> {
        let state = self.state.lock().expect("state lock");
        state
            .snapshots
            .iter()
            .find(|(_, s)| s.name == name)
            .map(|(id, s)| self.describe_snapshot(*id, s))
    }

    fn describe_snapshot(&self, id: u64, s: &SnapshotState) -> SnapshotInfo {
        let allocator = self.allocator.lock().expect("allocator lock");
        let exclusive = s
            .map
            .iter()
            .filter(|(_, e)| !allocator.is_shared(e.pba))
            .count() as u64;
        SnapshotInfo {
            id,
            name: s.name.clone(),
            source: s.source.clone(),
            size: s.size,
            referenced: s.map.mapped_blocks() * BLOCK_SIZE_U64,
            exclusive: exclusive * BLOCK_SIZE_U64,
            created_unix: s.created_unix,
        }
    }

    /// Creates volume `name` (an internal name is allowed, as for
    /// [`Pool::create_internal_volume`]) holding the data of `snapshot`,
    /// sharing its blocks. `size` may be larger than the snapshot's, never
    /// smaller; None keeps the snapshot's size.
    pub async fn create_volume_from_snapshot(
        &self,
        name: &str,
        snapshot: &str,
        size: Option<u64>,
    ) -> Result<VolumeInfo, PoolError> {
        check_internal_name("volume", name)?;
        let (id, info) = {
            let mut guard = self.state.lock().expect("state lock");
            let state = &mut *guard;
            if state.volumes.values().any(|v| v.name == name) {
                return Err(PoolError::AlreadyExists(name.to_string()));
            }
            let source = state
                .snapshots
                .values()
                .find(|s| s.name == snapshot)
                .ok_or_else(|| PoolError::SnapshotNotFound(snapshot.to_string()))?;
            let size = match size {
                None => source.size,
                Some(size) if size >= source.size => size
                    .checked_next_multiple_of(BLOCK_SIZE_U64)
                    .ok_or_else(|| PoolError::Invalid("volume size is too large".into()))?,
                Some(size) => {
                    return Err(PoolError::Invalid(format!(
                        "a volume from snapshot {snapshot:?} needs at least {} (asked for {})",
                        super::human(source.size),
                        super::human(size)
                    )))
                }
            };
            self.check_provisionable(state, size)?;
            self.check_metadata_room(state, source.map.mapped_blocks())?;
            let map = source.map.clone();
            self.add_refs(&map);
            let volume = VolumeState {
                name: name.to_string(),
                size: Arc::new(AtomicU64::new(size)),
                created_unix: now_unix(),
                map,
                ranges: RangeLock::new(),
            };
            let id = state.next_volume_id;
            state.next_volume_id += 1;
            let info = volume_info(id, &volume);
            state.volumes.insert(id, volume);
            (id, info)
        };
        if let Err(err) = self.checkpoint().await {
            self.forget_volume(id);
            return Err(err);
        }
        tracing::info!(volume = name, snapshot, "created volume from snapshot");
        Ok(info)
    }

    fn add_refs(&self, map: &BlockMap) {
        let mut allocator = self.allocator.lock().expect("allocator lock");
        for (_, entry) in map.iter() {
            allocator.add_ref(entry.pba);
        }
    }

    /// Refuses `extra` more map entries when a checkpoint could no longer
    /// hold every map. Snapshots and clones share data blocks but each has
    /// its own map, so metadata, not data, can be what runs out: a copy is
    /// refused here, and a write that maps a new block gets ENOSPC
    /// (`Pool::allocate_blocks`).
    pub(super) fn check_metadata_room(&self, state: &State, extra: u64) -> Result<(), PoolError> {
        let capacity = self.superblock.layout.checkpoint_entry_capacity();
        let entries = mapped_entries(state);
        if entries + extra > capacity {
            return Err(PoolError::NoSpace(format!(
                "the pool's metadata is full: volumes and snapshots map {entries} blocks, \
                 {extra} more would pass the {capacity} a checkpoint holds; delete \
                 snapshots or clones first"
            )));
        }
        Ok(())
    }
}

/// Map entries over every volume and snapshot.
pub(super) fn mapped_entries(state: &State) -> u64 {
    let volumes: u64 = state.volumes.values().map(|v| v.map.mapped_blocks()).sum();
    let snapshots: u64 = state
        .snapshots
        .values()
        .map(|s| s.map.mapped_blocks())
        .sum();
    volumes + snapshots
}

fn check_internal_name(what: &str, name: &str) -> Result<(), PoolError> {
    // Room for a prefix and a suffix around a user's name (a replicated
    // volume's snapshot copy is `replica:<name>@<uid>`).
    if name.is_empty() || name.len() > MAX_VOLUME_NAME + 32 {
        return Err(PoolError::Invalid(format!("invalid {what} name {name:?}")));
    }
    Ok(())
}
