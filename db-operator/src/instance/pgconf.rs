//! The configuration files the instance manager owns: `strata.conf` (included from
//! postgresql.conf, rewritten at every start and role change) and `pg_hba.conf`.

use std::path::Path;

use super::error::InstanceError;
use crate::instance_api::{PrimaryAddress, Role};

/// The include file with every setting the operator owns.
pub const OWNED_CONF: &str = "strata.conf";
const INCLUDE_LINE: &str = "include_if_exists = 'strata.conf'";

/// The role streaming replicas connect as.
pub const REPLICATION_USER: &str = "streaming_replica";
pub const SUPERUSER: &str = "postgres";

/// Everything strata.conf depends on.
pub struct OwnedSettings<'a> {
    pub name: &'a str,
    pub role: Role,
    pub listen_address: &'a str,
    pub port: u16,
    pub socket_dir: &'a Path,
    pub peers: &'a [String],
    pub sync_replicas: u32,
    pub primary: Option<&'a PrimaryAddress>,
    pub replication_password: &'a str,
    pub parameters: &'a [(String, String)],
}

/// Every slot the instance manager makes starts with this, so it never touches a
/// slot someone else made.
pub const SLOT_PREFIX: &str = "strata_";

/// The replication slot (on the primary) that keeps WAL for instance `name`.
/// Slot names allow only lower-case letters, digits and underscores.
pub fn slot_name(name: &str) -> String {
    let body: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("{SLOT_PREFIX}{body}")
}

/// A value in postgresql.conf syntax: single quotes, with `'` and `\` escaped.
pub fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// A value in a libpq connection string.
fn conninfo_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// `synchronous_standby_names` for a primary: any `count` of the other instances.
pub fn synchronous_standby_names(name: &str, peers: &[String], count: u32) -> String {
    let standbys: Vec<String> = peers
        .iter()
        .filter(|p| p.as_str() != name)
        .map(|p| format!("\"{}\"", p.replace('"', "")))
        .collect();
    let count = (count as usize).min(standbys.len());
    if count == 0 {
        String::new()
    } else {
        format!("ANY {count} ({})", standbys.join(", "))
    }
}

pub fn render_owned_conf(s: &OwnedSettings<'_>) -> String {
    let mut lines = vec![
        "# Written by strata-instance at every start and role change; edits are lost.".to_string(),
        format!("listen_addresses = {}", conf_quote(s.listen_address)),
        format!("port = {}", s.port),
        format!(
            "unix_socket_directories = {}",
            conf_quote(&s.socket_dir.to_string_lossy())
        ),
        format!("cluster_name = {}", conf_quote(s.name)),
        "wal_level = replica".into(),
        "hot_standby = on".into(),
        "hot_standby_feedback = on".into(),
        "max_wal_senders = 16".into(),
        "max_replication_slots = 16".into(),
        // pg_rewind needs hint-bit changes in WAL to rewind a former primary.
        "wal_log_hints = on".into(),
        "wal_keep_size = '512MB'".into(),
        // Standbys report positions each second, so the primary's lag view is fresh,
        // and retry a lost primary each second, so a failover is followed quickly.
        "wal_receiver_status_interval = '1s'".into(),
        "wal_retrieve_retry_interval = '1s'".into(),
        "recovery_target_timeline = 'latest'".into(),
    ];
    match (s.role, s.primary) {
        (Role::Primary, _) | (Role::Replica, None) => {
            let sync = if s.role == Role::Primary {
                synchronous_standby_names(s.name, s.peers, s.sync_replicas)
            } else {
                String::new()
            };
            lines.push(format!("synchronous_standby_names = {}", conf_quote(&sync)));
            lines.push("primary_conninfo = ''".into());
            lines.push("primary_slot_name = ''".into());
        }
        (Role::Replica, Some(primary)) => {
            let conninfo = format!(
                "host={} port={} user={} password={} application_name={} connect_timeout=5",
                conninfo_quote(&primary.host),
                primary.port,
                REPLICATION_USER,
                conninfo_quote(s.replication_password),
                conninfo_quote(s.name),
            );
            lines.push("synchronous_standby_names = ''".into());
            lines.push(format!("primary_conninfo = {}", conf_quote(&conninfo)));
            lines.push(format!("primary_slot_name = '{}'", slot_name(s.name)));
        }
    }
    if !s.parameters.is_empty() {
        lines.push("# spec.postgresql.parameters".into());
        for (key, value) in s.parameters {
            lines.push(format!("{key} = {}", conf_quote(value)));
        }
    }
    lines.push(String::new());
    lines.join("\n")
}

