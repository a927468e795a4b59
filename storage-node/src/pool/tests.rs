//! Pool tests on real files: durability across reopen, checksums, space.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;

use super::*;
use crate::engine::sync::IoHold;
use crate::target::{BlockError, BlockTarget};

const MIB: u64 = 1 << 20;

fn options(size: u64) -> PoolOptions {
    PoolOptions {
        create_size: Some(size),
        ..PoolOptions::default()
    }
}

async fn open(path: &Path, size: u64) -> Arc<Pool> {
    Pool::open(path, &options(size), Arc::new(Metrics::new()))
        .await
        .unwrap()
}

/// Compares byte buffers, naming the first difference instead of printing both.
macro_rules! assert_same_bytes {
    ($actual:expr, $expected:expr) => {
        assert_same_bytes!($actual, $expected, "")
    };
    ($actual:expr, $expected:expr, $($msg:tt)+) => {{
        let actual: &[u8] = &$actual;
        let expected: &[u8] = &$expected;
        if actual != expected {
            let at = actual.iter().zip(expected).position(|(a, b)| a != b);
            panic!(
                "bytes differ (lengths {} and {}, first difference at {:?}) {}",
                actual.len(),
                expected.len(),
                at,
                format!($($msg)+)
            );
        }
    }};
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Writes `bytes` into the pool file at byte `at`, as damage or a torn
/// write would leave them (the pool must be closed).
fn write_pool_file(path: &Path, at: u64, bytes: &[u8]) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, at).unwrap();
}

/// The physical block behind a volume's logical block.
fn pba_of(pool: &Pool, volume: &str, lba: u64) -> u32 {
    let state = pool.state.lock().unwrap();
    let v = state.volumes.values().find(|v| v.name == volume).unwrap();
    v.map.get(lba).pba
}

#[tokio::test]
async fn unaligned_writes_read_back_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let pool = open(&path, 64 * MIB).await;
    pool.create_volume("v1", 8 * MIB).await.unwrap();
    let vol = pool.volume("v1").unwrap();
    let cases = [
        (0u64, 4096usize),
        (1, 1),
        (4095, 2),
        (10_000, 70_000),
        (8 * MIB - 3, 3),
    ];
    for (i, (offset, len)) in cases.iter().enumerate() {
        vol.write(*offset, &pattern(*len, i as u8), false)
            .await
            .unwrap();
    }
    vol.flush().await.unwrap();
    // Later writes overlap earlier ones: read back the final image.
    let mut image = vec![0u8; 8 * MIB as usize];
    for (i, (offset, len)) in cases.iter().enumerate() {
        image[*offset as usize..*offset as usize + len].copy_from_slice(&pattern(*len, i as u8));
    }
    assert_same_bytes!(vol.read(0, 8 * MIB as u32).await.unwrap(), image);
    drop(vol);
    drop(pool);
    let pool = open(&path, 64 * MIB).await;
    let vol = pool.volume("v1").unwrap();
    assert_same_bytes!(vol.read(0, 8 * MIB as u32).await.unwrap(), image);
    assert_same_bytes!(vol.read(5, 7).await.unwrap(), image[5..12]);
}

#[tokio::test]
async fn unflushed_writes_are_not_in_the_durable_state_but_flushed_ones_are() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let pool = open(&path, 64 * MIB).await;
    pool.create_volume("v", 4 * MIB).await.unwrap();
    let vol = pool.volume("v").unwrap();
    vol.write(0, &pattern(8192, 1), false).await.unwrap();
    vol.flush().await.unwrap();
    vol.write(4096, &pattern(4096, 2), true).await.unwrap(); // FUA
    vol.write(8192, &pattern(4096, 3), false).await.unwrap(); // never flushed
    vol.write(0, &pattern(4096, 4), false).await.unwrap(); // never flushed, in place
    drop(vol);
    drop(pool); // as if the process died: nothing more reaches the disk
    let pool = open(&path, 64 * MIB).await;
    let vol = pool.volume("v").unwrap();
    assert_same_bytes!(vol.read(4096, 4096).await.unwrap(), pattern(4096, 2));
    // A new block never flushed is not mapped.
    assert_same_bytes!(vol.read(8192, 4096).await.unwrap(), vec![0u8; 4096]);
    // An overwrite never flushed may or may not be there, as on a disk, but
    // the block reads.
    let block = vol.read(0, 4096).await.unwrap();
    assert!(
        block == pattern(8192, 1)[..4096] || block == pattern(4096, 4),
        "block 0 is neither its flushed nor its unflushed data"
    );
    assert_eq!(pool.checksum_failures(), 0);
}

/// The physical blocks behind blocks [first, first + n) of a volume.
fn pbas_of(pool: &Pool, volume: &str, first: u64, n: u64) -> Vec<u32> {
    (first..first + n)
        .map(|lba| pba_of(pool, volume, lba))
        .collect()
}

#[tokio::test]
async fn overwrites_go_in_place_unless_a_snapshot_shares_the_block() {
    let dir = tempfile::tempdir().unwrap();
    let pool = open(&dir.path().join("pool"), 64 * MIB).await;
    pool.create_volume("v", 4 * MIB).await.unwrap();
    let vol = pool.volume("v").unwrap();
    vol.write(0, &pattern(MIB as usize, 1), true).await.unwrap();
    let layout = pbas_of(&pool, "v", 0, 256);
    let used = pool.usage().used;
    // Sequential, random, partial: every overwrite keeps the block's place.
    vol.write(0, &pattern(MIB as usize, 2), false)
        .await
        .unwrap();
    vol.write(40 * 4096, &pattern(4096, 3), false)
        .await
        .unwrap();
    vol.write(7 * 4096 + 100, b"partial", true).await.unwrap();
    assert_eq!(pbas_of(&pool, "v", 0, 256), layout);
    assert_eq!(pool.usage().used, used);
    let mut expected = pattern(MIB as usize, 2);
    expected[40 * 4096..41 * 4096].copy_from_slice(&pattern(4096, 3));
    expected[7 * 4096 + 100..7 * 4096 + 107].copy_from_slice(b"partial");
    assert_same_bytes!(vol.read(0, MIB as u32).await.unwrap(), expected);

    // Shared with a snapshot: copy-on-write, and the snapshot keeps its data.
    pool.create_snapshot("v", "s").await.unwrap();
    vol.write(0, &pattern(8192, 4), false).await.unwrap();
    let moved = pbas_of(&pool, "v", 0, 2);
    assert!(moved.iter().zip(&layout).all(|(a, b)| a != b), "{moved:?}");
    assert_same_bytes!(snapshot_bytes(&pool, "s", 0, 8192).await, expected[..8192]);
    // The copy is the volume's own: the next overwrite is in place again.
    vol.write(0, &pattern(8192, 5), false).await.unwrap();
    assert_eq!(pbas_of(&pool, "v", 0, 2), moved);
    assert_same_bytes!(vol.read(0, 8192).await.unwrap(), pattern(8192, 5));
}

