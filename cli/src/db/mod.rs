//! `strata db ...`: managed PostgreSQL in local mode.
//!
//! The commands only read and write the records in `DIR/db/NAME/`
//! ([`record`]); the `strata up` process runs the databases ([`controller`],
//! [`local_cluster`]): volumes ([`storage`]), instance managers ([`process`])
//! and the stable addresses ([`proxy`]).

pub mod controller;
mod local_cluster;
mod process;
mod proxy;
mod record;
mod storage;

use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytesize::ByteSize;
use strata_node::cluster::{process_alive, ClusterFile};
use strata_operator::controller::resources::generate_password;
use strata_operator::instance_api::Role;

use record::{DbDir, DbSpec, DbStatus, InstanceSpec, Phase, SwitchoverRequest};

/// PostgreSQL with room for WAL and a little data.
const MIN_SIZE: u64 = 256 << 20;

#[derive(Debug, clap::Subcommand)]
pub enum DbCommand {
    /// Create a PostgreSQL cluster on Strata volumes (one replicated volume
    /// per instance) and wait until it is ready.
    Create {
        name: String,
        /// Number of PostgreSQL instances: one primary, the others replicas.
        #[arg(long, default_value_t = 1)]
        instances: u32,
        /// Size of each instance's volume, e.g. 1GiB.
        #[arg(long, default_value = "1GiB")]
        size: String,
        /// Synchronous replication: a commit is acknowledged once a replica has it.
        #[arg(long)]
        sync: bool,
        /// Replicas of each instance's volume [default: up to 3, one per storage node].
        #[arg(long)]
        volume_replicas: Option<usize>,
        /// How long to wait for the cluster to be ready, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// List the databases.
    Ls,
    /// Show a database's instances: role, node, LSN, lag, process ids.
    Describe { name: String },
    /// Planned switchover to another instance (default: the most advanced replica).
    Switchover {
        name: String,
        #[arg(long)]
        to: Option<String>,
    },
    /// Delete a database: its processes, and its volumes with their data.
    Rm { name: String },
    /// Print the postgres:// URI of the stable address of the primary.
    Uri {
        name: String,
        /// The address of the replicas instead.
        #[arg(long)]
        ro: bool,
    },
}

pub async fn run(dir: &Path, command: DbCommand) -> anyhow::Result<()> {
    match command {
        DbCommand::Create {
            name,
            instances,
            size,
            sync,
            volume_replicas,
            timeout,
        } => {
            let cluster = running_cluster(dir)?;
            process::check_reachable_by_postgres(dir)?;
            let spec = plan(&cluster, &name, instances, &size, sync, volume_replicas)?;
            create(dir, spec, Duration::from_secs(timeout)).await
        }
        DbCommand::Ls => list(dir),
        DbCommand::Describe { name } => describe(dir, &name),
        DbCommand::Switchover { name, to } => switchover(dir, &name, to).await,
        DbCommand::Rm { name } => remove(dir, &name).await,
        DbCommand::Uri { name, ro } => {
            println!("{}", existing(dir, &name)?.spec()?.uri(ro));
            Ok(())
        }
    }
}

/// The cluster file of a running `strata up`, which runs the databases.
fn running_cluster(dir: &Path) -> anyhow::Result<ClusterFile> {
    let cluster = ClusterFile::load(dir)?;
    if !cluster.supervisor_pid.is_some_and(process_alive) {
        bail!(
            "strata up is not running in {} (start it with `strata up --dir {}`)",
            dir.display(),
            dir.display()
        );
    }
    Ok(cluster)
}

fn existing(dir: &Path, name: &str) -> anyhow::Result<DbDir> {
    let db = DbDir::new(dir, name);
    if !db.exists() {
        bail!("no database named {name:?} (see `strata db ls`)");
    }
    Ok(db)
}

/// Lowercase letters, digits and '-', starting with a letter: the name
/// prefixes volume and instance names.
fn validate_name(name: &str) -> anyhow::Result<()> {
    let valid = name.len() <= 40
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-');
    if !valid {
        bail!(
            "invalid database name {name:?}: use up to 40 lowercase letters, digits and '-', \
             starting with a letter"
        );
    }
    Ok(())
}

/// Checks the request and lays the cluster out: instance names, volumes,
/// nodes, ports and passwords.
fn plan(
    cluster: &ClusterFile,
    name: &str,
    instances: u32,
    size: &str,
    sync: bool,
    volume_replicas: Option<usize>,
) -> anyhow::Result<DbSpec> {
    validate_name(name)?;
    if instances == 0 {
        bail!("--instances must be at least 1");
    }
    if instances > 9 {
        bail!("--instances must be at most 9");
    }
    let size = ByteSize::from_str(size)
        .map_err(|e| anyhow::anyhow!("invalid --size {size:?}: {e} (e.g. 1GiB, 512MiB)"))?
        .as_u64();
    if size < MIN_SIZE {
        bail!(
            "--size {} is too small for PostgreSQL: at least {}",
            strata_node::pool::human(size),
            strata_node::pool::human(MIN_SIZE)
        );
    }
    let nodes = cluster.nodes.len();
    let volume_replicas = volume_replicas.unwrap_or(nodes.min(3));
    if volume_replicas == 0 || volume_replicas > nodes {
        bail!("--volume-replicas must be between 1 and the number of storage nodes ({nodes})");
    }
    if sync && instances < 2 {
        bail!("--sync needs at least 2 instances (a replica to confirm each commit)");
    }
    let count = instances as usize;
    // Per instance a PostgreSQL and an API port; then the two stable addresses.
    let ports = crate::ports::free_local_ports(2 * count + 2)?;
    let instances = (1..=count)
        .map(|i| InstanceSpec {
            name: format!("{name}-{i}"),
            volume: format!("db-{name}-{i}"),
            node: cluster.nodes[(i - 1) % nodes].name.clone(),
            pg_port: ports[2 * (i - 1)],
            api_port: ports[2 * (i - 1) + 1],
        })
        .collect();
    Ok(DbSpec {
        name: name.to_string(),
        size_bytes: size,
        volume_replicas,
        sync_replicas: u32::from(sync),
        instances,
        rw_port: ports[2 * count],
        ro_port: ports[2 * count + 1],
        superuser_password: generate_password(),
        replication_password: generate_password(),
        app_password: generate_password(),
    })
}

/// Records the database for `strata up` and waits until it is ready.
async fn create(dir: &Path, spec: DbSpec, timeout: Duration) -> anyhow::Result<()> {
    let db = DbDir::new(dir, &spec.name);
    if db.0.exists() {
        bail!("database {:?} already exists", spec.name);
    }
    std::fs::create_dir_all(&db.0).with_context(|| format!("creating {}", db.0.display()))?;
    record::write_json(&db.spec_path(), &spec)?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = db.status()? {
            match status.phase {
                Phase::Ready => break,
                Phase::Failed => bail!(
                    "database {} could not be created: {} (remove it with `strata db rm {}`)",
                    spec.name,
                    status.message.as_deref().unwrap_or("unknown error"),
                    spec.name
                ),
                _ => {}
            }
        }
        if Instant::now() > deadline {
            let detail = db
                .status()?
                .and_then(|s| s.message)
                .map(|m| format!(": {m}"))
                .unwrap_or_default();
            bail!(
                "database {} was not ready within {timeout:?}{detail} (see `strata db describe {}`)",
                spec.name,
                spec.name
            );
        }
        wait_a_little(dir).await?;
    }
    println!(
        "database {} is ready: {} instance{}, primary {}",
        spec.name,
        spec.instances.len(),
        if spec.instances.len() == 1 { "" } else { "s" },
        spec.instances[0].name
    );
    println!("read-write: {}", spec.uri(false));
    if spec.instances.len() > 1 {
        println!("read-only:  {}", spec.uri(true));
    }
    Ok(())
}

