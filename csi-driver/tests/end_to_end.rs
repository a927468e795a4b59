//! A volume's whole life on this machine, as Kubernetes would drive it:
//! CreateVolume → ControllerPublish → NodeStage (real nbdfuse, loop device,
//! mkfs.ext4, mount) → NodePublish → a file written → unpublish/unstage →
//! staged again by a second node plugin → the file is there → expanded →
//! the filesystem grew → snapshot → more written → a volume from the
//! snapshot, staged on the other node, has the old content; a three-replica volume whose target moves to
//! another node when the storage node under it goes down; and a restart
//! test: the plugin is SIGKILLed between calls and every retried call
//! succeeds without attaching anything twice; and an xfs volume, formatted
//! once, kept across stages and grown with xfs_growfs.
//!
//! CSI node ids are storage node names: each node plugin here is named
//! after the storage node on "its machine".

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use strata_proto::csi::controller_client::ControllerClient;
use strata_proto::csi::node_client::NodeClient;
use strata_proto::csi::*;
use tonic::transport::Channel;
use tonic::Code;

fn stage_request(
    id: &str,
    staging: &Path,
    context: &HashMap<String, String>,
) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: id.into(),
        publish_context: context.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(mount_capability("ext4")),
        ..Default::default()
    }
}

fn publish_request(
    id: &str,
    staging: &Path,
    target: &Path,
    readonly: bool,
) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.to_string_lossy().into(),
        target_path: target.to_string_lossy().into(),
        volume_capability: Some(mount_capability("ext4")),
        readonly,
        ..Default::default()
    }
}

async fn publish_to(
    c: &mut ControllerClient<Channel>,
    id: &str,
    node: &str,
) -> HashMap<String, String> {
    c.controller_publish_volume(ControllerPublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        volume_capability: Some(mount_capability("ext4")),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .publish_context
}

async fn unpublish_from(c: &mut ControllerClient<Channel>, id: &str, node: &str) {
    c.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        ..Default::default()
    })
    .await
    .unwrap();
}

async fn bytes_total(n: &mut NodeClient<Channel>, id: &str, path: &Path) -> i64 {
    let stats = n
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: path.to_string_lossy().into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let bytes = stats
        .usage
        .iter()
        .find(|u| u.unit == volume_usage::Unit::Bytes as i32)
        .unwrap();
    let inodes = stats
        .usage
        .iter()
        .find(|u| u.unit == volume_usage::Unit::Inodes as i32)
        .unwrap();
    assert!(bytes.used > 0 && bytes.available > 0 && bytes.used + bytes.available <= bytes.total);
    assert!(inodes.total > 0 && inodes.used > 0);
    bytes.total
}

