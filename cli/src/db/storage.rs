//! The data volume of a local instance — the local stand-in for its PVC: a
//! replicated Strata volume, its target opened on the instance's node,
//! attached as a block device by the CSI driver's attacher (kernel nbd, or
//! nbdfuse + a loop device), formatted when blank and mounted in the
//! instance's folder. What was attached is recorded next to the mount point,
//! so a later `strata up` takes down what a crash left behind.

use std::path::{Path, PathBuf};

use anyhow::Context;
use strata_csi::attach::{Attacher, Attachment};
use strata_csi::mount;
use strata_node::cluster::volumes::{self, Placement, VolumeError};
use strata_node::cluster::ClusterFile;

use super::record::{self, DbDir, DbSpec, InstanceSpec};

const FS_TYPE: &str = "ext4";

/// A volume attached and mounted for one instance.
#[derive(Debug, Clone)]
pub struct MountedVolume {
    pub attachment: Attachment,
    pub mount_point: PathBuf,
    /// The storage node whose target serves it.
    pub node: String,
}

impl MountedVolume {
    /// PostgreSQL's data directory, inside the volume (its root holds lost+found).
    pub fn data_dir(&self) -> PathBuf {
        self.mount_point.join("pgdata")
    }
}

fn attachment_record(db: &DbDir, instance: &str) -> PathBuf {
    db.instance_dir(instance).join("attachment.json")
}

pub fn mount_point(db: &DbDir, instance: &str) -> PathBuf {
    db.instance_dir(instance).join("volume")
}

/// Creates the instance's volume unless it exists.
pub async fn ensure_volume(
    cluster: &ClusterFile,
    spec: &DbSpec,
    instance: &InstanceSpec,
) -> anyhow::Result<()> {
    match volumes::get(cluster, &instance.volume).await {
        Ok(_) => Ok(()),
        Err(VolumeError::NotFound(_)) => {
            let placement = Placement {
                replicas: spec.volume_replicas,
                zones: Vec::new(),
                preferred_node: Some(instance.node.clone()),
            };
            volumes::create(cluster, &instance.volume, spec.size_bytes, &placement)
                .await
                .with_context(|| format!("creating volume {}", instance.volume))?;
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("looking up volume {}", instance.volume)),
    }
}

/// Opens the volume's target (on the instance's node while it answers),
/// attaches it, formats it when blank and mounts it.
pub async fn attach_and_mount(
    cluster: &ClusterFile,
    attacher: &Attacher,
    db: &DbDir,
    instance: &InstanceSpec,
) -> anyhow::Result<MountedVolume> {
    let mount_point = mount_point(db, &instance.name);
    std::fs::create_dir_all(&mount_point)
        .with_context(|| format!("creating {}", mount_point.display()))?;
    // What a crash (of `strata up`, or of the machine) left: mounts over a
    // connection that is gone serve only I/O errors.
    detach_recorded(attacher, db, &instance.name).await?;
    mount::unmount(&mount_point).await?;
    let (node, target) = match volumes::open_target(cluster, &instance.volume, Some(&instance.node))
        .await
    {
        Ok(opened) => opened,
        // The instance's node is down: serve the volume from another one.
        Err(VolumeError::Unavailable(_)) => volumes::open_target(cluster, &instance.volume, None)
            .await
            .with_context(|| format!("opening volume {}", instance.volume))?,
        Err(e) => return Err(e).with_context(|| format!("opening volume {}", instance.volume)),
    };
    let attachment = attacher
        .attach(&instance.volume, &target.export_uri)
        .await
        .with_context(|| format!("attaching {}", target.export_uri))?;
    if let Err(err) = record::write_json(&attachment_record(db, &instance.name), &attachment) {
        let _ = attacher.detach(&attachment).await;
        return Err(err);
    }
    let device = attachment.device();
    match mount::probe(device).await? {
        mount::Contents::Blank => mount::format(device, FS_TYPE).await?,
        mount::Contents::Filesystem(_) => {}
        mount::Contents::PartitionTable(table) => anyhow::bail!(
            "volume {} holds a {table} partition table and no filesystem; not formatted over",
            instance.volume
        ),
    }
    mount::mount(device, &mount_point, FS_TYPE, &[]).await?;
    Ok(MountedVolume {
        attachment,
        mount_point,
        node: node.name,
    })
}

/// Unmounts and detaches; the volume itself stays on the storage nodes.
pub async fn unmount_and_detach(
    attacher: &Attacher,
    db: &DbDir,
    instance: &str,
    volume: &MountedVolume,
) -> anyhow::Result<()> {
    mount::unmount(&volume.mount_point).await?;
    attacher.detach(&volume.attachment).await?;
    let _ = std::fs::remove_file(attachment_record(db, instance));
    Ok(())
}

/// Deletes the instance's volume from the storage nodes; gone already is
/// fine. While a node holding one of its replicas is down nothing is
/// deleted (it would stay behind on that node, unseen), and the caller retries.
pub async fn delete_volume(cluster: &ClusterFile, volume: &str) -> anyhow::Result<()> {
    let report = match volumes::get(cluster, volume).await {
        Ok(report) => report,
        Err(VolumeError::NotFound(_)) => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("deleting volume {volume}")),
    };
    if !report.missing.is_empty() {
        let nodes: Vec<&str> = report.missing.iter().map(|m| m.node.as_str()).collect();
        anyhow::bail!(
            "volume {volume} has replicas on {}, which do not answer; waiting for them",
            nodes.join(", ")
        );
    }
    volumes::delete(cluster, volume)
        .await
        .with_context(|| format!("deleting volume {volume}"))
}

/// Takes down the attachment recorded for `instance`, if any.
pub async fn detach_recorded(
    attacher: &Attacher,
    db: &DbDir,
    instance: &str,
) -> anyhow::Result<()> {
    let path = attachment_record(db, instance);
    if let Some(stale) = record::read_json_if_present::<Attachment>(&path)? {
        mount::unmount(&mount_point(db, instance)).await?;
        attacher.detach(&stale).await?;
        std::fs::remove_file(path)?;
    }
    Ok(())
}

/// The device path as text, for status.
pub fn device_name(volume: &MountedVolume) -> String {
    let device: &Path = volume.attachment.device();
    device.display().to_string()
}
