//! The I/O engine: how a pool's bytes reach its device.
//!
//! One type, [`IoEngine`], with two implementations chosen at run time:
//! io_uring with O_DIRECT and registered buffers (the default), and plain
//! pread/pwrite on tokio's blocking pool, used when io_uring cannot be set up
//! (for example when a container's seccomp profile denies it) or when asked for.
//! Callers see the same API either way.

mod buf;
pub(crate) mod sync;
mod uring;
mod uring_local;

pub use buf::{AlignedBuf, BufferSets, RegisteredSlots, ALIGN};
pub use uring_local::use_thread_local_rings;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::str::FromStr;

/// Which engine to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineKind {
    /// io_uring when it can be set up, otherwise pread/pwrite.
    #[default]
    Auto,
    IoUring,
    Sync,
}

impl FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(EngineKind::Auto),
            "io_uring" | "io-uring" | "uring" => Ok(EngineKind::IoUring),
            "sync" | "pread" => Ok(EngineKind::Sync),
            other => Err(format!(
                "unknown I/O engine {other:?} (expected auto, io_uring or sync)"
            )),
        }
    }
}

/// Reads and writes whole aligned buffers at aligned offsets of one device.
pub enum IoEngine {
    Uring(uring::UringEngine),
    Sync(sync::SyncEngine),
}

impl IoEngine {
    /// Opens `path` (a regular file or a block device) for direct I/O.
    pub fn open(path: &Path, kind: EngineKind) -> io::Result<IoEngine> {
        let file = open_direct(path)?;
        match kind {
            EngineKind::Sync => Ok(IoEngine::Sync(sync::SyncEngine::new(file))),
            EngineKind::IoUring => Ok(IoEngine::Uring(uring::UringEngine::new(file)?)),
            EngineKind::Auto => {
                let fallback = file.try_clone()?;
                match uring::UringEngine::new(file) {
                    Ok(engine) => Ok(IoEngine::Uring(engine)),
                    Err(err) => {
                        tracing::warn!(
                            error = %err,
                            "io_uring is not available, using the pread/pwrite engine"
                        );
                        Ok(IoEngine::Sync(sync::SyncEngine::new(fallback)))
                    }
                }
            }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            IoEngine::Uring(_) => "io_uring",
            IoEngine::Sync(_) => "sync",
        }
    }

    /// A buffer of `len` bytes that the caller fills completely before writing
    /// it: not zeroed when it is a registered slot.
    pub fn write_buffer(&self, len: usize) -> AlignedBuf {
        self.read_buffer(len)
    }

    /// A zeroed buffer of `len` bytes; a registered one when the engine has a free slot.
    pub fn buffer(&self, len: usize) -> AlignedBuf {
        match self {
            IoEngine::Uring(e) => e.buffer(len),
            IoEngine::Sync(_) => AlignedBuf::zeroed(len),
        }
    }

    /// A buffer for a read of `len` bytes: its contents are unspecified until
    /// the read fills it, which saves zeroing it first.
    pub fn read_buffer(&self, len: usize) -> AlignedBuf {
        match self {
            IoEngine::Uring(e) => e.read_buffer(len),
            IoEngine::Sync(_) => AlignedBuf::zeroed(len),
        }
    }

    /// Fills `buf` from `offset`. Both must be aligned to [`ALIGN`].
    pub async fn read_at(&self, buf: AlignedBuf, offset: u64) -> (AlignedBuf, io::Result<()>) {
        debug_assert!(offset % ALIGN as u64 == 0 && buf.len() % ALIGN == 0);
        match self {
            IoEngine::Uring(e) => e.read_at(buf, offset).await,
            IoEngine::Sync(e) => e.read_at(buf, offset).await,
        }
    }

    /// Writes all of `buf` at `offset`. Both must be aligned to [`ALIGN`].
    /// The buffer goes back to its slot, or is freed, once written.
    pub async fn write_at(&self, buf: AlignedBuf, offset: u64) -> io::Result<()> {
        self.write_shared(bytes::Bytes::from_owner(buf), offset)
            .await
    }

    /// The failures a test injects; the pread/pwrite engine has them.
    #[cfg(test)]
    pub(crate) fn faults(&self) -> &sync::Faults {
        match self {
            IoEngine::Sync(e) => &e.faults,
            IoEngine::Uring(_) => panic!("fault injection needs the sync engine"),
        }
    }

    /// Writes all of `data` at `offset` without copying it: for memory that
    /// is already aligned to [`ALIGN`] (a buffer from [`IoEngine::write_buffer`],
    /// filled and shared since), as are the offset and the length.
    pub async fn write_shared(&self, data: bytes::Bytes, offset: u64) -> io::Result<()> {
        debug_assert!(is_aligned(&data) && offset % ALIGN as u64 == 0);
        match self {
            IoEngine::Uring(e) => e.write_shared(data, offset).await,
            IoEngine::Sync(e) => e.write_shared(data, offset).await,
        }
    }

    /// Makes every completed write durable (fdatasync: the device cache is flushed).
    pub async fn sync_data(&self) -> io::Result<()> {
        match self {
            IoEngine::Uring(e) => e.sync_data().await,
            IoEngine::Sync(e) => e.sync_data().await,
        }
    }
}

/// Whether direct I/O can use `data` as it is: address and length aligned.
pub fn is_aligned(data: &[u8]) -> bool {
    data.as_ptr() as usize % ALIGN == 0 && data.len() % ALIGN == 0
}