/// Local connections (the socket directory is private to the postgres user) are
/// trusted; everything over TCP authenticates with SCRAM.
pub fn render_hba() -> String {
    format!(
        "# Written by strata-instance; edits are lost.\n\
         local all all trust\n\
         host replication {REPLICATION_USER} all scram-sha-256\n\
         host all all all scram-sha-256\n"
    )
}

/// Writes strata.conf and pg_hba.conf and makes postgresql.conf include strata.conf
/// last, so it wins over anything before it.
pub fn write_owned_files(
    data_dir: &Path,
    settings: &OwnedSettings<'_>,
    owner: Option<super::process::RunAs>,
) -> Result<(), InstanceError> {
    let main_conf = data_dir.join("postgresql.conf");
    let text = std::fs::read_to_string(&main_conf)
        .map_err(|e| InstanceError::io(format!("reading {}", main_conf.display()), e))?;
    if !text.lines().any(|l| l.trim() == INCLUDE_LINE) {
        write_file(
            &main_conf,
            &format!("{}\n{INCLUDE_LINE}\n", text.trim_end()),
            owner,
        )?;
    }
    write_file(
        &data_dir.join(OWNED_CONF),
        &render_owned_conf(settings),
        owner,
    )?;
    write_file(&data_dir.join("pg_hba.conf"), &render_hba(), owner)?;
    Ok(())
}

/// Writes a file readable only by its owner (it may hold a password).
pub fn write_file(
    path: &Path,
    contents: &str,
    owner: Option<super::process::RunAs>,
) -> Result<(), InstanceError> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("strata-tmp");
    std::fs::write(&tmp, contents)
        .map_err(|e| InstanceError::io(format!("writing {}", tmp.display()), e))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| InstanceError::io(format!("chmod {}", tmp.display()), e))?;
    if let Some(ids) = owner {
        std::os::unix::fs::chown(&tmp, Some(ids.uid), Some(ids.gid))
            .map_err(|e| InstanceError::io(format!("chown {}", tmp.display()), e))?;
    }
    std::fs::rename(&tmp, path)
        .map_err(|e| InstanceError::io(format!("renaming {}", tmp.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers() -> Vec<String> {
        vec!["pg-1".into(), "pg-2".into(), "pg-3".into()]
    }

    #[test]
    fn sync_names_list_the_other_instances() {
        assert_eq!(
            synchronous_standby_names("pg-1", &peers(), 1),
            r#"ANY 1 ("pg-2", "pg-3")"#
        );
        assert_eq!(
            synchronous_standby_names("pg-2", &peers(), 5),
            r#"ANY 2 ("pg-1", "pg-3")"#
        );
        assert_eq!(synchronous_standby_names("pg-1", &peers(), 0), "");
        assert_eq!(synchronous_standby_names("pg-1", &["pg-1".into()], 1), "");
    }

    #[test]
    fn slot_names_are_valid_identifiers() {
        assert_eq!(slot_name("db-Main-2"), "strata_db_main_2");
    }

    #[test]
    fn quoting_survives_quotes_and_backslashes() {
        assert_eq!(conf_quote(r"it's a \ test"), r"'it''s a \\ test'");
        assert_eq!(conninfo_quote(r"a'b\c"), r"'a\'b\\c'");
    }

    #[test]
    fn a_replica_follows_its_primary_through_its_slot() {
        let primary = PrimaryAddress {
            host: "10.0.0.1".into(),
            port: 5432,
        };
        let socket_dir = Path::new("/run/pg");
        let settings = OwnedSettings {
            name: "pg-2",
            role: Role::Replica,
            listen_address: "*",
            port: 5432,
            socket_dir,
            peers: &peers(),
            sync_replicas: 1,
            primary: Some(&primary),
            replication_password: "secret",
            parameters: &[("work_mem".into(), "8MB".into())],
        };
        let conf = render_owned_conf(&settings);
        assert!(conf.contains("primary_slot_name = 'strata_pg_2'"), "{conf}");
        assert!(conf.contains("host=''10.0.0.1'' port=5432"), "{conf}");
        assert!(conf.contains("synchronous_standby_names = ''"), "{conf}");
        assert!(conf.contains("work_mem = '8MB'"), "{conf}");

        let primary_conf = render_owned_conf(&OwnedSettings {
            role: Role::Primary,
            primary: None,
            ..settings
        });
        assert!(
            primary_conf.contains(r#"synchronous_standby_names = 'ANY 1 ("pg-1", "pg-3")'"#),
            "{primary_conf}"
        );
        assert!(primary_conf.contains("primary_conninfo = ''"));
    }
}
