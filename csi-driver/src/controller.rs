//! The CSI Controller service: volumes on the storage nodes (through a
//! [`VolumeBackend`]), their publication to CSI nodes, capacity and
//! expansion. A volume is published to one CSI node at a time: its target
//! runs on the storage node of that name. Snapshots, and volumes from
//! snapshots or other volumes, are in [`snapshots`].

mod snapshots;

use snapshots::content_source;

use std::collections::HashMap;
use std::sync::Arc;

use strata_proto::csi::controller_server::Controller;
use strata_proto::csi::controller_service_capability::{rpc::Type as RpcType, Rpc, Type};
use strata_proto::csi::volume_capability::access_mode::Mode;
use strata_proto::csi::volume_capability::AccessType;
use strata_proto::csi::*;
use tonic::{Request, Response, Status};

use strata_node::cluster::volumes::VolumeError;

use crate::backend::{BackendVolume, CreateFromSnapshot, CreateVolume, VolumeBackend};
use crate::error::{CsiError, CsiResult};
use crate::inflight::InFlight;
use crate::topology::{zone_choice, zone_of, zone_topology};
use crate::PUBLISH_CONTEXT_NBD_URI;

/// Volume sizes are whole blocks of the storage node's pool.
pub const BLOCK_SIZE: u64 = 4096;
/// Size of a volume whose capacity range leaves the size to the plugin.
pub const DEFAULT_VOLUME_SIZE: u64 = 1 << 30;
pub const MIN_VOLUME_SIZE: u64 = 1 << 20;
/// The largest `replicas` parameter accepted (replica placement needs as
/// many storage nodes).
const MAX_REPLICAS: u32 = 5;
/// Parameters the CO adds on its own (external-provisioner's
/// --extra-create-metadata); they are not ours to validate.
const CO_PARAMETER_PREFIX: &str = "csi.storage.k8s.io/";
const LIST_TOKEN_PREFIX: &str = "after:";

pub struct ControllerService {
    backend: Arc<dyn VolumeBackend>,
    inflight: InFlight,
}

/// The StorageClass parameters this driver understands.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeParameters {
    pub replicas: u32,
    pub fs_type: Option<String>,
}

pub fn parse_parameters(parameters: &HashMap<String, String>) -> CsiResult<VolumeParameters> {
    let mut params = VolumeParameters {
        replicas: 1,
        fs_type: None,
    };
    for (key, value) in parameters {
        match key.as_str() {
            "replicas" => {
                params.replicas = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_REPLICAS).contains(n))
                    .ok_or_else(|| {
                        CsiError::invalid(format!(
                            "parameter replicas={value:?} must be a number from 1 to {MAX_REPLICAS}"
                        ))
                    })?;
            }
            "fsType" => {
                check_fs_type(value)?;
                params.fs_type = Some(value.clone());
            }
            _ if key.starts_with(CO_PARAMETER_PREFIX) => {}
            _ => {
                return Err(CsiError::invalid(format!(
                    "unknown parameter {key:?}; strata-csi understands replicas and fsType"
                )))
            }
        }
    }
    Ok(params)
}

pub fn check_fs_type(fs_type: &str) -> CsiResult<()> {
    match fs_type {
        "" | "ext4" | "xfs" => Ok(()),
        other => Err(CsiError::invalid(format!(
            "filesystem {other:?} is not supported; use ext4 or xfs"
        ))),
    }
}

/// Checks one capability: a known access type, a filesystem we can make,
/// and a single-node access mode (a volume has one NBD target, and ext4/xfs
/// cannot be mounted on two nodes at once).
pub fn check_capability(capability: &VolumeCapability) -> CsiResult<()> {
    match &capability.access_type {
        None => {
            return Err(CsiError::invalid(
                "volume_capability.access_type is required (block or mount)",
            ))
        }
        Some(AccessType::Mount(mount)) => check_fs_type(&mount.fs_type)?,
        Some(AccessType::Block(_)) => {}
    }
    let mode = capability
        .access_mode
        .as_ref()
        .map(|m| m.mode())
        .unwrap_or(Mode::Unknown);
    match mode {
        Mode::SingleNodeWriter | Mode::SingleNodeReaderOnly => Ok(()),
        Mode::Unknown => Err(CsiError::invalid(
            "volume_capability.access_mode is required",
        )),
        other => Err(CsiError::invalid(format!(
            "access mode {} is not supported: a Strata volume is attached to one node at a time \
             (use SINGLE_NODE_WRITER or SINGLE_NODE_READER_ONLY)",
            other.as_str_name()
        ))),
    }
}

