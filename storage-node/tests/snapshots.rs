//! Snapshots of replicated volumes with real storage node processes: taken
//! while a client writes, they hold the same data on every replica; volumes
//! created from them share their blocks, start with the snapshot's data and
//! go their own way; snapshots outlive their volume.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::cluster::TestCluster;
use common::nbd_client::NbdClient;
use common::*;
use strata_node::cluster::snapshots;
use strata_node::cluster::volumes::{self, VolumeError};
use strata_node::replication::wire::{Op, Request, Status};

fn connect(uri: &str) -> NbdClient {
    let rest = uri.strip_prefix("nbd://").unwrap();
    let (addr, name) = rest.split_once('/').unwrap();
    NbdClient::connect(addr.parse::<SocketAddr>().unwrap(), name).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_taken_under_writes_is_the_same_on_every_replica_and_clones_from_it() {
    let cluster = TestCluster::start(3, "256MiB", &[]);
    let file = cluster.file();
    cluster.create_volume("db", 32 * MIB, 3).await;
    let uri = cluster.export("db", 0).await;
    let before = random_bytes(8 * MIB as usize, 1);
    let mut client = connect(&uri);
    client.write(0, &before, false).unwrap();
    client.flush().unwrap();

    // A writer keeps the volume busy while the snapshot is taken.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (uri, stop) = (uri.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut client = connect(&uri);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let offset = 8 * MIB + (n % 128) * 64 * 1024;
                client
                    .write(offset, &random_bytes(64 * 1024, n + 100), n % 8 == 0)
                    .unwrap();
                n += 1;
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let snapshot = snapshots::create(&file, "db", "db-snap").await.unwrap();
    assert!(!snapshot.existed);
    let snapshot = snapshot.snapshot;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let writes = tokio::task::spawn_blocking(move || writer.join().unwrap())
        .await
        .unwrap();
    assert!(writes > 10, "the writer ran ({writes} writes)");
    assert_eq!(snapshot.volume, "db");
    assert_eq!(snapshot.size_bytes, 32 * MIB);
    assert_eq!(snapshot.copies.len(), 3, "one copy per in-sync replica");

    // Taking it again is a no-op; the name is taken for other volumes.
    let again = snapshots::create(&file, "db", "db-snap").await.unwrap();
    assert!(again.existed);
    assert_eq!(again.snapshot.created_unix, snapshot.created_unix);
    cluster.create_volume("other", 8 * MIB, 1).await;
    assert!(matches!(
        snapshots::create(&file, "other", "db-snap").await,
        Err(VolumeError::SnapshotExists { .. })
    ));
    assert!(matches!(
        snapshots::create(&file, "nope", "s").await,
        Err(VolumeError::NotFound(_))
    ));

    // The source moves on after the snapshot.
    client.write(0, &[0xEE; 65536], true).unwrap();

    // A volume from the snapshot: replicas on the nodes holding it, the same
    // bytes on each (so the copies were taken at one point), the old data.
    let clone = volumes::create_from_snapshot(&file, "db-clone", &snapshot, None)
        .await
        .unwrap();
    assert_eq!(clone.replicas.len(), 3);
    assert_eq!(clone.size_bytes, 32 * MIB);
    cluster.assert_replicas_identical("db-clone").await;
    let clone_uri = cluster.export("db-clone", 1).await;
    let mut clone_client = connect(&clone_uri);
    assert!(clone_client.read(0, 8 * MIB as u32).unwrap() == before);
    // Writable, and independent of its source.
    clone_client.write(0, &[0xC1; 4096], true).unwrap();
    assert!(clone_client.read(0, 4096).unwrap() == vec![0xC1; 4096]);
    assert!(client.read(0, 4096).unwrap() == vec![0xEE; 4096]);
    // No data was copied: the clone's replicas allocate only what it wrote.
    let report = cluster.report("db-clone").await;
    assert!(report.replicas[0].replica.allocated_bytes >= 8 * MIB);
    assert!(matches!(
        volumes::create_from_snapshot(&file, "small", &snapshot, Some(MIB)).await,
        Err(VolumeError::Invalid(_))
    ));

    // Deleting the volume keeps its snapshot usable.
    drop(client);
    volumes::delete(&file, "db").await.unwrap();
    let snapshot = snapshots::get(&file, "db-snap").await.unwrap();
    volumes::create_from_snapshot(&file, "db-clone2", &snapshot, Some(64 * MIB))
        .await
        .unwrap();
    let uri2 = cluster.export("db-clone2", 2).await;
    let mut client2 = connect(&uri2);
    assert!(client2.read(0, 8 * MIB as u32).unwrap() == before);
    assert_eq!(cluster.report("db-clone2").await.size_bytes, 64 * MIB);

    // Deleting the snapshot leaves the clones whole.
    snapshots::delete(&file, "db-snap").await.unwrap();
    assert!(snapshots::list(&file).await.unwrap().is_empty());
    assert!(matches!(
        snapshots::delete(&file, "db-snap").await,
        Err(VolumeError::SnapshotNotFound(_))
    ));
    assert!(client2.read(0, 8 * MIB as u32).unwrap() == before);
    assert!(clone_client.read(4096, 4096).unwrap() == before[4096..8192]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_copies_survive_a_node_restart_and_a_stale_target_cannot_take_one() {
    let mut cluster = TestCluster::start(2, "256MiB", &[]);
    let file = cluster.file();
    cluster.create_volume("v", 8 * MIB, 2).await;
    let uri = cluster.export("v", 0).await;
    let data = random_bytes(MIB as usize, 7);
    connect(&uri).write(0, &data, true).unwrap();
    snapshots::create(&file, "v", "v-1").await.unwrap();
    cluster.nodes[1].kill9();
    cluster.nodes[1].spawn();
    let snapshot = snapshots::get(&file, "v-1").await.unwrap();
    assert_eq!(snapshot.copies.len(), 2, "both copies are durable");

    // A newer target on node-2 fences node-1's: the old one refuses.
    cluster.export("v", 1).await;
    let mut old = cluster.nodes[0].client().await;
    let err = old
        .create_snapshot(strata_proto::storage::CreateSnapshotRequest {
            volume: "v".into(),
            name: "v-2".into(),
            uid: 0,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.code(),
            tonic::Code::FailedPrecondition | tonic::Code::Unavailable
        ),
        "{err:?}"
    );
    assert!(snapshots::get(&file, "v-2").await.is_err());
    // At the replica itself: a Snapshot request of an older epoch is fenced.
    let (replica, epoch, _) = cluster.replica(0, "v").await;
    let mut stale = Request::new(Op::Snapshot, 1, epoch - 1);
    stale.payload = b"v-3".to_vec().into();
    let reply = replica.call(stale, Duration::from_secs(10)).await.unwrap();
    assert_eq!(reply.status, Status::Fenced);
    assert!(snapshots::get(&file, "v-3").await.is_err());
    let clone = volumes::create_from_snapshot(&file, "v-clone", &snapshot, None)
        .await
        .unwrap();
    assert_eq!(clone.replicas.len(), 2);
    let clone_uri = cluster.export("v-clone", 1).await;
    assert!(connect(&clone_uri).read(0, MIB as u32).unwrap() == data);
}

/// A node down while a snapshot is deleted keeps its copy. When a new
/// snapshot is taken under the same name meanwhile and the node comes back,
/// its old copy is not taken for one of the new snapshot's: the two are
/// listed apart, no volume is made from the name (its replicas would start
/// from different data), and deleting the name deletes both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_copy_kept_through_a_delete_is_never_mixed_with_a_new_snapshot_of_its_name() {
    let mut cluster = TestCluster::start(3, "256MiB", &["--replica-timeout-ms", "1000"]);
    let file = cluster.file();
    cluster.create_volume("v", 8 * MIB, 3).await;
    let mut client = connect(&cluster.export("v", 0).await);
    client.write(0, &[0x01; 4096], true).unwrap();
    let old = snapshots::create(&file, "v", "nightly")
        .await
        .unwrap()
        .snapshot;
    assert_eq!(old.copies.len(), 3);

    cluster.nodes[2].stop();
    let err = snapshots::delete(&file, "nightly").await.unwrap_err();
    assert!(err.to_string().contains("node-3"), "{err}");
    client.write(0, &[0x02; 4096], true).unwrap();
    let new = snapshots::create(&file, "v", "nightly")
        .await
        .unwrap()
        .snapshot;
    assert_ne!(new.uid, old.uid);
    assert_eq!(new.copies.len(), 2, "taken on the two in-sync replicas");

    cluster.nodes[2].spawn();
    // The node answers once its pool is open.
    let mut listed = Vec::new();
    for _ in 0..150 {
        listed = snapshots::list(&file).await.unwrap();
        if listed.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        listed.iter().all(|s| s.name == "nightly") && listed[0].uid != listed[1].uid,
        "{listed:?}"
    );
    // Taking it again returns neither, and no volume comes from the name.
    for err in [
        snapshots::get(&file, "nightly").await.unwrap_err(),
        snapshots::create(&file, "v", "nightly").await.unwrap_err(),
    ] {
        assert!(
            matches!(&err, VolumeError::SnapshotConflict(m) if m.contains("snapshot rm")),
            "{err}"
        );
    }
    // Even a volume asked for from the new snapshot's report is made only
    // from copies of it: the old copy's node refuses.
    let mut mixed = new.clone();
    mixed.copies.extend(
        listed
            .iter()
            .filter(|s| s.uid == old.uid)
            .flat_map(|s| s.copies.clone()),
    );
    let err = volumes::create_from_snapshot(&file, "clone", &mixed, None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("another snapshot"), "{err}");
    assert!(matches!(
        volumes::get(&file, "clone").await,
        Err(VolumeError::NotFound(_))
    ));
    // Made from the new snapshot's copies alone, the clone holds its data.
    volumes::create_from_snapshot(&file, "clone", &new, None)
        .await
        .unwrap();
    let mut clone = connect(&cluster.export("clone", 0).await);
    assert!(clone.read(0, 4096).unwrap() == vec![0x02; 4096]);

    snapshots::delete(&file, "nightly").await.unwrap();
    assert!(snapshots::list(&file).await.unwrap().is_empty());
}

/// Runs two `snapshots::create` of `name` at once; both must succeed and
/// return one snapshot, which one of them took. Returns it.
async fn create_twice_at_once(
    file: &strata_node::cluster::ClusterFile,
    volume: &str,
    name: &str,
) -> snapshots::Created {
    let (first, second) = tokio::join!(
        snapshots::create(file, volume, name),
        snapshots::create(file, volume, name)
    );
    let (first, second) = (first.unwrap(), second.unwrap());
    assert_eq!(
        first.snapshot.uid, second.snapshot.uid,
        "{first:?} {second:?}"
    );
    assert!(
        !(first.existed && second.existed),
        "one of them took it: {first:?} {second:?}"
    );
    first
}

/// Two `snapshot create` calls of one name at once (a CSI retry racing the
/// call it retries, say) make one snapshot: both return it, with one uid,
/// and every replica holds one copy of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_creates_of_one_name_at_once_make_one_snapshot_and_both_return_it() {
    let cluster = TestCluster::start(3, "256MiB", &[]);
    let file = cluster.file();
    cluster.create_volume("db", 16 * MIB, 3).await;
    let uri = cluster.export("db", 0).await;
    let data = random_bytes(MIB as usize, 11);
    connect(&uri).write(0, &data, true).unwrap();

    for round in 0..3 {
        let name = format!("nightly-{round}");
        create_twice_at_once(&file, "db", &name).await;
        let listed: Vec<_> = snapshots::list(&file)
            .await
            .unwrap()
            .into_iter()
            .filter(|s| s.name == name)
            .collect();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].copies.len(), 3, "{listed:?}");
    }
    let snapshot = snapshots::get(&file, "nightly-2").await.unwrap();
    volumes::create_from_snapshot(&file, "db-clone", &snapshot, None)
        .await
        .unwrap();
    let clone_uri = cluster.export("db-clone", 1).await;
    assert!(connect(&clone_uri).read(0, MIB as u32).unwrap() == data);
}

/// The same race on a volume no target serves: each call opens a target
/// for its snapshot and closes it after. Still one snapshot, returned to
/// both, and the volume is left unattached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_creates_of_one_name_at_once_on_an_unserved_volume_make_one_snapshot() {
    let cluster = TestCluster::start(3, "256MiB", &[]);
    let file = cluster.file();
    cluster.create_volume("cold", 16 * MIB, 3).await;
    for round in 0..3 {
        let name = format!("cold-{round}");
        let created = create_twice_at_once(&file, "cold", &name).await;
        assert_eq!(created.snapshot.copies.len(), 3, "{created:?}");
    }
    let report = volumes::get(&file, "cold").await.unwrap();
    assert!(report.active_target().is_none(), "{report:?}");
}
