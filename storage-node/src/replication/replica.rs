//! A replica: one node's copy of a replicated volume, kept in a pool volume of
//! that node, and the node's set of replicas.
//!
//! The pool volume (`replica:NAME`) has one header block in front of the data.
//! The header holds what the replica persists about membership (its promised
//! epoch and the newest config it accepted, see `membership`) and the volume's
//! member list with the replication address of each member (it changes when
//! a replica is replaced: the config that replaces it carries the new list). The header
//! is written through the pool like data, checksummed and durable once the
//! write carried FUA; `header` says how a crash in the middle of a header
//! write leaves the header from before it.
//!
//! Every request is answered by [`Replica::handle`], for a remote target (the
//! replication server) and for a target on the same node alike.
//!
//! A snapshot of a replicated volume is, on each node holding it, a pool
//! snapshot (`replica:SNAPSHOT`) of the replica's pool volume, header block
//! included. A volume created from it starts as a pool clone of that snapshot
//! whose header is then rewritten for the new volume.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;

use super::header::{Header, HeaderBlock, HeaderError};
use super::lease::LastAccepted;
use super::membership::{self, Config, IoReply, Move, PrepareReply, ReplicaId, ReplicaState, Swap};
use super::wire::{
    ExpectedReplica, Op, Reply, Request, Status, FLAG_FUA, FLAG_NO_HOLE,
    FLAG_ONLY_IF_PROMISE_AT_MOST,
};
use crate::pool::{Pool, PoolError, Volume};
use crate::target::{BlockError, BlockTarget};

/// Bytes in front of the data in a replica's pool volume: its header.
pub use super::header::HEADER_BYTES;
/// The unit of comparison between replicas (digests) and of rebuild copies.
pub const EXTENT_BYTES: u64 = 1 << 20;
const POOL_VOLUME_PREFIX: &str = "replica:";

/// A member of a replicated volume: which replica, on which node, reached where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: u32,
    pub node: String,
    /// host:port of the node's replication endpoint.
    pub address: String,
}

/// A config as it travels and is stored: plain numbers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigRecord {
    pub epoch: u64,
    pub members: Vec<u32>,
    pub in_sync: Vec<u32>,
    /// A move under way (`membership::Move`): the member leaving and the
    /// one taking its place. Left out when none, so a config without a move
    /// is stored and sent as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leaving: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub successor: Option<u32>,
    /// The replacement that made this config, until settled
    /// (`membership::Swap`): the member taken out and the one put in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub added: Option<u32>,
}

impl From<&Config> for ConfigRecord {
    fn from(config: &Config) -> Self {
        ConfigRecord {
            epoch: config.epoch,
            members: config.members.iter().map(|id| id.0).collect(),
            in_sync: config.in_sync.iter().map(|id| id.0).collect(),
            leaving: config.moving.map(|m| m.leaving.0),
            successor: config.moving.map(|m| m.successor.0),
            removed: config.swapped.map(|swap| swap.removed.0),
            added: config.swapped.map(|swap| swap.added.0),
        }
    }
}

impl From<&ConfigRecord> for Config {
    fn from(record: &ConfigRecord) -> Self {
        Config {
            epoch: record.epoch,
            members: record.members.iter().map(|&id| ReplicaId(id)).collect(),
            in_sync: record.in_sync.iter().map(|&id| ReplicaId(id)).collect(),
            moving: record
                .leaving
                .zip(record.successor)
                .map(|(leaving, successor)| Move {
                    leaving: ReplicaId(leaving),
                    successor: ReplicaId(successor),
                }),
            swapped: record
                .removed
                .zip(record.added)
                .map(|(removed, added)| Swap {
                    removed: ReplicaId(removed),
                    added: ReplicaId(added),
                }),
        }
    }
}

/// The payload of `Op::Persist`: the config, and where each of its members
/// is, so a replica learns a new member list with the config that makes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistRecord {
    #[serde(flatten)]
    pub config: ConfigRecord,
    #[serde(default)]
    pub roster: Vec<Member>,
}

/// What a replica reports of itself (GetState, and refusals of Prepare).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRecord {
    pub volume: String,
    /// Which volume of that name (see `Header::volume_uid`).
    #[serde(default)]
    pub volume_uid: u64,
    pub replica_id: u32,
    pub members: Vec<Member>,
    pub size: u64,
    pub promised_epoch: u64,
    pub config: ConfigRecord,
    /// The highest replica id any member list this replica took named
    /// (see `Header::highest_member_id`).
    #[serde(default)]
    pub highest_member_id: u32,
    /// In the answer to a Prepare: how long the target that used this
    /// replica before may still serve reads (see `lease`). A newer target
    /// waits that long before it serves.
    #[serde(default)]
    pub lease_remaining_ms: u64,
}

/// This node's copy of a snapshot of a replicated volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaSnapshot {
    pub name: String,
    /// The replicated volume it was taken of.
    pub volume: String,
    /// Size of the volume when it was taken.
    pub size: u64,
    /// Bytes of data it refers to.
    pub referenced: u64,
    /// Bytes only it holds on this node (what deleting it frees).
    pub exclusive: u64,
    pub created_unix: u64,
    /// Which snapshot of that name (see [`snapshot_pool_name`]); 0 for a
    /// copy taken before snapshots had one.
    pub uid: u64,
}

