//! strata-instance: the entrypoint of a PostgreSQL container. See
//! `strata_operator::instance` for what it does.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use strata_operator::instance::{
    api, user_password_env, AppDatabase, DeclaredDatabase, DeclaredUser, InstanceConfig,
    InstanceManager,
};
use strata_operator::instance_api::PrimaryAddress;
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser, Debug)]
#[command(about = "Supervises one PostgreSQL instance of a Strata PostgresCluster")]
struct Args {
    /// This instance's name (unique in the cluster).
    #[arg(long, env = "STRATA_INSTANCE_NAME")]
    name: String,
    #[arg(long, env = "PGDATA")]
    data_dir: PathBuf,
    /// Folder for postgres's unix socket [default: DATA_DIR/../run].
    #[arg(long)]
    socket_dir: Option<PathBuf>,
    #[arg(long, default_value = "/usr/lib/postgresql/15/bin")]
    pg_bin: PathBuf,
    /// postgres's listen_addresses.
    #[arg(long, default_value = "*")]
    listen_address: String,
    #[arg(long, default_value_t = 5432)]
    port: u16,
    /// Address of the HTTP API.
    #[arg(long, default_value = "0.0.0.0:8000")]
    api_listen: SocketAddr,
    /// OS user postgres runs as when started as root.
    #[arg(long)]
    run_as: Option<String>,
    /// All instance names of the cluster, this one included (comma separated).
    #[arg(long, value_delimiter = ',')]
    peers: Vec<String>,
    /// How many standbys confirm each commit.
    #[arg(long, default_value_t = 0)]
    sync_replicas: u32,
    /// Be a replica of HOST:PORT (bootstrap with pg_basebackup, or pg_rewind a former
    /// primary); without it an empty data directory becomes a new primary.
    #[arg(long)]
    primary: Option<String>,
    #[arg(long, env = "STRATA_SUPERUSER_PASSWORD", hide_env_values = true)]
    superuser_password: String,
    #[arg(long, env = "STRATA_REPLICATION_PASSWORD", hide_env_values = true)]
    replication_password: String,
    /// Application database created with a new cluster.
    #[arg(long, default_value = "app")]
    app_database: String,
    #[arg(long, default_value = "app")]
    app_owner: String,
    #[arg(long, env = "STRATA_APP_PASSWORD", hide_env_values = true)]
    app_password: Option<String>,
    /// A role to create on the primary, NAME or NAME:OPTION,OPTION (repeatable);
    /// its password comes from STRATA_USER_PASSWORD_<NAME>.
    #[arg(long = "user")]
    users: Vec<String>,
    /// A database to create on the primary, NAME:OWNER (repeatable).
    #[arg(long = "database")]
    databases: Vec<String>,
    /// Extra postgresql.conf setting KEY=VALUE (repeatable).
    #[arg(long = "param")]
    params: Vec<String>,
}

fn parse_primary(text: &str) -> anyhow::Result<PrimaryAddress> {
    let (host, port) = text
        .rsplit_once(':')
        .with_context(|| format!("--primary {text:?} is not HOST:PORT"))?;
    Ok(PrimaryAddress {
        host: host.to_string(),
        port: port
            .parse()
            .with_context(|| format!("--primary {text:?} has no port"))?,
    })
}

// One thread on purpose: PR_SET_PDEATHSIG fires when the *thread* that forked a
// child exits, so postgres must be spawned from a thread that lives as long as the
// process. A current-thread runtime spawns everything from the main thread.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut peers = args.peers.clone();
    if !peers.contains(&args.name) {
        peers.push(args.name.clone());
    }
    let mut parameters = Vec::new();
    for p in &args.params {
        let (k, v) = p
            .split_once('=')
            .with_context(|| format!("--param {p:?} is not KEY=VALUE"))?;
        parameters.push((k.trim().to_string(), v.trim().to_string()));
    }
    let mut users = Vec::new();
    for spec in &args.users {
        let (name, options) = spec.split_once(':').unwrap_or((spec.as_str(), ""));
        let env = user_password_env(name);
        let password = std::env::var(&env).with_context(|| format!("--user {name} needs {env}"))?;
        users.push(DeclaredUser {
            name: name.to_string(),
            options: options
                .split(',')
                .filter(|o| !o.is_empty())
                .map(str::to_string)
                .collect(),
            password,
        });
    }
    let mut databases = Vec::new();
    for spec in &args.databases {
        let (name, owner) = spec
            .split_once(':')
            .with_context(|| format!("--database {spec:?} is not NAME:OWNER"))?;
        databases.push(DeclaredDatabase {
            name: name.to_string(),
            owner: owner.to_string(),
        });
    }
    let socket_dir = match &args.socket_dir {
        Some(dir) => dir.clone(),
        None => args
            .data_dir
            .parent()
            .context("--data-dir has no parent folder")?
            .join("run"),
    };
    let config = InstanceConfig {
        name: args.name.clone(),
        data_dir: args.data_dir.clone(),
        socket_dir,
        pg_bin: args.pg_bin.clone(),
        listen_address: args.listen_address.clone(),
        port: args.port,
        api_listen: args.api_listen,
        run_as: args.run_as.clone(),
        peers,
        sync_replicas: args.sync_replicas,
        primary: args.primary.as_deref().map(parse_primary).transpose()?,
        superuser_password: args.superuser_password.clone(),
        replication_password: args.replication_password.clone(),
        app: args.app_password.clone().map(|password| AppDatabase {
            database: args.app_database.clone(),
            owner: args.app_owner.clone(),
            password,
        }),
        users,
        databases,
        parameters,
    };

    let (manager, mut crashes) = InstanceManager::new(config)?;
    // Signals are set up before postgres starts so none is lost during bootstrap.
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;

    let listener = tokio::net::TcpListener::bind(args.api_listen)
        .await
        .with_context(|| format!("binding the API to {}", args.api_listen))?;
    let router = api::router(manager.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "API server stopped");
        }
    });

    tokio::select! {
        result = manager.bootstrap_and_start() => result.context("bootstrap")?,
        _ = sigterm.recv() => return stop(&manager, "SIGTERM").await,
        _ = sigint.recv() => return stop(&manager, "SIGINT").await,
    }
    tracing::info!(name = manager.name(), "instance ready");

    let mut slot_check = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tokio::select! {
            // SIGTERM (Pod deletion) and SIGINT both become a fast shutdown: a smart
            // one waits for clients to leave and would outlast the grace period.
            _ = sigterm.recv() => return stop(&manager, "SIGTERM").await,
            _ = sigint.recv() => return stop(&manager, "SIGINT").await,
            Some(status) = crashes.recv() => {
                anyhow::bail!("postgres exited on its own ({status}); exiting so the instance restarts");
            }
            _ = slot_check.tick() => {
                if let Err(e) = manager.maintain().await {
                    tracing::warn!(error = %e, "upkeep (slots, declared roles and databases)");
                }
            }
        }
    }
}

async fn stop(manager: &InstanceManager, signal: &str) -> anyhow::Result<()> {
    tracing::info!(signal, "stopping postgres (fast shutdown)");
    manager.shutdown().await?;
    Ok(())
}
