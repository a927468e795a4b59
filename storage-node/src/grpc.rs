//! The node's gRPC control API (`proto/storage.proto`) over its pool.

use std::sync::Arc;

use strata_proto::storage::storage_node_server::StorageNode;
use strata_proto::storage::{
    CreateVolumeRequest, DeleteVolumeRequest, DeleteVolumeResponse, GetNodeInfoRequest,
    GetVolumeRequest, ListVolumesRequest, ListVolumesResponse, NodeInfo, ResizeVolumeRequest,
    Volume,
};
use tonic::{Request, Response, Status};

use crate::pool::{Pool, PoolError, VolumeInfo};

/// Identity the node reports about itself.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub name: String,
    pub zone: String,
    /// host:port clients use for NBD.
    pub nbd_address: String,
}

pub struct ControlService {
    pool: Arc<Pool>,
    identity: NodeIdentity,
}

impl ControlService {
    pub fn new(pool: Arc<Pool>, identity: NodeIdentity) -> Self {
        ControlService { pool, identity }
    }

    fn volume(&self, info: VolumeInfo) -> Volume {
        Volume {
            export_uri: format!("nbd://{}/{}", self.identity.nbd_address, info.name),
            node: self.identity.name.clone(),
            name: info.name,
            size_bytes: info.size,
            allocated_bytes: info.allocated,
            created_unix: info.created_unix,
        }
    }
}

/// The one place pool errors become gRPC codes.
pub fn status_from(err: PoolError) -> Status {
    match err {
        PoolError::Invalid(msg) => Status::invalid_argument(msg),
        PoolError::NotFound(_) => Status::not_found(err.to_string()),
        PoolError::AlreadyExists(_) => Status::already_exists(err.to_string()),
        PoolError::NoSpace(_) => Status::resource_exhausted(err.to_string()),
        PoolError::Io(_) | PoolError::Corrupt(_) => Status::internal(err.to_string()),
    }
}

fn required_name(name: &str) -> Result<&str, Status> {
    if name.is_empty() {
        Err(Status::invalid_argument("name is required"))
    } else {
        Ok(name)
    }
}

#[tonic::async_trait]
impl StorageNode for ControlService {
    async fn get_node_info(
        &self,
        _request: Request<GetNodeInfoRequest>,
    ) -> Result<Response<NodeInfo>, Status> {
        let usage = self.pool.usage();
        Ok(Response::new(NodeInfo {
            name: self.identity.name.clone(),
            zone: self.identity.zone.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            nbd_address: self.identity.nbd_address.clone(),
            pool_name: self.pool.name().to_string(),
            pool_uuid: self.pool.uuid().to_string(),
            io_engine: self.pool.engine_name().to_string(),
            capacity_bytes: usage.capacity,
            used_bytes: usage.used,
            free_bytes: usage.free,
            provisioned_bytes: usage.provisioned,
            provisionable_bytes: usage.provisionable,
            volume_count: self.pool.list_volumes().len() as u32,
            checksum_failures: self.pool.checksum_failures(),
        }))
    }

    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<Volume>, Status> {
        let req = request.into_inner();
        let name = required_name(&req.name)?;
        if req.size_bytes == 0 {
            return Err(Status::invalid_argument(
                "size_bytes must be greater than zero",
            ));
        }
        let info = self
            .pool
            .create_volume(name, req.size_bytes)
            .await
            .map_err(status_from)?;
        Ok(Response::new(self.volume(info)))
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        let name = required_name(&req.name)?;
        self.pool.delete_volume(name).await.map_err(status_from)?;
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn resize_volume(
        &self,
        request: Request<ResizeVolumeRequest>,
    ) -> Result<Response<Volume>, Status> {
        let req = request.into_inner();
        let name = required_name(&req.name)?;
        let info = self
            .pool
            .resize_volume(name, req.size_bytes)
            .await
            .map_err(|err| match err {
                PoolError::Invalid(msg) if msg.contains("shrinking") => {
                    Status::failed_precondition(msg)
                }
                other => status_from(other),
            })?;
        Ok(Response::new(self.volume(info)))
    }

    async fn get_volume(
        &self,
        request: Request<GetVolumeRequest>,
    ) -> Result<Response<Volume>, Status> {
        let req = request.into_inner();
        let name = required_name(&req.name)?;
        let info = self
            .pool
            .volume_info(name)
            .ok_or_else(|| status_from(PoolError::NotFound(name.to_string())))?;
        Ok(Response::new(self.volume(info)))
    }

    async fn list_volumes(
        &self,
        _request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let volumes = self
            .pool
            .list_volumes()
            .into_iter()
            .map(|v| self.volume(v))
            .collect();
        Ok(Response::new(ListVolumesResponse { volumes }))
    }
}
