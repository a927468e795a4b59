//! I/O on one volume: the read and write paths of the pool.
//!
//! A written block is overwritten in place when it can be (mapped, shared
//! with no snapshot, in an open overwrite region: see `format`), so a volume
//! keeps the layout of its first writes and a sequential overwrite stays
//! sequential on the device. Otherwise it goes to a newly allocated block
//! (copy-on-write). Either way its CRC32 goes into the map once the data is on
//! the device. Reads check every block's CRC and fail with an I/O error on a
//! mismatch; bad data is never returned.
//!
//! A write holds its block range (the volume's range lock) from its plan to
//! its map update, so one block is never written by two writes at once, and a
//! read that meets a block being overwritten in place (data and CRC out of
//! step for a moment) reads it again under the range lock before it calls the
//! block bad.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use super::epoch::Epoch;
use super::format::{data_crc, region_of, BlockEntry, JournalRecord, BLOCK_SIZE, BLOCK_SIZE_U64};
use super::{Pool, PoolError};
use crate::engine::{is_aligned, AlignedBuf};
use crate::metrics::{IoLabels, VolumeLabels};
use crate::range_lock::{RangeGuard, RangeLock};
use crate::target::{BlockError, BlockResult, BlockTarget};

/// Unmapping is done in slices so one huge TRIM does not hold the map lock long.
const UNMAP_SLICE_BLOCKS: u64 = 16384;
/// Zeroes are written (for NO_HOLE) in slices of this many bytes.
const ZERO_SLICE_BYTES: u64 = 1 << 20;
/// A write commits when this many map changes (24 bytes each) are pending.
const MAX_PENDING_RECORDS: usize = 1 << 20;

/// A handle for I/O on one volume; cheap to create, one per NBD export lookup.
pub struct Volume {
    pool: Arc<Pool>,
    id: u64,
    name: Arc<str>,
    size: Arc<AtomicU64>,
    /// The volume's block ranges held by writes (shared by all its handles).
    pub(super) ranges: Arc<RangeLock>,
    metrics: VolumeMetrics,
}

struct OpMetrics {
    ops: Counter,
    errors: Counter,
    bytes: Counter,
    latency: Histogram,
}

struct VolumeMetrics {
    read: OpMetrics,
    write: OpMetrics,
    flush: OpMetrics,
    trim: OpMetrics,
    write_zeroes: OpMetrics,
    checksum_failures: Counter,
}

impl VolumeMetrics {
    fn new(pool: &Pool, volume: &str) -> Self {
        let m = pool.metrics();
        let op = |op: &'static str| {
            let labels = IoLabels {
                volume: volume.to_string(),
                op,
            };
            OpMetrics {
                ops: m.io_ops.get_or_create(&labels).clone(),
                errors: m.io_errors.get_or_create(&labels).clone(),
                bytes: m.io_bytes.get_or_create(&labels).clone(),
                latency: m.io_latency.get_or_create(&labels).clone(),
            }
        };
        VolumeMetrics {
            read: op("read"),
            write: op("write"),
            flush: op("flush"),
            trim: op("trim"),
            write_zeroes: op("write_zeroes"),
            checksum_failures: m
                .checksum_failures
                .get_or_create(&VolumeLabels {
                    volume: volume.to_string(),
                })
                .clone(),
        }
    }
}

impl OpMetrics {
    fn record<T>(&self, started: Instant, bytes: u64, result: &BlockResult<T>) {
        self.ops.inc();
        self.latency.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(_) => {
                self.bytes.inc_by(bytes);
            }
            Err(_) => {
                self.errors.inc();
            }
        }
    }
}

impl From<PoolError> for BlockError {
    fn from(err: PoolError) -> Self {
        match err {
            PoolError::NoSpace(_) => BlockError::NoSpace,
            PoolError::NotFound(_) => BlockError::Gone,
            other => BlockError::Io(other.to_string()),
        }
    }
}

