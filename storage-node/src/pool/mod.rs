//! A pool: one device (or file) holding thin-provisioned volumes.
//!
//! See [`format`] for the on-disk layout and the crash-consistency argument.
//! In memory a pool keeps every volume's block map, the allocator bitmap, and
//! the map changes made since the last commit. [`Pool::commit`] (a FLUSH) makes
//! those changes durable with one journal batch; volume create, delete and
//! resize, and snapshot create and delete, write a whole checkpoint.
//!
//! Snapshots are read-only copies of a volume's block map that share its data
//! blocks; a clone is a volume created from a snapshot's map. A block is free
//! once no volume or snapshot names it (see [`allocator`]).

mod allocator;
mod epoch;
pub mod format;
mod map;
mod regions;
mod snapshot;
mod volume;

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use allocator::Allocator;
use epoch::Epochs;
use format::{
    Checkpoint, JournalRecord, Layout, SnapshotRecord, Superblock, VolumeRecord, BLOCK_SIZE,
    BLOCK_SIZE_U64,
};
use map::BlockMap;
use regions::OpenRegions;

use crate::engine::{device_size, EngineKind, IoEngine};
use crate::metrics::Metrics;
use crate::range_lock::RangeLock;
pub use snapshot::SnapshotInfo;
use snapshot::SnapshotState;
pub use volume::Volume;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("pool device I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("pool metadata is corrupt: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Invalid(String),
    #[error("volume {0:?} not found")]
    NotFound(String),
    #[error("volume {0:?} already exists")]
    AlreadyExists(String),
    #[error("snapshot {0:?} not found")]
    SnapshotNotFound(String),
    #[error("snapshot {0:?} already exists")]
    SnapshotExists(String),
    #[error("not enough space: {0}")]
    NoSpace(String),
}

/// How to open or create a pool.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    pub engine: EngineKind,
    /// Name recorded in a new pool's superblock.
    pub name: String,
    /// Size of the file to create when the pool file does not exist.
    pub create_size: Option<u64>,
    /// Volumes may be provisioned up to this percent of data capacity (new pools).
    pub overcommit_percent: u32,
    /// Write zeroes over a new file-backed pool when formatting it. Filesystems
    /// cannot write into holes of a sparse file without blocking, so io_uring
    /// hands such writes to kernel worker threads; a preallocated file avoids
    /// that. Block devices never need it.
    pub preallocate: bool,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            engine: EngineKind::Auto,
            name: "pool".into(),
            create_size: None,
            overcommit_percent: 200,
            preallocate: false,
        }
    }
}

/// A snapshot of a volume's properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub id: u64,
    pub name: String,
    pub size: u64,
    /// Bytes of pool space the volume's data uses.
    pub allocated: u64,
    pub created_unix: u64,
}

/// Capacity figures, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolUsage {
    pub capacity: u64,
    pub used: u64,
    pub free: u64,
    pub provisioned: u64,
    pub provisionable: u64,
}

pub struct Pool {
    path: PathBuf,
    superblock: Superblock,
    engine: IoEngine,
    state: Mutex<State>,
    /// Serialises journal writes and checkpoints.
    commit: tokio::sync::Mutex<CommitState>,
    allocator: Arc<Mutex<Allocator>>,
    epochs: Epochs,
    /// Writes hold it shared, a snapshot exclusively while it copies a map: a
    /// block must not become shared while it is being overwritten in place.
    snapshot_gate: tokio::sync::RwLock<()>,
    /// Blocks kept free for overwrites: copy-on-write needs a free block to
    /// overwrite even a fully allocated volume.
    reserve_blocks: u64,
    metrics: Arc<Metrics>,
    checksum_failures: AtomicU64,
}

struct State {
    volumes: HashMap<u64, VolumeState>,
    snapshots: HashMap<u64, SnapshotState>,
    next_volume_id: u64,
    /// Map changes not yet in a journal batch.
    pending_records: Vec<JournalRecord>,
    /// Blocks superseded by `pending_records`, free once those are durable.
    pending_frees: Vec<u32>,
    /// A data write completed since the last data sync.
    data_dirty: bool,
    /// Where blocks may be overwritten in place (see `format`).
    regions: OpenRegions,
}

struct VolumeState {
    name: String,
    size: Arc<AtomicU64>,
    created_unix: u64,
    map: BlockMap,
    /// Block ranges held by writes: a block is written (in place or not) and
    /// its map entry updated by one write at a time.
    ranges: Arc<RangeLock>,
}

struct CommitState {
    /// Sequence number of the last journal batch written.
    journal_seq: u64,
    /// Next free block in the journal region.
    journal_pos: u64,
    checkpoint_generation: u64,
    /// The last checkpoint failed, and may have landed all the same. A journal
    /// batch after it would go where that checkpoint's replay never looks
    /// (replay starts at the journal's beginning), so every commit is a
    /// checkpoint until one succeeds.
    checkpoint_needed: bool,
}

