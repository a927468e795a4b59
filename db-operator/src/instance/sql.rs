//! The SQL the instance manager runs against its own postgres, over the private
//! unix socket as the superuser.

use std::path::Path;
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use super::error::InstanceError;
use super::pgconf::{slot_name, SLOT_PREFIX, SUPERUSER};
use crate::instance_api::{Role, StandbyReport};
use crate::lsn::Lsn;

/// Connects over the unix socket in `socket_dir`.
pub async fn connect_local(socket_dir: &Path, port: u16) -> Result<Client, InstanceError> {
    let (client, connection) = tokio_postgres::Config::new()
        .host_path(socket_dir)
        .port(port)
        .user(SUPERUSER)
        .dbname("postgres")
        .application_name("strata-instance")
        .connect_timeout(Duration::from_secs(2))
        .connect(NoTls)
        .await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "local connection ended");
        }
    });
    Ok(client)
}

/// A string literal for SQL (standard_conforming_strings is on since 9.1).
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// An identifier for SQL.
pub fn quote_ident(value: &str) -> String {
    format!("\"{}\"", value.replace('"', "\"\""))
}

fn lsn(text: Option<String>) -> Option<Lsn> {
    text.and_then(|t| t.parse().ok())
}

/// What postgres says about itself.
pub struct Observed {
    pub role: Role,
    pub timeline: Option<u32>,
    pub current_lsn: Option<Lsn>,
    pub received_lsn: Option<Lsn>,
    pub replayed_lsn: Option<Lsn>,
    pub streaming: bool,
    pub standbys: Vec<StandbyReport>,
}

pub async fn observe(client: &Client) -> Result<Observed, InstanceError> {
    let in_recovery: bool = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await?
        .get(0);
    if !in_recovery {
        // The timeline of the WAL segment being written: pg_control's checkpoint
        // timeline lags behind a promotion until the next checkpoint.
        let row = client
            .query_one(
                "SELECT pg_current_wal_lsn()::text, \
                 ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int",
                &[],
            )
            .await?;
        let timeline: i32 = row.get(1);
        let standbys = client
            .query(
                "SELECT application_name, state, sync_state, flush_lsn::text, replay_lsn::text \
                 FROM pg_stat_replication WHERE application_name <> ''",
                &[],
            )
            .await?
            .into_iter()
            .map(|r| StandbyReport {
                name: r.get(0),
                state: r.get::<_, Option<String>>(1).unwrap_or_default(),
                sync_state: r.get::<_, Option<String>>(2).unwrap_or_default(),
                flush_lsn: lsn(r.get(3)),
                replay_lsn: lsn(r.get(4)),
            })
            .collect();
        return Ok(Observed {
            role: Role::Primary,
            timeline: u32::try_from(timeline).ok(),
            current_lsn: lsn(row.get(0)),
            received_lsn: None,
            replayed_lsn: None,
            streaming: false,
            standbys,
        });
    }
    let row = client
        .query_one(
            "SELECT pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text, \
             (SELECT received_tli FROM pg_stat_wal_receiver), \
             (SELECT timeline_id FROM pg_control_checkpoint()), \
             COALESCE((SELECT status = 'streaming' FROM pg_stat_wal_receiver), false)",
            &[],
        )
        .await?;
    let received_tli: Option<i32> = row.get(2);
    let checkpoint_tli: Option<i32> = row.get(3);
    Ok(Observed {
        role: Role::Replica,
        timeline: received_tli
            .or(checkpoint_tli)
            .and_then(|t| u32::try_from(t).ok()),
        current_lsn: None,
        received_lsn: lsn(row.get(0)),
        replayed_lsn: lsn(row.get(1)),
        streaming: row.get(4),
        standbys: Vec::new(),
    })
}