#[tokio::test]
async fn blocks_overwritten_in_place_and_never_flushed_read_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let pool = open(&path, 64 * MIB).await;
    pool.create_volume("v", 4 * MIB).await.unwrap();
    let vol = pool.volume("v").unwrap();
    vol.write(0, &pattern(MIB as usize, 1), true).await.unwrap();
    vol.write(0, &pattern(MIB as usize, 2), true).await.unwrap();
    // Overwritten in place after the last flush: on the device, with CRCs
    // only in memory.
    vol.write(0, &pattern(MIB as usize, 3), false)
        .await
        .unwrap();
    let torn = pba_of(&pool, "v", 9);
    drop(vol);
    drop(pool); // a crash
                // A torn write: half of block 9 is the new data, half the old.
    let half = &pattern(MIB as usize, 2)[9 * 4096..9 * 4096 + 2048];
    write_pool_file(&path, torn as u64 * 4096, half);

    let pool = open(&path, 64 * MIB).await;
    let vol = pool.volume("v").unwrap();
    let data = vol.read(0, MIB as u32).await.unwrap();
    let mut expected = pattern(MIB as usize, 3);
    expected[9 * 4096..9 * 4096 + 2048].copy_from_slice(half);
    assert_same_bytes!(data, expected);
    assert_eq!(pool.checksum_failures(), 0);
    // The scan's result is durable: the next open finds nothing to adopt
    // and the data reads the same.
    drop(vol);
    drop(pool);
    let pool = open(&path, 64 * MIB).await;
    assert_same_bytes!(
        pool.volume("v").unwrap().read(0, MIB as u32).await.unwrap(),
        expected
    );
}

#[tokio::test]
async fn after_a_clean_close_a_flipped_byte_in_an_overwritten_block_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let pool = open(&path, 64 * MIB).await;
    pool.create_volume("v", 4 * MIB).await.unwrap();
    let vol = pool.volume("v").unwrap();
    vol.write(0, &pattern(8192, 1), true).await.unwrap();
    vol.write(0, &pattern(8192, 2), true).await.unwrap(); // in place
    let pba = pba_of(&pool, "v", 1);
    drop(vol);
    pool.close().await.unwrap(); // closes the overwrite regions
    drop(pool);
    write_pool_file(&path, pba as u64 * 4096 + 7, &[0xee]);
    let pool = open(&path, 64 * MIB).await;
    let vol = pool.volume("v").unwrap();
    assert!(matches!(
        vol.read(4096, 4096).await,
        Err(BlockError::Checksum(_))
    ));
    assert_same_bytes!(
        vol.read(0, 4096).await.unwrap(),
        pattern(4096 * 2, 2)[..4096]
    );
    assert_eq!(pool.checksum_failures(), 1);
}

#[tokio::test]
async fn a_write_abandoned_mid_flight_still_lands_whole_with_its_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    // pread/pwrite on the blocking pool: the caller is surely waiting on
    // I/O in flight when it gives up.
    let sync = PoolOptions {
        engine: EngineKind::Sync,
        ..options(64 * MIB)
    };
    let pool = Pool::open(&path, &sync, Arc::new(Metrics::new()))
        .await
        .unwrap();
    pool.create_volume("v", 4 * MIB).await.unwrap();
    let vol = Arc::new(pool.volume("v").unwrap());
    vol.write(0, &pattern(MIB as usize, 1), true).await.unwrap();
    // Again, so the region is open and the writes below go straight to I/O.
    vol.write(0, &pattern(MIB as usize, 1), true).await.unwrap();
    for round in 0..10u8 {
        // The caller gives up once the write is under way (its I/O submitted).
        let caller = tokio::spawn({
            let vol = vol.clone();
            async move { vol.write(0, &pattern(MIB as usize, round + 2), false).await }
        });
        for _ in 0..=round {
            tokio::task::yield_now().await;
        }
        caller.abort();
        let _ = caller.await;
    }
    // The abandoned writes finish on their own; wait for the last one.
    drop(vol.ranges.lock(0, 256).await);
    // A clean close: no region stays open, so any block whose data and
    // checksum disagree would now read as corrupt.
    pool.close().await.unwrap();
    drop(vol);
    drop(pool);
    let pool = open(&path, 64 * MIB).await;
    let data = pool.volume("v").unwrap().read(0, MIB as u32).await.unwrap();
    let sent: Vec<Vec<u8>> = (1..12u8).map(|seed| pattern(MIB as usize, seed)).collect();
    for (i, block) in data.chunks(4096).enumerate() {
        assert!(
            sent.iter().any(|p| block == &p[i * 4096..(i + 1) * 4096]),
            "block {i} holds data no write sent"
        );
    }
    assert_eq!(pool.checksum_failures(), 0);
}

#[tokio::test]
async fn reads_during_in_place_overwrites_see_whole_blocks_never_errors() {
    let dir = tempfile::tempdir().unwrap();
    let pool = open(&dir.path().join("pool"), 64 * MIB).await;
    pool.create_volume("v", 4 * MIB).await.unwrap();
    let vol = Arc::new(pool.volume("v").unwrap());
    const LEN: usize = 64 * 4096;
    vol.write(0, &[0u8; LEN], true).await.unwrap();
    let writer = tokio::spawn({
        let vol = vol.clone();
        async move {
            for round in 1..=200u32 {
                vol.write(0, &vec![round as u8; LEN], false).await.unwrap();
            }
        }
    });
    let mut reads = 0;
    while !writer.is_finished() {
        let data = vol.read(0, LEN as u32).await.expect("no read fails");
        for block in data.chunks(4096) {
            assert!(
                block.iter().all(|b| *b == block[0]),
                "a torn block was returned"
            );
        }
        reads += 1;
    }
    writer.await.unwrap();
    assert!(reads > 0);
    assert_eq!(pool.checksum_failures(), 0);
}

