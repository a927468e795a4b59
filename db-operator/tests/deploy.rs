//! deploy/operator renders, and what it renders fits the code: every object
//! parses into its k8s-openapi type; the Deployment's image is the one
//! deploy/docker builds, its flags are the binary's and its probes reach the
//! port it listens on; the service account is bound to the ClusterRole, and
//! that role lets the controller watch what it watches. (Every other API call
//! the controller makes is held to the same role by the fake API server of the
//! controller's tests.)

use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResourceExt;
use strata_operator::controller::rbac::{allows, WATCHED_RESOURCES};
use strata_operator::controller::resources::POSTGRES_IMAGE_REPOSITORY;
use strata_operator::crd::PostgresCluster;
use strata_system_tests::manifests::{kustomize, repo_root, typed};

#[derive(Default)]
struct Rendered {
    namespaces: Vec<Namespace>,
    crds: Vec<CustomResourceDefinition>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    deployments: Vec<Deployment>,
}

fn render() -> Rendered {
    let mut r = Rendered::default();
    for object in kustomize(&repo_root().join("deploy/operator")) {
        match object["kind"].as_str().unwrap_or_default() {
            "Namespace" => r.namespaces.push(typed(&object)),
            "CustomResourceDefinition" => r.crds.push(typed(&object)),
            "ServiceAccount" => r.service_accounts.push(typed(&object)),
            "ClusterRole" => r.cluster_roles.push(typed(&object)),
            "ClusterRoleBinding" => r.bindings.push(typed(&object)),
            "Deployment" => r.deployments.push(typed(&object)),
            other => panic!("deploy/operator: unexpected kind {other:?}"),
        }
    }
    r
}

/// The image a Dockerfile says it builds (its first line names it).
fn dockerfile_image(file: &str) -> String {
    let text = std::fs::read_to_string(repo_root().join("deploy/docker").join(file)).unwrap();
    let first = text.lines().next().unwrap();
    first
        .strip_prefix("# Image ")
        .and_then(|rest| rest.split([':', ' ']).next())
        .unwrap_or_else(|| panic!("{file} does not start with '# Image REPOSITORY'"))
        .to_string()
}

#[test]
fn the_operator_manifests_render_into_objects_that_fit_the_binaries() {
    let r = render();

    // The namespace and the CRD.
    assert_eq!(r.namespaces.len(), 1);
    let ns = r.namespaces[0].metadata.name.clone().unwrap();
    assert_eq!(r.crds.len(), 1);
    assert_eq!(
        serde_json::to_value(&r.crds[0]).unwrap(),
        serde_json::to_value(PostgresCluster::crd()).unwrap(),
        "deploy/crds is not what crdgen writes: cargo run -p strata-operator --bin crdgen"
    );

    // One controller, never two at once: it has no leader election.
    assert_eq!(r.deployments.len(), 1);
    let deployment = &r.deployments[0];
    let spec = deployment.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(
        spec.strategy.as_ref().and_then(|s| s.type_.as_deref()),
        Some("Recreate"),
        "a rolling update would run two controllers side by side"
    );
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.containers.len(), 1);
    let container = &pod.containers[0];

    // The image is the one deploy/docker builds.
    let image = container.image.as_deref().unwrap();
    let repository = image.rsplit_once(':').map_or(image, |(repo, _)| repo);
    assert_eq!(repository, dockerfile_image("strata-operator.Dockerfile"));
    assert_eq!(
        POSTGRES_IMAGE_REPOSITORY,
        dockerfile_image("strata-postgres.Dockerfile"),
        "the Pods' default image is not the one deploy/docker builds"
    );

    // Its flags are the binary's, and the probes reach the port it listens on.
    let args = container.args.clone().unwrap_or_default();
    let help = Command::new(env!("CARGO_BIN_EXE_strata-operator"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).to_string();
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        assert!(
            help.contains(flag.as_str()),
            "strata-operator has no {flag}"
        );
    }
    let listen = args
        .iter()
        .position(|a| a == "--listen")
        .map(|i| args[i + 1].clone())
        .expect("--listen is set");
    let port: i32 = listen.rsplit(':').next().unwrap().parse().unwrap();
    let ports = container.ports.clone().unwrap_or_default();
    let named = |name: &str| {
        ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port)
    };
    for probe in [&container.liveness_probe, &container.readiness_probe] {
        let get = probe.as_ref().and_then(|p| p.http_get.as_ref()).unwrap();
        assert_eq!(get.path.as_deref(), Some("/healthz"));
        let probed = match &get.port {
            IntOrString::Int(p) => *p,
            IntOrString::String(name) => named(name).expect("a named port"),
        };
        assert_eq!(probed, port, "the probe misses the --listen port");
    }

    // Restricted: the namespace enforces it, the Pod complies.
    let labels = r.namespaces[0].metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels
            .get("pod-security.kubernetes.io/enforce")
            .map(String::as_str),
        Some("restricted")
    );
    let pod_security = pod.security_context.as_ref().unwrap();
    assert_eq!(pod_security.run_as_non_root, Some(true));
    let security = container.security_context.as_ref().unwrap();
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(
        security.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_string()])
    );

    // The service account is bound to the operator's ClusterRole.
    let account = pod.service_account_name.clone().unwrap();
    assert!(r
        .service_accounts
        .iter()
        .any(|a| a.metadata.name.as_deref() == Some(&account)
            && a.metadata.namespace.as_deref() == Some(&ns)));
    assert_eq!(r.cluster_roles.len(), 1);
    let role = &r.cluster_roles[0];
    let binding = r
        .bindings
        .iter()
        .find(|b| b.role_ref.name == role.metadata.name.clone().unwrap())
        .expect("a binding of the ClusterRole");
    assert!(binding
        .subjects
        .iter()
        .flatten()
        .any(|s| s.kind == "ServiceAccount"
            && s.name == account
            && s.namespace.as_deref() == Some(&ns)));

    // The controller lists and watches these in every namespace.
    let rules = role.rules.clone().unwrap_or_default();
    for (group, resource) in WATCHED_RESOURCES {
        for verb in ["list", "watch"] {
            assert!(
                allows(&rules, group, resource, verb),
                "the ClusterRole does not allow {verb} {group}/{resource}"
            );
        }
    }
    // And nothing it does not need: no wildcard, no access to other kinds.
    for rule in &rules {
        assert!(!rule.verbs.iter().any(|v| v == "*"), "{rule:?}");
        assert!(
            !rule.resources.iter().flatten().any(|r| r == "*"),
            "{rule:?}"
        );
    }
}
