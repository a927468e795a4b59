//! Replacing a replica by a new one on another node, with real storage node
//! processes on loopback: on request while fio writes and verifies, and
//! automatically once a replica stayed faulted long enough; moves of live
//! replicas, and giving them up; refusals; and the replicas a replacement
//! or a deletion leaves on a node that was down.

mod common;

use std::time::Duration;

use common::cluster::{fio_verify, TestCluster};
use common::nbd_client::NbdClient;
use common::*;
use strata_node::cluster::volumes::{self, VolumeReport};
use strata_proto::storage::CancelMoveRequest;

/// Replicas that do not answer within a second are dropped: tests go fast.
const FAST_TIMEOUT: &[&str] = &["--replica-timeout-ms", "1000"];

/// Four nodes, with `FAST_TIMEOUT` and `extra_args`, that find each other
/// through a cluster file, as under `strata up`: a target finds the nodes
/// for new replicas, and those of replaced ones to delete, there. The file's
/// directory lives as long as the returned guard.
fn start_knowing_the_cluster(extra_args: &[&str]) -> (tempfile::TempDir, TestCluster) {
    let dir = tempfile::tempdir().unwrap();
    let dir_arg = dir.path().to_str().unwrap().to_string();
    let mut args = FAST_TIMEOUT.to_vec();
    args.extend(extra_args);
    args.extend(["--cluster-dir", &dir_arg]);
    let cluster = TestCluster::start(4, "256MiB", &args);
    cluster.file().save(dir.path()).unwrap();
    (dir, cluster)
}

fn member_nodes(report: &VolumeReport) -> Vec<String> {
    let mut nodes: Vec<String> = report.members().into_iter().map(|m| m.node).collect();
    nodes.sort();
    nodes
}

/// The names of a volume's member nodes: the target's, another one's, and
/// the node that holds no replica.
fn roles(cluster: &TestCluster, report: &VolumeReport) -> (String, String, String) {
    let members = member_nodes(report);
    let spare = cluster
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .find(|n| !members.contains(n))
        .expect("a spare node");
    (members[0].clone(), members[1].clone(), spare)
}

/// The replicas node `node` holds, as it lists them.
async fn replicas_on(node: &TestNode) -> Vec<strata_proto::storage::Replica> {
    node.client()
        .await
        .list_replicas(strata_proto::storage::ListReplicasRequest {})
        .await
        .unwrap()
        .into_inner()
        .replicas
}

