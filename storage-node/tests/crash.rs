//! Crashes, corruption and a full pool, against a real strata-node process.

mod common;

use std::os::unix::process::CommandExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::nbd_client::NbdClient;
use common::*;
use rand::{Rng, SeedableRng};

const BLOCK: usize = 4096;

/// A block's content names its block number and generation; the rest is derived
/// from both, so a torn or misplaced block cannot pass for a real one.
fn block_content(lba: u64, generation: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(BLOCK);
    out.extend_from_slice(&lba.to_le_bytes());
    out.extend_from_slice(&generation.to_le_bytes());
    let mut x = lba.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ generation;
    while out.len() < BLOCK {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// What the writers know about each block.
#[derive(Default, Clone)]
struct Ledger {
    /// Newest generation known durable (its write was acknowledged before a
    /// FLUSH that completed, or was acknowledged with FUA).
    durable: Vec<u64>,
    /// Newest generation ever sent (acknowledged or not).
    sent: Vec<u64>,
}

/// One writer owning blocks [first, first + count): writes new generations,
/// flushing now and then, until the connection fails.
fn writer(
    addr: std::net::SocketAddr,
    first: u64,
    count: u64,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
    seed: u64,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let Ok(mut client) = NbdClient::connect(addr, "ledger") else {
        return;
    };
    let mut unflushed: Vec<(u64, u64)> = Vec::new();
    let mut until_flush = rng.random_range(1..32);
    while !stop.load(Ordering::Relaxed) {
        let lba = first + rng.random_range(0..count);
        let generation = {
            let mut l = ledger.lock().unwrap();
            l.sent[lba as usize] += 1;
            l.sent[lba as usize]
        };
        let fua = rng.random_ratio(1, 20);
        if client
            .write(lba * BLOCK as u64, &block_content(lba, generation), fua)
            .is_err()
        {
            return;
        }
        if fua {
            let mut l = ledger.lock().unwrap();
            let d = &mut l.durable[lba as usize];
            *d = (*d).max(generation);
        } else {
            unflushed.push((lba, generation));
        }
        until_flush -= 1;
        if until_flush == 0 {
            if client.flush().is_err() {
                return;
            }
            let mut l = ledger.lock().unwrap();
            for (lba, generation) in unflushed.drain(..) {
                let d = &mut l.durable[lba as usize];
                *d = (*d).max(generation);
            }
            until_flush = rng.random_range(1..32);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn flushed_writes_survive_sigkill_at_random_instants() {
    const BLOCKS: u64 = 2048;
    const WRITERS: u64 = 4;
    let seed: u64 = std::env::var("STRATA_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (rerun with STRATA_TEST_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut node = TestNode::start("128MiB");
    node.create_volume("ledger", BLOCKS * BLOCK as u64).await;
    let fio_uri = node.create_volume("fio-load", 32 * MIB).await;
    let ledger = Arc::new(Mutex::new(Ledger {
        durable: vec![0; BLOCKS as usize],
        sent: vec![0; BLOCKS as usize],
    }));
    for round in 0..6 {
        let stop = Arc::new(AtomicBool::new(false));
        let per = BLOCKS / WRITERS;
        let threads: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (ledger, stop, addr) = (ledger.clone(), stop.clone(), node.nbd);
                let s = rng.random();
                std::thread::spawn(move || writer(addr, w * per, per, ledger, stop, s))
            })
            .collect();
        // fio writes with periodic flushes beside the ledger writers.
        let mut fio = std::process::Command::new("fio")
            .args([
                "--name=load",
                "--ioengine=nbd",
                &format!("--uri={fio_uri}"),
                "--rw=randwrite",
                "--bs=16k",
                "--iodepth=16",
                "--fsync=8",
                "--size=32M",
                "--time_based",
                "--runtime=30",
                // Jobs as threads of the one process: a forked job process
                // starts a session of its own, which the group's SIGKILL
                // below missed, and lingered after the test.
                "--thread",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            // A group of its own lets one signal stop it.
            .process_group(0)
            .spawn()
            .expect("fio (see .ci/install-test-deps)");
        // Kill at a random instant while the writers are busy.
        std::thread::sleep(Duration::from_millis(rng.random_range(100..900)));
        node.kill9();
        stop.store(true, Ordering::Relaxed);
        // SAFETY: signalling the process group of our own child.
        unsafe { libc::kill(-(fio.id() as i32), libc::SIGKILL) };
        let _ = fio.wait();
        for t in threads {
            t.join().unwrap();
        }
        // The pool must open as it is, with no repair step.
        node.spawn();
        let l = ledger.lock().unwrap().clone();
        let mut client = NbdClient::connect(node.nbd, "ledger").unwrap();
        let image = client.read(0, (BLOCKS as usize * BLOCK) as u32).unwrap();
        let mut durable_blocks = 0;
        for lba in 0..BLOCKS as usize {
            let block = &image[lba * BLOCK..(lba + 1) * BLOCK];
            let (durable, sent) = (l.durable[lba], l.sent[lba]);
            durable_blocks += (durable > 0) as usize;
            if block.iter().all(|b| *b == 0) {
                assert_eq!(
                    durable, 0,
                    "round {round}: block {lba} lost generation {durable} (seed {seed})"
                );
                continue;
            }
            let generation = u64::from_le_bytes(block[8..16].try_into().unwrap());
            assert!(
                block == block_content(lba as u64, generation).as_slice(),
                "round {round}: block {lba} holds neither old nor new data (seed {seed})"
            );
            assert!(
                generation >= durable && generation <= sent,
                "round {round}: block {lba} has generation {generation}, durable {durable}, sent {sent} (seed {seed})"
            );
        }
        assert!(
            durable_blocks > 0,
            "round {round}: the writers never got a flush in"
        );
        eprintln!("round {round}: {durable_blocks} blocks with durable data verified");
    }
}

#[tokio::test]
async fn a_corrupted_block_reads_as_an_io_error_and_is_counted() {
    let mut node = TestNode::start("64MiB");
    node.create_volume("c", 4 * MIB).await;
    let data = random_bytes(3 * BLOCK, 99);
    let mut client = NbdClient::connect(node.nbd, "c").unwrap();
    client.write(40 * BLOCK as u64, &data, true).unwrap();
    drop(client);
    node.stop();
    // Find the middle block in the pool file and flip one bit of it.
    let pool = node.pool_path();
    let at = find_in_file(&pool, &data[BLOCK..2 * BLOCK], BLOCK).expect("block in pool file");
    let mut bytes = std::fs::read(&pool).unwrap();
    bytes[at as usize + 1234] ^= 0x08;
    std::fs::write(&pool, bytes).unwrap();
    node.spawn();

    let mut client = NbdClient::connect(node.nbd, "c").unwrap();
    let err = client.read(41 * BLOCK as u64, BLOCK as u32).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // Neighbours are intact, and the connection still works.
    assert!(client.read(40 * BLOCK as u64, BLOCK as u32).unwrap() == data[..BLOCK]);
    assert!(client.read(42 * BLOCK as u64, BLOCK as u32).unwrap() == data[2 * BLOCK..]);
    // A client never sees the bad bytes, whatever the request's shape.
    let (ok, text) = qemu_io(&node.uri("c"), &["read 160k 12k".into()]);
    assert!(!ok || text.contains("Input/output error"), "{text}");
    assert_eq!(
        node.metric("strata_checksum_failures_total{volume=\"c\"}"),
        Some(2.0)
    );
    assert!(
        node.log().contains("checksum mismatch"),
        "the failure is logged"
    );
}

#[tokio::test]
async fn a_full_pool_returns_enospc_and_loses_nothing() {
    let mut node = TestNode::start_with("64MiB", &["--overcommit-percent", "400"]);
    let uri = node.create_volume("full", 200 * MIB).await;
    assert_qemu_io_ok(&uri, &["write -P 0x3c 0 8M".into(), "flush".into()]);
    let (_, text) = qemu_io(&uri, &["write -P 0x4d 8M 150M".into()]);
    assert!(text.contains("No space left on device"), "{text}");
    // Overwrites of allocated blocks still work on the full pool.
    assert_qemu_io_ok(&uri, &["write -P 0x5e 0 1M".into(), "flush".into()]);
    node.stop();
    node.spawn();
    assert_qemu_io_ok(
        &uri,
        &["read -P 0x5e 0 1M".into(), "read -P 0x3c 1M 7M".into()],
    );
    // Deleting data makes room again.
    assert_qemu_io_ok(&uri, &["discard 8M 150M".into(), "flush".into()]);
    assert_qemu_io_ok(
        &uri,
        &["write -P 0x6f 8M 16M".into(), "read -P 0x6f 8M 16M".into()],
    );
}
