//! Replicated volumes with real storage node processes: replica loss and
//! delta rebuild under fio, fencing of an older target, target failover with
//! a ledger of acknowledged writes, self-healing reads of a corrupt copy (on
//! loopback); network partitions that cut the target off from a minority and
//! from a majority of the replicas (nodes in network namespaces).

mod common;

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::time::Duration;

use common::cluster::TestCluster;
use common::nbd_client::NbdClient;
use common::netns::NetLab;
use common::*;
use rand::{Rng, SeedableRng};
use strata_node::cluster::volumes::{self, VolumeReport};

/// Replicas that do not answer within a second are dropped: tests go fast.
const FAST_TIMEOUT: &[&str] = &["--replica-timeout-ms", "1000"];

fn nbd_addr(uri: &str) -> (SocketAddr, String) {
    let rest = uri.strip_prefix("nbd://").unwrap();
    let (addr, name) = rest.split_once('/').unwrap();
    (addr.parse().unwrap(), name.to_string())
}

fn connect(uri: &str) -> NbdClient {
    let (addr, name) = nbd_addr(uri);
    NbdClient::connect(addr, &name).unwrap()
}

/// Opens the volume of `report` on node `index` the way a controller would
/// that cannot reach its current target (the old target is not told to
/// close), and connects to the new export.
async fn open_target_on(cluster: &TestCluster, report: &VolumeReport, index: usize) -> NbdClient {
    let seeds: Vec<String> = report
        .members()
        .into_iter()
        .map(|member| member.address)
        .collect();
    let opened = cluster.nodes[index]
        .client()
        .await
        .open_target(strata_proto::storage::OpenTargetRequest {
            volume: report.name.clone(),
            seeds,
        })
        .await
        .unwrap()
        .into_inner();
    let client = connect(&opened.export_uri);
    client.set_reply_timeout(Duration::from_secs(60)).unwrap();
    client
}