/// A pause in a wait for `strata up`'s controller, which must still run.
async fn wait_a_little(dir: &Path) -> anyhow::Result<()> {
    tokio::time::sleep(Duration::from_millis(200)).await;
    running_cluster(dir).map(|_| ())
}

/// The status, or why there is none to trust.
fn current_status(dir: &Path, db: &DbDir) -> anyhow::Result<(Option<DbStatus>, Option<String>)> {
    let status = db.status()?;
    let up = ClusterFile::load_if_present(dir)?
        .and_then(|c| c.supervisor_pid)
        .filter(|pid| process_alive(*pid));
    let note = match (&status, up) {
        (_, None) => Some("strata up is not running: nothing runs".to_string()),
        (Some(s), Some(pid)) if s.supervisor_pid != pid => {
            Some("not yet picked up by the running strata up".to_string())
        }
        _ => None,
    };
    Ok((status, note))
}

fn list(dir: &Path) -> anyhow::Result<()> {
    println!(
        "{:<16} {:<12} {:>9} {:<16} {:<8} READ-WRITE",
        "NAME", "PHASE", "READY", "PRIMARY", "SYNC"
    );
    for name in record::database_names(dir)? {
        let db = DbDir::new(dir, &name);
        let spec = db.spec()?;
        let (status, note) = current_status(dir, &db)?;
        let phase = match (&status, &note) {
            (_, Some(_)) => "stopped".to_string(),
            (Some(s), None) => s.phase.to_string(),
            (None, None) => "pending".to_string(),
        };
        let ready = status
            .as_ref()
            .map_or(0, |s| s.instances.iter().filter(|i| i.ready).count());
        println!(
            "{:<16} {:<12} {:>9} {:<16} {:<8} 127.0.0.1:{}",
            name,
            phase,
            format!("{ready}/{}", spec.instances.len()),
            status
                .as_ref()
                .and_then(|s| s.primary.clone())
                .unwrap_or("-".into()),
            if spec.sync_replicas > 0 {
                "sync"
            } else {
                "async"
            },
            spec.rw_port
        );
    }
    Ok(())
}

