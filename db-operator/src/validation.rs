//! The checks on a `PostgresCluster` spec that the OpenAPI schema cannot make, and
//! the ones it makes repeated, since a CRD installed by hand may be older than the
//! controller. Every error names the field it is about.

use crate::crd::{PostgresClusterSpec, SUPPORTED_POSTGRES_VERSIONS};

/// postgresql.conf settings the operator and the instance manager own: changing them
/// by hand would break replication, failover or how clients reach the database.
pub const OWNED_PARAMETERS: &[&str] = &[
    "archive_command",
    "archive_mode",
    "cluster_name",
    "config_file",
    "data_directory",
    "hba_file",
    "hot_standby",
    "ident_file",
    "listen_addresses",
    "max_replication_slots",
    "max_wal_senders",
    "port",
    "primary_conninfo",
    "primary_slot_name",
    "promote_trigger_file",
    "recovery_target",
    "recovery_target_lsn",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_timeline",
    "recovery_target_xid",
    "restore_command",
    "ssl",
    "ssl_cert_file",
    "ssl_key_file",
    "synchronous_commit",
    "synchronous_standby_names",
    "unix_socket_directories",
    "wal_level",
    "wal_log_hints",
];

/// Roles the operator and PostgreSQL keep for themselves.
pub const RESERVED_ROLES: &[&str] = &["postgres", "streaming_replica", "public"];

/// Role attributes a declared user may have; SUPERUSER and REPLICATION are not
/// handed out through the manifest.
pub const ROLE_OPTIONS: &[&str] = &[
    "CREATEDB",
    "NOCREATEDB",
    "CREATEROLE",
    "NOCREATEROLE",
    "INHERIT",
    "NOINHERIT",
    "BYPASSRLS",
    "NOBYPASSRLS",
];

/// One refused field: where it is in the manifest and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("spec.{field}: {reason}")]
pub struct FieldError {
    /// Path below `spec`, e.g. `storage.size` or `postgresql.parameters.port`.
    pub field: String,
    pub reason: String,
}

