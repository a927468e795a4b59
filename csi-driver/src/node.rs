//! The CSI Node service: stage (attach the NBD export, format when blank,
//! mount), publish (bind mount, or the raw device bound onto a file), their
//! reverses, expansion and usage. Every step is recorded in the volume's
//! state file first, so a retried call or a restarted plugin picks up where
//! the last one stopped and never attaches a volume twice.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use strata_proto::csi::node_server::Node;
use strata_proto::csi::node_service_capability::{rpc::Type as RpcType, Rpc, Type};
use strata_proto::csi::volume_capability::AccessType;
use strata_proto::csi::*;
use tonic::{Request, Response, Status};

use crate::attach::{AttachError, Attacher};
use crate::controller::check_capability;
use crate::error::{CsiError, CsiResult};
use crate::inflight::InFlight;
use crate::mount;
use crate::state::{Access, StagedVolume, StateStore};
use crate::topology::zone_topology;
use crate::PUBLISH_CONTEXT_NBD_URI;

pub struct NodeConfig {
    pub node_id: String,
    pub zone: String,
    /// Volumes the CO may publish here (0: no limit).
    pub max_volumes: i64,
    pub state_dir: PathBuf,
}

pub struct NodeService {
    config: NodeConfig,
    state: StateStore,
    attacher: Attacher,
    inflight: InFlight,
}

impl From<AttachError> for CsiError {
    fn from(err: AttachError) -> CsiError {
        match err {
            AttachError::BadUri(_) => CsiError::InvalidArgument(err.to_string()),
            other => CsiError::Internal(format!("attaching the volume: {other}")),
        }
    }
}

fn require<'a>(value: &'a str, what: &str) -> CsiResult<&'a str> {
    if value.is_empty() {
        Err(CsiError::required(what))
    } else {
        Ok(value)
    }
}

fn absolute(path: &str, what: &str) -> CsiResult<PathBuf> {
    let path = PathBuf::from(require(path, what)?);
    if !path.is_absolute() {
        return Err(CsiError::invalid(format!(
            "{what} must be an absolute path"
        )));
    }
    Ok(path)
}

/// Volume ids name state files, so only the characters of Strata volume names pass.
fn volume_id(id: &str) -> CsiResult<&str> {
    require(id, "volume_id")?;
    strata_node::pool::validate_volume_name(id)
        .map_err(|_| CsiError::NotFound(format!("{id:?} is not a Strata volume id")))?;
    Ok(id)
}

fn capability(capability: Option<&VolumeCapability>) -> CsiResult<&VolumeCapability> {
    let capability = capability.ok_or_else(|| CsiError::required("volume_capability"))?;
    check_capability(capability)?;
    Ok(capability)
}

fn is_block(capability: &VolumeCapability) -> bool {
    matches!(capability.access_type, Some(AccessType::Block(_)))
}

/// The filesystem to create: the capability's, else the StorageClass's
/// fsType from the volume context, else ext4.
fn fs_type(capability: &VolumeCapability, context: &HashMap<String, String>) -> String {
    let from_capability = match &capability.access_type {
        Some(AccessType::Mount(m)) if !m.fs_type.is_empty() => Some(m.fs_type.clone()),
        _ => None,
    };
    from_capability
        .or_else(|| context.get("fsType").filter(|f| !f.is_empty()).cloned())
        .unwrap_or_else(|| "ext4".to_string())
}

fn mount_flags(capability: &VolumeCapability) -> Vec<String> {
    match &capability.access_type {
        Some(AccessType::Mount(m)) => m.mount_flags.clone(),
        _ => Vec::new(),
    }
}

impl NodeService {
    pub fn new(config: NodeConfig) -> std::io::Result<NodeService> {
        Ok(NodeService {
            state: StateStore::open(&config.state_dir)?,
            attacher: Attacher::new(&config.state_dir)?,
            inflight: InFlight::default(),
            config,
        })
    }