fn describe(dir: &Path, name: &str) -> anyhow::Result<()> {
    let db = existing(dir, name)?;
    let spec = db.spec()?;
    let (status, note) = current_status(dir, &db)?;
    println!("Name:        {}", spec.name);
    match (&status, &note) {
        (_, Some(note)) => println!("Phase:       unknown ({note})"),
        (Some(s), None) => println!("Phase:       {}", s.phase),
        (None, None) => println!("Phase:       pending"),
    }
    let primary = status.as_ref().and_then(|s| s.primary.clone());
    println!("Primary:     {}", primary.as_deref().unwrap_or("-"));
    println!(
        "Replication: {}",
        if spec.sync_replicas > 0 {
            format!("synchronous (ANY {})", spec.sync_replicas)
        } else {
            "asynchronous".into()
        }
    );
    println!(
        "Volumes:     {} each, {} replica{}",
        strata_node::pool::human(spec.size_bytes),
        spec.volume_replicas,
        if spec.volume_replicas == 1 { "" } else { "s" }
    );
    println!("Read-write:  127.0.0.1:{}", spec.rw_port);
    println!("Read-only:   127.0.0.1:{}", spec.ro_port);
    if let Some(s) = &status {
        println!("Failovers:   {}", s.failovers);
        if let Some(message) = &s.message {
            println!("Message:     {message}");
        }
    }
    println!("Instances:");
    println!(
        "  {:<14} {:<8} {:<6} {:<8} {:<8} {:>4} {:<14} {:>10} {:<12}",
        "NAME", "ROLE", "READY", "NODE", "PID", "TL", "LSN", "LAG", "DEVICE"
    );
    for instance in &spec.instances {
        let observed = status
            .as_ref()
            .filter(|_| note.is_none())
            .and_then(|s| s.instances.iter().find(|i| i.name == instance.name));
        let dash = || "-".to_string();
        let role = match observed.and_then(|i| i.role) {
            Some(Role::Primary) => "primary",
            Some(Role::Replica) => "replica",
            None => "-",
        };
        println!(
            "  {:<14} {:<8} {:<6} {:<8} {:<8} {:>4} {:<14} {:>10} {:<12}",
            instance.name,
            role,
            if observed.is_some_and(|i| i.ready) {
                "yes"
            } else {
                "no"
            },
            observed.map_or(&instance.node, |i| &i.node),
            observed
                .and_then(|i| i.pid)
                .map_or_else(dash, |p| p.to_string()),
            observed
                .and_then(|i| i.timeline)
                .map_or_else(dash, |t| t.to_string()),
            observed.and_then(|i| i.lsn.clone()).unwrap_or_else(dash),
            observed
                .and_then(|i| i.lag_bytes)
                .map_or_else(dash, strata_node::pool::human),
            observed.and_then(|i| i.device.clone()).unwrap_or_else(dash),
        );
    }
    Ok(())
}

