//! Catching replicas up while the volume serves I/O.
//!
//! Replicas are compared extent by extent through digests of the block CRCs
//! each pool keeps in memory (`Op::Digest`), so finding what differs reads no
//! data; only differing extents are copied. That one mechanism serves:
//!
//! * a replica that comes back after missing writes (delta rebuild: only the
//!   extents written while it was away, plus any it lost unflushed, differ);
//! * a new, empty replica (full rebuild; extents never written compare equal
//!   to its empty ones, so a thin volume copies only what it holds);
//! * opening a volume whose in-sync replicas may disagree about writes the
//!   previous target never acknowledged (it died with them in flight): before
//!   the new target serves anything, they are made identical.
//!
//! A rebuilding replica takes every write from the moment it joins, so an
//! extent copied once stays current; each copy holds the extent's range lock,
//! so no write to it interleaves. When all differing extents are copied and
//! flushed, the replica is added to the in-sync set by a configuration change
//! (both rounds, new epoch), like a shrink in reverse.

use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Answer, VolumeTarget};
use crate::replication::membership::{self, Config, ReplicaId};
use crate::replication::replica::{extent_count, StateRecord, EXTENT_BYTES};
use crate::replication::wire::{Op, Request, Status};
use crate::target::BlockResult;

/// Extents whose digests one request asks for.
const DIGEST_BATCH: u64 = 4096;
/// How often the target looks for replicas to catch up.
const REBUILD_POLL: Duration = Duration::from_secs(1);
/// The longest wait between attempts to rebuild a replica that failed.
const REBUILD_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Where `copy_extent` reads an extent.
#[derive(Debug, Clone, Copy)]
enum CopyFrom {
    /// This member: when opening, all in-sync replicas are made equal to one.
    Replica(usize),
    /// An in-sync replica, chosen once the extent is locked.
    InSync,
}

/// How far a replica's rebuild has come.
#[derive(Debug, Clone)]
pub struct RebuildProgress {
    /// Extents found different from the source (0 until compared).
    pub extents_total: u64,
    pub extents_copied: u64,
    pub bytes_copied: u64,
    pub started: Instant,
}

/// Watches the target's members and rebuilds, one at a time, those that are
/// reachable but not in sync. Ends when the target is closed or fenced.
pub(super) fn spawn_rebuilder(target: &Arc<VolumeTarget>) {
    let weak = Arc::downgrade(target);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(REBUILD_POLL).await;
            let Some(target) = weak.upgrade() else { return };
            if target.is_fenced() || target.is_closed() {
                return;
            }
            let config = target.current();
            if target
                .max_prepared
                .load(std::sync::atomic::Ordering::Acquire)
                > config.epoch
            {
                // A change failed (no majority then): finish one now, so an
                // idle volume is not left behind its replicas' promises.
                let _ = target.shrink(&BTreeSet::new()).await;
                continue;
            }
            // An in-sync replica found restarted (by any request, the read
            // lease's included) leaves the in-sync set even when no write
            // comes to fail on it; then it is rebuilt like any other.
            let restarted: BTreeSet<ReplicaId> = target
                .member_indexes(&config)
                .into_iter()
                .filter(|&index| target.restarted(index))
                .map(|index| ReplicaId(target.id_of(index)))
                .filter(|id| config.in_sync.contains(id))
                .collect();
            if !restarted.is_empty() {
                let _ = target.shrink(&restarted).await;
                continue;
            }
            for index in target.member_indexes(&config) {
                // After a failed rebuild, the member waits longer each time
                // (up to REBUILD_BACKOFF_MAX), so a replica that cannot take
                // the copy (a full pool, say) does not fill the log. The
                // wait is the slot's: a new member gets a fresh one.
                let slot = target.slot(index);
                let in_sync = config.in_sync.contains(&ReplicaId(slot.member.id));
                let waiting = {
                    let mut backoff = slot.rebuild_backoff.lock().expect("backoff lock");
                    if in_sync {
                        *backoff = None;
                    }
                    backoff.is_some_and(|(at, _)| Instant::now() < at)
                };
                if in_sync || waiting {
                    continue;
                }
                if let Err(err) = target.rebuild(index).await {
                    target.abort_rebuild(index, &err);
                    let mut backoff = slot.rebuild_backoff.lock().expect("backoff lock");
                    let wait = backoff.map_or(REBUILD_POLL, |(_, wait)| {
                        (wait * 2).min(REBUILD_BACKOFF_MAX)
                    });
                    *backoff = Some((Instant::now() + wait, wait));
                }
            }
        }
    });
}