fn check_capabilities(capabilities: &[VolumeCapability]) -> CsiResult<()> {
    if capabilities.is_empty() {
        return Err(CsiError::required("volume_capabilities"));
    }
    capabilities.iter().try_for_each(check_capability)
}

fn round_up(bytes: u64) -> u64 {
    bytes.div_ceil(BLOCK_SIZE) * BLOCK_SIZE
}

/// The size to create for a capacity range, or why none fits.
pub fn size_for(range: Option<&CapacityRange>) -> CsiResult<u64> {
    let (required, limit) = range_bytes(range)?;
    if limit > 0 && limit < MIN_VOLUME_SIZE {
        return Err(CsiError::OutOfRange(format!(
            "limit_bytes {limit} is below the smallest volume, {MIN_VOLUME_SIZE} bytes"
        )));
    }
    let wanted = match (required, limit) {
        (0, 0) => DEFAULT_VOLUME_SIZE,
        (0, limit) => DEFAULT_VOLUME_SIZE.min(limit - limit % BLOCK_SIZE),
        (required, _) => required.max(MIN_VOLUME_SIZE),
    };
    let size = round_up(wanted);
    if limit > 0 && size > limit {
        return Err(CsiError::OutOfRange(format!(
            "no volume size in [{required}, {limit}] bytes: sizes are multiples of {BLOCK_SIZE} bytes"
        )));
    }
    Ok(size)
}

fn range_bytes(range: Option<&CapacityRange>) -> CsiResult<(u64, u64)> {
    let Some(range) = range else {
        return Ok((0, 0));
    };
    if range.required_bytes < 0 || range.limit_bytes < 0 {
        return Err(CsiError::invalid(
            "capacity_range bytes must not be negative",
        ));
    }
    let (required, limit) = (range.required_bytes as u64, range.limit_bytes as u64);
    if limit > 0 && required > limit {
        return Err(CsiError::invalid(format!(
            "capacity_range.required_bytes {required} is larger than limit_bytes {limit}"
        )));
    }
    Ok((required, limit))
}

fn fits(size: u64, range: Option<&CapacityRange>) -> CsiResult<bool> {
    let (required, limit) = range_bytes(range)?;
    Ok(size >= required && (limit == 0 || size <= limit))
}

fn csi_volume(volume: &BackendVolume, context: HashMap<String, String>) -> Volume {
    Volume {
        capacity_bytes: volume.size_bytes as i64,
        volume_id: volume.name.clone(),
        volume_context: context,
        content_source: None,
        accessible_topology: volume.zones.iter().map(|z| zone_topology(z)).collect(),
    }
}

/// Where the volume is published and whether all its replicas are in sync.
fn volume_status(volume: &BackendVolume) -> (Vec<String>, VolumeCondition) {
    let abnormal = volume.in_sync < volume.replicas;
    let message = format!(
        "{}/{} replicas in sync{}",
        volume.in_sync,
        volume.replicas,
        if abnormal {
            " (degraded: a replica is down or being rebuilt)"
        } else {
            ""
        }
    );
    (
        volume.published_on.iter().cloned().collect(),
        VolumeCondition { abnormal, message },
    )
}

fn require<'a>(value: &'a str, what: &str) -> CsiResult<&'a str> {
    if value.is_empty() {
        Err(CsiError::required(what))
    } else {
        Ok(value)
    }
}

/// Volume ids are storage-node volume names: CO-generated names such as
/// `pvc-<uuid>` are used as they are.
fn check_volume_name(name: &str) -> CsiResult<()> {
    strata_node::pool::validate_volume_name(name)
        .map_err(|e| CsiError::invalid(format!("volume name: {e}")))
}

