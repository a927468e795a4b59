//! The fallback engine: positional reads and writes on tokio's blocking pool.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::AlignedBuf;

pub struct SyncEngine {
    file: Arc<File>,
}

impl SyncEngine {
    pub fn new(file: File) -> Self {
        SyncEngine {
            file: Arc::new(file),
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

    pub async fn write_at(&self, buf: AlignedBuf, offset: u64) -> (AlignedBuf, io::Result<()>) {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || {
            let res = file.write_all_at(&buf, offset);
            (buf, res)
        })
        .await
        .expect("blocking write task panicked")
    }

    pub async fn sync_data(&self) -> io::Result<()> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .expect("blocking sync task panicked")
    }
}
