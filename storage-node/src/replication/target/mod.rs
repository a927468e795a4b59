//! The volume target: serves a replicated volume (as a [`BlockTarget`], so the
//! NBD frontend exports it) by sending every request to the replicas.
//!
//! * Opening fences every older target: epoch e+1 is granted and the new
//!   config persisted on a majority of the members before any I/O
//!   (`membership::plan_open`).
//! * A write, trim, write-zeroes or flush goes to every in-sync replica at
//!   once and is acknowledged when all have it. A replica that errs or does
//!   not answer in time is first dropped from the in-sync set, persisted on a
//!   majority under a new epoch (`membership::plan_shrink`); only then is the
//!   request acknowledged. Without a majority, the request fails.
//! * A read goes to one in-sync replica (the local one when there is one).
//!   A block that fails its checksum there is read from another in-sync
//!   replica, returned, and rewritten on the bad one.
//! * A replica that answers "fenced" means a newer target owns the volume:
//!   this target fails every request from then on.
//!
//! * Replacing a replica (`replace_member`) changes the member list in a
//!   configuration change that needs a majority of the old and of the new
//!   list; the new, empty replica is then filled by the rebuilder (`replace`).
//!   A healthy replica is moved rather than replaced: it leaves only in the
//!   change that takes its successor in sync.
//!
//! Configuration changes wait for the requests in flight (`gate`), so the
//! target never fences its own requests.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::join_all;
use futures::stream::{FuturesUnordered, StreamExt};

mod rebuild;
mod replace;
mod scrub;
mod sweep;
pub use rebuild::RebuildProgress;
pub use replace::{ReplaceError, Replacement};

use super::client::{LinkError, ReplicaClient};
use super::lease::{self, ReadLease};
use super::membership::{self, Config, IoReply, ReplicaId, WriteOutcome};
use super::replica::{ConfigRecord, Member, PersistRecord, Replica, Replicas, StateRecord};
use super::wire::{
    ExpectedReplica, Op, Reply, Request, Status, FLAG_FUA, FLAG_NO_HOLE,
    FLAG_ONLY_IF_PROMISE_AT_MOST,
};
use crate::range_lock::RangeLock;
use crate::target::{BlockError, BlockResult, BlockTarget};

/// How often the request path tries to reconnect a lost replica.
const RECONNECT_INTERVAL: Duration = Duration::from_secs(1);

/// Why a target could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("no replica of volume {0:?} could be reached")]
    NoReplica(String),
    #[error("cannot open volume {volume:?}: {reason}")]
    Membership { volume: String, reason: String },
    #[error("volume {0:?} is being opened by a newer target")]
    Fenced(String),
}

#[derive(Debug, Clone)]
pub struct TargetOptions {
    /// This node's name: a member on it is reached in-process.
    pub node: String,
    /// How long a replica may take to answer before it counts as failed.
    pub timeout: Duration,
    /// Bytes per second a rebuild may copy, or a scrub read (0: unlimited).
    pub rebuild_rate: u64,
    /// Time between scrub passes (zero: no scrub).
    pub scrub_interval: Duration,
    /// How the target finds other nodes, to delete the replicas it replaced
    /// and to replace faulted ones on its own (None: it does neither).
    pub replacement: Option<Replacement>,
    /// Runtimes for the tasks that carry links to remote replicas, one
    /// picked per volume (empty: wherever the link is made). A node passes
    /// the single-threaded runtimes its NBD connections run on, so a request
    /// and its replicas' replies need not wake a thread of another runtime.
    pub link_runtimes: Vec<tokio::runtime::Handle>,
}

/// How a target reaches one replica.
enum Link {
    Local(Arc<Replica>),
    Remote(ReplicaClient),
}

impl Link {
    async fn call(&self, request: Request, timeout: Duration) -> Result<Reply, LinkError> {
        match self {
            Link::Local(replica) => Ok(replica.handle(request).await),
            Link::Remote(client) => client.call(request, timeout).await,
        }
    }

    fn is_alive(&self) -> bool {
        match self {
            Link::Local(_) => true,
            Link::Remote(client) => client.is_alive(),
        }
    }
}

/// A member as this target knows it, with its link. Slots are only ever
/// appended (a replacement adds one), so an index names the same member for
/// the life of the target; the config says which slots are members now.
struct Slot {
    member: Member,
    link: Mutex<LinkSlot>,
    /// After a failed rebuild of the member: when the rebuilder may try
    /// again, and the wait that led there.
    rebuild_backoff: Mutex<Option<(Instant, Duration)>>,
}

impl Slot {
    fn new(member: Member) -> Arc<Slot> {
        Arc::new(Slot {
            member,
            link: Mutex::default(),
            rebuild_backoff: Mutex::default(),
        })
    }
}

#[derive(Default)]
struct LinkSlot {
    link: Option<Arc<Link>>,
    last_attempt: Option<Instant>,
    /// The replica's incarnation as of the last connection to it.
    incarnation: Option<u64>,
    /// The replica restarted while in sync: whatever it had not made durable
    /// is gone, so it takes no data request until it has left the in-sync
    /// set and been rebuilt. Connecting again does not clear this.
    restarted: bool,
}

/// What one replica made of a request.
#[derive(Debug, Clone)]
enum Answer {
    Done(Bytes),
    /// Refused with a status other than Ok.
    Refused(Status, String),
    /// Not reachable, or no answer in time.
    Lost(LinkError),
}

/// A replica's state as `describe` shows it.
#[derive(Debug, Clone)]
pub struct ReplicaView {
    pub member: Member,
    pub in_sync: bool,
    pub connected: bool,
    /// Set while the replica is being caught up.
    pub rebuild: Option<RebuildProgress>,
}

pub struct VolumeTarget {
    volume: String,
    /// Which volume of that name (see `StateRecord::volume_uid`): every link
    /// checks that the replica at the other end is the member it expects.
    volume_uid: u64,
    options: TargetOptions,
    local: Arc<Replicas>,
    slots: RwLock<Vec<Arc<Slot>>>,
    config: RwLock<Arc<Config>>,
    /// Requests hold it shared; configuration changes exclusively.
    gate: tokio::sync::RwLock<()>,
    fenced: AtomicBool,
    /// The highest epoch this target asked replicas to prepare.
    max_prepared: AtomicU64,
    /// The highest epoch this target sent a config for (round 2).
    max_persisted: AtomicU64,
    on_epoch_change: Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
    /// Set when the target is closed: background work stops.
    closed: AtomicBool,
    size: AtomicU64,
    ranges: Arc<RangeLock>,
    next_read: AtomicUsize,
    repaired_blocks: AtomicU64,
    scrub_passes: AtomicU64,
    /// Members being caught up, by member index: they take every write but
    /// are not in sync yet.
    rebuilding: Mutex<BTreeMap<usize, RebuildProgress>>,
    /// Requests that some in-sync replica failed and whose shrink has not
    /// finished: until it has, the in-sync replicas may differ, so no
    /// snapshot is taken.
    unsettled: AtomicUsize,
    /// Replicas that left the volume (replaced or moved) whose data may
    /// still be on their node: node name by replica id, for the replacer to
    /// delete.
    replaced: Mutex<BTreeMap<u32, String>>,
    /// Set when a replica was replaced, so the replacer deletes it at once
    /// rather than on its next periodic round.
    cleanup_due: AtomicBool,
    /// Until when this target may serve reads (see `lease`).
    lease: ReadLease,
}