impl Volume {
    pub(super) fn new(
        pool: Arc<Pool>,
        id: u64,
        name: String,
        size: Arc<AtomicU64>,
        ranges: Arc<RangeLock>,
    ) -> Self {
        let metrics = VolumeMetrics::new(&pool, &name);
        Volume {
            pool,
            id,
            name: name.into(),
            size,
            ranges,
            metrics,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn check_range(&self, offset: u64, len: u64) -> BlockResult<()> {
        let size = self.size.load(Ordering::Relaxed);
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(BlockError::OutOfRange { offset, len, size }),
        }
    }

    /// A 64-bit digest of each of `count` extents of `extent_bytes` from byte
    /// `start` (block-aligned), computed from the stored block CRCs without
    /// reading data. Blocks at or past `end` are left out. An unmapped block
    /// counts as a block of zeroes, so two copies that read the same have the
    /// same digest however their space is allocated.
    pub fn extent_digests(
        &self,
        start: u64,
        count: u64,
        extent_bytes: u64,
        end: u64,
    ) -> BlockResult<Vec<u64>> {
        static ZERO_BLOCK_CRC: std::sync::LazyLock<u32> =
            std::sync::LazyLock::new(|| data_crc(&[0u8; BLOCK_SIZE]));
        let extent_blocks = extent_bytes / BLOCK_SIZE_U64;
        let end_block = end.div_ceil(BLOCK_SIZE_U64);
        let mut digests = Vec::with_capacity(count as usize);
        // The map lock is taken per slice of extents, not for the whole walk.
        for slice_start in (0..count).step_by(64) {
            let state = self.pool.state.lock().expect("state lock");
            let volume = state.volumes.get(&self.id).ok_or(BlockError::Gone)?;
            for extent in slice_start..(slice_start + 64).min(count) {
                let first = start / BLOCK_SIZE_U64 + extent * extent_blocks;
                let mut low = crc32fast::Hasher::new();
                let mut high = crc32fast::Hasher::new_with_initial(0x9e37_79b9);
                for lba in first..(first + extent_blocks).min(end_block) {
                    let entry = volume.map.get(lba);
                    let crc = if entry.is_mapped() {
                        entry.crc
                    } else {
                        *ZERO_BLOCK_CRC
                    };
                    low.update(&crc.to_le_bytes());
                    high.update(&crc.to_le_bytes());
                }
                digests.push((u64::from(high.finalize()) << 32) | u64::from(low.finalize()));
            }
        }
        Ok(digests)
    }

    /// Reads `n` whole blocks from `first`, every mapped one checked against
    /// its CRC. `ranged`: the caller holds the range lock over these blocks.
    ///
    /// When every block is mapped and contiguous on disk (one run, as a
    /// small read's always is), the engine's buffer is the result: no
    /// zeroed buffer to copy it into. The caller then holds that buffer (an
    /// engine slot, when one was free) until it drops the data; the engine
    /// hands out plain memory while its slots are all taken.
    async fn read_blocks(&self, first: u64, n: u64, ranged: bool) -> BlockResult<Bytes> {
        let pool = &self.pool;
        // Pinned before the map lookup: the blocks we look up stay ours until
        // the I/O is done, even if they are overwritten meanwhile.
        let _epoch = pool.epochs.pin();
        let entries: Vec<BlockEntry> = {
            let state = pool.state.lock().expect("state lock");
            let volume = state.volumes.get(&self.id).ok_or(BlockError::Gone)?;
            (first..first + n).map(|lba| volume.map.get(lba)).collect()
        };
        let runs = mapped_runs(&entries);
        let reads = runs.iter().map(|&(start, len)| {
            let buf = pool.engine.read_buffer(len * BLOCK_SIZE);
            pool.engine
                .read_at(buf, entries[start].pba as u64 * BLOCK_SIZE_U64)
        });
        let results = futures::future::join_all(reads).await;
        let whole = matches!(runs[..], [(0, len)] if len as u64 == n);
        let mut out = if whole {
            Vec::new()
        } else {
            vec![0u8; n as usize * BLOCK_SIZE]
        };
        for (&(start, len), (mut buf, res)) in runs.iter().zip(results) {
            res.map_err(|e| BlockError::Io(format!("reading volume {}: {e}", self.name)))?;
            for i in 0..len {
                let block = &mut buf[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE];
                let lba = first + (start + i) as u64;
                if data_crc(block) == entries[start + i].crc {
                    continue;
                }
                // Perhaps an in-place write was under way; with the block's
                // range held, nothing is.
                if !ranged {
                    let _range = self.ranges.lock(lba, lba + 1).await;
                    let again = Box::pin(self.read_blocks(lba, 1, true)).await?;
                    block.copy_from_slice(&again);
                    continue;
                }
                let entry = entries[start + i];
                pool.checksum_failures.fetch_add(1, Ordering::Relaxed);
                self.metrics.checksum_failures.inc();
                tracing::error!(
                    volume = %self.name,
                    lba,
                    pba = entry.pba,
                    "data block checksum mismatch; returning an I/O error"
                );
                return Err(BlockError::Checksum(format!(
                    "volume {} block {lba}",
                    self.name
                )));
            }
            if whole {
                return Ok(Bytes::from_owner(buf));
            }
            out[start * BLOCK_SIZE..(start + len) * BLOCK_SIZE]
                .copy_from_slice(&buf[..len * BLOCK_SIZE]);
        }
        Ok(Bytes::from(out))
    }

    async fn write_impl(&self, offset: u64, data: &[u8], fua: bool) -> BlockResult<()> {
        let len = data.len() as u64;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let first = offset / BLOCK_SIZE_U64;
        let end = offset + len;
        let last = (end - 1) / BLOCK_SIZE_U64;
        let n = last - first + 1;
        let head_partial = offset % BLOCK_SIZE_U64 != 0;
        let tail_partial = end % BLOCK_SIZE_U64 != 0;
        // Held to the map update: a partial block is read, merged and written
        // whole, and two writers to one block must not both start from the
        // old data, nor overwrite it in place at once.
        let range = self.ranges.lock(first, first + n).await;
        // Every byte is overwritten below: by the old partial blocks, then the data.
        let mut buf = self.pool.engine.write_buffer(n as usize * BLOCK_SIZE);
        if head_partial {
            let old = self.read_blocks(first, 1, true).await?;
            buf[..BLOCK_SIZE].copy_from_slice(&old);
        }
        if tail_partial && !(head_partial && n == 1) {
            let old = self.read_blocks(last, 1, true).await?;
            buf[(n as usize - 1) * BLOCK_SIZE..].copy_from_slice(&old);
        }
        let at = (offset % BLOCK_SIZE_U64) as usize;
        buf[at..at + data.len()].copy_from_slice(data);
        self.write_whole_blocks(range, first, Bytes::from_owner(buf), fua)
            .await
    }

    /// A write of shared bytes: handed to the device as they are when they
    /// cover whole blocks from aligned memory (a client's payload read into a
    /// buffer of the engine's), copied into a buffer of the pool's otherwise.
    async fn write_shared_impl(&self, offset: u64, data: Bytes, fua: bool) -> BlockResult<()> {
        if data.is_empty() || offset % BLOCK_SIZE_U64 != 0 || !is_aligned(&data) {
            return self.write_impl(offset, &data, fua).await;
        }
        let len = data.len() as u64;
        self.check_range(offset, len)?;
        let first = offset / BLOCK_SIZE_U64;
        let range = self.ranges.lock(first, first + len / BLOCK_SIZE_U64).await;
        self.write_whole_blocks(range, first, data, fua).await
    }

    /// Writes whole blocks from `first`, whose range the caller holds, from
    /// aligned memory (the device writes it as it is).
    async fn write_whole_blocks(
        &self,
        range: RangeGuard,
        first: u64,
        data: Bytes,
        fua: bool,
    ) -> BlockResult<()> {
        // From here the write runs in a task of its own, holding the range:
        // once in-place I/O is submitted it lands whether or not the caller
        // waits, so the map update and the region bookkeeping must not be
        // skipped by a caller that gives up (a connection dropped, say).
        let writer = BlockWriter {
            pool: self.pool.clone(),
            id: self.id,
            name: self.name.clone(),
        };
        let pending = tokio::spawn(async move {
            let _range = range;
            writer.write_blocks(first, data).await
        })
        .await
        .map_err(|err| BlockError::Io(format!("write task of volume {}: {err}", self.name)))??;
        // FUA; or a client that never flushes, whose map changes would
        // otherwise pile up in memory without end (overwrites in place never
        // run short of space, which used to force a commit).
        if fua || pending >= MAX_PENDING_RECORDS {
            self.pool.commit().await?;
        }
        Ok(())
    }

    /// Unmaps the whole blocks [first, end) (the caller holds their range).
    fn unmap_blocks(&self, first: u64, end: u64) -> BlockResult<()> {
        let mut lba = first;
        while lba < end {
            let slice_end = (lba + UNMAP_SLICE_BLOCKS).min(end);
            let mut state = self.pool.state.lock().expect("state lock");
            let state = &mut *state;
            let volume = state.volumes.get_mut(&self.id).ok_or(BlockError::Gone)?;
            for l in lba..slice_end {
                let old = volume.map.set(l, BlockEntry::default());
                if old.is_mapped() {
                    state.pending_frees.push(old.pba);
                    state.pending_records.push(JournalRecord {
                        volume_id: self.id,
                        lba: l,
                        entry: BlockEntry::default(),
                    });
                }
            }
            lba = slice_end;
        }
        Ok(())
    }

    async fn trim_impl(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.check_range(offset, len)?;
        // Only whole blocks are discarded; TRIM is advisory for the partial ends.
        let first = offset.div_ceil(BLOCK_SIZE_U64);
        let end = (offset + len) / BLOCK_SIZE_U64;
        if first < end {
            let _range = self.ranges.lock(first, end).await;
            self.unmap_blocks(first, end)?;
        }
        Ok(())
    }

    async fn write_zeroes_impl(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        allocate: bool,
    ) -> BlockResult<()> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        if allocate {
            let mut at = offset;
            while at < end {
                let n = ZERO_SLICE_BYTES.min(end - at);
                self.write_impl(at, &vec![0u8; n as usize], false).await?;
                at += n;
            }
        } else {
            let first_full = offset.div_ceil(BLOCK_SIZE_U64);
            let end_full = end / BLOCK_SIZE_U64;
            if first_full >= end_full {
                self.write_impl(offset, &vec![0u8; len as usize], false)
                    .await?;
            } else {
                let head = first_full * BLOCK_SIZE_U64 - offset;
                if head > 0 {
                    self.write_impl(offset, &vec![0u8; head as usize], false)
                        .await?;
                }
                let tail = end - end_full * BLOCK_SIZE_U64;
                if tail > 0 {
                    self.write_impl(end_full * BLOCK_SIZE_U64, &vec![0u8; tail as usize], false)
                        .await?;
                }
                let _range = self.ranges.lock(first_full, end_full).await;
                self.unmap_blocks(first_full, end_full)?;
            }
        }
        if fua {
            self.pool.commit().await?;
        }
        Ok(())
    }
}

