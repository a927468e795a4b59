//! Background scrub: every block of every in-sync replica is read (which
//! checks it against its CRC on the replica's node), and an extent that holds
//! a corrupt block is rewritten from a replica whose copy reads good. Reads
//! of clients heal what they touch; the scrub finds what they never touch.
//! It is rate-limited and pauses while a rebuild runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Answer, VolumeTarget};
use crate::replication::replica::{extent_count, EXTENT_BYTES};
use crate::replication::wire::{Op, Request, Status};

/// Starts the scrub loop of `target`: a pass every `interval` (none when
/// zero). Ends when the target is closed or fenced.
pub(super) fn spawn_scrubber(target: &Arc<VolumeTarget>) {
    let interval = target.options.scrub_interval;
    if interval.is_zero() {
        return;
    }
    let weak = Arc::downgrade(target);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            let Some(target) = weak.upgrade() else { return };
            if target.is_fenced() || target.is_closed() {
                return;
            }
            if let Err(err) = target.scrub_pass().await {
                tracing::warn!(volume = %target.volume, %err, "scrub pass stopped");
            }
        }
    });
}

impl VolumeTarget {
    /// One pass over every extent of every in-sync replica.
    async fn scrub_pass(&self) -> Result<(), String> {
        let started = Instant::now();
        let extents = extent_count(self.size_now());
        let mut bytes_read = 0u64;
        let mut repaired = 0u64;
        for extent in 0..extents {
            if self.is_fenced() || self.is_closed() {
                return Err("target closed".into());
            }
            while !self.rebuilding_indexes().is_empty() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let start = extent * EXTENT_BYTES;
            let len = EXTENT_BYTES.min(self.size_now().saturating_sub(start));
            if len == 0 {
                break;
            }
            let bad = {
                let _gate = self.gate.read().await;
                let config = self.current();
                let replicas = self.read_order(&config);
                let answers = self
                    .send_io(&replicas, |_| {
                        let mut request = Request::new(Op::Read, 0, config.epoch);
                        request.offset = start;
                        request.length = len;
                        request
                    })
                    .await;
                bytes_read += len * replicas.len() as u64;
                answers
                    .into_iter()
                    .filter(|(_, answer)| matches!(answer, Answer::Refused(Status::Checksum, _)))
                    .map(|(index, _)| index)
                    .collect::<Vec<_>>()
            };
            if !bad.is_empty() {
                for &index in &bad {
                    tracing::warn!(
                        volume = %self.volume,
                        node = %self.node_of(index),
                        offset = start,
                        "scrub found a corrupt block"
                    );
                }
                let before = self.repaired_blocks();
                self.repair(&bad, start, len).await;
                repaired += self.repaired_blocks() - before;
            }
            self.throttle(started, bytes_read).await;
        }
        self.scrub_passes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.local
            .pool()
            .metrics()
            .scrub_passes
            .get_or_create(&self.labels())
            .inc();
        tracing::info!(
            volume = %self.volume,
            extents,
            repaired_blocks = repaired,
            elapsed = ?started.elapsed(),
            "scrub pass done"
        );
        Ok(())
    }
}