/// Counts a request in [`VolumeTarget::unsettled`] while it lives.
struct Unsettled<'a>(&'a AtomicUsize);

impl<'a> Unsettled<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        Unsettled(counter)
    }
}

impl Drop for Unsettled<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl VolumeTarget {
    /// Opens `volume`, finding its members through a local replica or one of
    /// `seeds` (replication addresses of nodes that hold a replica).
    pub async fn open(
        volume: &str,
        seeds: &[String],
        local: Arc<Replicas>,
        options: TargetOptions,
    ) -> Result<Arc<VolumeTarget>, OpenError> {
        Self::open_with(volume, seeds, local, options, None).await
    }

    /// Opens `volume` only if no replica has promised an epoch above
    /// `epoch`: the target this node served before it restarted comes back,
    /// unless another target has opened the volume since.
    pub async fn reopen(
        volume: &str,
        seeds: &[String],
        local: Arc<Replicas>,
        options: TargetOptions,
        epoch: u64,
    ) -> Result<Arc<VolumeTarget>, OpenError> {
        Self::open_with(volume, seeds, local, options, Some(epoch)).await
    }

    async fn open_with(
        volume: &str,
        seeds: &[String],
        local: Arc<Replicas>,
        options: TargetOptions,
        promise_at_most: Option<u64>,
    ) -> Result<Arc<VolumeTarget>, OpenError> {
        let state = match local.get(volume) {
            Some(replica) => replica.state().await,
            None => find_state(volume, seeds, options.timeout).await?,
        };
        let target = Arc::new(VolumeTarget {
            volume: volume.to_string(),
            volume_uid: state.volume_uid,
            slots: RwLock::new(state.members.iter().cloned().map(Slot::new).collect()),
            config: RwLock::new(Arc::new(Config::from(&state.config))),
            gate: tokio::sync::RwLock::new(()),
            fenced: AtomicBool::new(false),
            max_prepared: AtomicU64::new(0),
            max_persisted: AtomicU64::new(0),
            on_epoch_change: Mutex::new(None),
            closed: AtomicBool::new(false),
            size: AtomicU64::new(state.size),
            ranges: RangeLock::new(),
            next_read: AtomicUsize::new(0),
            repaired_blocks: AtomicU64::new(0),
            scrub_passes: AtomicU64::new(0),
            rebuilding: Mutex::new(BTreeMap::new()),
            unsettled: AtomicUsize::new(0),
            replaced: Mutex::new(BTreeMap::new()),
            cleanup_due: AtomicBool::new(false),
            lease: ReadLease::default(),
            options,
            local,
        });
        target.fence_and_plan(promise_at_most).await?;
        // The replica opened from may be one that a partly failed resize
        // grew: the volume is as large as its smallest in-sync replica, and
        // the replicas are compared over that size.
        target.take_smallest_size(false).await;
        target
            .reconcile_in_sync()
            .await
            .map_err(|err| OpenError::Membership {
                volume: volume.to_string(),
                reason: err.to_string(),
            })?;
        // The config opened from may come from a replacement whose target
        // stopped before settling it.
        {
            let _exclusive = target.gate.write().await;
            target.settle_replacement().await;
        }
        if target.is_fenced() {
            return Err(OpenError::Fenced(volume.to_string()));
        }
        rebuild::spawn_rebuilder(&target);
        scrub::spawn_scrubber(&target);
        spawn_lease_keeper(&target);
        replace::spawn_replacer(&target);
        replace::sweep_for(&target);
        Ok(target)
    }

    /// Rounds 1 and 2 of opening, retried with a higher epoch when another
    /// target got in between.
    async fn fence_and_plan(&self, promise_at_most: Option<u64>) -> Result<(), OpenError> {
        let membership_error = |reason: String| OpenError::Membership {
            volume: self.volume.clone(),
            reason,
        };
        let mut seen_promises = Vec::new();
        for attempt in 0..5 {
            let ids = self.member_ids();
            let all: Vec<usize> = (0..ids.len()).collect();
            let states = self.ask(&all, |_| Request::new(Op::GetState, 0, 0)).await;
            for answer in states.values() {
                if let Answer::Done(payload) = answer {
                    if let Ok(state) = serde_json::from_slice::<StateRecord>(payload) {
                        seen_promises.push(state.promised_epoch);
                    }
                }
            }
            let epoch = membership::next_epoch(seen_promises.iter().copied());
            self.note_prepared(epoch);
            let answers = self
                .ask(&all, |_| {
                    let mut request = Request::new(Op::Prepare, 0, epoch);
                    if let Some(at_most) = promise_at_most {
                        request.flags = FLAG_ONLY_IF_PROMISE_AT_MOST;
                        request.length = at_most;
                    }
                    request
                })
                .await;
            let mut prepared = Vec::new();
            let mut rosters = Vec::new();
            let mut fenced = false;
            let mut serve_after = Instant::now();
            for (index, answer) in &answers {
                match answer {
                    Answer::Done(payload) => {
                        let state: StateRecord = serde_json::from_slice(payload)
                            .map_err(|e| membership_error(format!("bad state: {e}")))?;
                        serve_after = serve_after
                            .max(Instant::now() + Duration::from_millis(state.lease_remaining_ms));
                        prepared.push((ReplicaId(self.id_of(*index)), Config::from(&state.config)));
                        rosters.push(state);
                    }
                    Answer::Refused(Status::Fenced, message) => {
                        fenced = true;
                        if let Ok(state) = serde_json::from_slice::<StateRecord>(message.as_bytes())
                        {
                            seen_promises.push(state.promised_epoch);
                        }
                    }
                    _ => {}
                }
            }
            if fenced && promise_at_most.is_some() {
                // Another target opened the volume since: leave it to that one.
                return Err(OpenError::Fenced(self.volume.clone()));
            }
            let config = match membership::plan_open(&ids, epoch, &prepared) {
                Ok(config) => config,
                Err(membership::OpenError::NoMajority { .. }) if fenced => {
                    tokio::time::sleep(open_retry_pause(attempt)).await;
                    continue;
                }
                Err(membership::OpenError::OtherMembers { .. }) => {
                    // A replica was replaced since the state this target
                    // started from: ask the members of the newest config.
                    let newest = rosters
                        .into_iter()
                        .max_by_key(|state| state.config.epoch)
                        .expect("another config was answered");
                    tracing::info!(
                        volume = %self.volume,
                        members = ?newest.members.iter().map(|m| &m.node).collect::<Vec<_>>(),
                        "the volume has other members now; asking them"
                    );
                    *self.slots.write().expect("slots lock") =
                        newest.members.iter().cloned().map(Slot::new).collect();
                    *self.config.write().expect("config lock") =
                        Arc::new(Config::from(&newest.config));
                    continue;
                }
                Err(err) => return Err(membership_error(err.to_string())),
            };
            match self.persist(&config, &config).await {
                Ok(()) => {
                    // The previous target may still serve reads until then.
                    // Not on a reopen: the previous target was this node's
                    // own, in the process that died.
                    let wait = match promise_at_most {
                        Some(_) => Duration::ZERO,
                        None => serve_after.saturating_duration_since(Instant::now()),
                    };
                    if !wait.is_zero() {
                        tracing::info!(
                            volume = %self.volume,
                            ?wait,
                            "waiting out the previous target's read lease"
                        );
                        tokio::time::sleep(wait).await;
                    }
                    tracing::info!(
                        volume = %self.volume,
                        epoch,
                        in_sync = ?config.in_sync,
                        "volume target opened"
                    );
                    self.install(config);
                    return Ok(());
                }
                Err(PersistError::Fenced) => {
                    tokio::time::sleep(open_retry_pause(attempt)).await;
                    continue;
                }
                Err(PersistError::NoQuorum(reason)) => return Err(membership_error(reason)),
            }
        }
        Err(OpenError::Fenced(self.volume.clone()))
    }