/// What a write task needs of its volume.
struct BlockWriter {
    pool: Arc<Pool>,
    id: u64,
    name: Arc<str>,
}

impl BlockWriter {
    /// Writes whole blocks from `first` (the caller holds their range): in
    /// place where [`BlockWriter::plan_write`] allows, to new blocks elsewhere, and
    /// points the map at them. Returns how many map changes are now pending.
    async fn write_blocks(&self, first: u64, buf: Bytes) -> BlockResult<usize> {
        let pool = &self.pool;
        let n = (buf.len() / BLOCK_SIZE) as u64;
        let crcs: Vec<u32> = buf.chunks(BLOCK_SIZE).map(data_crc).collect();
        // No snapshot shares a block between the plan and the map update.
        let _gate = pool.snapshot_gate.read().await;
        let mut plan = self.plan_write(first, n).await?;
        // Pinned after the plan, whose allocation may commit to free space
        // (frees this pin would hold back), and before the volume is checked:
        // if it is still there, the blocks written in place are not reused
        // before this write is done, even if it is deleted meanwhile.
        let epoch = pool.epochs.pin();
        if !pool
            .state
            .lock()
            .expect("state lock")
            .volumes
            .contains_key(&self.id)
        {
            pool.release_unused(&plan.new_blocks());
            return Err(BlockError::Gone);
        }
        plan.handed_to_device = true;
        if let Err(err) = self.write_runs(buf, &plan, &epoch).await {
            pool.release_unused(&plan.new_blocks());
            if let Err(read_err) = self.adopt_failed_in_place(first, &mut plan).await {
                // Its region stays open until the pool is next opened, whose
                // scan records what the block holds.
                tracing::warn!(volume = %self.name, error = %read_err,
                    "cannot read back blocks after a failed in-place write");
                plan.regions.clear();
            }
            return Err(BlockError::Io(format!(
                "writing volume {}: {err}",
                self.name
            )));
        }
        let entries = plan
            .pbas
            .iter()
            .zip(crcs)
            .enumerate()
            .map(|(i, (pba, crc))| (first + i as u64, BlockEntry { pba: *pba, crc }));
        match self.map_blocks(entries, &mut plan.regions) {
            Some(pending) => Ok(pending),
            None => {
                pool.release_unused(&plan.new_blocks());
                plan.end_regions();
                Err(BlockError::Gone)
            }
        }
    }

