//! CSI snapshots (CreateSnapshot, DeleteSnapshot, ListSnapshots) and
//! volumes created from a snapshot or cloned from a volume.
//!
//! Snapshot ids are the storage side's snapshot names, as volume ids are
//! volume names. A snapshot is ready when CreateSnapshot returns: every
//! in-sync replica took its copy-on-write copy, no data is uploaded. A
//! clone of a volume is a snapshot, a volume from it, and the snapshot's
//! deletion: the new volume shares blocks with the source and owes it nothing.

use strata_node::cluster::volumes::VolumeError;
use strata_proto::csi::volume_content_source::Type as SourceType;
use strata_proto::csi::*;

use super::{
    check_page_request, page, range_bytes, require, round_up, ControllerService,
    CO_PARAMETER_PREFIX,
};
use crate::backend::BackendSnapshot;
use crate::error::{CsiError, CsiResult};

/// Where a new volume's data comes from.
#[derive(Debug, Clone)]
pub(super) enum Source {
    Snapshot(String),
    Volume(String),
}

/// The snapshot a new volume is created from, and its size.
pub(super) struct CloneFrom {
    pub snapshot: String,
    pub size_bytes: u64,
    /// Taken for this clone only (of a source volume): deleted afterwards.
    pub temporary: bool,
}

pub(super) fn content_source(source: Option<&VolumeContentSource>) -> CsiResult<Option<Source>> {
    let Some(source) = source else {
        return Ok(None);
    };
    match &source.r#type {
        Some(SourceType::Snapshot(s)) => Ok(Some(Source::Snapshot(
            require(&s.snapshot_id, "volume_content_source.snapshot.snapshot_id")?.to_string(),
        ))),
        Some(SourceType::Volume(v)) => Ok(Some(Source::Volume(
            require(&v.volume_id, "volume_content_source.volume.volume_id")?.to_string(),
        ))),
        None => Err(CsiError::invalid(
            "volume_content_source needs a snapshot or a volume",
        )),
    }
}

fn check_snapshot_name(name: &str) -> CsiResult<()> {
    strata_node::pool::validate_volume_name(name).map_err(|e| {
        CsiError::invalid(format!("snapshot name: {e}").replace("volume name", "name"))
    })
}

fn csi_snapshot(snapshot: &BackendSnapshot) -> Snapshot {
    Snapshot {
        size_bytes: snapshot.size_bytes as i64,
        snapshot_id: snapshot.name.clone(),
        source_volume_id: snapshot.source_volume.clone(),
        creation_time: Some(prost_types::Timestamp {
            seconds: snapshot.created_unix as i64,
            nanos: 0,
        }),
        ready_to_use: snapshot.copies > 0,
        group_snapshot_id: String::new(),
    }
}

/// The name of the snapshot a clone of `volume` is made through.
fn clone_snapshot_name(volume: &str) -> String {
    const SUFFIX: &str = ".clone-source";
    let keep = volume.len().min(128 - SUFFIX.len());
    format!("{}{SUFFIX}", &volume[..keep])
}

impl ControllerService {
    async fn snapshot(&self, id: &str) -> CsiResult<BackendSnapshot> {
        self.backend
            .list_snapshots()
            .await?
            .into_iter()
            .find(|s| s.name == id)
            .ok_or_else(|| CsiError::NotFound(format!("snapshot {id:?} does not exist")))
    }