    /// The ids of every slot (during open: the member list it plans with).
    fn member_ids(&self) -> Vec<ReplicaId> {
        self.slots
            .read()
            .expect("slots lock")
            .iter()
            .map(|slot| ReplicaId(slot.member.id))
            .collect()
    }

    fn slot(&self, index: usize) -> Arc<Slot> {
        self.slots.read().expect("slots lock")[index].clone()
    }

    /// Where this volume's remote links run (see [`TargetOptions::link_runtimes`]).
    fn link_runtime(&self) -> Option<&tokio::runtime::Handle> {
        let runtimes = &self.options.link_runtimes;
        if runtimes.is_empty() {
            return None;
        }
        let hash = crc32fast::hash(self.volume.as_bytes()) as usize;
        Some(&runtimes[hash % runtimes.len()])
    }

    fn member(&self, index: usize) -> Member {
        self.slot(index).member.clone()
    }

    fn node_of(&self, index: usize) -> String {
        self.slot(index).member.node.clone()
    }

    fn id_of(&self, index: usize) -> u32 {
        self.slot(index).member.id
    }

    fn index_of(&self, id: ReplicaId) -> usize {
        self.slots
            .read()
            .expect("slots lock")
            .iter()
            .position(|slot| slot.member.id == id.0)
            .expect("config names known members only")
    }

    /// The slots of the members of `config`.
    fn member_indexes(&self, config: &Config) -> Vec<usize> {
        config.members.iter().map(|&id| self.index_of(id)).collect()
    }

    /// The members a change from `before` to `after` must ask: both lists.
    fn change_indexes(&self, before: &Config, after: &Config) -> Vec<usize> {
        let mut indexes = self.member_indexes(before);
        for index in self.member_indexes(after) {
            if !indexes.contains(&index) {
                indexes.push(index);
            }
        }
        indexes
    }

    /// Round 2 of a configuration change from `before`: `config` must be
    /// taken by a quorum of both configs and by every replica it names in
    /// sync.
    async fn persist(&self, before: &Config, config: &Config) -> Result<(), PersistError> {
        self.max_persisted.fetch_max(config.epoch, Ordering::AcqRel);
        let request = self.persist_request(config);
        let all = self.change_indexes(before, config);
        let answers = self.ask(&all, |_| request.clone()).await;
        let mut accepted = BTreeSet::new();
        let mut problems = Vec::new();
        for (index, answer) in &answers {
            let node = &self.node_of(*index);
            match answer {
                Answer::Done(_) => {
                    accepted.insert(ReplicaId(self.id_of(*index)));
                }
                Answer::Refused(Status::Fenced, _) => return Err(PersistError::Fenced),
                Answer::Refused(status, message) => {
                    problems.push(format!("{node}: {status:?}: {message}"))
                }
                Answer::Lost(err) => problems.push(format!("{node}: {err}")),
            }
        }
        if !membership::change_quorum_reached(before, config, &accepted) {
            return Err(PersistError::NoQuorum(format!(
                "only {} of {} replicas took epoch {} ({})",
                accepted.len(),
                config.members.len(),
                config.epoch,
                problems.join("; ")
            )));
        }
        if let Some(missing) = config.in_sync.iter().find(|id| !accepted.contains(id)) {
            return Err(PersistError::NoQuorum(format!(
                "in-sync replica {missing} did not take epoch {}",
                config.epoch
            )));
        }
        Ok(())
    }

    /// Round 2's request: the config, with the address of each member, so a
    /// replica learns a new member list with the config that makes it.
    fn persist_request(&self, config: &Config) -> Request {
        let roster: Vec<Member> = self
            .member_indexes(config)
            .into_iter()
            .map(|index| self.member(index))
            .collect();
        let mut request = Request::new(Op::Persist, 0, config.epoch);
        request.payload = serde_json::to_vec(&PersistRecord {
            config: ConfigRecord::from(config),
            roster,
        })
        .expect("config serializes")
        .into();
        request
    }

    /// Sends a request to each replica in `indexes` at once (connecting to
    /// those not connected) and collects the answers.
    async fn ask(
        &self,
        indexes: &[usize],
        make: impl Fn(usize) -> Request,
    ) -> BTreeMap<usize, Answer> {
        self.call_each(indexes, true, make).await
    }

    /// Sends `make(index)` to each replica in `indexes` at once and collects
    /// the answers; `wait` as for [`VolumeTarget::connect`].
    async fn call_each(
        &self,
        indexes: &[usize],
        wait: bool,
        make: impl Fn(usize) -> Request,
    ) -> BTreeMap<usize, Answer> {
        let calls = indexes.iter().map(|&index| {
            let request = make(index);
            async move { (index, self.call_one(index, wait, request).await) }
        });
        join_all(calls).await.into_iter().collect()
    }

    /// Sends `request` to member `index`; `wait` as for [`VolumeTarget::connect`].
    async fn call_one(&self, index: usize, wait: bool, request: Request) -> Answer {
        match self.connect(index, wait).await {
            // Checked once connected: connecting is what finds out.
            Ok(_) if request.op.carries_data() && self.restarted(index) => {
                Answer::Lost(LinkError::Closed(format!(
                    "replica on {} restarted and may have lost writes; it serves again once rebuilt",
                    self.node_of(index)
                )))
            }
            Ok(link) => match link.call(request, self.options.timeout).await {
                Ok(reply) if reply.status == Status::Ok => Answer::Done(reply.payload),
                Ok(reply) => Answer::Refused(
                    reply.status,
                    String::from_utf8_lossy(&reply.payload).into_owned(),
                ),
                Err(err) => {
                    self.drop_link(index, &link);
                    Answer::Lost(err)
                }
            },
            Err(err) => Answer::Lost(err),
        }
    }

