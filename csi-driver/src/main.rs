//! strata-csi: the CSI driver binary (the controller Deployment and the node
//! DaemonSet both run it, with --mode controller or --mode node).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use strata_csi::backend::{ClusterBackend, Discovery};
use strata_csi::node::NodeConfig;
use strata_csi::server::{self, Services};

#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
enum Mode {
    Controller,
    Node,
    All,
}

#[derive(Parser)]
#[command(name = "strata-csi", version, about = "Strata's CSI driver")]
struct Cli {
    /// Which CSI services to serve (Identity is always served).
    #[arg(long, value_enum, env = "CSI_MODE")]
    mode: Mode,
    /// The socket to serve on, unix:///path/csi.sock.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// This node's id for the CO; node and all modes. It must be the name
    /// of the storage node on this machine (in Kubernetes both are the
    /// Kubernetes node name), because the controller opens volume targets
    /// on the storage node named by the CSI node id.
    #[arg(long, env = "CSI_NODE_ID")]
    node_id: Option<String>,
    /// This node's zone, reported as topology.strata.io/zone.
    #[arg(long, env = "CSI_ZONE", default_value = "default")]
    zone: String,
    /// Directory holding the cluster file (cluster.json) that lists the
    /// storage nodes, as `strata up --dir` writes it; controller and all
    /// modes, instead of --storage-nodes.
    #[arg(long, env = "STRATA_DIR", conflicts_with = "storage_nodes")]
    dir: Option<PathBuf>,
    /// gRPC addresses of the storage nodes, host:port, comma-separated; a
    /// host name standing for many nodes (a headless Service) is resolved
    /// on every call. Controller and all modes, instead of --dir.
    #[arg(long, env = "STRATA_STORAGE_NODES", value_delimiter = ',')]
    storage_nodes: Vec<String>,
    /// Where the node plugin records what it attached and mounted.
    #[arg(long, env = "CSI_STATE_DIR", default_value = "/var/lib/strata-csi")]
    state_dir: PathBuf,
    /// Volumes the CO may publish on this node (0: no limit).
    #[arg(long, default_value_t = 0)]
    max_volumes: i64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    strata_node::daemon::init_logging();
    let cli = Cli::parse();
    let controller = match cli.mode {
        Mode::Controller | Mode::All => {
            let discovery = match (&cli.dir, cli.storage_nodes.is_empty()) {
                (Some(dir), _) => Discovery::ClusterDir(dir.clone()),
                (None, false) => Discovery::Addresses(cli.storage_nodes.clone()),
                (None, true) => anyhow::bail!(
                    "--dir or --storage-nodes is required with --mode controller or all"
                ),
            };
            Some(Arc::new(ClusterBackend::new(discovery)) as Arc<_>)
        }
        Mode::Node => None,
    };
    let node = match cli.mode {
        Mode::Node | Mode::All => Some(NodeConfig {
            node_id: cli
                .node_id
                .clone()
                .filter(|id| !id.is_empty())
                .context("--node-id is required with --mode node or all")?,
            zone: cli.zone.clone(),
            max_volumes: cli.max_volumes,
            state_dir: cli.state_dir.clone(),
        }),
        Mode::Controller => None,
    };
    let path = server::socket_path(&cli.endpoint)?;
    let listener = server::bind(&path)?;
    tracing::info!(mode = ?cli.mode, socket = %path.display(), "strata-csi serving");
    server::serve(
        listener,
        Services { controller, node },
        strata_node::daemon::termination(),
    )
    .await?;
    let _ = std::fs::remove_file(&path);
    Ok(())
}