/// Writes the filesystem holding `path` out to its device.
fn sync_filesystem(path: &Path) {
    let status = std::process::Command::new("sync")
        .arg("-f")
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

/// The controller plugin, against the cluster `strata up` described in `dir`.
fn controller_plugin(root: &Path, dir: &str) -> CsiProcess {
    CsiProcess::start(root, "controller", &["--mode", "controller", "--dir", dir])
}

/// The node plugin of the machine of storage node `name`, with its state
/// under `root/name`.
fn node_plugin(root: &Path, name: &str, zone: &str) -> CsiProcess {
    let state = root.join(name).join("state").to_string_lossy().to_string();
    CsiProcess::start(
        root,
        name,
        &[
            "--mode",
            "node",
            "--node-id",
            name,
            "--zone",
            zone,
            "--state-dir",
            &state,
        ],
    )
}

/// ControllerExpandVolume of volume `id` to at least `bytes`.
fn expand_request(
    id: &str,
    bytes: i64,
    capability: Option<VolumeCapability>,
) -> ControllerExpandVolumeRequest {
    ControllerExpandVolumeRequest {
        volume_id: id.to_string(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capability: capability,
        ..Default::default()
    }
}

fn kernel_nbd() -> bool {
    Path::new("/sys/module/nbd").exists()
}

#[tokio::test]
async fn a_volume_is_staged_written_moved_to_another_node_and_grown() {
    let cluster = StorageCluster::start(&[("node-a", "zone-a"), ("node-b", "zone-a")], "512MiB");
    let work = tempfile::tempdir().unwrap();
    let _cleanup = HostCleanup {
        root: work.path().to_path_buf(),
    };
    let root = work.path();
    let dir = cluster.path().to_string_lossy().to_string();
    let controller = controller_plugin(root, &dir);
    let worker1 = node_plugin(root, "node-a", "zone-a");
    let worker2 = node_plugin(root, "node-b", "zone-a");
    let mut c = controller.controller().await;

    let volume = c
        .create_volume(CreateVolumeRequest {
            name: "pvc-data".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 64 * MIB,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_capability("ext4")],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let id = volume.volume_id.clone();

    // On node-a: stage (format + mount), publish, write.
    let context = publish_to(&mut c, &id, "node-a").await;
    let staging1 = root.join("node-a/staging");
    let target1 = root.join("node-a/pods/p1/mount");
    std::fs::create_dir_all(&staging1).unwrap();
    std::fs::create_dir_all(target1.parent().unwrap()).unwrap();
    let mut n1 = worker1.node().await;
    n1.node_stage_volume(stage_request(&id, &staging1, &context))
        .await
        .unwrap();
    assert!(is_mounted(&staging1));
    // Staging again is a no-op: still one nbdfuse, one mount.
    n1.node_stage_volume(stage_request(&id, &staging1, &context))
        .await
        .unwrap();
    if !kernel_nbd() {
        assert_eq!(nbdfuse_pids(root).len(), 1);
    }
    n1.node_publish_volume(publish_request(&id, &staging1, &target1, false))
        .await
        .unwrap();
    n1.node_publish_volume(publish_request(&id, &staging1, &target1, false))
        .await
        .unwrap();
    assert!(is_mounted(&target1));
    std::fs::write(target1.join("hello.txt"), b"written on node-a\n").unwrap();
    let size_before = bytes_total(&mut n1, &id, &target1).await;
    // A read-only publish cannot be written through.
    let readonly = root.join("node-a/pods/p2/mount");
    std::fs::create_dir_all(readonly.parent().unwrap()).unwrap();
    n1.node_publish_volume(publish_request(&id, &staging1, &readonly, true))
        .await
        .unwrap();
    assert!(std::fs::write(readonly.join("nope.txt"), b"x").is_err());
    assert_eq!(
        std::fs::read(readonly.join("hello.txt")).unwrap(),
        b"written on node-a\n"
    );

    // Unpublish and unstage (each twice: idempotent); the device is gone.
    for target in [&target1, &readonly] {
        for _ in 0..2 {
            n1.node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: target.to_string_lossy().into(),
            })
            .await
            .unwrap();
        }
        assert!(!target.exists());
    }
    for _ in 0..2 {
        n1.node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging1.to_string_lossy().into(),
        })
        .await
        .unwrap();
    }
    assert!(!is_mounted(&staging1));
    wait_for(
        "nbdfuse to exit",
        std::time::Duration::from_secs(10),
        || nbdfuse_pids(root).is_empty(),
    );
    c.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
        volume_id: id.clone(),
        node_id: "node-a".into(),
        ..Default::default()
    })
    .await
    .unwrap();

    // Grown while attached nowhere (nbdfuse reads the size when it connects).
    let grown = c
        .controller_expand_volume(expand_request(
            &id,
            128 * MIB,
            Some(mount_capability("ext4")),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 128 * MIB);
    assert!(grown.node_expansion_required);

    // On node-b: the file is there, and NodeExpandVolume grows the filesystem.
    let context = publish_to(&mut c, &id, "node-b").await;
    let staging2 = root.join("node-b/staging");
    let target2 = root.join("node-b/pods/p3/mount");
    std::fs::create_dir_all(&staging2).unwrap();
    std::fs::create_dir_all(target2.parent().unwrap()).unwrap();
    let mut n2 = worker2.node().await;
    n2.node_stage_volume(stage_request(&id, &staging2, &context))
        .await
        .unwrap();
    n2.node_publish_volume(publish_request(&id, &staging2, &target2, false))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(target2.join("hello.txt")).unwrap(),
        b"written on node-a\n"
    );
    let expanded = n2
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: target2.to_string_lossy().into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 128 * MIB,
                limit_bytes: 0,
            }),
            staging_target_path: staging2.to_string_lossy().into(),
            volume_capability: Some(mount_capability("ext4")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(expanded.capacity_bytes, 128 * MIB);
    let size_after = bytes_total(&mut n2, &id, &target2).await;
    assert!(
        size_after > size_before + 50 * MIB,
        "{size_before} -> {size_after}"
    );

    // Snapshot the mounted filesystem (synced first, as a CO's quiesce
    // hook would), write more, and restore the snapshot into a new volume.
    sync_filesystem(&target2);
    let snapshot = c
        .create_snapshot(CreateSnapshotRequest {
            source_volume_id: id.clone(),
            name: "snapshot-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(snapshot.ready_to_use);
    assert_eq!(snapshot.size_bytes, 128 * MIB);
    std::fs::write(target2.join("hello.txt"), b"changed after the snapshot\n").unwrap();
    std::fs::write(target2.join("later.txt"), b"new after the snapshot\n").unwrap();
    sync_filesystem(&target2);
    let restored = c
        .create_volume(CreateVolumeRequest {
            name: "pvc-restored".into(),
            volume_capabilities: vec![mount_capability("ext4")],
            volume_content_source: Some(VolumeContentSource {
                r#type: Some(volume_content_source::Type::Snapshot(
                    volume_content_source::SnapshotSource {
                        snapshot_id: snapshot.snapshot_id.clone(),
                    },
                )),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(restored.capacity_bytes, 128 * MIB);
    let restored_id = restored.volume_id;
    let context = publish_to(&mut c, &restored_id, "node-a").await;
    let staging3 = root.join("node-a/staging-restored");
    let target3 = root.join("node-a/pods/p4/mount");
    std::fs::create_dir_all(&staging3).unwrap();
    std::fs::create_dir_all(target3.parent().unwrap()).unwrap();
    n1.node_stage_volume(stage_request(&restored_id, &staging3, &context))
        .await
        .unwrap();
    n1.node_publish_volume(publish_request(&restored_id, &staging3, &target3, false))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(target3.join("hello.txt")).unwrap(),
        b"written on node-a\n",
        "the restored volume has the content at the snapshot"
    );
    assert!(!target3.join("later.txt").exists());
    assert_eq!(
        std::fs::read(target2.join("hello.txt")).unwrap(),
        b"changed after the snapshot\n",
        "the source keeps its newer content"
    );
    n1.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: restored_id.clone(),
        target_path: target3.to_string_lossy().into(),
    })
    .await
    .unwrap();
    n1.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: restored_id.clone(),
        staging_target_path: staging3.to_string_lossy().into(),
    })
    .await
    .unwrap();
    unpublish_from(&mut c, &restored_id, "node-a").await;
    c.delete_volume(DeleteVolumeRequest {
        volume_id: restored_id,
        ..Default::default()
    })
    .await
    .unwrap();
    c.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: snapshot.snapshot_id,
        ..Default::default()
    })
    .await
    .unwrap();

    if !kernel_nbd() {
        // Online growth under nbdfuse needs a fresh attach: said, not faked.
        c.controller_expand_volume(expand_request(&id, 160 * MIB, None))
            .await
            .unwrap();
        let message = expect_code(
            n2.node_expand_volume(NodeExpandVolumeRequest {
                volume_id: id.clone(),
                volume_path: target2.to_string_lossy().into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: 160 * MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await,
            Code::FailedPrecondition,
        );
        assert!(message.contains("stage"), "{message}");
    }

    n2.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: id.clone(),
        target_path: target2.to_string_lossy().into(),
    })
    .await
    .unwrap();
    n2.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging2.to_string_lossy().into(),
    })
    .await
    .unwrap();
    unpublish_from(&mut c, &id, "node-b").await;
    c.delete_volume(DeleteVolumeRequest {
        volume_id: id,
        ..Default::default()
    })
    .await
    .unwrap();
}

