//! The node's gRPC control API (`proto/storage.proto`): its pool's plain
//! volumes, its replicas, and the volume targets open on it.

use std::sync::Arc;

use strata_proto::storage::storage_node_server::StorageNode;
use strata_proto::storage::{
    CancelMoveRequest, CancelMoveResponse, CloseTargetRequest, CloseTargetResponse,
    CreateReplicaRequest, CreateSnapshotRequest, CreateSnapshotResponse, CreateVolumeRequest,
    DeleteReplicaRequest, DeleteReplicaResponse, DeleteSnapshotRequest, DeleteSnapshotResponse,
    DeleteVolumeRequest, DeleteVolumeResponse, GetNodeInfoRequest, GetVolumeRequest,
    ListReplicasRequest, ListReplicasResponse, ListSnapshotsRequest, ListSnapshotsResponse,
    ListTargetsRequest, ListTargetsResponse, ListVolumesRequest, ListVolumesResponse, NodeInfo,
    OpenTargetRequest, ReplaceReplicaRequest, Replica, ReplicaMember, ResizeReplicaRequest,
    ResizeVolumeRequest, Snapshot, Target, TargetReplica, Volume,
};
use tonic::codegen::http;
use tonic::{Request, Response, Status};

use crate::pool::{is_internal_volume_name, validate_volume_name, Pool, PoolError, VolumeInfo};
use crate::registry::NodeRegistry;
use crate::replication::replica::{ReplicaError, ReplicaIdentity, ReplicaStart};
use crate::replication::target::{OpenError, ReplaceError};
use crate::replication::wire::ExpectedReplica;
use crate::replication::{Member, Replicas, TargetOptions, VolumeTarget};
use crate::target::BlockError;

/// Identity the node reports about itself.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub name: String,
    pub zone: String,
    /// host:port clients use for NBD.
    pub nbd_address: String,
    /// host:port volume targets use to reach this node's replicas.
    pub replication_address: String,
}

pub struct ControlService {
    pool: Arc<Pool>,
    identity: NodeIdentity,
    replicas: Arc<Replicas>,
    registry: Arc<NodeRegistry>,
    target_options: TargetOptions,
    /// Opening and closing targets one at a time keeps "the newest open
    /// wins" simple on this node.
    target_changes: tokio::sync::Mutex<()>,
}

impl ControlService {
    pub fn new(
        identity: NodeIdentity,
        replicas: Arc<Replicas>,
        registry: Arc<NodeRegistry>,
        target_options: TargetOptions,
    ) -> Self {
        ControlService {
            pool: replicas.pool().clone(),
            identity,
            replicas,
            registry,
            target_options,
            target_changes: tokio::sync::Mutex::new(()),
        }
    }

    async fn replica(&self, replica: &crate::replication::Replica) -> Replica {
        let state = replica.state().await;
        Replica {
            volume: state.volume,
            volume_uid: state.volume_uid,
            replica_id: state.replica_id,
            node: self.identity.name.clone(),
            size_bytes: state.size,
            allocated_bytes: replica.allocated_bytes(&self.pool),
            promised_epoch: state.promised_epoch,
            config_epoch: state.config.epoch,
            in_sync: state.config.in_sync,
            members: state.members.iter().map(member_message).collect(),
            leaving_id: state.config.leaving.unwrap_or(0),
            highest_member_id: state.highest_member_id,
        }
    }

    fn target(&self, target: &VolumeTarget) -> Target {
        Target {
            volume: target.volume().to_string(),
            node: self.identity.name.clone(),
            epoch: target.epoch(),
            export_uri: format!("nbd://{}/{}", self.identity.nbd_address, target.volume()),
            size_bytes: crate::target::BlockTarget::size(target),
            fenced: target.is_fenced(),
            replicas: target
                .replicas()
                .into_iter()
                .map(|view| TargetReplica {
                    member: Some(member_message(&view.member)),
                    in_sync: view.in_sync,
                    connected: view.connected,
                    rebuilding: view.rebuild.is_some(),
                    rebuild_extents_total: view.rebuild.as_ref().map_or(0, |p| p.extents_total),
                    rebuild_extents_copied: view.rebuild.as_ref().map_or(0, |p| p.extents_copied),
                    rebuild_bytes_copied: view.rebuild.as_ref().map_or(0, |p| p.bytes_copied),
                })
                .collect(),
            repaired_blocks: target.repaired_blocks(),
            scrub_passes: target.scrub_passes(),
        }
    }

