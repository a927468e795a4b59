//! The NBD exports of a node: the volume targets open on it (one per
//! replicated volume, named after the volume) and the node's plain local
//! volumes. Replicas are never exported directly: only a target, which
//! holds the volume's epoch, may write them.
//!
//! The node keeps a record of its targets (volume, highest epoch, member
//! addresses) in a small internal pool volume, so a node that restarts after
//! a crash serves its volumes again, as a restarted Pod would. It reopens a
//! target only where no replica has promised an epoch above the recorded one
//! (a condition each replica checks as it grants the new epoch): had another
//! node opened the volume meanwhile, the restarted node leaves it alone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::pool::{is_internal_volume_name, Pool, Volume};
use crate::replication::{target, Replicas, TargetOptions, VolumeTarget};
use crate::target::{BlockResult, BlockTarget, TargetRegistry};

/// The internal pool volume that holds the node's target records.
const RECORDS_VOLUME: &str = "node:targets";
const RECORDS_BYTES: u64 = 256 << 10;
/// Attempts, a second apart, to reopen a recorded target at start.
const REOPEN_ATTEMPTS: u32 = 30;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TargetRecord {
    volume: String,
    /// The highest epoch the target prepared.
    epoch: u64,
    /// Replication addresses of the members.
    seeds: Vec<String>,
}

/// What one export serves.
pub enum Export {
    Local(Box<Volume>),
    Replicated(Arc<VolumeTarget>),
}

pub struct NodeRegistry {
    pool: Arc<Pool>,
    targets: Mutex<HashMap<String, Arc<VolumeTarget>>>,
    /// One save of the records at a time, in order.
    saving: tokio::sync::Mutex<()>,
}

impl NodeRegistry {
    pub fn new(pool: Arc<Pool>) -> Arc<Self> {
        Arc::new(NodeRegistry {
            pool,
            targets: Mutex::new(HashMap::new()),
            saving: tokio::sync::Mutex::new(()),
        })
    }

    /// Makes `target` the export of its volume, replacing an older target
    /// of the same volume on this node (which the new one has fenced), and
    /// records it.
    pub async fn add_target(self: &Arc<Self>, target: Arc<VolumeTarget>) {
        let weak: Weak<NodeRegistry> = Arc::downgrade(self);
        target.set_epoch_listener(Arc::new(move || {
            if let Some(registry) = weak.upgrade() {
                tokio::spawn(async move { registry.save().await });
            }
        }));
        let replaced = self
            .targets
            .lock()
            .expect("targets lock")
            .insert(target.volume().to_string(), target);
        if let Some(old) = replaced {
            old.close();
        }
        self.save().await;
    }

    pub async fn remove_target(&self, volume: &str) -> Option<Arc<VolumeTarget>> {
        let removed = self.targets.lock().expect("targets lock").remove(volume);
        if let Some(target) = &removed {
            target.close();
            self.save().await;
        }
        removed
    }

    /// Writes the records of the targets this node serves. A failure is
    /// logged: the targets keep serving, only a restart would not reopen them.
    async fn save(&self) {
        let _one_at_a_time = self.saving.lock().await;
        let records: Vec<TargetRecord> = self
            .targets()
            .iter()
            .filter(|t| !t.is_fenced())
            .map(|t| TargetRecord {
                volume: t.volume().to_string(),
                epoch: t.max_persisted_epoch(),
                seeds: t.member_addresses(),
            })
            .collect();
        if let Err(err) = self.write_records(&records).await {
            tracing::warn!(%err, "could not record this node's targets");
        }
    }

    async fn write_records(&self, records: &[TargetRecord]) -> anyhow::Result<()> {
        let body = serde_json::to_vec(records)?;
        let len = (body.len() + 4).next_multiple_of(4096) as u64;
        anyhow::ensure!(len <= RECORDS_BYTES, "too many targets to record");
        if self.pool.volume_info(RECORDS_VOLUME).is_none() {
            if records.is_empty() {
                // Nothing to remember, and no old records to clear.
                return Ok(());
            }
            self.pool
                .create_internal_volume(RECORDS_VOLUME, RECORDS_BYTES)
                .await?;
        }
        let volume = self.pool.volume(RECORDS_VOLUME).expect("just made sure");
        let mut block = vec![0u8; len as usize];
        block[..4].copy_from_slice(&(body.len() as u32).to_le_bytes());
        block[4..4 + body.len()].copy_from_slice(&body);
        volume.write(0, &block, true).await?;
        Ok(())
    }

    async fn read_records(&self) -> anyhow::Result<Vec<TargetRecord>> {
        let Some(volume) = self.pool.volume(RECORDS_VOLUME) else {
            return Ok(Vec::new());
        };
        let head = volume.read(0, 4096).await?;
        let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as u64;
        if len == 0 {
            return Ok(Vec::new());
        }
        anyhow::ensure!(len + 4 <= RECORDS_BYTES, "target records are damaged");
        let all = volume.read(0, (len + 4) as u32).await?;
        Ok(serde_json::from_slice(&all[4..])?)
    }