    /// The link to member `index`, (re)connected if needed. Without `wait`
    /// (the request path), a member whose connection failed less than
    /// `RECONNECT_INTERVAL` ago counts as lost at once instead.
    async fn connect(&self, index: usize, wait: bool) -> Result<Arc<Link>, LinkError> {
        // This slot throughout: a new member may take the index's place
        // meanwhile (see `replace_member`), and this link is not its.
        let slot = self.slot(index);
        {
            let mut slot = slot.link.lock().expect("link lock");
            if let Some(link) = &slot.link {
                if link.is_alive() {
                    return Ok(link.clone());
                }
                slot.link = None;
            }
            let tried_recently = slot
                .last_attempt
                .is_some_and(|at| at.elapsed() < RECONNECT_INTERVAL);
            if !wait && tried_recently {
                return Err(LinkError::Closed(format!(
                    "replica on {} is not connected",
                    self.node_of(index)
                )));
            }
            slot.last_attempt = Some(Instant::now());
        }
        let member = slot.member.clone();
        let expected = self.expected_replica(member.id);
        let link = if member.node == self.options.node {
            match self.local.get(&self.volume) {
                Some(replica) => {
                    replica
                        .check_identity(expected)
                        .map_err(LinkError::Refused)?;
                    Link::Local(replica)
                }
                None => {
                    return Err(LinkError::Refused(format!(
                        "no replica of {} on this node",
                        self.volume
                    )))
                }
            }
        } else {
            Link::Remote(
                ReplicaClient::connect(
                    &member.address,
                    &self.volume,
                    Some(expected),
                    self.options.timeout,
                    self.link_runtime(),
                )
                .await?,
            )
        };
        let incarnation = match &link {
            Link::Local(_) => None,
            Link::Remote(client) => client.incarnation(),
        };
        let link = Arc::new(link);
        let in_sync = self.current().in_sync.contains(&ReplicaId(member.id));
        let restarted_while_rebuilt = {
            let mut link_slot = slot.link.lock().expect("link lock");
            let restarted = matches!(
                (link_slot.incarnation, incarnation),
                (Some(known), Some(now)) if known != now
            );
            if restarted && in_sync && !link_slot.restarted {
                tracing::warn!(
                    volume = %self.volume,
                    node = %member.node,
                    "replica restarted; it is dropped from the in-sync set and rebuilt"
                );
                link_slot.restarted = true;
            }
            link_slot.incarnation = incarnation.or(link_slot.incarnation);
            link_slot.link = Some(link.clone());
            restarted && !in_sync
        };
        // A replica being caught up that restarted lost what it had not
        // made durable (copies and writes alike): its rebuild starts over,
        // comparing again, rather than go on to the grow without them.
        if restarted_while_rebuilt && Arc::ptr_eq(&slot, &self.slot(index)) {
            self.abort_rebuild(index, "the replica restarted");
        }
        Ok(link)
    }

    /// Replica `replica_id` of this target's volume, as a link or a deletion
    /// names it to a node.
    fn expected_replica(&self, replica_id: u32) -> ExpectedReplica {
        ExpectedReplica {
            replica_id,
            volume_uid: self.volume_uid,
        }
    }

    /// Whether member `index` restarted while in sync (see [`LinkSlot`]).
    fn restarted(&self, index: usize) -> bool {
        self.slot(index).link.lock().expect("link lock").restarted
    }

    /// Forgets `failed` as member `index`'s link, unless a newer one took its
    /// place. A call on an old link can fail after a reconnect (it timed out
    /// on a connection the partition ate); dropping the new link then would
    /// make the next request find the member "not connected" and shrink it
    /// out of the in-sync set although it answers.
    fn drop_link(&self, index: usize, failed: &Arc<Link>) {
        let slot = self.slot(index);
        let mut slot = slot.link.lock().expect("link lock");
        if slot
            .link
            .as_ref()
            .is_some_and(|link| Arc::ptr_eq(link, failed))
        {
            slot.link = None;
        }
    }

    /// Makes `config` (persisted on a majority) the one requests use, and
    /// tells whoever keeps a record of this target's epoch.
    fn install(&self, config: Config) {
        let metrics = self.local.pool().metrics();
        let labels = self.labels();
        metrics
            .target_in_sync_replicas
            .get_or_create(&labels)
            .set(config.in_sync.len() as i64);
        metrics
            .target_epoch
            .get_or_create(&labels)
            .set(config.epoch as i64);
        // A restarted replica is trusted again once it is out of sync: from
        // there, only a rebuild brings it back.
        for slot in self.slots.read().expect("slots lock").iter() {
            if !config.in_sync.contains(&ReplicaId(slot.member.id)) {
                slot.link.lock().expect("link lock").restarted = false;
            }
        }
        *self.config.write().expect("config lock") = Arc::new(config);
        let listener = self.on_epoch_change.lock().expect("listener lock").clone();
        if let Some(listener) = listener {
            listener();
        }
    }

    /// Calls `listener` after every configuration change from now on.
    pub fn set_epoch_listener(&self, listener: Arc<dyn Fn() + Send + Sync>) {
        *self.on_epoch_change.lock().expect("listener lock") = Some(listener);
    }

    /// The highest epoch this target sent a config for. A target that
    /// opened the volume since did so at a higher epoch, promised by a
    /// majority, so a reopen conditional on promises at most this one sees
    /// it. (The highest epoch this target prepared is no such bound: while
    /// cut off, its changes prepare epochs on a minority only, which can be
    /// above the epoch of a target opened on the majority side.)
    pub fn max_persisted_epoch(&self) -> u64 {
        self.max_persisted.load(Ordering::Acquire)
    }

    /// The replication addresses of the members.
    pub fn member_addresses(&self) -> Vec<String> {
        self.member_indexes(&self.current())
            .into_iter()
            .map(|index| self.member(index).address)
            .collect()
    }

    fn labels(&self) -> crate::metrics::VolumeLabels {
        crate::metrics::VolumeLabels {
            volume: self.volume.clone(),
        }
    }

    fn current(&self) -> Arc<Config> {
        self.config.read().expect("config lock").clone()
    }

    fn fenced_error(&self) -> BlockError {
        BlockError::Io(format!(
            "volume {} was opened by a newer target; this one no longer serves it",
            self.volume
        ))
    }