    /// Points the volume's map at `entries` (lba, new entry) with their
    /// journal records pending; a block that moved frees its old place once
    /// those are durable. Ends the write's in-place `regions`: with the records
    /// pending, a commit that closes them has every write into them. Returns
    /// how many map changes are pending, or None if the volume is gone.
    fn map_blocks(
        &self,
        entries: impl Iterator<Item = (u64, BlockEntry)>,
        regions: &mut Vec<u32>,
    ) -> Option<usize> {
        let mut guard = self.pool.state.lock().expect("state lock");
        let state = &mut *guard;
        let volume = state.volumes.get_mut(&self.id)?;
        for (lba, entry) in entries {
            let old = volume.map.set(lba, entry);
            if old.is_mapped() && old.pba != entry.pba {
                state.pending_frees.push(old.pba);
            }
            state.pending_records.push(JournalRecord {
                volume_id: self.id,
                lba,
                entry,
            });
        }
        state.data_dirty = true;
        state.regions.end(&std::mem::take(regions));
        Some(state.pending_records.len())
    }

    /// After a failed write, records the checksum of what each block written
    /// in place now holds (old, new or torn data, as a disk leaves it), as
    /// the scan after a crash would, and ends the write's regions. Done now,
    /// while the blocks are the volume's alone: a snapshot could share them
    /// before the next open, and that scan passes over shared blocks.
    async fn adopt_failed_in_place(
        &self,
        first: u64,
        plan: &mut WritePlan<'_>,
    ) -> std::io::Result<()> {
        let engine = &self.pool.engine;
        let mut adopted = Vec::new();
        for (i, (pba, in_place)) in plan.pbas.iter().zip(&plan.in_place).enumerate() {
            if *in_place {
                let (block, res) = engine
                    .read_at(engine.read_buffer(BLOCK_SIZE), *pba as u64 * BLOCK_SIZE_U64)
                    .await;
                res?;
                adopted.push((
                    first + i as u64,
                    BlockEntry {
                        pba: *pba,
                        crc: data_crc(&block),
                    },
                ));
            }
        }
        // A volume deleted meanwhile has nothing to record: its blocks are
        // no one's, whatever they hold.
        if self
            .map_blocks(adopted.into_iter(), &mut plan.regions)
            .is_none()
        {
            plan.end_regions();
        }
        Ok(())
    }