    /// The snapshot volume `name` is created from, and its size: the
    /// snapshot's (or source volume's) size, or more when the range asks.
    pub(super) async fn snapshot_to_clone(
        &self,
        name: &str,
        source: &Source,
        range: Option<&CapacityRange>,
    ) -> CsiResult<CloneFrom> {
        let (required, limit) = range_bytes(range)?;
        let (snapshot, source_size, what) = match source {
            Source::Snapshot(id) => {
                let snapshot = self.snapshot(id).await?;
                (id.clone(), snapshot.size_bytes, format!("snapshot {id}"))
            }
            Source::Volume(id) => {
                let volume = self.existing(id).await?;
                (
                    clone_snapshot_name(name),
                    volume.size_bytes,
                    format!("volume {id}"),
                )
            }
        };
        let size_bytes = round_up(required).max(source_size);
        if limit > 0 && size_bytes > limit {
            return Err(CsiError::OutOfRange(format!(
                "{what} is {source_size} bytes and a volume from it cannot be smaller; \
                 limit_bytes is {limit}"
            )));
        }
        let temporary = matches!(source, Source::Volume(_));
        if let Source::Volume(id) = source {
            let _busy = self.inflight.begin(id, "CreateVolume (clone source)")?;
            // A leftover of an earlier attempt (its deletion failed) would be
            // taken for this one, and hold older data than the call asks
            // for. A copy on a node that does not answer now cannot be mixed
            // in: it has another uid, and the clone is refused.
            let _ = self.backend.delete_snapshot(&snapshot).await;
            self.backend.create_snapshot(id, &snapshot).await?;
        }
        Ok(CloneFrom {
            snapshot,
            size_bytes,
            temporary,
        })
    }

    pub(super) async fn drop_temporary_snapshot(&self, name: &str) {
        match self.backend.delete_snapshot(name).await {
            Ok(()) | Err(VolumeError::SnapshotNotFound(_)) => {}
            // Left for the next clone of the same name, or for an operator.
            Err(err) => {
                tracing::warn!(snapshot = name, %err, "could not delete a clone's snapshot")
            }
        }
    }

    pub(super) async fn create_snapshot_of(
        &self,
        req: CreateSnapshotRequest,
    ) -> CsiResult<Snapshot> {
        let volume = require(&req.source_volume_id, "source_volume_id")?;
        let name = require(&req.name, "name")?;
        check_snapshot_name(name)?;
        if let Some(key) = req
            .parameters
            .keys()
            .find(|k| !k.starts_with(CO_PARAMETER_PREFIX))
        {
            return Err(CsiError::invalid(format!(
                "unknown snapshot parameter {key:?}; strata-csi takes none"
            )));
        }
        let _busy = self
            .inflight
            .begin(&format!("snapshot {name}"), "CreateSnapshot")?;
        // The snapshot may open the volume's target for its while: no
        // publish, unpublish or delete of the volume meanwhile.
        let _source_busy = self.inflight.begin(volume, "CreateSnapshot")?;
        let snapshot = self.backend.create_snapshot(volume, name).await?;
        Ok(csi_snapshot(&snapshot))
    }

    pub(super) async fn delete_snapshot_by_id(&self, req: DeleteSnapshotRequest) -> CsiResult<()> {
        let id = require(&req.snapshot_id, "snapshot_id")?;
        let _busy = self
            .inflight
            .begin(&format!("snapshot {id}"), "DeleteSnapshot")?;
        match self.backend.delete_snapshot(id).await {
            Ok(()) | Err(VolumeError::SnapshotNotFound(_)) => Ok(()),
            Err(err) => Err(err.into()),
        }
    }

    pub(super) async fn list_snapshot_page(
        &self,
        req: ListSnapshotsRequest,
    ) -> CsiResult<ListSnapshotsResponse> {
        check_page_request(req.max_entries, &req.starting_token, "ListSnapshots")?;
        let snapshots: Vec<BackendSnapshot> = self
            .backend
            .list_snapshots()
            .await?
            .into_iter()
            .filter(|s| req.snapshot_id.is_empty() || s.name == req.snapshot_id)
            .filter(|s| req.source_volume_id.is_empty() || s.source_volume == req.source_volume_id)
            .collect();
        let (page, next_token) = page(
            &snapshots,
            |s| &s.name,
            &req.starting_token,
            req.max_entries,
        );
        Ok(ListSnapshotsResponse {
            entries: page
                .iter()
                .map(|s| list_snapshots_response::Entry {
                    snapshot: Some(csi_snapshot(s)),
                })
                .collect(),
            next_token,
        })
    }
}