impl FieldError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// All the problems of a spec at once, so a user fixes them in one round.
pub fn validate(spec: &PostgresClusterSpec) -> Result<(), Vec<FieldError>> {
    let mut errors = Vec::new();
    if spec.instances == 0 {
        errors.push(FieldError::new(
            "instances",
            "must be at least 1 (one primary)",
        ));
    }
    if !SUPPORTED_POSTGRES_VERSIONS.contains(&spec.postgres_version) {
        errors.push(FieldError::new(
            "postgresVersion",
            format!(
                "{} is not a supported PostgreSQL major version (supported: {:?})",
                spec.postgres_version, SUPPORTED_POSTGRES_VERSIONS
            ),
        ));
    }
    match parse_quantity(&spec.storage.size) {
        Ok(0) => errors.push(FieldError::new("storage.size", "must be larger than 0")),
        Ok(_) => {}
        Err(reason) => errors.push(FieldError::new("storage.size", reason)),
    }
    if spec.storage.replicas == Some(0) {
        errors.push(FieldError::new("storage.replicas", "must be at least 1"));
    }
    if spec.storage.replicas.is_some() && spec.storage.storage_class.is_some() {
        errors.push(FieldError::new(
            "storage.replicas",
            "give storage.replicas (a strata-<replicas> StorageClass) or \
             storage.storageClass, not both",
        ));
    }
    for name in spec.postgresql.parameters.keys() {
        if OWNED_PARAMETERS.contains(&name.to_ascii_lowercase().as_str()) {
            errors.push(FieldError::new(
                format!("postgresql.parameters.{name}"),
                "is set by the operator and cannot be overridden",
            ));
        }
    }
    let mut known_roles = vec![spec.bootstrap.initdb.owner.as_str(), "postgres"];
    for (i, user) in spec.users.iter().enumerate() {
        if RESERVED_ROLES.contains(&user.name.as_str()) || user.name.starts_with("pg_") {
            errors.push(FieldError::new(
                format!("users[{i}].name"),
                format!("{:?} is reserved", user.name),
            ));
        }
        if known_roles.contains(&user.name.as_str()) {
            errors.push(FieldError::new(
                format!("users[{i}].name"),
                format!("{:?} is declared twice", user.name),
            ));
        }
        for option in &user.options {
            if !ROLE_OPTIONS.contains(&option.to_ascii_uppercase().as_str()) {
                errors.push(FieldError::new(
                    format!("users[{i}].options"),
                    format!("{option:?} is not one of {ROLE_OPTIONS:?}"),
                ));
            }
        }
        known_roles.push(&user.name);
    }
    let mut databases = vec![spec.bootstrap.initdb.database.as_str(), "postgres"];
    for (i, db) in spec.databases.iter().enumerate() {
        if databases.contains(&db.name.as_str()) || db.name.starts_with("template") {
            errors.push(FieldError::new(
                format!("databases[{i}].name"),
                format!("{:?} exists already or is reserved", db.name),
            ));
        }
        if !known_roles.contains(&db.owner.as_str()) {
            errors.push(FieldError::new(
                format!("databases[{i}].owner"),
                format!("{:?} is not a declared user", db.owner),
            ));
        }
        databases.push(&db.name);
    }
    if spec.min_sync_replicas > spec.max_sync_replicas {
        errors.push(FieldError::new(
            "minSyncReplicas",
            format!(
                "{} is more than maxSyncReplicas ({})",
                spec.min_sync_replicas, spec.max_sync_replicas
            ),
        ));
    }
    if spec.instances > 0 && spec.max_sync_replicas > spec.instances - 1 {
        errors.push(FieldError::new(
            "maxSyncReplicas",
            format!(
                "{} is more than the {} replicas of {} instances",
                spec.max_sync_replicas,
                spec.instances - 1,
                spec.instances
            ),
        ));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Bytes in a Kubernetes quantity such as `10Gi`, `500M` or `1.5Gi`.
pub fn parse_quantity(quantity: &str) -> Result<u64, String> {
    let q = quantity.trim();
    if q.starts_with('-') {
        return Err(format!("{quantity:?} is negative"));
    }
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let multiplier: u64 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        other => return Err(format!("{quantity:?} has an unknown unit {other:?}")),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{quantity:?} is not a quantity such as 10Gi"))?;
    let bytes = value * multiplier as f64;
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(format!("{quantity:?} is too large"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::PostgresClusterSpec;

    fn spec() -> PostgresClusterSpec {
        serde_json::from_value(serde_json::json!({
            "instances": 3,
            "storage": {"size": "1Gi"},
        }))
        .expect("minimal spec parses")
    }

    fn fields(spec: &PostgresClusterSpec) -> Vec<String> {
        match validate(spec) {
            Ok(()) => Vec::new(),
            Err(errors) => errors.into_iter().map(|e| e.field).collect(),
        }
    }

    #[test]
    fn a_minimal_spec_is_valid() {
        assert_eq!(fields(&spec()), Vec::<String>::new());
    }

    #[test]
    fn invalid_specs_are_refused_naming_the_field() {
        type Mutation = fn(&mut PostgresClusterSpec);
        let cases: &[(&str, Mutation, &str)] = &[
            ("zero instances", |s| s.instances = 0, "instances"),
            (
                "negative size",
                |s| s.storage.size = "-1Gi".into(),
                "storage.size",
            ),
            ("zero size", |s| s.storage.size = "0".into(), "storage.size"),
            (
                "garbage size",
                |s| s.storage.size = "lots".into(),
                "storage.size",
            ),
            (
                "unknown unit",
                |s| s.storage.size = "10Zi".into(),
                "storage.size",
            ),
            (
                "owned parameter",
                |s| {
                    s.postgresql
                        .parameters
                        .insert("synchronous_standby_names".into(), "*".into());
                },
                "postgresql.parameters.synchronous_standby_names",
            ),
            (
                "owned parameter in capitals",
                |s| {
                    s.postgresql.parameters.insert("Port".into(), "1".into());
                },
                "postgresql.parameters.Port",
            ),
            (
                "unknown version",
                |s| s.postgres_version = 9,
                "postgresVersion",
            ),
            (
                "min above max sync",
                |s| {
                    s.min_sync_replicas = 2;
                    s.max_sync_replicas = 1;
                },
                "minSyncReplicas",
            ),
            (
                "more sync replicas than replicas",
                |s| s.max_sync_replicas = 3,
                "maxSyncReplicas",
            ),
            (
                "superuser through a declared user",
                |s| {
                    s.users.push(crate::crd::UserSpec {
                        name: "boss".into(),
                        options: vec!["SUPERUSER".into()],
                    })
                },
                "users[0].options",
            ),
            (
                "a reserved role",
                |s| {
                    s.users.push(crate::crd::UserSpec {
                        name: "streaming_replica".into(),
                        options: vec![],
                    })
                },
                "users[0].name",
            ),
            (
                "a database owned by nobody declared",
                |s| {
                    s.databases.push(crate::crd::DatabaseSpec {
                        name: "reports".into(),
                        owner: "ghost".into(),
                    })
                },
                "databases[0].owner",
            ),
            (
                "zero volume replicas",
                |s| s.storage.replicas = Some(0),
                "storage.replicas",
            ),
            (
                "replicas and a storage class",
                |s| {
                    s.storage.replicas = Some(3);
                    s.storage.storage_class = Some("fast".into());
                },
                "storage.replicas",
            ),
        ];
        for (what, mutate, field) in cases {
            let mut s = spec();
            mutate(&mut s);
            let errors = validate(&s).expect_err(what);
            assert!(
                errors.iter().any(|e| e.field == *field),
                "{what}: expected an error on {field}, got {errors:?}"
            );
            let message = errors[0].to_string();
            assert!(
                message.starts_with("spec."),
                "{what}: message {message:?} names the field"
            );
        }
    }

    #[test]
    fn user_parameters_users_and_databases_that_are_allowed_pass() {
        let mut s = spec();
        s.postgresql
            .parameters
            .insert("shared_buffers".into(), "256MB".into());
        s.postgresql
            .parameters
            .insert("work_mem".into(), "8MB".into());
        s.users.push(crate::crd::UserSpec {
            name: "reporter".into(),
            options: vec!["createdb".into()],
        });
        s.databases.push(crate::crd::DatabaseSpec {
            name: "reports".into(),
            owner: "reporter".into(),
        });
        assert_eq!(fields(&s), Vec::<String>::new());
    }

    #[test]
    fn quantities_parse_to_bytes() {
        assert_eq!(parse_quantity("10Gi"), Ok(10 << 30));
        assert_eq!(parse_quantity("500M"), Ok(500_000_000));
        assert_eq!(parse_quantity("1.5Ki"), Ok(1536));
        assert_eq!(parse_quantity("4096"), Ok(4096));
        assert!(parse_quantity("-5Gi").is_err());
        assert!(parse_quantity("").is_err());
    }
}