/// Polls `check` until it holds; after a minute, fails saying `what`, with
/// the log of the target's node.
async fn wait_until<F: std::future::Future<Output = bool>>(
    what: &str,
    target: &TestNode,
    mut check: impl FnMut() -> F,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: {}",
            target.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn connect(uri: &str) -> NbdClient {
    let rest = uri.strip_prefix("nbd://").unwrap();
    let (addr, name) = rest.split_once('/').unwrap();
    NbdClient::connect(addr.parse().unwrap(), name).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replica_is_replaced_under_fio_verify_by_a_full_copy() {
    let mut cluster = TestCluster::start(4, "512MiB", FAST_TIMEOUT);
    let report = cluster.create_volume("swap", 64 * MIB, 3).await;
    let (target_node, victim, spare) = roles(&cluster, &report);
    let target = cluster.index_of(&target_node);
    let uri = cluster.export("swap", target).await;

    let fio = fio_verify(uri.clone());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The victim's node dies and stays down.
    let victim_index = cluster.index_of(&victim);
    cluster.nodes[victim_index].kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let outcome = volumes::replace_replica(&cluster.file(), "swap", &victim, None)
        .await
        .unwrap();
    assert_eq!(outcome.planned.node.name, spare, "the only spare node");
    assert_eq!(outcome.target_node, target_node);
    assert!(!outcome.old_deleted, "the victim's node is down");
    // The member list changed at once; the new replica is not in sync yet
    // unless its copy was already done.
    let report = cluster.report("swap").await;
    assert!(member_nodes(&report).contains(&spare));
    assert!(!member_nodes(&report).contains(&victim));
    fio.finish().await;

    let report = cluster
        .wait_in_sync("swap", 3, Duration::from_secs(90))
        .await;
    assert!(report.missing.is_empty(), "{:?}", report.missing);
    let log = cluster.nodes[target].log();
    assert!(log.contains("replica replaced"), "{log}");
    assert!(log.contains("replica rebuilt and back in sync"), "{log}");
    let metrics = &cluster.nodes[target];
    assert_eq!(
        metrics.metric("strata_replaced_replicas_total{volume=\"swap\"}"),
        Some(1.0)
    );
    // fio wrote 32 MiB: the copy moved at least that much to the new replica.
    assert!(
        metrics
            .metric("strata_rebuild_copied_bytes_total{volume=\"swap\"}")
            .unwrap_or(0.0)
            >= (32 * MIB) as f64
    );
    cluster.assert_replicas_identical("swap").await;
    let (_, target_view) = report.active_target().unwrap();
    let nodes: Vec<String> = target_view
        .replicas
        .iter()
        .map(|r| r.member.as_ref().unwrap().node.clone())
        .collect();
    assert!(nodes.contains(&spare), "{nodes:?}");

    // The old node comes back: its replica is a leftover, not a member. A
    // target opened there starts from that replica's old member list, finds
    // the new one, and serves the same data; then the leftover is deleted.
    let before = connect(&uri).read(0, 4 << 20).unwrap();
    cluster.nodes[victim_index].spawn();
    let report = cluster.report("swap").await;
    assert_eq!(report.retired.len(), 1);
    assert_eq!(report.retired[0].node.name, victim);
    let on_old_node = cluster.export("swap", victim_index).await;
    assert!(connect(&on_old_node).read(0, 4 << 20).unwrap() == before);
    let log = cluster.nodes[victim_index].log();
    assert!(log.contains("the volume has other members now"), "{log}");
    assert_eq!(
        volumes::delete_retired(&cluster.file(), "swap").await,
        vec![victim.clone()]
    );
    assert!(cluster.report("swap").await.retired.is_empty());
    let on_new_node = cluster.export("swap", cluster.index_of(&spare)).await;
    assert!(connect(&on_new_node).read(0, 4 << 20).unwrap() == before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_faulted_past_the_limit_is_replaced_automatically() {
    let (_dir, mut cluster) = start_knowing_the_cluster(&["--replace-faulted-after-secs", "3"]);
    let report = cluster.create_volume("auto", 16 * MIB, 3).await;
    let (target_node, victim, spare) = roles(&cluster, &report);
    let target = cluster.index_of(&target_node);
    let uri = cluster.export("auto", target).await;
    let mut client = connect(&uri);
    let first = random_bytes(2 << 20, 1);
    client.write(0, &first, true).unwrap();

    // The volume is idle when the victim dies: no write drops it from the
    // in-sync set, the target finds it unreachable on its own.
    let victim_index = cluster.index_of(&victim);
    cluster.nodes[victim_index].kill9();

    wait_until(
        "no automatic replacement",
        &cluster.nodes[target],
        || async { member_nodes(&cluster.report("auto").await).contains(&spare) },
    )
    .await;
    let report = cluster
        .wait_in_sync("auto", 3, Duration::from_secs(60))
        .await;
    assert!(!member_nodes(&report).contains(&victim));
    let log = cluster.nodes[target].log();
    assert!(
        log.contains("replacing a replica that stayed faulted"),
        "{log}"
    );
    // The data written before is on the new replica, and writes go on.
    let second = random_bytes(1 << 20, 2);
    client.write(8 << 20, &second, true).unwrap();
    assert!(client.read(0, 2 << 20).unwrap() == first);
    assert!(client.read(8 << 20, 1 << 20).unwrap() == second);
    cluster.assert_replicas_identical("auto").await;

    // The victim's node comes back: the target deletes the old replica.
    cluster.nodes[victim_index].spawn();
    wait_until(
        "the replaced replica was not deleted",
        &cluster.nodes[target],
        || async { replicas_on(&cluster.nodes[victim_index]).await.is_empty() },
    )
    .await;
    assert!(cluster.report("auto").await.retired.is_empty());
}

/// A replaced replica whose node was down outlives the target that
/// replaced it (that target is gone, and with it the note to delete the
/// replica). The next target deletes it once the config that left it out is
/// held by every member, without another replacement or a `volume rm`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leftover_that_outlived_its_target_is_deleted_by_the_next_one() {
    let (_dir, mut cluster) = start_knowing_the_cluster(&[]);
    let report = cluster.create_volume("left", 16 * MIB, 3).await;
    let (target_node, victim, spare) = roles(&cluster, &report);
    let target = cluster.index_of(&target_node);
    let uri = cluster.export("left", target).await;
    let data = random_bytes(1 << 20, 3);
    connect(&uri).write(0, &data, true).unwrap();

    let victim_index = cluster.index_of(&victim);
    cluster.nodes[victim_index].kill9();
    let outcome = volumes::replace_replica(&cluster.file(), "left", &victim, None)
        .await
        .unwrap();
    assert!(!outcome.old_deleted, "the victim's node is down");
    assert_eq!(outcome.planned.node.name, spare);
    cluster
        .wait_in_sync("left", 3, Duration::from_secs(60))
        .await;

    // The target's node dies before the victim's is back; then both return.
    cluster.nodes[target].kill9();
    cluster.nodes[victim_index].spawn();
    cluster.nodes[target].spawn();
    assert_eq!(cluster.report("left").await.retired.len(), 1);

    // A target opened on the third member finds the leftover and deletes it.
    let other = member_nodes(&cluster.report("left").await)
        .into_iter()
        .find(|n| *n != target_node && *n != spare)
        .expect("a third member");
    let other_index = cluster.index_of(&other);
    let uri = cluster.export("left", other_index).await;
    wait_until(
        "the leftover was not deleted",
        &cluster.nodes[other_index],
        || async { replicas_on(&cluster.nodes[victim_index]).await.is_empty() },
    )
    .await;
    let report = cluster.report("left").await;
    assert!(report.retired.is_empty());
    assert!(!member_nodes(&report).contains(&victim));
    assert!(connect(&uri).read(0, 1 << 20).unwrap() == data);
}

/// A volume deleted while a node was down leaves its replica there. A new
/// volume of the same name is a different volume: when the node comes back,
/// the old replica (whose config has the higher epoch, from more opens)
/// neither takes the new volume's place nor joins it, and the new volume
/// serves its own data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_volumes_replica_does_not_join_a_new_volume_of_the_same_name() {
    let mut cluster = TestCluster::start(3, "256MiB", FAST_TIMEOUT);
    cluster.create_volume("db", 16 * MIB, 3).await;
    // Opened on each node in turn: the old volume's epoch climbs.
    for index in [0, 1, 2, 0] {
        let uri = cluster.export("db", index).await;
        connect(&uri).write(0, &[1; 4096], true).unwrap();
    }
    let old_epoch = cluster.report("db").await.replicas[0].replica.config_epoch;

    cluster.nodes[2].kill9();
    let err = volumes::delete(&cluster.file(), "db").await.unwrap_err();
    assert!(err.to_string().contains("node-3"), "{err}");
    let report = cluster.create_volume("db", 16 * MIB, 2).await;
    let new_nodes = member_nodes(&report);
    assert!(!new_nodes.contains(&"node-3".to_string()), "{new_nodes:?}");
    let uri = cluster.export("db", 0).await;
    connect(&uri).write(0, &[2; 4096], true).unwrap();

    cluster.nodes[2].spawn();
    let report = cluster.report("db").await;
    assert_eq!(member_nodes(&report), new_nodes);
    assert!(report.missing.is_empty() && report.retired.is_empty());
    // Opened again, on another node: the new volume's data, its members.
    let uri = cluster.export("db", 1).await;
    assert!(connect(&uri).read(0, 4096).unwrap() == vec![2; 4096]);
    let report = cluster.report("db").await;
    assert_eq!(member_nodes(&report), new_nodes);
    // The old replica is there, apart, with the higher epoch.
    assert!(
        report.earlier.len() == 1 && report.earlier[0].replica.config_epoch >= old_epoch,
        "{:?}",
        report.earlier
    );
    assert!(report.earlier[0].replica.config_epoch > report.replicas[0].replica.config_epoch);
    // `volume rm` deletes the leftover with the volume.
    volumes::delete(&cluster.file(), "db").await.unwrap();
    assert!(replicas_on(&cluster.nodes[2]).await.is_empty());
}

/// A target cut off while its volume was deleted and created again under
/// the same name comes back at a higher epoch than the new volume's, with
/// member ids the new replicas also use. It cannot reach the new volume's
/// replicas: every link names the replica it expects (id and volume uid),
/// so its writes fail and the new volume keeps its data and members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_of_a_deleted_volume_cannot_write_to_a_new_one_of_the_same_name() {
    let mut cluster = TestCluster::start(3, "256MiB", FAST_TIMEOUT);
    cluster.create_volume("db", 16 * MIB, 3).await;
    // Opened on each node in turn, node-1 last: the old target's epoch is
    // above the new volume's, so the new replicas answer it "behind", not
    // "fenced", and without the identity check it would take them over.
    for index in [1, 2] {
        cluster.export("db", index).await;
    }
    let old_uri = cluster.export("db", 0).await;
    let mut old_client = connect(&old_uri);
    old_client.write(0, &[1; 4096], true).unwrap();
    let old_epoch = cluster.report("db").await.replicas[0].replica.config_epoch;

    // node-1, with the old target, is cut off; the others see the volume
    // deleted and a new one of the same name created on node-2 and node-3,
    // opened there (at the same epoch as the old one) and written.
    cluster.nodes[0].freeze();
    let mut others = cluster.file();
    others.nodes.retain(|n| n.name != "node-1");
    let err = volumes::delete(&others, "db").await.unwrap_err();
    assert!(err.to_string().contains("node-1"), "{err}");
    let placement = volumes::Placement {
        replicas: 2,
        ..volumes::Placement::default()
    };
    volumes::create(&others, "db", 16 * MIB, &placement)
        .await
        .unwrap();
    let (_, target) = volumes::open_target(&others, "db", Some("node-2"))
        .await
        .unwrap();
    connect(&target.export_uri)
        .write(0, &[2; 4096], true)
        .unwrap();
    // Both restart: the old target's connections to them are gone, so it
    // connects again, to whatever replica of "db" they hold now.
    for index in [1, 2] {
        cluster.nodes[index].stop();
        cluster.nodes[index].spawn();
    }
    let new_report = volumes::get(&others, "db").await.unwrap();
    assert!(new_report.replicas[0].replica.config_epoch < old_epoch);

    cluster.nodes[0].thaw();
    // Its first write finds the links gone; later ones connect again (once
    // a second).
    for _ in 0..5 {
        let written = old_client.write(0, &[9; 4096], true);
        assert!(written.is_err(), "the old target wrote to the new volume");
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    // node-2 opened the new volume again as it restarted.
    let (_, target) = volumes::open_target(&others, "db", Some("node-2"))
        .await
        .unwrap();
    assert!(connect(&target.export_uri).read(0, 4096).unwrap() == vec![2; 4096]);
    let report = cluster.report("db").await;
    assert_eq!(member_nodes(&report), ["node-2", "node-3"]);
    assert_eq!(report.earlier.len(), 1, "{:?}", report.earlier);
}

/// A replica whose header no longer reads (a flipped byte) is kept by its
/// node, unserved: its data may be all that is left of the volume. The node
/// does not list it, so the volume shows it missing; `volume rm` still
/// deletes it, and the name is free on that node again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_an_unreadable_header_is_kept_until_volume_rm() {
    let mut cluster = TestCluster::start(3, "256MiB", FAST_TIMEOUT);
    cluster.create_volume("db", 16 * MIB, 3).await;
    cluster.nodes[2].stop();
    let pool = cluster.nodes[2].pool_path();
    let header = find_in_file(&pool, b"STRATREP", 4096).expect("the replica's header");
    let file = std::fs::OpenOptions::new().write(true).open(&pool).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, b"X", header + 20).unwrap();
    cluster.nodes[2].spawn();

    let report = cluster.report("db").await;
    let missing: Vec<&str> = report.missing.iter().map(|m| m.node.as_str()).collect();
    assert_eq!(missing, ["node-3"]);
    assert!(cluster.nodes[2]
        .log()
        .contains("cannot read the replica's header"));
    volumes::delete(&cluster.file(), "db").await.unwrap();
    // Three replicas on three nodes: node-3 must take one of the name again.
    cluster.create_volume("db", 16 * MIB, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacements_that_cannot_be_done_are_refused_with_one_line() {
    let cluster = TestCluster::start(4, "256MiB", FAST_TIMEOUT);
    let report = cluster.create_volume("r", 16 * MIB, 3).await;
    cluster.create_volume("everywhere", 16 * MIB, 4).await;
    let (member, other, spare) = roles(&cluster, &report);
    let file = cluster.file();
    let refusal = |result: Result<volumes::ReplaceOutcome, volumes::VolumeError>| {
        let message = result.unwrap_err().to_string();
        assert_eq!(message.lines().count(), 1, "{message}");
        message
    };
    assert_eq!(
        refusal(volumes::replace_replica(&file, "nope", &member, None).await),
        "volume \"nope\" not found"
    );
    let message = refusal(volumes::replace_replica(&file, "r", &spare, None).await);
    assert!(
        message.starts_with(&format!("node {spare} holds no replica of volume r")),
        "{message}"
    );
    assert_eq!(
        refusal(volumes::replace_replica(&file, "r", &member, Some(&other)).await),
        format!("node {other} holds a replica of volume r already")
    );
    let message = refusal(volumes::replace_replica(&file, "r", &member, Some("node-9")).await);
    assert!(message.starts_with("no node named \"node-9\""), "{message}");
    assert_eq!(
        refusal(volumes::replace_replica(&file, "everywhere", &member, None).await),
        "no spare node for a new replica of volume everywhere: every reachable node holds \
         one already"
    );
    // Nothing changed, and no replica was left behind on the spare node.
    let after = cluster.report("r").await;
    assert_eq!(member_nodes(&after), member_nodes(&report));
    assert!(after.retired.is_empty());
    let listed = volumes::list(&file).await.unwrap();
    assert_eq!(listed.len(), 2);
    let spare_holds: usize = listed
        .iter()
        .flat_map(|v| v.replicas.iter().chain(&v.retired))
        .filter(|r| r.node.name == spare)
        .count();
    assert_eq!(spare_holds, 1, "only its replica of \"everywhere\"");
}

/// The id of the member on `node`.
fn member_id(report: &VolumeReport, node: &str) -> u32 {
    report
        .members()
        .iter()
        .find(|m| m.node == node)
        .map(|m| m.id)
        .expect("a member on the node")
}

/// Polls `volume` until the move under way is over, checking on every look
/// that it has at least `min_in_sync` replicas in sync.
async fn wait_for_move(
    volume: &str,
    cluster: &TestCluster,
    target: &TestNode,
    min_in_sync: usize,
) -> VolumeReport {
    wait_until("the move finishes", target, || async {
        let report = cluster.report(volume).await;
        assert!(
            report.in_sync().len() >= min_in_sync,
            "in sync during the move: {:?}",
            report.in_sync()
        );
        let rebuilding = report
            .active_target()
            .is_some_and(|(_, t)| t.replicas.iter().any(|r| r.rebuilding));
        report.leaving().is_none() && !rebuilding
    })
    .await;
    cluster.report(volume).await
}

/// A healthy replica is moved, not dropped: it stays a member, in sync and
/// written, until its successor has a full copy; then it leaves and its
/// data is deleted. The volume never has fewer replicas in sync than when
/// the move started, also when another member failed before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_replica_is_moved_without_dropping_a_copy() {
    // A slow copy, so the move is seen under way.
    let (_dir, mut cluster) = start_knowing_the_cluster(&["--rebuild-rate", "4MiB"]);
    let report = cluster.create_volume("live", 16 * MIB, 3).await;
    let (target_node, leaving, spare) = roles(&cluster, &report);
    let leaving_id = member_id(&report, &leaving);
    let target = cluster.index_of(&target_node);
    let uri = cluster.export("live", target).await;
    let data = random_bytes(4 << 20, 7);
    connect(&uri).write(0, &data, true).unwrap();

    // A writer keeps going while the live, in-sync replica is moved.
    let writer_uri = uri.clone();
    let writer = std::thread::spawn(move || {
        let mut client = connect(&writer_uri);
        for n in 0..400u64 {
            let block = random_bytes(4096, 1000 + n);
            client
                .write((8 << 20) + n * 4096, &block, n % 8 == 0)
                .unwrap();
        }
        client.flush().unwrap();
    });
    let outcome = volumes::replace_replica(&cluster.file(), "live", &leaving, None)
        .await
        .unwrap();
    assert!(outcome.planned.keep_until_copied);
    assert_eq!(outcome.planned.node.name, spare);
    assert!(
        !outcome.old_deleted,
        "it stays until its successor is in sync"
    );

    // Under way: four members, the old one still in sync.
    let during = cluster.report("live").await;
    assert_eq!(during.members().len(), 4);
    assert_eq!(during.leaving(), Some(leaving_id));
    assert!(during.in_sync().contains(&leaving_id));
    // One move at a time, with a clear refusal.
    let other = member_nodes(&report)
        .into_iter()
        .find(|n| *n != target_node && *n != leaving)
        .unwrap();
    for from in [&leaving, &other] {
        let err = volumes::replace_replica(&cluster.file(), "live", from, None)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("is being moved already"), "{err}");
    }

    let done = wait_for_move("live", &cluster, &cluster.nodes[target], 3).await;
    tokio::task::spawn_blocking(move || writer.join().unwrap())
        .await
        .unwrap();
    assert_eq!(member_nodes(&done), {
        let mut nodes = vec![target_node.clone(), other.clone(), spare.clone()];
        nodes.sort();
        nodes
    });
    let leaving_node = &cluster.nodes[cluster.index_of(&leaving)];
    wait_until("the moved replica is deleted", leaving_node, || async {
        replicas_on(leaving_node).await.is_empty()
    })
    .await;
    cluster.assert_replicas_identical("live").await;
    assert!(connect(&uri).read(0, 4 << 20).unwrap() == data);

    // With one member down (two of three in sync), moving another in-sync
    // one keeps both copies until the new one is in sync.
    let down = cluster.index_of(&other);
    cluster.nodes[down].kill9();
    connect(&uri).write(0, &[9; 4096], true).unwrap();
    let outcome = volumes::replace_replica(&cluster.file(), "live", &spare, Some(&leaving))
        .await
        .unwrap();
    assert!(outcome.planned.keep_until_copied);
    let done = wait_for_move("live", &cluster, &cluster.nodes[target], 2).await;
    let mut expected = vec![target_node.clone(), other.clone(), leaving.clone()];
    expected.sort();
    assert_eq!(member_nodes(&done), expected);
    assert_eq!(
        done.in_sync(),
        [member_id(&done, &target_node), member_id(&done, &leaving)]
            .into_iter()
            .collect()
    );
    let mut expected_data = data.clone();
    expected_data[..4096].fill(9);
    assert!(connect(&uri).read(0, 4 << 20).unwrap() == expected_data);
}

