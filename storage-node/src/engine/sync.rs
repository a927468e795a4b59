//! The fallback engine: positional reads and writes on tokio's blocking pool.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::AlignedBuf;

pub struct SyncEngine {
    file: Arc<File>,
    #[cfg(test)]
    pub(crate) faults: Faults,
}

impl SyncEngine {
    pub fn new(file: File) -> Self {
        SyncEngine {
            file: Arc::new(file),
            #[cfg(test)]
            faults: Faults::default(),
        }
    }

    pub async fn read_at(&self, mut buf: AlignedBuf, offset: u64) -> (AlignedBuf, io::Result<()>) {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || {
            let res = file.read_exact_at(&mut buf, offset);
            (buf, res)
        })
        .await
        .expect("blocking read task panicked")
    }

    pub async fn write_shared(&self, data: bytes::Bytes, offset: u64) -> io::Result<()> {
        let file = self.file.clone();
        #[cfg(test)]
        let torn = self
            .faults
            .tear_writes
            .load(std::sync::atomic::Ordering::SeqCst);
        #[cfg(test)]
        let hold = self.faults.hold.clone();
        tokio::task::spawn_blocking(move || {
            #[cfg(test)]
            let _done = hold.wait();
            #[cfg(test)]
            if torn {
                file.write_all_at(&data[..data.len() / 2], offset)?;
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            file.write_all_at(&data, offset)
        })
        .await
        .expect("blocking write task panicked")
    }

    pub async fn sync_data(&self) -> io::Result<()> {
        #[cfg(test)]
        if self.faults.sync_fails() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let file = self.file.clone();
        #[cfg(test)]
        let hold = self.faults.hold.clone();
        tokio::task::spawn_blocking(move || {
            #[cfg(test)]
            let _done = hold.wait();
            file.sync_data()
        })
        .await
        .expect("blocking sync task panicked")
    }
}

/// Failures a test asks for, to reach the error paths of what uses the engine.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct Faults {
    /// Syncs that still succeed before every later one fails; negative: none fails.
    syncs_left: std::sync::atomic::AtomicI64,
    /// Writes put the first half of their bytes on disk and fail with EIO.
    pub(crate) tear_writes: std::sync::atomic::AtomicBool,
    /// Holds writes and syncs back before they reach the file.
    pub(crate) hold: Arc<IoHold>,
}

/// Lets a test stop writes and syncs on their way to the file, and see them
/// go by.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct IoHold {
    holding: std::sync::atomic::AtomicBool,
    /// Set by [`IoHold::hold_next`]: the hold is for one write or sync, the
    /// first to come (`claimed`); the others go by.
    one_shot: std::sync::atomic::AtomicBool,
    claimed: std::sync::atomic::AtomicBool,
    waiting: std::sync::atomic::AtomicUsize,
    done: std::sync::atomic::AtomicUsize,
}

#[cfg(test)]
impl IoHold {
    pub(crate) fn set(&self, holding: bool) {
        use std::sync::atomic::Ordering::SeqCst;
        if holding {
            self.one_shot.store(false, SeqCst);
        }
        self.holding.store(holding, SeqCst);
    }

    /// Holds the next write or sync only; those after it go by.
    pub(crate) fn hold_next(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.claimed.store(false, SeqCst);
        self.one_shot.store(true, SeqCst);
        self.holding.store(true, SeqCst);
    }

    /// Returns once a write or sync waits at the hold.
    pub(crate) async fn until_held(&self) {
        while self.waiting.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// Lets held writes and syncs go; returns once one of them finished.
    pub(crate) async fn release(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        let done = self.done.load(SeqCst);
        self.set(false);
        while self.done.load(SeqCst) == done {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// Waits while I/O is held (on a blocking thread); the guard counts the
    /// write or sync done when it drops.
    fn wait(self: Arc<Self>) -> impl Drop {
        use std::sync::atomic::Ordering::SeqCst;
        let held = !self.one_shot.load(SeqCst) || !self.claimed.swap(true, SeqCst);
        if held {
            self.waiting.fetch_add(1, SeqCst);
            while self.holding.load(SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            self.waiting.fetch_sub(1, SeqCst);
        }
        struct Done(Arc<IoHold>);
        impl Drop for Done {
            fn drop(&mut self) {
                self.0
                    .done
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        Done(self)
    }
}

#[cfg(test)]
impl Default for Faults {
    fn default() -> Self {
        Faults {
            syncs_left: std::sync::atomic::AtomicI64::new(-1),
            tear_writes: std::sync::atomic::AtomicBool::new(false),
            hold: Arc::default(),
        }
    }
}

#[cfg(test)]
impl Faults {
    /// The next `n` syncs succeed (a failed sync does not write the data
    /// after them, but what was written before may have landed), then every
    /// one fails with EIO until [`Faults::heal`].
    pub(crate) fn fail_syncs_after(&self, n: i64) {
        self.syncs_left
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    pub(crate) fn heal(&self) {
        self.fail_syncs_after(-1);
        self.tear_writes
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    fn sync_fails(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        match self
            .syncs_left
            .fetch_update(SeqCst, SeqCst, |n| (n > 0).then(|| n - 1))
        {
            Ok(_) => false,
            // Zero left: it fails. Negative: no faults asked for.
            Err(left) => left == 0,
        }
    }
}
