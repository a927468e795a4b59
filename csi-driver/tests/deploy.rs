//! deploy/ renders, and what it renders fits the code: every overlay goes
//! through `kubectl kustomize`; every object parses into its k8s-openapi
//! type without losing a field; the strata containers' flags are accepted by
//! the binaries, their ports, socket paths and images agree with each other
//! and with deploy/docker; and the RBAC rules cover what the sidecars do.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PodSpec, Service, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::Value;
use strata_csi::DRIVER_NAME;
use strata_system_tests::manifests::{kustomize, repo_root, typed};

/// snapshot.storage.k8s.io/v1 VolumeSnapshotClass: a custom resource of
/// the snapshot add-on, so not in k8s-openapi; its fields as the CRD has them.
#[derive(Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VolumeSnapshotClass {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    driver: String,
    deletion_policy: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parameters: Option<BTreeMap<String, String>>,
}

#[derive(Default)]
struct Rendered {
    objects: Vec<Value>,
    daemonsets: Vec<DaemonSet>,
    deployments: Vec<Deployment>,
    services: Vec<Service>,
    storage_classes: Vec<StorageClass>,
    csi_drivers: Vec<CSIDriver>,
    config_maps: Vec<ConfigMap>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    snapshot_classes: Vec<VolumeSnapshotClass>,
}

fn render(overlay: &Path) -> Rendered {
    let objects = kustomize(overlay);
    let mut r = Rendered::default();
    for object in &objects {
        match object["kind"].as_str().unwrap_or_default() {
            "DaemonSet" => r.daemonsets.push(typed(object)),
            "Deployment" => r.deployments.push(typed(object)),
            "Service" => r.services.push(typed(object)),
            "StorageClass" => r.storage_classes.push(typed(object)),
            "CSIDriver" => r.csi_drivers.push(typed(object)),
            "ConfigMap" => r.config_maps.push(typed(object)),
            "ServiceAccount" => r.service_accounts.push(typed(object)),
            "ClusterRole" => r.cluster_roles.push(typed(object)),
            "ClusterRoleBinding" => r.cluster_role_bindings.push(typed(object)),
            "Role" => r.roles.push(typed(object)),
            "RoleBinding" => r.role_bindings.push(typed(object)),
            "VolumeSnapshotClass" => r.snapshot_classes.push(typed(object)),
            "Namespace" => {
                typed::<Namespace>(object);
            }
            other => panic!("{}: unexpected kind {other:?}", overlay.display()),
        }
    }
    r.objects = objects;
    r
}

/// `$(VAR)` references replaced by sample values, as the kubelet would.
fn expand(arg: &str) -> String {
    arg.replace("$(NODE_NAME)", "worker-1")
        .replace("$(POD_IP)", "10.0.0.7")
        .replace("$(POOL_SIZE)", "20GiB")
        .replace("$(NAMESPACE)", "strata-system")
}

fn flag<'a>(container: &'a Container, name: &str) -> Option<&'a str> {
    let prefix = format!("{name}=");
    container
        .args
        .iter()
        .flatten()
        .find_map(|a| a.strip_prefix(prefix.as_str()))
}

fn pods(r: &Rendered) -> Vec<(String, PodSpec)> {
    let ds = r.daemonsets.iter().map(|d| {
        (
            d.metadata.name.clone().unwrap(),
            d.spec.clone().unwrap().template.spec.unwrap(),
        )
    });
    let dep = r.deployments.iter().map(|d| {
        (
            d.metadata.name.clone().unwrap(),
            d.spec.clone().unwrap().template.spec.unwrap(),
        )
    });
    ds.chain(dep).collect()
}

fn repository(image: &str) -> &str {
    image.rsplit_once(':').map_or(image, |(r, _)| r)
}

