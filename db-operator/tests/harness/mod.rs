//! Real strata-instance processes with real PostgreSQL 15 servers on loopback ports
//! in a temporary folder, for the instance manager's tests and the timing example.
#![allow(dead_code)]

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use strata_operator::instance_api::{InstanceReport, PrimaryAddress, Role};
use strata_operator::instance_client::InstanceClient;
use strata_operator::lsn::Lsn;
use strata_operator::orchestration::Member;
use tokio_postgres::{Client, NoTls};

pub const SUPERUSER_PASSWORD: &str = "test-superuser-secret";
pub const REPLICATION_PASSWORD: &str = "test-replication-secret";
pub const APP_PASSWORD: &str = "test-app-secret";
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Generous: two cores are shared with other builds.
pub const PATIENCE: Duration = Duration::from_secs(90);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .expect("local address")
        .port()
}

/// One instance manager process (absent while stopped or killed).
pub struct Instance {
    pub name: String,
    pub root: PathBuf,
    pub pg_port: u16,
    pub api_port: u16,
    pub api: InstanceClient,
    child: Option<Child>,
    starts: u32,
    /// Extra command-line arguments and environment for every start.
    pub extra_args: Vec<String>,
    pub extra_env: Vec<(String, String)>,
}

impl Instance {
    pub fn member(&self) -> Member {
        Member {
            name: self.name.clone(),
            api: self.api.clone(),
            postgres: self.address(),
        }
    }

    pub fn address(&self) -> PrimaryAddress {
        PrimaryAddress {
            host: "127.0.0.1".into(),
            port: self.pg_port,
        }
    }

    fn log_path(&self) -> PathBuf {
        self.root.join(format!("instance-{}.log", self.starts))
    }