/// The pool snapshot that holds this node's copy of snapshot `name` of a
/// replicated volume. The uid, drawn by the target that took the snapshot,
/// is the same in every copy of it and tells it from another snapshot of
/// the same name: a copy that a node down during `snapshot rm` kept, say,
/// which comes back next to a new snapshot taken under that name.
/// Snapshot names cannot hold '@', so the uid is what follows the last one.
fn snapshot_pool_name(name: &str, uid: u64) -> String {
    if uid == 0 {
        format!("{POOL_VOLUME_PREFIX}{name}")
    } else {
        format!("{POOL_VOLUME_PREFIX}{name}@{uid:016x}")
    }
}

/// The pool snapshots holding this node's copy of snapshot `name`, with
/// their uids: one at most, since a node takes one copy per name.
fn copies_named(pool: &Pool, name: &str) -> Vec<(String, u64)> {
    pool.list_snapshots()
        .into_iter()
        .filter_map(|info| {
            let (copy_name, uid) = parse_snapshot_pool_name(&info.name)?;
            (copy_name == name).then(|| (info.name.clone(), uid))
        })
        .collect()
}

/// The snapshot name and uid of a pool snapshot holding a copy; None for a
/// pool snapshot that is not one.
fn parse_snapshot_pool_name(pool_name: &str) -> Option<(&str, u64)> {
    let rest = pool_name.strip_prefix(POOL_VOLUME_PREFIX)?;
    match rest.rsplit_once('@') {
        Some((name, uid)) => Some((name, u64::from_str_radix(uid, 16).ok()?)),
        None => Some((rest, 0)),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("{0}")]
    Pool(#[from] PoolError),
    #[error("replica of volume {0:?} is not here")]
    NotFound(String),
    #[error("replica of volume {0:?} already exists")]
    AlreadyExists(String),
    #[error("snapshot {0:?} is not on this node")]
    SnapshotNotFound(String),
    /// This node's copy of the snapshot is of another snapshot of the name.
    #[error("{0}")]
    OtherSnapshot(String),
    #[error("{0}")]
    Invalid(String),
    /// The replica here is not the one a request named.
    #[error("{0}")]
    OtherReplica(String),
    #[error("replica header: {0}")]
    Header(String),
    #[error("{0}")]
    Block(#[from] BlockError),
}

pub struct Replica {
    pool: Arc<Pool>,
    volume_name: String,
    volume_uid: u64,
    replica_id: u32,
    /// Changed only under the `state` write lock, with the config.
    members: std::sync::RwLock<Vec<Member>>,
    data: Volume,
    /// Data requests hold it shared from the epoch check to their end; a
    /// configuration change holds it exclusively, so no request of an older
    /// epoch lands after a newer epoch was granted.
    state: RwLock<ReplicaState>,
    /// Chosen at random when this process loads or creates the replica, and
    /// told to every target in the Hello reply. A target that sees it change
    /// knows the replica restarted, and may have lost writes it took but had
    /// not made durable yet.
    incarnation: u64,
    /// When this replica last accepted a data request (see `lease`).
    last_accepted: LastAccepted,
    /// See `Header::highest_member_id`.
    highest_member_id: std::sync::atomic::AtomicU32,
    /// The header block as last written; header writes take turns under
    /// this lock (see `header`).
    header: tokio::sync::Mutex<HeaderBlock>,
}

impl Replica {
    pub fn volume_name(&self) -> &str {
        &self.volume_name
    }

    pub fn replica_id(&self) -> u32 {
        self.replica_id
    }

    pub fn members(&self) -> Vec<Member> {
        self.members.read().expect("members lock").clone()
    }

    /// Size of the replicated volume in bytes.
    pub fn size(&self) -> u64 {
        self.data.size() - HEADER_BYTES
    }

    pub fn allocated_bytes(&self, pool: &Pool) -> u64 {
        pool.volume_info(self.data.name())
            .map_or(0, |info| info.allocated.saturating_sub(HEADER_BYTES))
    }

    pub async fn state(&self) -> StateRecord {
        let state = self.state.read().await;
        self.record(&state)
    }

    fn record(&self, state: &ReplicaState) -> StateRecord {
        StateRecord {
            volume: self.volume_name.clone(),
            volume_uid: self.volume_uid,
            replica_id: self.replica_id,
            members: self.members(),
            size: self.size(),
            promised_epoch: state.promised_epoch,
            config: ConfigRecord::from(&state.config),
            highest_member_id: self
                .highest_member_id
                .load(std::sync::atomic::Ordering::Acquire),
            lease_remaining_ms: 0,
        }
    }

    async fn persist(&self, state: &ReplicaState) -> Result<(), BlockError> {
        self.persist_with(state, self.members()).await
    }

    async fn persist_with(
        &self,
        state: &ReplicaState,
        members: Vec<Member>,
    ) -> Result<(), BlockError> {
        let highest_member_id = highest_member_id(&members).max(
            self.highest_member_id
                .load(std::sync::atomic::Ordering::Acquire),
        );
        let header = Header {
            volume: self.volume_name.clone(),
            volume_uid: self.volume_uid,
            replica_id: self.replica_id,
            members,
            promised_epoch: state.promised_epoch,
            config: ConfigRecord::from(&state.config),
            highest_member_id,
        };
        let mut block = self.header.lock().await;
        for next in block.writes(&header).map_err(BlockError::Io)? {
            self.data.write(0, next.bytes(), true).await?;
            *block = next;
        }
        self.highest_member_id
            .fetch_max(highest_member_id, std::sync::atomic::Ordering::AcqRel);
        Ok(())
    }

    /// Answers one request. Never fails: every error is a status.
    pub async fn handle(&self, request: Request) -> Reply {
        let id = request.id;
        let (status, payload) = match self.execute(request).await {
            Ok(payload) => (Status::Ok, payload),
            Err((status, message)) => (status, Bytes::from(message)),
        };
        Reply {
            status,
            id,
            payload,
        }
    }

    async fn execute(&self, request: Request) -> Result<Bytes, (Status, Vec<u8>)> {
        match request.op {
            Op::Hello => {
                if let Some(expected) = request.expected_replica() {
                    self.check_identity(expected)
                        .map_err(|message| (Status::NotFound, message.into_bytes()))?;
                }
                Ok(self.incarnation.to_le_bytes().to_vec().into())
            }
            Op::GetState => Ok(json(&self.state().await).into()),
            Op::Prepare => {
                let mut state = self.state.write().await;
                let mut next = state.clone();
                let reply = if request.flags & FLAG_ONLY_IF_PROMISE_AT_MOST != 0 {
                    // The bound travels in the length field.
                    membership::replica_prepare_if_promise_at_most(
                        &mut next,
                        request.epoch,
                        request.length,
                    )
                } else {
                    membership::replica_prepare(&mut next, request.epoch)
                };
                match reply {
                    PrepareReply::Prepared { .. } => {
                        self.persist(&next).await.map_err(block_status)?;
                        *state = next;
                        let mut record = self.record(&state);
                        // Rounded up: the new target must not start early.
                        record.lease_remaining_ms =
                            self.last_accepted
                                .lease_remaining()
                                .as_micros()
                                .div_ceil(1000) as u64;
                        Ok(json(&record).into())
                    }
                    PrepareReply::Fenced { .. } => {
                        Err((Status::Fenced, json(&self.record(&state))))
                    }
                }
            }
            Op::Persist => {
                let PersistRecord {
                    config: record,
                    roster,
                } = serde_json::from_slice(&request.payload)
                    .map_err(|err| invalid(format!("config: {err}")))?;
                let config = Config::from(&record);
                let named: BTreeSet<u32> = record.members.iter().copied().collect();
                if named.len() != record.members.len()
                    || !record.in_sync.iter().all(|id| named.contains(id))
                {
                    return Err(invalid(
                        "config names a replica twice or a non-member".into(),
                    ));
                }
                let mut state = self.state.write().await;
                let known: BTreeSet<u32> = self.members().iter().map(|m| m.id).collect();
                // A new member list (a replacement) must come with the
                // address of every member.
                let members = if named == known {
                    None
                } else {
                    let members: Vec<Member> = record
                        .members
                        .iter()
                        .map(|id| roster.iter().find(|m| m.id == *id).cloned())
                        .collect::<Option<_>>()
                        .ok_or_else(|| invalid("config names members of unknown address".into()))?;
                    Some(members)
                };
                let mut next = state.clone();
                if !membership::replica_accept_config(&mut next, &config) {
                    return Err((Status::Fenced, json(&self.record(&state))));
                }
                let members_now = members.clone().unwrap_or_else(|| self.members());
                self.persist_with(&next, members_now)
                    .await
                    .map_err(block_status)?;
                if let Some(members) = members {
                    tracing::info!(
                        volume = %self.volume_name,
                        members = ?members.iter().map(|m| &m.node).collect::<Vec<_>>(),
                        "replica took a new member list"
                    );
                    *self.members.write().expect("members lock") = members;
                }
                *state = next;
                // For the read lease: the target that persisted this may
                // hold a lease granted under an older config, whose quorum
                // need not meet the next opener's (see `lease`).
                self.last_accepted.touch();
                Ok(json(&self.record(&state)).into())
            }
            Op::Snapshot => {
                let name = std::str::from_utf8(&request.payload)
                    .map_err(|_| invalid("snapshot name is not UTF-8".into()))?;
                crate::pool::validate_volume_name(name).map_err(|e| invalid(e.to_string()))?;
                // Shared, like a write: no configuration change meanwhile.
                let state = self.state.read().await;
                self.accept_io(&state, request.epoch)?;
                // The snapshot's uid travels in the offset field.
                let uid = request.offset;
                let pool_name = snapshot_pool_name(name, uid);
                // One copy per name on a node, whatever its uid.
                let same_name = |existing: &str| {
                    parse_snapshot_pool_name(existing).is_some_and(|(n, _)| n == name)
                };
                match self
                    .pool
                    .create_snapshot_unless(self.data.name(), &pool_name, same_name)
                    .await
                {
                    // The uid back: a target finds out that a replica of an
                    // older build, which ignores it, took the copy.
                    Ok(_) => Ok(Bytes::copy_from_slice(&uid.to_le_bytes())),
                    Err(PoolError::SnapshotExists(_)) => Err(invalid(format!(
                        "snapshot {name:?} already exists on this node"
                    ))),
                    Err(PoolError::NoSpace(msg)) => Err((Status::NoSpace, msg.into_bytes())),
                    Err(err) => Err((Status::Io, err.to_string().into_bytes())),
                }
            }
            Op::Read | Op::Write | Op::Flush | Op::Trim | Op::WriteZeroes | Op::Digest => {
                let state = self.state.read().await;
                self.accept_io(&state, request.epoch)?;
                self.data_request(&request).await.map_err(block_status)
            }
        }
    }

    /// Refuses a target that expects another replica than this one: epochs
    /// are only ordered within one replica's volume, so a target of a
    /// deleted volume, or one that knows an older member in this place,
    /// could otherwise send requests this replica takes for its own.
    pub fn check_identity(&self, expected: ExpectedReplica) -> Result<(), String> {
        if expected.replica_id == self.replica_id && expected.volume_uid == self.volume_uid {
            return Ok(());
        }
        Err(format!(
            "this node holds replica {} of volume {:?} (uid {}), not replica {} (uid {})",
            self.replica_id,
            self.volume_name,
            self.volume_uid,
            expected.replica_id,
            expected.volume_uid
        ))
    }

    /// Whether a request at `epoch` may touch the data (see
    /// `membership::replica_io`): the refusal to answer if not. An accepted
    /// one counts for the read lease.
    fn accept_io(&self, state: &ReplicaState, epoch: u64) -> Result<(), (Status, Vec<u8>)> {
        match membership::replica_io(state, epoch) {
            IoReply::Accepted => {
                self.last_accepted.touch();
                Ok(())
            }
            IoReply::Fenced { .. } => Err((Status::Fenced, json(&self.record(state)))),
            IoReply::Behind { .. } => Err((Status::Behind, Vec::new())),
        }
    }

    async fn data_request(&self, request: &Request) -> Result<Bytes, BlockError> {
        let fua = request.flags & FLAG_FUA != 0;
        let size = self.size();
        let range = |len: u64| match request.offset.checked_add(len) {
            Some(end) if end <= size => Ok(request.offset + HEADER_BYTES),
            _ => Err(BlockError::OutOfRange {
                offset: request.offset,
                len,
                size,
            }),
        };
        match request.op {
            Op::Read => {
                let len = u32::try_from(request.length)
                    .ok()
                    .filter(|&len| len <= super::wire::MAX_PAYLOAD)
                    .ok_or_else(|| BlockError::Io("read too large".into()))?;
                self.data.read(range(len as u64)?, len).await
            }
            Op::Write => {
                let at = range(request.payload.len() as u64)?;
                self.data
                    .write_owned(at, request.payload.clone(), fua)
                    .await?;
                Ok(Bytes::new())
            }
            Op::Flush => self.data.flush().await.map(|()| Bytes::new()),
            Op::Trim => {
                let at = range(request.length)?;
                self.data.trim(at, request.length).await?;
                Ok(Bytes::new())
            }
            Op::WriteZeroes => {
                let at = range(request.length)?;
                let allocate = request.flags & FLAG_NO_HOLE != 0;
                self.data
                    .write_zeroes(at, request.length, fua, allocate)
                    .await?;
                Ok(Bytes::new())
            }
            Op::Digest => {
                let extents = extent_count(size);
                let first = request.offset;
                let count = request.length.min(extents.saturating_sub(first));
                let digests = self.data.extent_digests(
                    HEADER_BYTES + first * EXTENT_BYTES,
                    count,
                    EXTENT_BYTES,
                    HEADER_BYTES + size,
                )?;
                Ok(digests
                    .iter()
                    .flat_map(|d| d.to_le_bytes())
                    .collect::<Vec<u8>>()
                    .into())
            }
            Op::Hello | Op::GetState | Op::Prepare | Op::Persist | Op::Snapshot => {
                unreachable!("not a data request")
            }
        }
    }
}

/// Number of extents of a volume of `size` bytes (the last may be partial).
pub fn extent_count(size: u64) -> u64 {
    size.div_ceil(EXTENT_BYTES)
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("plain records serialize")
}

fn invalid(message: String) -> (Status, Vec<u8>) {
    (Status::Invalid, message.into_bytes())
}

fn block_status(err: BlockError) -> (Status, Vec<u8>) {
    let status = match &err {
        BlockError::Io(_) => Status::Io,
        BlockError::Checksum(_) => Status::Checksum,
        BlockError::NoSpace => Status::NoSpace,
        BlockError::OutOfRange { .. } => Status::OutOfRange,
        BlockError::ReadOnly => Status::Invalid,
        BlockError::Gone => Status::NotFound,
    };
    (status, err.to_string().into_bytes())
}

/// Which replica a new one is: of which volume, and which member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaIdentity<'a> {
    pub volume: &'a str,
    /// See `Header::volume_uid`.
    pub volume_uid: u64,
    pub replica_id: u32,
}

/// What a new replica holds when it is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaStart<'a> {
    /// Nothing: one of a fresh volume's replicas, all in sync at epoch 0.
    Empty,
    /// The data of this node's copy of the named snapshot, for a volume
    /// cloned from it: in sync like `Empty`. When `uid` is given, a copy of
    /// another snapshot of that name is refused.
    Snapshot { name: &'a str, uid: Option<u64> },
    /// Nothing, out of sync: it replaces a member of an existing volume,
    /// and a target's rebuild fills it.
    Replacement,
}

/// The replicas held by one node.
pub struct Replicas {
    pool: Arc<Pool>,
    by_volume: Mutex<HashMap<String, Arc<Replica>>>,
    /// Replicas kept in the pool whose header cannot be read, by volume
    /// name, with why: not served, deleted only with their volume.
    unreadable: Mutex<HashMap<String, String>>,
}

impl Replicas {
    /// Finds the replicas in the pool. A replica whose creation never
    /// finished (no header, or a clone's that still names its source) is
    /// deleted: nobody was told it exists. One whose header cannot be read
    /// is left alone, unused: its data may be all a volume has left.
    pub async fn load(pool: Arc<Pool>) -> Result<Arc<Replicas>, ReplicaError> {
        let mut by_volume = HashMap::new();
        let mut unreadable = HashMap::new();
        for info in pool.list_volumes() {
            let Some(volume_name) = info.name.strip_prefix(POOL_VOLUME_PREFIX) else {
                continue;
            };
            let data = pool.volume(&info.name).expect("listed volume exists");
            let block = match data.read(0, HEADER_BYTES as u32).await {
                Ok(block) => block,
                Err(err) => {
                    tracing::error!(
                        volume = volume_name,
                        %err,
                        "cannot read the replica's header; the replica is kept in the pool but not served"
                    );
                    unreadable.insert(volume_name.to_string(), err.to_string());
                    continue;
                }
            };
            // A volume cloned from a snapshot starts with the source's
            // header until its own is written: such a clone is unfinished.
            let header = match HeaderBlock::decode(&block) {
                Ok((h, block)) if h.volume == volume_name => Ok((h, block)),
                Ok((h, _)) => Err(format!("header names volume {:?}", h.volume)),
                Err(err @ HeaderError::Damaged(_)) => {
                    tracing::error!(
                        volume = volume_name,
                        %err,
                        "the replica's header does not decode; the replica is kept in the pool but not served"
                    );
                    unreadable.insert(volume_name.to_string(), err.to_string());
                    continue;
                }
                Err(err @ HeaderError::Missing) => Err(err.to_string()),
            };
            match header {
                Ok((header, header_block)) => {
                    let highest = highest_member_id(&header.members)
                        .max(header.highest_member_id)
                        .max(header.replica_id);
                    let replica = Replica {
                        pool: pool.clone(),
                        volume_name: header.volume.clone(),
                        volume_uid: header.volume_uid,
                        replica_id: header.replica_id,
                        highest_member_id: highest.into(),
                        members: std::sync::RwLock::new(header.members),
                        data,
                        state: RwLock::new(ReplicaState {
                            promised_epoch: header.promised_epoch,
                            config: Config::from(&header.config),
                        }),
                        incarnation: uuid::Uuid::new_v4().as_u64_pair().0,
                        last_accepted: LastAccepted::default(),
                        header: tokio::sync::Mutex::new(header_block),
                    };
                    by_volume.insert(volume_name.to_string(), Arc::new(replica));
                }
                Err(err) => {
                    tracing::warn!(volume = volume_name, %err, "removing an unfinished replica");
                    pool.delete_volume(&info.name).await?;
                }
            }
        }
        Ok(Arc::new(Replicas {
            pool,
            by_volume: Mutex::new(by_volume),
            unreadable: Mutex::new(unreadable),
        }))
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    pub fn get(&self, volume: &str) -> Option<Arc<Replica>> {
        self.by_volume
            .lock()
            .expect("replicas lock")
            .get(volume)
            .cloned()
    }

    /// Every replica, by volume name.
    pub fn list(&self) -> Vec<Arc<Replica>> {
        let mut list: Vec<Arc<Replica>> = self
            .by_volume
            .lock()
            .expect("replicas lock")
            .values()
            .cloned()
            .collect();
        list.sort_by(|a, b| a.volume_name.cmp(&b.volume_name));
        list
    }

    /// Creates replica `replica_id` of a fresh volume whose members are
    /// `members`: epoch 0, every member in sync (all are empty).
    pub async fn create(
        &self,
        volume: &str,
        size: u64,
        replica_id: u32,
        members: Vec<Member>,
    ) -> Result<Arc<Replica>, ReplicaError> {
        let id = ReplicaIdentity {
            volume,
            volume_uid: 0,
            replica_id,
        };
        self.create_from(id, size, members, ReplicaStart::Empty)
            .await
    }

    /// Like [`Replicas::create`], starting as `start` says: from this node's
    /// copy of a snapshot (sharing its blocks; `size` may be larger than the
    /// snapshot's), or out of sync as the replacement of a member.
    pub async fn create_from(
        &self,
        id: ReplicaIdentity<'_>,
        size: u64,
        members: Vec<Member>,
        start: ReplicaStart<'_>,
    ) -> Result<Arc<Replica>, ReplicaError> {
        let ReplicaIdentity {
            volume,
            volume_uid,
            replica_id,
        } = id;
        let snapshot = match start {
            ReplicaStart::Snapshot { name, uid } => Some((name, uid)),
            ReplicaStart::Empty | ReplicaStart::Replacement => None,
        };
        crate::pool::validate_volume_name(volume)?;
        let ids: BTreeSet<u32> = members.iter().map(|m| m.id).collect();
        if ids.len() != members.len() || !ids.contains(&replica_id) {
            return Err(ReplicaError::Invalid(format!(
                "replica {replica_id} must be one of the members, each id once"
            )));
        }
        if self.get(volume).is_some() {
            return Err(ReplicaError::AlreadyExists(volume.to_string()));
        }
        let pool_name = format!("{POOL_VOLUME_PREFIX}{volume}");
        let size = size.next_multiple_of(4096);
        match snapshot {
            None => {
                self.pool
                    .create_internal_volume(&pool_name, size + HEADER_BYTES)
                    .await?;
            }
            Some((snapshot, uid)) => {
                let Some((pool_snapshot, copy_uid)) =
                    copies_named(&self.pool, snapshot).into_iter().next()
                else {
                    return Err(ReplicaError::SnapshotNotFound(snapshot.to_string()));
                };
                if uid.is_some_and(|uid| uid != copy_uid) {
                    return Err(ReplicaError::OtherSnapshot(format!(
                        "this node's copy of snapshot {snapshot:?} is of another snapshot of \
                         that name (uid {copy_uid:016x}, not {:016x})",
                        uid.unwrap_or_default()
                    )));
                }
                // The copied header (the source volume's) is rewritten below.
                self.pool
                    .create_volume_from_snapshot(
                        &pool_name,
                        &pool_snapshot,
                        Some(size + HEADER_BYTES),
                    )
                    .await?;
            }
        }
        let data = self.pool.volume(&pool_name).expect("just created");
        let ids = members.iter().map(|m| ReplicaId(m.id)).collect();
        let state = match start {
            ReplicaStart::Replacement => ReplicaState::replacement(ids),
            ReplicaStart::Empty | ReplicaStart::Snapshot { .. } => ReplicaState::new(ids),
        };
        let replica = Arc::new(Replica {
            pool: self.pool.clone(),
            volume_name: volume.to_string(),
            volume_uid,
            replica_id,
            highest_member_id: highest_member_id(&members).max(replica_id).into(),
            members: std::sync::RwLock::new(members),
            data,
            state: RwLock::new(state.clone()),
            incarnation: uuid::Uuid::new_v4().as_u64_pair().0,
            last_accepted: LastAccepted::never(),
            header: tokio::sync::Mutex::new(HeaderBlock::fresh()),
        });
        if let Err(err) = replica.persist(&state).await {
            let _ = self.pool.delete_volume(&pool_name).await;
            return Err(err.into());
        }
        self.by_volume
            .lock()
            .expect("replicas lock")
            .insert(volume.to_string(), replica.clone());
        tracing::info!(volume, replica_id, size, "created replica");
        Ok(replica)
    }

    pub async fn delete(
        &self,
        volume: &str,
        only_if: Option<ExpectedReplica>,
    ) -> Result<(), ReplicaError> {
        if self
            .unreadable
            .lock()
            .expect("replicas lock")
            .contains_key(volume)
        {
            return self.delete_unreadable(volume, only_if).await;
        }
        let replica = {
            let mut by_volume = self.by_volume.lock().expect("replicas lock");
            let replica = by_volume
                .get(volume)
                .ok_or_else(|| ReplicaError::NotFound(volume.to_string()))?;
            if let Some(expected) = only_if {
                replica
                    .check_identity(expected)
                    .map_err(ReplicaError::OtherReplica)?;
            }
            by_volume.remove(volume).expect("just found")
        };
        if let Err(err) = self
            .pool
            .delete_volume(&format!("{POOL_VOLUME_PREFIX}{volume}"))
            .await
        {
            // The pool still has it (a failed delete changes nothing): it
            // stays a replica this node lists and serves.
            self.by_volume
                .lock()
                .expect("replicas lock")
                .insert(volume.to_string(), replica);
            return Err(err.into());
        }
        tracing::info!(volume, "deleted replica");
        Ok(())
    }

    /// Deletes a replica whose header cannot be read, when its volume is
    /// deleted (`only_if` None). Which replica it is cannot be told, so a
    /// deletion of one replica by id leaves it alone.
    async fn delete_unreadable(
        &self,
        volume: &str,
        only_if: Option<ExpectedReplica>,
    ) -> Result<(), ReplicaError> {
        if only_if.is_some() {
            return Err(ReplicaError::OtherReplica(format!(
                "the replica of {volume:?} here has an unreadable header; it goes only with its volume"
            )));
        }
        self.pool
            .delete_volume(&format!("{POOL_VOLUME_PREFIX}{volume}"))
            .await?;
        self.unreadable
            .lock()
            .expect("replicas lock")
            .remove(volume);
        tracing::info!(volume, "deleted a replica whose header could not be read");
        Ok(())
    }

    /// The copies of replicated-volume snapshots this node holds.
    pub fn snapshots(&self) -> Vec<ReplicaSnapshot> {
        self.pool
            .list_snapshots()
            .into_iter()
            .filter_map(|info| {
                let (name, uid) = parse_snapshot_pool_name(&info.name)?;
                let volume = info.source.strip_prefix(POOL_VOLUME_PREFIX)?.to_string();
                Some(ReplicaSnapshot {
                    name: name.to_string(),
                    uid,
                    volume,
                    size: info.size.saturating_sub(HEADER_BYTES),
                    referenced: info.referenced.saturating_sub(HEADER_BYTES),
                    exclusive: info.exclusive,
                    created_unix: info.created_unix,
                })
            })
            .collect()
    }

    /// Deletes this node's copy of snapshot `name`; with `uid`, only if it
    /// is a copy of that snapshot of the name.
    pub async fn delete_snapshot(&self, name: &str, uid: Option<u64>) -> Result<(), ReplicaError> {
        let mut copies = copies_named(&self.pool, name);
        copies.retain(|&(_, copy_uid)| uid.is_none_or(|uid| uid == copy_uid));
        if copies.is_empty() {
            return Err(ReplicaError::SnapshotNotFound(name.to_string()));
        }
        for (pool_name, _) in copies {
            match self.pool.delete_snapshot(&pool_name).await {
                // Deleted meanwhile by another call.
                Err(crate::pool::PoolError::SnapshotNotFound(_)) => {}
                other => other?,
            }
        }
        Ok(())
    }

    /// Grows the replica to `size` bytes of data.
    pub async fn resize(&self, volume: &str, size: u64) -> Result<(), ReplicaError> {
        if self.get(volume).is_none() {
            return Err(ReplicaError::NotFound(volume.to_string()));
        }
        self.pool
            .resize_volume(
                &format!("{POOL_VOLUME_PREFIX}{volume}"),
                size.next_multiple_of(4096) + HEADER_BYTES,
            )
            .await?;
        Ok(())
    }
}

/// The highest id in a member list.
fn highest_member_id(members: &[Member]) -> u32 {
    members.iter().map(|m| m.id).max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::metrics::Metrics;
    use crate::pool::PoolOptions;
    use crate::replication::lease::LEASE;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_snapshot_copy_is_named_with_its_uid() {
        let pool_name = snapshot_pool_name("nightly.2", 0xab);
        assert_eq!(pool_name, "replica:nightly.2@00000000000000ab");
        assert_eq!(
            parse_snapshot_pool_name(&pool_name),
            Some(("nightly.2", 0xab))
        );
        // Copies taken before snapshots had uids.
        assert_eq!(snapshot_pool_name("old", 0), "replica:old");
        assert_eq!(parse_snapshot_pool_name("replica:old"), Some(("old", 0)));
        // Not a replicated volume's copy, or not a uid after the '@'.
        assert_eq!(parse_snapshot_pool_name("plain"), None);
        assert_eq!(parse_snapshot_pool_name("replica:x@yz"), None);
        // The longest name a user may give still makes a pool name.
        let longest = "n".repeat(128);
        crate::pool::validate_volume_name(&longest).unwrap();
        assert!(snapshot_pool_name(&longest, u64::MAX).len() <= 128 + 32);
    }

    async fn open_pool(path: &std::path::Path) -> Arc<Pool> {
        let options = PoolOptions {
            create_size: Some(64 * MIB),
            ..PoolOptions::default()
        };
        Pool::open(path, &options, Arc::new(Metrics::new()))
            .await
            .unwrap()
    }

    fn members() -> Vec<Member> {
        (1..=3)
            .map(|id| Member {
                id,
                node: format!("node-{id}"),
                address: format!("127.0.0.1:{}", 7000 + id),
            })
            .collect()
    }

    async fn create(replicas: &Replicas, volume_uid: u64) -> Arc<Replica> {
        let id = ReplicaIdentity {
            volume: "db",
            volume_uid,
            replica_id: 2,
        };
        replicas
            .create_from(id, 4 * MIB, members(), ReplicaStart::Empty)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_hello_naming_another_replica_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let replicas = Replicas::load(open_pool(&dir.path().join("pool")).await)
            .await
            .unwrap();
        let replica = create(&replicas, 77).await;
        let hello = |replica_id, volume_uid| {
            Request::hello(
                "db",
                Some(ExpectedReplica {
                    replica_id,
                    volume_uid,
                }),
            )
        };
        assert_eq!(replica.handle(hello(2, 77)).await.status, Status::Ok);
        assert_eq!(
            replica.handle(Request::hello("db", None)).await.status,
            Status::Ok
        );
        // Another member's id, or the same id of another volume of the name.
        for (id, uid) in [(1, 77), (2, 76), (2, 0)] {
            let reply = replica.handle(hello(id, uid)).await;
            assert_eq!(reply.status, Status::NotFound, "replica {id}, uid {uid}");
            let message = String::from_utf8(reply.payload.to_vec()).unwrap();
            assert!(
                message.contains("holds replica 2") && message.contains("uid 77"),
                "{message}"
            );
        }
        assert!(replica
            .check_identity(ExpectedReplica {
                replica_id: 2,
                volume_uid: 77
            })
            .is_ok());
    }

    #[tokio::test]
    async fn a_replica_whose_deletion_fails_is_still_served() {
        let dir = tempfile::tempdir().unwrap();
        let options = PoolOptions {
            create_size: Some(64 * MIB),
            engine: crate::engine::EngineKind::Sync,
            ..PoolOptions::default()
        };
        let pool = Pool::open(&dir.path().join("pool"), &options, Arc::new(Metrics::new()))
            .await
            .unwrap();
        let replicas = Replicas::load(pool.clone()).await.unwrap();
        create(&replicas, 5).await;
        pool.faults().fail_syncs_after(0);
        assert!(replicas.delete("db", None).await.is_err());
        pool.faults().heal();
        assert!(
            replicas.get("db").is_some(),
            "the pool kept it: still listed"
        );
        replicas.delete("db", None).await.unwrap();
        assert!(replicas.get("db").is_none());
    }

    /// Stops `replicas` and their pool cleanly, as a node stop does, then
    /// opens the pool at `path` again and loads its replicas.
    async fn restart(
        path: &std::path::Path,
        pool: Arc<Pool>,
        replicas: Arc<Replicas>,
    ) -> (Arc<Pool>, Arc<Replicas>) {
        drop(replicas);
        pool.close().await.unwrap();
        drop(pool);
        let pool = open_pool(path).await;
        let replicas = Replicas::load(pool.clone()).await.unwrap();
        (pool, replicas)
    }

    /// Prepare(epoch) on `replica`, which persists its promise.
    async fn prepare(replica: &Replica, epoch: u64) {
        let reply = replica.handle(Request::new(Op::Prepare, 1, epoch)).await;
        assert_eq!(reply.status, Status::Ok, "prepare {epoch}");
    }

    /// A config persisted counts for the read lease, as a data request
    /// does: its target may hold a lease granted under an older member list,
    /// whose quorum need not meet the next opener's (see `lease`).
    #[tokio::test]
    async fn a_persisted_config_counts_for_the_read_lease() {
        let dir = tempfile::tempdir().unwrap();
        let replicas = Replicas::load(open_pool(&dir.path().join("pool")).await)
            .await
            .unwrap();
        let replica = create(&replicas, 5).await;
        let lease_remaining_ms = |reply: Reply| {
            assert_eq!(reply.status, Status::Ok);
            serde_json::from_slice::<StateRecord>(&reply.payload)
                .unwrap()
                .lease_remaining_ms
        };
        // Fresh: no target used it, the next one need not wait.
        let reply = replica.handle(Request::new(Op::Prepare, 1, 1)).await;
        assert_eq!(lease_remaining_ms(reply), 0);

        let config = Config {
            epoch: 1,
            ..Config::initial(vec![ReplicaId(1), ReplicaId(2), ReplicaId(3)])
        };
        let mut persist = Request::new(Op::Persist, 1, 1);
        persist.payload = serde_json::to_vec(&PersistRecord {
            config: ConfigRecord::from(&config),
            roster: Vec::new(),
        })
        .unwrap()
        .into();
        assert_eq!(replica.handle(persist).await.status, Status::Ok);
        let reply = replica.handle(Request::new(Op::Prepare, 1, 2)).await;
        let remaining = lease_remaining_ms(reply);
        assert!(
            remaining > LEASE.as_millis() as u64 / 2,
            "{remaining} ms of the lease left"
        );
    }

    #[tokio::test]
    async fn a_torn_header_write_leaves_the_promise_made_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool");
        let pool = open_pool(&path).await;
        let replicas = Replicas::load(pool.clone()).await.unwrap();
        let replica = create(&replicas, 5).await;
        prepare(&replica, 1).await;
        prepare(&replica, 2).await;

        // The header write of a promise of epoch 3, torn by a crash: only
        // the first 100 bytes of the slot it replaced landed, and the pool,
        // as its scan after an unclean stop does for an in-place write,
        // took what is there as the block's data.
        let mut header = replica.header.lock().await.bytes().to_vec();
        let (mut third, block) = HeaderBlock::decode(&header).unwrap();
        third.promised_epoch = 3;
        let writes = block.writes(&third).unwrap();
        let [written] = &writes[..] else {
            panic!("a slot write is one write")
        };
        let torn_slot = written.newest_slot_range().unwrap();
        let landed = torn_slot.start..torn_slot.start + 100;
        header[landed.clone()].copy_from_slice(&written.bytes()[landed]);
        replica.data.write(0, &header, true).await.unwrap();
        drop(replica);

        let (pool, replicas) = restart(&path, pool, replicas).await;
        let replica = replicas.get("db").expect("the replica is served");
        assert_eq!(replica.state().await.promised_epoch, 2);
        // It goes on from there, and its next promise is kept.
        prepare(&replica, 3).await;
        drop(replica);
        let (_pool, replicas) = restart(&path, pool, replicas).await;
        assert_eq!(replicas.get("db").unwrap().state().await.promised_epoch, 3);
    }

    #[tokio::test]
    async fn a_replica_whose_header_fails_its_checksum_is_kept_until_its_volume_goes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool");
        let pool = open_pool(&path).await;
        let replicas = Replicas::load(pool.clone()).await.unwrap();
        create(&replicas, 5).await;
        pool.close().await.unwrap();
        drop(replicas);
        drop(pool);

        // Damage the header block where it lies in the pool file.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut block = vec![0u8; HEADER_BYTES as usize];
        let mut at = 0u64;
        loop {
            file.read_exact_at(&mut block, at).unwrap();
            if super::super::header::looks_like_header(&block) {
                break;
            }
            at += HEADER_BYTES;
        }
        file.write_all_at(b"X", at + 20).unwrap();

        let pool = open_pool(&path).await;
        let replicas = Replicas::load(pool.clone()).await.unwrap();
        assert!(
            replicas.get("db").is_none(),
            "a replica with a bad header is not served"
        );
        let names = |pool: &Pool| -> Vec<String> {
            pool.list_volumes().into_iter().map(|v| v.name).collect()
        };
        let kept = format!("{POOL_VOLUME_PREFIX}db");
        assert!(names(&pool).contains(&kept), "its data is kept");
        // A deletion by id cannot tell it is that replica; the volume's
        // deletion takes it.
        let by_id = ExpectedReplica {
            replica_id: 2,
            volume_uid: 5,
        };
        assert!(matches!(
            replicas.delete("db", Some(by_id)).await,
            Err(ReplicaError::OtherReplica(_))
        ));
        assert!(names(&pool).contains(&kept));
        replicas.delete("db", None).await.unwrap();
        assert!(!names(&pool).contains(&kept));
        // A replica whose creation never finished (no header) still goes.
        pool.create_internal_volume(&format!("{POOL_VOLUME_PREFIX}half"), 4 * MIB)
            .await
            .unwrap();
        drop(replicas);
        Replicas::load(pool.clone()).await.unwrap();
        assert!(!names(&pool).contains(&format!("{POOL_VOLUME_PREFIX}half")));
    }
}