    /// Where each of blocks [first, first + n) goes. A mapped block no
    /// snapshot shares is written in place if its overwrite region is open;
    /// the regions not open are opened once (a journal sync) and blocks in
    /// any that did not fit go copy-on-write, as do unmapped and shared blocks.
    async fn plan_write(&self, first: u64, n: u64) -> BlockResult<WritePlan<'_>> {
        let pool = &self.pool;
        let mut opened = false;
        let (old, overwritable, regions) = loop {
            let closed = {
                let mut guard = pool.state.lock().expect("state lock");
                let state = &mut *guard;
                let volume = state.volumes.get(&self.id).ok_or(BlockError::Gone)?;
                let old: Vec<BlockEntry> =
                    (first..first + n).map(|lba| volume.map.get(lba)).collect();
                let overwritable: Vec<bool> = {
                    let allocator = pool.allocator.lock().expect("allocator lock");
                    old.iter()
                        .map(|e| e.is_mapped() && !allocator.is_shared(e.pba))
                        .collect()
                };
                let mut regions: Vec<u32> = old
                    .iter()
                    .zip(&overwritable)
                    .filter(|(_, o)| **o)
                    .map(|(e, _)| region_of(e.pba))
                    .collect();
                regions.sort_unstable();
                regions.dedup();
                let closed: Vec<u32> = regions
                    .iter()
                    .copied()
                    .filter(|r| !state.regions.is_open(*r))
                    .collect();
                if closed.is_empty() || opened {
                    regions.retain(|r| state.regions.is_open(*r));
                    state
                        .regions
                        .begin(&regions)
                        .expect("only open regions are kept");
                    break (old, overwritable, regions);
                }
                closed
            };
            pool.open_regions(&closed).await?;
            opened = true;
        };
        let in_place: Vec<bool> = old
            .iter()
            .zip(&overwritable)
            .map(|(e, o)| *o && regions.binary_search(&region_of(e.pba)).is_ok())
            .collect();
        let mut plan = WritePlan {
            pool,
            pbas: old.iter().map(|e| e.pba).collect(),
            in_place,
            regions,
            handed_to_device: false,
        };
        let elsewhere: Vec<BlockEntry> = old
            .iter()
            .zip(&plan.in_place)
            .filter(|(_, p)| !**p)
            .map(|(e, _)| *e)
            .collect();
        if !elsewhere.is_empty() {
            // On error the plan's drop ends its in-place writes.
            let mut new = pool.allocate_blocks(self.id, &elsewhere).await?.into_iter();
            for (pba, in_place) in plan.pbas.iter_mut().zip(&plan.in_place) {
                if !in_place {
                    *pba = new.next().expect("one new block per block not in place");
                }
            }
        }
        Ok(plan)
    }

    /// Writes `buf` to the blocks of `plan`, one device write per run of
    /// consecutive blocks, each from its part of `buf` (block-aligned slices
    /// of aligned memory). A run with blocks written in place carries the
    /// epoch pin `epoch` to the device: should this write's task be dropped
    /// (a stopping node), the device may still be writing those blocks, and
    /// were the volume deleted meanwhile they must not go to another write
    /// until it is done. (New blocks of a dropped plan are never released.)
    async fn write_runs(
        &self,
        buf: Bytes,
        plan: &WritePlan<'_>,
        epoch: &Arc<Epoch>,
    ) -> std::io::Result<()> {
        let engine = &self.pool.engine;
        let pbas = &plan.pbas;
        let entries: Vec<BlockEntry> = pbas
            .iter()
            .map(|p| BlockEntry { pba: *p, crc: 0 })
            .collect();
        let writes = mapped_runs(&entries).into_iter().map(|(start, len)| {
            let mut part = buf.slice(start * BLOCK_SIZE..(start + len) * BLOCK_SIZE);
            if plan.in_place[start..start + len].contains(&true) {
                part = Bytes::from_owner(PinnedUntilWritten {
                    data: part,
                    _epoch: epoch.clone(),
                });
            }
            engine.write_shared(part, pbas[start] as u64 * BLOCK_SIZE_U64)
        });
        for res in futures::future::join_all(writes).await {
            res?;
        }
        Ok(())
    }
}