/// The Strata binary an image runs, checked against its Dockerfile.
fn strata_binary(image: &str) -> Option<String> {
    let name = repository(image).rsplit('/').next().unwrap();
    if !name.starts_with("strata-") {
        return None;
    }
    let dockerfile = repo_root().join(format!("deploy/docker/{name}.Dockerfile"));
    let text = std::fs::read_to_string(&dockerfile)
        .unwrap_or_else(|_| panic!("image {image}: no {}", dockerfile.display()));
    assert!(
        text.contains(&format!("ENTRYPOINT [\"/usr/local/bin/{name}\"]"))
            && text.contains(&format!("--bin {name}")),
        "{} does not build and run {name}",
        dockerfile.display()
    );
    Some(name.to_string())
}

#[derive(Parser)]
struct NodeCli {
    #[command(flatten)]
    node: strata_node::daemon::NodeArgs,
}

fn check_strata_csi_flags(container: &Container) {
    let args: Vec<String> = container.args.iter().flatten().map(|a| expand(a)).collect();
    // clap checks every flag and value before it gets to --help.
    let out = Command::new(env!("CARGO_BIN_EXE_strata-csi"))
        .args(&args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "strata-csi does not accept {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn check_strata_node(container: &Container) {
    let args: Vec<String> = container.args.iter().flatten().map(|a| expand(a)).collect();
    let node = NodeCli::try_parse_from(std::iter::once("strata-node".to_string()).chain(args))
        .unwrap_or_else(|e| panic!("strata-node does not accept its args: {e}"))
        .node;
    let ports: BTreeMap<String, i32> = container
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap(), p.container_port))
        .collect();
    for (name, addr) in [
        ("grpc", node.grpc_listen),
        ("nbd", node.nbd_listen),
        ("replication", node.replication_listen),
        ("http", node.http_listen),
    ] {
        assert_eq!(ports.get(name), Some(&(addr.port() as i32)), "port {name}");
        assert!(
            addr.ip().is_unspecified(),
            "{name} must listen beyond loopback"
        );
    }
    assert_eq!(
        node.advertise_host.as_deref(),
        Some("10.0.0.7"),
        "NBD and replication addresses must be the pod's (host's) IP"
    );
}

/// The unix socket the CSI plugin in `pod` serves, and the volume holding it.
fn plugin_socket(pod: &PodSpec) -> (String, String) {
    let plugin = pod
        .containers
        .iter()
        .find(|c| c.name == "strata-csi")
        .expect("a strata-csi container");
    let path = flag(plugin, "--endpoint")
        .and_then(|e| e.strip_prefix("unix://"))
        .expect("--endpoint=unix://...")
        .to_string();
    let dir = Path::new(&path).parent().unwrap().to_str().unwrap();
    let volume = plugin
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == dir)
        .unwrap_or_else(|| panic!("nothing mounted at {dir}"))
        .name
        .clone();
    (path, volume)
}

fn check_sidecars(name: &str, pod: &PodSpec) {
    let (socket, volume) = plugin_socket(pod);
    let dir = Path::new(&socket).parent().unwrap().to_str().unwrap();
    let healthz = pod
        .containers
        .iter()
        .find(|c| c.name == "strata-csi")
        .unwrap()
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("healthz"))
        .map(|p| p.container_port);
    for sidecar in pod.containers.iter().filter(|c| c.name != "strata-csi") {
        assert_eq!(
            flag(sidecar, "--csi-address"),
            Some(socket.as_str()),
            "{name}/{}",
            sidecar.name
        );
        assert!(
            sidecar
                .volume_mounts
                .iter()
                .flatten()
                .any(|m| m.name == volume && m.mount_path == dir),
            "{name}/{} does not see the socket",
            sidecar.name
        );
        if sidecar
            .image
            .as_deref()
            .unwrap()
            .contains("/livenessprobe:")
        {
            let port: i32 = flag(sidecar, "--health-port").unwrap().parse().unwrap();
            assert_eq!(Some(port), healthz, "{name}: liveness port");
        }
    }
}