async fn volume_status(
    c: &mut ControllerClient<Channel>,
    id: &str,
) -> controller_get_volume_response::VolumeStatus {
    c.controller_get_volume(ControllerGetVolumeRequest {
        volume_id: id.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .status
    .unwrap()
}

#[tokio::test]
async fn a_three_replica_volume_moves_to_another_node_when_its_storage_node_dies() {
    let mut cluster = StorageCluster::start(
        &[
            ("node-a", "zone-a"),
            ("node-b", "zone-b"),
            ("node-c", "zone-c"),
        ],
        "256MiB",
    );
    let work = tempfile::tempdir().unwrap();
    let _cleanup = HostCleanup {
        root: work.path().to_path_buf(),
    };
    let root = work.path();
    let dir = cluster.path().to_string_lossy().to_string();
    let controller = controller_plugin(root, &dir);
    let plugin_a = node_plugin(root, "node-a", "zone-a");
    let plugin_b = node_plugin(root, "node-b", "zone-b");
    let mut c = controller.controller().await;

    let volume = c
        .create_volume(CreateVolumeRequest {
            name: "pvc-db".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 64 * MIB,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_capability("ext4")],
            parameters: HashMap::from([("replicas".into(), "3".into())]),
            // As external-provisioner asks for a pod scheduled to node-a.
            accessibility_requirements: Some(TopologyRequirement {
                requisite: ["zone-a", "zone-b", "zone-c"]
                    .iter()
                    .map(|z| strata_csi::topology::zone_topology(z))
                    .collect(),
                preferred: vec![strata_csi::topology::zone_topology("zone-a")],
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        volume.accessible_topology.len(),
        3,
        "a replica in each zone"
    );
    let id = volume.volume_id;
    let status = volume_status(&mut c, &id).await;
    assert!(status.published_node_ids.is_empty());
    assert!(!status.volume_condition.unwrap().abnormal);

    // On node-a: the target opens there; stage, publish, write durably.
    let nodes = cluster.file();
    let context = publish_to(&mut c, &id, "node-a").await;
    assert_eq!(
        context["nbdUri"],
        format!("nbd://{}/{id}", nodes.node("node-a").unwrap().nbd)
    );
    let staging_a = root.join("node-a/staging");
    let target_a = root.join("node-a/pods/db-0/mount");
    std::fs::create_dir_all(&staging_a).unwrap();
    std::fs::create_dir_all(target_a.parent().unwrap()).unwrap();
    let mut na = plugin_a.node().await;
    na.node_stage_volume(stage_request(&id, &staging_a, &context))
        .await
        .unwrap();
    na.node_publish_volume(publish_request(&id, &staging_a, &target_a, false))
        .await
        .unwrap();
    let contents = b"row 1\nrow 2\n".repeat(1000);
    {
        use std::io::Write;
        let mut file = std::fs::File::create(target_a.join("table.dat")).unwrap();
        file.write_all(&contents).unwrap();
        file.sync_all().unwrap();
    }
    // The pod is rescheduled to node-b: node-a's plugin lets go, but the
    // volume stays published there, so node-b has to wait.
    na.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: id.clone(),
        target_path: target_a.to_string_lossy().into(),
    })
    .await
    .unwrap();
    na.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging_a.to_string_lossy().into(),
    })
    .await
    .unwrap();
    let message = expect_code(
        c.controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: id.clone(),
            node_id: "node-b".into(),
            volume_capability: Some(mount_capability("ext4")),
            ..Default::default()
        })
        .await,
        Code::FailedPrecondition,
    );
    assert!(message.contains("node-a"), "{message}");

    // node-a's storage node dies with the target still open on it. The CO
    // force-detaches (ControllerUnpublish to a node that does not answer
    // succeeds) and publishes to node-b: the target moves there, fencing
    // node-a's, with two of three replicas.
    cluster.stop("node-a");
    unpublish_from(&mut c, &id, "node-a").await;
    let context = publish_to(&mut c, &id, "node-b").await;
    assert_eq!(
        context["nbdUri"],
        format!("nbd://{}/{id}", nodes.node("node-b").unwrap().nbd)
    );
    assert_eq!(
        volume_status(&mut c, &id).await.published_node_ids,
        ["node-b"]
    );

    // Second NodeStage, on node-b: the file is there.
    let staging_b = root.join("node-b/staging");
    let target_b = root.join("node-b/pods/db-0/mount");
    std::fs::create_dir_all(&staging_b).unwrap();
    std::fs::create_dir_all(target_b.parent().unwrap()).unwrap();
    let mut nb = plugin_b.node().await;
    nb.node_stage_volume(stage_request(&id, &staging_b, &context))
        .await
        .unwrap();
    nb.node_publish_volume(publish_request(&id, &staging_b, &target_b, false))
        .await
        .unwrap();
    let read = std::fs::read(target_b.join("table.dat")).unwrap();
    assert!(
        read == contents,
        "table.dat differs after the move ({} bytes)",
        read.len()
    );
    std::fs::write(target_b.join("after.txt"), b"written on node-b\n").unwrap();

    // The controller reports the lost replica.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let condition = volume_status(&mut c, &id).await.volume_condition.unwrap();
        if condition.abnormal {
            assert!(condition.message.contains("2/3"), "{}", condition.message);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the volume never reported the lost replica: {}",
            condition.message
        );
        // Writes make the target notice that node-a is gone.
        std::fs::write(target_b.join("tick"), b"x").unwrap();
        let _ = std::process::Command::new("sync").status();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    nb.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: id.clone(),
        target_path: target_b.to_string_lossy().into(),
    })
    .await
    .unwrap();
    nb.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging_b.to_string_lossy().into(),
    })
    .await
    .unwrap();
    unpublish_from(&mut c, &id, "node-b").await;
    assert!(volume_status(&mut c, &id)
        .await
        .published_node_ids
        .is_empty());
    // With a replica's node down, deletion cannot finish: UNAVAILABLE, so
    // the CO retries until the node is back.
    expect_code(
        c.delete_volume(DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await,
        Code::Unavailable,
    );
}