/// Refuses a negative page size or a token this plugin did not hand out.
fn check_page_request(max_entries: i32, starting_token: &str, call: &str) -> CsiResult<()> {
    if max_entries < 0 {
        return Err(CsiError::invalid("max_entries must not be negative"));
    }
    if !starting_token.is_empty() && !starting_token.starts_with(LIST_TOKEN_PREFIX) {
        return Err(CsiError::Aborted(format!(
            "starting_token {starting_token:?} was not returned by {call}; start again without it"
        )));
    }
    Ok(())
}

/// One page of `items` (sorted by `key`, checked by [`check_page_request`])
/// after `starting_token`, and the token of the next page (empty at the end).
/// Tokens name the last key returned, so entries created or deleted between
/// pages neither repeat nor shift the others.
fn page<'a, T>(
    items: &'a [T],
    key: impl Fn(&T) -> &str,
    starting_token: &str,
    max_entries: i32,
) -> (&'a [T], String) {
    let rest = match starting_token.strip_prefix(LIST_TOKEN_PREFIX) {
        Some(after) => &items[items.partition_point(|item| key(item) <= after)..],
        None => items,
    };
    let limit = if max_entries == 0 {
        rest.len()
    } else {
        max_entries as usize
    };
    let page = &rest[..limit.min(rest.len())];
    let next_token = match page.last() {
        Some(last) if page.len() < rest.len() => format!("{LIST_TOKEN_PREFIX}{}", key(last)),
        _ => String::new(),
    };
    (page, next_token)
}

impl ControllerService {
    pub fn new(backend: Arc<dyn VolumeBackend>) -> ControllerService {
        ControllerService {
            backend,
            inflight: InFlight::default(),
        }
    }

    async fn create(&self, req: CreateVolumeRequest) -> CsiResult<Volume> {
        let name = require(&req.name, "name")?;
        check_volume_name(name)?;
        check_capabilities(&req.volume_capabilities)?;
        let source = content_source(req.volume_content_source.as_ref())?;
        let params = parse_parameters(&req.parameters)?;
        let size = size_for(req.capacity_range.as_ref())?;
        let zones = zone_choice(req.accessibility_requirements.as_ref())?;
        let mut context = HashMap::from([("replicas".to_string(), params.replicas.to_string())]);
        if let Some(fs_type) = &params.fs_type {
            context.insert("fsType".to_string(), fs_type.clone());
        }

        let _busy = self.inflight.begin(name, "CreateVolume")?;
        let existing = self.backend.get(name).await?;
        let created = match (&existing, &source) {
            (Some(_), _) => None,
            (None, None) => Some(
                self.backend
                    .create(&CreateVolume {
                        name: name.to_string(),
                        size_bytes: size,
                        replicas: params.replicas,
                        zones: zones.clone(),
                    })
                    .await,
            ),
            (None, Some(source)) => {
                let from = self
                    .snapshot_to_clone(name, source, req.capacity_range.as_ref())
                    .await?;
                let created = self
                    .backend
                    .create_from_snapshot(&CreateFromSnapshot {
                        name: name.to_string(),
                        snapshot: from.snapshot.clone(),
                        size_bytes: from.size_bytes,
                        replicas: params.replicas,
                        zones: zones.clone(),
                    })
                    .await;
                if from.temporary {
                    self.drop_temporary_snapshot(&from.snapshot).await;
                }
                Some(created)
            }
        };
        let with_source = |mut volume: Volume| {
            volume.content_source = req.volume_content_source.clone();
            volume
        };
        let volume = match (existing, created) {
            (Some(volume), _) => volume,
            (None, None) => unreachable!("created when absent"),
            (None, Some(created)) => match created {
                Ok(volume) => return Ok(with_source(csi_volume(&volume, context))),
                // Created meanwhile by an earlier call that the CO gave up on.
                Err(VolumeError::AlreadyExists { .. }) => self
                    .backend
                    .get(name)
                    .await?
                    .ok_or_else(|| CsiError::Unavailable(format!("volume {name} vanished")))?,
                Err(err) => return Err(err.into()),
            },
        };
        if !fits(volume.size_bytes, req.capacity_range.as_ref())? {
            return Err(CsiError::AlreadyExists(format!(
                "volume {name} already exists with {} bytes, outside the requested capacity range",
                volume.size_bytes
            )));
        }
        // A volume from a snapshot has as many replicas as the snapshot has
        // copies, at most the asked number.
        if volume.replicas != params.replicas as usize && source.is_none() {
            return Err(CsiError::AlreadyExists(format!(
                "volume {name} already exists with {} replicas, not {}",
                volume.replicas, params.replicas
            )));
        }
        if zones.restricted && !volume.zones.iter().any(|z| zones.order.contains(z)) {
            return Err(CsiError::AlreadyExists(format!(
                "volume {name} already exists in zones {}, outside the requested topology",
                volume.zones.join(", ")
            )));
        }
        Ok(with_source(csi_volume(&volume, context)))
    }

