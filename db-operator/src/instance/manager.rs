//! The instance manager's state machine: bootstrap, start, promote, demote, follow.
//! Role changes are serialized by one lock; status reads never wait for them.

use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Mutex};

use super::error::InstanceError;
use super::pgconf::{self, OwnedSettings, REPLICATION_USER, SUPERUSER};
use super::process::{ensure_private_dir, pg_command, run_tool, Postmaster, RunAs, ShutdownMode};
use super::sql;
use super::{DeclaredDatabase, DeclaredUser, InstanceConfig};
use crate::instance_api::{
    DemoteReport, InstanceReport, PrimaryAddress, ReplicationSettings, Role,
};
use crate::lsn::Lsn;

/// How long postgres may take to accept connections after a start (crash recovery
/// or catching up to a consistent point can be slow on a big database).
const START_PATIENCE: Duration = Duration::from_secs(300);
/// How long a fast shutdown may take before it becomes an immediate one.
const STOP_PATIENCE: Duration = Duration::from_secs(60);

/// The parts of the state that change with the role.
#[derive(Clone, Debug)]
struct Settings {
    role: Role,
    following: Option<PrimaryAddress>,
    peers: Vec<String>,
    sync_replicas: u32,
    postmaster_pid: Option<u32>,
}

pub struct InstanceManager {
    config: InstanceConfig,
    run_as: Option<RunAs>,
    /// Held across every operation that stops, starts or changes the role of postgres.
    postmaster: Mutex<Option<Postmaster>>,
    settings: StdMutex<Settings>,
    /// Set once bootstrap is complete (roles created, slots made): before that a
    /// replica must not clone us and the controller must not count us ready.
    bootstrapped: AtomicBool,
    crashes: mpsc::UnboundedSender<ExitStatus>,
}

impl InstanceManager {
    /// The manager and the channel on which an unexpected exit of postgres arrives.
    pub fn new(
        config: InstanceConfig,
    ) -> Result<(Arc<Self>, mpsc::UnboundedReceiver<ExitStatus>), InstanceError> {
        let run_as = RunAs::resolve(config.run_as.as_deref())?;
        let (crashes, crash_rx) = mpsc::unbounded_channel();
        let settings = Settings {
            role: if config.primary.is_some() {
                Role::Replica
            } else {
                Role::Primary
            },
            following: config.primary.clone(),
            peers: config.peers.clone(),
            sync_replicas: config.sync_replicas,
            postmaster_pid: None,
        };
        let manager = Arc::new(Self {
            config,
            run_as,
            postmaster: Mutex::new(None),
            settings: StdMutex::new(settings),
            bootstrapped: AtomicBool::new(false),
            crashes,
        });
        Ok((manager, crash_rx))
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    fn settings(&self) -> Settings {
        self.settings.lock().expect("settings lock").clone()
    }

    fn update(&self, f: impl FnOnce(&mut Settings)) {
        f(&mut self.settings.lock().expect("settings lock"));
    }

    fn tool(&self, name: &str) -> tokio::process::Command {
        pg_command(&self.config.pg_bin.join(name), self.run_as)
    }

    fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }

    fn is_initialized(&self) -> bool {
        self.data_dir().join("PG_VERSION").exists()
    }

    fn standby_signal(&self) -> std::path::PathBuf {
        self.data_dir().join("standby.signal")
    }