/// fio's verifying random writes (`fio_verify_args`) over `size` of the
/// export, plus `extra` arguments; its output.
fn fio_verify_over(uri: &str, size: &str, extra: &[&str]) -> std::process::Output {
    std::process::Command::new("fio")
        .args(fio_verify_args(uri, size))
        .args(extra)
        .process_group(0)
        .output()
        .expect("fio (see .ci/install-test-deps)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_killed_under_fio_verify_is_rebuilt_to_identical_data() {
    let mut cluster = TestCluster::start(3, "512MiB", FAST_TIMEOUT);
    let report = cluster.create_volume("fio", 64 * MIB, 3).await;
    assert_eq!(report.replicas.len(), 3);
    let uri = cluster.export("fio", 0).await;

    let fio = std::thread::spawn(move || fio_verify_over(&uri, "32M", &["--loops=3"]));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.nodes[2].kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.nodes[2].spawn();
    let out = tokio::task::spawn_blocking(move || fio.join().unwrap())
        .await
        .unwrap();
    fio_report(&out);

    // The killed replica was dropped, then caught up and taken back.
    let log = cluster.nodes[0].log();
    assert!(log.contains("in-sync set shrunk"), "{log}");
    let report = cluster
        .wait_in_sync("fio", 3, Duration::from_secs(60))
        .await;
    assert!(report.missing.is_empty());
    let log = cluster.nodes[0].log();
    assert!(log.contains("replica rebuilt and back in sync"), "{log}");
    let target = &cluster.nodes[0];
    assert_eq!(
        target.metric("strata_target_in_sync_replicas{volume=\"fio\"}"),
        Some(3.0)
    );
    assert!(
        target
            .metric("strata_rebuild_copied_bytes_total{volume=\"fio\"}")
            .unwrap_or(0.0)
            > 0.0
    );
    assert_eq!(
        target.metric("strata_rebuild_remaining_extents{volume=\"fio\"}"),
        Some(0.0)
    );
    cluster.assert_replicas_identical("fio").await;
}

/// A node stopped cleanly (SIGTERM, as in a rolling upgrade) while a target
/// writes to its replica drops the writes in flight there. Its pool must
/// open with every block readable: a write dropped after its data went to
/// the disk once left its block failing its checksum (and a replica header
/// cut off that way got the replica deleted when the node started again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_node_stopped_under_writes_keeps_every_block_readable() {
    use std::sync::Arc;
    use strata_node::pool::{Pool, PoolOptions};
    use strata_node::target::BlockTarget;

    let mut cluster = TestCluster::start(3, "512MiB", FAST_TIMEOUT);
    cluster.create_volume("fio", 64 * MIB, 3).await;
    let uri = cluster.export("fio", 0).await;
    // Written once, so fio's writes overwrite blocks in place.
    let mut client = connect(&uri);
    for i in 0..32u64 {
        client.write(i * MIB, &[7u8; MIB as usize], false).unwrap();
    }
    client.flush().unwrap();
    let fio = std::thread::spawn(move || fio_verify_over(&uri, "32M", &["--loops=2"]));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.nodes[1].stop();

    // The pool as the node finds it when it starts again.
    let pool = Pool::open(
        &cluster.nodes[1].pool_path(),
        &PoolOptions::default(),
        Arc::new(strata_node::metrics::Metrics::new()),
    )
    .await
    .unwrap();
    let replica = pool.volume("replica:fio").expect("the replica is there");
    for offset in (0..replica.size()).step_by(MIB as usize) {
        let len = (replica.size() - offset).min(MIB) as u32;
        if let Err(err) = replica.read(offset, len).await {
            panic!(
                "reading the stopped node's replica at {offset}: {err}\n{}",
                cluster.nodes[1].log()
            );
        }
    }
    assert_eq!(pool.checksum_failures(), 0);
    pool.close().await.unwrap();
    drop((replica, pool));

    cluster.nodes[1].spawn();
    let out = tokio::task::spawn_blocking(move || fio.join().unwrap())
        .await
        .unwrap();
    fio_report(&out);
    cluster
        .wait_in_sync("fio", 3, Duration::from_secs(60))
        .await;
    cluster.assert_replicas_identical("fio").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_target_fences_the_older_one() {
    let cluster = TestCluster::start(3, "256MiB", FAST_TIMEOUT);
    cluster.create_volume("shared", 16 * MIB, 3).await;
    let old_uri = cluster.export("shared", 0).await;
    let mut old = connect(&old_uri);
    old.write(0, &[0x11; 4096], true).unwrap();

    // A second target on another node: the first one's clients are now fenced.
    let new_uri = cluster.export("shared", 1).await;
    assert_ne!(new_uri, old_uri);
    let mut new = connect(&new_uri);
    new.write(4096, &[0x22; 4096], true).unwrap();

    let err = old
        .write(0, &[0x33; 4096], true)
        .expect_err("the fenced target must not take writes");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        old.read(0, 4096).is_err(),
        "a fenced target must not serve reads"
    );

    assert!(new.read(0, 4096).unwrap() == vec![0x11; 4096]);
    assert!(new.read(4096, 4096).unwrap() == vec![0x22; 4096]);
    let report = cluster.report("shared").await;
    let (node, target) = report.active_target().unwrap();
    assert_eq!(node.name, "node-2");
    assert!(target.epoch >= 2);
}