    async fn delete(&self, req: DeleteVolumeRequest) -> CsiResult<()> {
        let id = require(&req.volume_id, "volume_id")?;
        let _busy = self.inflight.begin(id, "DeleteVolume")?;
        let Some(volume) = self.backend.get(id).await? else {
            return Ok(());
        };
        if let Some(node) = &volume.published_on {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {id} is published to node {node}; ControllerUnpublishVolume it first"
            )));
        }
        match self.backend.delete(id).await {
            Ok(()) | Err(VolumeError::NotFound(_)) => Ok(()),
            Err(err) => Err(err.into()),
        }
    }

    async fn existing(&self, id: &str) -> CsiResult<BackendVolume> {
        self.backend
            .get(id)
            .await?
            .ok_or_else(|| CsiError::NotFound(format!("volume {id:?} does not exist")))
    }

    async fn publish(
        &self,
        req: ControllerPublishVolumeRequest,
    ) -> CsiResult<HashMap<String, String>> {
        let id = require(&req.volume_id, "volume_id")?;
        let node_id = require(&req.node_id, "node_id")?;
        let capability = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| CsiError::required("volume_capability"))?;
        check_capability(capability)?;
        let _busy = self.inflight.begin(id, "ControllerPublishVolume")?;
        let volume = self.existing(id).await?;
        // Opening the target elsewhere would fence the node using it; the CO
        // unpublishes there first (a node that is down has no target in the
        // report, so a failover goes ahead and fences it).
        match &volume.published_on {
            Some(other) if other != node_id => {
                return Err(CsiError::FailedPrecondition(format!(
                    "volume {id} is published to node {other}, and it can be attached to one \
                     node at a time; ControllerUnpublishVolume it from {other} first"
                )))
            }
            _ => {}
        }
        let uri = self.backend.publish(id, node_id).await?;
        Ok(HashMap::from([(PUBLISH_CONTEXT_NBD_URI.to_string(), uri)]))
    }

    async fn unpublish(&self, req: ControllerUnpublishVolumeRequest) -> CsiResult<()> {
        let id = require(&req.volume_id, "volume_id")?;
        let _busy = self.inflight.begin(id, "ControllerUnpublishVolume")?;
        // An empty node_id means every node; a volume that no longer exists
        // is not published anywhere.
        let node = Some(req.node_id.as_str()).filter(|n| !n.is_empty());
        match self.backend.unpublish(id, node).await {
            Ok(()) | Err(VolumeError::NotFound(_)) => Ok(()),
            Err(err) => Err(err.into()),
        }
    }

    async fn validate(
        &self,
        req: ValidateVolumeCapabilitiesRequest,
    ) -> CsiResult<ValidateVolumeCapabilitiesResponse> {
        let id = require(&req.volume_id, "volume_id")?;
        if req.volume_capabilities.is_empty() {
            return Err(CsiError::required("volume_capabilities"));
        }
        self.existing(id).await?;
        let unsupported = req
            .volume_capabilities
            .iter()
            .map(check_capability)
            .chain(std::iter::once(
                parse_parameters(&req.parameters).map(|_| ()),
            ))
            .find_map(Result::err);
        Ok(match unsupported {
            Some(err) => ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: err.to_string(),
            },
            None => ValidateVolumeCapabilitiesResponse {
                confirmed: Some(validate_volume_capabilities_response::Confirmed {
                    volume_context: req.volume_context,
                    volume_capabilities: req.volume_capabilities,
                    parameters: req.parameters,
                }),
                message: String::new(),
            },
        })
    }

    async fn list(&self, req: ListVolumesRequest) -> CsiResult<ListVolumesResponse> {
        check_page_request(req.max_entries, &req.starting_token, "ListVolumes")?;
        let volumes = self.backend.list().await?;
        let (page, next_token) = page(&volumes, |v| &v.name, &req.starting_token, req.max_entries);
        Ok(ListVolumesResponse {
            entries: page
                .iter()
                .map(|v| {
                    let (published_node_ids, condition) = volume_status(v);
                    list_volumes_response::Entry {
                        volume: Some(csi_volume(v, HashMap::new())),
                        status: Some(list_volumes_response::VolumeStatus {
                            published_node_ids,
                            volume_condition: Some(condition),
                        }),
                    }
                })
                .collect(),
            next_token,
        })
    }

    async fn capacity(&self, req: GetCapacityRequest) -> CsiResult<GetCapacityResponse> {
        req.volume_capabilities
            .iter()
            .try_for_each(check_capability)?;
        let params = parse_parameters(&req.parameters)?;
        let zone = req.accessible_topology.as_ref().map(zone_of).transpose()?;
        let capacity = self
            .backend
            .capacity(zone.as_deref(), params.replicas as usize)
            .await?;
        Ok(GetCapacityResponse {
            available_capacity: capacity.available_bytes as i64,
            maximum_volume_size: Some(capacity.maximum_volume_bytes as i64),
            minimum_volume_size: Some(MIN_VOLUME_SIZE as i64),
        })
    }

    async fn expand(
        &self,
        req: ControllerExpandVolumeRequest,
    ) -> CsiResult<ControllerExpandVolumeResponse> {
        let id = require(&req.volume_id, "volume_id")?;
        let range = req
            .capacity_range
            .as_ref()
            .ok_or_else(|| CsiError::required("capacity_range"))?;
        let (required, limit) = range_bytes(Some(range))?;
        if let Some(capability) = &req.volume_capability {
            check_capability(capability)?;
        }
        let node_expansion_required = !matches!(
            req.volume_capability
                .as_ref()
                .and_then(|c| c.access_type.as_ref()),
            Some(AccessType::Block(_))
        );
        let _busy = self.inflight.begin(id, "ControllerExpandVolume")?;
        let volume = self.existing(id).await?;
        if limit > 0 && volume.size_bytes > limit {
            return Err(CsiError::OutOfRange(format!(
                "volume {id} is already {} bytes, above limit_bytes {limit}; volumes cannot shrink",
                volume.size_bytes
            )));
        }
        let target = round_up(required);
        if limit > 0 && target > limit {
            return Err(CsiError::OutOfRange(format!(
                "no volume size in [{required}, {limit}] bytes: sizes are multiples of {BLOCK_SIZE} bytes"
            )));
        }
        let volume = if volume.size_bytes >= target {
            volume
        } else {
            self.backend.resize(id, target).await?
        };
        Ok(ControllerExpandVolumeResponse {
            capacity_bytes: volume.size_bytes as i64,
            node_expansion_required,
        })
    }

    async fn get_volume(
        &self,
        req: ControllerGetVolumeRequest,
    ) -> CsiResult<ControllerGetVolumeResponse> {
        let id = require(&req.volume_id, "volume_id")?;
        let volume = self.existing(id).await?;
        let (published_node_ids, condition) = volume_status(&volume);
        Ok(ControllerGetVolumeResponse {
            volume: Some(csi_volume(&volume, HashMap::new())),
            status: Some(controller_get_volume_response::VolumeStatus {
                published_node_ids,
                volume_condition: Some(condition),
            }),
        })
    }
}