#[tokio::test]
async fn calls_retried_after_the_plugin_is_killed_succeed_and_repeat_nothing() {
    let cluster = StorageCluster::start(&[("node-a", "zone-a")], "256MiB");
    let work = tempfile::tempdir().unwrap();
    let _cleanup = HostCleanup {
        root: work.path().to_path_buf(),
    };
    let root = work.path();
    let dir = cluster.path().to_string_lossy().to_string();
    let state = root.join("state").to_string_lossy().to_string();
    let mut csi = CsiProcess::start(
        root,
        "all",
        &[
            "--mode",
            "all",
            "--dir",
            &dir,
            "--node-id",
            "node-a",
            "--zone",
            "zone-a",
            "--state-dir",
            &state,
        ],
    );
    let create = CreateVolumeRequest {
        name: "pvc-restart".into(),
        capacity_range: Some(CapacityRange {
            required_bytes: 32 * MIB,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_capability("ext4")],
        ..Default::default()
    };
    let first = csi
        .controller()
        .await
        .create_volume(create.clone())
        .await
        .unwrap()
        .into_inner();
    csi.restart();
    let mut c = csi.controller().await;
    let second = c.create_volume(create).await.unwrap().into_inner();
    assert_eq!(first, second);
    let listed = c
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 1, "one volume, not two");

    let context = publish_to(&mut c, "pvc-restart", "node-a").await;
    let staging = root.join("staging");
    let target = root.join("pods/p1/mount");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    csi.node()
        .await
        .node_stage_volume(stage_request("pvc-restart", &staging, &context))
        .await
        .unwrap();
    let attached = nbdfuse_pids(root);
    let state_file = root.join("state/volumes/pvc-restart.json");
    let recorded = std::fs::read_to_string(&state_file).unwrap();

    // Killed after staging: the retried stage finds the volume staged.
    csi.restart();
    let mut n = csi.node().await;
    n.node_stage_volume(stage_request("pvc-restart", &staging, &context))
        .await
        .unwrap();
    assert_eq!(
        nbdfuse_pids(root),
        attached,
        "the attachment survived and was not repeated"
    );
    assert_eq!(std::fs::read_to_string(&state_file).unwrap(), recorded);
    n.node_publish_volume(publish_request("pvc-restart", &staging, &target, false))
        .await
        .unwrap();
    std::fs::write(target.join("kept.txt"), b"across restarts\n").unwrap();

    csi.restart();
    let mut n = csi.node().await;
    n.node_publish_volume(publish_request("pvc-restart", &staging, &target, false))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(target.join("kept.txt")).unwrap(),
        b"across restarts\n"
    );
    n.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: "pvc-restart".into(),
        target_path: target.to_string_lossy().into(),
    })
    .await
    .unwrap();

    csi.restart();
    let mut n = csi.node().await;
    n.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: "pvc-restart".into(),
        staging_target_path: staging.to_string_lossy().into(),
    })
    .await
    .unwrap();
    assert!(!is_mounted(&staging));
    assert!(!state_file.exists());
    wait_for(
        "nbdfuse to exit",
        std::time::Duration::from_secs(10),
        || nbdfuse_pids(root).is_empty(),
    );

    let mut c = csi.controller().await;
    unpublish_from(&mut c, "pvc-restart", "node-a").await;
    csi.restart();
    let mut c = csi.controller().await;
    // Retried after a restart: still unpublished, and then deleted.
    unpublish_from(&mut c, "pvc-restart", "node-a").await;
    c.delete_volume(DeleteVolumeRequest {
        volume_id: "pvc-restart".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    csi.restart();
    csi.controller()
        .await
        .delete_volume(DeleteVolumeRequest {
            volume_id: "pvc-restart".into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn an_xfs_volume_is_formatted_kept_across_stages_and_grown() {
    let cluster = StorageCluster::start(&[("node-a", "zone-a")], "1GiB");
    let work = tempfile::tempdir().unwrap();
    let _cleanup = HostCleanup {
        root: work.path().to_path_buf(),
    };
    let root = work.path();
    let dir = cluster.path().to_string_lossy().to_string();
    let controller = controller_plugin(root, &dir);
    let worker = node_plugin(root, "node-a", "zone-a");
    let mut c = controller.controller().await;
    let mut n = worker.node().await;
    let xfs = mount_capability("xfs");
    // mkfs.xfs wants at least 300 MB.
    let id = c
        .create_volume(CreateVolumeRequest {
            name: "pvc-xfs".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 320 * MIB,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![xfs.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let staging = root.join("node-a/staging");
    let target = root.join("node-a/pods/p1/mount");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let stage = |context: &HashMap<String, String>| NodeStageVolumeRequest {
        volume_capability: Some(xfs.clone()),
        ..stage_request(&id, &staging, context)
    };
    let publish = NodePublishVolumeRequest {
        volume_capability: Some(xfs.clone()),
        ..publish_request(&id, &staging, &target, false)
    };
    let unstage = NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
    };
    let unpublish = NodeUnpublishVolumeRequest {
        volume_id: id.clone(),
        target_path: target.to_string_lossy().into(),
    };

    // Formatted xfs when blank; a file written.
    let context = publish_to(&mut c, &id, "node-a").await;
    n.node_stage_volume(stage(&context)).await.unwrap();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let staged = mounts
        .lines()
        .find(|l| l.split(' ').nth(1) == Some(staging.to_str().unwrap()))
        .expect("staged");
    assert_eq!(staged.split(' ').nth(2), Some("xfs"), "{staged}");
    n.node_publish_volume(publish.clone()).await.unwrap();
    std::fs::write(target.join("hello.txt"), b"on xfs\n").unwrap();
    let size_before = bytes_total(&mut n, &id, &target).await;
    n.node_unpublish_volume(unpublish.clone()).await.unwrap();
    n.node_unstage_volume(unstage.clone()).await.unwrap();
    unpublish_from(&mut c, &id, "node-a").await;

    // Grown while detached; staged again, the file is there (not formatted
    // over), and NodeExpandVolume grows the filesystem with xfs_growfs.
    c.controller_expand_volume(expand_request(&id, 448 * MIB, Some(xfs.clone())))
        .await
        .unwrap();
    let context = publish_to(&mut c, &id, "node-a").await;
    n.node_stage_volume(stage(&context)).await.unwrap();
    n.node_publish_volume(publish.clone()).await.unwrap();
    assert_eq!(
        std::fs::read(target.join("hello.txt")).unwrap(),
        b"on xfs\n"
    );
    n.node_expand_volume(NodeExpandVolumeRequest {
        volume_id: id.clone(),
        volume_path: target.to_string_lossy().into(),
        capacity_range: Some(CapacityRange {
            required_bytes: 448 * MIB,
            limit_bytes: 0,
        }),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(xfs.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    let size_after = bytes_total(&mut n, &id, &target).await;
    assert!(
        size_after > size_before + 100 * MIB,
        "{size_before} -> {size_after}"
    );
    n.node_unpublish_volume(unpublish).await.unwrap();
    n.node_unstage_volume(unstage).await.unwrap();
    unpublish_from(&mut c, &id, "node-a").await;
}

/// An expansion that grew only some replicas (the resize failed on the
/// other node's) is not taken for done when the CO retries it: the volume
/// counts as large as its smallest replica, and the retry grows the rest.
#[tokio::test]
async fn an_expansion_that_reached_some_replicas_is_finished_by_its_retry() {
    let cluster = StorageCluster::start(&[("node-a", "zone-a"), ("node-b", "zone-b")], "256MiB");
    let work = tempfile::tempdir().unwrap();
    let dir = cluster.path().to_string_lossy().to_string();
    let controller = controller_plugin(work.path(), &dir);
    let mut c = controller.controller().await;
    let id = c
        .create_volume(CreateVolumeRequest {
            name: "pvc-grown".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 64 * MIB,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_capability("ext4")],
            parameters: HashMap::from([("replicas".into(), "2".into())]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    // The first attempt grew node-a's replica, then failed.
    let nodes = cluster.file();
    strata_node::cluster::client::connect(nodes.node("node-a").unwrap())
        .await
        .unwrap()
        .resize_replica(strata_proto::storage::ResizeReplicaRequest {
            volume: id.clone(),
            size_bytes: 128 * MIB as u64,
        })
        .await
        .unwrap();

    let expanded = c
        .controller_expand_volume(expand_request(
            &id,
            128 * MIB,
            Some(mount_capability("ext4")),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(expanded.capacity_bytes, 128 * MIB);
    let report = strata_node::cluster::volumes::get(&nodes, &id)
        .await
        .unwrap();
    assert_eq!(
        report.smallest_replica_bytes(),
        128 * MIB as u64,
        "{report:?}"
    );
}
