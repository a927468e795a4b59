//! The `PostgresCluster` custom resource (group `strata.io`, version `v1alpha1`).
//!
//! Field names follow CloudNativePG where the concept is the same, so a CNPG user
//! can read a manifest without a dictionary. The schema carries the checks the API
//! server can make on its own (minimum, enum, pattern); `validation::validate` makes
//! the ones that need code (owned parameters, quantities, cross-field bounds).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The PostgreSQL major versions this operator knows how to run.
pub const SUPPORTED_POSTGRES_VERSIONS: &[u32] = &[15, 16, 17];

/// The version a cluster gets when the manifest does not name one.
pub const DEFAULT_POSTGRES_VERSION: u32 = 15;

/// A Kubernetes quantity without a sign: digits, an optional fraction, an optional
/// binary or decimal suffix. The API server refuses "-1Gi" with this pattern already.
pub const QUANTITY_PATTERN: &str = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$";

/// A managed, highly available PostgreSQL cluster on Strata volumes.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "strata.io",
    version = "v1alpha1",
    kind = "PostgresCluster",
    namespaced,
    status = "PostgresClusterStatus",
    shortname = "pgc",
    category = "strata",
    printcolumn = r#"{"name":"Instances","type":"integer","jsonPath":".spec.instances"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyInstances"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Primary","type":"string","jsonPath":".status.currentPrimary"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PostgresClusterSpec {
    /// Number of PostgreSQL instances: one primary and `instances - 1` streaming replicas.
    #[schemars(range(min = 1, max = 9))]
    pub instances: u32,

    /// PostgreSQL major version.
    #[serde(default = "default_postgres_version")]
    #[schemars(extend("enum" = [15, 16, 17]))]
    pub postgres_version: u32,

    /// Container image; defaults to the Strata PostgreSQL image of `postgresVersion`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_name: Option<String>,

    /// The volume each instance keeps its data directory on.
    pub storage: StorageSpec,

    /// CPU and memory for the postgres container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// PostgreSQL configuration.
    #[serde(default)]
    pub postgresql: PostgresqlSpec,

    /// How the first instance creates its data directory.
    #[serde(default)]
    pub bootstrap: BootstrapSpec,

    /// Roles to create on the primary, each with a generated password in a Secret.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<UserSpec>,

    /// Databases to create on the primary.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub databases: Vec<DatabaseSpec>,

    /// Lowest number of synchronous standbys a commit waits for; 0 is asynchronous.
    #[serde(default)]
    #[schemars(range(min = 0, max = 8))]
    pub min_sync_replicas: u32,

    /// Highest number of synchronous standbys a commit waits for.
    #[serde(default)]
    #[schemars(range(min = 0, max = 8))]
    pub max_sync_replicas: u32,

    /// Whether a primary that needs a restart is switched over by the operator
    /// (`unsupervised`) or waits for a person (`supervised`).
    #[serde(default)]
    pub primary_update_strategy: PrimaryUpdateStrategy,

    /// Seconds the primary may be unreachable before the operator fails over.
    #[serde(default = "default_failover_delay")]
    #[schemars(range(min = 1, max = 3600))]
    pub failover_delay_seconds: u32,
}

fn default_postgres_version() -> u32 {
    DEFAULT_POSTGRES_VERSION
}

fn default_failover_delay() -> u32 {
    5
}

/// The persistent volume of one instance.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Capacity of each instance's volume, a Kubernetes quantity such as `10Gi`.
    #[schemars(regex(pattern = QUANTITY_PATTERN))]
    pub size: String,

    /// StorageClass of the PVCs. Give this or `replicas`; with neither, the
    /// cluster's default StorageClass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class: Option<String>,

    /// Strata volume replicas under each instance (block-level copies on distinct
    /// nodes): selects the StorageClass `strata-<replicas>` (deploy/ ships
    /// `strata-1` and `strata-3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 5))]
    pub replicas: Option<u32>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostgresqlSpec {
    /// postgresql.conf settings. Settings the operator owns (replication, listen
    /// addresses, ports, archiving) are refused.
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BootstrapSpec {
    /// Create a new, empty cluster with initdb.
    #[serde(default)]
    pub initdb: InitdbSpec,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InitdbSpec {
    /// The application database created at bootstrap.
    #[serde(default = "default_app_name")]
    #[schemars(regex(pattern = r"^[a-z_][a-z0-9_]{0,62}$"))]
    pub database: String,
    /// The owner of the application database; its password is in the `-app` Secret.
    #[serde(default = "default_app_name")]
    #[schemars(regex(pattern = r"^[a-z_][a-z0-9_]{0,62}$"))]
    pub owner: String,
}

impl Default for InitdbSpec {
    fn default() -> Self {
        Self {
            database: default_app_name(),
            owner: default_app_name(),
        }
    }
}

fn default_app_name() -> String {
    "app".to_string()
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserSpec {
    #[schemars(regex(pattern = r"^[a-z_][a-z0-9_]{0,62}$"))]
    pub name: String,
    /// Extra role attributes, e.g. `CREATEDB`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseSpec {
    #[schemars(regex(pattern = r"^[a-z_][a-z0-9_]{0,62}$"))]
    pub name: String,
    #[schemars(regex(pattern = r"^[a-z_][a-z0-9_]{0,62}$"))]
    pub owner: String,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum PrimaryUpdateStrategy {
    #[default]
    Unsupervised,
    Supervised,
}

/// What the operator last saw of the cluster.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostgresClusterStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ClusterPhase>,
    /// The instance the `-rw` Service leads to; the single record of who is primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_primary: Option<String>,
    /// When the operator last promoted an instance (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_primary_timestamp: Option<String>,
    #[serde(default)]
    pub ready_instances: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<InstanceStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ClusterPhase {
    /// Creating the first instance, or restarting the only one.
    Initializing,
    /// Instances are being added or removed, or some are not ready.
    Scaling,
    /// Every instance is ready and the primary is known.
    Healthy,
    /// The primary was lost and the operator is promoting a replica.
    FailingOver,
    /// The spec is refused; the conditions say why.
    Invalid,
}

/// One instance as its instance manager reported it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStatus {
    pub name: String,
    pub role: InstanceRole,
    pub ready: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u32>,
    /// Current WAL position (primary) or last replayed position (replica), as `X/Y`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
    /// Bytes of WAL this replica is behind the primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_bytes: Option<u64>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum InstanceRole {
    Primary,
    Replica,
    /// The instance manager did not answer.
    Unknown,
}

/// A Kubernetes-style condition (`Ready`, `Valid`, ...).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}