fn capability(rpc: RpcType) -> ControllerServiceCapability {
    ControllerServiceCapability {
        r#type: Some(Type::Rpc(Rpc { r#type: rpc as i32 })),
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let volume = self.create(request.into_inner()).await?;
        tracing::info!(volume = %volume.volume_id, bytes = volume.capacity_bytes, "volume ready");
        Ok(Response::new(CreateVolumeResponse {
            volume: Some(volume),
        }))
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        self.delete(request.into_inner()).await?;
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        request: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        let publish_context = self.publish(request.into_inner()).await?;
        Ok(Response::new(ControllerPublishVolumeResponse {
            publish_context,
        }))
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        self.unpublish(request.into_inner()).await?;
        Ok(Response::new(ControllerUnpublishVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        Ok(Response::new(self.validate(request.into_inner()).await?))
    }

    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        Ok(Response::new(self.list(request.into_inner()).await?))
    }

    async fn get_capacity(
        &self,
        request: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        Ok(Response::new(self.capacity(request.into_inner()).await?))
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities: [
                RpcType::CreateDeleteVolume,
                RpcType::PublishUnpublishVolume,
                RpcType::ListVolumes,
                RpcType::GetCapacity,
                RpcType::ExpandVolume,
                RpcType::GetVolume,
                RpcType::ListVolumesPublishedNodes,
                RpcType::VolumeCondition,
                RpcType::CreateDeleteSnapshot,
                RpcType::ListSnapshots,
                RpcType::CloneVolume,
            ]
            .into_iter()
            .map(capability)
            .collect(),
        }))
    }

    async fn create_snapshot(
        &self,
        request: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let snapshot = self.create_snapshot_of(request.into_inner()).await?;
        tracing::info!(snapshot = %snapshot.snapshot_id, volume = %snapshot.source_volume_id, "snapshot ready");
        Ok(Response::new(CreateSnapshotResponse {
            snapshot: Some(snapshot),
        }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        self.delete_snapshot_by_id(request.into_inner()).await?;
        Ok(Response::new(DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        Ok(Response::new(
            self.list_snapshot_page(request.into_inner()).await?,
        ))
    }

    async fn controller_expand_volume(
        &self,
        request: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        Ok(Response::new(self.expand(request.into_inner()).await?))
    }

    async fn controller_get_volume(
        &self,
        request: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        Ok(Response::new(self.get_volume(request.into_inner()).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(required: i64, limit: i64) -> CapacityRange {
        CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }
    }

    #[test]
    fn sizes_honour_the_capacity_range_or_are_out_of_range() {
        assert_eq!(size_for(None).unwrap(), DEFAULT_VOLUME_SIZE);
        assert_eq!(size_for(Some(&range(10 << 20, 0))).unwrap(), 10 << 20);
        // Rounded up to whole blocks.
        assert_eq!(
            size_for(Some(&range((10 << 20) + 1, 0))).unwrap(),
            (10 << 20) + 4096
        );
        // Only a limit: the default size, capped by it.
        assert_eq!(size_for(Some(&range(0, 64 << 20))).unwrap(), 64 << 20);
        // No block multiple between required and limit.
        let err = size_for(Some(&range((10 << 20) + 1, (10 << 20) + 100))).unwrap_err();
        assert!(matches!(err, CsiError::OutOfRange(_)), "{err:?}");
        let err = size_for(Some(&range(0, 4096))).unwrap_err();
        assert!(matches!(err, CsiError::OutOfRange(_)), "{err:?}");
        let err = size_for(Some(&range(2 << 20, 1 << 20))).unwrap_err();
        assert!(matches!(err, CsiError::InvalidArgument(_)), "{err:?}");
        let err = size_for(Some(&range(-1, 0))).unwrap_err();
        assert!(matches!(err, CsiError::InvalidArgument(_)), "{err:?}");
    }

    #[test]
    fn parameters_are_checked() {
        let p = |pairs: &[(&str, &str)]| {
            parse_parameters(
                &pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        assert_eq!(
            p(&[
                ("replicas", "3"),
                ("fsType", "xfs"),
                ("csi.storage.k8s.io/pvc/name", "x")
            ])
            .unwrap(),
            VolumeParameters {
                replicas: 3,
                fs_type: Some("xfs".into())
            }
        );
        assert!(p(&[("replicas", "0")]).is_err());
        assert!(p(&[("replicas", "many")]).is_err());
        assert!(p(&[("fsType", "btrfs")]).is_err());
        assert!(p(&[("replica", "1")]).is_err());
    }
}