const MAX_VOLUME_NAME: usize = 128;

impl Pool {
    /// Opens the pool at `path`, formatting it when it is a new (absent or
    /// all-zero at block 0) file or device. A device that holds something else
    /// is refused rather than overwritten.
    pub async fn open(
        path: &Path,
        options: &PoolOptions,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Pool>, PoolError> {
        if !path.exists() {
            let size = options.create_size.ok_or_else(|| {
                PoolError::Invalid(format!(
                    "{} does not exist; give a size to create a file-backed pool",
                    path.display()
                ))
            })?;
            let file = std::fs::File::create(path)?;
            file.set_len(size)?;
            file.sync_all()?;
        }
        let engine = IoEngine::open(path, options.engine)?;
        let (block, res) = engine.read_at(engine.buffer(BLOCK_SIZE), 0).await;
        res?;
        if block.iter().all(|b| *b == 0) {
            Self::format(path, engine, options, metrics).await
        } else {
            let superblock = Superblock::decode(&block)?;
            Self::load(path, engine, superblock, metrics).await
        }
    }

    async fn format(
        path: &Path,
        engine: IoEngine,
        options: &PoolOptions,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Pool>, PoolError> {
        let size = device_size(path)?;
        let layout = Layout::for_device(size / BLOCK_SIZE_U64)?;
        if options.overcommit_percent < 100 {
            return Err(PoolError::Invalid(
                "overcommit must be at least 100 percent".into(),
            ));
        }
        let superblock = Superblock {
            uuid: *uuid::Uuid::new_v4().as_bytes(),
            name: options.name.clone(),
            layout,
            overcommit_percent: options.overcommit_percent,
            format_version: format::FORMAT_VERSION,
        };
        if options.preallocate && !std::fs::metadata(path)?.file_type().is_block_device() {
            preallocate(&engine, layout.total_blocks).await?;
        }
        // Empty checkpoint first, superblock last: a crash in between leaves
        // block 0 zero, and the next open formats again.
        let empty = Checkpoint {
            generation: 1,
            journal_seq: 0,
            next_volume_id: 1,
            volumes: Vec::new(),
            snapshots: Vec::new(),
            open_regions: Vec::new(),
        };
        write_bytes(&engine, layout.checkpoint_start[1], &empty.encode()).await?;
        // Zero the journal's first block so no stale batch can follow.
        write_bytes(&engine, layout.journal_start, &[0u8; BLOCK_SIZE]).await?;
        engine.sync_data().await?;
        write_bytes(&engine, 0, &superblock.encode()).await?;
        engine.sync_data().await?;
        tracing::info!(path = %path.display(), data_bytes = layout.data_blocks * BLOCK_SIZE_U64, "formatted pool");
        Self::load(path, engine, superblock, metrics).await
    }

    async fn load(
        path: &Path,
        engine: IoEngine,
        superblock: Superblock,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Pool>, PoolError> {
        let layout = superblock.layout;
        let actual = device_size(path)? / BLOCK_SIZE_U64;
        if actual < layout.total_blocks {
            return Err(PoolError::Corrupt(format!(
                "device has {actual} blocks but the pool was made for {}",
                layout.total_blocks
            )));
        }
        let checkpoint = read_newest_checkpoint(&engine, &layout).await?;
        let mut volumes: HashMap<u64, VolumeState> = HashMap::new();
        for v in &checkpoint.volumes {
            volumes.insert(
                v.id,
                VolumeState {
                    name: v.name.clone(),
                    size: Arc::new(AtomicU64::new(v.size)),
                    created_unix: v.created_unix,
                    map: map_of(v),
                    ranges: RangeLock::new(),
                },
            );
        }
        let snapshots: HashMap<u64, SnapshotState> = checkpoint
            .snapshots
            .iter()
            .map(|s| (s.image.id, SnapshotState::from_record(s, map_of(&s.image))))
            .collect();
        let mut open_regions: BTreeSet<u32> = checkpoint.open_regions.iter().copied().collect();
        let journal_seq = replay_journal(
            &engine,
            &layout,
            checkpoint.journal_seq,
            &mut volumes,
            &mut open_regions,
        )
        .await?;

        // Every map's reference to a block counts; shared blocks get several.
        let mut allocator = Allocator::new(layout.data_start, layout.data_blocks);
        let maps = volumes
            .iter()
            .map(|(id, v)| (*id, &v.name, &v.map))
            .chain(snapshots.iter().map(|(id, s)| (*id, &s.name, &s.map)));
        for (id, name, map) in maps {
            for (lba, entry) in map.iter() {
                if !allocator.mark_used(entry.pba as u64) {
                    return Err(PoolError::Corrupt(format!(
                        "{name:?} (id {id}) block {lba} points at block {}, which is outside the data area",
                        entry.pba
                    )));
                }
            }
        }
        if !open_regions.is_empty() {
            adopt_in_place_writes(&engine, &open_regions, &mut volumes, &allocator).await?;
        }
        let mut superblock = superblock;
        if superblock.format_version < format::FORMAT_VERSION {
            // Before the first new-format checkpoint, so an older build sees
            // the version and refuses the pool rather than misread it.
            superblock.format_version = format::FORMAT_VERSION;
            write_bytes(&engine, 0, &superblock.encode()).await?;
            engine.sync_data().await?;
            tracing::info!(path = %path.display(), version = format::FORMAT_VERSION, "upgraded pool format");
        }
        let allocator = Arc::new(Mutex::new(allocator));
        let reserve_blocks = (layout.data_blocks / 100).clamp(64, layout.data_blocks / 4);
        let pool = Arc::new(Pool {
            path: path.to_path_buf(),
            engine,
            state: Mutex::new(State {
                volumes,
                snapshots,
                next_volume_id: checkpoint.next_volume_id,
                pending_records: Vec::new(),
                pending_frees: Vec::new(),
                data_dirty: false,
                regions: OpenRegions::default(),
            }),
            commit: tokio::sync::Mutex::new(CommitState {
                journal_seq,
                journal_pos: 0,
                checkpoint_generation: checkpoint.generation,
                checkpoint_needed: false,
            }),
            epochs: Epochs::new(allocator.clone()),
            allocator,
            snapshot_gate: tokio::sync::RwLock::new(()),
            reserve_blocks,
            superblock,
            metrics,
            checksum_failures: AtomicU64::new(0),
        });
        // Fold the replayed journal (and the checksums of in-place writes
        // adopted above) into a fresh checkpoint with no region open, so the
        // journal starts empty.
        pool.checkpoint().await?;
        tracing::info!(
            path = %path.display(),
            engine = pool.engine.name(),
            volumes = pool.state.lock().expect("state lock").volumes.len(),
            "opened pool"
        );
        Ok(pool)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn name(&self) -> &str {
        &self.superblock.name
    }

    pub fn uuid(&self) -> uuid::Uuid {
        uuid::Uuid::from_bytes(self.superblock.uuid)
    }

    /// A buffer for data to be written to this pool's device, which a write
    /// takes as it is once filled and shared (see `BlockTarget::write_buffer`).
    pub fn write_buffer(&self, len: usize) -> crate::engine::AlignedBuf {
        self.engine.write_buffer(len)
    }

    pub fn engine_name(&self) -> &'static str {
        self.engine.name()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Checksum mismatches seen since the pool was opened.
    pub fn checksum_failures(&self) -> u64 {
        self.checksum_failures.load(Ordering::Relaxed)
    }

    pub fn usage(&self) -> PoolUsage {
        let layout = &self.superblock.layout;
        let capacity = layout.data_blocks * BLOCK_SIZE_U64;
        let free = self.allocator.lock().expect("allocator lock").free_blocks() * BLOCK_SIZE_U64;
        let provisioned = self.provisioned_bytes();
        PoolUsage {
            capacity,
            used: capacity - free,
            free,
            provisioned,
            provisionable: capacity * self.superblock.overcommit_percent as u64 / 100,
        }
    }

    fn provisioned_bytes(&self) -> u64 {
        let state = self.state.lock().expect("state lock");
        state
            .volumes
            .values()
            .map(|v| v.size.load(Ordering::Relaxed))
            .sum()
    }

    pub fn list_volumes(&self) -> Vec<VolumeInfo> {
        let state = self.state.lock().expect("state lock");
        let mut out: Vec<VolumeInfo> = state
            .volumes
            .iter()
            .map(|(id, v)| volume_info(*id, v))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    pub fn volume_info(&self, name: &str) -> Option<VolumeInfo> {
        let state = self.state.lock().expect("state lock");
        state
            .volumes
            .iter()
            .find(|(_, v)| v.name == name)
            .map(|(id, v)| volume_info(*id, v))
    }

    /// A handle for I/O on the named volume.
    pub fn volume(self: &Arc<Self>, name: &str) -> Option<Volume> {
        let state = self.state.lock().expect("state lock");
        let (id, v) = state.volumes.iter().find(|(_, v)| v.name == name)?;
        Some(Volume::new(
            self.clone(),
            *id,
            v.name.clone(),
            v.size.clone(),
            v.ranges.clone(),
        ))
    }

    /// Creates a volume of `size` bytes (rounded up to the block size). No space
    /// is allocated until it is written.
    pub async fn create_volume(&self, name: &str, size: u64) -> Result<VolumeInfo, PoolError> {
        validate_volume_name(name)?;
        self.create_internal_volume(name, size).await
    }

    /// Creates a volume for Strata's own use (a replica of a replicated
    /// volume, say) under a name users cannot pick: one with a ':'
    /// ([`is_internal_volume_name`]), so it is never exported directly.
    pub async fn create_internal_volume(
        &self,
        name: &str,
        size: u64,
    ) -> Result<VolumeInfo, PoolError> {
        if name.is_empty() || name.len() > MAX_VOLUME_NAME + 16 {
            return Err(PoolError::Invalid(format!("invalid volume name {name:?}")));
        }
        if size == 0 {
            return Err(PoolError::Invalid(
                "volume size must be greater than zero".into(),
            ));
        }
        let size = size
            .checked_next_multiple_of(BLOCK_SIZE_U64)
            .ok_or_else(|| PoolError::Invalid("volume size is too large".into()))?;
        let info = {
            let mut state = self.state.lock().expect("state lock");
            if state.volumes.values().any(|v| v.name == name) {
                return Err(PoolError::AlreadyExists(name.to_string()));
            }
            self.check_provisionable(&state, size)?;
            let id = state.next_volume_id;
            state.next_volume_id += 1;
            let volume = VolumeState {
                name: name.to_string(),
                size: Arc::new(AtomicU64::new(size)),
                created_unix: now_unix(),
                map: BlockMap::default(),
                ranges: RangeLock::new(),
            };
            let info = volume_info(id, &volume);
            state.volumes.insert(id, volume);
            info
        };
        if let Err(err) = self.checkpoint().await {
            self.forget_volume(info.id);
            return Err(err);
        }
        tracing::info!(volume = name, size, "created volume");
        Ok(info)
    }

    /// Deletes a volume and returns its space to the pool (the blocks no
    /// snapshot or clone shares).
    pub async fn delete_volume(&self, name: &str) -> Result<(), PoolError> {
        // Held from the removal on, so no journal commit in between hands the
        // blocks out again while the durable checkpoint still has the volume.
        let mut commit = self.commit.lock().await;
        let (id, volume, records) = {
            let mut state = self.state.lock().expect("state lock");
            let id = state
                .volumes
                .iter()
                .find(|(_, v)| v.name == name)
                .map(|(id, _)| *id)
                .ok_or_else(|| PoolError::NotFound(name.to_string()))?;
            let volume = state.volumes.remove(&id).expect("volume present");
            let (records, others) = std::mem::take(&mut state.pending_records)
                .into_iter()
                .partition(|r| r.volume_id == id);
            state.pending_records = others;
            (id, volume, records)
        };
        // Frees become real once the checkpoint without this volume is durable.
        let frees = volume.map.iter().map(|(_, e)| e.pba).collect();
        if let Err(err) = self.checkpoint_locked(&mut commit, frees, &[]).await {
            // The durable state may still have the volume: it stays, blocks
            // and all, and the delete can be tried again.
            let mut state = self.state.lock().expect("state lock");
            state.volumes.insert(id, volume);
            state.pending_records.extend(records);
            return Err(err);
        }
        tracing::info!(volume = name, "deleted volume");
        Ok(())
    }

    /// Removes a volume whose creation failed from memory; its blocks go with
    /// the next commit.
    fn forget_volume(&self, id: u64) {
        let mut state = self.state.lock().expect("state lock");
        if let Some(volume) = state.volumes.remove(&id) {
            state.pending_records.retain(|r| r.volume_id != id);
            state
                .pending_frees
                .extend(volume.map.iter().map(|(_, e)| e.pba));
        }
    }

    /// Grows a volume to `size` bytes. Shrinking is refused: it would drop data.
    pub async fn resize_volume(&self, name: &str, size: u64) -> Result<VolumeInfo, PoolError> {
        let size = size
            .checked_next_multiple_of(BLOCK_SIZE_U64)
            .ok_or_else(|| PoolError::Invalid("volume size is too large".into()))?;
        // Held from the new size on: a write past the old end may be made at
        // once, and a journal batch mapping it must not be durable before a
        // checkpoint with the new size is (replay would find it out of range).
        let mut commit = self.commit.lock().await;
        let info = {
            let state = self.state.lock().expect("state lock");
            let (id, volume) = state
                .volumes
                .iter()
                .find(|(_, v)| v.name == name)
                .ok_or_else(|| PoolError::NotFound(name.to_string()))?;
            let current = volume.size.load(Ordering::Relaxed);
            if size < current {
                return Err(PoolError::Invalid(format!(
                    "volume {name:?} is {}; shrinking to {} is not supported",
                    human(current),
                    human(size)
                )));
            }
            self.check_provisionable(&state, size - current)?;
            volume.size.store(size, Ordering::Relaxed);
            volume_info(*id, volume)
        };
        // On failure the new size stays in memory (writes may already use
        // it) and the next commit, a checkpoint then, makes it durable.
        self.checkpoint_locked(&mut commit, Vec::new(), &[]).await?;
        tracing::info!(volume = name, size, "resized volume");
        Ok(info)
    }

    fn check_provisionable(&self, state: &State, extra: u64) -> Result<(), PoolError> {
        let layout = &self.superblock.layout;
        let limit =
            layout.data_blocks * BLOCK_SIZE_U64 * self.superblock.overcommit_percent as u64 / 100;
        let provisioned: u64 = state
            .volumes
            .values()
            .map(|v| v.size.load(Ordering::Relaxed))
            .sum();
        if provisioned.saturating_add(extra) > limit {
            return Err(PoolError::NoSpace(format!(
                "{} more would provision {} of the {} this pool allows ({}% of {} of data space)",
                human(extra),
                human(provisioned.saturating_add(extra)),
                human(limit),
                self.superblock.overcommit_percent,
                human(layout.data_blocks * BLOCK_SIZE_U64)
            )));
        }
        Ok(())
    }

    /// The failures a test injects (a pool on the pread/pwrite engine).
    #[cfg(test)]
    pub(crate) fn faults(&self) -> &crate::engine::sync::Faults {
        self.engine.faults()
    }

    /// Makes every write that completed before this call durable.
    pub async fn commit(&self) -> Result<(), PoolError> {
        let mut commit = self.commit.lock().await;
        self.commit_locked(&mut commit, &[], regions::IDLE_CLOSE)
            .await
    }

    /// Commits, and closes every overwrite region with no write in flight, so
    /// the next open needs no scan (see `format`). For a clean stop.
    pub async fn close(&self) -> Result<(), PoolError> {
        let mut commit = self.commit.lock().await;
        self.commit_locked(&mut commit, &[], Duration::ZERO).await
    }

    /// Makes the opening of overwrite regions durable (those of `wanted` that
    /// fit, see [`OpenRegions::make_room`]), with everything pending.
    async fn open_regions(&self, wanted: &[u32]) -> Result<(), PoolError> {
        let mut commit = self.commit.lock().await;
        self.commit_locked(&mut commit, wanted, regions::IDLE_CLOSE)
            .await
    }

    /// One journal batch with every pending map change, closing the regions
    /// idle for `close_idle` and opening those of `open` that fit.
    async fn commit_locked(
        &self,
        commit: &mut CommitState,
        open: &[u32],
        close_idle: Duration,
    ) -> Result<(), PoolError> {
        if commit.checkpoint_needed {
            // No region opens here: writes that wanted one go copy-on-write.
            return self.checkpoint_locked(commit, Vec::new(), &[]).await;
        }
        let (taken, dirty, opening, closing) = {
            let mut state = self.state.lock().expect("state lock");
            // Closed here, under the lock that in-place writes start under:
            // every write into these regions has its record in this batch.
            let (opening, mut closing) = state.regions.make_room(open);
            closing.extend(state.regions.take_idle(close_idle));
            (
                TakenChanges::take(self, &mut state),
                std::mem::replace(&mut state.data_dirty, false),
                opening,
                closing,
            )
        };
        if taken.is_empty() && !dirty && opening.is_empty() && closing.is_empty() {
            taken.durable();
            return Ok(());
        }
        // From here an error, or the caller dropping this future, leaves
        // every change pending (`TakenChanges`). The regions taken for
        // closing stay open on disk (they are only left out of memory, which
        // costs a scan at most); the ones opening stay closed.
        // Data first: a journal batch must never point at data that is not on disk.
        if dirty {
            self.engine.sync_data().await?;
        }
        let layout = &self.superblock.layout;
        let region_records: Vec<JournalRecord> = closing
            .iter()
            .map(|r| JournalRecord::region(*r, false))
            .chain(opening.iter().map(|r| JournalRecord::region(*r, true)))
            .collect();
        let count = taken.records.len() + region_records.len();
        if count > 0 {
            let blocks = format::journal_batch_blocks(count);
            if commit.journal_pos + blocks > layout.journal_blocks {
                // The journal is full: a checkpoint holds these changes too.
                // They go back to pending, where the checkpoint takes them
                // (and puts them back if it fails).
                drop(taken);
                return self.checkpoint_locked(commit, Vec::new(), &opening).await;
            }
            let seq = commit.journal_seq + 1;
            let mut batch_records = taken.records.clone();
            batch_records.extend(region_records);
            let batch = format::encode_journal_batch(seq, &batch_records);
            let res = write_bytes(
                &self.engine,
                layout.journal_start + commit.journal_pos,
                &batch,
            )
            .await;
            let res = match res {
                Ok(()) => self.engine.sync_data().await,
                Err(err) => Err(err),
            };
            // On an error the batch may be half on disk. The map changes
            // stay pending; the next commit writes them at the same place
            // under the same sequence number, replacing whatever part of
            // this one landed.
            res?;
            commit.journal_seq = seq;
            commit.journal_pos += blocks;
        }
        let frees = taken.durable();
        self.state
            .lock()
            .expect("state lock")
            .regions
            .mark_open(&opening);
        self.epochs.release_after_readers(frees);
        Ok(())
    }

    fn requeue(&self, records: Vec<JournalRecord>, frees: Vec<u32>) {
        let mut state = self.state.lock().expect("state lock");
        let newer = std::mem::replace(&mut state.pending_records, records);
        state.pending_records.extend(newer);
        state.pending_frees.extend(frees);
        state.data_dirty = true;
    }

    /// Writes the full metadata to the older checkpoint slot and empties the journal.
    pub async fn checkpoint(&self) -> Result<(), PoolError> {
        let mut commit = self.commit.lock().await;
        self.checkpoint_locked(&mut commit, Vec::new(), &[]).await
    }

    /// A checkpoint whose open regions are those open now and `opening`
    /// (marked open in memory once the checkpoint is durable). `frees` are
    /// released once it is durable, and dropped if it fails: they are blocks
    /// of something the caller removed and puts back on failure.
    async fn checkpoint_locked(
        &self,
        commit: &mut CommitState,
        mut frees: Vec<u32>,
        opening: &[u32],
    ) -> Result<(), PoolError> {
        let layout = &self.superblock.layout;
        // Until this checkpoint is durable, whatever ends it (an error, the
        // caller dropping this future) leaves the next commit a checkpoint
        // too: a resize or a creation kept in memory is made durable by a
        // checkpoint only, never by a journal batch.
        commit.checkpoint_needed = true;
        let generation = commit.checkpoint_generation + 1;
        // A checkpoint uses up a sequence number. A commit that failed or was
        // dropped may have left its batch at the journal's start under the
        // next number; replay after this checkpoint must not take it for a
        // later change (its records are older than the checkpoint).
        let journal_seq = commit.journal_seq + 1;
        let (encoded, taken) = {
            let mut state = self.state.lock().expect("state lock");
            let mut volumes: Vec<VolumeRecord> = state
                .volumes
                .iter()
                .map(|(id, v)| VolumeRecord {
                    id: *id,
                    name: v.name.clone(),
                    size: v.size.load(Ordering::Relaxed),
                    created_unix: v.created_unix,
                    blocks: v.map.iter().collect(),
                })
                .collect();
            volumes.sort_by_key(|v| v.id);
            let mut snapshots: Vec<SnapshotRecord> = state
                .snapshots
                .iter()
                .map(|(id, s)| s.record(*id))
                .collect();
            snapshots.sort_by_key(|s| s.image.id);
            state.regions.take_idle(regions::IDLE_CLOSE);
            let mut open_regions = state.regions.ids();
            open_regions.extend_from_slice(opening);
            open_regions.sort_unstable();
            open_regions.dedup();
            let checkpoint = Checkpoint {
                generation,
                journal_seq,
                next_volume_id: state.next_volume_id,
                volumes,
                snapshots,
                open_regions,
            };
            // The snapshot includes every pending change, so they need no batch.
            state.data_dirty = false;
            (checkpoint.encode(), TakenChanges::take(self, &mut state))
        };
        if encoded.len() as u64 > layout.checkpoint_blocks * BLOCK_SIZE_U64 {
            return Err(PoolError::Corrupt(
                "metadata no longer fits a checkpoint slot".into(),
            ));
        }
        // A checkpoint cut off while writing may leave part of itself in the
        // slot. The retry (checkpoint_needed, set above) goes to the same
        // slot under the same generation, and no journal batch is written
        // before it: replay would not find one written at the old journal
        // position after this checkpoint.
        let slot = (generation % 2) as usize;
        // Data covered by the snapshot must be durable before the snapshot is.
        self.engine.sync_data().await?;
        write_bytes(&self.engine, layout.checkpoint_start[slot], &encoded).await?;
        self.engine.sync_data().await?;
        frees.extend(taken.durable());
        commit.checkpoint_generation = generation;
        commit.journal_seq = journal_seq;
        commit.journal_pos = 0;
        commit.checkpoint_needed = false;
        self.state
            .lock()
            .expect("state lock")
            .regions
            .mark_open(opening);
        self.epochs.release_after_readers(frees);
        Ok(())
    }
}

/// The map changes and frees a commit or checkpoint took from pending. They
/// go back to pending unless the commit marks them durable: on an error, and
/// also when the commit's future is dropped halfway (a client that goes away
/// in the middle of a FLUSH, a runtime that stops). Lost instead, a later
/// commit would close their overwrite regions as if their checksums were
/// recorded, and the blocks would fail them after the next open.
struct TakenChanges<'a> {
    pool: &'a Pool,
    records: Vec<JournalRecord>,
    frees: Vec<u32>,
    durable: bool,
}

impl<'a> TakenChanges<'a> {
    fn take(pool: &'a Pool, state: &mut State) -> Self {
        TakenChanges {
            pool,
            records: std::mem::take(&mut state.pending_records),
            frees: std::mem::take(&mut state.pending_frees),
            durable: false,
        }
    }

    fn is_empty(&self) -> bool {
        self.records.is_empty() && self.frees.is_empty()
    }

    /// The changes are durable: the frees, to release.
    fn durable(mut self) -> Vec<u32> {
        self.durable = true;
        std::mem::take(&mut self.frees)
    }
}

impl Drop for TakenChanges<'_> {
    fn drop(&mut self) {
        if !self.durable {
            self.pool.requeue(
                std::mem::take(&mut self.records),
                std::mem::take(&mut self.frees),
            );
        }
    }
}

/// Sizes in messages, as people read them: 1 GiB, 512 MiB, 1.5 GiB.
pub fn human(bytes: u64) -> String {
    let text = bytesize::ByteSize(bytes).display().iec().to_string();
    text.replace(".0 ", " ")
}

fn volume_info(id: u64, v: &VolumeState) -> VolumeInfo {
    VolumeInfo {
        id,
        name: v.name.clone(),
        size: v.size.load(Ordering::Relaxed),
        allocated: v.map.mapped_blocks() * BLOCK_SIZE_U64,
        created_unix: v.created_unix,
    }
}

fn map_of(record: &VolumeRecord) -> BlockMap {
    let mut map = BlockMap::default();
    for (lba, entry) in &record.blocks {
        map.set(*lba, *entry);
    }
    map
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether `name` is one of Strata's own volumes, which users do not see.
pub fn is_internal_volume_name(name: &str) -> bool {
    name.contains(':')
}

/// Volume names are export names and file names in tools: keep them plain.
pub fn validate_volume_name(name: &str) -> Result<(), PoolError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_VOLUME_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(PoolError::Invalid(format!(
            "invalid volume name {name:?}: use 1 to {MAX_VOLUME_NAME} letters, digits, '-', '_' or '.', not starting with '-' or '.'"
        )))
    }
}

/// Writes zeroes over the whole device, several slices in flight at once.
async fn preallocate(engine: &IoEngine, total_blocks: u64) -> io::Result<()> {
    const SLICE_BLOCKS: u64 = 2048; // 8 MiB
    const IN_FLIGHT: usize = 8;
    let started = std::time::Instant::now();
    let slices: Vec<u64> = (0..total_blocks).step_by(SLICE_BLOCKS as usize).collect();
    for batch in slices.chunks(IN_FLIGHT) {
        let writes = batch.iter().map(|&first| {
            let blocks = SLICE_BLOCKS.min(total_blocks - first);
            engine.write_at(
                engine.buffer((blocks * BLOCK_SIZE_U64) as usize),
                first * BLOCK_SIZE_U64,
            )
        });
        for res in futures::future::join_all(writes).await {
            res?;
        }
    }
    engine.sync_data().await?;
    tracing::info!(
        bytes = total_blocks * BLOCK_SIZE_U64,
        seconds = started.elapsed().as_secs_f64(),
        "preallocated the pool file"
    );
    Ok(())
}

async fn write_bytes(engine: &IoEngine, block: u64, bytes: &[u8]) -> io::Result<()> {
    debug_assert_eq!(bytes.len() % BLOCK_SIZE, 0);
    // Large metadata goes out in slices so no single buffer is huge.
    const SLICE: usize = 4 << 20;
    for (i, chunk) in bytes.chunks(SLICE).enumerate() {
        let mut buf = engine.buffer(chunk.len());
        buf.copy_from_slice(chunk);
        let offset = block * BLOCK_SIZE_U64 + (i * SLICE) as u64;
        engine.write_at(buf, offset).await?;
    }
    Ok(())
}

async fn read_bytes(engine: &IoEngine, block: u64, len: usize) -> io::Result<Vec<u8>> {
    const SLICE: usize = 4 << 20;
    let mut out = Vec::with_capacity(len);
    let mut done = 0;
    while done < len {
        let n = SLICE.min(len - done);
        let (buf, res) = engine
            .read_at(engine.buffer(n), block * BLOCK_SIZE_U64 + done as u64)
            .await;
        res?;
        out.extend_from_slice(&buf);
        done += n;
    }
    Ok(out)
}

async fn read_newest_checkpoint(
    engine: &IoEngine,
    layout: &Layout,
) -> Result<Checkpoint, PoolError> {
    let mut best: Option<Checkpoint> = None;
    let mut errors = Vec::new();
    for start in layout.checkpoint_start {
        let header = read_bytes(engine, start, BLOCK_SIZE).await?;
        let Some(payload) = Checkpoint::payload_len(&header) else {
            continue;
        };
        let total = BLOCK_SIZE_U64 + payload;
        if total > layout.checkpoint_blocks * BLOCK_SIZE_U64 {
            errors.push(format!(
                "slot at block {start}: payload length out of range"
            ));
            continue;
        }
        let bytes = read_bytes(
            engine,
            start,
            total.next_multiple_of(BLOCK_SIZE_U64) as usize,
        )
        .await?;
        match Checkpoint::decode(&bytes) {
            Ok(cp) if best.as_ref().is_none_or(|b| cp.generation > b.generation) => best = Some(cp),
            Ok(_) => {}
            Err(err) => errors.push(format!("slot at block {start}: {err}")),
        }
    }
    best.ok_or_else(|| {
        PoolError::Corrupt(format!(
            "no valid checkpoint in either slot ({})",
            errors.join("; ")
        ))
    })
}

/// Applies the unbroken run of complete batches after `after_seq` to the
/// volumes' maps and to the set of open overwrite regions; returns the
/// sequence number of the last batch applied.
async fn replay_journal(
    engine: &IoEngine,
    layout: &Layout,
    after_seq: u64,
    volumes: &mut HashMap<u64, VolumeState>,
    open_regions: &mut BTreeSet<u32>,
) -> Result<u64, PoolError> {
    let journal = read_bytes(
        engine,
        layout.journal_start,
        (layout.journal_blocks * BLOCK_SIZE_U64) as usize,
    )
    .await?;
    let blocks: Vec<&[u8]> = journal.chunks(BLOCK_SIZE).collect();
    let mut seq = after_seq;
    let mut pos = 0usize;
    let mut applied = 0u64;
    'batches: while pos < blocks.len() {
        let Some(first) = format::decode_journal_block(blocks[pos]) else {
            break;
        };
        if first.seq != seq + 1 || first.index != 0 {
            break;
        }
        let count = first.count as usize;
        if pos + count > blocks.len() {
            break;
        }
        let mut records = first.records;
        for (i, block) in blocks[pos + 1..pos + count].iter().enumerate() {
            match format::decode_journal_block(block) {
                Some(b)
                    if b.seq == seq + 1 && b.index as usize == i + 1 && b.count == first.count =>
                {
                    records.extend(b.records)
                }
                _ => break 'batches,
            }
        }
        for r in records {
            if let Some((region, open)) = r.as_region() {
                if open {
                    open_regions.insert(region);
                } else {
                    open_regions.remove(&region);
                }
                continue;
            }
            let Some(volume) = volumes.get_mut(&r.volume_id) else {
                continue; // deleted since; its checkpoint is newer than this record
            };
            let blocks_in_volume = volume.size.load(Ordering::Relaxed) / BLOCK_SIZE_U64;
            if r.lba >= blocks_in_volume {
                return Err(PoolError::Corrupt(format!(
                    "journal batch {} maps block {} past the end of volume {:?}",
                    seq + 1,
                    r.lba,
                    volume.name
                )));
            }
            volume.map.set(r.lba, r.entry);
            applied += 1;
        }
        seq += 1;
        pos += count;
    }
    if seq > after_seq {
        tracing::info!(
            batches = seq - after_seq,
            records = applied,
            "replayed journal"
        );
    }
    Ok(seq)
}

/// After an unclean stop: gives every mapped block in an open overwrite
/// region the CRC of the data it holds. Such a block may have been
/// overwritten in place after its CRC was last made durable, a write that was
/// never flushed (see `format`). Blocks a snapshot shares were never written
/// in place and keep their CRC.
async fn adopt_in_place_writes(
    engine: &IoEngine,
    open_regions: &BTreeSet<u32>,
    volumes: &mut HashMap<u64, VolumeState>,
    allocator: &Allocator,
) -> Result<(), PoolError> {
    let started = std::time::Instant::now();
    // (pba, volume, lba, crc), in device order so runs are read at once.
    let mut blocks: Vec<(u32, u64, u64, u32)> = volumes
        .iter()
        .flat_map(|(id, v)| {
            v.map
                .iter()
                .filter(|(_, e)| open_regions.contains(&format::region_of(e.pba)))
                .filter(|(_, e)| !allocator.is_shared(e.pba))
                .map(move |(lba, e)| (e.pba, *id, lba, e.crc))
        })
        .collect();
    blocks.sort_unstable();
    const RUN_BLOCKS: usize = 256;
    let mut adopted = 0u64;
    let mut i = 0;
    while i < blocks.len() {
        let mut end = i + 1;
        while end < blocks.len() && end - i < RUN_BLOCKS && blocks[end].0 == blocks[end - 1].0 + 1 {
            end += 1;
        }
        let (buf, res) = engine
            .read_at(
                engine.buffer((end - i) * BLOCK_SIZE),
                blocks[i].0 as u64 * BLOCK_SIZE_U64,
            )
            .await;
        res?;
        for (k, &(pba, volume_id, lba, crc)) in blocks[i..end].iter().enumerate() {
            let actual = format::data_crc(&buf[k * BLOCK_SIZE..(k + 1) * BLOCK_SIZE]);
            if actual != crc {
                let volume = volumes.get_mut(&volume_id).expect("listed above");
                volume.map.set(lba, format::BlockEntry { pba, crc: actual });
                adopted += 1;
            }
        }
        i = end;
    }
    tracing::warn!(
        regions = open_regions.len(),
        blocks_read = blocks.len(),
        blocks_newer = adopted,
        seconds = started.elapsed().as_secs_f64(),
        "the pool was not closed cleanly: checked the blocks of the regions that were open \
         for in-place writes, and recorded the checksum of each block that held a newer, \
         unflushed write"
    );
    Ok(())
}

#[cfg(test)]
mod tests;
