//! The Kubernetes objects a `PostgresCluster` owns, built from its spec: per
//! instance a PVC and a Pod; Services `-rw`, `-ro`, `-r`; Secrets; PodDisruptionBudgets.
//! Pure functions, so what the controller asks for can be read and tested apart.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec,
    Probe, Secret, SecretKeySelector, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use rand::distr::{Alphanumeric, SampleString};

use crate::crd::PostgresCluster;
use crate::instance::user_password_env;
use crate::instance_api::Role;

pub const CLUSTER_LABEL: &str = "strata.io/cluster";
pub const INSTANCE_LABEL: &str = "strata.io/instance";
pub const ROLE_LABEL: &str = "strata.io/role";
/// On each Pod: a digest of the parts of the spec that shape it; a Pod whose digest
/// differs from the cluster's is restarted by the rolling update.
pub const SPEC_HASH_ANNOTATION: &str = "strata.io/pod-spec-hash";

pub const POSTGRES_PORT: u16 = 5432;
pub const API_PORT: u16 = 8000;
const DATA_MOUNT: &str = "/var/lib/postgresql/data";
/// The uid of the `postgres` user in Debian's postgresql packages (and our image).
const POSTGRES_UID: i64 = 999;

pub fn role_label(role: Role) -> &'static str {
    match role {
        Role::Primary => "primary",
        Role::Replica => "replica",
    }
}

/// `NAME-N`: instance names carry a number so the newest one is easy to tell.
pub fn instance_name(cluster: &str, index: u32) -> String {
    format!("{cluster}-{index}")
}

pub fn superuser_secret_name(cluster: &str) -> String {
    format!("{cluster}-superuser")
}

pub fn replication_secret_name(cluster: &str) -> String {
    format!("{cluster}-replication")
}

pub fn app_secret_name(cluster: &str) -> String {
    format!("{cluster}-app")
}

/// The Secret with the password of a declared user.
pub fn user_secret_name(cluster: &str, user: &str) -> String {
    format!("{cluster}-user-{}", user.replace('_', "-"))
}

pub fn rw_service_name(cluster: &str) -> String {
    format!("{cluster}-rw")
}

fn cluster_labels(cluster: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(CLUSTER_LABEL.to_string(), cluster.to_string())])
}

fn instance_labels(cluster: &str, instance: &str, role: Role) -> BTreeMap<String, String> {
    let mut labels = cluster_labels(cluster);
    labels.insert(INSTANCE_LABEL.into(), instance.into());
    labels.insert(ROLE_LABEL.into(), role_label(role).into());
    labels
}

/// Metadata of an object the cluster owns: deleted with it by the garbage collector.
fn owned_meta(pgc: &PostgresCluster, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: pgc.namespace(),
        labels: Some(labels),
        owner_references: pgc.controller_owner_ref(&()).map(|o| vec![o]),
        ..Default::default()
    }
}

pub fn generate_password() -> String {
    Alphanumeric.sample_string(&mut rand::rng(), 32)
}

/// A `kubernetes.io/basic-auth` Secret with a fresh password.
pub fn credentials_secret(
    pgc: &PostgresCluster,
    name: String,
    username: &str,
    extra: BTreeMap<String, String>,
) -> Secret {
    let mut data = extra;
    data.insert("username".into(), username.into());
    data.insert("password".into(), generate_password());
    Secret {
        metadata: owned_meta(pgc, name, cluster_labels(&pgc.name_any())),
        type_: Some("kubernetes.io/basic-auth".into()),
        string_data: Some(data),
        ..Default::default()
    }
}

