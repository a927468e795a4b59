//! The CSI spec's rules, call by call, over the real unix socket of a
//! strata-csi process working against real storage nodes.

mod common;

use std::collections::HashMap;

use common::*;
use strata_csi::topology::{zone_topology, ZONE_KEY};
use strata_proto::csi::controller_client::ControllerClient;
use strata_proto::csi::volume_capability::access_mode::Mode;
use strata_proto::csi::volume_capability::AccessMode;
use strata_proto::csi::*;
use tonic::transport::Channel;
use tonic::Code;

const HEADER: i64 = strata_node::replication::replica::HEADER_BYTES as i64;

fn create(name: &str, required: i64, limit: i64) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.to_string(),
        capacity_range: Some(CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }),
        volume_capabilities: vec![mount_capability("ext4")],
        ..Default::default()
    }
}

fn in_zones(
    mut request: CreateVolumeRequest,
    requisite: &[&str],
    preferred: &[&str],
) -> CreateVolumeRequest {
    request.accessibility_requirements = Some(TopologyRequirement {
        requisite: requisite.iter().map(|z| zone_topology(z)).collect(),
        preferred: preferred.iter().map(|z| zone_topology(z)).collect(),
    });
    request
}

/// Two storage nodes (zone-a, zone-b) and strata-csi in controller mode.
fn controller() -> (StorageCluster, tempfile::TempDir, CsiProcess) {
    let cluster = StorageCluster::start(&[("node-a", "zone-a"), ("node-b", "zone-b")], "256MiB");
    let work = tempfile::tempdir().unwrap();
    let dir = cluster.path().to_string_lossy().to_string();
    let csi = CsiProcess::start(
        work.path(),
        "controller",
        &["--mode", "controller", "--dir", &dir],
    );
    (cluster, work, csi)
}

