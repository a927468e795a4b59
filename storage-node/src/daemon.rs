//! The storage node process: opens the pool and serves NBD, gRPC and HTTP
//! until SIGTERM or SIGINT, then makes every completed write durable and exits.
//!
//! Both `strata-node` and `strata node serve` run this, with the same flags.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytesize::ByteSize;
use strata_proto::storage::storage_node_server::StorageNodeServer;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::cluster::Discovery;
use crate::engine::EngineKind;
use crate::grpc::{ControlService, NodeIdentity, RunToCompletion};
use crate::metrics::Metrics;
use crate::nbd::NbdServer;
use crate::pool::{Pool, PoolOptions};
use crate::registry::NodeRegistry;
use crate::replication::{self, Replicas, TargetOptions};

/// How long a stopping node waits for clients to finish before closing them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Flags of a storage node.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeArgs {
    /// Name of this node, unique in the cluster.
    #[arg(long, env = "STRATA_NODE_NAME")]
    pub name: String,
    /// Failure domain of this node (topology.strata.io/zone).
    #[arg(long, default_value = "default")]
    pub zone: String,
    /// Pool device or file. A file is created with --pool-size when absent.
    #[arg(long)]
    pub pool: PathBuf,
    /// Size of a new pool file, e.g. 10GiB.
    #[arg(long)]
    pub pool_size: Option<ByteSize>,
    /// Zero-fill a new pool file so writes never land in holes of a sparse
    /// file (faster writes under io_uring; costs the file's size once).
    #[arg(long)]
    pub preallocate: bool,
    /// Volumes may be provisioned up to this percent of the pool's data space.
    #[arg(long, default_value_t = 200)]
    pub overcommit_percent: u32,
    /// I/O engine: auto (io_uring when available), io_uring, or sync (pread/pwrite).
    #[arg(long, default_value = "auto")]
    pub io_engine: EngineKind,
    /// Address of the gRPC control API.
    #[arg(long, default_value = "127.0.0.1:7400")]
    pub grpc_listen: SocketAddr,
    /// Address of the NBD server.
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub nbd_listen: SocketAddr,
    /// Address of the replication endpoint, where volume targets reach this
    /// node's replicas.
    #[arg(long, default_value = "127.0.0.1:7410")]
    pub replication_listen: SocketAddr,
    /// How long a replica may take to answer a volume target before the
    /// target drops it from the in-sync set, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub replica_timeout_ms: u64,
    /// Bytes per second a rebuild may copy to a replica, or a scrub read,
    /// e.g. 200MiB (0: no limit).
    #[arg(long, default_value = "256MiB")]
    pub rebuild_rate: ByteSize,
    /// Seconds between scrub passes over each volume this node serves
    /// (0: no scrub).
    #[arg(long, default_value_t = 86400)]
    pub scrub_interval_secs: u64,
    /// Seconds a replica may stay faulted (unreachable, or failing) before
    /// the volume target replaces it by a new one on another node (0:
    /// never). Needs --cluster-dir or --storage-nodes to find that node.
    #[arg(long, default_value_t = 600)]
    pub replace_faulted_after_secs: u64,
    /// Directory of the cluster file that lists the storage nodes, as
    /// `strata up --dir` writes it (for automatic replacement).
    #[arg(long, conflicts_with = "storage_nodes")]
    pub cluster_dir: Option<PathBuf>,
    /// gRPC addresses of the storage nodes, host:port, comma-separated; a
    /// host name standing for many nodes (the headless Service in
    /// Kubernetes) is resolved on every use (for automatic replacement).
    #[arg(long, value_delimiter = ',')]
    pub storage_nodes: Vec<String>,
    /// Address of /metrics and /healthz.
    #[arg(long, default_value = "127.0.0.1:7480")]
    pub http_listen: SocketAddr,
    /// Host name or address that clients should use for NBD (default: the NBD listen address).
    #[arg(long)]
    pub advertise_host: Option<String>,
    /// Threads serving NBD connections and replication connections from
    /// other nodes' targets, each connection wholly on one of them (default:
    /// half the CPUs, at least 1, at most 8).
    #[arg(long)]
    pub nbd_threads: Option<usize>,
}

/// Single-threaded runtimes that NBD and replication connections are spread over.
struct ConnectionThreads {
    handles: Vec<tokio::runtime::Handle>,
    stop: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl ConnectionThreads {
    fn start(count: usize) -> anyhow::Result<ConnectionThreads> {
        let (stop, stop_rx) = watch::channel(false);
        let mut handles = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        for i in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting an NBD connection runtime")?;
            handles.push(runtime.handle().clone());
            let mut stop_rx = stop_rx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("strata-nbd-{i}"))
                    .spawn(move || {
                        // Requests from this thread's connections go to io_uring
                        // rings of its own: no thread hop per request.
                        crate::engine::use_thread_local_rings();
                        runtime.block_on(async move {
                            let _ = stop_rx.wait_for(|stop| *stop).await;
                        })
                    })?,
            );
        }
        Ok(ConnectionThreads {
            handles,
            stop,
            threads,
        })
    }

    fn stop(self) {
        let _ = self.stop.send(true);
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

fn default_nbd_threads() -> usize {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    (cpus / 2).clamp(1, 8)
}

/// Where targets find the other nodes (to delete the replicas they
/// replaced), and when they replace faulted replicas on their own; None when
/// the node does not know where the others are.
fn replacement(args: &NodeArgs) -> Option<replication::target::Replacement> {
    let discovery = match (&args.cluster_dir, args.storage_nodes.is_empty()) {
        (Some(dir), _) => Discovery::ClusterDir(dir.clone()),
        (None, false) => Discovery::Addresses(args.storage_nodes.clone()),
        (None, true) => {
            tracing::info!(
                "automatic replacement of faulted replicas, and the deletion of replaced ones, \
                 is off: no --cluster-dir or --storage-nodes to find other nodes"
            );
            return None;
        }
    };
    Some(replication::target::Replacement::new(
        (args.replace_faulted_after_secs > 0)
            .then(|| Duration::from_secs(args.replace_faulted_after_secs)),
        discovery,
    ))
}

/// Logs to stderr, `info` unless RUST_LOG says otherwise.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Runs the node until SIGTERM or SIGINT.
pub fn main_with(args: NodeArgs) -> anyhow::Result<()> {
    init_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run(args, termination()))
}