/// The three Secrets of a cluster: superuser, replication, application owner.
pub fn secrets(pgc: &PostgresCluster) -> Vec<Secret> {
    let cluster = pgc.name_any();
    let ns = pgc.namespace().unwrap_or_default();
    let app = &pgc.spec.bootstrap.initdb;
    let host = format!("{}.{ns}.svc", rw_service_name(&cluster));
    let declared: Vec<Secret> = pgc
        .spec
        .users
        .iter()
        .map(|user| {
            credentials_secret(
                pgc,
                user_secret_name(&cluster, &user.name),
                &user.name,
                BTreeMap::from([
                    ("host".to_string(), host.clone()),
                    ("port".to_string(), POSTGRES_PORT.to_string()),
                ]),
            )
        })
        .collect();
    let mut secrets = vec![
        credentials_secret(
            pgc,
            superuser_secret_name(&cluster),
            "postgres",
            BTreeMap::new(),
        ),
        credentials_secret(
            pgc,
            replication_secret_name(&cluster),
            "streaming_replica",
            BTreeMap::new(),
        ),
        credentials_secret(
            pgc,
            app_secret_name(&cluster),
            &app.owner,
            BTreeMap::from([
                ("dbname".to_string(), app.database.clone()),
                ("host".to_string(), host),
                ("port".to_string(), POSTGRES_PORT.to_string()),
            ]),
        ),
    ];
    secrets.extend(declared);
    secrets
}

/// The StorageClass of the PVCs: as given, or Strata's class with the number of
/// volume replicas asked for (its `replicas` parameter reaches the CSI driver).
pub fn storage_class(pgc: &PostgresCluster) -> Option<String> {
    let storage = &pgc.spec.storage;
    storage
        .storage_class
        .clone()
        .or_else(|| storage.replicas.map(|n| format!("strata-{n}")))
}