    /// Makes the data directory ready for the role we were started in, then starts
    /// postgres and waits until it accepts connections.
    pub async fn bootstrap_and_start(&self) -> Result<(), InstanceError> {
        let mut postmaster = self.postmaster.lock().await;
        ensure_private_dir(&self.config.socket_dir, self.run_as)?;
        self.wait_for_previous_postmaster().await;
        if !self.is_initialized() {
            // A data directory without PG_VERSION is a bootstrap that died half-way:
            // nothing in it is worth keeping.
            if self.data_dir().exists() {
                std::fs::remove_dir_all(self.data_dir()).map_err(|e| {
                    InstanceError::io(format!("clearing {}", self.data_dir().display()), e)
                })?;
            }
            ensure_private_dir(self.data_dir(), self.run_as)?;
            match self.config.primary.clone() {
                Some(primary) => self.base_backup(&primary).await?,
                None => self.initdb().await?,
            }
        } else if let Some(primary) = self.config.primary.clone() {
            if !self.standby_signal().exists() {
                // This instance was a primary: its WAL may have forked from the new
                // primary's timeline, and pg_rewind undoes what the others never saw.
                self.rewind(&primary).await?;
            }
        } else if self.standby_signal().exists() {
            self.update(|s| s.role = Role::Replica);
        }
        if let Some(ids) = self.run_as {
            ids.chown_recursive(self.data_dir())?;
        }
        self.write_config()?;
        *postmaster = Some(self.start_postmaster().await?);
        drop(postmaster);
        // On a primary this creates the replication role and the application
        // database; replicas may clone us only once it has run.
        self.maintain().await?;
        self.bootstrapped.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// After a crash, the previous postmaster may linger as a zombie for a moment
    /// (dead, not yet reaped): postgres and pg_rewind would take its pid in
    /// postmaster.pid for a running server and refuse to start.
    async fn wait_for_previous_postmaster(&self) {
        let Ok(lock) = std::fs::read_to_string(self.data_dir().join("postmaster.pid")) else {
            return;
        };
        let Some(pid) = lock
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<u32>().ok())
        else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while process_state(pid).is_some_and(|state| state == 'Z') && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn initdb(&self) -> Result<(), InstanceError> {
        tracing::info!(data_dir = %self.data_dir().display(), "initdb");
        let pwfile = self.config.socket_dir.join("initdb.pw");
        pgconf::write_file(&pwfile, &self.config.superuser_password, self.run_as)?;
        let mut cmd = self.tool("initdb");
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg(format!("--username={SUPERUSER}"))
            .arg(format!("--pwfile={}", pwfile.display()))
            .args([
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--no-locale",
                "--data-checksums",
            ]);
        let result = run_tool(cmd, "initdb").await;
        let _ = std::fs::remove_file(&pwfile);
        result.map(|_| ())
    }

    async fn base_backup(&self, primary: &PrimaryAddress) -> Result<(), InstanceError> {
        tracing::info!(%primary, "pg_basebackup");
        let mut cmd = self.tool("pg_basebackup");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-h", &primary.host, "-p", &primary.port.to_string()])
            .args(["-U", REPLICATION_USER, "-X", "stream", "-c", "fast", "-w"])
            .env("PGPASSWORD", &self.config.replication_password)
            .env("PGCONNECT_TIMEOUT", "10");
        run_tool(cmd, "pg_basebackup").await.map(|_| ())
    }

    async fn rewind(&self, primary: &PrimaryAddress) -> Result<(), InstanceError> {
        tracing::info!(%primary, "pg_rewind of a former primary");
        // pg_rewind reads the source's timeline from its pg_control, which a
        // promotion only updates at the next checkpoint: without one, a fresh
        // primary looks like it is on our timeline and nothing is rewound.
        sql::checkpoint_remote(primary, &self.config.superuser_password).await?;
        let mut cmd = self.tool("pg_rewind");
        cmd.arg("-D").arg(self.data_dir()).arg(format!(
            "--source-server=host={} port={} user={SUPERUSER} dbname=postgres connect_timeout=10",
            primary.host, primary.port
        ));
        cmd.env("PGPASSWORD", &self.config.superuser_password);
        let out = run_tool(cmd, "pg_rewind").await?;
        tracing::info!(output = out.trim(), "pg_rewind done");
        // pg_rewind copies the source's configuration too; ours is written next.
        Ok(())
    }

    fn write_config(&self) -> Result<(), InstanceError> {
        let s = self.settings();
        let owned = OwnedSettings {
            name: &self.config.name,
            role: s.role,
            listen_address: &self.config.listen_address,
            port: self.config.port,
            socket_dir: &self.config.socket_dir,
            peers: &s.peers,
            sync_replicas: s.sync_replicas,
            primary: s.following.as_ref(),
            replication_password: &self.config.replication_password,
            parameters: &self.config.parameters,
        };
        pgconf::write_owned_files(self.data_dir(), &owned, self.run_as)?;
        if s.role == Role::Replica {
            pgconf::write_file(&self.standby_signal(), "", self.run_as)?;
        }
        Ok(())
    }

    async fn start_postmaster(&self) -> Result<Postmaster, InstanceError> {
        let crashes = self.crashes.clone();
        let mut postmaster = Postmaster::spawn(
            &self.config.pg_bin.join("postgres"),
            self.data_dir(),
            self.run_as,
            move |status| {
                let _ = crashes.send(status);
            },
        )?;
        let pid = postmaster.pid();
        tracing::info!(pid, role = ?self.settings().role, "postgres started");
        self.update(|s| s.postmaster_pid = Some(pid));
        let deadline = Instant::now() + START_PATIENCE;
        loop {
            if let Some(status) = postmaster.exited() {
                self.update(|s| s.postmaster_pid = None);
                return Err(InstanceError::PostgresExited(format!(
                    "during start: {status}"
                )));
            }
            match sql::connect_local(&self.config.socket_dir, self.config.port).await {
                Ok(_) => return Ok(postmaster),
                Err(e) if Instant::now() > deadline => {
                    tracing::error!(error = %e, "postgres is not accepting connections");
                    postmaster.expect_exit();
                    postmaster.signal(libc::SIGQUIT);
                    let _ = postmaster.wait().await;
                    return Err(InstanceError::NotReady(START_PATIENCE));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Upkeep after every change and every few seconds: on a primary, slots for the
    /// other instances and the declared roles and databases; on a replica, no slots.
    pub async fn maintain(&self) -> Result<(), InstanceError> {
        let postmaster = self.postmaster.lock().await;
        if postmaster.is_none() {
            return Ok(());
        }
        let s = self.settings();
        let client = sql::connect_local(&self.config.socket_dir, self.config.port).await?;
        match s.role {
            Role::Primary => {
                sql::reconcile_slots_on_primary(&client, self.name(), &s.peers).await?;
                let (users, databases) = self.roles_and_databases();
                sql::ensure_declared(&client, &users, &databases).await
            }
            Role::Replica => sql::drop_inactive_slots(&client).await,
        }
    }

    /// Every role and database the primary must have: the replication role, the
    /// application owner and database, and the declared ones.
    fn roles_and_databases(&self) -> (Vec<DeclaredUser>, Vec<DeclaredDatabase>) {
        let mut users = vec![DeclaredUser {
            name: REPLICATION_USER.into(),
            options: vec!["REPLICATION".into()],
            password: self.config.replication_password.clone(),
        }];
        let mut databases = Vec::new();
        if let Some(app) = &self.config.app {
            users.push(DeclaredUser {
                name: app.owner.clone(),
                options: Vec::new(),
                password: app.password.clone(),
            });
            databases.push(DeclaredDatabase {
                name: app.database.clone(),
                owner: app.owner.clone(),
            });
        }
        users.extend(self.config.users.iter().cloned());
        databases.extend(self.config.databases.iter().cloned());
        (users, databases)
    }

    /// What postgres says about itself, or what we know when it does not answer.
    pub async fn report(&self) -> InstanceReport {
        let s = self.settings();
        let mut report = InstanceReport {
            name: self.config.name.clone(),
            role: s.role,
            ready: false,
            timeline: None,
            current_lsn: None,
            received_lsn: None,
            replayed_lsn: None,
            replay_lag_bytes: None,
            streaming: false,
            following: s.following.clone(),
            postmaster_pid: s.postmaster_pid,
            standbys: Vec::new(),
            replication: Some(ReplicationSettings {
                peers: s.peers.clone(),
                sync_replicas: s.sync_replicas,
            }),
        };
        if s.postmaster_pid.is_none() {
            return report;
        }
        let observed = match sql::connect_local(&self.config.socket_dir, self.config.port).await {
            Ok(client) => sql::observe(&client).await,
            Err(e) => Err(e),
        };
        match observed {
            Ok(o) => {
                report.ready = self.bootstrapped.load(Ordering::SeqCst);
                report.role = o.role;
                report.timeline = o.timeline;
                report.current_lsn = o.current_lsn;
                report.received_lsn = o.received_lsn;
                report.replayed_lsn = o.replayed_lsn;
                report.replay_lag_bytes = match (o.received_lsn, o.replayed_lsn) {
                    (Some(r), Some(p)) => Some(r.bytes_after(p)),
                    _ => None,
                };
                report.streaming = o.streaming;
                report.standbys = o.standbys;
            }
            Err(e) => tracing::debug!(error = %e, "status query failed"),
        }
        report
    }

    fn require_role(&self, needed: Role) -> Result<(), InstanceError> {
        let actual = self.settings().role;
        if actual == needed {
            Ok(())
        } else {
            Err(InstanceError::WrongRole { actual, needed })
        }
    }

    /// Promotes this replica. Idempotent: a primary answers with its report.
    pub async fn promote(&self) -> Result<InstanceReport, InstanceError> {
        {
            let postmaster = self.postmaster.lock().await;
            if postmaster.is_none() {
                return Err(InstanceError::NotRunning);
            }
            if self.settings().role == Role::Replica {
                let started = Instant::now();
                let client = sql::connect_local(&self.config.socket_dir, self.config.port).await?;
                sql::promote(&client).await?;
                self.update(|s| {
                    s.role = Role::Primary;
                    s.following = None;
                });
                self.write_config()?;
                sql::reload(&client).await?;
                tracing::info!(elapsed = ?started.elapsed(), "promoted");
            }
        }
        self.maintain().await?;
        Ok(self.report().await)
    }

    /// Stops this primary cleanly (every WAL record reaches the connected standbys
    /// before a fast shutdown completes) and restarts it as a replica of `primary`.
    pub async fn demote(&self, primary: PrimaryAddress) -> Result<DemoteReport, InstanceError> {
        let final_lsn;
        {
            let mut postmaster = self.postmaster.lock().await;
            self.require_role(Role::Primary)?;
            let running = postmaster.take().ok_or(InstanceError::NotRunning)?;
            let status = running.stop(ShutdownMode::Fast, STOP_PATIENCE).await?;
            self.update(|s| s.postmaster_pid = None);
            tracing::info!(%status, "primary stopped for demotion");
            final_lsn = self.last_checkpoint().await?;
            self.update(|s| {
                s.role = Role::Replica;
                s.following = Some(primary);
            });
            self.write_config()?;
            *postmaster = Some(self.start_postmaster().await?);
        }
        self.maintain().await?;
        Ok(DemoteReport {
            final_lsn,
            report: self.report().await,
        })
    }

    /// The last checkpoint in pg_control; after a clean shutdown, the end of WAL.
    async fn last_checkpoint(&self) -> Result<Lsn, InstanceError> {
        let mut cmd = self.tool("pg_controldata");
        cmd.arg("-D").arg(self.data_dir()).env("LC_ALL", "C");
        let out = run_tool(cmd, "pg_controldata").await?;
        out.lines()
            .find_map(|l| l.strip_prefix("Latest checkpoint location:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| {
                InstanceError::Invalid("pg_controldata shows no latest checkpoint".into())
            })
    }

    /// Streams from another primary (after a failover elsewhere).
    pub async fn follow(&self, primary: PrimaryAddress) -> Result<InstanceReport, InstanceError> {
        {
            let postmaster = self.postmaster.lock().await;
            self.require_role(Role::Replica)?;
            if postmaster.is_none() {
                return Err(InstanceError::NotRunning);
            }
            tracing::info!(%primary, "following");
            self.update(|s| s.following = Some(primary));
            self.write_config()?;
            // primary_conninfo is reloadable since PostgreSQL 13: the WAL receiver
            // restarts with the new one.
            let client = sql::connect_local(&self.config.socket_dir, self.config.port).await?;
            sql::reload(&client).await?;
        }
        Ok(self.report().await)
    }

    /// Changes the cluster's membership or synchronous count.
    pub async fn set_replication(
        &self,
        replication: ReplicationSettings,
    ) -> Result<InstanceReport, InstanceError> {
        {
            let postmaster = self.postmaster.lock().await;
            self.update(|s| {
                s.peers = replication.peers;
                s.sync_replicas = replication.sync_replicas;
            });
            self.write_config()?;
            if postmaster.is_some() {
                let client = sql::connect_local(&self.config.socket_dir, self.config.port).await?;
                sql::reload(&client).await?;
            }
        }
        self.maintain().await?;
        Ok(self.report().await)
    }

    /// Stops postgres for good (the instance manager is exiting).
    pub async fn shutdown(&self) -> Result<(), InstanceError> {
        let mut postmaster = self.postmaster.lock().await;
        if let Some(running) = postmaster.take() {
            let status = running.stop(ShutdownMode::Fast, STOP_PATIENCE).await?;
            tracing::info!(%status, "postgres stopped");
        }
        self.update(|s| s.postmaster_pid = None);
        Ok(())
    }
}

/// The state letter of a process in /proc (`R`, `S`, `Z`, ...), `None` when it is gone.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}