/// Opens with O_DIRECT, falling back to buffered I/O on filesystems that refuse
/// it (tmpfs); fdatasync still gives durability there.
fn open_direct(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true);
    match options.clone().custom_flags(libc::O_DIRECT).open(path) {
        Ok(file) => Ok(file),
        Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
            tracing::warn!(path = %path.display(), "O_DIRECT refused, using buffered I/O");
            options.open(path)
        }
        Err(err) => Err(err),
    }
}

/// The size in bytes of a regular file or a block device.
pub fn device_size(path: &Path) -> io::Result<u64> {
    let meta = std::fs::metadata(path)?;
    if meta.file_type().is_block_device() {
        use std::io::{Seek, SeekFrom};
        let mut file = File::open(path)?;
        file.seek(SeekFrom::End(0))
    } else {
        Ok(meta.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn round_trip(kind: EngineKind) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let engine = IoEngine::open(&path, kind).unwrap();
        let mut handles = Vec::new();
        // Many concurrent writes exercise batching in the io_uring engine.
        let engine = std::sync::Arc::new(engine);
        for i in 0..64u64 {
            let engine = engine.clone();
            handles.push(tokio::spawn(async move {
                let mut buf = engine.buffer(8192);
                buf.fill(i as u8 + 1);
                engine.write_at(buf, i * 8192).await.unwrap();
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        engine.sync_data().await.unwrap();
        for i in 0..64u64 {
            let (buf, res) = engine.read_at(engine.buffer(8192), i * 8192).await;
            res.unwrap();
            assert!(buf.iter().all(|b| *b == i as u8 + 1), "block {i}");
        }
        // Far more requests at once than a ring has room for.
        let reads =
            (0..2048u64).map(|i| engine.read_at(engine.read_buffer(4096), (i % 256) * 4096));
        for (buf, res) in futures::future::join_all(reads).await {
            res.unwrap();
            assert_eq!(buf.len(), 4096);
        }
        // Aligned memory shared on (as a client's payload is) is written as
        // it is: a registered slot's and the heap's.
        let shared = [engine.write_buffer(8192), AlignedBuf::zeroed(8192)];
        for (i, mut buf) in shared.into_iter().enumerate() {
            buf.fill(0xC0 + i as u8);
            let at = (1 << 19) + i as u64 * 8192;
            engine
                .write_shared(bytes::Bytes::from_owner(buf), at)
                .await
                .unwrap();
        }
        for i in 0..2u64 {
            let (buf, res) = engine
                .read_at(engine.buffer(8192), (1 << 19) + i * 8192)
                .await;
            res.unwrap();
            assert!(buf.iter().all(|b| *b == 0xC0 + i as u8), "shared write {i}");
        }
        // A buffer larger than any registered slot still works.
        let mut big = engine.buffer(1 << 19);
        big.fill(0xEE);
        engine.write_at(big, 0).await.unwrap();
        let (buf, res) = engine.read_at(engine.buffer(1 << 19), 0).await;
        res.unwrap();
        assert!(buf.iter().all(|b| *b == 0xEE));
    }

    #[tokio::test]
    async fn uring_engine_round_trips() {
        round_trip(EngineKind::IoUring).await;
    }

    #[test]
    fn per_thread_rings_round_trip() {
        // As an NBD connection thread runs: a current-thread runtime on a
        // thread that opted in to rings of its own.
        std::thread::spawn(|| {
            use_thread_local_rings();
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(round_trip(EngineKind::IoUring));
            assert_eq!(
                uring_local::thread_ring_count(),
                1,
                "served by a ring of this thread"
            );
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_thread_ring_that_closes_waits_for_its_reads_before_their_buffers_are_reused() {
        const READ: usize = uring::SMALL_SLOT_SIZE;
        const READS: u64 = 64;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev");
        std::fs::write(&path, vec![0xAB; READ * READS as usize]).unwrap();
        std::fs::File::open(&path).unwrap().sync_all().unwrap();
        let engine = std::sync::Arc::new(IoEngine::open(&path, EngineKind::IoUring).unwrap());
        let thread_engine = engine.clone();
        std::thread::spawn(move || {
            use_thread_local_rings();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                for i in 0..READS {
                    let engine = thread_engine.clone();
                    tokio::spawn(async move {
                        let _ = engine
                            .read_at(engine.read_buffer(READ), i * READ as u64)
                            .await;
                    });
                }
                // Each task submits its read and waits: all are in the kernel.
                tokio::task::yield_now().await;
            });
            // The reads' tasks go with the runtime and the ring with the thread,
            // as when a node stops its connection threads under load.
        })
        .join()
        .unwrap();
        // The slots those reads used are free again. Zeroed now, they must stay
        // zero: a read finishing after its ring closed would fill one with 0xAB.
        let buffers: Vec<AlignedBuf> = (0..uring::SMALL_SLOT_COUNT)
            .map(|_| engine.buffer(READ))
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(100));
        for (i, buf) in buffers.iter().enumerate() {
            assert!(
                buf.iter().all(|b| *b == 0),
                "slot {i} was written after its ring closed"
            );
        }
    }

    #[tokio::test]
    async fn sync_engine_round_trips() {
        round_trip(EngineKind::Sync).await;
    }

    #[test]
    fn engine_kind_parses() {
        assert_eq!("io_uring".parse::<EngineKind>(), Ok(EngineKind::IoUring));
        assert_eq!("sync".parse::<EngineKind>(), Ok(EngineKind::Sync));
        assert!("spdk".parse::<EngineKind>().is_err());
    }
}