#[tokio::test]
async fn identity_names_the_driver_and_its_capabilities() {
    let (_cluster, _work, csi) = controller();
    let mut identity = csi.identity().await;
    let info = identity
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.strata.io");
    assert!(!info.vendor_version.is_empty());
    let caps = identity
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    use plugin_capability::{service, volume_expansion, Type};
    let services: Vec<i32> = caps
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(Type::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect();
    assert!(services.contains(&(service::Type::ControllerService as i32)));
    assert!(services.contains(&(service::Type::VolumeAccessibilityConstraints as i32)));
    assert!(caps.iter().any(|c| matches!(&c.r#type,
        Some(Type::VolumeExpansion(e)) if e.r#type == volume_expansion::Type::Online as i32)));
    let probe = identity.probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));

    // No snapshot capability is advertised, and the snapshot calls say why.
    let mut controller = csi.controller().await;
    let caps = controller
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    use controller_service_capability::{rpc::Type as Rpc, Type as CapType};
    let rpcs: Vec<i32> = caps
        .iter()
        .filter_map(|c| c.r#type.as_ref().map(|CapType::Rpc(r)| r.r#type))
        .collect();
    for rpc in [
        Rpc::CreateDeleteVolume,
        Rpc::PublishUnpublishVolume,
        Rpc::ListVolumes,
        Rpc::GetCapacity,
        Rpc::ExpandVolume,
        Rpc::GetVolume,
        Rpc::CreateDeleteSnapshot,
        Rpc::ListSnapshots,
        Rpc::CloneVolume,
    ] {
        assert!(rpcs.contains(&(rpc as i32)), "{rpc:?} missing");
    }
}

#[tokio::test]
async fn create_volume_follows_the_spec() {
    let (_cluster, _work, csi) = controller();
    let mut c = csi.controller().await;

    // Required fields.
    expect_code(
        c.create_volume(create("", 8 * MIB, 0)).await,
        Code::InvalidArgument,
    );
    let mut no_caps = create("v1", 8 * MIB, 0);
    no_caps.volume_capabilities.clear();
    expect_code(c.create_volume(no_caps).await, Code::InvalidArgument);
    let mut no_mode = create("v1", 8 * MIB, 0);
    no_mode.volume_capabilities[0].access_mode = None;
    expect_code(c.create_volume(no_mode).await, Code::InvalidArgument);
    let mut multi = create("v1", 8 * MIB, 0);
    multi.volume_capabilities[0].access_mode = Some(AccessMode {
        mode: Mode::MultiNodeMultiWriter as i32,
    });
    expect_code(c.create_volume(multi).await, Code::InvalidArgument);
    let mut btrfs = create("v1", 8 * MIB, 0);
    btrfs.volume_capabilities = vec![mount_capability("btrfs")];
    expect_code(c.create_volume(btrfs).await, Code::InvalidArgument);

    // Parameters: replicas go on distinct nodes, so three need three nodes.
    let mut three = create("v1", 8 * MIB, 0);
    three.parameters = HashMap::from([("replicas".into(), "3".into())]);
    let message = expect_code(c.create_volume(three).await, Code::ResourceExhausted);
    assert!(message.contains("3 replicas"), "{message}");
    let mut zero = create("v1", 8 * MIB, 0);
    zero.parameters = HashMap::from([("replicas".into(), "0".into())]);
    expect_code(c.create_volume(zero).await, Code::InvalidArgument);
    let mut unknown = create("v1", 8 * MIB, 0);
    unknown.parameters = HashMap::from([("replica".into(), "1".into())]);
    expect_code(c.create_volume(unknown).await, Code::InvalidArgument);
    // A content source that does not exist.
    expect_code(
        c.create_volume(from_snapshot("v1", "snap", 8 * MIB, 0))
            .await,
        Code::NotFound,
    );

    // Capacity range: honoured, or OUT_OF_RANGE when no size fits.
    expect_code(
        c.create_volume(create("v1", 8 * MIB + 1, 8 * MIB + 100))
            .await,
        Code::OutOfRange,
    );
    let mut with_params = create("v1", 8 * MIB + 1, 0);
    with_params.parameters = HashMap::from([
        ("replicas".into(), "1".into()),
        ("fsType".into(), "xfs".into()),
    ]);
    let v1 = c
        .create_volume(with_params.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v1.volume_id, "v1");
    assert!(v1.capacity_bytes > 8 * MIB, "{}", v1.capacity_bytes);
    assert_eq!(v1.capacity_bytes % 4096, 0);
    assert_eq!(
        v1.volume_context.get("fsType").map(String::as_str),
        Some("xfs")
    );
    assert_eq!(v1.accessible_topology.len(), 1);
    assert!(v1.accessible_topology[0].segments.contains_key(ZONE_KEY));

    // Idempotent by name: the same call gives the same volume.
    let again = c
        .create_volume(with_params)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again, v1);
    // A compatible range also returns it; an incompatible one is ALREADY_EXISTS.
    let compatible = c
        .create_volume(create("v1", 4 * MIB, 0))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(compatible.volume_id, "v1");
    assert_eq!(compatible.capacity_bytes, v1.capacity_bytes);
    expect_code(
        c.create_volume(create("v1", 32 * MIB, 0)).await,
        Code::AlreadyExists,
    );
    expect_code(
        c.create_volume(create("v1", MIB, 4 * MIB)).await,
        Code::AlreadyExists,
    );

    // Topology: requisite is honoured, preferred is tried first.
    let b = c
        .create_volume(in_zones(create("in-b", 8 * MIB, 0), &["zone-b"], &[]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(b.accessible_topology, vec![zone_topology("zone-b")]);
    let a = c
        .create_volume(in_zones(
            create("pref-a", 8 * MIB, 0),
            &["zone-a", "zone-b"],
            &["zone-a"],
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(a.accessible_topology, vec![zone_topology("zone-a")]);
    // The existing volume is outside a different requisite zone.
    expect_code(
        c.create_volume(in_zones(create("in-b", 8 * MIB, 0), &["zone-a"], &[]))
            .await,
        Code::AlreadyExists,
    );
    // A zone with no storage node, or no node with room: RESOURCE_EXHAUSTED.
    expect_code(
        c.create_volume(in_zones(create("nowhere", 8 * MIB, 0), &["zone-z"], &[]))
            .await,
        Code::ResourceExhausted,
    );
    expect_code(
        c.create_volume(create("huge", 1 << 40, 0)).await,
        Code::ResourceExhausted,
    );
    // Two replicas: one per node, so the volume is reachable from both zones;
    // the same name with another replica count is a different volume.
    let mut two = create("two", 8 * MIB, 0);
    two.parameters = HashMap::from([("replicas".into(), "2".into())]);
    let v = c
        .create_volume(two.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        v.accessible_topology,
        vec![zone_topology("zone-a"), zone_topology("zone-b")]
    );
    assert_eq!(v.volume_context["replicas"], "2");
    assert_eq!(
        c.create_volume(two.clone())
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap(),
        v
    );
    two.parameters.clear();
    let message = expect_code(c.create_volume(two).await, Code::AlreadyExists);
    assert!(message.contains("2 replicas"), "{message}");

    // A topology without the zone key is not ours to satisfy.
    let mut foreign = create("foreign", 8 * MIB, 0);
    foreign.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![Topology {
            segments: HashMap::from([("kubernetes.io/hostname".into(), "x".into())]),
        }],
        preferred: vec![],
    });
    expect_code(c.create_volume(foreign).await, Code::InvalidArgument);
}

async fn capacity(
    c: &mut strata_proto::csi::controller_client::ControllerClient<tonic::transport::Channel>,
    zone: Option<&str>,
) -> (i64, i64) {
    capacity_for(c, zone, 1).await
}

/// (available, maximum volume size) for volumes of `replicas` copies.
async fn capacity_for(
    c: &mut strata_proto::csi::controller_client::ControllerClient<tonic::transport::Channel>,
    zone: Option<&str>,
    replicas: u32,
) -> (i64, i64) {
    let response = c
        .get_capacity(GetCapacityRequest {
            volume_capabilities: vec![mount_capability("")],
            parameters: HashMap::from([("replicas".into(), replicas.to_string())]),
            accessible_topology: zone.map(zone_topology),
        })
        .await
        .unwrap()
        .into_inner();
    (
        response.available_capacity,
        response.maximum_volume_size.unwrap(),
    )
}

#[tokio::test]
async fn capacity_is_reported_per_zone_and_shrinks_as_volumes_are_created() {
    let (_cluster, _work, csi) = controller();
    let mut c = csi.controller().await;
    let (all, _) = capacity(&mut c, None).await;
    let (a, max_a) = capacity(&mut c, Some("zone-a")).await;
    let (b, _) = capacity(&mut c, Some("zone-b")).await;
    assert!(a > 0 && b > 0, "{a} {b}");
    assert_eq!(all, a + b);
    assert_eq!(
        max_a, a,
        "one node per zone: the biggest volume is the node's room"
    );
    assert_eq!(capacity(&mut c, Some("zone-z")).await.0, 0);

    c.create_volume(in_zones(
        create("in-a", 64 * MIB, 64 * MIB),
        &["zone-a"],
        &[],
    ))
    .await
    .unwrap();
    let (a_after, _) = capacity(&mut c, Some("zone-a")).await;
    // The replica keeps a header block beside the volume's data.
    assert_eq!(a_after, a - 64 * MIB - HEADER);
    assert_eq!(
        capacity(&mut c, Some("zone-b")).await.0,
        b,
        "zone-b untouched"
    );
    c.delete_volume(DeleteVolumeRequest {
        volume_id: "in-a".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(capacity(&mut c, Some("zone-a")).await.0, a);

    // Asking for more than is left in a zone is RESOURCE_EXHAUSTED.
    expect_code(
        c.create_volume(in_zones(create("too-big", a + 4096, 0), &["zone-a"], &[]))
            .await,
        Code::ResourceExhausted,
    );
    let mut bad = GetCapacityRequest {
        accessible_topology: Some(Topology {
            segments: HashMap::from([("rack".into(), "r1".into())]),
        }),
        ..Default::default()
    };
    expect_code(c.get_capacity(bad.clone()).await, Code::InvalidArgument);
    bad.accessible_topology = None;
    bad.parameters = HashMap::from([("replicas".into(), "0".into())]);
    expect_code(c.get_capacity(bad).await, Code::InvalidArgument);

    // Two replicas: each takes room on both nodes; three do not fit on two nodes.
    let (two_a, max_two_a) = capacity_for(&mut c, Some("zone-a"), 2).await;
    assert_eq!(max_two_a, a.min(b));
    assert_eq!(two_a, a.min((a + b) / 2));
    assert_eq!(capacity_for(&mut c, None, 3).await, (0, 0));
    let mut two = create("two", 32 * MIB, 32 * MIB);
    two.parameters = HashMap::from([("replicas".into(), "2".into())]);
    c.create_volume(two).await.unwrap();
    assert_eq!(
        capacity(&mut c, Some("zone-a")).await.0,
        a - 32 * MIB - HEADER
    );
    assert_eq!(
        capacity(&mut c, Some("zone-b")).await.0,
        b - 32 * MIB - HEADER
    );
}

#[tokio::test]
async fn list_volumes_pages_through_every_volume_once() {
    let (_cluster, _work, csi) = controller();
    let mut c = csi.controller().await;
    let names = ["pvc-1", "pvc-2", "pvc-3", "pvc-4", "pvc-5"];
    for (i, name) in names.iter().enumerate() {
        let zone = if i % 2 == 0 { "zone-a" } else { "zone-b" };
        c.create_volume(in_zones(create(name, 4 * MIB, 0), &[zone], &[]))
            .await
            .unwrap();
    }
    let all = c
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.entries.len(), 5);
    assert!(all.next_token.is_empty());

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .list_volumes(ListVolumesRequest {
                max_entries: 2,
                starting_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 2);
        seen.extend(
            page.entries
                .iter()
                .map(|e| e.volume.as_ref().unwrap().volume_id.clone()),
        );
        pages += 1;
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, names);

    // A volume deleted between pages is skipped, none is repeated.
    let first = c
        .list_volumes(ListVolumesRequest {
            max_entries: 2,
            starting_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    c.delete_volume(DeleteVolumeRequest {
        volume_id: "pvc-3".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let rest = c
        .list_volumes(ListVolumesRequest {
            max_entries: 0,
            starting_token: first.next_token,
        })
        .await
        .unwrap()
        .into_inner();
    let rest: Vec<String> = rest
        .entries
        .iter()
        .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
        .collect();
    assert_eq!(rest, ["pvc-4", "pvc-5"]);

    expect_code(
        c.list_volumes(ListVolumesRequest {
            max_entries: 0,
            starting_token: "garbage".into(),
        })
        .await,
        Code::Aborted,
    );
    expect_code(
        c.list_volumes(ListVolumesRequest {
            max_entries: -1,
            starting_token: String::new(),
        })
        .await,
        Code::InvalidArgument,
    );
}

#[tokio::test]
async fn delete_publish_validate_expand_and_get_follow_the_spec() {
    let (cluster, _work, csi) = controller();
    let mut c = csi.controller().await;
    c.create_volume(in_zones(create("vol", 16 * MIB, 0), &["zone-a"], &[]))
        .await
        .unwrap();

    // ControllerPublishVolume: required fields, NOT_FOUND for an unknown
    // volume or node, the NBD URI of the target on the node it names.
    let publish = |volume: &str, node: &str, capability: Option<VolumeCapability>| {
        ControllerPublishVolumeRequest {
            volume_id: volume.into(),
            node_id: node.into(),
            volume_capability: capability,
            ..Default::default()
        }
    };
    expect_code(
        c.controller_publish_volume(publish("", "node-a", Some(mount_capability(""))))
            .await,
        Code::InvalidArgument,
    );
    expect_code(
        c.controller_publish_volume(publish("vol", "", Some(mount_capability(""))))
            .await,
        Code::InvalidArgument,
    );
    expect_code(
        c.controller_publish_volume(publish("vol", "node-a", None))
            .await,
        Code::InvalidArgument,
    );
    expect_code(
        c.controller_publish_volume(publish("nope", "node-a", Some(mount_capability(""))))
            .await,
        Code::NotFound,
    );
    let message = expect_code(
        c.controller_publish_volume(publish("vol", "worker-9", Some(mount_capability(""))))
            .await,
        Code::NotFound,
    );
    assert!(message.contains("worker-9"), "{message}");
    let get_published = |c: &mut ControllerClient<Channel>| {
        let mut c = c.clone();
        async move {
            c.controller_get_volume(ControllerGetVolumeRequest {
                volume_id: "vol".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap()
            .published_node_ids
        }
    };
    assert!(get_published(&mut c).await.is_empty());
    let context = c
        .controller_publish_volume(publish("vol", "node-a", Some(mount_capability(""))))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    let file = strata_node::cluster::ClusterFile::load(cluster.path()).unwrap();
    let nbd = |node: &str| file.node(node).unwrap().nbd.to_string();
    assert_eq!(context["nbdUri"], format!("nbd://{}/vol", nbd("node-a")));
    assert_eq!(get_published(&mut c).await, ["node-a"]);
    // Publishing again to the same node is idempotent.
    let again = c
        .controller_publish_volume(publish("vol", "node-a", Some(mount_capability(""))))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(again, context);
    // One node at a time: another node waits for the unpublish.
    let message = expect_code(
        c.controller_publish_volume(publish("vol", "node-b", Some(mount_capability(""))))
            .await,
        Code::FailedPrecondition,
    );
    assert!(message.contains("node-a"), "{message}");
    // A published volume is in use and cannot be deleted.
    expect_code(
        c.delete_volume(DeleteVolumeRequest {
            volume_id: "vol".into(),
            ..Default::default()
        })
        .await,
        Code::FailedPrecondition,
    );
    // Unpublish (idempotent; from a node it is not on it is a no-op).
    for node in ["node-b", "node-a", "node-a", "worker-9"] {
        c.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
            volume_id: "vol".into(),
            node_id: node.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    assert!(get_published(&mut c).await.is_empty());
    // Now node-b may have it: its target reaches the replica on node-a.
    let context = c
        .controller_publish_volume(publish("vol", "node-b", Some(mount_capability(""))))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(context["nbdUri"], format!("nbd://{}/vol", nbd("node-b")));
    assert_eq!(get_published(&mut c).await, ["node-b"]);
    let listed = c
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let status = listed.entries[0].status.clone().unwrap();
    assert_eq!(status.published_node_ids, ["node-b"]);
    assert!(!status.volume_condition.unwrap().abnormal);
    // An empty node_id unpublishes from every node.
    c.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
        volume_id: "vol".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(get_published(&mut c).await.is_empty());
    c.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
        volume_id: "gone".into(),
        node_id: "node-a".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    expect_code(
        c.controller_unpublish_volume(ControllerUnpublishVolumeRequest::default())
            .await,
        Code::InvalidArgument,
    );

    // ValidateVolumeCapabilities.
    let validate = |volume: &str, caps: Vec<VolumeCapability>| ValidateVolumeCapabilitiesRequest {
        volume_id: volume.into(),
        volume_capabilities: caps,
        ..Default::default()
    };
    let ok = c
        .validate_volume_capabilities(validate(
            "vol",
            vec![mount_capability("ext4"), block_capability()],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.confirmed.unwrap().volume_capabilities.len(), 2);
    let mut shared = mount_capability("ext4");
    shared.access_mode = Some(AccessMode {
        mode: Mode::MultiNodeMultiWriter as i32,
    });
    let refused = c
        .validate_volume_capabilities(validate("vol", vec![shared]))
        .await
        .unwrap()
        .into_inner();
    assert!(refused.confirmed.is_none());
    assert!(
        refused.message.contains("MULTI_NODE_MULTI_WRITER"),
        "{}",
        refused.message
    );
    expect_code(
        c.validate_volume_capabilities(validate("nope", vec![block_capability()]))
            .await,
        Code::NotFound,
    );
    expect_code(
        c.validate_volume_capabilities(validate("vol", vec![]))
            .await,
        Code::InvalidArgument,
    );
    expect_code(
        c.validate_volume_capabilities(validate("", vec![block_capability()]))
            .await,
        Code::InvalidArgument,
    );

    // ControllerExpandVolume: grows, is idempotent, never shrinks.
    let expand = |required: i64, limit: i64| ControllerExpandVolumeRequest {
        volume_id: "vol".into(),
        capacity_range: Some(CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }),
        volume_capability: Some(mount_capability("ext4")),
        ..Default::default()
    };
    let grown = c
        .controller_expand_volume(expand(32 * MIB, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 32 * MIB);
    assert!(grown.node_expansion_required);
    let same = c
        .controller_expand_volume(expand(20 * MIB, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(same.capacity_bytes, 32 * MIB);
    expect_code(
        c.controller_expand_volume(expand(8 * MIB, 16 * MIB)).await,
        Code::OutOfRange,
    );
    let mut block = expand(40 * MIB, 0);
    block.volume_capability = Some(block_capability());
    assert!(
        !c.controller_expand_volume(block)
            .await
            .unwrap()
            .into_inner()
            .node_expansion_required
    );
    let mut missing = expand(40 * MIB, 0);
    missing.capacity_range = None;
    expect_code(
        c.controller_expand_volume(missing).await,
        Code::InvalidArgument,
    );
    let mut unknown = expand(40 * MIB, 0);
    unknown.volume_id = "nope".into();
    expect_code(c.controller_expand_volume(unknown).await, Code::NotFound);

    // ControllerGetVolume.
    let got = c
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: "vol".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.volume.unwrap().capacity_bytes, 40 * MIB);
    assert!(got.status.is_some());
    expect_code(
        c.controller_get_volume(ControllerGetVolumeRequest {
            volume_id: "nope".into(),
        })
        .await,
        Code::NotFound,
    );

    // DeleteVolume: required id, idempotent (a volume that is gone is success).
    expect_code(
        c.delete_volume(DeleteVolumeRequest::default()).await,
        Code::InvalidArgument,
    );
    for _ in 0..2 {
        c.delete_volume(DeleteVolumeRequest {
            volume_id: "vol".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    expect_code(
        c.controller_get_volume(ControllerGetVolumeRequest {
            volume_id: "vol".into(),
        })
        .await,
        Code::NotFound,
    );
}

#[tokio::test]
async fn node_calls_check_their_arguments_and_are_idempotent() {
    let work = tempfile::tempdir().unwrap();
    let _cleanup = HostCleanup {
        root: work.path().to_path_buf(),
    };
    let state = work.path().join("state").to_string_lossy().to_string();
    let csi = CsiProcess::start(
        work.path(),
        "node",
        &[
            "--mode",
            "node",
            "--node-id",
            "worker-1",
            "--zone",
            "zone-b",
            "--state-dir",
            &state,
            "--max-volumes",
            "16",
        ],
    );
    let mut n = csi.node().await;
    let info = n
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "worker-1");
    assert_eq!(info.max_volumes_per_node, 16);
    assert_eq!(info.accessible_topology, Some(zone_topology("zone-b")));
    let caps = n
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    assert_eq!(caps.len(), 3);
    // The node plugin alone has no Controller service to advertise.
    let mut identity = csi.identity().await;
    let plugin = identity
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!plugin.capabilities.iter().any(|c| matches!(&c.r#type,
        Some(plugin_capability::Type::Service(s)) if s.r#type == plugin_capability::service::Type::ControllerService as i32)));

    let staging = work.path().join("staging").to_string_lossy().to_string();
    let target = work.path().join("target").to_string_lossy().to_string();
    let stage = |id: &str, path: &str, cap: Option<VolumeCapability>, uri: Option<&str>| {
        NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: path.into(),
            volume_capability: cap,
            publish_context: uri
                .map(|u| HashMap::from([("nbdUri".to_string(), u.to_string())]))
                .unwrap_or_default(),
            ..Default::default()
        }
    };
    let uri = Some("nbd://127.0.0.1:1/v");
    expect_code(
        n.node_stage_volume(stage("", &staging, Some(mount_capability("")), uri))
            .await,
        Code::InvalidArgument,
    );
    expect_code(
        n.node_stage_volume(stage("v", "", Some(mount_capability("")), uri))
            .await,
        Code::InvalidArgument,
    );
    expect_code(
        n.node_stage_volume(stage("v", &staging, None, uri)).await,
        Code::InvalidArgument,
    );
    expect_code(
        n.node_stage_volume(stage("v", &staging, Some(mount_capability("")), None))
            .await,
        Code::InvalidArgument,
    );
    expect_code(
        n.node_stage_volume(stage("v", "relative", Some(mount_capability("")), uri))
            .await,
        Code::InvalidArgument,
    );

    let publish = |id: &str, staging: &str, target: &str| NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.into(),
        target_path: target.into(),
        volume_capability: Some(mount_capability("")),
        ..Default::default()
    };
    expect_code(
        n.node_publish_volume(publish("v", &staging, "")).await,
        Code::InvalidArgument,
    );
    expect_code(
        n.node_publish_volume(publish("v", "", &target)).await,
        Code::FailedPrecondition,
    );
    let message = expect_code(
        n.node_publish_volume(publish("v", &staging, &target)).await,
        Code::FailedPrecondition,
    );
    assert!(message.contains("NodeStageVolume"), "{message}");

    // Reverses of what never happened succeed; required fields are still required.
    n.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: "v".into(),
        target_path: target.clone(),
    })
    .await
    .unwrap();
    n.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: "v".into(),
        staging_target_path: staging.clone(),
    })
    .await
    .unwrap();
    expect_code(
        n.node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: "v".into(),
            staging_target_path: String::new(),
        })
        .await,
        Code::InvalidArgument,
    );
    expect_code(
        n.node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: String::new(),
            target_path: target.clone(),
        })
        .await,
        Code::InvalidArgument,
    );

    expect_code(
        n.node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "v".into(),
            volume_path: target.clone(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
    );
    expect_code(
        n.node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "v".into(),
            volume_path: String::new(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );
    expect_code(
        n.node_expand_volume(NodeExpandVolumeRequest {
            volume_id: "v".into(),
            volume_path: target.clone(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
    );
    // An export that cannot be reached fails the stage and leaves nothing behind.
    let message = expect_code(
        n.node_stage_volume(stage(
            "v",
            &staging,
            Some(mount_capability("")),
            Some("nbd://127.0.0.1:1/v"),
        ))
        .await,
        Code::Internal,
    );
    assert!(
        message.contains("nbdfuse") || message.contains("nbd-client"),
        "{message}"
    );
    assert!(nbdfuse_pids(work.path()).is_empty());
}

#[tokio::test]
async fn storage_nodes_are_found_by_their_grpc_addresses() {
    let cluster = StorageCluster::start(&[("node-a", "zone-a"), ("node-b", "zone-b")], "256MiB");
    let file = strata_node::cluster::ClusterFile::load(cluster.path()).unwrap();
    let (a, b) = (file.node("node-a").unwrap(), file.node("node-b").unwrap());
    let nothing = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    // node-a by a host name, node-b by address, and an address where nothing
    // answers (as a pod that has gone away), which is left out.
    let addresses = format!("localhost:{},{},{nothing}", a.grpc.port(), b.grpc);
    let csi = CsiProcess::start(
        work.path(),
        "controller",
        &["--mode", "controller", "--storage-nodes", &addresses],
    );
    let mut c = csi.controller().await;
    let mut two = create("found", 8 * MIB, 0);
    two.parameters = HashMap::from([("replicas".into(), "2".into())]);
    let volume = c
        .create_volume(two)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        volume.accessible_topology,
        vec![zone_topology("zone-a"), zone_topology("zone-b")]
    );
    let context = c
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: "found".into(),
            node_id: "node-b".into(),
            volume_capability: Some(mount_capability("ext4")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(context["nbdUri"], format!("nbd://{}/found", b.nbd));
    c.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
        volume_id: "found".into(),
        node_id: "node-b".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.delete_volume(DeleteVolumeRequest {
        volume_id: "found".into(),
        ..Default::default()
    })
    .await
    .unwrap();

    // No storage node answers: UNAVAILABLE, so the CO retries.
    let nowhere = CsiProcess::start(
        work.path(),
        "nowhere",
        &[
            "--mode",
            "controller",
            "--storage-nodes",
            &nothing.to_string(),
        ],
    );
    let message = expect_code(
        nowhere
            .controller()
            .await
            .list_volumes(ListVolumesRequest::default())
            .await,
        Code::Unavailable,
    );
    assert!(message.contains(&nothing.to_string()), "{message}");
}

fn from_snapshot(name: &str, snapshot: &str, required: i64, limit: i64) -> CreateVolumeRequest {
    let mut request = create(name, required, limit);
    request.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: snapshot.into(),
            },
        )),
    });
    request
}

fn snapshot_request(volume: &str, name: &str) -> CreateSnapshotRequest {
    CreateSnapshotRequest {
        source_volume_id: volume.into(),
        name: name.into(),
        ..Default::default()
    }
}

async fn snapshot_ids(
    c: &mut ControllerClient<Channel>,
    request: ListSnapshotsRequest,
) -> Vec<String> {
    c.list_snapshots(request)
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.snapshot.unwrap().snapshot_id)
        .collect()
}

#[tokio::test]
async fn snapshots_and_volumes_from_them_follow_the_spec() {
    let (_cluster, _work, csi) = controller();
    let mut c = csi.controller().await;
    c.create_volume(create("v", 8 * MIB, 0)).await.unwrap();
    c.create_volume(create("w", 4 * MIB, 0)).await.unwrap();

    // CreateSnapshot: required fields, names, parameters, a missing source.
    for (volume, name) in [("", "s1"), ("v", ""), ("v", "a/b")] {
        expect_code(
            c.create_snapshot(snapshot_request(volume, name)).await,
            Code::InvalidArgument,
        );
    }
    let mut with_param = snapshot_request("v", "s1");
    with_param.parameters = HashMap::from([("speed".into(), "fast".into())]);
    expect_code(c.create_snapshot(with_param).await, Code::InvalidArgument);
    expect_code(
        c.create_snapshot(snapshot_request("nope", "s1")).await,
        Code::NotFound,
    );

    // Ready at once, the source's size, idempotent by name and source.
    let mut request = snapshot_request("v", "s1");
    request.parameters = HashMap::from([(
        "csi.storage.k8s.io/volumesnapshot/name".into(),
        "snap".into(),
    )]);
    let s1 = c
        .create_snapshot(request.clone())
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(s1.ready_to_use);
    assert_eq!(
        (s1.snapshot_id.as_str(), s1.source_volume_id.as_str()),
        ("s1", "v")
    );
    assert_eq!(s1.size_bytes, 8 * MIB);
    assert!(s1.creation_time.unwrap().seconds > 1_600_000_000);
    let again = c
        .create_snapshot(request)
        .await
        .unwrap()
        .into_inner()
        .snapshot;
    assert_eq!(again, Some(s1.clone()));
    expect_code(
        c.create_snapshot(snapshot_request("w", "s1")).await,
        Code::AlreadyExists,
    );

    // ListSnapshots: pages, filters, bad tokens.
    for (volume, name) in [("v", "s2"), ("v", "s3"), ("w", "sw")] {
        c.create_snapshot(snapshot_request(volume, name))
            .await
            .unwrap();
    }
    let all = snapshot_ids(&mut c, ListSnapshotsRequest::default()).await;
    assert_eq!(all, ["s1", "s2", "s3", "sw"]);
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_snapshots(ListSnapshotsRequest {
                max_entries: 3,
                starting_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 3);
        seen.extend(
            page.entries
                .into_iter()
                .map(|e| e.snapshot.unwrap().snapshot_id),
        );
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(seen, all, "every snapshot once");
    let by_id = |id: &str| ListSnapshotsRequest {
        snapshot_id: id.into(),
        ..Default::default()
    };
    assert_eq!(snapshot_ids(&mut c, by_id("s2")).await, ["s2"]);
    assert!(snapshot_ids(&mut c, by_id("nope")).await.is_empty());
    let of_w = ListSnapshotsRequest {
        source_volume_id: "w".into(),
        ..Default::default()
    };
    assert_eq!(snapshot_ids(&mut c, of_w).await, ["sw"]);
    expect_code(
        c.list_snapshots(ListSnapshotsRequest {
            starting_token: "bogus".into(),
            ..Default::default()
        })
        .await,
        Code::Aborted,
    );
    expect_code(
        c.list_snapshots(ListSnapshotsRequest {
            max_entries: -1,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );

    // Volumes from a snapshot: its size unless more is asked, never less.
    let restored = c
        .create_volume(from_snapshot("r1", "s1", 0, 0))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(restored.capacity_bytes, 8 * MIB);
    assert!(matches!(
        restored.content_source.as_ref().and_then(|s| s.r#type.as_ref()),
        Some(volume_content_source::Type::Snapshot(s)) if s.snapshot_id == "s1"
    ));
    // Idempotent.
    let again = c
        .create_volume(from_snapshot("r1", "s1", 0, 0))
        .await
        .unwrap();
    assert_eq!(again.into_inner().volume.unwrap().capacity_bytes, 8 * MIB);
    let bigger = c
        .create_volume(from_snapshot("r2", "s1", 16 * MIB, 0))
        .await
        .unwrap();
    assert_eq!(bigger.into_inner().volume.unwrap().capacity_bytes, 16 * MIB);
    expect_code(
        c.create_volume(from_snapshot("r3", "s1", 0, 4 * MIB)).await,
        Code::OutOfRange,
    );

    // A clone of a volume leaves no snapshot behind.
    let mut clone = create("c1", 0, 0);
    clone.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Volume(
            volume_content_source::VolumeSource {
                volume_id: "w".into(),
            },
        )),
    });
    let cloned = c.create_volume(clone.clone()).await.unwrap().into_inner();
    assert_eq!(cloned.volume.unwrap().capacity_bytes, 4 * MIB);
    assert_eq!(
        snapshot_ids(&mut c, ListSnapshotsRequest::default()).await,
        all
    );
    if let Some(volume_content_source::Type::Volume(v)) = clone
        .volume_content_source
        .as_mut()
        .and_then(|s| s.r#type.as_mut())
    {
        v.volume_id = "nope".into();
    }
    clone.name = "c2".into();
    expect_code(c.create_volume(clone).await, Code::NotFound);

    // DeleteSnapshot: required id, idempotent; volumes from it stay.
    expect_code(
        c.delete_snapshot(DeleteSnapshotRequest::default()).await,
        Code::InvalidArgument,
    );
    for _ in 0..2 {
        c.delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: "s1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    assert!(snapshot_ids(&mut c, by_id("s1")).await.is_empty());
    let r1 = c
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: "r1".into(),
        })
        .await
        .unwrap();
    assert_eq!(r1.into_inner().volume.unwrap().capacity_bytes, 8 * MIB);
    // The source volume can go while its snapshots stay.
    c.delete_volume(DeleteVolumeRequest {
        volume_id: "w".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(snapshot_ids(&mut c, by_id("sw")).await, ["sw"]);
}