/// Two nodes open the same volume at the same moment (two controllers that
/// each think the target is theirs to move): their prepares cross, each
/// fencing the other's. They back off at random and try again, so one of
/// them opens and serves, rather than both giving up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_targets_opened_at_once_leave_one_serving() {
    let cluster = TestCluster::start(3, "256MiB", FAST_TIMEOUT);
    for round in 0..5u8 {
        let name = format!("duel-{round}");
        let report = cluster.create_volume(&name, 16 * MIB, 3).await;
        let seeds: Vec<String> = report.members().into_iter().map(|m| m.address).collect();
        let open = |index: usize| {
            let request = strata_proto::storage::OpenTargetRequest {
                volume: name.clone(),
                seeds: seeds.clone(),
            };
            let node = &cluster.nodes[index];
            async move { node.client().await.open_target(request).await }
        };
        let (a, b) = tokio::join!(open(1), open(2));
        assert!(
            a.is_ok() || b.is_ok(),
            "round {round}: neither target opened: {a:?} {b:?}"
        );
        // The newest target (the other one, if it opened too, was opened
        // first and is fenced) takes writes and reads them back.
        let report = cluster.report(&name).await;
        let (node, _) = report
            .targets
            .iter()
            .max_by_key(|(_, target)| target.epoch)
            .expect("a target serves");
        let mut client = connect(&cluster.nodes[cluster.index_of(&node.name)].uri(&name));
        client.write(0, &[round + 1; 4096], true).unwrap();
        assert!(client.read(0, 4096).unwrap() == vec![round + 1; 4096]);
    }
}

