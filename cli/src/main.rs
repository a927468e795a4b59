//! strata: the admin CLI of Strata, and `strata up`, the whole system on one machine.

use strata_node::cluster;
mod db;
mod node;
mod ports;
mod snapshot;
mod up;
mod volume;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "strata",
    version,
    about = "Replicated block storage and managed PostgreSQL for bare-metal Kubernetes"
)]
struct Cli {
    /// Directory of the local cluster (written by `strata up`).
    #[arg(long, global = true, default_value = ".strata", env = "STRATA_DIR")]
    dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole system on this machine, in the foreground, until Ctrl-C.
    Up(up::UpArgs),
    /// Manage volumes.
    #[command(subcommand)]
    Volume(volume::VolumeCommand),
    /// Storage nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Snapshots of volumes.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Managed PostgreSQL on Strata volumes, run by `strata up`.
    #[command(subcommand)]
    Db(db::DbCommand),
}

#[derive(Subcommand)]
enum NodeCommand {
    /// List the storage nodes with their state and capacity.
    Ls,
    /// Stop a node of the local cluster; `strata up` keeps it down until
    /// `strata node start`.
    Stop {
        name: String,
        /// SIGKILL, as in a crash, instead of a clean stop.
        #[arg(long)]
        kill: bool,
    },
    /// Start a node stopped with `strata node stop`.
    Start { name: String },
    /// Run a storage node in the foreground (what `strata up` starts).
    Serve(Box<strata_node::daemon::NodeArgs>),
}

fn main() {
    // Die quietly on a closed pipe (`strata volume ls | head -1`), as Unix
    // tools do, instead of panicking in println!.
    // SAFETY: restoring a signal's default disposition before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    if let Command::Node(NodeCommand::Serve(args)) = cli.command {
        // The node builds its own multi-threaded runtime.
        if let Err(err) = strata_node::daemon::main_with(*args) {
            eprintln!("error: {err:#}");
            std::process::exit(1);
        }
        return;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(err) = runtime.block_on(run(cli)) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Up(args) => up::up(&cli.dir, args).await,
        Command::Volume(command) => {
            let cluster = cluster::ClusterFile::load(&cli.dir)?;
            volume::run(&cluster, command).await
        }
        Command::Node(NodeCommand::Ls) => {
            let cluster = cluster::ClusterFile::load(&cli.dir)?;
            node::list(&cluster).await
        }
        Command::Node(NodeCommand::Stop { name, kill }) => {
            let cluster = cluster::ClusterFile::load(&cli.dir)?;
            node::stop(&cli.dir, &cluster, &name, kill).await
        }
        Command::Node(NodeCommand::Start { name }) => {
            let cluster = cluster::ClusterFile::load(&cli.dir)?;
            node::start(&cli.dir, &cluster, &name).await
        }
        Command::Db(command) => db::run(&cli.dir, command).await,
        Command::Node(NodeCommand::Serve(_)) => unreachable!("handled in main"),
        Command::Snapshot(command) => {
            let cluster = cluster::ClusterFile::load(&cli.dir)?;
            snapshot::run(&cluster, command).await
        }
    }
}