/// Resolves at the first SIGTERM or SIGINT: how Strata's daemons learn to stop.
pub async fn termination() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

pub async fn run(args: NodeArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let options = PoolOptions {
        engine: args.io_engine,
        name: args.name.clone(),
        create_size: args.pool_size.map(|s| s.as_u64()),
        overcommit_percent: args.overcommit_percent,
        preallocate: args.preallocate,
    };
    let pool = Pool::open(&args.pool, &options, metrics)
        .await
        .with_context(|| format!("opening pool {}", args.pool.display()))?;

    let bind = |addr: SocketAddr, what: &'static str| async move {
        TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the {what} address {addr}"))
    };
    let nbd_listener = bind(args.nbd_listen, "NBD").await?;
    let grpc_listener = bind(args.grpc_listen, "gRPC").await?;
    let http_listener = bind(args.http_listen, "HTTP").await?;
    let replication_listener = bind(args.replication_listen, "replication").await?;
    let nbd_addr = nbd_listener.local_addr()?;
    let host = args
        .advertise_host
        .clone()
        .unwrap_or_else(|| nbd_addr.ip().to_string());
    let identity = NodeIdentity {
        name: args.name.clone(),
        zone: args.zone.clone(),
        nbd_address: format!("{host}:{}", nbd_addr.port()),
        replication_address: format!("{host}:{}", replication_listener.local_addr()?.port()),
    };
    let replicas = Replicas::load(pool.clone())
        .await
        .context("loading replicas")?;
    let registry = NodeRegistry::new(pool.clone());

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let connection_threads =
        ConnectionThreads::start(args.nbd_threads.unwrap_or_else(default_nbd_threads).max(1))?;
    let nbd = Arc::new(
        NbdServer::new(registry.clone())
            .with_shutdown_grace(SHUTDOWN_GRACE)
            .with_connection_runtimes(connection_threads.handles.clone())
            .with_bulk_runtime(tokio::runtime::Handle::current()),
    );
    let nbd_task = tokio::spawn(nbd.serve(nbd_listener, stopped(stop_rx.clone())));
    let replication_task = tokio::spawn(replication::server::serve(
        replication_listener,
        replicas.clone(),
        connection_threads.handles.clone(),
        stopped(stop_rx.clone()),
    ));
    let target_options = TargetOptions {
        node: args.name.clone(),
        timeout: Duration::from_millis(args.replica_timeout_ms.max(1)),
        rebuild_rate: args.rebuild_rate.as_u64(),
        scrub_interval: Duration::from_secs(args.scrub_interval_secs),
        replacement: replacement(&args),
        link_runtimes: connection_threads.handles.clone(),
    };
    // Serving volumes again after a restart; in the background, because
    // the replicas' nodes may be starting too.
    tokio::spawn({
        let registry = registry.clone();
        let replicas = replicas.clone();
        let options = target_options.clone();
        async move { registry.reopen_recorded(replicas, options).await }
    });
    let grpc_task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RunToCompletion(StorageNodeServer::new(
                ControlService::new(
                    identity.clone(),
                    replicas.clone(),
                    registry.clone(),
                    target_options,
                ),
            )))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(grpc_listener),
                stopped(stop_rx.clone()),
            ),
    );
    let http_server = axum::serve(http_listener, crate::http::router(pool.clone()))
        .with_graceful_shutdown(stopped(stop_rx.clone()));
    let http_task = tokio::spawn(async move { http_server.await });
    tracing::info!(
        node = %args.name,
        zone = %args.zone,
        nbd = %nbd_addr,
        replication = %identity.replication_address,
        grpc = %args.grpc_listen,
        http = %args.http_listen,
        engine = pool.engine_name(),
        "storage node ready"
    );

    shutdown.await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    replication_task.abort();
    // Servers drain their connections, but an idle or stuck client must not
    // hold the node up: past the grace period the servers are dropped.
    let (nbd_abort, grpc_abort, http_abort) = (
        nbd_task.abort_handle(),
        grpc_task.abort_handle(),
        http_task.abort_handle(),
    );
    let drained = tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(1), async {
        tokio::join!(nbd_task, grpc_task, http_task)
    })
    .await;
    // Any connection still open past the grace period is dropped with its thread.
    tokio::task::spawn_blocking(move || connection_threads.stop())
        .await
        .context("stopping NBD threads")?;
    // Writes that completed but were never flushed become durable on a clean stop.
    let committed = pool.close().await.context("final commit");
    match drained {
        Ok((nbd, grpc, http)) => {
            nbd?.context("NBD server")?;
            grpc?.context("gRPC server")?;
            http?.context("HTTP server")?;
        }
        Err(_) => {
            tracing::warn!(?SHUTDOWN_GRACE, "connections still open; closing them");
            nbd_abort.abort();
            grpc_abort.abort();
            http_abort.abort();
        }
    }
    committed?;
    tracing::info!("stopped cleanly");
    Ok(())
}