#[tokio::test]
async fn a_flipped_byte_is_an_io_error_never_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let pool = open(&path, 64 * MIB).await;
    pool.create_volume("v", 4 * MIB).await.unwrap();
    let vol = pool.volume("v").unwrap();
    vol.write(0, &pattern(3 * 4096, 9), true).await.unwrap();
    let pba = pba_of(&pool, "v", 1);
    drop(vol);
    drop(pool);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let at = pba as u64 * 4096 + 100;
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 0x40], at).unwrap();
    drop(file);
    let metrics = Arc::new(Metrics::new());
    let pool = Pool::open(&path, &options(64 * MIB), metrics.clone())
        .await
        .unwrap();
    let vol = pool.volume("v").unwrap();
    assert!(matches!(
        vol.read(4096, 4096).await,
        Err(BlockError::Checksum(_))
    ));
    assert!(matches!(
        vol.read(0, 3 * 4096).await,
        Err(BlockError::Checksum(_))
    ));
    // The good neighbours still read.
    assert_same_bytes!(
        vol.read(0, 4096).await.unwrap(),
        pattern(3 * 4096, 9)[..4096]
    );
    assert_same_bytes!(
        vol.read(8192, 4096).await.unwrap(),
        pattern(3 * 4096, 9)[8192..]
    );
    assert_eq!(pool.checksum_failures(), 2);
    assert!(metrics
        .encode()
        .contains("strata_checksum_failures_total{volume=\"v\"} 2"));
    // A partial write into the bad block must not launder it into good data.
    assert!(matches!(
        vol.write(4096 + 10, b"x", false).await,
        Err(BlockError::Checksum(_))
    ));
    // A full overwrite replaces it.
    vol.write(4096, &[5u8; 4096], false).await.unwrap();
    assert_same_bytes!(vol.read(4096, 4096).await.unwrap(), vec![5u8; 4096]);
}

#[tokio::test]
async fn space_is_allocated_on_write_and_returned_on_trim_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let pool = open(&dir.path().join("pool"), 64 * MIB).await;
    let base = pool.usage().used;
    assert_eq!(base, 0);
    pool.create_volume("v", 1 << 40)
        .await
        .expect_err("over the overcommit limit");
    pool.create_volume("v", 16 * MIB).await.unwrap();
    assert_eq!(pool.usage().used, 0, "thin: nothing allocated at create");
    let vol = pool.volume("v").unwrap();
    vol.write(0, &vec![1u8; 4 * MIB as usize], false)
        .await
        .unwrap();
    vol.flush().await.unwrap();
    assert_eq!(pool.usage().used, 4 * MIB);
    // Overwrites do not grow usage once flushed.
    vol.write(0, &vec![2u8; 4 * MIB as usize], false)
        .await
        .unwrap();
    vol.flush().await.unwrap();
    assert_eq!(pool.usage().used, 4 * MIB);
    assert_eq!(pool.volume_info("v").unwrap().allocated, 4 * MIB);
    vol.trim(MIB, 2 * MIB).await.unwrap();
    vol.flush().await.unwrap();
    assert_eq!(pool.usage().used, 2 * MIB);
    assert_same_bytes!(vol.read(MIB, 4096).await.unwrap(), vec![0u8; 4096]);
    vol.write_zeroes(0, 4096 + 7, false, false).await.unwrap();
    assert_same_bytes!(
        vol.read(0, 8192).await.unwrap()[..4096 + 7],
        vec![0u8; 4096 + 7][..]
    );
    assert_same_bytes!(vol.read(4096 + 7, 1).await.unwrap(), vec![2u8]);
    drop(vol);
    pool.delete_volume("v").await.unwrap();
    assert_eq!(pool.usage().used, 0);
    assert!(matches!(
        pool.delete_volume("v").await,
        Err(PoolError::NotFound(_))
    ));
}

#[tokio::test]
async fn a_full_pool_says_enospc_and_keeps_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let pool = open(&path, 16 * MIB).await;
    let capacity = pool.usage().capacity;
    pool.create_volume("big", capacity * 2).await.unwrap();
    let vol = pool.volume("big").unwrap();
    let chunk = 256 * 1024;
    let mut written = 0u64;
    let err = loop {
        match vol
            .write(
                written,
                &pattern(chunk, (written / chunk as u64) as u8),
                false,
            )
            .await
        {
            Ok(()) => written += chunk as u64,
            Err(err) => break err,
        }
        assert!(written < capacity * 2, "never ran out of space");
    };
    assert_eq!(err, BlockError::NoSpace);
    assert!(written > capacity / 2, "wrote only {written} of {capacity}");
    vol.flush().await.unwrap();
    // Overwrites still work on a full pool (the reserve), and so does reading.
    vol.write(0, &pattern(chunk, 0xAA), false).await.unwrap();
    vol.flush().await.unwrap();
    drop(vol);
    drop(pool);
    let pool = open(&path, 16 * MIB).await;
    let vol = pool.volume("big").unwrap();
    assert_same_bytes!(
        vol.read(0, chunk as u32).await.unwrap(),
        pattern(chunk, 0xAA)
    );
    let mut at = chunk as u64;
    while at < written {
        let expected = pattern(chunk, (at / chunk as u64) as u8);
        assert_same_bytes!(
            vol.read(at, chunk as u32).await.unwrap(),
            expected,
            "at {at}"
        );
        at += chunk as u64;
    }
}

#[tokio::test]
async fn many_commits_wrap_the_journal_into_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let pool = open(&path, 32 * MIB).await;
    pool.create_volume("v", 8 * MIB).await.unwrap();
    let vol = pool.volume("v").unwrap();
    let journal_blocks = pool.superblock.layout.journal_blocks;
    // Each flush writes at least one journal block: go round several times.
    for i in 0..(journal_blocks * 3) {
        let lba = i % 2048;
        vol.write(lba * 4096, &[(i % 251) as u8; 4096], false)
            .await
            .unwrap();
        vol.flush().await.unwrap();
    }
    let image = vol.read(0, 8 * MIB as u32).await.unwrap();
    drop(vol);
    drop(pool);
    let pool = open(&path, 32 * MIB).await;
    assert_same_bytes!(
        pool.volume("v")
            .unwrap()
            .read(0, 8 * MIB as u32)
            .await
            .unwrap(),
        image
    );
}

