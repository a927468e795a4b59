//! strata-node: a Strata storage node (what the storage-node DaemonSet runs).

use clap::Parser;

#[derive(Parser)]
#[command(name = "strata-node", version, about = "A Strata storage node")]
struct Cli {
    #[command(flatten)]
    node: strata_node::daemon::NodeArgs,
}

fn main() -> anyhow::Result<()> {
    strata_node::daemon::main_with(Cli::parse().node)
}