fn check_controller(pod: &PodSpec, r: &Rendered) {
    check_sidecars("controller", pod);
    let images: Vec<&str> = pod
        .containers
        .iter()
        .map(|c| c.image.as_deref().unwrap())
        .collect();
    for sidecar in [
        "csi-provisioner",
        "csi-attacher",
        "csi-resizer",
        "csi-snapshotter",
        "livenessprobe",
    ] {
        assert!(
            images.iter().any(|i| i.contains(&format!("/{sidecar}:"))),
            "controller lacks {sidecar}"
        );
    }
    check_snapshot_classes(r);
    let provisioner = pod
        .containers
        .iter()
        .find(|c| c.name == "csi-provisioner")
        .unwrap();
    assert_eq!(flag(provisioner, "--feature-gates"), Some("Topology=true"));
    // The controller finds the storage nodes through their headless Service.
    let plugin = pod
        .containers
        .iter()
        .find(|c| c.name == "strata-csi")
        .unwrap();
    assert_eq!(flag(plugin, "--mode"), Some("controller"));
    check_finds_storage_nodes(plugin, r);
}

/// `--storage-nodes` names the storage nodes' headless Service and its gRPC port.
fn check_finds_storage_nodes(container: &Container, r: &Rendered) {
    let (host, port) = flag(container, "--storage-nodes")
        .unwrap_or_else(|| panic!("{}: no --storage-nodes", container.name))
        .rsplit_once(':')
        .unwrap();
    let service = r
        .services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(host))
        .unwrap_or_else(|| panic!("no Service {host}"));
    let spec = service.spec.as_ref().unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"), "headless");
    let service_port = &spec.ports.as_ref().unwrap()[0];
    assert_eq!(service_port.port.to_string(), port);
    assert_eq!(
        service_port.target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("grpc".into()))
    );
}

/// One VolumeSnapshotClass for this driver, cluster-scoped, with parameters
/// the controller accepts (none of its own).
fn check_snapshot_classes(r: &Rendered) {
    assert_eq!(r.snapshot_classes.len(), 1);
    let class = &r.snapshot_classes[0];
    assert_eq!(class.api_version, "snapshot.storage.k8s.io/v1");
    assert_eq!(class.driver, DRIVER_NAME);
    assert!(
        ["Delete", "Retain"].contains(&class.deletion_policy.as_str()),
        "{}",
        class.deletion_policy
    );
    assert_eq!(
        class.metadata.namespace, None,
        "VolumeSnapshotClass is cluster-scoped"
    );
    for key in class.parameters.iter().flatten().map(|(k, _)| k) {
        assert!(
            key.starts_with("csi.storage.k8s.io/"),
            "strata-csi refuses snapshot parameter {key}"
        );
    }
}

fn check_node_plugin(pod: &PodSpec) {
    check_sidecars("node", pod);
    let plugin = pod
        .containers
        .iter()
        .find(|c| c.name == "strata-csi")
        .unwrap();
    assert_eq!(flag(plugin, "--mode"), Some("node"));
    assert_eq!(flag(plugin, "--node-id"), Some("$(NODE_NAME)"));
    assert_eq!(
        plugin.security_context.as_ref().unwrap().privileged,
        Some(true)
    );
    let kubelet = plugin
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/var/lib/kubelet")
        .expect("the kubelet dir");
    assert_eq!(kubelet.mount_propagation.as_deref(), Some("Bidirectional"));
    assert!(plugin
        .volume_mounts
        .iter()
        .flatten()
        .any(|m| m.mount_path == "/dev"));
    // The registrar tells the kubelet where the socket is on the host.
    let (socket, volume) = plugin_socket(pod);
    let host_dir = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == volume)
        .and_then(|v| v.host_path.as_ref())
        .expect("the plugin dir is a hostPath")
        .path
        .clone();
    assert_eq!(host_dir, format!("/var/lib/kubelet/plugins/{DRIVER_NAME}"));
    let registrar = pod
        .containers
        .iter()
        .find(|c| c.name == "node-driver-registrar")
        .expect("node-driver-registrar");
    let file = Path::new(&socket).file_name().unwrap().to_str().unwrap();
    assert_eq!(
        flag(registrar, "--kubelet-registration-path"),
        Some(format!("{host_dir}/{file}").as_str())
    );
}