#[tokio::test]
async fn a_torn_journal_batch_is_ignored_and_earlier_batches_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let pool = open(&path, 32 * MIB).await;
    pool.create_volume("v", 4 * MIB).await.unwrap();
    let vol = pool.volume("v").unwrap();
    vol.write(0, &[1u8; 4096], true).await.unwrap();
    // A batch of 300 records spans several journal blocks, after the first batch's one.
    vol.write(4096, &vec![2u8; 300 * 4096], true).await.unwrap();
    let last_block_of_second_batch = format::journal_batch_blocks(300);
    assert!(last_block_of_second_batch >= 2);
    let journal_start = pool.superblock.layout.journal_start;
    drop(vol);
    drop(pool);
    // Tear the second batch: damage its last block, as if power failed mid-write.
    write_pool_file(
        &path,
        (journal_start + last_block_of_second_batch) * 4096 + 512,
        &[0xFF; 64],
    );
    let pool = open(&path, 32 * MIB).await;
    let vol = pool.volume("v").unwrap();
    assert_same_bytes!(vol.read(0, 4096).await.unwrap(), vec![1u8; 4096]);
    assert!(vol.read(4096, 4096).await.unwrap().iter().all(|b| *b == 0));
    assert_eq!(
        pool.usage().used,
        4096,
        "the torn batch's blocks are free again"
    );
}

#[tokio::test]
async fn concurrent_partial_writes_to_one_block_both_land() {
    let dir = tempfile::tempdir().unwrap();
    let pool = open(&dir.path().join("pool"), 32 * MIB).await;
    pool.create_volume("v", MIB).await.unwrap();
    let vol = Arc::new(pool.volume("v").unwrap());
    let mut tasks = Vec::new();
    for i in 0..8u64 {
        let vol = vol.clone();
        tasks.push(tokio::spawn(async move {
            vol.write(i * 512, &[i as u8 + 1; 512], false)
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let block = vol.read(0, 4096).await.unwrap();
    for i in 0..8usize {
        assert!(
            block[i * 512..(i + 1) * 512]
                .iter()
                .all(|b| *b == i as u8 + 1),
            "sector {i}"
        );
    }
}

#[tokio::test]
async fn volume_management_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let pool = open(&dir.path().join("pool"), 32 * MIB).await;
    for bad in ["", "-x", "a/b", "a b", &"x".repeat(200)] {
        assert!(
            matches!(
                pool.create_volume(bad, MIB).await,
                Err(PoolError::Invalid(_))
            ),
            "{bad:?}"
        );
    }
    assert!(matches!(
        pool.create_volume("v", 0).await,
        Err(PoolError::Invalid(_))
    ));
    let info = pool.create_volume("v", 1000).await.unwrap();
    assert_eq!(info.size, 4096, "rounded up to the block size");
    assert!(matches!(
        pool.create_volume("v", MIB).await,
        Err(PoolError::AlreadyExists(_))
    ));
    assert_eq!(
        pool.resize_volume("v", 2 * MIB).await.unwrap().size,
        2 * MIB
    );
    assert!(matches!(
        pool.resize_volume("v", MIB).await,
        Err(PoolError::Invalid(_))
    ));
    assert!(matches!(
        pool.resize_volume("nope", MIB).await,
        Err(PoolError::NotFound(_))
    ));
    let vol = pool.volume("v").unwrap();
    assert_eq!(vol.size(), 2 * MIB);
    assert!(matches!(
        vol.read(2 * MIB - 1, 2).await,
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        vol.write(u64::MAX, b"x", false).await,
        Err(BlockError::OutOfRange { .. })
    ));
    pool.delete_volume("v").await.unwrap();
    assert_eq!(vol.read(0, 1).await, Err(BlockError::Gone));
}

#[tokio::test]
async fn a_device_holding_something_else_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other");
    std::fs::write(&path, vec![0x55u8; 32 * MIB as usize]).unwrap();
    let err = Pool::open(&path, &options(32 * MIB), Arc::new(Metrics::new()))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, PoolError::Corrupt(_)), "{err}");
    assert_eq!(
        std::fs::read(&path).unwrap()[..4],
        [0x55; 4],
        "left untouched"
    );
}

#[tokio::test]
async fn preallocation_writes_the_whole_file_once() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let opts = PoolOptions {
        preallocate: true,
        ..options(32 * MIB)
    };
    let pool = Pool::open(&path, &opts, Arc::new(Metrics::new()))
        .await
        .unwrap();
    // st_blocks counts 512-byte units actually allocated: no holes left.
    assert!(std::fs::metadata(&path).unwrap().blocks() * 512 >= 32 * MIB);
    pool.create_volume("v", MIB).await.unwrap();
    let vol = pool.volume("v").unwrap();
    vol.write(0, &[3u8; 4096], true).await.unwrap();
    drop(vol);
    drop(pool);
    // Reopening an existing pool never preallocates (or formats) again.
    let pool = Pool::open(&path, &opts, Arc::new(Metrics::new()))
        .await
        .unwrap();
    assert_same_bytes!(
        pool.volume("v").unwrap().read(0, 4096).await.unwrap(),
        [3u8; 4096]
    );
    // A sparse pool leaves the data area unallocated.
    let sparse = dir.path().join("sparse");
    drop(
        Pool::open(&sparse, &options(32 * MIB), Arc::new(Metrics::new()))
            .await
            .unwrap(),
    );
    assert!(std::fs::metadata(&sparse).unwrap().blocks() * 512 < 8 * MIB);
}

/// The bytes a snapshot holds, read through a throwaway clone.
async fn snapshot_bytes(pool: &Arc<Pool>, snapshot: &str, offset: u64, len: u32) -> Vec<u8> {
    let clone = format!("read-{snapshot}");
    pool.create_volume_from_snapshot(&clone, snapshot, None)
        .await
        .unwrap();
    let data = pool
        .volume(&clone)
        .unwrap()
        .read(offset, len)
        .await
        .unwrap();
    pool.delete_volume(&clone).await.unwrap();
    data.to_vec()
}