    /// Plain volumes only: replicas live in the pool under internal names.
    fn plain_volume_name<'a>(&self, name: &'a str) -> Result<&'a str, Status> {
        let name = required_name(name)?;
        if is_internal_volume_name(name) {
            return Err(Status::invalid_argument(format!(
                "{name:?} is not a volume name"
            )));
        }
        Ok(name)
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

fn member_message(member: &Member) -> ReplicaMember {
    ReplicaMember {
        id: member.id,
        node: member.node.clone(),
        address: member.address.clone(),
    }
}

fn replica_status(err: ReplicaError) -> Status {
    match err {
        ReplicaError::Pool(err) => status_from(err),
        ReplicaError::NotFound(_) => Status::not_found(err.to_string()),
        ReplicaError::AlreadyExists(_) => Status::already_exists(err.to_string()),
        ReplicaError::SnapshotNotFound(_) => Status::not_found(err.to_string()),
        ReplicaError::Invalid(_) => Status::invalid_argument(err.to_string()),
        ReplicaError::OtherReplica(_) | ReplicaError::OtherSnapshot(_) => {
            Status::failed_precondition(err.to_string())
        }
        ReplicaError::Header(_) | ReplicaError::Block(_) => Status::internal(err.to_string()),
    }
}

/// The one place pool errors become gRPC codes.
pub fn status_from(err: PoolError) -> Status {
    match err {
        PoolError::Invalid(msg) => Status::invalid_argument(msg),
        PoolError::NotFound(_) | PoolError::SnapshotNotFound(_) => {
            Status::not_found(err.to_string())
        }
        PoolError::AlreadyExists(_) | PoolError::SnapshotExists(_) => {
            Status::already_exists(err.to_string())
        }
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
            replication_address: self.identity.replication_address.clone(),
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
        let name = self.plain_volume_name(&req.name)?;
        self.pool.delete_volume(name).await.map_err(status_from)?;
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn resize_volume(
        &self,
        request: Request<ResizeVolumeRequest>,
    ) -> Result<Response<Volume>, Status> {
        let req = request.into_inner();
        let name = self.plain_volume_name(&req.name)?;
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
        let name = self.plain_volume_name(&req.name)?;
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
            .filter(|v| !is_internal_volume_name(&v.name))
            .map(|v| self.volume(v))
            .collect();
        Ok(Response::new(ListVolumesResponse { volumes }))
    }

    async fn create_replica(
        &self,
        request: Request<CreateReplicaRequest>,
    ) -> Result<Response<Replica>, Status> {
        let req = request.into_inner();
        let volume = required_name(&req.volume)?;
        if req.size_bytes == 0 {
            return Err(Status::invalid_argument(
                "size_bytes must be greater than zero",
            ));
        }
        if req.members.is_empty() {
            return Err(Status::invalid_argument("members are required"));
        }
        let members = req
            .members
            .iter()
            .map(|m| Member {
                id: m.id,
                node: m.node.clone(),
                address: m.address.clone(),
            })
            .collect();
        let start = match (req.from_snapshot.as_str(), req.replacement) {
            ("", false) => ReplicaStart::Empty,
            ("", true) => ReplicaStart::Replacement,
            (snapshot, false) => ReplicaStart::Snapshot {
                name: snapshot,
                uid: req.from_snapshot_uid,
            },
            (_, true) => {
                return Err(Status::invalid_argument(
                    "a replacement replica cannot start from a snapshot",
                ))
            }
        };
        let replica = self
            .replicas
            .create_from(
                ReplicaIdentity {
                    volume,
                    volume_uid: req.volume_uid,
                    replica_id: req.replica_id,
                },
                req.size_bytes,
                members,
                start,
            )
            .await
            .map_err(replica_status)?;
        Ok(Response::new(self.replica(&replica).await))
    }

    async fn delete_replica(
        &self,
        request: Request<DeleteReplicaRequest>,
    ) -> Result<Response<DeleteReplicaResponse>, Status> {
        let req = request.into_inner();
        let volume = required_name(&req.volume)?;
        let only_if = req.only_if.map(|r| ExpectedReplica {
            replica_id: r.replica_id,
            volume_uid: r.volume_uid,
        });
        self.replicas
            .delete(volume, only_if)
            .await
            .map_err(replica_status)?;
        Ok(Response::new(DeleteReplicaResponse {}))
    }

    async fn resize_replica(
        &self,
        request: Request<ResizeReplicaRequest>,
    ) -> Result<Response<Replica>, Status> {
        let req = request.into_inner();
        let volume = required_name(&req.volume)?;
        self.replicas
            .resize(volume, req.size_bytes)
            .await
            .map_err(|err| match err {
                ReplicaError::Pool(PoolError::Invalid(msg)) if msg.contains("shrinking") => {
                    Status::failed_precondition(msg)
                }
                other => replica_status(other),
            })?;
        let replica = self
            .replicas
            .get(volume)
            .ok_or_else(|| Status::not_found(format!("no replica of {volume:?}")))?;
        Ok(Response::new(self.replica(&replica).await))
    }

    async fn list_replicas(
        &self,
        _request: Request<ListReplicasRequest>,
    ) -> Result<Response<ListReplicasResponse>, Status> {
        let mut replicas = Vec::new();
        for replica in self.replicas.list() {
            replicas.push(self.replica(&replica).await);
        }
        Ok(Response::new(ListReplicasResponse { replicas }))
    }

    async fn open_target(
        &self,
        request: Request<OpenTargetRequest>,
    ) -> Result<Response<Target>, Status> {
        let req = request.into_inner();
        let volume = required_name(&req.volume)?;
        let _one_at_a_time = self.target_changes.lock().await;
        // Opening again where the volume is served keeps its clients
        // connected; it only takes up a new size.
        if let Some(target) = self.registry.target(volume).filter(|t| !t.is_fenced()) {
            target.refresh_size().await;
            return Ok(Response::new(self.target(&target)));
        }
        let target = VolumeTarget::open(
            volume,
            &req.seeds,
            self.replicas.clone(),
            self.target_options.clone(),
        )
        .await
        .map_err(|err| match err {
            OpenError::NoReplica(_) => Status::not_found(err.to_string()),
            OpenError::Membership { .. } => Status::unavailable(err.to_string()),
            OpenError::Fenced(_) => Status::aborted(err.to_string()),
        })?;
        self.registry.add_target(target.clone()).await;
        Ok(Response::new(self.target(&target)))
    }

    async fn close_target(
        &self,
        request: Request<CloseTargetRequest>,
    ) -> Result<Response<CloseTargetResponse>, Status> {
        let req = request.into_inner();
        let volume = required_name(&req.volume)?;
        let _one_at_a_time = self.target_changes.lock().await;
        self.registry
            .remove_target(volume)
            .await
            .ok_or_else(|| Status::not_found(format!("no target of {volume:?} on this node")))?;
        Ok(Response::new(CloseTargetResponse {}))
    }

    async fn create_snapshot(
        &self,
        request: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let req = request.into_inner();
        let volume = required_name(&req.volume)?;
        let name = required_name(&req.name)?;
        validate_volume_name(name).map_err(|e| {
            Status::invalid_argument(e.to_string().replace("volume name", "snapshot name"))
        })?;
        let target = self
            .registry
            .target(volume)
            .filter(|t| !t.is_fenced())
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "the target of {volume:?} is not open on this node"
                ))
            })?;
        let (nodes, uid) = target
            .snapshot(name, req.uid)
            .await
            .map_err(|err| match err {
                BlockError::NoSpace => Status::resource_exhausted(format!(
                    "no room for snapshot {name:?} of {volume:?}: {err}"
                )),
                other => Status::unavailable(other.to_string()),
            })?;
        Ok(Response::new(CreateSnapshotResponse { nodes, uid }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let req = request.into_inner();
        let name = required_name(&req.name)?;
        self.replicas
            .delete_snapshot(name, req.uid)
            .await
            .map_err(replica_status)?;
        Ok(Response::new(DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        _request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let snapshots = self
            .replicas
            .snapshots()
            .into_iter()
            .map(|s| Snapshot {
                name: s.name,
                volume: s.volume,
                node: self.identity.name.clone(),
                size_bytes: s.size,
                referenced_bytes: s.referenced,
                exclusive_bytes: s.exclusive,
                created_unix: s.created_unix,
                uid: s.uid,
            })
            .collect();
        Ok(Response::new(ListSnapshotsResponse { snapshots }))
    }

    async fn list_targets(
        &self,
        _request: Request<ListTargetsRequest>,
    ) -> Result<Response<ListTargetsResponse>, Status> {
        let targets = self
            .registry
            .targets()
            .iter()
            .map(|t| self.target(t))
            .collect();
        Ok(Response::new(ListTargetsResponse { targets }))
    }

    async fn replace_replica(
        &self,
        request: Request<ReplaceReplicaRequest>,
    ) -> Result<Response<Target>, Status> {
        let req = request.into_inner();
        let volume = required_name(&req.volume)?;
        let replacement = req
            .replacement
            .ok_or_else(|| Status::invalid_argument("replacement is required"))?;
        if replacement.node.is_empty() || replacement.address.is_empty() {
            return Err(Status::invalid_argument(
                "the replacement needs a node and an address",
            ));
        }
        let target = self
            .registry
            .target(volume)
            .filter(|t| !t.is_fenced())
            .ok_or_else(|| Status::not_found(format!("no target of {volume:?} on this node")))?;
        let member = Member {
            id: replacement.id,
            node: replacement.node,
            address: replacement.address,
        };
        target
            .replace_member(req.remove_id, member, req.keep_until_copied)
            .await
            .map_err(replace_status)?;
        Ok(Response::new(self.target(&target)))
    }

    async fn cancel_move(
        &self,
        request: Request<CancelMoveRequest>,
    ) -> Result<Response<CancelMoveResponse>, Status> {
        let req = request.into_inner();
        let volume = required_name(&req.volume)?;
        let target = self
            .registry
            .target(volume)
            .filter(|t| !t.is_fenced())
            .ok_or_else(|| Status::not_found(format!("no target of {volume:?} on this node")))?;
        let (stays, dropped) = target.cancel_move().await.map_err(replace_status)?;
        Ok(Response::new(CancelMoveResponse {
            target: Some(self.target(&target)),
            stays: Some(member_message(&stays)),
            dropped: Some(member_message(&dropped)),
        }))
    }
}

/// The status of a replacement, a move or a cancelled move that failed.
fn replace_status(err: ReplaceError) -> Status {
    match err {
        ReplaceError::Membership(_)
        | ReplaceError::NodeHoldsReplica(_)
        | ReplaceError::CannotMove { .. } => Status::failed_precondition(err.to_string()),
        ReplaceError::Fenced => Status::aborted(err.to_string()),
        ReplaceError::Change(_) => Status::unavailable(err.to_string()),
    }
}

/// Runs every call of the wrapped service to completion in a task of its
/// own. tonic drops a handler's future when its client goes away or times
/// out, and a pool or replica change cut off at an `.await` can leave memory
/// and disk apart: a volume created in memory whose checkpoint never ran, a
/// replica gone from the node's list but still in the pool. Detached, a call
/// finishes whatever becomes of its client; only the answer is lost.
#[derive(Clone)]
pub struct RunToCompletion<S>(pub S);

impl<S: tonic::server::NamedService> tonic::server::NamedService for RunToCompletion<S> {
    const NAME: &'static str = S::NAME;
}

/// What a detached call returns to tonic.
type DetachedCall<R, E> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<R, E>> + Send>>;

impl<S, B> tonic::codegen::Service<http::Request<B>> for RunToCompletion<S>
where
    S: tonic::codegen::Service<
            http::Request<B>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = DetachedCall<S::Response, S::Error>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> DetachedCall<S::Response, S::Error> {
        let call = tokio::spawn(self.0.call(request));
        Box::pin(async move {
            match call.await {
                Ok(answer) => answer,
                // A handler that panicked: the client gets an error, the
                // node goes on.
                Err(err) => {
                    tracing::error!(%err, "a gRPC call failed");
                    Ok(Status::internal("the call failed on the node").into_http())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use tonic::codegen::Service;

    use super::*;

    /// A call that takes a while and then notes that it finished.
    #[derive(Clone)]
    struct SlowCall(Arc<AtomicBool>);

    impl Service<http::Request<()>> for SlowCall {
        type Response = http::Response<tonic::body::Body>;
        type Error = std::convert::Infallible;
        type Future = DetachedCall<Self::Response, Self::Error>;

        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            let finished = self.0.clone();
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                finished.store(true, Ordering::SeqCst);
                Ok(http::Response::new(tonic::body::Body::empty()))
            })
        }
    }

    #[tokio::test]
    async fn a_call_whose_client_went_away_still_finishes() {
        let finished = Arc::new(AtomicBool::new(false));
        let mut service = RunToCompletion(SlowCall(finished.clone()));
        // The client goes away at once: tonic drops the call's future.
        drop(service.call(http::Request::new(())));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(finished.load(Ordering::SeqCst));

        // Waited for, it answers as the service does.
        let answer = service.call(http::Request::new(())).await.unwrap();
        assert_eq!(answer.status(), http::StatusCode::OK);
    }
}