/// A move of an in-sync replica of volume "live" under way, with 6 MiB
/// written and copied at 4 MiB/s, so it lasts a second or two.
struct MoveUnderWay {
    _dir: tempfile::TempDir,
    cluster: TestCluster,
    report: VolumeReport,
    /// The target's node (the index of which is `target`), the node of the
    /// replica moved, the other member's node, and the node moved to.
    target_node: String,
    leaving: String,
    other: String,
    spare: String,
    target: usize,
    uri: String,
    data: Vec<u8>,
}

async fn start_a_move(data_seed: u64) -> MoveUnderWay {
    let (dir, cluster) = start_knowing_the_cluster(&["--rebuild-rate", "4MiB"]);
    let report = cluster.create_volume("live", 16 * MIB, 3).await;
    let (target_node, leaving, spare) = roles(&cluster, &report);
    let other = member_nodes(&report)
        .into_iter()
        .find(|n| *n != target_node && *n != leaving)
        .unwrap();
    let target = cluster.index_of(&target_node);
    let uri = cluster.export("live", target).await;
    let data = random_bytes(6 << 20, data_seed);
    connect(&uri).write(0, &data, true).unwrap();
    let outcome = volumes::replace_replica(&cluster.file(), "live", &leaving, None)
        .await
        .unwrap();
    assert!(outcome.planned.keep_until_copied);
    MoveUnderWay {
        _dir: dir,
        cluster,
        report,
        target_node,
        leaving,
        other,
        spare,
        target,
        uri,
        data,
    }
}

