//! What the NBD frontend serves: a block target (a volume, or later a replicated
//! volume target) and the registry that finds targets by export name.
//!
//! The NBD server is generic over these traits so it does not know whether the
//! bytes live in a local pool or on remote replicas.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;

use crate::engine::AlignedBuf;

/// Why a block operation failed. Each kind maps to one NBD error number.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum BlockError {
    /// The medium failed, or a checksum did not match: never return data then.
    #[error("I/O error: {0}")]
    Io(String),
    /// A stored block failed its checksum. Never returned as data; a
    /// replicated volume reads it from another replica instead.
    #[error("checksum mismatch: {0}")]
    Checksum(String),
    /// No space could be allocated in the pool.
    #[error("no space left in the pool")]
    NoSpace,
    /// The request reaches past the end of the target.
    #[error("request [{offset}, +{len}) is past the end ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// The target does not accept writes.
    #[error("target is read-only")]
    ReadOnly,
    /// The target no longer exists (deleted while a client was connected).
    #[error("target is gone")]
    Gone,
}

pub type BlockResult<T> = Result<T, BlockError>;

/// A byte-addressed block device. Offsets and lengths need not be aligned.
///
/// Durability: a write is durable once `flush` has completed after it, or when it
/// was issued with `fua`.
pub trait BlockTarget: Send + Sync + 'static {
    /// Current size in bytes.
    fn size(&self) -> u64;

    /// Preferred I/O size in bytes (the pool's block size).
    fn block_size(&self) -> u32;

    fn read(&self, offset: u64, len: u32) -> impl Future<Output = BlockResult<Bytes>> + Send;

    fn write(
        &self,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> impl Future<Output = BlockResult<()>> + Send;

    /// [`BlockTarget::write`] of a buffer the caller gives up, which a target
    /// that keeps or forwards the data (a replicated one) uses without a copy.
    fn write_owned(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = BlockResult<()>> + Send {
        async move { self.write(offset, &data, fua).await }
    }

    /// A buffer for the data of a write of `len` bytes that will be handed to
    /// [`BlockTarget::write_owned`] (as `Bytes::from_owner`): memory the
    /// target's device can take as it is, so the data is not copied again.
    /// None: any memory will do.
    fn write_buffer(&self, _len: usize) -> Option<AlignedBuf> {
        None
    }

    /// Makes every write that completed before this call durable.
    fn flush(&self) -> impl Future<Output = BlockResult<()>> + Send;

    /// Discards the range; it reads back as zeroes and its space is returned.
    fn trim(&self, offset: u64, len: u64) -> impl Future<Output = BlockResult<()>> + Send;

    /// Writes zeroes over the range. With `allocate`, space stays allocated
    /// (NBD_CMD_FLAG_NO_HOLE); otherwise the range may be unmapped.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        allocate: bool,
    ) -> impl Future<Output = BlockResult<()>> + Send;
}

/// Finds targets by export name.
pub trait TargetRegistry: Send + Sync + 'static {
    type Target: BlockTarget;

    /// The export names, for NBD_OPT_LIST.
    fn export_names(&self) -> Vec<String>;

    fn lookup(&self, name: &str) -> Option<Arc<Self::Target>>;
}