    /// Starts the instance manager; as a replica of `primary` when given.
    pub fn start(
        &mut self,
        peers: &[String],
        sync_replicas: u32,
        primary: Option<&PrimaryAddress>,
    ) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        self.starts += 1;
        let log = File::create(self.log_path()).expect("create the log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata-instance"));
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.root.join("data"))
            .args(["--pg-bin", PG_BIN, "--listen-address", "127.0.0.1"])
            .args(["--port", &self.pg_port.to_string()])
            .args(["--api-listen", &format!("127.0.0.1:{}", self.api_port)])
            .args(["--peers", &peers.join(",")])
            .args(["--sync-replicas", &sync_replicas.to_string()])
            .env("STRATA_SUPERUSER_PASSWORD", SUPERUSER_PASSWORD)
            .env("STRATA_REPLICATION_PASSWORD", REPLICATION_PASSWORD)
            .env("STRATA_APP_PASSWORD", APP_PASSWORD)
            .env("RUST_LOG", "info")
            .args(&self.extra_args)
            .envs(self.extra_env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup the log file"))
            .stderr(log);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            cmd.args(["--run-as", "postgres"]);
        }
        if let Some(primary) = primary {
            cmd.arg("--primary").arg(primary.to_string());
        }
        // If the test process dies, its instance managers (and so their postgres) die.
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                Ok(())
            });
        }
        self.child = Some(cmd.spawn().expect("start strata-instance"));
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL of the instance manager: the loss of this instance.
    pub fn sigkill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM (what the kubelet sends on Pod deletion); waits for the exit.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.pid().expect("the instance manager runs");
        // SAFETY: kill has no memory preconditions; the pid is our unreaped child.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        self.wait_exit().await
    }

    /// Waits until the instance manager exits on its own.
    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("the instance manager runs");
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = child.try_wait().expect("wait for the instance manager") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit\nlog:\n{}",
                self.name,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last lines of the current log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    }

    /// Polls the API until `accept` likes the report.
    pub async fn wait_for(
        &self,
        what: &str,
        accept: impl Fn(&InstanceReport) -> bool,
    ) -> InstanceReport {
        let deadline = Instant::now() + PATIENCE;
        let mut last = None;
        loop {
            if let Ok(report) = self.api.status().await {
                if accept(&report) {
                    return report;
                }
                last = Some(report);
            }
            if self.pid().is_none_or(process_is_gone) {
                panic!(
                    "{}: the instance manager is not running while waiting for {what}\nlog:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "{}: {what} did not happen within {PATIENCE:?}; last report {last:?}\nlog:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn wait_primary(&self) -> InstanceReport {
        self.wait_for("primary ready", |r| r.ready && r.role == Role::Primary)
            .await
    }

    pub async fn wait_streaming_replica(&self) -> InstanceReport {
        self.wait_for("replica streaming", |r| {
            r.ready && r.role == Role::Replica && r.streaming
        })
        .await
    }

    /// Waits until this replica has replayed `lsn`.
    pub async fn wait_replayed(&self, lsn: Lsn) -> InstanceReport {
        self.wait_for(&format!("replay up to {lsn}"), |r| {
            r.replayed_lsn.is_some_and(|l| l >= lsn)
        })
        .await
    }

    pub async fn sql(&self) -> Client {
        self.sql_as("postgres", SUPERUSER_PASSWORD, "postgres")
            .await
    }

    pub async fn sql_as(&self, user: &str, password: &str, db: &str) -> Client {
        try_connect(self.pg_port, user, password, db)
            .await
            .unwrap_or_else(|e| panic!("{}: connect: {e}\nlog:\n{}", self.name, self.log_tail()))
    }
}

pub async fn try_connect(
    port: u16,
    user: &str,
    password: &str,
    db: &str,
) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(port)
        .user(user)
        .password(password)
        .dbname(db)
        .connect_timeout(Duration::from_secs(5))
        .connect(NoTls)
        .await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// A cluster of instances sharing one temporary folder.
pub struct Cluster {
    pub instances: Vec<Instance>,
    pub peers: Vec<String>,
    pub sync_replicas: u32,
    // Dropped last: the instances are killed before their folders go.
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `pg-1` as the primary and the others as its replicas, and waits until
    /// every replica streams.
    pub async fn start(size: usize, sync_replicas: u32) -> Cluster {
        Self::start_with(size, sync_replicas, &[], &[]).await
    }

    /// Like `start`, with extra arguments and environment for every instance.
    pub async fn start_with(
        size: usize,
        sync_replicas: u32,
        extra_args: &[&str],
        extra_env: &[(&str, &str)],
    ) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("strata-pg-")
            .tempdir()
            .expect("temp dir");
        // postgres runs as an unprivileged user that must reach its folders.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod the temp dir");
        let peers: Vec<String> = (1..=size).map(|i| format!("pg-{i}")).collect();
        let instances = peers
            .iter()
            .map(|name| {
                let mut instance = new_instance(dir.path(), name);
                instance.extra_args = extra_args.iter().map(|a| a.to_string()).collect();
                instance.extra_env = extra_env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                instance
            })
            .collect();
        let mut cluster = Cluster {
            instances,
            peers,
            sync_replicas,
            _dir: dir,
        };
        let peers = cluster.peers.clone();
        cluster.instances[0].start(&peers, sync_replicas, None);
        cluster.instances[0].wait_primary().await;
        let primary = cluster.instances[0].address();
        for i in 1..size {
            cluster.instances[i].start(&peers, sync_replicas, Some(&primary));
        }
        for i in 1..size {
            cluster.instances[i].wait_streaming_replica().await;
        }
        cluster
    }

    pub fn get(&self, name: &str) -> &Instance {
        self.instances
            .iter()
            .find(|i| i.name == name)
            .expect("instance exists")
    }

    pub fn get_mut(&mut self, name: &str) -> &mut Instance {
        self.instances
            .iter_mut()
            .find(|i| i.name == name)
            .expect("instance exists")
    }
}

fn new_instance(dir: &Path, name: &str) -> Instance {
    let root = dir.join(name);
    std::fs::create_dir_all(&root).expect("instance folder");
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))
        .expect("chmod the instance folder");
    let api_port = free_port();
    Instance {
        name: name.to_string(),
        root,
        pg_port: free_port(),
        api_port,
        api: InstanceClient::new(format!("http://127.0.0.1:{api_port}"))
            .with_timeout(Duration::from_secs(120)),
        child: None,
        starts: 0,
        extra_args: Vec::new(),
        extra_env: Vec::new(),
    }
}

/// Whether a process is gone (a zombie waiting for its reaper counts as gone: it
/// runs no code and holds no sockets).
pub fn process_is_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

/// Polls until `pid` is gone.
pub async fn wait_gone(pid: u32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !process_is_gone(pid) {
        assert!(
            Instant::now() < deadline,
            "{what} (pid {pid}) is still running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether the PostgreSQL 15 server binaries are installed; the tests say so
/// loudly rather than pass when they are not.
pub fn require_postgres() {
    assert!(
        Path::new(PG_BIN).join("postgres").exists(),
        "PostgreSQL 15 server binaries are missing from {PG_BIN}: run .ci/install-test-deps"
    );
}