#[tokio::test]
async fn snapshots_share_blocks_keep_old_data_and_return_space_on_last_delete() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let pool = open(&path, 64 * MIB).await;
    pool.create_volume("v", 16 * MIB).await.unwrap();
    let vol = pool.volume("v").unwrap();
    let a = pattern(4 * MIB as usize, 1);
    vol.write(0, &a, false).await.unwrap();
    vol.flush().await.unwrap();
    assert_eq!(pool.usage().used, 4 * MIB);

    let snap = pool.create_snapshot("v", "monday").await.unwrap();
    assert_eq!((snap.source.as_str(), snap.size), ("v", 16 * MIB));
    assert_eq!(pool.usage().used, 4 * MIB, "no data is copied");
    assert_eq!((snap.referenced, snap.exclusive), (4 * MIB, 0));
    assert!(
        pool.volume("monday").is_none(),
        "a snapshot is not writable"
    );
    assert!(matches!(
        pool.create_snapshot("v", "monday").await,
        Err(PoolError::SnapshotExists(_))
    ));
    assert!(matches!(
        pool.create_snapshot("nope", "x").await,
        Err(PoolError::NotFound(_))
    ));

    // Overwriting 1 MiB of the volume takes 1 MiB more: the snapshot keeps the old.
    vol.write(0, &vec![0xB0; MIB as usize], false)
        .await
        .unwrap();
    vol.flush().await.unwrap();
    assert_eq!(pool.usage().used, 5 * MIB);
    assert_eq!(pool.snapshot_info("monday").unwrap().exclusive, MIB);
    assert_same_bytes!(
        snapshot_bytes(&pool, "monday", 0, MIB as u32).await,
        a[..MIB as usize]
    );

    // A clone shares the snapshot's blocks and is writable on its own.
    let clone = pool
        .create_volume_from_snapshot("clone", "monday", Some(32 * MIB))
        .await
        .unwrap();
    assert_eq!((clone.size, clone.allocated), (32 * MIB, 4 * MIB));
    assert_eq!(pool.usage().used, 5 * MIB);
    let cv = pool.volume("clone").unwrap();
    cv.write(2 * MIB, &vec![0xC0; MIB as usize], true)
        .await
        .unwrap();
    assert_same_bytes!(
        cv.read(0, 4 * MIB as u32).await.unwrap()[..2 * MIB as usize],
        a[..2 * MIB as usize]
    );
    assert_same_bytes!(
        cv.read(2 * MIB, MIB as u32).await.unwrap(),
        vec![0xC0; MIB as usize]
    );
    assert_same_bytes!(
        vol.read(2 * MIB, MIB as u32).await.unwrap(),
        a[2 * MIB as usize..3 * MIB as usize],
        "the source volume does not see the clone's write"
    );
    assert!(matches!(
        pool.create_volume_from_snapshot("small", "monday", Some(MIB))
            .await,
        Err(PoolError::Invalid(_))
    ));

    // Deleting the volume keeps the snapshot whole; deleting the last
    // reference to each block returns it.
    drop(vol);
    pool.delete_volume("v").await.unwrap();
    assert_eq!(
        pool.usage().used,
        5 * MIB,
        "the snapshot and clone hold 4 MiB + 1 MiB"
    );
    drop(cv);
    drop(pool);
    let pool = open(&path, 64 * MIB).await;
    assert_eq!(
        pool.usage().used,
        5 * MIB,
        "reference counts rebuilt at open"
    );
    assert_same_bytes!(snapshot_bytes(&pool, "monday", 0, 4 * MIB as u32).await, a);
    assert_eq!(pool.list_snapshots().len(), 1);
    pool.delete_snapshot("monday").await.unwrap();
    assert_eq!(pool.usage().used, 4 * MIB, "the clone's own blocks remain");
    assert_same_bytes!(
        pool.volume("clone")
            .unwrap()
            .read(0, MIB as u32)
            .await
            .unwrap(),
        a[..MIB as usize]
    );
    pool.delete_volume("clone").await.unwrap();
    assert_eq!(pool.usage().used, 0);
    assert!(matches!(
        pool.delete_snapshot("monday").await,
        Err(PoolError::SnapshotNotFound(_))
    ));
}

#[tokio::test]
async fn a_snapshot_holds_what_completed_before_it_across_crashes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let pool = open(&path, 64 * MIB).await;
    pool.create_volume("v", 4 * MIB).await.unwrap();
    let vol = pool.volume("v").unwrap();
    // Not flushed before the snapshot: taking the snapshot makes it durable.
    vol.write(0, &pattern(8192, 1), false).await.unwrap();
    pool.create_snapshot("v", "s").await.unwrap();
    vol.write(0, &pattern(4096, 2), true).await.unwrap(); // FUA, after the snapshot
    vol.write(4096, &pattern(4096, 3), false).await.unwrap(); // never flushed
    drop(vol);
    drop(pool); // a crash: nothing more reaches the disk
    let pool = open(&path, 64 * MIB).await;
    let vol = pool.volume("v").unwrap();
    assert_same_bytes!(vol.read(0, 4096).await.unwrap(), pattern(4096, 2));
    assert_same_bytes!(
        vol.read(4096, 4096).await.unwrap(),
        pattern(8192, 1)[4096..]
    );
    assert_same_bytes!(snapshot_bytes(&pool, "s", 0, 8192).await, pattern(8192, 1));
    assert_eq!(
        pool.usage().used,
        3 * 4096,
        "two shared blocks and one overwritten: no leak"
    );

    // A crash while the snapshot's checkpoint is being written (torn, so its
    // CRC fails) leaves the pool as before the snapshot: no snapshot, no
    // extra references, the volume's flushed data intact.
    pool.create_snapshot("v", "torn").await.unwrap();
    let generation = pool.commit.lock().await.checkpoint_generation;
    let slot = pool.superblock.layout.checkpoint_start[(generation % 2) as usize];
    drop(vol);
    drop(pool);
    write_pool_file(&path, slot * 4096 + 4096 + 100, &[0xEE; 512]);
    let pool = open(&path, 64 * MIB).await;
    assert!(pool.snapshot_info("torn").is_none());
    assert!(pool.snapshot_info("s").is_some());
    assert_same_bytes!(
        pool.volume("v").unwrap().read(0, 4096).await.unwrap(),
        pattern(4096, 2)
    );
    pool.delete_snapshot("s").await.unwrap();
    assert_eq!(
        pool.usage().used,
        2 * 4096,
        "only the volume's blocks remain"
    );
}