/// Data on its way to blocks written in place, with the epoch pin that keeps
/// those blocks from being handed out again until the device is done with it.
struct PinnedUntilWritten {
    data: Bytes,
    _epoch: Arc<Epoch>,
}

impl AsRef<[u8]> for PinnedUntilWritten {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

/// Where one write's blocks go, from [`BlockWriter::plan_write`].
struct WritePlan<'a> {
    pool: &'a Pool,
    /// The physical block of each block written.
    pbas: Vec<u32>,
    /// Whether each is written in place (else it is newly allocated).
    in_place: Vec<bool>,
    /// The overwrite regions this write has in-place writes in flight in
    /// (ended by the map update; see `Drop` for a plan dropped before it).
    regions: Vec<u32>,
    /// Set as the data goes to the device: from then on it may land whatever
    /// becomes of this write's task.
    handed_to_device: bool,
}

impl WritePlan<'_> {
    /// Ends the in-place writes into the regions without a map update: only
    /// right when no map points at the blocks any more (a deleted volume).
    fn end_regions(&mut self) {
        let regions = std::mem::take(&mut self.regions);
        if !regions.is_empty() {
            let mut state = self.pool.state.lock().expect("state lock");
            state.regions.end(&regions);
        }
    }

    fn new_blocks(&self) -> Vec<u32> {
        self.pbas
            .iter()
            .zip(&self.in_place)
            .filter(|(_, p)| !**p)
            .map(|(pba, _)| *pba)
            .collect()
    }
}

/// A plan dropped before its map update: the write failed before any data
/// went to the device, or its task was dropped (the runtime it ran on shut
/// down, as a node's connection threads do when it stops).
impl Drop for WritePlan<'_> {
    fn drop(&mut self) {
        if self.regions.is_empty() {
            return;
        }
        if !self.handed_to_device {
            return self.end_regions();
        }
        // The blocks written in place may hold the new data while the map
        // has the old checksums. Ending the writes would let the next commit
        // close their regions as if every new checksum were recorded, and
        // the blocks would fail their checksums from then on. Left in
        // flight, the regions stay open on disk until the pool is next
        // opened, whose scan records what the blocks hold.
        tracing::warn!(
            regions = ?self.regions,
            "an in-place write was abandoned; its regions stay open until the pool is next opened"
        );
    }
}