fn check_storage_node(pod: &PodSpec, r: &Rendered) {
    let node = pod
        .containers
        .iter()
        .find(|c| c.name == "strata-node")
        .unwrap();
    assert_eq!(
        flag(node, "--name"),
        Some("$(NODE_NAME)"),
        "named like the CSI node"
    );
    assert_eq!(pod.host_network, Some(true));
    // It finds the other nodes (for replacement replicas) as the controller does.
    check_finds_storage_nodes(node, r);
    // The Localhost profile is what the init container installs, and it
    // allows io_uring.
    let seccomp = node
        .security_context
        .as_ref()
        .and_then(|s| s.seccomp_profile.as_ref())
        .expect("a seccomp profile");
    assert_eq!(seccomp.type_, "Localhost");
    let profile_path = seccomp.localhost_profile.clone().unwrap();
    let init = pod.init_containers.as_ref().unwrap();
    let install = init[0].command.as_ref().unwrap().join(" ");
    assert!(
        install.contains(&format!("/host-seccomp/{profile_path}")),
        "{install}"
    );
    let profile_file = Path::new(&profile_path)
        .file_name()
        .unwrap()
        .to_str()
        .unwrap();
    let config_map = r
        .config_maps
        .iter()
        .find(|c| {
            c.data
                .as_ref()
                .is_some_and(|d| d.contains_key(profile_file))
        })
        .expect("the profile's ConfigMap");
    let profile: Value =
        serde_json::from_str(&config_map.data.as_ref().unwrap()[profile_file]).unwrap();
    let calls = profile["syscalls"].as_array().unwrap();
    for call in ["io_uring_setup", "io_uring_enter", "io_uring_register"] {
        let action = calls
            .iter()
            .find(|rule| rule["names"].as_array().unwrap().iter().any(|n| n == call))
            .map(|rule| rule["action"].as_str().unwrap())
            .unwrap_or(profile["defaultAction"].as_str().unwrap());
        assert_eq!(action, "SCMP_ACT_ALLOW", "{call}");
    }
    let denied = calls
        .iter()
        .find(|rule| rule["action"] == "SCMP_ACT_ERRNO")
        .expect("a deny list");
    for call in ["mount", "ptrace", "bpf", "kexec_load", "init_module"] {
        assert!(
            denied["names"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n == call),
            "{call} is not denied"
        );
    }
}

/// What each controller sidecar does with the API, from its documented
/// RBAC (kubernetes-csi/external-*/deploy/kubernetes/rbac.yaml), for the
/// flags used here. strata-csi and strata-node themselves make no calls.
const SIDECAR_CALLS: &[(&str, &str, &[&str])] = &[
    // external-provisioner
    (
        "",
        "persistentvolumes",
        &["get", "list", "watch", "create", "delete"],
    ),
    (
        "",
        "persistentvolumeclaims",
        &["get", "list", "watch", "update"],
    ),
    (
        "storage.k8s.io",
        "storageclasses",
        &["get", "list", "watch"],
    ),
    (
        "",
        "events",
        &["list", "watch", "create", "update", "patch"],
    ),
    ("storage.k8s.io", "csinodes", &["get", "list", "watch"]),
    ("", "nodes", &["get", "list", "watch"]),
    // external-attacher
    ("", "persistentvolumes", &["patch"]),
    (
        "storage.k8s.io",
        "volumeattachments",
        &["get", "list", "watch", "patch"],
    ),
    ("storage.k8s.io", "volumeattachments/status", &["patch"]),
    // external-resizer
    ("", "pods", &["get", "list", "watch"]),
    ("", "persistentvolumeclaims/status", &["patch"]),
    // external-provisioner, restoring a VolumeSnapshot into a PVC
    (
        "snapshot.storage.k8s.io",
        "volumesnapshots",
        &["get", "list"],
    ),
    (
        "snapshot.storage.k8s.io",
        "volumesnapshotcontents",
        &["get", "list"],
    ),
    // external-snapshotter (csi-snapshotter)
    (
        "snapshot.storage.k8s.io",
        "volumesnapshotclasses",
        &["get", "list", "watch"],
    ),
    (
        "snapshot.storage.k8s.io",
        "volumesnapshotcontents",
        &["get", "list", "watch", "update", "patch"],
    ),
    (
        "snapshot.storage.k8s.io",
        "volumesnapshotcontents/status",
        &["update", "patch"],
    ),
];
const LEADER_ELECTION: (&str, &str, &[&str]) = (
    "coordination.k8s.io",
    "leases",
    &[
        "get", "watch", "list", "create", "update", "patch", "delete",
    ],
);