#[tokio::test]
async fn overwrites_of_shared_blocks_count_as_growth_and_metadata_room_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let pool = open(&path, 16 * MIB).await;
    let capacity = pool.usage().capacity;
    // Room to provision a clone of it too (for reading the snapshot).
    pool.create_volume("v", capacity).await.unwrap();
    let vol = pool.volume("v").unwrap();
    let half = (capacity / 2).next_multiple_of(MIB) - MIB;
    vol.write(0, &vec![7u8; half as usize], true).await.unwrap();
    pool.create_snapshot("v", "s").await.unwrap();
    // Overwriting everything would need another `half` of space: what the
    // snapshot holds is not free, so the writes run out with ENOSPC...
    let mut at = 0;
    let err = loop {
        match vol.write(at, &vec![8u8; MIB as usize], false).await {
            Ok(()) => at += MIB,
            Err(err) => break err,
        }
        assert!(at <= half, "never ran out of space");
    };
    assert_eq!(err, BlockError::NoSpace);
    vol.flush().await.unwrap();
    // ... and the snapshot still reads whole.
    assert_same_bytes!(
        snapshot_bytes(&pool, "s", 0, MIB as u32).await,
        vec![7u8; MIB as usize]
    );
    // Deleting the snapshot returns the space the overwrites freed.
    pool.delete_snapshot("s").await.unwrap();
    vol.write(at, &vec![8u8; MIB as usize], true).await.unwrap();

    // Each snapshot's map takes metadata room; past what a checkpoint slot
    // holds, taking another is refused and the pool stays consistent.
    let mut taken = 0;
    let err = loop {
        match pool.create_snapshot("v", &format!("s{taken}")).await {
            Ok(_) => taken += 1,
            Err(err) => break err,
        }
        assert!(taken < 100, "metadata never filled up");
    };
    assert!(
        matches!(err, PoolError::NoSpace(ref m) if m.contains("metadata")),
        "{err}"
    );
    assert!(taken >= 1);
    drop(vol);
    drop(pool);
    let pool = open(&path, 16 * MIB).await;
    assert_eq!(pool.list_snapshots().len(), taken);
}

#[tokio::test]
async fn a_version_1_pool_opens_is_upgraded_and_takes_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let pool = open(&path, 32 * MIB).await;
    pool.create_volume("old", MIB).await.unwrap();
    pool.volume("old")
        .unwrap()
        .write(0, &pattern(8192, 5), true)
        .await
        .unwrap();
    pool.checkpoint().await.unwrap();
    let layout = pool.superblock.layout;
    let superblock = pool.superblock.clone();
    drop(pool);
    // Rewrite it as a version 1 build would have left it: old superblock, the
    // state in an old-format checkpoint, the other slot empty.
    let engine = IoEngine::open(&path, EngineKind::Sync).unwrap();
    let checkpoint = read_newest_checkpoint(&engine, &layout).await.unwrap();
    let slot = (checkpoint.generation % 2) as usize;
    write_bytes(
        &engine,
        layout.checkpoint_start[slot],
        &checkpoint.encode_version_1(),
    )
    .await
    .unwrap();
    write_bytes(
        &engine,
        layout.checkpoint_start[1 - slot],
        &[0u8; BLOCK_SIZE],
    )
    .await
    .unwrap();
    write_bytes(&engine, 0, &superblock.encode_version_1())
        .await
        .unwrap();
    engine.sync_data().await.unwrap();
    drop(engine);

    let pool = open(&path, 32 * MIB).await;
    assert_eq!(pool.superblock.format_version, format::FORMAT_VERSION);
    assert_same_bytes!(
        pool.volume("old").unwrap().read(0, 8192).await.unwrap(),
        pattern(8192, 5)
    );
    pool.create_snapshot("old", "snap").await.unwrap();
    drop(pool);
    let block = std::fs::read(&path).unwrap()[..BLOCK_SIZE].to_vec();
    assert_eq!(
        Superblock::decode(&block).unwrap().format_version,
        format::FORMAT_VERSION,
        "upgraded on disk"
    );
    let pool = open(&path, 32 * MIB).await;
    assert_same_bytes!(
        snapshot_bytes(&pool, "snap", 0, 8192).await,
        pattern(8192, 5)
    );
}

/// A pool on the pread/pwrite engine, whose syncs a test can make fail.
async fn open_with_faults(path: &Path, size: u64) -> Arc<Pool> {
    let options = PoolOptions {
        engine: EngineKind::Sync,
        ..options(size)
    };
    Pool::open(path, &options, Arc::new(Metrics::new()))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_failed_checkpoint_landed_or_not_loses_no_later_flushed_write() {
    // Its last sync fails (it may be on disk) or its first does (it is not).
    for syncs_before_failure in [1, 0] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool");
        let pool = open_with_faults(&path, 64 * MIB).await;
        pool.create_volume("v", 4 * MIB).await.unwrap();
        let vol = pool.volume("v").unwrap();
        vol.write(0, &pattern(4096, 1), false).await.unwrap();
        vol.flush().await.unwrap(); // a journal batch at the journal's start
        pool.engine.faults().fail_syncs_after(syncs_before_failure);
        assert!(pool.resize_volume("v", 8 * MIB).await.is_err());
        pool.engine.faults().heal();
        vol.write(4096, &pattern(4096, 2), false).await.unwrap();
        // Past the old end: the new size is in memory, and must be durable
        // before a record of this write is.
        vol.write(6 * MIB, &pattern(4096, 3), false).await.unwrap();
        vol.flush().await.unwrap();
        drop(vol);
        drop(pool); // a crash: the durable state is all there is
        let pool = open_with_faults(&path, 64 * MIB).await;
        let vol = pool.volume("v").unwrap();
        assert_eq!(vol.size(), 8 * MIB, "the resize took effect with the flush");
        assert_same_bytes!(vol.read(0, 4096).await.unwrap(), pattern(4096, 1));
        assert_same_bytes!(
            vol.read(4096, 4096).await.unwrap(),
            pattern(4096, 2),
            "a write flushed after the failed checkpoint ({syncs_before_failure})"
        );
        assert_same_bytes!(vol.read(6 * MIB, 4096).await.unwrap(), pattern(4096, 3));
    }
}