/// On an idle volume, an in-sync member that stops answering during a move
/// does not hold the move up: the final grow needs every in-sync replica, and
/// the target drops the dead one from the in-sync set without any write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_on_an_idle_volume_ends_when_another_member_dies() {
    let MoveUnderWay {
        _dir,
        mut cluster,
        target_node,
        other,
        spare,
        target,
        uri,
        data,
        ..
    } = start_a_move(11).await;
    // During the copy, with no write coming.
    let down = cluster.index_of(&other);
    cluster.nodes[down].kill9();
    let done = wait_for_move("live", &cluster, &cluster.nodes[target], 2).await;
    let mut expected = vec![target_node.clone(), other.clone(), spare.clone()];
    expected.sort();
    assert_eq!(member_nodes(&done), expected);
    assert_eq!(
        done.in_sync(),
        [member_id(&done, &target_node), member_id(&done, &spare)]
            .into_iter()
            .collect()
    );
    assert!(connect(&uri).read(0, 6 << 20).unwrap() == data);
}

/// A move is often made because the leaving replica's node is about to go;
/// if it goes together with the node of the new replica, the two members
/// that stay are still a quorum (a majority of the list before the move and
/// of the list after it): the volume goes on serving, and the move ends
/// once the successor's node is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_goes_on_when_the_leaving_replica_and_its_successor_die_together() {
    let MoveUnderWay {
        _dir,
        mut cluster,
        report,
        target_node,
        leaving,
        other,
        spare,
        target,
        uri,
        mut data,
    } = start_a_move(13).await;
    // During the copy, both nodes die.
    let leaving_index = cluster.index_of(&leaving);
    cluster.nodes[leaving_index].kill9();
    let successor = cluster.index_of(&spare);
    cluster.nodes[successor].kill9();
    let update = random_bytes(64 << 10, 14);
    let mut client = connect(&uri);
    client.write(1 << 20, &update, true).unwrap();
    data[1 << 20..(1 << 20) + update.len()].copy_from_slice(&update);
    assert!(client.read(0, 6 << 20).unwrap() == data);
    let during = cluster.report("live").await;
    assert_eq!(during.members().len(), 4, "the move is still under way");
    assert_eq!(
        during.in_sync(),
        [member_id(&report, &target_node), member_id(&report, &other)]
            .into_iter()
            .collect()
    );

    cluster.nodes[successor].spawn();
    let done = wait_for_move("live", &cluster, &cluster.nodes[target], 2).await;
    let mut expected = vec![target_node.clone(), other.clone(), spare.clone()];
    expected.sort();
    assert_eq!(member_nodes(&done), expected);
    assert_eq!(done.in_sync().len(), 3, "{:?}", done.in_sync());
    assert!(connect(&uri).read(0, 6 << 20).unwrap() == data);
}