/// Records of 4 KiB at consecutive offsets, each naming its number.
fn record(n: u64) -> Vec<u8> {
    let mut block = random_bytes(4096, n);
    block[..8].copy_from_slice(&n.to_le_bytes());
    block
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_target_failover_20_times() {
    const ROUNDS: usize = 20;
    let mut cluster = TestCluster::start(3, "256MiB", FAST_TIMEOUT);
    cluster.create_volume("ledger", 32 * MIB, 3).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let mut acknowledged: Vec<u64> = Vec::new();
    let mut next_record = 0u64;
    let mut target = 0usize;
    for round in 0..ROUNDS {
        let uri = cluster.export("ledger", target).await;
        // Failures come one at a time: the node killed last round is caught
        // up before the next one dies.
        cluster
            .wait_in_sync("ledger", 3, Duration::from_secs(60))
            .await;
        // Every acknowledged record so far is there, from the new target.
        let mut client = connect(&uri);
        for &n in &acknowledged {
            let got = client.read(n * 4096 % (32 * MIB), 4096).unwrap();
            assert!(
                got == record(n),
                "round {round}: acknowledged record {n} is missing after failover"
            );
        }
        // Writers record each acknowledgement while the target node is
        // killed at a random instant.
        let kill_after = Duration::from_millis(rng.random_range(20..300));
        let first = next_record;
        let writer = std::thread::spawn(move || {
            let mut acked = Vec::new();
            let mut n = first;
            loop {
                let fua = n % 2 == 0;
                let offset = n * 4096 % (32 * MIB);
                if client.write(offset, &record(n), fua).is_err() {
                    break;
                }
                if !fua && client.flush().is_err() {
                    break;
                }
                acked.push(n);
                n += 1;
            }
            (acked, n)
        });
        tokio::time::sleep(kill_after).await;
        cluster.nodes[target].kill9();
        let (acked, next) = tokio::task::spawn_blocking(move || writer.join().unwrap())
            .await
            .unwrap();
        // Records overwrite older ones at the same offset once the ring wraps.
        let written: std::collections::BTreeSet<u64> = acked.iter().map(|n| n % 8192).collect();
        acknowledged.retain(|n| !written.contains(&(n % 8192)));
        acknowledged.extend(acked);
        next_record = next;
        cluster.nodes[target].spawn();
        target = (target + 1) % 3;
    }
    let uri = cluster.export("ledger", target).await;
    let mut client = connect(&uri);
    for &n in &acknowledged {
        assert!(
            client.read(n * 4096 % (32 * MIB), 4096).unwrap() == record(n),
            "acknowledged record {n} is missing at the end"
        );
    }
    assert!(
        acknowledged.len() > ROUNDS,
        "the writers made too little progress"
    );
}

/// Partitions through network namespaces (see `common::netns`): node-1
/// serves the target and is cut off from node-3, then from node-2 too, then
/// both links are restored.
#[test]
fn a_partition_keeps_io_on_the_majority_fails_it_on_a_minority_and_heals() {
    let lab = NetLab::new(3);
    lab.run(partition_and_heal(&lab));
}

async fn partition_and_heal(lab: &NetLab) {
    const FIO_REGION: &str = "32M";
    let cluster = TestCluster::start_in(lab, "256MiB", FAST_TIMEOUT);
    cluster.create_volume("split", 64 * MIB, 3).await;
    let uri = cluster.export("split", 0).await;

    // Cut off from one replica: fio keeps writing and verifying on the two
    // the target still reaches.
    let fio_uri = uri.clone();
    let fio = std::thread::spawn(move || fio_verify_over(&fio_uri, FIO_REGION, &[]));
    tokio::time::sleep(Duration::from_secs(1)).await;
    lab.cut(0, 2);
    let out = tokio::task::spawn_blocking(move || fio.join().unwrap())
        .await
        .unwrap();
    fio_report(&out);
    let report = cluster.report("split").await;
    assert_eq!(
        report.in_sync().len(),
        2,
        "node-3 was not dropped: {:?}",
        report.in_sync()
    );

    // Cut off from both: one of three is no majority. Writes fail with an
    // error, in bounded time; none is acknowledged on the minority.
    lab.cut(0, 1);
    let mut client = connect(&uri);
    client.set_reply_timeout(Duration::from_secs(60)).unwrap();
    let late = 48 * MIB;
    for attempt in 0..3 {
        let err = client
            .write(late, &[3; 4096], true)
            .expect_err("a write acknowledged by a minority");
        assert_eq!(
            err.raw_os_error(),
            Some(libc::EIO),
            "attempt {attempt}: {err}"
        );
    }
    let err = client
        .flush()
        .expect_err("a flush acknowledged by a minority");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");

    // Heal: nothing but the network changes. Writes succeed again, the
    // replicas left behind are rebuilt and rejoin.
    let log_before_heal = cluster.nodes[0].log().len();
    lab.heal(0, 1);
    lab.heal(0, 2);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while let Err(err) = client.write(late, &[4; 4096], true) {
        assert!(
            std::time::Instant::now() < deadline,
            "writes did not recover after the partition healed: {err}\n{}",
            cluster.nodes[0].log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // node-2 was in sync through the partition and answers again: the
    // target reconnects it rather than going on with one copy.
    let after_heal = cluster.nodes[0].log()[log_before_heal..].to_string();
    assert!(
        !after_heal.contains("in-sync set shrunk"),
        "the in-sync set shrank after the partition healed:\n{after_heal}"
    );
    cluster
        .wait_in_sync("split", 3, Duration::from_secs(60))
        .await;
    assert!(client.read(late, 4096).unwrap() == vec![4; 4096]);
    // What fio wrote while node-3 was cut off is all there, read from the
    // rebuilt replicas too (reads rotate over the in-sync set).
    let out = fio_verify_over(&uri, FIO_REGION, &["--verify_only=1"]);
    fio_report(&out);
    cluster.assert_replicas_identical("split").await;
}

/// node-1 serves the target and is cut off from both other nodes; the volume
/// fails over to a target on node-2, on the majority side, as a controller
/// that cannot reach node-1 either would do it (node-1's target is not told
/// to close). The old target must stay fenced when the partition heals: it
/// neither writes nor reads, and the new target keeps every write it
/// acknowledged.
#[test]
fn a_target_cut_off_from_the_majority_stays_fenced_after_the_partition_heals() {
    let lab = NetLab::new(3);
    lab.run(failover_across_a_partition(&lab));
}

async fn failover_across_a_partition(lab: &NetLab) {
    let cluster = TestCluster::start_in(lab, "256MiB", FAST_TIMEOUT);
    let report = cluster.create_volume("moved", 16 * MIB, 3).await;
    let old_uri = cluster.export("moved", 0).await;
    let mut old = connect(&old_uri);
    old.set_reply_timeout(Duration::from_secs(60)).unwrap();
    old.write(0, &[1; 4096], true).unwrap();

    lab.cut(0, 1);
    lab.cut(0, 2);
    let err = old.write(0, &[2; 4096], true).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // The old target keeps trying to reach a majority, as it would through
    // an outage of some seconds.
    tokio::time::sleep(Duration::from_secs(4)).await;

    let mut new = open_target_on(&cluster, &report, 1).await;
    assert!(new.read(0, 4096).unwrap() == vec![1; 4096]);
    new.write(0, &[3; 4096], true).unwrap();
    new.write(4096, &[3; 4096], true).unwrap();

    // The old target's local replica still holds 1 there, but it cannot
    // confirm it is still the target: its read fails rather than go stale.
    let err = old
        .read(0, 4096)
        .expect_err("a stale read from the deposed target");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");

    lab.heal(0, 1);
    lab.heal(0, 2);
    // Long enough for the old target to reconnect and try its changes again.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for attempt in 0..5 {
        assert!(
            old.write(0, &[4; 4096], true).is_err(),
            "attempt {attempt}: the deposed target took a write after the partition healed:\n{}\n{}", cluster.nodes[0].log(), cluster.nodes[1].log()
        );
        assert!(
            old.read(0, 4096).is_err(),
            "attempt {attempt}: the deposed target served a read after the partition healed"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        new.read(0, 4096).unwrap() == vec![3; 4096],
        "the new target lost a write it acknowledged:\n{}",
        cluster.nodes[0].log()
    );
    new.write(8192, &[5; 4096], true).unwrap_or_else(|err| {
        panic!(
            "the new target was deposed: {err}\n{}",
            cluster.nodes[0].log()
        )
    });
    cluster
        .wait_in_sync("moved", 3, Duration::from_secs(60))
        .await;
    assert!(new.read(4096, 4096).unwrap() == vec![3; 4096]);
    cluster.assert_replicas_identical("moved").await;
}

/// node-1's target is serving reads when it is cut off from both other
/// nodes, with its read lease fresh; a target opened at once on node-2
/// writes new data. No read the old target starts after that write was
/// acknowledged may return the old data: the old target's lease ends first,
/// because the new one waits out what is left of it before it serves.
#[test]
fn a_deposed_target_serves_no_read_older_than_an_acknowledged_write() {
    let lab = NetLab::new(3);
    lab.run(reads_across_a_failover(&lab));
}

async fn reads_across_a_failover(lab: &NetLab) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    let cluster = TestCluster::start_in(lab, "256MiB", FAST_TIMEOUT);
    let report = cluster.create_volume("leased", 16 * MIB, 3).await;
    let old_uri = cluster.export("leased", 0).await;
    connect(&old_uri).write(0, &[1; 4096], true).unwrap();

    // A reader on the old target, as a client that has not noticed anything.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut old = connect(&old_uri);
            old.set_reply_timeout(Duration::from_secs(60)).unwrap();
            let mut reads = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let result = old.read(0, 4096).map(|data| data[0]);
                reads.push((started, result.map_err(|err| err.to_string())));
                std::thread::sleep(Duration::from_millis(5));
            }
            reads
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    lab.cut(0, 1);
    lab.cut(0, 2);
    let mut new = open_target_on(&cluster, &report, 1).await;
    new.write(0, &[3; 4096], true).unwrap();
    let acknowledged = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let reads = tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap();

    let before = reads.iter().filter(|(at, _)| *at < acknowledged).count();
    let after: Vec<_> = reads.iter().filter(|(at, _)| *at > acknowledged).collect();
    assert!(
        before > 0 && !after.is_empty(),
        "the reader did not run throughout"
    );
    for (_, result) in &after {
        assert!(
            result.is_err(),
            "the deposed target returned {result:?} after a newer write was acknowledged:\n{}",
            cluster.nodes[1].log()
        );
    }
    assert!(new.read(0, 4096).unwrap() == vec![3; 4096]);
    lab.heal(0, 1);
    lab.heal(0, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_copy_is_read_from_another_replica_and_repaired() {
    let mut cluster = TestCluster::start(3, "256MiB", FAST_TIMEOUT);
    cluster.create_volume("heal", 16 * MIB, 3).await;
    let uri = cluster.export("heal", 0).await;
    let data = random_bytes(3 * 4096, 77);
    let mut client = connect(&uri);
    client.write(1 << 20, &data, true).unwrap();
    client.disconnect();

    // Flip a bit in the middle block of node-1's copy while it is stopped.
    cluster.nodes[0].stop();
    let pool = cluster.nodes[0].pool_path();
    let at = find_in_file(&pool, &data[4096..8192], 4096).expect("block in pool file");
    let mut bytes = std::fs::read(&pool).unwrap();
    bytes[at as usize + 100] ^= 0x01;
    std::fs::write(&pool, bytes).unwrap();
    cluster.nodes[0].spawn();

    // The target on node-1 reads its local copy first: the bad block is
    // read from another replica and returned intact.
    let uri = cluster.export("heal", 0).await;
    let mut client = connect(&uri);
    assert!(client.read(1 << 20, 3 * 4096).unwrap() == data);
    let failures = cluster.nodes[0]
        .metric("strata_checksum_failures_total{volume=\"replica:heal\"}")
        .unwrap_or(0.0);
    assert!(failures >= 1.0, "checksum failure not counted");
    let report = cluster.report("heal").await;
    assert!(report.active_target().unwrap().1.repaired_blocks >= 1);
    // The local copy was rewritten: it reads back good on its own.
    let local = cluster.replica_bytes(0, "heal").await;
    assert!(local[1 << 20..(1 << 20) + 3 * 4096] == data[..]);
    assert_eq!(report.in_sync().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_replica_never_serves_stale_data() {
    let mut cluster = TestCluster::start(3, "256MiB", FAST_TIMEOUT);
    cluster.create_volume("stale", 16 * MIB, 3).await;
    let uri = cluster.export("stale", 0).await;
    let mut client = connect(&uri);
    client.write(0, &[0xaa; 4096], true).unwrap();

    // node-2 misses the next write, then comes back.
    cluster.nodes[1].kill9();
    client.write(0, &[0xbb; 4096], true).unwrap();
    cluster.nodes[1].spawn();

    // Whatever replica the reads go to (they rotate), none is stale, before
    // or after the rebuild; and a target opened on the returning node reads
    // the new data too.
    for _ in 0..20 {
        assert!(client.read(0, 4096).unwrap() == vec![0xbb; 4096]);
    }
    cluster
        .wait_in_sync("stale", 3, Duration::from_secs(60))
        .await;
    let uri = cluster.export("stale", 1).await;
    let mut client = connect(&uri);
    for _ in 0..20 {
        assert!(client.read(0, 4096).unwrap() == vec![0xbb; 4096]);
    }
}

/// node-2 restarts while its connection to the target is idle: nothing in
/// flight fails, but the restart lost a write that was not flushed yet. The
/// target must notice the new process when it reconnects and rebuild it
/// before trusting it, or the client's next FLUSH would make a write durable
/// on two copies and the reads that go to node-2 would return the old data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restarted_between_requests_is_rebuilt_before_it_serves() {
    let mut cluster = TestCluster::start(3, "256MiB", FAST_TIMEOUT);
    cluster.create_volume("restarted", 16 * MIB, 3).await;
    let uri = cluster.export("restarted", 0).await;
    let mut client = connect(&uri);
    client.write(0, &[0xaa; 4096], true).unwrap();
    client.write(0, &[0xbb; 4096], false).unwrap();

    cluster.nodes[1].kill9();
    cluster.nodes[1].spawn();
    // Past the target's reconnect back-off, so the flush reconnects.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    client.flush().unwrap();
    for attempt in 0..20 {
        assert!(
            client.read(0, 4096).unwrap() == vec![0xbb; 4096],
            "read {attempt} returned what the restart lost"
        );
    }
    cluster
        .wait_in_sync("restarted", 3, Duration::from_secs(60))
        .await;
    cluster.assert_replicas_identical("restarted").await;
    // The volume moves to node-2 and reads its own copy first.
    let mut moved = connect(&cluster.export("restarted", 1).await);
    assert!(moved.read(0, 4096).unwrap() == vec![0xbb; 4096]);
}

/// Grows the replica of `volume` on each of `nodes` to `size`, as a resize
/// does node by node (one whose later calls failed, or that a node missed).
async fn grow_replicas_on(nodes: &[TestNode], volume: &str, size: u64) {
    for node in nodes {
        node.client()
            .await
            .resize_replica(strata_proto::storage::ResizeReplicaRequest {
                volume: volume.to_string(),
                size_bytes: size,
            })
            .await
            .unwrap();
    }
}

/// A resize that grew one replica of three (the calls to the other nodes
/// failed) leaves the volume at the size all of them hold: a target opened
/// on the grown replica serves the old size, even with a third node down,
/// so no write can land past the end of a small replica and none is dropped
/// for its size. Resizing again grows them, and the target takes the new
/// size without dropping a replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resize_that_reached_some_replicas_leaves_the_size_all_of_them_hold() {
    let mut cluster = TestCluster::start(3, "256MiB", FAST_TIMEOUT);
    cluster.create_volume("grown", 16 * MIB, 3).await;
    grow_replicas_on(&cluster.nodes[..1], "grown", 32 * MIB).await;
    cluster.nodes[2].stop();

    let (_, target) = volumes::open_target(&cluster.file(), "grown", Some(&cluster.nodes[0].name))
        .await
        .unwrap();
    assert_eq!(target.size_bytes, 16 * MIB, "{target:?}");
    assert_eq!(
        run_ok("nbdinfo", &["--size", &target.export_uri]).trim(),
        (16 * MIB).to_string()
    );
    let small = target
        .replicas
        .iter()
        .find(|r| r.member.as_ref().unwrap().node == "node-2")
        .unwrap();
    assert!(small.in_sync, "the small replica was dropped: {target:?}");

    cluster.nodes[2].spawn();
    cluster
        .wait_in_sync("grown", 3, Duration::from_secs(60))
        .await;
    // What `strata volume ls` shows: the size clients see, and that the
    // resize is unfinished.
    let report = cluster.report("grown").await;
    assert_eq!(report.served_bytes(), 16 * MIB);
    assert_eq!(report.size_bytes, 32 * MIB);
    assert_eq!(report.smallest_replica_bytes(), 16 * MIB);
    volumes::resize(&cluster.file(), "grown", 32 * MIB)
        .await
        .unwrap();
    let mut client = connect(&target.export_uri);
    client.write(31 * MIB, &[0x5a; 4096], true).unwrap();
    assert!(client.read(31 * MIB, 4096).unwrap() == vec![0x5a; 4096]);
    let report = cluster.report("grown").await;
    assert_eq!(report.active_target().unwrap().1.size_bytes, 32 * MIB);
    assert_eq!(report.served_bytes(), 32 * MIB);
    assert_eq!(
        report.in_sync().len(),
        3,
        "a replica was dropped: {report:?}"
    );
    cluster.assert_replicas_identical("grown").await;
}

/// A replica that was away while the others grew cannot rejoin at its old
/// size (every write past its end would fail it again): it waits out of the
/// in-sync set, the target's log says why, and once a resize grows it the
/// rebuild brings it back with the data written past its old end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_smaller_than_the_volume_rejoins_once_a_resize_grows_it() {
    let mut cluster = TestCluster::start(3, "256MiB", FAST_TIMEOUT);
    cluster.create_volume("away", 16 * MIB, 3).await;
    let mut client = connect(&cluster.export("away", 0).await);
    client.write(0, &[0x11; 4096], true).unwrap();
    cluster.nodes[2].stop();
    client.write(4096, &[0x22; 4096], true).unwrap();
    cluster
        .wait_in_sync("away", 2, Duration::from_secs(30))
        .await;

    // `strata volume resize` refuses while a replica's node is down; the
    // two that answer are grown by hand, as by a resize that failed on the
    // third node's before it went down.
    grow_replicas_on(&cluster.nodes[..2], "away", 32 * MIB).await;
    let (_, target) = volumes::open_target(&cluster.file(), "away", Some(&cluster.nodes[0].name))
        .await
        .unwrap();
    assert_eq!(target.size_bytes, 32 * MIB);
    client.write(31 * MIB, &[0x33; 4096], true).unwrap();

    cluster.nodes[2].spawn();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let report = cluster.report("away").await;
    assert_eq!(report.in_sync().len(), 2, "{report:?}");
    assert!(
        cluster.nodes[0].log().contains("less than the volume's"),
        "the target does not say why the replica is not rebuilt"
    );

    volumes::resize(&cluster.file(), "away", 32 * MIB)
        .await
        .unwrap();
    cluster
        .wait_in_sync("away", 3, Duration::from_secs(60))
        .await;
    cluster.assert_replicas_identical("away").await;
    assert!(client.read(31 * MIB, 4096).unwrap() == vec![0x33; 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_uses_distinct_nodes_and_refuses_too_few() {
    let cluster = TestCluster::start(2, "256MiB", FAST_TIMEOUT);
    let report = cluster.create_volume("pair", 16 * MIB, 2).await;
    let nodes: std::collections::BTreeSet<String> = report
        .replicas
        .iter()
        .map(|r| r.node.name.clone())
        .collect();
    assert_eq!(nodes.len(), 2);
    let err = strata_node::cluster::volumes::create(
        &cluster.file(),
        "triple",
        16 * MIB,
        &strata_node::cluster::volumes::Placement {
            replicas: 3,
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("not enough space: 3 replicas of 16 MiB need as many nodes"),
        "{err}"
    );
    // Nothing was left behind by the refused create.
    assert!(
        strata_node::cluster::volumes::get(&cluster.file(), "triple")
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrub_finds_and_repairs_a_corruption_no_read_touched() {
    let mut args = FAST_TIMEOUT.to_vec();
    args.extend(["--scrub-interval-secs", "1"]);
    let mut cluster = TestCluster::start(3, "256MiB", &args);
    cluster.create_volume("scrub", 8 * MIB, 3).await;
    let uri = cluster.export("scrub", 0).await;
    let data = random_bytes(2 * 4096, 99);
    let mut client = connect(&uri);
    client.write(3 << 20, &data, true).unwrap();
    client.disconnect();

    // Damage node-3's copy, which no client reads (the target reads its
    // local copy on node-1).
    cluster.nodes[2].stop();
    let pool = cluster.nodes[2].pool_path();
    let at = find_in_file(&pool, &data[4096..], 4096).expect("block in pool file");
    let mut bytes = std::fs::read(&pool).unwrap();
    bytes[at as usize + 7] ^= 0x80;
    std::fs::write(&pool, bytes).unwrap();
    cluster.nodes[2].spawn();

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let report = cluster.report("scrub").await;
        let target = &report.active_target().unwrap().1;
        if target.repaired_blocks >= 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "scrub did not repair the block: {}",
            cluster.nodes[0].log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        cluster.nodes[2]
            .metric("strata_checksum_failures_total{volume=\"replica:scrub\"}")
            .unwrap_or(0.0)
            >= 1.0
    );
    // node-3's copy reads back good on its own now.
    let copy = cluster.replica_bytes(2, "scrub").await;
    assert!(copy[3 << 20..(3 << 20) + 2 * 4096] == data[..]);
}