    /// Sends a modifying request to every in-sync replica; returns once all
    /// have it, after shrinking out those that failed.
    async fn replicate(&self, make: impl Fn(u64) -> Request) -> BlockResult<()> {
        let mut reconnected = false;
        loop {
            if self.fenced.load(Ordering::Acquire) {
                return Err(self.fenced_error());
            }
            let gate = self.gate.read().await;
            let config = self.current();
            let in_sync: Vec<usize> = config.in_sync.iter().map(|&id| self.index_of(id)).collect();
            let rebuilding = self.rebuilding_indexes();
            let mut fan_out = in_sync.clone();
            fan_out.extend(rebuilding.iter().filter(|i| !in_sync.contains(i)));
            let sent = Instant::now();
            let mut answers = self.send_io(&fan_out, |_| make(config.epoch)).await;
            // Most writes find the lease far from its end: no count for them.
            if self.lease.ends_within(lease::LEASE / 2) && self.majority_accepted(&config, &answers)
            {
                self.lease.extend(sent);
            }
            let _unsettled = answers
                .iter()
                .any(|(i, a)| in_sync.contains(i) && !matches!(a, Answer::Done(_)))
                .then(|| Unsettled::new(&self.unsettled));
            // Before the gate is let go: the grow that would add a member
            // to the in-sync set waits for it exclusively, and must find the
            // rebuild of one that missed this request stopped, or took it
            // when no in-sync replica did (all refused it: no space, say),
            // so that its copy differs from theirs.
            let in_sync_took_it = answers
                .iter()
                .any(|(i, a)| in_sync.contains(i) && matches!(a, Answer::Done(_)));
            for index in rebuilding {
                if in_sync.contains(&index) {
                    continue;
                }
                match answers.remove(&index) {
                    Some(Answer::Done(_)) if in_sync_took_it => {}
                    Some(Answer::Done(_)) => {
                        self.abort_rebuild(index, "took a request every in-sync replica refused")
                    }
                    Some(answer) => self.abort_rebuild(index, &format!("{answer:?}")),
                    None => {}
                }
            }
            drop(gate);
            // A refusal at an epoch this target asked for itself (in a
            // configuration change that did not reach a majority) is no
            // fence: the target completes a change at a newer epoch and
            // sends the request again.
            let mut own_epoch_refusals = BTreeSet::new();
            let mut replies: BTreeMap<ReplicaId, IoReply> = BTreeMap::new();
            for (&index, answer) in &answers {
                let id = ReplicaId(self.id_of(index));
                match answer {
                    Answer::Done(_) => {
                        replies.insert(id, IoReply::Accepted);
                    }
                    Answer::Refused(Status::Fenced, payload) => match self.fence_kind(payload) {
                        Fence::Own => {
                            own_epoch_refusals.insert(id);
                        }
                        Fence::Foreign(promised_epoch) => {
                            replies.insert(id, IoReply::Fenced { promised_epoch });
                        }
                    },
                    Answer::Refused(Status::Behind, _) => {
                        replies.insert(
                            id,
                            IoReply::Behind {
                                promised_epoch: config.epoch.saturating_sub(1),
                            },
                        );
                    }
                    _ => {}
                }
            }
            match membership::decide_write(&config, &replies) {
                WriteOutcome::Acknowledge => return Ok(()),
                WriteOutcome::Fenced => {
                    self.set_fenced();
                    return Err(self.fenced_error());
                }
                WriteOutcome::Shrink { failed } => {
                    // The same client error from every replica (no space,
                    // out of range) is the request's fault, not theirs.
                    if let Some(err) = common_client_error(answers.values()) {
                        return Err(err);
                    }
                    let failed: BTreeSet<ReplicaId> =
                        failed.difference(&own_epoch_refusals).copied().collect();
                    for (index, answer) in &answers {
                        if failed.contains(&ReplicaId(self.id_of(*index))) {
                            tracing::warn!(
                                volume = %self.volume,
                                node = %self.node_of(*index),
                                ?answer,
                                "replica failed a request"
                            );
                        }
                    }
                    // Once per request, a replica that only lost its
                    // connection may be kept (see `shrink_or_keep`).
                    let reconnectable: BTreeSet<ReplicaId> = answers
                        .iter()
                        .filter(|(_, answer)| {
                            !reconnected
                                && matches!(answer, Answer::Lost(err) if !matches!(err, LinkError::Timeout(_)))
                        })
                        .map(|(index, _)| ReplicaId(self.id_of(*index)))
                        .collect();
                    let kept = self.shrink_or_keep(&failed, &reconnectable).await?;
                    if !kept.is_empty() {
                        // They missed the request: send it again.
                        reconnected = true;
                        continue;
                    }
                    if own_epoch_refusals.is_empty() {
                        // Every replica still in sync took the request.
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Whose epoch a "fenced" refusal is about: one this target prepared
    /// itself, or a newer target's.
    fn fence_kind(&self, payload: &str) -> Fence {
        match serde_json::from_str::<StateRecord>(payload) {
            Ok(state) if state.promised_epoch <= self.max_prepared.load(Ordering::Acquire) => {
                Fence::Own
            }
            Ok(state) => Fence::Foreign(state.promised_epoch),
            Err(_) => Fence::Foreign(u64::MAX),
        }
    }

    /// Records that this target sent Prepare(epoch).
    fn note_prepared(&self, epoch: u64) {
        self.max_prepared.fetch_max(epoch, Ordering::AcqRel);
    }

    /// Like `ask`, for data requests: no connection attempt in the request
    /// path (a lost replica fails at once).
    async fn send_io(
        &self,
        indexes: &[usize],
        make: impl Fn(usize) -> Request,
    ) -> BTreeMap<usize, Answer> {
        self.call_each(indexes, false, make).await
    }

    fn set_fenced(&self) {
        if !self.fenced.swap(true, Ordering::AcqRel) {
            tracing::error!(volume = %self.volume, "fenced by a newer target; failing all I/O");
        }
    }

    /// Round 1 of a change to this target's own config (shrink, grow) at
    /// `epoch`: the members that granted it, or `None` when the target
    /// turned out to be fenced (a replica refused, or one that granted holds
    /// a config this target did not persist).
    async fn prepare_own_change(&self, all: &[usize], epoch: u64) -> Option<BTreeSet<ReplicaId>> {
        if epoch > self.current().epoch + 1 {
            // Changes of this target failed before, so its epoch may be
            // above that of a target opened since. Reading the states
            // changes nothing: a target that was cut off and comes back
            // finds the newer target's config here and stops before its
            // promise fences that target.
            let states = self.ask(all, |_| Request::new(Op::GetState, 0, 0)).await;
            self.own_change_allowed(&states)?;
        }
        self.note_prepared(epoch);
        let answers = self.ask(all, |_| Request::new(Op::Prepare, 0, epoch)).await;
        if answers
            .values()
            .any(|answer| matches!(answer, Answer::Refused(Status::Fenced, _)))
        {
            self.set_fenced();
            return None;
        }
        self.own_change_allowed(&answers)
    }

    /// The members whose answers carry a state, if none holds a config this
    /// target did not persist; otherwise the target is fenced.
    fn own_change_allowed(&self, answers: &BTreeMap<usize, Answer>) -> Option<BTreeSet<ReplicaId>> {
        let mut configs = Vec::new();
        for (index, answer) in answers {
            if let Answer::Done(payload) = answer {
                match serde_json::from_slice::<StateRecord>(payload) {
                    Ok(state) => {
                        configs.push((ReplicaId(self.id_of(*index)), Config::from(&state.config)))
                    }
                    Err(err) => tracing::warn!(
                        volume = %self.volume,
                        node = %self.node_of(*index),
                        %err,
                        "bad replica state"
                    ),
                }
            }
        }
        let own = self.max_persisted.load(Ordering::Acquire);
        if let Err(deposed) = membership::check_own_change(own, &configs) {
            tracing::error!(volume = %self.volume, %deposed, "stopping this target");
            self.set_fenced();
            return None;
        }
        Some(configs.into_iter().map(|(id, _)| id).collect())
    }

    /// Drops `failed` from the in-sync set: both rounds at a new epoch.
    async fn shrink(&self, failed: &BTreeSet<ReplicaId>) -> BlockResult<()> {
        self.shrink_or_keep(failed, &BTreeSet::new())
            .await
            .map(|_| ())
    }

    /// Like [`shrink`](Self::shrink), but keeps in sync the replicas of
    /// `reconnectable` (they failed a request by a lost connection, not by a
    /// timeout or a refusal) that take part in the change's first round from
    /// the same process as before: they have every write they acknowledged,
    /// and a connection that dropped, or was not re-made yet after a
    /// partition healed, is no reason to leave the volume with fewer copies.
    /// Returns those kept; the caller sends its request to them again.
    async fn shrink_or_keep(
        &self,
        failed: &BTreeSet<ReplicaId>,
        reconnectable: &BTreeSet<ReplicaId>,
    ) -> BlockResult<BTreeSet<ReplicaId>> {
        let mut kept = BTreeSet::new();
        let _exclusive = self.gate.write().await;
        if self.fenced.load(Ordering::Acquire) {
            return Err(self.fenced_error());
        }
        let current = self.current();
        let mut failed: BTreeSet<ReplicaId> =
            failed.intersection(&current.in_sync).copied().collect();
        // A change that failed earlier left promises of a newer epoch on
        // some replicas; they refuse the current epoch until a change at a
        // newer one completes.
        let epoch_behind_promises = self.max_prepared.load(Ordering::Acquire) > current.epoch;
        if failed.is_empty() && !epoch_behind_promises {
            // Another request's change already dropped them.
            return Ok(kept);
        }
        let plan = |failed: &BTreeSet<ReplicaId>| {
            membership::plan_shrink(&current, failed)
                .map_err(|err| BlockError::Io(format!("volume {}: {err}", self.volume)))
        };
        loop {
            let mut next = plan(&failed)?;
            next.epoch = next
                .epoch
                .max(self.max_prepared.load(Ordering::Acquire) + 1);
            let all = self.member_indexes(&next);
            let Some(prepared) = self.prepare_own_change(&all, next.epoch).await else {
                return Err(self.fenced_error());
            };
            let back: BTreeSet<ReplicaId> = failed
                .iter()
                .filter(|id| {
                    reconnectable.contains(id)
                        && prepared.contains(id)
                        && !self.restarted(self.index_of(**id))
                })
                .copied()
                .collect();
            if !back.is_empty() {
                failed.retain(|id| !back.contains(id));
                let epoch = next.epoch;
                next = plan(&failed)?;
                next.epoch = epoch;
                kept.extend(back);
            }
            if !membership::change_quorum_reached(&current, &next, &prepared) {
                return Err(BlockError::Io(format!(
                    "volume {}: only {} of {} replicas reachable; {} is needed",
                    self.volume,
                    prepared.len(),
                    next.members.len(),
                    current.change_rule(&next)
                )));
            }
            // An in-sync replica that cannot take the new epoch is failed too.
            let unprepared: Vec<ReplicaId> = next
                .in_sync
                .iter()
                .filter(|id| !prepared.contains(id))
                .copied()
                .collect();
            if !unprepared.is_empty() {
                failed.extend(unprepared);
                continue;
            }
            match self.persist(&current, &next).await {
                Ok(()) => {
                    if failed.is_empty() {
                        tracing::info!(
                            volume = %self.volume,
                            epoch = next.epoch,
                            reconnected = ?kept,
                            "replicas reconnected; in-sync set unchanged"
                        );
                    } else {
                        tracing::warn!(
                            volume = %self.volume,
                            epoch = next.epoch,
                            in_sync = ?next.in_sync,
                            "in-sync set shrunk"
                        );
                    }
                    self.install(next);
                    return Ok(kept);
                }
                Err(PersistError::Fenced) => {
                    self.set_fenced();
                    return Err(self.fenced_error());
                }
                Err(PersistError::NoQuorum(reason)) => {
                    return Err(BlockError::Io(format!("volume {}: {reason}", self.volume)))
                }
            }
        }
    }

    /// Whether a quorum of `config` (a majority of its members, both with
    /// and without the one moving during a move) accepted a request.
    fn majority_accepted(&self, config: &Config, answers: &BTreeMap<usize, Answer>) -> bool {
        let accepted: BTreeSet<ReplicaId> = answers
            .iter()
            .filter(|(_, answer)| matches!(answer, Answer::Done(_)))
            .map(|(index, _)| ReplicaId(self.id_of(*index)))
            .collect();
        config.quorum_reached(&accepted)
    }

    /// Renews the read lease with a request that reads nothing (digests of
    /// no extents) to every member; fails when no majority accepts it.
    async fn renew_lease(&self) -> BlockResult<()> {
        if self.fenced.load(Ordering::Acquire) {
            return Err(self.fenced_error());
        }
        let config = self.current();
        let epoch = config.epoch;
        let sent = Instant::now();
        // Done at the first majority: a member that does not answer (cut
        // off, say) must not hold reads up until its timeout.
        let mut calls: FuturesUnordered<_> = self
            .member_indexes(&config)
            .into_iter()
            .map(|index| async move {
                let request = Request::new(Op::Digest, 0, epoch);
                (index, self.call_one(index, true, request).await)
            })
            .collect();
        let mut answers = BTreeMap::new();
        while let Some((index, answer)) = calls.next().await {
            answers.insert(index, answer);
            if self.majority_accepted(&config, &answers) {
                self.lease.extend(sent);
                return Ok(());
            }
        }
        let newer = answers.values().any(|answer| {
            matches!(answer, Answer::Refused(Status::Fenced, payload)
                if matches!(self.fence_kind(payload), Fence::Foreign(_)))
        });
        if newer {
            self.set_fenced();
            return Err(self.fenced_error());
        }
        Err(BlockError::Io(format!(
            "volume {}: no majority of replicas confirms this target still serves it",
            self.volume
        )))
    }

    fn check_range(&self, offset: u64, len: u64) -> BlockResult<()> {
        crate::nbd::proto::check_range(offset, len, self.size())
    }

    /// The in-sync replicas in the order reads try them: the local one
    /// first, the others in turn.
    fn read_order(&self, config: &Config) -> Vec<usize> {
        let mut order: Vec<usize> = config.in_sync.iter().map(|&id| self.index_of(id)).collect();
        let start = self.next_read.fetch_add(1, Ordering::Relaxed);
        if !order.is_empty() {
            let len = order.len();
            order.rotate_left(start % len);
        }
        if let Some(local) = order
            .iter()
            .position(|&i| self.node_of(i) == self.options.node)
        {
            let index = order.remove(local);
            order.insert(0, index);
        }
        order
    }

    async fn read_impl(&self, offset: u64, len: u32) -> BlockResult<Bytes> {
        self.check_range(offset, len as u64)?;
        if !self.lease.is_valid() {
            self.renew_lease().await?;
        }
        let mut bad_copies = Vec::new();
        let mut failed = BTreeSet::new();
        loop {
            if self.fenced.load(Ordering::Acquire) {
                return Err(self.fenced_error());
            }
            let gate = self.gate.read().await;
            let config = self.current();
            let candidates: Vec<usize> = self
                .read_order(&config)
                .into_iter()
                .filter(|i| !bad_copies.contains(i))
                .collect();
            let Some(&index) = candidates.first() else {
                drop(gate);
                if !failed.is_empty() {
                    self.shrink(&failed).await?;
                }
                return Err(BlockError::Io(format!(
                    "volume {}: no in-sync replica has a good copy of [{offset}, +{len})",
                    self.volume
                )));
            };
            let answer = self
                .send_io(&[index], |_| {
                    let mut request = Request::new(Op::Read, 0, config.epoch);
                    request.offset = offset;
                    request.length = len as u64;
                    request
                })
                .await
                .remove(&index)
                .expect("one answer");
            drop(gate);
            match answer {
                Answer::Done(data) => {
                    if !failed.is_empty() {
                        self.shrink(&failed).await?;
                    }
                    if !bad_copies.is_empty() {
                        self.repair(&bad_copies, offset, data.len() as u64).await;
                    }
                    return Ok(data);
                }
                Answer::Refused(Status::Checksum, message) => {
                    tracing::warn!(
                        volume = %self.volume,
                        node = %self.node_of(index),
                        %message,
                        "checksum failure on a replica; reading another copy"
                    );
                    bad_copies.push(index);
                }
                Answer::Refused(Status::Fenced, payload) => match self.fence_kind(&payload) {
                    Fence::Own => {
                        // Complete a change at a newer epoch, then read again.
                        self.shrink(&std::mem::take(&mut failed)).await?;
                    }
                    Fence::Foreign(_) => {
                        self.set_fenced();
                        return Err(self.fenced_error());
                    }
                },
                Answer::Refused(Status::OutOfRange, message) => {
                    return Err(BlockError::Io(message))
                }
                other => {
                    tracing::warn!(
                        volume = %self.volume,
                        node = %self.node_of(index),
                        answer = ?other,
                        "read failed on a replica; trying another"
                    );
                    failed.insert(ReplicaId(self.id_of(index)));
                    bad_copies.push(index);
                }
            }
        }
    }

    /// Rewrites the blocks of `[offset, +data.len())` on replicas whose copy
    /// failed its checksum. The range is locked so no client write to it is
    /// overtaken; the data is read again under the lock for the same reason.
    async fn repair(&self, bad_copies: &[usize], offset: u64, len: u64) {
        // Whole blocks, so the rewrite does not read the bad block to merge.
        let start = offset - offset % 4096;
        let end = (offset + len).next_multiple_of(4096).min(self.size());
        let _range = self.ranges.lock(start, end).await;
        let _gate = self.gate.read().await;
        let config = self.current();
        let good: Vec<usize> = self
            .read_order(&config)
            .into_iter()
            .filter(|i| !bad_copies.contains(i))
            .collect();
        let Some(&source) = good.first() else { return };
        let read = self
            .send_io(&[source], |_| {
                let mut request = Request::new(Op::Read, 0, config.epoch);
                request.offset = start;
                request.length = end - start;
                request
            })
            .await
            .remove(&source);
        let Some(Answer::Done(data)) = read else {
            return;
        };
        let rewrites = self
            .send_io(bad_copies, |_| {
                let mut request = Request::new(Op::Write, 0, config.epoch);
                request.offset = start;
                request.flags = FLAG_FUA;
                request.payload = data.clone();
                request
            })
            .await;
        for (index, answer) in rewrites {
            match answer {
                Answer::Done(_) => {
                    let blocks = (end - start) / 4096;
                    self.repaired_blocks.fetch_add(blocks, Ordering::Relaxed);
                    self.local
                        .pool()
                        .metrics()
                        .repaired_blocks
                        .get_or_create(&self.labels())
                        .inc_by(blocks);
                    tracing::info!(
                        volume = %self.volume,
                        node = %self.node_of(index),
                        offset = start,
                        len = end - start,
                        "repaired a corrupt copy from a good replica"
                    );
                }
                other => tracing::warn!(
                    volume = %self.volume,
                    node = %self.node_of(index),
                    answer = ?other,
                    "could not repair a corrupt copy"
                ),
            }
        }
    }

    /// Takes snapshot `name` on every in-sync replica at one point of the
    /// write stream: with the gate held exclusively no request is in flight,
    /// so each in-sync replica holds exactly the writes acknowledged so far,
    /// and its copy holds the same data. Returns the nodes that hold a copy.
    /// When a replica fails, copies already taken stay (the caller deletes
    /// them) and the replica is left to the next write to drop. The
    /// snapshot's uid (`uid`, or one drawn here when it is 0) is in every
    /// copy (see `replica::snapshot_pool_name`); it is returned with the
    /// nodes.
    pub async fn snapshot(&self, name: &str, uid: u64) -> BlockResult<(Vec<String>, u64)> {
        let uid = if uid == 0 { new_snapshot_uid() } else { uid };
        let deadline = Instant::now() + self.options.timeout * 2;
        let _exclusive = loop {
            if self.fenced.load(Ordering::Acquire) {
                return Err(self.fenced_error());
            }
            let gate = self.gate.write().await;
            if self.unsettled.load(Ordering::Acquire) == 0 {
                break gate;
            }
            // A failed request is still shrinking the in-sync set (it needs
            // the gate): let it finish first.
            drop(gate);
            if Instant::now() > deadline {
                return Err(BlockError::Io(format!(
                    "volume {}: replicas are failing; try the snapshot again",
                    self.volume
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let config = self.current();
        let in_sync: Vec<usize> = config.in_sync.iter().map(|&id| self.index_of(id)).collect();
        let answers = self
            .ask(&in_sync, |_| {
                let mut request = Request::new(Op::Snapshot, 0, config.epoch);
                request.payload = Bytes::copy_from_slice(name.as_bytes());
                request.offset = uid;
                request
            })
            .await;
        let mut nodes = Vec::new();
        let mut failures = Vec::new();
        for (index, answer) in answers {
            let node = self.node_of(index);
            match answer {
                Answer::Done(echo) if echo[..] == uid.to_le_bytes() => nodes.push(node.clone()),
                // A replica of an older build took a copy without the uid.
                Answer::Done(_) => failures.push(format!(
                    "{node}: its storage node runs an older version (upgrade every node first)"
                )),
                Answer::Refused(Status::Fenced, payload) => match self.fence_kind(&payload) {
                    // An epoch this target prepared in a change that did not
                    // reach a majority: the rebuilder completes one within
                    // a second; this target is not deposed.
                    Fence::Own => {
                        return Err(BlockError::Io(format!(
                            "volume {}: a configuration change is being completed; try the \
                             snapshot again",
                            self.volume
                        )))
                    }
                    Fence::Foreign(_) => {
                        self.set_fenced();
                        return Err(self.fenced_error());
                    }
                },
                Answer::Refused(Status::NoSpace, _) => return Err(BlockError::NoSpace),
                Answer::Refused(status, message) => {
                    failures.push(format!("{node}: {status:?}: {message}"))
                }
                Answer::Lost(err) => failures.push(format!("{node}: {err}")),
            }
        }
        if !failures.is_empty() {
            return Err(BlockError::Io(format!(
                "snapshot {name:?} of volume {} failed on {}",
                self.volume,
                failures.join("; ")
            )));
        }
        tracing::info!(volume = %self.volume, snapshot = name, uid = format_args!("{uid:016x}"), nodes = ?nodes, "took snapshot");
        Ok((nodes, uid))
    }

    pub fn volume(&self) -> &str {
        &self.volume
    }

    /// Takes the size of the smallest in-sync replica, after the replicas
    /// were grown. Keeps the size when an in-sync replica does not answer.
    pub async fn refresh_size(&self) {
        self.take_smallest_size(true).await
    }

    /// Sets the size to that of the smallest in-sync replica: no write may
    /// land past the end of one, as after a resize that failed on some
    /// replicas. With `all`, only when every in-sync replica answers; else
    /// (when opening) from those that answer, since the reconcile drops the
    /// others. The sizes are asked without the gate, so I/O goes on; the size
    /// is set under it, and only if the in-sync set is still the one asked.
    /// So a rebuilt replica joins either before the sizes are asked (and
    /// counts) or after the size is set (and `grow` checks it against that).
    async fn take_smallest_size(&self, all: bool) {
        for _ in 0..5 {
            let config = self.current();
            let in_sync: Vec<usize> = config.in_sync.iter().map(|&id| self.index_of(id)).collect();
            let sizes: Vec<u64> = self
                .ask(&in_sync, |_| Request::new(Op::GetState, 0, 0))
                .await
                .into_values()
                .filter_map(|answer| match answer {
                    Answer::Done(payload) => serde_json::from_slice::<StateRecord>(&payload).ok(),
                    _ => None,
                })
                .map(|state| state.size)
                .collect();
            let Some(&size) = sizes.iter().min() else {
                return;
            };
            if all && sizes.len() != in_sync.len() {
                return;
            }
            let _exclusive = self.gate.write().await;
            if self.current().in_sync != config.in_sync {
                continue;
            }
            let before = self.size.swap(size, Ordering::Relaxed);
            if before != size {
                tracing::info!(volume = %self.volume, before, size, "volume size changed");
            }
            // A replica waiting to be rebuilt may have been too small
            // (`rebuild::check_room`) and grown by this resize: its next
            // attempt need not wait out its back-off.
            for slot in self.slots.read().expect("slots lock").iter() {
                *slot.rebuild_backoff.lock().expect("backoff lock") = None;
            }
            return;
        }
    }

    pub fn epoch(&self) -> u64 {
        self.current().epoch
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// Stops background work (rebuilds); clients still connected keep the
    /// target until they go.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Blocks rewritten on a replica after a checksum failure.
    pub fn repaired_blocks(&self) -> u64 {
        self.repaired_blocks.load(Ordering::Relaxed)
    }

    /// Scrub passes completed over the whole volume.
    pub fn scrub_passes(&self) -> u64 {
        self.scrub_passes.load(Ordering::Relaxed)
    }

    pub fn replicas(&self) -> Vec<ReplicaView> {
        let config = self.current();
        self.member_indexes(&config)
            .into_iter()
            .map(|index| (index, self.slot(index)))
            .map(|(index, slot)| ReplicaView {
                member: slot.member.clone(),
                in_sync: config.in_sync.contains(&ReplicaId(slot.member.id)),
                connected: slot
                    .link
                    .lock()
                    .expect("link lock")
                    .link
                    .as_ref()
                    .is_some_and(|link| link.is_alive()),
                rebuild: self
                    .rebuilding
                    .lock()
                    .expect("rebuild lock")
                    .get(&index)
                    .cloned(),
            })
            .collect()
    }
}

enum Fence {
    Own,
    Foreign(u64),
}

enum PersistError {
    Fenced,
    NoQuorum(String),
}

/// The error to give the client when every replica refused the request the
/// same way for a reason that is the request's, not the replica's.
fn common_client_error<'a>(answers: impl Iterator<Item = &'a Answer>) -> Option<BlockError> {
    let mut common = None;
    for answer in answers {
        let status = match answer {
            Answer::Refused(status @ (Status::NoSpace | Status::OutOfRange), _) => *status,
            _ => return None,
        };
        if common.is_some_and(|c| c != status) {
            return None;
        }
        common = Some(status);
    }
    common.map(|status| match status {
        Status::NoSpace => BlockError::NoSpace,
        _ => BlockError::Io("request past the end of a replica".into()),
    })
}

/// How long an open waits before it tries again after another target got
/// in between: random, and up to twice as long each time, so two targets
/// opening the volume at once do not fence each other round after round
/// until both give up.
fn open_retry_pause(attempt: u32) -> Duration {
    const FIRST: Duration = Duration::from_millis(20);
    (FIRST * 2u32.pow(attempt)).mul_f64(random_fraction())
}

/// A number in [0, 1), from the standard library's per-process random
/// hash keys (enough for jitter).
fn random_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let bits = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// Asks the seeds, in turn, for a replica's state of `volume`.
async fn find_state(
    volume: &str,
    seeds: &[String],
    timeout: Duration,
) -> Result<StateRecord, OpenError> {
    for seed in seeds {
        let Ok(client) = ReplicaClient::connect(seed, volume, None, timeout, None).await else {
            continue;
        };
        if let Ok(reply) = client.call(Request::new(Op::GetState, 0, 0), timeout).await {
            if let Ok(state) = serde_json::from_slice::<StateRecord>(&reply.payload) {
                return Ok(state);
            }
        }
    }
    Err(OpenError::NoReplica(volume.to_string()))
}

/// Keeps an idle target's read lease renewed, so reads do not wait for it.
/// Ends when the target is closed, fenced or dropped.
fn spawn_lease_keeper(target: &Arc<VolumeTarget>) {
    let weak = Arc::downgrade(target);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(lease::LEASE / 5).await;
            let Some(target) = weak.upgrade() else { return };
            if target.is_fenced() || target.is_closed() {
                return;
            }
            if target.lease.ends_within(lease::LEASE / 2) {
                let _ = target.renew_lease().await;
            }
        }
    });
}

impl BlockTarget for VolumeTarget {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    fn block_size(&self) -> u32 {
        4096
    }

    async fn read(&self, offset: u64, len: u32) -> BlockResult<Bytes> {
        self.read_impl(offset, len).await
    }

    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> BlockResult<()> {
        self.write_owned(offset, Bytes::copy_from_slice(data), fua)
            .await
    }

    /// Every replica's request shares `data`: no copy per replica.
    async fn write_owned(&self, offset: u64, data: Bytes, fua: bool) -> BlockResult<()> {
        self.check_range(offset, data.len() as u64)?;
        let _range = self.ranges.lock(offset, offset + data.len() as u64).await;
        self.replicate(|epoch| {
            let mut request = Request::new(Op::Write, 0, epoch);
            request.offset = offset;
            request.flags = if fua { FLAG_FUA } else { 0 };
            request.payload = data.clone();
            request
        })
        .await
    }

    /// From the local replica's engine: its device writes the shared data as
    /// it is, and the links to remote replicas send the same memory.
    fn write_buffer(&self, len: usize) -> Option<crate::engine::AlignedBuf> {
        Some(self.local.pool().write_buffer(len))
    }

    async fn flush(&self) -> BlockResult<()> {
        self.replicate(|epoch| Request::new(Op::Flush, 0, epoch))
            .await
    }

    async fn trim(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.check_range(offset, len)?;
        let _range = self.ranges.lock(offset, offset + len).await;
        self.replicate(|epoch| {
            let mut request = Request::new(Op::Trim, 0, epoch);
            request.offset = offset;
            request.length = len;
            request
        })
        .await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        allocate: bool,
    ) -> BlockResult<()> {
        self.check_range(offset, len)?;
        let _range = self.ranges.lock(offset, offset + len).await;
        self.replicate(|epoch| {
            let mut request = Request::new(Op::WriteZeroes, 0, epoch);
            request.offset = offset;
            request.length = len;
            request.flags =
                (if fua { FLAG_FUA } else { 0 }) | (if allocate { FLAG_NO_HOLE } else { 0 });
            request
        })
        .await
    }
}

/// A snapshot's uid: random, and never 0, which marks copies taken before
/// snapshots had uids.
pub fn new_snapshot_uid() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0 | 1
}