/// A move can be given up while its copy runs (`strata volume
/// cancel-move`): the new replica leaves the volume and its data is
/// deleted, the replica that was being moved stays in sync where it was,
/// and writes go on to the three. With no move under way, or asked of a
/// node without the volume's target, the cancel is refused with a clear
/// error; the move can be started again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_under_way_can_be_cancelled() {
    let MoveUnderWay {
        _dir,
        cluster,
        report,
        target_node,
        leaving,
        other,
        spare,
        target,
        uri,
        mut data,
    } = start_a_move(17).await;
    let first_successor = member_id(&cluster.report("live").await, &spare);
    let cancelled = volumes::cancel_move(&cluster.file(), "live").await.unwrap();
    assert_eq!(
        (&cancelled.stays, &cancelled.dropped, &cancelled.target_node),
        (&leaving, &spare, &target_node)
    );
    assert!(cancelled.dropped_deleted, "the new replica's node answers");
    let spare_node = &cluster.nodes[cluster.index_of(&spare)];
    assert!(replicas_on(spare_node).await.is_empty());
    let after = cluster.report("live").await;
    assert_eq!(after.leaving(), None);
    assert_eq!(member_nodes(&after), member_nodes(&report));
    assert_eq!(after.in_sync().len(), 3, "{:?}", after.in_sync());
    let (_, target_view) = after.active_target().expect("the target serves on");
    assert!(target_view.replicas.iter().all(|r| !r.rebuilding));

    let update = random_bytes(64 << 10, 18);
    connect(&uri).write(1 << 20, &update, true).unwrap();
    data[1 << 20..(1 << 20) + update.len()].copy_from_slice(&update);
    assert!(connect(&uri).read(0, 6 << 20).unwrap() == data);
    cluster.assert_replicas_identical("live").await;

    let err = volumes::cancel_move(&cluster.file(), "live")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("no replica of volume \"live\" is being moved (a move that ended"),
        "{err}"
    );
    let mut client = cluster.nodes[target].client().await;
    let refused = client
        .cancel_move(CancelMoveRequest {
            volume: "live".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert_eq!(refused.message(), "no replica of the volume is being moved");
    let mut elsewhere = cluster.nodes[cluster.index_of(&other)].client().await;
    let refused = elsewhere
        .cancel_move(CancelMoveRequest {
            volume: "live".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    let refused = client
        .cancel_move(CancelMoveRequest { volume: "".into() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");

    // Moved again, the replica goes this time. The new replica's id is not
    // the deleted one's, which the target may still be deleting.
    let outcome = volumes::replace_replica(&cluster.file(), "live", &leaving, None)
        .await
        .unwrap();
    assert_eq!(outcome.planned.node.name, spare);
    assert!(
        outcome.planned.member.id > first_successor,
        "{} after {first_successor}",
        outcome.planned.member.id
    );
    let done = wait_for_move("live", &cluster, &cluster.nodes[target], 3).await;
    let mut expected = vec![target_node.clone(), other.clone(), spare.clone()];
    expected.sort();
    assert_eq!(member_nodes(&done), expected);
    assert!(connect(&uri).read(0, 6 << 20).unwrap() == data);
}

/// The target, not the caller's older look at the volume, decides whether
/// a replica can be moved: one that is unreachable, or out of sync, cannot
/// stay in sync during the copy, and a move of it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_of_a_replica_that_cannot_stay_in_sync_is_refused() {
    use strata_proto::storage::{ReplaceReplicaRequest, ReplicaMember};
    let mut cluster = TestCluster::start(4, "256MiB", FAST_TIMEOUT);
    let report = cluster.create_volume("m", 16 * MIB, 3).await;
    let (target_node, victim, spare) = roles(&cluster, &report);
    let victim_id = member_id(&report, &victim);
    let target = cluster.index_of(&target_node);
    let uri = cluster.export("m", target).await;
    let spare_node = &cluster.nodes[cluster.index_of(&spare)];
    let move_victim = ReplaceReplicaRequest {
        volume: "m".into(),
        remove_id: victim_id,
        replacement: Some(ReplicaMember {
            id: 9,
            node: spare.clone(),
            address: spare_node.replication.to_string(),
        }),
        keep_until_copied: true,
    };
    let down = cluster.index_of(&victim);
    cluster.nodes[down].kill9();
    // Idle: still in sync, but unreachable.
    let mut client = cluster.nodes[target].client().await;
    let refused = client
        .replace_replica(move_victim.clone())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        refused.message(),
        format!(
            "the replica on {victim} is unreachable, so it cannot stay in sync while its \
             successor is copied; replace it instead"
        )
    );
    // A write drops it from the in-sync set.
    connect(&uri).write(0, &[1; 4096], true).unwrap();
    let refused = client.replace_replica(move_victim).await.unwrap_err();
    assert!(refused.message().contains("is out of sync"), "{refused:?}");
    let after = cluster.report("m").await;
    assert_eq!(after.members().len(), 3);
    assert_eq!(after.leaving(), None);
}

/// A replacement replica starts out of sync: an opening target that hears
/// only from it and from stale members must not take its empty data for the
/// volume's (the replication model found that lost write). A fresh volume's
/// replica starts in sync; asking for both a replacement and a snapshot is
/// refused. Both keep the volume uid they were created with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_replica_starts_out_of_sync() {
    use strata_proto::storage::{CreateReplicaRequest, ReplicaMember};
    let cluster = TestCluster::start(1, "256MiB", &[]);
    let node = &cluster.nodes[0];
    let members: Vec<ReplicaMember> = (1..=3)
        .map(|id| ReplicaMember {
            id,
            node: format!("node-{id}"),
            address: format!("127.0.0.1:{}", 1000 + id),
        })
        .collect();
    let request = |volume: &str, replacement: bool, from_snapshot: &str| CreateReplicaRequest {
        volume: volume.to_string(),
        size_bytes: 16 * MIB,
        replica_id: 1,
        members: members.clone(),
        from_snapshot: from_snapshot.to_string(),
        from_snapshot_uid: None,
        replacement,
        volume_uid: 7,
    };
    let mut client = node.client().await;
    let fresh = client
        .create_replica(request("fresh", false, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((fresh.config_epoch, fresh.in_sync), (0, vec![1, 2, 3]));
    let joining = client
        .create_replica(request("joining", true, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(joining.config_epoch, 0);
    assert!(joining.in_sync.is_empty(), "{joining:?}");
    let refused = client
        .create_replica(request("both", true, "snap"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(replicas_on(node).await.iter().all(|r| r.volume != "both"));
    // Both carry the volume's uid, also once the node restarted.
    assert_eq!((fresh.volume_uid, joining.volume_uid), (7, 7));
    let mut cluster = cluster;
    cluster.nodes[0].kill9();
    cluster.nodes[0].spawn();
    let uids: Vec<u64> = replicas_on(&cluster.nodes[0])
        .await
        .iter()
        .map(|r| r.volume_uid)
        .collect();
    assert_eq!(uids, vec![7, 7]);
}

/// A node's targets share their looks over the cluster for leftover
/// replicas (each look asks every node for everything it holds): targets
/// opened together cost one look, not one each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_opened_together_share_their_look_for_leftovers() {
    let (_dir, cluster) = start_knowing_the_cluster(&[]);
    let names = ["share-1", "share-2", "share-3", "share-4"];
    for name in names {
        cluster.create_volume(name, 16 * MIB, 3).await;
    }
    let surveys = || {
        cluster.nodes[0]
            .metric("strata_leftover_surveys_total")
            .unwrap_or(0.0)
    };
    assert_eq!(surveys(), 0.0, "no target yet, no look");
    let opening = std::time::Instant::now();
    for name in names {
        cluster.export(name, 0).await;
    }
    let opened_in = opening.elapsed();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while surveys() < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no look for leftovers"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every target's first look was due within seconds of the others'; the
    // next is a minute away (10 s had the look not settled).
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        surveys(),
        1.0,
        "four targets opened within {opened_in:?} looked {} times",
        surveys()
    );
}