fn allows(rules: &[PolicyRule], group: &str, resource: &str, verb: &str) -> bool {
    rules.iter().any(|rule| {
        rule.api_groups.iter().flatten().any(|g| g == group)
            && rule.resources.iter().flatten().any(|r| r == resource)
            && rule.verbs.iter().any(|v| v == verb)
    })
}

fn check_rbac(r: &Rendered) {
    for rule in r
        .cluster_roles
        .iter()
        .flat_map(|c| c.rules.iter().flatten())
        .chain(r.roles.iter().flat_map(|c| c.rules.iter().flatten()))
    {
        let words = rule
            .verbs
            .iter()
            .chain(rule.resources.iter().flatten())
            .chain(rule.api_groups.iter().flatten());
        for word in words {
            assert_ne!(word, "*", "no wildcards: {rule:?}");
        }
        assert!(
            !rule.resources.iter().flatten().any(|r| r == "secrets"),
            "no secrets: {rule:?}"
        );
    }
    // Which ServiceAccount each pod runs as, and what that account may do.
    let accounts: BTreeMap<String, PodSpec> = pods(r)
        .into_iter()
        .map(|(_, p)| (p.service_account_name.clone().unwrap(), p))
        .collect();
    let bound = |account: &str| -> (Vec<PolicyRule>, Vec<PolicyRule>) {
        let subject = |subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
            subjects
                .iter()
                .flatten()
                .any(|s| s.kind == "ServiceAccount" && s.name == account)
        };
        let cluster = r
            .cluster_role_bindings
            .iter()
            .filter(|b| subject(&b.subjects))
            .flat_map(|b| {
                r.cluster_roles
                    .iter()
                    .find(|c| c.metadata.name.as_deref() == Some(b.role_ref.name.as_str()))
                    .unwrap_or_else(|| panic!("no ClusterRole {}", b.role_ref.name))
                    .rules
                    .clone()
                    .unwrap_or_default()
            })
            .collect();
        let namespaced = r
            .role_bindings
            .iter()
            .filter(|b| subject(&b.subjects))
            .flat_map(|b| {
                r.roles
                    .iter()
                    .find(|c| c.metadata.name.as_deref() == Some(b.role_ref.name.as_str()))
                    .unwrap_or_else(|| panic!("no Role {}", b.role_ref.name))
                    .rules
                    .clone()
                    .unwrap_or_default()
            })
            .collect();
        (cluster, namespaced)
    };
    for (account, pod) in &accounts {
        assert!(
            r.service_accounts
                .iter()
                .any(|s| s.metadata.name.as_deref() == Some(account.as_str())),
            "no ServiceAccount {account}"
        );
        let (cluster, namespaced) = bound(account);
        let has_controller_sidecars = pod.containers.iter().any(|c| c.name == "csi-provisioner");
        if has_controller_sidecars {
            for (group, resource, verbs) in SIDECAR_CALLS {
                for verb in *verbs {
                    assert!(
                        allows(&cluster, group, resource, verb),
                        "{account} may not {verb} {resource}"
                    );
                }
            }
            let (group, resource, verbs) = LEADER_ELECTION;
            for verb in verbs {
                assert!(allows(&namespaced, group, resource, verb), "leases {verb}");
            }
        } else {
            // Node plugin and storage nodes: no API access at all.
            assert!(
                cluster.is_empty() && namespaced.is_empty(),
                "{account} needs no roles"
            );
            assert_eq!(
                pod.automount_service_account_token,
                Some(false),
                "{account}"
            );
        }
    }
    // That the driver and the node make no API calls rests on this: neither
    // crate has a Kubernetes client.
    for manifest in ["csi-driver/Cargo.toml", "storage-node/Cargo.toml"] {
        let text = std::fs::read_to_string(repo_root().join(manifest)).unwrap();
        let deps = text.split("[dev-dependencies]").next().unwrap();
        assert!(
            !deps.lines().any(|l| l.trim_start().starts_with("kube")),
            "{manifest} talks to Kubernetes now: give its pods the RBAC it needs"
        );
    }
}