impl VolumeTarget {
    pub(super) fn rebuilding_indexes(&self) -> Vec<usize> {
        self.rebuilding
            .lock()
            .expect("rebuild lock")
            .keys()
            .copied()
            .collect()
    }

    /// Each member being rebuilt: when its current attempt started and the
    /// bytes it has copied so far.
    pub(super) fn rebuild_attempts(&self) -> BTreeMap<usize, (Instant, u64)> {
        self.rebuilding
            .lock()
            .expect("rebuild lock")
            .iter()
            .map(|(&index, progress)| (index, (progress.started, progress.bytes_copied)))
            .collect()
    }

    fn still_rebuilding(&self, index: usize) -> bool {
        self.rebuilding
            .lock()
            .expect("rebuild lock")
            .contains_key(&index)
    }

    pub(super) fn abort_rebuild(&self, index: usize, reason: &str) {
        if self
            .rebuilding
            .lock()
            .expect("rebuild lock")
            .remove(&index)
            .is_some()
        {
            self.local
                .pool()
                .metrics()
                .rebuild_remaining_extents
                .get_or_create(&self.labels())
                .set(0);
            tracing::warn!(
                volume = %self.volume,
                node = %self.node_of(index),
                reason,
                "rebuild stopped"
            );
        }
    }

    fn update_progress(&self, index: usize, update: impl FnOnce(&mut RebuildProgress)) {
        if let Some(progress) = self
            .rebuilding
            .lock()
            .expect("rebuild lock")
            .get_mut(&index)
        {
            update(progress);
        }
    }

    /// Catches member `index` up and adds it to the in-sync set. Returns
    /// quietly when the replica is still unreachable.
    async fn rebuild(&self, index: usize) -> Result<(), String> {
        if self.connect(index, true).await.is_err() {
            return Ok(());
        }
        self.join_as_rebuilding(index).await?;
        let started = Instant::now();
        let diffs = {
            let _gate = self.settled_gate().await?;
            // Chosen under the gate: a replica that failed a write and was
            // shrunk out of the in-sync set while we waited lacks that write.
            let source = self.rebuild_source()?;
            let epoch = self.current().epoch;
            self.differing_extents(source, index, epoch).await?
        };
        tracing::info!(
            volume = %self.volume,
            node = %self.node_of(index),
            extents = diffs.len(),
            of = extent_count(self.size_now()),
            "rebuilding a replica"
        );
        self.update_progress(index, |p| p.extents_total = diffs.len() as u64);
        self.local
            .pool()
            .metrics()
            .rebuild_remaining_extents
            .get_or_create(&self.labels())
            .set(diffs.len() as i64);
        let mut copied_bytes = 0u64;
        for extent in diffs {
            if !self.still_rebuilding(index) {
                return Err("aborted".into());
            }
            if self.is_fenced() || self.is_closed() {
                return Err("target closed".into());
            }
            let copied = self.copy_extent(CopyFrom::InSync, index, extent).await?;
            copied_bytes += copied;
            self.update_progress(index, |p| {
                p.extents_copied += 1;
                p.bytes_copied = copied_bytes;
            });
            let metrics = self.local.pool().metrics();
            metrics
                .rebuild_copied_bytes
                .get_or_create(&self.labels())
                .inc_by(copied);
            metrics
                .rebuild_remaining_extents
                .get_or_create(&self.labels())
                .dec();
            self.throttle(started, copied_bytes).await;
        }
        self.grow(index).await?;
        tracing::info!(
            volume = %self.volume,
            node = %self.node_of(index),
            bytes = copied_bytes,
            elapsed = ?started.elapsed(),
            "replica rebuilt and back in sync"
        );
        Ok(())
    }