async fn switchover(dir: &Path, name: &str, to: Option<String>) -> anyhow::Result<()> {
    running_cluster(dir)?;
    let db = existing(dir, name)?;
    let spec = db.spec()?;
    if let Some(to) = &to {
        spec.instance(to)?;
    }
    if db.switchover_path().exists() {
        bail!("a switchover of {name} is already under way");
    }
    let id = generate_password();
    record::write_json(
        &db.switchover_path(),
        &SwitchoverRequest {
            id: id.clone(),
            to: to.clone(),
        },
    )?;
    // The controller allows the new primary a minute to catch up.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = db
            .status()?
            .and_then(|s| s.last_switchover)
            .filter(|s| s.id == id);
        if let Some(result) = done {
            if let Some(error) = result.error {
                bail!("switchover of {name} failed: {error}");
            }
            println!(
                "switched over: {} is the primary of {name}",
                result.to.as_deref().unwrap_or("?")
            );
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = std::fs::remove_file(db.switchover_path());
            bail!("switchover of {name} did not finish within 120 s");
        }
        wait_a_little(dir).await?;
    }
}

async fn remove(dir: &Path, name: &str) -> anyhow::Result<()> {
    running_cluster(dir)?;
    let db = existing(dir, name)?;
    std::fs::write(db.deleting_path(), b"")
        .with_context(|| format!("writing {}", db.deleting_path().display()))?;
    let deadline = Instant::now() + Duration::from_secs(180);
    while db.0.exists() {
        if Instant::now() > deadline {
            let message = db.status()?.and_then(|s| s.message).unwrap_or_default();
            bail!("database {name} was not removed within 180 s: {message}");
        }
        wait_a_little(dir).await?;
    }
    println!("deleted database {name} and its volumes");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_node::cluster::NodeEntry;

    fn cluster(nodes: usize) -> ClusterFile {
        let addr: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        ClusterFile {
            supervisor_pid: None,
            nodes: (1..=nodes)
                .map(|i| NodeEntry {
                    name: format!("node-{i}"),
                    zone: "zone-a".into(),
                    grpc: addr,
                    nbd: addr,
                    http: addr,
                    replication: None,
                    pool: format!("/p{i}").into(),
                    pid: None,
                })
                .collect(),
        }
    }

    #[test]
    fn a_plan_spreads_instances_over_nodes_with_distinct_ports() {
        let spec = plan(&cluster(2), "orders", 3, "1GiB", true, None).unwrap();
        let nodes: Vec<&str> = spec.instances.iter().map(|i| i.node.as_str()).collect();
        assert_eq!(nodes, ["node-1", "node-2", "node-1"]);
        assert_eq!(spec.volume_replicas, 2);
        assert_eq!(spec.sync_replicas, 1);
        assert_eq!(spec.instances[2].volume, "db-orders-3");
        let mut ports: Vec<u16> = spec
            .instances
            .iter()
            .flat_map(|i| [i.pg_port, i.api_port])
            .chain([spec.rw_port, spec.ro_port])
            .collect();
        ports.sort();
        ports.dedup();
        assert_eq!(ports.len(), 8);
        assert!(spec
            .uri(false)
            .ends_with(&format!("@127.0.0.1:{}/app", spec.rw_port)));
    }

    #[test]
    fn bad_requests_are_refused_with_the_reason() {
        let c = cluster(3);
        let err = |r: anyhow::Result<DbSpec>| r.unwrap_err().to_string();
        assert!(err(plan(&c, "x", 0, "1GiB", false, None)).contains("--instances"));
        assert!(err(plan(&c, "x", 1, "big", false, None)).contains("invalid --size"));
        assert!(err(plan(&c, "x", 1, "1MiB", false, None)).contains("too small"));
        assert!(err(plan(&c, "x", 1, "1GiB", true, None)).contains("--sync"));
        assert!(err(plan(&c, "x", 1, "1GiB", false, Some(4))).contains("--volume-replicas"));
        for name in ["", "Upper", "1st", "a_b", "trailing-", &"a".repeat(41)] {
            assert!(err(plan(&c, name, 1, "1GiB", false, None)).contains("invalid database name"));
        }
        assert!(plan(&c, "a-1", 1, "1GiB", false, None).is_ok());
    }
}
