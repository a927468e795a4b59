//! `strata volume ...`: create, list, resize, delete and export volumes.

use anyhow::bail;
use bytesize::ByteSize;
use strata_proto::storage::{CreateVolumeRequest, DeleteVolumeRequest, ResizeVolumeRequest};

use crate::client::{self, status_error};
use crate::cluster::ClusterFile;

#[derive(Debug, clap::Subcommand)]
pub enum VolumeCommand {
    /// Create a thin-provisioned volume.
    Create {
        name: String,
        /// Size, e.g. 1GiB or 512MiB.
        #[arg(long)]
        size: ByteSize,
        /// Node to place the volume on (default: the one with the most room).
        #[arg(long)]
        node: Option<String>,
    },
    /// List volumes on every node.
    Ls,
    /// Delete a volume and free its space.
    Rm { name: String },
    /// Grow a volume.
    Resize {
        name: String,
        #[arg(long)]
        size: ByteSize,
    },
    /// Print the volume's NBD URI.
    Export { name: String },
}

pub async fn run(cluster: &ClusterFile, command: VolumeCommand) -> anyhow::Result<()> {
    match command {
        VolumeCommand::Create { name, size, node } => create(cluster, &name, size, node).await,
        VolumeCommand::Ls => list(cluster).await,
        VolumeCommand::Rm { name } => {
            let (node, _) = client::find_volume(cluster, &name).await?;
            client::connect(&node)
                .await?
                .delete_volume(DeleteVolumeRequest { name: name.clone() })
                .await
                .map_err(status_error)?;
            println!("deleted volume {name} from {}", node.name);
            Ok(())
        }
        VolumeCommand::Resize { name, size } => {
            let (node, _) = client::find_volume(cluster, &name).await?;
            let volume = client::connect(&node)
                .await?
                .resize_volume(ResizeVolumeRequest {
                    name,
                    size_bytes: size.as_u64(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("volume {} is now {}", volume.name, human(volume.size_bytes));
            Ok(())
        }
        VolumeCommand::Export { name } => {
            let (_, volume) = client::find_volume(cluster, &name).await?;
            println!("{}", volume.export_uri);
            Ok(())
        }
    }
}

async fn create(
    cluster: &ClusterFile,
    name: &str,
    size: ByteSize,
    node: Option<String>,
) -> anyhow::Result<()> {
    if size.as_u64() == 0 {
        bail!("--size must be greater than zero");
    }
    // Names are unique across the cluster: an export name must find one volume.
    if let Some((holder, _)) = client::all_volumes(cluster)
        .await?
        .into_iter()
        .find(|(_, v)| v.name == name)
    {
        bail!("volume {name:?} already exists on {}", holder.name);
    }
    let target = match node {
        Some(node) => cluster.node(&node)?.clone(),
        None => {
            let mut best = None;
            for node in &cluster.nodes {
                let info = client::node_info(node).await?;
                let room = info
                    .provisionable_bytes
                    .saturating_sub(info.provisioned_bytes);
                if best.as_ref().is_none_or(|(_, r)| room > *r) {
                    best = Some((node.clone(), room));
                }
            }
            best.map(|(n, _)| n).expect("a cluster has nodes")
        }
    };
    let volume = client::connect(&target)
        .await?
        .create_volume(CreateVolumeRequest {
            name: name.to_string(),
            size_bytes: size.as_u64(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    println!(
        "created volume {} ({}) on {}",
        volume.name,
        human(volume.size_bytes),
        target.name
    );
    println!("export: {}", volume.export_uri);
    Ok(())
}

async fn list(cluster: &ClusterFile) -> anyhow::Result<()> {
    let mut volumes = client::all_volumes(cluster).await?;
    volumes.sort_by(|a, b| a.1.name.cmp(&b.1.name));
    println!(
        "{:<24} {:>10} {:>10} {:<8} EXPORT",
        "NAME", "SIZE", "ALLOCATED", "NODE"
    );
    for (node, v) in volumes {
        println!(
            "{:<24} {:>10} {:>10} {:<8} {}",
            v.name,
            human(v.size_bytes),
            human(v.allocated_bytes),
            node.name,
            v.export_uri
        );
    }
    Ok(())
}

pub use strata_node::pool::human;