pub fn pvc(pgc: &PostgresCluster, instance: &str) -> PersistentVolumeClaim {
    let meta = owned_meta(pgc, instance.to_string(), {
        let mut l = cluster_labels(&pgc.name_any());
        l.insert(INSTANCE_LABEL.into(), instance.into());
        l
    });
    PersistentVolumeClaim {
        metadata: meta,
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: storage_class(pgc),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(pgc.spec.storage.size.clone()),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Where the default PostgreSQL images are, tagged by major version (built
/// from deploy/docker/strata-postgres.Dockerfile).
pub const POSTGRES_IMAGE_REPOSITORY: &str = "ghcr.io/strata-storage/postgres";

pub fn image(pgc: &PostgresCluster) -> String {
    pgc.spec
        .image_name
        .clone()
        .unwrap_or_else(|| format!("{POSTGRES_IMAGE_REPOSITORY}:{}", pgc.spec.postgres_version))
}

fn secret_env(name: &str, secret: String) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret,
                key: "password".into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The number of standbys each commit waits for: as many replicas as there are, up
/// to `maxSyncReplicas`, and never fewer than `minSyncReplicas` (then writes wait
/// for a replica rather than go unprotected).
pub fn sync_replicas(pgc: &PostgresCluster) -> u32 {
    let replicas = pgc.spec.instances.saturating_sub(1);
    replicas
        .min(pgc.spec.max_sync_replicas)
        .max(pgc.spec.min_sync_replicas)
}

/// A digest of what the Pods are made of (image, resources, configuration, roles
/// and databases), but not of the role or the membership, which change without a
/// restart. FNV-1a over serde_json, so it is stable across builds of the operator.
pub fn pod_spec_hash(pgc: &PostgresCluster) -> String {
    let spec = &pgc.spec;
    let canonical = serde_json::to_string(&(
        image(pgc),
        spec.postgres_version,
        &spec.resources,
        &spec.postgresql.parameters,
        &spec.users,
        &spec.databases,
        &spec.bootstrap.initdb,
    ))
    .expect("the spec serializes");
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in canonical.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// The Pod of one instance. `role` decides only how it starts: a primary starts
/// from its own data (or initdb), a replica from the `-rw` Service (pg_basebackup,
/// or pg_rewind when its volume holds a former primary).
pub fn pod(pgc: &PostgresCluster, instance: &str, role: Role, peers: &[String]) -> Pod {
    let cluster = pgc.name_any();
    let version = pgc.spec.postgres_version;
    let mut args = vec![
        "--name".to_string(),
        instance.to_string(),
        "--data-dir".into(),
        format!("{DATA_MOUNT}/pgdata"),
        "--pg-bin".into(),
        format!("/usr/lib/postgresql/{version}/bin"),
        "--port".into(),
        POSTGRES_PORT.to_string(),
        "--api-listen".into(),
        format!("0.0.0.0:{API_PORT}"),
        "--peers".into(),
        peers.join(","),
        "--sync-replicas".into(),
        sync_replicas(pgc).to_string(),
        "--app-database".into(),
        pgc.spec.bootstrap.initdb.database.clone(),
        "--app-owner".into(),
        pgc.spec.bootstrap.initdb.owner.clone(),
    ];
    if role == Role::Replica {
        args.push("--primary".into());
        args.push(format!("{}:{POSTGRES_PORT}", rw_service_name(&cluster)));
    }
    for (key, value) in &pgc.spec.postgresql.parameters {
        args.push("--param".into());
        args.push(format!("{key}={value}"));
    }
    let mut env = vec![
        secret_env("STRATA_SUPERUSER_PASSWORD", superuser_secret_name(&cluster)),
        secret_env(
            "STRATA_REPLICATION_PASSWORD",
            replication_secret_name(&cluster),
        ),
        secret_env("STRATA_APP_PASSWORD", app_secret_name(&cluster)),
    ];
    for user in &pgc.spec.users {
        args.push("--user".into());
        args.push(format!("{}:{}", user.name, user.options.join(",")));
        env.push(secret_env(
            &user_password_env(&user.name),
            user_secret_name(&cluster, &user.name),
        ));
    }
    for db in &pgc.spec.databases {
        args.push("--database".into());
        args.push(format!("{}:{}", db.name, db.owner));
    }
    let container = Container {
        name: "postgres".into(),
        image: Some(image(pgc)),
        command: Some(vec!["strata-instance".into()]),
        args: Some(args),
        env: Some(env),
        ports: Some(vec![
            ContainerPort {
                name: Some("postgres".into()),
                container_port: POSTGRES_PORT.into(),
                ..Default::default()
            },
            ContainerPort {
                name: Some("api".into()),
                container_port: API_PORT.into(),
                ..Default::default()
            },
        ]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz".into()),
                port: IntOrString::Int(API_PORT.into()),
                ..Default::default()
            }),
            period_seconds: Some(2),
            ..Default::default()
        }),
        resources: pgc.spec.resources.clone(),
        volume_mounts: Some(vec![VolumeMount {
            name: "pgdata".into(),
            mount_path: DATA_MOUNT.into(),
            ..Default::default()
        }]),
        ..Default::default()
    };
    let mut metadata = owned_meta(
        pgc,
        instance.to_string(),
        instance_labels(&cluster, instance, role),
    );
    metadata.annotations = Some(BTreeMap::from([(
        SPEC_HASH_ANNOTATION.to_string(),
        pod_spec_hash(pgc),
    )]));
    Pod {
        metadata,
        spec: Some(PodSpec {
            containers: vec![container],
            hostname: Some(instance.to_string()),
            // The kubelet restarts a crashed instance manager in place; a deleted Pod
            // is recreated by the operator only, which decides its role first.
            restart_policy: Some("Always".into()),
            termination_grace_period_seconds: Some(60),
            security_context: Some(PodSecurityContext {
                run_as_user: Some(POSTGRES_UID),
                run_as_group: Some(POSTGRES_UID),
                fs_group: Some(POSTGRES_UID),
                run_as_non_root: Some(true),
                ..Default::default()
            }),
            volumes: Some(vec![Volume {
                name: "pgdata".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: instance.to_string(),
                    read_only: None,
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

/// `-rw` leads to the current primary (selected by instance name, so moving it is
/// one update), `-ro` to the replicas, `-r` to any instance.
pub fn services(pgc: &PostgresCluster, primary: &str) -> Vec<Service> {
    let cluster = pgc.name_any();
    let service = |suffix: &str, selector: BTreeMap<String, String>| Service {
        metadata: owned_meta(pgc, format!("{cluster}-{suffix}"), cluster_labels(&cluster)),
        spec: Some(ServiceSpec {
            selector: Some(selector),
            ports: Some(vec![ServicePort {
                name: Some("postgres".into()),
                port: POSTGRES_PORT.into(),
                target_port: Some(IntOrString::Int(POSTGRES_PORT.into())),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut rw = cluster_labels(&cluster);
    rw.insert(INSTANCE_LABEL.into(), primary.into());
    let mut ro = cluster_labels(&cluster);
    ro.insert(ROLE_LABEL.into(), role_label(Role::Replica).into());
    vec![
        service("rw", rw),
        service("ro", ro),
        service("r", cluster_labels(&cluster)),
    ]
}

/// The primary may not be evicted (a drain must wait for a switchover); of the
/// replicas, one at a time.
pub fn disruption_budgets(pgc: &PostgresCluster) -> Vec<PodDisruptionBudget> {
    let cluster = pgc.name_any();
    let selector = |role: Role| LabelSelector {
        match_labels: Some({
            let mut l = cluster_labels(&cluster);
            l.insert(ROLE_LABEL.into(), role_label(role).into());
            l
        }),
        ..Default::default()
    };
    let mut budgets = vec![PodDisruptionBudget {
        metadata: owned_meta(pgc, format!("{cluster}-primary"), cluster_labels(&cluster)),
        spec: Some(PodDisruptionBudgetSpec {
            selector: Some(selector(Role::Primary)),
            min_available: Some(IntOrString::Int(1)),
            ..Default::default()
        }),
        status: None,
    }];
    if pgc.spec.instances > 1 {
        budgets.push(PodDisruptionBudget {
            metadata: owned_meta(pgc, format!("{cluster}-replicas"), cluster_labels(&cluster)),
            spec: Some(PodDisruptionBudgetSpec {
                selector: Some(selector(Role::Replica)),
                max_unavailable: Some(IntOrString::Int(1)),
                ..Default::default()
            }),
            status: None,
        });
    }
    budgets
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::PostgresClusterSpec;

    fn cluster() -> PostgresCluster {
        let spec: PostgresClusterSpec = serde_json::from_value(serde_json::json!({
            "instances": 3,
            "storage": {"size": "10Gi", "replicas": 3},
            "postgresql": {"parameters": {"work_mem": "8MB"}},
            "users": [{"name": "reporter", "options": ["CREATEDB"]}],
            "databases": [{"name": "reports", "owner": "reporter"}],
            "minSyncReplicas": 1,
            "maxSyncReplicas": 1,
        }))
        .unwrap();
        let mut pgc = PostgresCluster::new("db", spec);
        pgc.metadata.namespace = Some("ns".into());
        pgc.metadata.uid = Some("uid-1".into());
        pgc
    }

    #[test]
    fn a_replica_pod_clones_from_the_rw_service_with_its_own_volume() {
        let pgc = cluster();
        let peers = vec!["db-1".to_string(), "db-2".to_string()];
        let pod = pod(&pgc, "db-2", Role::Replica, &peers);
        let args = pod.spec.as_ref().unwrap().containers[0]
            .args
            .clone()
            .unwrap();
        let joined = args.join(" ");
        assert!(joined.contains("--primary db-rw:5432"), "{joined}");
        assert!(joined.contains("--peers db-1,db-2"), "{joined}");
        assert!(joined.contains("--sync-replicas 1"), "{joined}");
        assert!(joined.contains("--param work_mem=8MB"), "{joined}");
        assert!(joined.contains("--user reporter:CREATEDB"), "{joined}");
        assert!(joined.contains("--database reports:reporter"), "{joined}");
        let env = pod.spec.as_ref().unwrap().containers[0]
            .env
            .clone()
            .unwrap();
        let user_env = env
            .iter()
            .find(|e| e.name == "STRATA_USER_PASSWORD_REPORTER")
            .expect("the declared user's password is passed");
        let secret = user_env
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!(secret.name, "db-user-reporter");
        let claim = pod.spec.as_ref().unwrap().volumes.as_ref().unwrap()[0]
            .persistent_volume_claim
            .as_ref()
            .unwrap()
            .claim_name
            .clone();
        assert_eq!(claim, "db-2");
        let pvc = pvc(&pgc, "db-2");
        let spec = pvc.spec.unwrap();
        assert_eq!(spec.storage_class_name.as_deref(), Some("strata-3"));
        let mut named = pgc.clone();
        named.spec.storage.replicas = None;
        named.spec.storage.storage_class = Some("fast-nvme".into());
        assert_eq!(storage_class(&named).as_deref(), Some("fast-nvme"));
        let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(owner.kind, "PostgresCluster");
        assert_eq!(owner.controller, Some(true));
        let labels = pod.metadata.labels.unwrap();
        assert_eq!(labels[ROLE_LABEL], "replica");

        let primary = super::pod(&pgc, "db-1", Role::Primary, &peers);
        let args = primary.spec.unwrap().containers[0].args.clone().unwrap();
        assert!(!args.contains(&"--primary".to_string()));
    }

    #[test]
    fn the_spec_hash_changes_with_the_pods_make_not_with_their_number() {
        let pgc = cluster();
        let base = pod_spec_hash(&pgc);
        assert_eq!(base, pod_spec_hash(&pgc.clone()), "deterministic");
        let mut scaled = pgc.clone();
        scaled.spec.instances = 5;
        assert_eq!(base, pod_spec_hash(&scaled), "scaling restarts nothing");
        let mut tuned = pgc.clone();
        tuned
            .spec
            .postgresql
            .parameters
            .insert("work_mem".into(), "16MB".into());
        assert_ne!(base, pod_spec_hash(&tuned));
        let mut upgraded = pgc;
        upgraded.spec.image_name = Some("registry/postgres:15.9".into());
        assert_ne!(base, pod_spec_hash(&upgraded));
    }

    #[test]
    fn services_lead_to_the_primary_the_replicas_and_any() {
        let services = services(&cluster(), "db-2");
        let selectors: Vec<(String, BTreeMap<String, String>)> = services
            .into_iter()
            .map(|s| (s.metadata.name.unwrap(), s.spec.unwrap().selector.unwrap()))
            .collect();
        assert_eq!(selectors[0].0, "db-rw");
        assert_eq!(selectors[0].1[INSTANCE_LABEL], "db-2");
        assert_eq!(selectors[1].0, "db-ro");
        assert_eq!(selectors[1].1[ROLE_LABEL], "replica");
        assert_eq!(selectors[2].0, "db-r");
        assert_eq!(selectors[2].1.len(), 1);
    }

    #[test]
    fn sync_count_follows_the_replicas_within_bounds() {
        let mut pgc = cluster();
        assert_eq!(sync_replicas(&pgc), 1);
        pgc.spec.max_sync_replicas = 5;
        assert_eq!(sync_replicas(&pgc), 2, "no more than there are replicas");
        pgc.spec.instances = 1;
        assert_eq!(sync_replicas(&pgc), 1, "minSyncReplicas holds writes back");
        pgc.spec.min_sync_replicas = 0;
        assert_eq!(sync_replicas(&pgc), 0);
    }

    #[test]
    fn secrets_get_distinct_generated_passwords() {
        let secrets = secrets(&cluster());
        let passwords: Vec<String> = secrets
            .iter()
            .map(|s| s.string_data.as_ref().unwrap()["password"].clone())
            .collect();
        assert_eq!(passwords.len(), 4, "superuser, replication, app, reporter");
        assert!(passwords.iter().all(|p| p.len() == 32));
        assert_ne!(passwords[0], passwords[1]);
        assert_eq!(
            secrets[2].string_data.as_ref().unwrap()["host"],
            "db-rw.ns.svc"
        );
    }
}