fn check_overlay(overlay: &Path, r: &Rendered) {
    assert_eq!(r.csi_drivers.len(), 1);
    assert_eq!(r.csi_drivers[0].metadata.name.as_deref(), Some(DRIVER_NAME));
    assert_eq!(r.csi_drivers[0].spec.attach_required, Some(true));
    let classes: BTreeMap<&str, &StorageClass> = r
        .storage_classes
        .iter()
        .map(|c| (c.metadata.name.as_deref().unwrap(), c))
        .collect();
    for (name, replicas) in [("strata-1", 1), ("strata-3", 3)] {
        let class = classes.get(name).unwrap_or_else(|| panic!("no {name}"));
        assert_eq!(class.provisioner, DRIVER_NAME);
        assert_eq!(class.allow_volume_expansion, Some(true));
        let parameters = class
            .parameters
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let parsed = strata_csi::controller::parse_parameters(&parameters).unwrap();
        assert_eq!(parsed.replicas, replicas, "{name}");
    }

    let mut seen = BTreeSet::new();
    for (name, pod) in pods(r) {
        for container in pod
            .containers
            .iter()
            .chain(pod.init_containers.iter().flatten())
        {
            let image = container.image.as_deref().unwrap();
            assert!(image.contains(':'), "{name}: image {image} has no tag");
            let Some(binary) = strata_binary(image) else {
                continue;
            };
            if overlay.ends_with("production") {
                assert!(
                    image.ends_with(&format!(":{}", env!("CARGO_PKG_VERSION"))),
                    "{image} is not this release"
                );
            }
            // Init containers run a shell of the image, not the binary.
            if container.command.is_some() {
                continue;
            }
            seen.insert(binary.clone());
            match binary.as_str() {
                "strata-csi" => check_strata_csi_flags(container),
                "strata-node" => check_strata_node(container),
                other => panic!("{name}: unknown Strata image {other}"),
            }
        }
        match name.as_str() {
            "strata-csi-controller" => check_controller(&pod, r),
            "strata-csi-node" => check_node_plugin(&pod),
            "strata-node" => check_storage_node(&pod, r),
            other => panic!("unexpected workload {other}"),
        }
    }
    assert_eq!(
        seen,
        BTreeSet::from(["strata-csi".to_string(), "strata-node".to_string()])
    );
    check_rbac(r);
}

#[test]
fn every_overlay_renders_into_valid_objects_that_match_the_binaries() {
    let overlays: Vec<PathBuf> = std::fs::read_dir(repo_root().join("deploy/overlays"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("kustomization.yaml").exists())
        .collect();
    assert!(overlays.len() >= 2, "{overlays:?}");
    for overlay in &overlays {
        let rendered = render(overlay);
        check_overlay(overlay, &rendered);
    }
}