/// On a primary: a physical slot for every other instance (reserving WAL from now,
/// so a replica that is away does not lose the WAL it needs), and no slot for an
/// instance that left the cluster.
pub async fn reconcile_slots_on_primary(
    client: &Client,
    name: &str,
    peers: &[String],
) -> Result<(), InstanceError> {
    let wanted: Vec<String> = peers
        .iter()
        .filter(|p| p.as_str() != name)
        .map(|p| slot_name(p))
        .collect();
    let existing: Vec<(String, bool)> = client
        .query(
            "SELECT slot_name::text, active FROM pg_replication_slots WHERE slot_type = 'physical'",
            &[],
        )
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for slot in &wanted {
        if !existing.iter().any(|(s, _)| s == slot) {
            tracing::info!(slot, "creating replication slot");
            client
                .execute(
                    "SELECT pg_create_physical_replication_slot($1, true)",
                    &[slot],
                )
                .await?;
        }
    }
    for (slot, active) in &existing {
        if slot.starts_with(SLOT_PREFIX) && !wanted.contains(slot) && !active {
            tracing::info!(slot, "dropping replication slot of an instance that left");
            client
                .execute("SELECT pg_drop_replication_slot($1)", &[slot])
                .await?;
        }
    }
    Ok(())
}

/// On a replica: our slots left from a time as primary would hold WAL forever.
pub async fn drop_inactive_slots(client: &Client) -> Result<(), InstanceError> {
    client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_type = 'physical' AND NOT active AND starts_with(slot_name::text, $1)",
            &[&SLOT_PREFIX],
        )
        .await?;
    Ok(())
}

/// On a primary: the roles and databases that do not exist yet (at bootstrap all
/// of them; later, ones declared since, or ones a crash during bootstrap left out).
/// Existing ones are left alone (a person may have changed them on purpose).
pub async fn ensure_declared(
    client: &Client,
    users: &[super::DeclaredUser],
    databases: &[super::DeclaredDatabase],
) -> Result<(), InstanceError> {
    // Like bootstrap: idempotent, and redone by the next primary if it is lost, so
    // it need not wait for a standby (which may not exist yet).
    client
        .batch_execute("SET synchronous_commit = local")
        .await?;
    for user in users {
        let exists = client
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&user.name])
            .await?
            .is_some();
        if !exists {
            // Options go into the statement as words: only letters, never SQL.
            if let Some(bad) = user
                .options
                .iter()
                .find(|o| o.is_empty() || !o.chars().all(|c| c.is_ascii_alphabetic()))
            {
                return Err(InstanceError::Invalid(format!(
                    "role option {bad:?} of {} is not a keyword",
                    user.name
                )));
            }
            tracing::info!(user = user.name, "creating declared role");
            client
                .batch_execute(&format!(
                    "CREATE ROLE {} LOGIN {} PASSWORD {}",
                    quote_ident(&user.name),
                    user.options.join(" "),
                    quote_literal(&user.password)
                ))
                .await?;
        }
    }
    for db in databases {
        let exists = client
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&db.name])
            .await?
            .is_some();
        if !exists {
            tracing::info!(database = db.name, "creating declared database");
            client
                .batch_execute(&format!(
                    "CREATE DATABASE {} OWNER {}",
                    quote_ident(&db.name),
                    quote_ident(&db.owner)
                ))
                .await?;
        }
    }
    Ok(())
}

/// Promotes this standby and waits until it accepts writes.
pub async fn promote(client: &Client) -> Result<(), InstanceError> {
    let promoted: bool = client
        .query_one("SELECT pg_promote(true, 60)", &[])
        .await?
        .get(0);
    if promoted {
        Ok(())
    } else {
        Err(InstanceError::Invalid(
            "postgres did not finish promotion within 60 s".into(),
        ))
    }
}

/// CHECKPOINT on another instance, over TCP as the superuser.
pub async fn checkpoint_remote(
    primary: &crate::instance_api::PrimaryAddress,
    superuser_password: &str,
) -> Result<(), InstanceError> {
    let (client, connection) = tokio_postgres::Config::new()
        .host(&primary.host)
        .port(primary.port)
        .user(SUPERUSER)
        .password(superuser_password)
        .dbname("postgres")
        .application_name("strata-instance")
        .connect_timeout(Duration::from_secs(10))
        .connect(NoTls)
        .await?;
    tokio::spawn(connection);
    client.batch_execute("CHECKPOINT").await?;
    Ok(())
}

pub async fn reload(client: &Client) -> Result<(), InstanceError> {
    client.batch_execute("SELECT pg_reload_conf()").await?;
    Ok(())
}