/// Runs of consecutive mapped physical blocks, as (index, length).
fn mapped_runs(entries: &[BlockEntry]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < entries.len() {
        if !entries[i].is_mapped() {
            i += 1;
            continue;
        }
        let start = i;
        while i + 1 < entries.len()
            && entries[i + 1].is_mapped()
            && entries[i + 1].pba == entries[i].pba + 1
        {
            i += 1;
        }
        runs.push((start, i - start + 1));
        i += 1;
    }
    runs
}

impl Pool {
    /// New blocks for writing the blocks of a volume whose entries are `old`
    /// (one each). Writes that grow the pool's usage (to unmapped blocks, or
    /// over blocks a snapshot shares) must leave the overwrite reserve; when
    /// space is short, a commit may release blocks superseded by earlier writes.
    async fn allocate_blocks(&self, volume_id: u64, old: &[BlockEntry]) -> BlockResult<Vec<u32>> {
        let n = old.len() as u64;
        let new_entries = old.iter().filter(|e| !e.is_mapped()).count() as u64;
        for attempt in 0..3 {
            {
                let state = self.state.lock().expect("state lock");
                if !state.volumes.contains_key(&volume_id) {
                    return Err(BlockError::Gone);
                }
                if new_entries > 0 && self.check_metadata_room(&state, new_entries).is_err() {
                    return Err(BlockError::NoSpace);
                }
            }
            {
                let mut allocator = self.allocator.lock().expect("allocator lock");
                let grows = old
                    .iter()
                    .any(|e| !e.is_mapped() || allocator.is_shared(e.pba));
                let need = n + if grows { self.reserve_blocks } else { 0 };
                if allocator.free_blocks() >= need {
                    return Ok(allocator.allocate(n).expect("enough free blocks"));
                }
            }
            if attempt < 2 {
                self.commit().await?;
                tokio::task::yield_now().await;
            }
        }
        Err(BlockError::NoSpace)
    }

    /// Returns blocks that were allocated but never made part of a map.
    fn release_unused(&self, pbas: &[u32]) {
        let mut allocator = self.allocator.lock().expect("allocator lock");
        for pba in pbas {
            allocator.release(*pba);
        }
    }
}

impl BlockTarget for Volume {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    fn block_size(&self) -> u32 {
        BLOCK_SIZE as u32
    }

    async fn read(&self, offset: u64, len: u32) -> BlockResult<Bytes> {
        let started = Instant::now();
        let result = async {
            self.check_range(offset, len as u64)?;
            if len == 0 {
                return Ok(Bytes::new());
            }
            let first = offset / BLOCK_SIZE_U64;
            let last = (offset + len as u64 - 1) / BLOCK_SIZE_U64;
            let blocks = self.read_blocks(first, last - first + 1, false).await?;
            let at = (offset % BLOCK_SIZE_U64) as usize;
            Ok(blocks.slice(at..at + len as usize))
        }
        .await;
        self.metrics.read.record(started, len as u64, &result);
        result
    }

    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> BlockResult<()> {
        let started = Instant::now();
        let result = self.write_impl(offset, data, fua).await;
        self.metrics
            .write
            .record(started, data.len() as u64, &result);
        result
    }

    async fn write_owned(&self, offset: u64, data: Bytes, fua: bool) -> BlockResult<()> {
        let started = Instant::now();
        let len = data.len() as u64;
        let result = self.write_shared_impl(offset, data, fua).await;
        self.metrics.write.record(started, len, &result);
        result
    }

    fn write_buffer(&self, len: usize) -> Option<AlignedBuf> {
        Some(self.pool.write_buffer(len))
    }

    async fn flush(&self) -> BlockResult<()> {
        let started = Instant::now();
        let result = self.pool.commit().await.map_err(BlockError::from);
        self.metrics.flush.record(started, 0, &result);
        result
    }

    async fn trim(&self, offset: u64, len: u64) -> BlockResult<()> {
        let started = Instant::now();
        let result = self.trim_impl(offset, len).await;
        self.metrics.trim.record(started, len, &result);
        result
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        allocate: bool,
    ) -> BlockResult<()> {
        let started = Instant::now();
        let result = self.write_zeroes_impl(offset, len, fua, allocate).await;
        self.metrics.write_zeroes.record(started, len, &result);
        result
    }
}