    pub(super) fn size_now(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    /// Sleeps as long as needed to keep a rebuild or scrub under its rate.
    pub(super) async fn throttle(&self, started: Instant, copied_bytes: u64) {
        let rate = self.options.rebuild_rate;
        if rate == 0 {
            return;
        }
        let due = Duration::from_secs_f64(copied_bytes as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }

    fn rebuild_source(&self) -> Result<usize, String> {
        self.read_order(&self.current())
            .first()
            .copied()
            .ok_or_else(|| "no in-sync replica to copy from".to_string())
    }

    /// Makes the replica take this target's epoch and config, and every
    /// write from now on. Holds the gate, so no write in flight misses it.
    async fn join_as_rebuilding(&self, index: usize) -> Result<(), String> {
        let _exclusive = self.gate.write().await;
        let config = self.current();
        // A replacement may have removed it since the rebuilder looked.
        self.check_member(&config, index)?;
        self.check_room(index, config.epoch).await?;
        let answer = self
            .send_one(index, Request::new(Op::Prepare, 0, config.epoch))
            .await;
        match answer {
            Answer::Done(_) => {}
            // Granted already (it answered our own prepare of this epoch).
            Answer::Refused(Status::Fenced, payload) => {
                let Ok(state) = serde_json::from_slice::<StateRecord>(payload.as_bytes()) else {
                    self.set_fenced();
                    return Err("a newer target owns the volume".into());
                };
                if state.promised_epoch > config.epoch {
                    if state.config.epoch > self.max_persisted.load(Ordering::Acquire) {
                        self.set_fenced();
                        return Err("a newer target owns the volume".into());
                    }
                    // A promise with no newer config behind it: a change of
                    // ours that failed, or a target that prepared while cut
                    // off from the majority (it never installed a config,
                    // and stops when it sees ours). The next round of the
                    // rebuilder makes a change above it first; that change
                    // stops this target if a newer one did install a config.
                    self.note_prepared(state.promised_epoch);
                    return Err(format!(
                        "the replica promised epoch {} with no newer config; changing epoch first",
                        state.promised_epoch
                    ));
                }
            }
            other => return Err(format!("prepare: {other:?}")),
        }
        match self.send_one(index, self.persist_request(&config)).await {
            Answer::Done(_) => {}
            other => return Err(format!("persist: {other:?}")),
        }
        self.rebuilding.lock().expect("rebuild lock").insert(
            index,
            RebuildProgress {
                extents_total: 0,
                extents_copied: 0,
                bytes_copied: 0,
                started: Instant::now(),
            },
        );
        Ok(())
    }

    /// Adds the caught-up replica to the in-sync set at a new epoch; if it
    /// is the successor of a member being moved, that member leaves.
    async fn grow(&self, index: usize) -> Result<(), String> {
        let _exclusive = self.gate.write().await;
        if !self.still_rebuilding(index) {
            return Err("aborted".into());
        }
        // With no request in flight, everything the replica took is made
        // durable; had it restarted since it joined, the flush's connection
        // would have found it and stopped the rebuild (see `connect`). What
        // it takes after this, until the change, is the change's own config.
        let epoch = self.current().epoch;
        self.expect_done(index, Request::new(Op::Flush, 0, epoch))
            .await?;
        if !self.still_rebuilding(index) {
            return Err("aborted: the replica restarted".into());
        }
        let current = self.current();
        self.check_member(&current, index)?;
        // The volume may have grown while the replica was being rebuilt.
        self.check_room(index, epoch).await?;
        let next = membership::plan_grow(&current, ReplicaId(self.id_of(index)));
        let left = current
            .moving
            .filter(|_| next.moving.is_none())
            .map(|moving| self.index_of(moving.leaving));
        self.commit_change(&current, next).await?;
        self.rebuilding.lock().expect("rebuild lock").remove(&index);
        if let Some(left) = left {
            self.abort_rebuild(left, "moved");
            self.retire(left);
            tracing::warn!(
                volume = %self.volume,
                left = %self.node_of(left),
                successor = %self.node_of(index),
                epoch = self.epoch(),
                "moved replica: its successor is in sync, and it left the volume"
            );
        }
        Ok(())
    }

    /// Both rounds of this target's own change from `current` to `next`, at
    /// an epoch above any it prepared; the caller holds the gate
    /// exclusively. Every member of both configs is asked; a quorum of each
    /// (`membership::change_quorum_reached`), and every replica `next` names
    /// in sync, must take the change.
    pub(super) async fn commit_change(&self, current: &Config, next: Config) -> Result<(), String> {
        let next = Config {
            epoch: next
                .epoch
                .max(self.max_prepared.load(std::sync::atomic::Ordering::Acquire) + 1),
            ..next
        };
        let all = self.change_indexes(current, &next);
        let Some(prepared) = self.prepare_own_change(&all, next.epoch).await else {
            return Err("a newer target owns the volume".into());
        };
        if !membership::change_quorum_reached(current, &next, &prepared) {
            return Err(format!(
                "only {} of the replicas took epoch {}; {} is needed",
                prepared.len(),
                next.epoch,
                current.change_rule(&next)
            ));
        }
        if !next.in_sync.iter().all(|id| prepared.contains(id)) {
            return Err(format!(
                "not every in-sync replica took epoch {}",
                next.epoch
            ));
        }
        match self.persist(current, &next).await {
            Ok(()) => {
                self.install(next);
                Ok(())
            }
            Err(super::PersistError::Fenced) => {
                self.set_fenced();
                Err("a newer target owns the volume".into())
            }
            Err(super::PersistError::NoQuorum(reason)) => Err(reason),
        }
    }

    fn check_member(&self, config: &Config, index: usize) -> Result<(), String> {
        if config.members.contains(&ReplicaId(self.id_of(index))) {
            Ok(())
        } else {
            Err("no longer a member (replaced)".into())
        }
    }

    /// Fails when the replica is smaller than the volume: a resize that
    /// failed on its node, or one made while it was away. In the in-sync
    /// set it would fail every write past its end and be dropped again; it
    /// waits, out of the set, for `strata volume resize` to grow it.
    async fn check_room(&self, index: usize, epoch: u64) -> Result<(), String> {
        let payload = self
            .expect_done(index, Request::new(Op::GetState, 0, epoch))
            .await?;
        let state: StateRecord = serde_json::from_slice(&payload)
            .map_err(|err| format!("replica on {}: bad state: {err}", self.node_of(index)))?;
        let size = self.size_now();
        if state.size < size {
            let err = format!(
                "the replica on {} holds {} bytes, less than the volume's {size}; \
                 `strata volume resize` grows it",
                self.node_of(index),
                state.size
            );
            tracing::warn!(volume = %self.volume, "cannot rebuild: {err}");
            return Err(err);
        }
        Ok(())
    }

    pub(super) async fn send_one(&self, index: usize, request: Request) -> Answer {
        self.ask(&[index], |_| request.clone())
            .await
            .remove(&index)
            .expect("one answer")
    }

    async fn expect_done(&self, index: usize, request: Request) -> Result<Bytes, String> {
        match self.send_one(index, request).await {
            Answer::Done(payload) => Ok(payload),
            other => Err(format!("replica on {}: {other:?}", self.node_of(index))),
        }
    }

    /// The extents where `dest` differs from `source`, by digest.
    async fn differing_extents(
        &self,
        source: usize,
        dest: usize,
        epoch: u64,
    ) -> Result<Vec<u64>, String> {
        let extents = extent_count(self.size_now());
        let mut diffs = Vec::new();
        let mut first = 0;
        while first < extents {
            let count = DIGEST_BATCH.min(extents - first);
            let ask = |index: usize| {
                let mut request = Request::new(Op::Digest, 0, epoch);
                request.offset = first;
                request.length = count;
                self.expect_done(index, request)
            };
            let (a, b) = tokio::join!(ask(source), ask(dest));
            let (a, b) = (a?, b?);
            if a.len() != b.len() || a.len() as u64 != count * 8 {
                return Err("replicas report different sizes".into());
            }
            for (i, (x, y)) in a.chunks(8).zip(b.chunks(8)).enumerate() {
                if x != y {
                    diffs.push(first + i as u64);
                }
            }
            first += count;
        }
        Ok(diffs)
    }

    /// The gate, shared, once no request that failed on an in-sync replica
    /// is still shrinking the in-sync set: until then a replica the config
    /// names in sync may lack a write that the others have. A shrink waits
    /// for replicas that do not answer up to the link timeout, twice; this
    /// waits as long as it takes.
    async fn settled_gate(&self) -> Result<tokio::sync::RwLockReadGuard<'_, ()>, String> {
        loop {
            let gate = self.gate.read().await;
            if self.unsettled.load(Ordering::Acquire) == 0 {
                return Ok(gate);
            }
            // The shrink needs the gate exclusively: let it go first.
            drop(gate);
            if self.is_fenced() || self.is_closed() {
                return Err("target closed".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Copies one extent to `dest` under its range lock; returns the bytes
    /// copied.
    async fn copy_extent(&self, from: CopyFrom, dest: usize, extent: u64) -> Result<u64, String> {
        let size = self.size_now();
        let start = extent * EXTENT_BYTES;
        let len = EXTENT_BYTES.min(size.saturating_sub(start));
        if len == 0 {
            return Ok(0);
        }
        let _range = self.ranges.lock(start, start + len).await;
        let _gate = self.gate.read().await;
        let source = match from {
            CopyFrom::Replica(index) => index,
            // Only now: a write to this extent that failed on a replica
            // held the range until its shrink took that replica out.
            CopyFrom::InSync => self.rebuild_source()?,
        };
        let epoch = self.current().epoch;
        let mut read = Request::new(Op::Read, 0, epoch);
        read.offset = start;
        read.length = len;
        let data = self.expect_done(source, read).await?;
        let mut write = Request::new(Op::Write, 0, epoch);
        write.offset = start;
        write.payload = data;
        self.expect_done(dest, write).await?;
        Ok(len)
    }

    /// Makes the in-sync replicas identical before the target serves I/O: a
    /// previous target may have died with writes on some of them only. Such
    /// writes were never acknowledged, so either version is correct, but all
    /// replicas must return the same one. A replica that cannot be brought
    /// in line is dropped from the in-sync set.
    pub(super) async fn reconcile_in_sync(&self) -> BlockResult<()> {
        let config = self.current();
        let order = self.read_order(&config);
        let Some((&source, others)) = order.split_first() else {
            return Ok(());
        };
        let mut failed = BTreeSet::new();
        for &dest in others {
            let result: Result<u64, String> = async {
                let diffs = self.differing_extents(source, dest, config.epoch).await?;
                let mut copied = 0;
                for &extent in &diffs {
                    copied += self
                        .copy_extent(CopyFrom::Replica(source), dest, extent)
                        .await?;
                }
                Ok(copied)
            }
            .await;
            match result {
                Ok(0) => {}
                Ok(bytes) => tracing::info!(
                    volume = %self.volume,
                    node = %self.node_of(dest),
                    bytes,
                    "aligned a replica with unacknowledged writes of the previous target"
                ),
                Err(err) => {
                    tracing::warn!(
                        volume = %self.volume,
                        node = %self.node_of(dest),
                        %err,
                        "could not align a replica; dropping it from the in-sync set"
                    );
                    failed.insert(ReplicaId(self.id_of(dest)));
                }
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            self.shrink(&failed).await
        }
    }
}