    /// Reopens the targets this node served before it stopped, unless
    /// another target took a volume over meanwhile.
    pub async fn reopen_recorded(
        self: &Arc<Self>,
        replicas: Arc<Replicas>,
        options: TargetOptions,
    ) {
        let records = match self.read_records().await {
            Ok(records) => records,
            Err(err) => {
                tracing::warn!(%err, "could not read this node's target records");
                return;
            }
        };
        for record in records {
            // The other nodes may be starting too: try for a while.
            for attempt in 1..=REOPEN_ATTEMPTS {
                match VolumeTarget::reopen(
                    &record.volume,
                    &record.seeds,
                    replicas.clone(),
                    options.clone(),
                    record.epoch,
                )
                .await
                {
                    Ok(target) => {
                        tracing::info!(volume = %record.volume, "reopened the target this node served");
                        self.add_target(target).await;
                        break;
                    }
                    Err(err @ target::OpenError::Fenced(_)) => {
                        tracing::info!(volume = %record.volume, %err, "not reopening the target");
                        break;
                    }
                    Err(err) if attempt == REOPEN_ATTEMPTS => {
                        tracing::warn!(volume = %record.volume, %err, "could not reopen the target")
                    }
                    Err(_) => tokio::time::sleep(std::time::Duration::from_secs(1)).await,
                }
            }
        }
        self.save().await;
    }

    pub fn target(&self, volume: &str) -> Option<Arc<VolumeTarget>> {
        self.targets
            .lock()
            .expect("targets lock")
            .get(volume)
            .cloned()
    }

    pub fn targets(&self) -> Vec<Arc<VolumeTarget>> {
        let mut list: Vec<_> = self
            .targets
            .lock()
            .expect("targets lock")
            .values()
            .cloned()
            .collect();
        list.sort_by(|a, b| a.volume().cmp(b.volume()));
        list
    }
}

impl TargetRegistry for NodeRegistry {
    type Target = Export;

    fn export_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .pool
            .list_volumes()
            .into_iter()
            .map(|v| v.name)
            .filter(|name| !is_internal_volume_name(name))
            .collect();
        names.extend(self.targets.lock().expect("targets lock").keys().cloned());
        names.sort();
        names
    }

    fn lookup(&self, name: &str) -> Option<Arc<Export>> {
        if let Some(target) = self.target(name) {
            return Some(Arc::new(Export::Replicated(target)));
        }
        if is_internal_volume_name(name) {
            return None;
        }
        self.pool
            .volume(name)
            .map(|v| Arc::new(Export::Local(Box::new(v))))
    }
}

impl BlockTarget for Export {
    fn size(&self) -> u64 {
        match self {
            Export::Local(v) => v.size(),
            Export::Replicated(t) => t.size(),
        }
    }

    fn block_size(&self) -> u32 {
        match self {
            Export::Local(v) => v.block_size(),
            Export::Replicated(t) => t.block_size(),
        }
    }

    async fn read(&self, offset: u64, len: u32) -> BlockResult<Bytes> {
        match self {
            Export::Local(v) => v.read(offset, len).await,
            Export::Replicated(t) => t.read(offset, len).await,
        }
    }

    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> BlockResult<()> {
        match self {
            Export::Local(v) => v.write(offset, data, fua).await,
            Export::Replicated(t) => t.write(offset, data, fua).await,
        }
    }

    async fn write_owned(&self, offset: u64, data: bytes::Bytes, fua: bool) -> BlockResult<()> {
        match self {
            Export::Local(v) => v.write_owned(offset, data, fua).await,
            Export::Replicated(t) => t.write_owned(offset, data, fua).await,
        }
    }

    fn write_buffer(&self, len: usize) -> Option<crate::engine::AlignedBuf> {
        match self {
            Export::Local(v) => v.write_buffer(len),
            Export::Replicated(t) => t.write_buffer(len),
        }
    }

    async fn flush(&self) -> BlockResult<()> {
        match self {
            Export::Local(v) => v.flush().await,
            Export::Replicated(t) => t.flush().await,
        }
    }

    async fn trim(&self, offset: u64, len: u64) -> BlockResult<()> {
        match self {
            Export::Local(v) => v.trim(offset, len).await,
            Export::Replicated(t) => t.trim(offset, len).await,
        }
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        allocate: bool,
    ) -> BlockResult<()> {
        match self {
            Export::Local(v) => v.write_zeroes(offset, len, fua, allocate).await,
            Export::Replicated(t) => t.write_zeroes(offset, len, fua, allocate).await,
        }
    }
}