    async fn stage(&self, req: NodeStageVolumeRequest) -> CsiResult<()> {
        let id = volume_id(&req.volume_id)?;
        let staging = absolute(&req.staging_target_path, "staging_target_path")?;
        let capability = capability(req.volume_capability.as_ref())?;
        let uri = req
            .publish_context
            .get(PUBLISH_CONTEXT_NBD_URI)
            .filter(|u| !u.is_empty())
            .ok_or_else(|| {
                CsiError::invalid(format!(
                    "publish_context has no {PUBLISH_CONTEXT_NBD_URI}: pass what ControllerPublishVolume returned"
                ))
            })?;
        let fs = fs_type(capability, &req.volume_context);
        crate::controller::check_fs_type(&fs)?;
        let access = if is_block(capability) {
            Access::Block
        } else {
            Access::Mount { fs_type: fs }
        };
        let _busy = self.inflight.begin(id, "NodeStageVolume")?;

        let staged = match self.state.load(id)? {
            Some(staged) if staged.staging_path != staging => {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {id} is staged at {}; unstage it there first",
                    staged.staging_path.display()
                )))
            }
            Some(staged) if self.attacher.is_alive(&staged.attachment).await => staged,
            Some(stale) => {
                // Left by a crash (or a reboot): take down what remains and attach anew.
                tracing::info!(
                    volume = id,
                    "re-attaching a volume whose attachment is gone"
                );
                mount::unmount(&staging).await?;
                self.attacher.detach(&stale.attachment).await?;
                self.attach(id, &staging, uri, access.clone()).await?
            }
            None => self.attach(id, &staging, uri, access.clone()).await?,
        };

        let Access::Mount { fs_type } = &staged.access else {
            return Ok(());
        };
        if mount::is_mount_point(&staging)? {
            return Ok(());
        }
        let device = staged.attachment.device();
        let fs_type = match mount::probe(device).await? {
            mount::Contents::Filesystem(existing) => existing,
            mount::Contents::PartitionTable(table) => {
                return Err(CsiError::FailedPrecondition(format!(
                    "volume {id} holds a {table} partition table and no filesystem; \
                     it is not formatted over (use it as a raw block volume, or wipe it)"
                )));
            }
            mount::Contents::Blank => {
                tracing::info!(volume = id, device = %device.display(), fs_type, "formatting a blank volume");
                mount::format(device, fs_type).await?;
                fs_type.clone()
            }
        };
        if fs_type == "ext4" && mount::grow_unmounted_ext4(device).await? {
            tracing::info!(
                volume = id,
                "filesystem grown to the expanded volume before mounting"
            );
        }
        mount::mount(device, &staging, &fs_type, &mount_flags(capability)).await?;
        if let Access::Mount { fs_type: recorded } = &staged.access {
            if *recorded != fs_type {
                // The device held another filesystem already; remember what is mounted.
                let mut staged = staged.clone();
                staged.access = Access::Mount { fs_type };
                self.state.save(&staged)?;
            }
        }
        tracing::info!(volume = id, staging = %staging.display(), "volume staged");
        Ok(())
    }

    async fn attach(
        &self,
        id: &str,
        staging: &Path,
        uri: &str,
        access: Access,
    ) -> CsiResult<StagedVolume> {
        let attachment = self.attacher.attach(id, uri).await?;
        let staged = StagedVolume {
            volume_id: id.to_string(),
            staging_path: staging.to_path_buf(),
            nbd_uri: uri.to_string(),
            attachment,
            access,
        };
        if let Err(err) = self.state.save(&staged) {
            // Without a record nobody could detach it later.
            let _ = self.attacher.detach(&staged.attachment).await;
            return Err(err.into());
        }
        tracing::info!(volume = id, device = %staged.attachment.device().display(), "volume attached");
        Ok(staged)
    }

    async fn unstage(&self, req: NodeUnstageVolumeRequest) -> CsiResult<()> {
        let id = volume_id(&req.volume_id)?;
        let staging = absolute(&req.staging_target_path, "staging_target_path")?;
        let _busy = self.inflight.begin(id, "NodeUnstageVolume")?;
        mount::unmount(&staging).await?;
        if let Some(staged) = self.state.load(id)? {
            self.attacher.detach(&staged.attachment).await?;
            self.state.remove(id)?;
            tracing::info!(volume = id, "volume unstaged");
        }
        Ok(())
    }

    async fn publish(&self, req: NodePublishVolumeRequest) -> CsiResult<()> {
        let id = volume_id(&req.volume_id)?;
        if req.staging_target_path.is_empty() {
            return Err(CsiError::FailedPrecondition(
                "staging_target_path is required: this plugin stages volumes (STAGE_UNSTAGE_VOLUME)".into(),
            ));
        }
        let staging = absolute(&req.staging_target_path, "staging_target_path")?;
        let target = absolute(&req.target_path, "target_path")?;
        let capability = capability(req.volume_capability.as_ref())?;
        let _busy = self.inflight.begin(id, "NodePublishVolume")?;
        let staged = self.state.load(id)?.ok_or_else(|| {
            CsiError::FailedPrecondition(format!(
                "volume {id} is not staged on this node; call NodeStageVolume first"
            ))
        })?;
        if staged.staging_path != staging {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {id} is staged at {}, not {}",
                staged.staging_path.display(),
                staging.display()
            )));
        }
        if is_block(capability) != (staged.access == Access::Block) {
            return Err(CsiError::AlreadyExists(format!(
                "volume {id} was staged for {} access; publish it the same way",
                if staged.access == Access::Block {
                    "block"
                } else {
                    "mount"
                }
            )));
        }
        if let Some(existing) = mount::mounted_at(&target)? {
            let _ = existing;
            return Ok(());
        }
        match staged.access {
            Access::Block => {
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                if !target.exists() {
                    std::fs::File::create(&target)?;
                }
                mount::bind_mount(staged.attachment.device(), &target, req.readonly).await?;
            }
            Access::Mount { .. } => {
                if !mount::is_mount_point(&staging)? {
                    return Err(CsiError::FailedPrecondition(format!(
                        "volume {id} has no filesystem mounted at {}; call NodeStageVolume again",
                        staging.display()
                    )));
                }
                std::fs::create_dir_all(&target)?;
                mount::bind_mount(&staging, &target, req.readonly).await?;
            }
        }
        tracing::info!(volume = id, target = %target.display(), readonly = req.readonly, "volume published");
        Ok(())
    }

    async fn unpublish(&self, req: NodeUnpublishVolumeRequest) -> CsiResult<()> {
        let id = volume_id(&req.volume_id)?;
        let target = absolute(&req.target_path, "target_path")?;
        let _busy = self.inflight.begin(id, "NodeUnpublishVolume")?;
        mount::unmount(&target).await?;
        match std::fs::symlink_metadata(&target) {
            Ok(meta) if meta.is_dir() => std::fs::remove_dir(&target)?,
            Ok(_) => std::fs::remove_file(&target)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    async fn stats(&self, req: NodeGetVolumeStatsRequest) -> CsiResult<NodeGetVolumeStatsResponse> {
        let id = volume_id(&req.volume_id)?;
        let path = absolute(&req.volume_path, "volume_path")?;
        let staged = self
            .state
            .load(id)?
            .ok_or_else(|| CsiError::NotFound(format!("volume {id} is not staged on this node")))?;
        if !path.exists() || !mount::is_mount_point(&path)? {
            return Err(CsiError::NotFound(format!(
                "volume {id} is not mounted at {}",
                path.display()
            )));
        }
        let bytes = |total: u64, available: u64, used: u64| VolumeUsage {
            total: total as i64,
            available: available as i64,
            used: used as i64,
            unit: volume_usage::Unit::Bytes as i32,
        };
        let usage = if staged.access == Access::Block {
            let size = mount::device_size(staged.attachment.device()).await?;
            vec![bytes(size, 0, 0)]
        } else {
            let u = mount::usage(&path)?;
            vec![
                bytes(u.total_bytes, u.available_bytes, u.used_bytes),
                VolumeUsage {
                    total: u.total_inodes as i64,
                    available: u.free_inodes as i64,
                    used: u.used_inodes as i64,
                    unit: volume_usage::Unit::Inodes as i32,
                },
            ]
        };
        Ok(NodeGetVolumeStatsResponse {
            usage,
            volume_condition: None,
        })
    }

    async fn expand(&self, req: NodeExpandVolumeRequest) -> CsiResult<NodeExpandVolumeResponse> {
        let id = volume_id(&req.volume_id)?;
        absolute(&req.volume_path, "volume_path")?;
        let required = req
            .capacity_range
            .as_ref()
            .map(|r| r.required_bytes.max(0) as u64)
            .unwrap_or(0);
        let _busy = self.inflight.begin(id, "NodeExpandVolume")?;
        let staged = self
            .state
            .load(id)?
            .ok_or_else(|| CsiError::NotFound(format!("volume {id} is not staged on this node")))?;
        let size = self
            .attacher
            .refresh_size(&staged.attachment, &staged.nbd_uri)
            .await?;
        if size < required {
            return Err(CsiError::FailedPrecondition(format!(
                "the device of volume {id} is {size} bytes, not the {required} asked for: it is \
                 attached through nbdfuse, which sees a new size only when attached again \
                 (unstage and stage the volume, or load the nbd kernel module for online expansion)"
            )));
        }
        if let Access::Mount { fs_type } = &staged.access {
            mount::grow_fs(fs_type, staged.attachment.device(), &staged.staging_path).await?;
            tracing::info!(volume = id, size, "filesystem grown");
        }
        Ok(NodeExpandVolumeResponse {
            capacity_bytes: size as i64,
        })
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        self.stage(request.into_inner()).await?;
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        self.unstage(request.into_inner()).await?;
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        self.publish(request.into_inner()).await?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        self.unpublish(request.into_inner()).await?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        Ok(Response::new(self.stats(request.into_inner()).await?))
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        Ok(Response::new(self.expand(request.into_inner()).await?))
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        let capabilities = [
            RpcType::StageUnstageVolume,
            RpcType::ExpandVolume,
            RpcType::GetVolumeStats,
        ]
        .into_iter()
        .map(|rpc| NodeServiceCapability {
            r#type: Some(Type::Rpc(Rpc { r#type: rpc as i32 })),
        })
        .collect();
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(
        &self,
        _request: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.config.node_id.clone(),
            max_volumes_per_node: self.config.max_volumes,
            accessible_topology: Some(zone_topology(&self.config.zone)),
        }))
    }
}