#[tokio::test]
async fn a_failed_delete_or_create_leaves_the_pool_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    // Small, so blocks freed by mistake would be handed out again at once.
    let pool = open_with_faults(&path, 16 * MIB).await;
    pool.create_volume("keep", 4 * MIB).await.unwrap();
    let keep = pool.volume("keep").unwrap();
    keep.write(0, &pattern(2 * MIB as usize, 1), false)
        .await
        .unwrap();
    keep.flush().await.unwrap();
    pool.create_snapshot("keep", "snap").await.unwrap();
    keep.write(0, &pattern(MIB as usize, 2), false)
        .await
        .unwrap();
    keep.flush().await.unwrap();
    pool.create_volume("other", 8 * MIB).await.unwrap();

    let faults = pool.engine.faults();
    faults.fail_syncs_after(0);
    assert!(pool.delete_volume("keep").await.is_err());
    assert!(pool.delete_snapshot("snap").await.is_err());
    assert!(pool.create_volume("new", MIB).await.is_err());
    faults.heal();
    let names: Vec<String> = pool.list_volumes().into_iter().map(|v| v.name).collect();
    assert_eq!(names, ["keep", "other"], "the failed delete and create");
    assert!(
        pool.snapshot_info("snap").is_some(),
        "the failed snapshot delete"
    );

    // Every free block is used and flushed: none of the kept ones may be among them.
    let other = pool.volume("other").unwrap();
    for i in 0..8u64 {
        let _ = other.write(i * MIB, &pattern(MIB as usize, 9), false).await;
    }
    other.flush().await.unwrap();
    drop((keep, other));
    drop(pool); // a crash
    let pool = open_with_faults(&path, 16 * MIB).await;
    let keep = pool.volume("keep").unwrap();
    let mut expected = pattern(2 * MIB as usize, 1);
    expected[..MIB as usize].copy_from_slice(&pattern(MIB as usize, 2));
    assert_same_bytes!(keep.read(0, 2 * MIB as u32).await.unwrap(), expected);
    assert_same_bytes!(
        snapshot_bytes(&pool, "snap", 0, 2 * MIB as u32).await,
        pattern(2 * MIB as usize, 1)
    );
    assert_eq!(pool.checksum_failures(), 0);
    // And the delete goes through now.
    pool.create_volume("new", MIB).await.unwrap();
    pool.delete_volume("keep").await.unwrap();
    pool.delete_snapshot("snap").await.unwrap();
}

#[tokio::test]
async fn a_failed_in_place_write_leaves_blocks_that_read_even_once_shared() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let pool = open_with_faults(&path, 64 * MIB).await;
    pool.create_volume("v", 4 * MIB).await.unwrap();
    let vol = pool.volume("v").unwrap();
    vol.write(0, &pattern(32768, 1), false).await.unwrap();
    vol.write(0, &pattern(32768, 2), false).await.unwrap(); // in place
    vol.flush().await.unwrap();
    // The device takes the first half of the next write and fails it.
    pool.engine
        .faults()
        .tear_writes
        .store(true, Ordering::SeqCst);
    assert!(vol.write(0, &pattern(32768, 3), false).await.is_err());
    pool.engine.faults().heal();
    let mut torn = pattern(32768, 2);
    torn[..16384].copy_from_slice(&pattern(32768, 3)[..16384]);
    assert_same_bytes!(
        vol.read(0, 32768).await.unwrap(),
        torn,
        "blocks after the failed write read as what the device holds"
    );
    // Shared now: a scan after a crash would pass over these blocks.
    pool.create_snapshot("v", "s").await.unwrap();
    drop(vol);
    drop(pool); // a crash
    let pool = open_with_faults(&path, 64 * MIB).await;
    let vol = pool.volume("v").unwrap();
    assert_same_bytes!(vol.read(0, 32768).await.unwrap(), torn);
    assert_same_bytes!(snapshot_bytes(&pool, "s", 0, 32768).await, torn);
    assert_eq!(pool.checksum_failures(), 0);
}

#[tokio::test]
async fn shared_writes_of_whole_blocks_and_of_odd_bytes_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let pool = open(&path, 64 * MIB).await;
    pool.create_volume("v", 4 * MIB).await.unwrap();
    let vol = pool.volume("v").unwrap();
    let mut image = vec![0u8; 4 * MIB as usize];
    let shared = |data: &[u8]| {
        let mut buf = pool.write_buffer(data.len());
        buf.copy_from_slice(data);
        Bytes::from_owner(buf)
    };
    // Whole blocks in the pool's own memory: written as they are, new, then
    // in place, then over blocks a snapshot shares (copy-on-write).
    for (round, at) in [(1u8, 8192u64), (2, 8192), (3, 0)] {
        let data = pattern(65536, round);
        vol.write_owned(at, shared(&data), false).await.unwrap();
        image[at as usize..at as usize + data.len()].copy_from_slice(&data);
        if round == 2 {
            pool.create_snapshot("v", "s").await.unwrap();
        }
    }
    // Not whole blocks, or not aligned memory: copied, merged, written.
    let odd = pattern(5000, 4);
    vol.write_owned(100, Bytes::from(odd.clone()), false)
        .await
        .unwrap();
    image[100..5100].copy_from_slice(&odd);
    let unaligned = Bytes::from(pattern(4097, 5)).slice(1..);
    vol.write_owned(MIB, unaligned.clone(), false)
        .await
        .unwrap();
    image[MIB as usize..MIB as usize + 4096].copy_from_slice(&unaligned);
    vol.flush().await.unwrap();
    assert_same_bytes!(vol.read(0, 4 * MIB as u32).await.unwrap(), image);
    drop(vol);
    drop(pool);
    let pool = open(&path, 64 * MIB).await;
    let vol = pool.volume("v").unwrap();
    assert_same_bytes!(vol.read(0, 4 * MIB as u32).await.unwrap(), image);
    assert_eq!(pool.checksum_failures(), 0);
}

/// A node that stops drops the runtimes its connections run on, with the
/// write tasks on them. An in-place write dropped after its data went to the
/// device may land, though its new checksum never reaches the map: the clean
/// stop's commit must not close its region as if it had, or the block fails
/// its checksum from then on (a replica whose header write was cut off so
/// was deleted as unfinished when its node started again).
#[tokio::test]
async fn an_in_place_write_dropped_by_a_stopping_runtime_still_reads_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let pool = open_with_faults(&path, 64 * MIB).await;
    let vol = volume_v_written_in_place_next(&pool).await;
    let writes = pool.engine.faults().hold.clone();
    writes.set(true);
    drop_a_held_write(&pool, &writes, &pattern(4096, 3));
    writes.release().await;

    drop(vol);
    assert_block_0_after_a_clean_stop(pool, &path, &pattern(4096, 3)).await;
}

/// Creates volume "v" and writes its block 0 twice, durably. The second
/// write goes in place and opens the block's region, so the next write to
/// block 0 goes straight to the device, in place.
async fn volume_v_written_in_place_next(pool: &Arc<Pool>) -> Volume {
    pool.create_volume("v", 4 * MIB).await.unwrap();
    let vol = pool.volume("v").unwrap();
    vol.write(0, &pattern(4096, 1), true).await.unwrap();
    vol.write(0, &pattern(4096, 2), true).await.unwrap();
    vol
}

/// Writes `data` to block 0 of volume "v" on a runtime of its own, which
/// stops (as a node's connection runtimes do) while the write waits at the
/// device, held by `hold`.
fn drop_a_held_write(pool: &Arc<Pool>, hold: &Arc<IoHold>, data: &[u8]) {
    let writer = pool.volume("v").unwrap();
    let held = hold.clone();
    let data = data.to_vec();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.spawn(async move { writer.write(0, &data, false).await });
        runtime.block_on(held.until_held());
        runtime.shutdown_background();
    })
    .join()
    .unwrap();
}

/// Closes `pool` as a clean stop does, opens it again, and checks that block
/// 0 of volume "v" reads `expected` with no checksum failure.
async fn assert_block_0_after_a_clean_stop(pool: Arc<Pool>, path: &Path, expected: &[u8]) {
    pool.close().await.unwrap();
    drop(pool);
    let pool = open_with_faults(path, 64 * MIB).await;
    let vol = pool.volume("v").unwrap();
    assert_same_bytes!(vol.read(0, 4096).await.unwrap(), expected);
    assert_eq!(pool.checksum_failures(), 0);
}

/// A commit whose future is dropped halfway (a client that goes away in the
/// middle of a FLUSH, a node's connection runtime stopping) puts the map
/// changes it took back: the next commit, here the clean stop's, records
/// them before it closes their overwrite region. Lost, the region closed
/// with the old checksum while the block held the new data.
#[tokio::test]
async fn a_commit_dropped_halfway_keeps_its_changes_for_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let pool = open_with_faults(&path, 64 * MIB).await;
    let vol = volume_v_written_in_place_next(&pool).await;
    vol.write(0, &pattern(4096, 3), false).await.unwrap(); // in place, pending

    let hold = pool.engine.faults().hold.clone();
    hold.set(true);
    let committing = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.commit().await })
    };
    hold.until_held().await;
    committing.abort();
    assert!(committing.await.unwrap_err().is_cancelled());
    hold.release().await;

    drop(vol);
    assert_block_0_after_a_clean_stop(pool, &path, &pattern(4096, 3)).await;
}

/// A commit whose batch landed at the journal's start but whose sync failed
/// keeps its changes pending; a checkpoint then takes them, and newer ones.
/// Replay after that checkpoint must not apply the stray batch on top: here
/// it would map a trimmed block again, its old data back in the volume.
#[tokio::test]
async fn a_stray_batch_from_a_failed_commit_is_not_replayed_after_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let pool = open_with_faults(&path, 64 * MIB).await;
    // Creating a volume checkpoints: the next batch goes to the journal's start.
    pool.create_volume("v", 4 * MIB).await.unwrap();
    let vol = pool.volume("v").unwrap();
    vol.write(0, &pattern(4096, 1), false).await.unwrap();
    // Data sync, batch written, its sync fails.
    pool.engine.faults().fail_syncs_after(1);
    assert!(vol.flush().await.is_err());
    pool.engine.faults().heal();
    vol.trim(0, 4096).await.unwrap();
    // A checkpoint (another volume), then a crash.
    pool.create_volume("w", MIB).await.unwrap();
    drop(vol);
    drop(pool);

    let pool = open_with_faults(&path, 64 * MIB).await;
    let vol = pool.volume("v").unwrap();
    assert_same_bytes!(vol.read(0, 4096).await.unwrap(), vec![0u8; 4096]);
}

/// An in-place write dropped by a stopping runtime while the device still
/// has its data: if its volume is deleted meanwhile, the block being written
/// must not go to another write before the device is done with it, or the
/// late write would land on that write's data.
#[tokio::test]
async fn blocks_under_an_abandoned_in_place_write_stay_taken_until_it_lands() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let pool = open_with_faults(&path, 64 * MIB).await;
    let all_free = pool.usage().free;
    let vol = volume_v_written_in_place_next(&pool).await;
    drop(vol);

    // Only the write is held: the deletion's checkpoint goes by.
    let hold = pool.engine.faults().hold.clone();
    hold.hold_next();
    drop_a_held_write(&pool, &hold, &pattern(4096, 3));
    pool.delete_volume("v").await.unwrap();
    assert!(
        pool.usage().free < all_free,
        "the block under the held write went back to the allocator"
    );

    hold.release().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while pool.usage().free < all_free {
        assert!(std::time::Instant::now() < deadline, "blocks never freed");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// Two snapshots whose names clash by the caller's rule (a replicated
/// volume's copies of one name under different uids) cannot both be taken.
#[tokio::test]
async fn a_snapshot_whose_name_clashes_with_one_taken_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pool = open(&dir.path().join("pool"), 64 * MIB).await;
    pool.create_volume("v", 8 * MIB).await.unwrap();
    let same_stem = |name: &str| name.starts_with("copy@");
    pool.create_snapshot_unless("v", "copy@1", same_stem)
        .await
        .unwrap();
    assert!(matches!(
        pool.create_snapshot_unless("v", "copy@2", same_stem).await,
        Err(PoolError::SnapshotExists(_))
    ));
    assert_eq!(pool.list_snapshots().len(), 1);
}
