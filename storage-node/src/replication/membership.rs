//! Replica membership and epoch fencing: the decisions a volume target and its
//! replicas make about who may serve a volume and which replicas hold the truth.
//!
//! Pure functions over plain values, no I/O: the caller persists the
//! `ReplicaState` a replica-side function changed (durably, before it answers)
//! and carries the messages. `model.rs` explores these decisions under crashes,
//! restarts, partitions and competing targets.
//!
//! The protocol, for a volume with a fixed member list:
//!
//! * Every change of configuration (opening the volume, or shrinking its
//!   in-sync set after a replica failed) takes two rounds, each on a majority of
//!   the members:
//!   1. `Prepare(epoch)`: a replica accepts iff `epoch > promised_epoch`
//!      ([`replica_prepare`]); it then refuses I/O and configs of lower epochs
//!      and answers with its current config. Because each replica grants an
//!      epoch once, at most one target ever owns a given epoch.
//!   2. `Persist(config)`: a replica accepts iff `config.epoch >=
//!      promised_epoch` ([`replica_accept_config`]). An opening target builds
//!      that config from the answers of round 1 ([`plan_open`]); a shrinking
//!      target from its own config ([`plan_shrink`]).
//! * I/O carries the target's epoch and a replica takes it iff the epoch equals
//!   its promised epoch ([`replica_io`]). A write is acknowledged when every
//!   replica of the in-sync set took it ([`decide_write`]); otherwise the target
//!   first persists a smaller in-sync set at a new epoch.
//!
//! * Replacing a replica changes the member list: `plan_replace` takes the old
//!   member out and puts the new one in, not in sync, in one configuration
//!   change. Both rounds of a change of members must reach a majority of the
//!   old list and of the new one ([`change_quorum_reached`]), so every later
//!   majority, of either list, holds a replica that knows the change. An
//!   opening target that finds a config naming other members than it asked
//!   plans nothing ([`OpenError::OtherMembers`]): it asks those members again.
//! * Moving a healthy replica (`plan_move`) adds its successor first and
//!   takes it out once the successor is in sync. Meanwhile a majority means
//!   a majority of the members without the successor and one of the members
//!   without the leaving replica ([`Config::quorum_reached`], Raft's joint
//!   consensus): every such quorum meets every majority of the list before
//!   the move and of the list after it, and losing both the leaving replica
//!   and its successor leaves a quorum, as losing one replica of the volume
//!   before the move did.
//! * A replacement swaps a member in one change, and a majority of the new
//!   list ({1, 4} of [1, 2, 4]) need not meet one of the old ([2, 3] of
//!   [1, 2, 3]). So the config it makes remembers the swap (`swapped`) and
//!   needs a majority of the list before it too, until a change of the
//!   target that installed it settles it (`Config::settled`, or any shrink
//!   or grow): Raft's joint consensus, over two changes.
//!
//! The design's first version opened in one round: read the states, then
//! persist the new config with a "promise" accepted iff its epoch was higher.
//! Reading did not fence anyone, so a target could plan from states that the
//! old target changed (by shrinking) before the new config landed, and two
//! different configs could be persisted with the same epoch. Both lose
//! acknowledged writes; `model.rs` keeps that version as a mutation and shows a
//! trace.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// A replica of one volume, unique within its member list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReplicaId(pub u32);

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{}", self.0)
    }
}

/// How many of `member_count` replicas make a majority.
pub fn majority(member_count: usize) -> usize {
    member_count / 2 + 1
}

/// Which replicas a volume has and which of them hold every acknowledged write.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Config {
    /// The epoch of the target that persisted this config. At most one config
    /// is ever persisted per epoch, so the epoch names the config.
    pub epoch: u64,
    /// The member list of the volume; it changes only when a replica is
    /// replaced (`plan_replace`).
    pub members: Vec<ReplicaId>,
    /// The replicas that have every acknowledged write: the only ones a target
    /// may read from or treat as a source of truth.
    pub in_sync: BTreeSet<ReplicaId>,
    /// A move under way (`plan_move`): the member moved off its node stays
    /// a member, in sync and written, until its successor is in sync, and
    /// leaves in the change that grows the in-sync set by it (`plan_grow`).
    pub moving: Option<Move>,
    /// The swap of the replacement that made this config (`plan_replace`),
    /// until a change of the target that installed it settles it. Until
    /// then a quorum needs a majority of the list before the swap too.
    pub swapped: Option<Swap>,
}

/// The member a replacement took out, and the one it put in its place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Swap {
    pub removed: ReplicaId,
    pub added: ReplicaId,
}

/// A member being moved off its node, and the new member that takes its
/// place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Move {
    pub leaving: ReplicaId,
    pub successor: ReplicaId,
}

impl Config {
    /// The member lists of which a decision needs a majority each: the
    /// member list, or during a move both the list before it (without the
    /// successor) and the list after it (without the leaving member), as in
    /// Raft's joint consensus.
    ///
    /// One majority of all the members (three of four) would be safe too,
    /// but a move is often made because the leaving member's node is about
    /// to go, and then that member and the new one being copied are the two
    /// most likely to fail together. With both lists, the two remaining
    /// members are a majority of each, and the volume goes on serving; with
    /// one list of four, it would stop.
    ///
    /// A config made by a replacement (`swapped`) adds the lists of the
    /// config before the swap: a replacement takes one member out and puts
    /// another in in one change, and a majority of the new list alone
    /// ({1, 4} of [1, 2, 4]) need not meet one of the old ({2, 3} of
    /// [1, 2, 3]). A replacement persisted on the new list's majority only
    /// may have lost to a change on the old list's; with both lists, no
    /// target can take it for the truth (Raft's joint consensus again).
    pub fn voting_lists(&self) -> Vec<Vec<ReplicaId>> {
        let mut lists = self.own_voting_lists();
        if let Some(swap) = self.swapped {
            for list in self.before_swap(swap).own_voting_lists() {
                if !lists.contains(&list) {
                    lists.push(list);
                }
            }
        }
        lists
    }

    /// This config with `swap` undone: the member list before it.
    fn before_swap(&self, swap: Swap) -> Config {
        let undo = |id: ReplicaId| if id == swap.added { swap.removed } else { id };
        Config {
            members: self.members.iter().map(|&id| undo(id)).collect(),
            moving: self.moving.map(|moving| Move {
                leaving: undo(moving.leaving),
                successor: undo(moving.successor),
            }),
            swapped: None,
            ..self.clone()
        }
    }

    /// The voting lists of the member list and the move alone.
    fn own_voting_lists(&self) -> Vec<Vec<ReplicaId>> {
        match self.moving {
            None => vec![self.members.clone()],
            Some(moving) => {
                let without = |gone: ReplicaId| -> Vec<ReplicaId> {
                    self.members
                        .iter()
                        .copied()
                        .filter(|&id| id != gone)
                        .collect()
                };
                vec![without(moving.successor), without(moving.leaving)]
            }
        }
    }

    /// Whether the replicas in `accepted` make a majority of each voting
    /// list; replicas that are not members do not count.
    pub fn quorum_reached(&self, accepted: &BTreeSet<ReplicaId>) -> bool {
        self.voting_lists().iter().all(|list| {
            let votes = list.iter().filter(|id| accepted.contains(id)).count();
            votes >= majority(list.len())
        })
    }

    /// What [`change_quorum_reached`] asks of a change from `self` to
    /// `next`, for messages: the rule of the stricter of the two.
    pub fn change_rule(&self, next: &Config) -> &'static str {
        match self.swapped {
            Some(_) => self.quorum_rule(),
            None => next.quorum_rule(),
        }
    }

    /// What [`quorum_reached`](Self::quorum_reached) asks, for messages.
    pub fn quorum_rule(&self) -> &'static str {
        match (self.moving, self.swapped) {
            (None, None) => "a majority of the members",
            (Some(_), None) => "a majority of the members both with and without the one moving",
            (None, Some(_)) => "a majority of the members both before and after the replacement",
            (Some(_), Some(_)) => {
                "a majority of the members with and without the one moving, before and after \
                 the replacement"
            }
        }
    }

    /// The same config at the next epoch, with the replacement that made it
    /// settled: for a target that installed it (so a quorum of both lists
    /// took it), to go back to one list.
    pub fn settled(&self) -> Option<Config> {
        self.swapped.map(|_| Config {
            epoch: self.epoch + 1,
            swapped: None,
            ..self.clone()
        })
    }

    /// The config of a fresh volume: epoch 0, every member in sync (all empty).
    pub fn initial(members: Vec<ReplicaId>) -> Self {
        let in_sync = members.iter().copied().collect();
        Config {
            epoch: 0,
            members,
            in_sync,
            moving: None,
            swapped: None,
        }
    }
}

/// What a replica persists about membership, besides its data.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReplicaState {
    /// The highest epoch this replica granted; it refuses anything older.
    /// Never lower than `config.epoch`.
    pub promised_epoch: u64,
    /// The newest config this replica accepted.
    pub config: Config,
}

impl ReplicaState {
    /// The state of every replica of a fresh volume.
    pub fn new(members: Vec<ReplicaId>) -> Self {
        ReplicaState {
            promised_epoch: 0,
            config: Config::initial(members),
        }
    }

    /// The state of a new, empty replica that replaces a member of an
    /// existing volume (`plan_replace`): it names no replica in sync, so an
    /// opening target that hears only from it and from stale members plans
    /// nothing. Created as a fresh volume's replica (everyone in sync at
    /// epoch 0), it could win an open before the change that adds it was
    /// persisted on a majority, and serve its empty data as the volume's:
    /// `model.rs` found that trace (`Mutation::ReplacementStartsInSync`).
    pub fn replacement(members: Vec<ReplicaId>) -> Self {
        ReplicaState {
            promised_epoch: 0,
            config: Config {
                epoch: 0,
                members,
                in_sync: BTreeSet::new(),
                moving: None,
                swapped: None,
            },
        }
    }
}

/// A replica's answer to `Prepare(epoch)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrepareReply {
    /// The replica granted the epoch and sends the config the target plans from.
    Prepared { config: Config },
    /// The epoch was already granted, to this target or another: the target
    /// must give up (and may retry with a higher epoch).
    Fenced { promised_epoch: u64 },
}

/// Round 1 of a configuration change, on the replica. The caller persists
/// `state` before answering.
pub fn replica_prepare(state: &mut ReplicaState, epoch: u64) -> PrepareReply {
    if epoch > state.promised_epoch {
        state.promised_epoch = epoch;
        PrepareReply::Prepared {
            config: state.config.clone(),
        }
    } else {
        PrepareReply::Fenced {
            promised_epoch: state.promised_epoch,
        }
    }
}

/// Round 1 of a reopen, on the replica: a node that restarted reopens the
/// target it served only if no replica promised an epoch above `at_most`,
/// the highest that target had prepared; a higher promise means another
/// target opened the volume, or is opening it, since.
pub fn replica_prepare_if_promise_at_most(
    state: &mut ReplicaState,
    epoch: u64,
    at_most: u64,
) -> PrepareReply {
    if state.promised_epoch > at_most {
        return PrepareReply::Fenced {
            promised_epoch: state.promised_epoch,
        };
    }
    replica_prepare(state, epoch)
}

/// Round 2 of a configuration change, on the replica: returns whether the
/// config was accepted (the caller then persists `state`). A refusal means a
/// newer epoch was granted: the sender is fenced.
///
/// Equal epochs are accepted because the replica may have granted that very
/// epoch in round 1, and only the target that won round 1 on a majority sends
/// a config for it.
pub fn replica_accept_config(state: &mut ReplicaState, config: &Config) -> bool {
    if config.epoch < state.promised_epoch {
        return false;
    }
    state.promised_epoch = config.epoch;
    state.config = config.clone();
    true
}

/// A replica's answer to a data request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoReply {
    Accepted,
    /// A newer epoch was granted: the sender no longer owns the volume.
    Fenced {
        promised_epoch: u64,
    },
    /// The replica never heard of the request's epoch (it missed the rounds of
    /// the configuration change): for the target it is a failed replica.
    Behind {
        promised_epoch: u64,
    },
}

/// Whether a replica takes a data request: only from the current epoch, so a
/// deposed target can neither write nor read.
pub fn replica_io(state: &ReplicaState, request_epoch: u64) -> IoReply {
    let promised_epoch = state.promised_epoch;
    match request_epoch.cmp(&promised_epoch) {
        std::cmp::Ordering::Equal => IoReply::Accepted,
        std::cmp::Ordering::Less => IoReply::Fenced { promised_epoch },
        std::cmp::Ordering::Greater => IoReply::Behind { promised_epoch },
    }
}

/// Shorthand for [`replica_io`] when the reason for a refusal does not matter.
pub fn replica_accepts_io(state: &ReplicaState, request_epoch: u64) -> bool {
    replica_io(state, request_epoch) == IoReply::Accepted
}

/// The epoch a target asks for in round 1: above every promise it has seen
/// (in answers to a state read, or in `Fenced` refusals).
pub fn next_epoch(seen_promises: impl IntoIterator<Item = u64>) -> u64 {
    seen_promises.into_iter().max().unwrap_or(0) + 1
}

/// Whether `accepted` makes a quorum ([`Config::quorum_reached`]) of the
/// config before a change and of the config after it. For a change that
/// keeps the member list and the move, that is one quorum.
pub fn change_quorum_reached(
    before: &Config,
    after: &Config,
    accepted: &BTreeSet<ReplicaId>,
) -> bool {
    before.quorum_reached(accepted) && after.quorum_reached(accepted)
}

/// Why a target cannot open a volume.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("{prepared} of {members} replicas granted the epoch; {rule} is needed")]
    NoMajority {
        prepared: usize,
        members: usize,
        rule: &'static str,
    },
    /// Every replica holding the acknowledged writes is unreachable: serving
    /// from any other would lose them.
    #[error("no replica of the latest in-sync set answered")]
    NoInSyncReplica,
    /// A replica reported a config as new as the epoch being opened: the
    /// answers do not come from round 1 at that epoch.
    #[error("epoch {epoch} is not newer than answered config epoch {seen}")]
    EpochNotNewer { epoch: u64, seen: u64 },
    /// The newest answered config has another member list (a replica was
    /// replaced): the target must ask those members instead.
    #[error("the volume's members are now {members:?}")]
    OtherMembers { members: Vec<ReplicaId> },
}

/// The config an opening target persists in round 2, from the answers of the
/// members that granted `epoch` in round 1.
///
/// If those members are a quorum of the newest config they answered with,
/// that config is the latest one persisted on a quorum (or newer), and its in-sync replicas that answered hold every acknowledged
/// write and, having granted `epoch`, can no longer take writes from an older
/// target. Those that did not answer may be written by an older target still,
/// so they are left out and have to be rebuilt.
pub fn plan_open(
    members: &[ReplicaId],
    epoch: u64,
    prepared: &[(ReplicaId, Config)],
) -> Result<Config, OpenError> {
    plan_open_with(members, epoch, prepared, Config::quorum_reached)
}

/// [`plan_open`] with another quorum rule: `model.rs` breaks the rule to
/// show that its exploration notices.
pub(crate) fn plan_open_with(
    members: &[ReplicaId],
    epoch: u64,
    prepared: &[(ReplicaId, Config)],
    quorum_reached: impl Fn(&Config, &BTreeSet<ReplicaId>) -> bool,
) -> Result<Config, OpenError> {
    let answered: BTreeMap<ReplicaId, &Config> = prepared
        .iter()
        .filter(|(id, _)| members.contains(id))
        .map(|(id, config)| (*id, config))
        .collect();
    let Some(latest) = answered.values().max_by_key(|config| config.epoch) else {
        return Err(OpenError::NoMajority {
            prepared: 0,
            members: members.len(),
            rule: "a majority of the members",
        });
    };
    if latest.epoch >= epoch {
        return Err(OpenError::EpochNotNewer {
            epoch,
            seen: latest.epoch,
        });
    }
    let as_set = |ids: &[ReplicaId]| ids.iter().copied().collect::<BTreeSet<_>>();
    let granted: BTreeSet<ReplicaId> = answered.keys().copied().collect();
    if as_set(&latest.members) != as_set(members) {
        // Only a majority of the list asked is a reason to turn to another
        // one: a replacement swaps a member in one change, so a config that
        // reached a majority of the new list alone may have lost to one on
        // a majority of the old list, and those two never meet.
        if granted.len() < majority(members.len()) {
            return Err(OpenError::NoMajority {
                prepared: granted.len(),
                members: members.len(),
                rule: "a majority of the members",
            });
        }
        return Err(OpenError::OtherMembers {
            members: latest.members.clone(),
        });
    }
    // The newest config answered decides how many must have answered.
    if !quorum_reached(latest, &granted) {
        return Err(OpenError::NoMajority {
            prepared: granted.len(),
            members: members.len(),
            rule: latest.quorum_rule(),
        });
    }
    let in_sync: BTreeSet<ReplicaId> = latest
        .in_sync
        .iter()
        .filter(|id| answered.contains_key(id))
        .copied()
        .collect();
    if in_sync.is_empty() {
        return Err(OpenError::NoInSyncReplica);
    }
    Ok(Config {
        epoch,
        members: members.to_vec(),
        in_sync,
        moving: latest.moving,
        // The answered config may not have reached both lists yet.
        swapped: latest.swapped,
    })
}

/// Why a target cannot drop failed replicas from its in-sync set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShrinkError {
    /// Every in-sync replica failed: no copy can take the write.
    #[error("no in-sync replica would be left")]
    NoInSyncReplicaLeft,
}

/// The config a target persists (both rounds, at its epoch) after `failed`
/// replicas of its in-sync set missed a write. Only once it is persisted may
/// the write be acknowledged: until then the old config, which still names
/// the failed replicas, is what the next target would open from.
pub fn plan_shrink(current: &Config, failed: &BTreeSet<ReplicaId>) -> Result<Config, ShrinkError> {
    let in_sync: BTreeSet<ReplicaId> = current.in_sync.difference(failed).copied().collect();
    if in_sync.is_empty() {
        return Err(ShrinkError::NoInSyncReplicaLeft);
    }
    Ok(Config {
        epoch: current.epoch + 1,
        members: current.members.clone(),
        in_sync,
        moving: current.moving,
        // Persisting this takes a quorum of `current` too, so of both of
        // its lists: the replacement is settled with it.
        swapped: None,
    })
}

/// Why a replica cannot be replaced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplaceError {
    #[error("{0} is not a member")]
    NotAMember(ReplicaId),
    #[error("{0} is a member already")]
    AlreadyAMember(ReplicaId),
    /// Removing this in-sync replica would leave fewer than a majority of
    /// the members in sync (or none to copy from).
    #[error(
        "replacing {replica} would leave {left} of {members} replicas in sync; a majority must \
         stay in sync (replace a faulted replica, or wait for the rebuilds, first)"
    )]
    TooFewInSync {
        replica: ReplicaId,
        left: usize,
        members: usize,
    },
    #[error("{0} is leaving already: it goes once its successor is in sync")]
    Leaving(ReplicaId),
    #[error("{} is being moved already; one move at a time", .0.leaving)]
    MoveUnderWay(Move),
    /// During a move only the successor can be replaced: see `plan_replace`.
    #[error(
        "{replica} cannot be replaced while {} moves to {}; wait until the move ends",
        .moving.leaving,
        .moving.successor
    )]
    StaysDuringMove { replica: ReplicaId, moving: Move },
    #[error("no replica of the volume is being moved")]
    NoMoveUnderWay,
}

/// The config that replaces member `remove` by the new, empty member `add`,
/// at the next epoch. `add` is not in sync: it takes every write from then
/// on and joins the in-sync set once a rebuild has copied the rest. Removing
/// `remove` at once, rather than after `add` caught up, keeps the number of
/// members, and so the majority needed, the same: losing the new replica
/// during its copy costs no availability. An in-sync replica is removed only
/// when the members left in sync are a quorum of the new config.
///
/// This is for a replica that is faulted or gone; a healthy one is moved
/// with `plan_move`, which keeps it until its successor has the data.
///
/// During a move only the successor can be replaced: both configs then
/// share the member list before the move, a majority of which is in every
/// quorum of either. Swapping a member that stays would let a quorum of the
/// new config ({3, 5} of r1 moving to r4 with r2 swapped for r5) miss one of
/// the old ({1, 2, 4}).
pub fn plan_replace(
    current: &Config,
    remove: ReplicaId,
    add: ReplicaId,
) -> Result<Config, ReplaceError> {
    check_newcomer(current, remove, add)?;
    if let Some(moving) = current.moving.filter(|m| m.successor != remove) {
        return Err(ReplaceError::StaysDuringMove {
            replica: remove,
            moving,
        });
    }
    let mut in_sync = current.in_sync.clone();
    let removed_in_sync = in_sync.remove(&remove);
    let members = current
        .members
        .iter()
        .map(|&id| if id == remove { add } else { id })
        .collect();
    // A successor that failed is replaced like any member; the move goes on
    // with the new one.
    let moving = current.moving.map(|moving| Move {
        successor: if moving.successor == remove {
            add
        } else {
            moving.successor
        },
        ..moving
    });
    let next = Config {
        epoch: current.epoch + 1,
        members,
        in_sync,
        moving,
        swapped: Some(Swap {
            removed: remove,
            added: add,
        }),
    };
    if removed_in_sync && !next.quorum_reached(&next.in_sync) {
        return Err(ReplaceError::TooFewInSync {
            replica: remove,
            left: next.in_sync.len(),
            members: next.members.len(),
        });
    }
    Ok(next)
}

/// The config that starts moving member `remove` to the new, empty member
/// `add`, at the next epoch: `add` joins not in sync and `remove` stays, in
/// sync and written, marked as leaving. It leaves in the change that makes
/// `add` in sync (`plan_grow`), so the volume keeps as many
/// in-sync copies during the copy as before it: what a user expects of
/// moving a healthy replica off a node. The price is one more member while
/// the copy runs; a quorum is then a majority of the members both with and
/// without the one moving ([`Config::voting_lists`]).
pub fn plan_move(
    current: &Config,
    remove: ReplicaId,
    add: ReplicaId,
) -> Result<Config, ReplaceError> {
    check_newcomer(current, remove, add)?;
    if let Some(moving) = current.moving {
        return Err(ReplaceError::MoveUnderWay(moving));
    }
    let mut members = current.members.clone();
    members.push(add);
    Ok(Config {
        epoch: current.epoch + 1,
        members,
        in_sync: current.in_sync.clone(),
        moving: Some(Move {
            leaving: remove,
            successor: add,
        }),
        swapped: None,
    })
}

/// The config that gives up the move under way, at the next epoch: the
/// successor leaves and the member being moved stays, as before the move.
/// The successor was never in sync (the change that would have made it so
/// ends the move, `plan_grow`), so no copy the volume counts on is lost;
/// its replica is deleted like a replaced one. Also returns the move.
///
/// Like every change, this one is taken by a quorum of the config before
/// (both lists of the move, and those before a swap of the successor) and
/// of the one after (a majority of the members), so a target that opens
/// later finds either the move or its end, never a quorum of neither.
pub fn plan_cancel_move(current: &Config) -> Result<(Config, Move), ReplaceError> {
    let moving = current.moving.ok_or(ReplaceError::NoMoveUnderWay)?;
    let mut next = current.clone();
    next.epoch += 1;
    next.members.retain(|&id| id != moving.successor);
    next.in_sync.remove(&moving.successor);
    next.moving = None;
    // Persisting this takes a quorum of `current`'s lists, those before
    // the swap included: the swap is settled with it.
    next.swapped = None;
    Ok((next, moving))
}

fn check_newcomer(current: &Config, remove: ReplicaId, add: ReplicaId) -> Result<(), ReplaceError> {
    if !current.members.contains(&remove) {
        return Err(ReplaceError::NotAMember(remove));
    }
    if current.members.contains(&add) {
        return Err(ReplaceError::AlreadyAMember(add));
    }
    if current
        .moving
        .is_some_and(|moving| moving.leaving == remove)
    {
        return Err(ReplaceError::Leaving(remove));
    }
    Ok(())
}

/// The config that adds the rebuilt member `joined` to the in-sync set, at
/// the next epoch. If it is the successor of a member being moved
/// (`plan_move`), that member leaves in the same change.
pub fn plan_grow(current: &Config, joined: ReplicaId) -> Config {
    let mut next = current.clone();
    next.epoch += 1;
    next.swapped = None;
    next.in_sync.insert(joined);
    if let Some(moving) = current.moving.filter(|m| m.successor == joined) {
        next.members.retain(|&id| id != moving.leaving);
        next.in_sync.remove(&moving.leaving);
        next.moving = None;
    }
    next
}

/// A serving target found, in round 1 of a change to its own config, that
/// another target opened the volume after it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "replica {replica} holds the config of epoch {seen}, which this target did not persist \
     (its newest is {own}): another target opened the volume"
)]
pub struct Deposed {
    pub replica: ReplicaId,
    pub seen: u64,
    pub own: u64,
}

/// Round 1 of a change a serving target makes to its own config (a shrink
/// or a grow), checked before round 2: such a target plans from its own
/// config, which is only right while no other target has installed one.
/// `own_persisted` is the highest epoch this target sent a config for (its
/// current config's at least); `prepared` holds the configs the replicas
/// that granted the change's epoch answered with.
///
/// Comparing epochs is not enough: a target cut off from a majority goes on
/// preparing epochs on the replicas it still reaches (each failed change
/// takes a higher one), so its next epoch may be above that of a target
/// opened on the majority side meanwhile. That target's config is on a
/// majority, so some replica that granted this change reports it.
pub fn check_own_change(
    own_persisted: u64,
    prepared: &[(ReplicaId, Config)],
) -> Result<(), Deposed> {
    match prepared
        .iter()
        .find(|(_, config)| config.epoch > own_persisted)
    {
        Some((replica, config)) => Err(Deposed {
            replica: *replica,
            seen: config.epoch,
            own: own_persisted,
        }),
        None => Ok(()),
    }
}

/// What a target does with a write once the in-sync replicas answered or
/// timed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Every in-sync replica has it: acknowledge.
    Acknowledge,
    /// These in-sync replicas missed it: shrink them out first.
    Shrink { failed: BTreeSet<ReplicaId> },
    /// A replica granted a newer epoch: fail the write and stop serving.
    Fenced,
}

/// Decides a write from the replies of `config`'s in-sync replicas; a missing
/// reply is a timeout. Fencing from any replica wins over everything: a newer
/// target owns the volume, and it may have planned without the replicas that
/// took the write.
pub fn decide_write(config: &Config, replies: &BTreeMap<ReplicaId, IoReply>) -> WriteOutcome {
    if replies
        .values()
        .any(|reply| matches!(reply, IoReply::Fenced { .. }))
    {
        return WriteOutcome::Fenced;
    }
    let failed: BTreeSet<ReplicaId> = config
        .in_sync
        .iter()
        .filter(|id| replies.get(id) != Some(&IoReply::Accepted))
        .copied()
        .collect();
    if failed.is_empty() {
        WriteOutcome::Acknowledge
    } else {
        WriteOutcome::Shrink { failed }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(raw: &[u32]) -> Vec<ReplicaId> {
        raw.iter().copied().map(ReplicaId).collect()
    }

    fn set(raw: &[u32]) -> BTreeSet<ReplicaId> {
        raw.iter().copied().map(ReplicaId).collect()
    }

    fn config(epoch: u64, members: &[u32], in_sync: &[u32]) -> Config {
        Config {
            epoch,
            members: ids(members),
            in_sync: set(in_sync),
            moving: None,
            swapped: None,
        }
    }

    /// `config` as a replacement of `removed` by `added` made it.
    fn swapped(config: Config, removed: u32, added: u32) -> Config {
        Config {
            swapped: Some(Swap {
                removed: ReplicaId(removed),
                added: ReplicaId(added),
            }),
            ..config
        }
    }

    fn moving(epoch: u64, members: &[u32], in_sync: &[u32], from_to: (u32, u32)) -> Config {
        Config {
            moving: Some(Move {
                leaving: ReplicaId(from_to.0),
                successor: ReplicaId(from_to.1),
            }),
            ..config(epoch, members, in_sync)
        }
    }

    /// Every subset of `of`.
    fn subsets(of: &[u32]) -> Vec<BTreeSet<ReplicaId>> {
        (0u32..1 << of.len())
            .map(|bits| {
                (0..of.len())
                    .filter(|i| bits & (1 << i) != 0)
                    .map(|i| ReplicaId(of[i]))
                    .collect()
            })
            .collect()
    }

    fn state(promised_epoch: u64, config_epoch: u64) -> ReplicaState {
        ReplicaState {
            promised_epoch,
            config: config(config_epoch, &[1, 2, 3], &[1, 2, 3]),
        }
    }

    #[test]
    fn majority_of_one_to_five() {
        for (members, expected) in [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3)] {
            assert_eq!(majority(members), expected, "{members} members");
        }
    }

    #[test]
    fn fresh_replica_has_everyone_in_sync_at_epoch_zero() {
        let fresh = ReplicaState::new(ids(&[1, 2, 3]));
        assert_eq!(fresh.promised_epoch, 0);
        assert_eq!(fresh.config, config(0, &[1, 2, 3], &[1, 2, 3]));
    }

    #[test]
    fn prepare_grants_each_epoch_once() {
        // (promised, asked) -> granted
        for (promised, asked, granted) in [(0, 1, true), (3, 5, true), (3, 3, false), (3, 2, false)]
        {
            let mut replica = state(promised, 0);
            let reply = replica_prepare(&mut replica, asked);
            if granted {
                assert_eq!(
                    reply,
                    PrepareReply::Prepared {
                        config: state(promised, 0).config
                    },
                    "promised {promised}, asked {asked}"
                );
                assert_eq!(replica.promised_epoch, asked);
            } else {
                assert_eq!(
                    reply,
                    PrepareReply::Fenced {
                        promised_epoch: promised
                    },
                    "promised {promised}, asked {asked}"
                );
                assert_eq!(replica, state(promised, 0), "a refusal changes nothing");
            }
        }
    }

    #[test]
    fn a_conditional_prepare_is_refused_above_the_bound() {
        // (promised, at most) -> granted
        for (promised, at_most, granted) in [(3, 3, true), (3, 4, true), (3, 2, false)] {
            let mut replica = state(promised, 0);
            let reply = replica_prepare_if_promise_at_most(&mut replica, 5, at_most);
            assert_eq!(
                matches!(reply, PrepareReply::Prepared { .. }),
                granted,
                "promised {promised}, at most {at_most}"
            );
            let expected = if granted { 5 } else { promised };
            assert_eq!(replica.promised_epoch, expected);
        }
    }

    #[test]
    fn config_is_accepted_from_the_promised_epoch_on() {
        // (promised, config epoch) -> accepted
        for (promised, epoch, accepted) in [(2, 2, true), (2, 3, true), (2, 1, false), (0, 1, true)]
        {
            let mut replica = state(promised, 0);
            let new = config(epoch, &[1, 2, 3], &[1, 3]);
            assert_eq!(
                replica_accept_config(&mut replica, &new),
                accepted,
                "promised {promised}, config epoch {epoch}"
            );
            if accepted {
                assert_eq!(replica.promised_epoch, epoch);
                assert_eq!(replica.config, new);
            } else {
                assert_eq!(replica, state(promised, 0), "a refusal changes nothing");
            }
        }
    }

    #[test]
    fn io_is_taken_only_at_the_promised_epoch() {
        for (promised, request, expected) in [
            (4, 4, IoReply::Accepted),
            (4, 3, IoReply::Fenced { promised_epoch: 4 }),
            (4, 5, IoReply::Behind { promised_epoch: 4 }),
        ] {
            let replica = state(promised, 1);
            assert_eq!(
                replica_io(&replica, request),
                expected,
                "promised {promised}, request {request}"
            );
            assert_eq!(
                replica_accepts_io(&replica, request),
                expected == IoReply::Accepted
            );
        }
    }

    #[test]
    fn next_epoch_is_above_every_seen_promise() {
        for (seen, expected) in [(vec![], 1), (vec![0, 0], 1), (vec![3, 7, 5], 8)] {
            assert_eq!(next_epoch(seen.clone()), expected, "{seen:?}");
        }
    }

    #[test]
    fn quorum_counts_members_only() {
        let three = config(1, &[1, 2, 3], &[1, 2, 3]);
        for (accepted, reached) in [
            (set(&[]), false),
            (set(&[2]), false),
            (set(&[1, 3]), true),
            (set(&[1, 2, 3]), true),
            (set(&[1, 7, 9]), false),
        ] {
            assert_eq!(three.quorum_reached(&accepted), reached, "{accepted:?}");
        }
        assert!(
            config(1, &[5], &[5]).quorum_reached(&set(&[5])),
            "one member is its own majority"
        );
    }

    /// During a move of r2 to r4 a quorum is a majority of [1, 2, 3] and
    /// one of [1, 3, 4]: the two members that stay are enough, so losing
    /// the leaving replica and its successor together costs no more than
    /// losing one replica did before the move. Any three of the four are a
    /// quorum too, and one list's majority alone is not.
    #[test]
    fn a_move_needs_a_majority_with_and_without_the_moving_member() {
        let move_2_to_4 = moving(5, &[1, 2, 3, 4], &[1, 2, 3], (2, 4));
        assert_eq!(
            move_2_to_4.voting_lists(),
            vec![ids(&[1, 2, 3]), ids(&[1, 3, 4])]
        );
        for (accepted, reached) in [
            (set(&[1, 3]), true),
            (set(&[1, 2, 4]), true),
            (set(&[2, 3, 4]), true),
            (set(&[1, 2]), false),
            (set(&[3, 4]), false),
            (set(&[2, 4]), false),
        ] {
            assert_eq!(
                move_2_to_4.quorum_reached(&accepted),
                reached,
                "{accepted:?}"
            );
        }
        // Every two quorums of the move, and every quorum of the move and
        // a majority of the list before or after it, meet.
        let before = config(4, &[1, 2, 3], &[1, 2, 3]);
        let after = config(6, &[1, 3, 4], &[1, 3, 4]);
        let quorums = |config: &Config| -> Vec<BTreeSet<ReplicaId>> {
            subsets(&[1, 2, 3, 4])
                .into_iter()
                .filter(|q| config.quorum_reached(q))
                .collect()
        };
        for q in quorums(&move_2_to_4) {
            for other in [&move_2_to_4, &before, &after]
                .into_iter()
                .flat_map(quorums)
            {
                assert!(!q.is_disjoint(&other), "{q:?} and {other:?}");
            }
        }
    }

    #[test]
    fn a_cancelled_move_drops_the_successor_and_keeps_the_member_moved() {
        let move_2_to_4 = moving(5, &[1, 2, 3, 4], &[1, 2, 3], (2, 4));
        let (cancelled, given_up) = plan_cancel_move(&move_2_to_4).unwrap();
        assert_eq!(cancelled, config(6, &[1, 2, 3], &[1, 2, 3]));
        assert_eq!(given_up, move_2_to_4.moving.unwrap());
        assert_eq!(
            plan_cancel_move(&cancelled),
            Err(ReplaceError::NoMoveUnderWay)
        );
        // The two members that stay can cancel on their own; the successor
        // and one of them cannot.
        assert!(change_quorum_reached(
            &move_2_to_4,
            &cancelled,
            &set(&[1, 3])
        ));
        assert!(!change_quorum_reached(
            &move_2_to_4,
            &cancelled,
            &set(&[1, 4])
        ));
        // A cancel and the grow that would end the move otherwise cannot
        // both be persisted: every two of their quorums meet.
        let finished = plan_grow(&move_2_to_4, ReplicaId(4));
        let change_quorums = |next: &Config| -> Vec<BTreeSet<ReplicaId>> {
            subsets(&[1, 2, 3, 4])
                .into_iter()
                .filter(|q| change_quorum_reached(&move_2_to_4, next, q))
                .collect()
        };
        for q in change_quorums(&cancelled) {
            for other in change_quorums(&finished) {
                assert!(!q.is_disjoint(&other), "{q:?} and {other:?}");
            }
        }

        // A successor that was itself replaced (4 by 5) is the one that
        // leaves, and the swap is settled by the same change.
        let successor_replaced = plan_replace(&move_2_to_4, ReplicaId(4), ReplicaId(5)).unwrap();
        let (cancelled, given_up) = plan_cancel_move(&successor_replaced).unwrap();
        assert_eq!(cancelled, config(7, &[1, 2, 3], &[1, 2, 3]));
        assert_eq!(given_up.successor, ReplicaId(5));
        // The quorum of the change still needs the list before the swap.
        assert!(!change_quorum_reached(
            &successor_replaced,
            &cancelled,
            &set(&[1, 5])
        ));
        assert!(change_quorum_reached(
            &successor_replaced,
            &cancelled,
            &set(&[1, 3])
        ));
    }

    #[test]
    fn plan_open_cases() {
        let members = [1, 2, 3];
        let old = config(1, &members, &[1, 2, 3]);
        let shrunk = config(2, &members, &[2, 3]);
        type Case = (&'static str, Vec<(u32, Config)>, Result<Config, OpenError>);
        let cases: Vec<Case> = vec![
            (
                "all answer with the same config",
                vec![(1, old.clone()), (2, old.clone()), (3, old.clone())],
                Ok(config(5, &members, &[1, 2, 3])),
            ),
            (
                "a silent in-sync replica is left out",
                vec![(1, old.clone()), (2, old.clone())],
                Ok(config(5, &members, &[1, 2])),
            ),
            (
                "the newest config wins, whatever the answer order",
                vec![(1, old.clone()), (2, shrunk.clone())],
                Ok(config(5, &members, &[2])),
            ),
            (
                "a stale replica is never put back in sync",
                vec![(2, shrunk.clone()), (1, old.clone()), (3, shrunk.clone())],
                Ok(config(5, &members, &[2, 3])),
            ),
            (
                "only the stale replica and another answered",
                vec![(1, old.clone()), (3, config(3, &members, &[2]))],
                Err(OpenError::NoInSyncReplica),
            ),
            (
                "no majority",
                vec![(2, shrunk.clone())],
                Err(OpenError::NoMajority {
                    prepared: 1,
                    members: 3,
                    rule: "a majority of the members",
                }),
            ),
            (
                "answers of non-members and duplicates do not count",
                vec![(2, shrunk.clone()), (2, shrunk.clone()), (9, old.clone())],
                Err(OpenError::NoMajority {
                    prepared: 1,
                    members: 3,
                    rule: "a majority of the members",
                }),
            ),
            (
                "no answer",
                vec![],
                Err(OpenError::NoMajority {
                    prepared: 0,
                    members: 3,
                    rule: "a majority of the members",
                }),
            ),
            (
                "answers not from round 1 at this epoch",
                vec![(2, shrunk.clone()), (3, config(5, &members, &[3]))],
                Err(OpenError::EpochNotNewer { epoch: 5, seen: 5 }),
            ),
        ];
        for (name, answers, expected) in cases {
            let answers: Vec<(ReplicaId, Config)> = answers
                .into_iter()
                .map(|(id, config)| (ReplicaId(id), config))
                .collect();
            assert_eq!(plan_open(&ids(&members), 5, &answers), expected, "{name}");
        }
    }

    #[test]
    fn plan_shrink_cases() {
        let current = config(4, &[1, 2, 3], &[1, 2]);
        for (failed, expected) in [
            (set(&[2]), Ok(config(5, &[1, 2, 3], &[1]))),
            (set(&[3]), Ok(config(5, &[1, 2, 3], &[1, 2]))),
            (set(&[1, 2]), Err(ShrinkError::NoInSyncReplicaLeft)),
        ] {
            assert_eq!(
                plan_shrink(&current, &failed),
                expected,
                "failed {failed:?}"
            );
        }
    }

    #[test]
    fn a_replacement_replica_alone_with_stale_members_opens_nothing() {
        // r4 replaced r2; the change reached r1 only, which is down. r3
        // missed every config since the first.
        let fresh = ReplicaState::replacement(ids(&[1, 3, 4]));
        assert!(fresh.config.in_sync.is_empty());
        let answers = vec![
            (ReplicaId(3), config(0, &[1, 2, 3], &[1, 2, 3])),
            (ReplicaId(4), fresh.config.clone()),
        ];
        let planned = plan_open(&ids(&[1, 3, 4]), 5, &answers);
        assert!(
            matches!(
                planned,
                Err(OpenError::NoInSyncReplica | OpenError::OtherMembers { .. })
            ),
            "{planned:?}"
        );
        // What a fresh volume's replica would have said instead: r3 and r4
        // in sync, holding nothing of what r1 acknowledged.
        let answers = vec![
            (ReplicaId(3), config(0, &[1, 2, 3], &[1, 2, 3])),
            (ReplicaId(4), config(0, &[1, 3, 4], &[1, 3, 4])),
        ];
        assert!(plan_open(&ids(&[1, 3, 4]), 5, &answers).is_ok());
    }

    #[test]
    fn plan_replace_cases() {
        let current = config(4, &[1, 2, 3], &[1, 2]);
        let r = ReplicaId;
        for (remove, add, expected) in [
            (3, 4, Ok(swapped(config(5, &[1, 2, 4], &[1, 2]), 3, 4))),
            (
                2,
                4,
                Err(ReplaceError::TooFewInSync {
                    replica: r(2),
                    left: 1,
                    members: 3,
                }),
            ),
            (5, 4, Err(ReplaceError::NotAMember(r(5)))),
            (3, 2, Err(ReplaceError::AlreadyAMember(r(2)))),
        ] {
            assert_eq!(
                plan_replace(&current, r(remove), r(add)),
                expected,
                "replace {remove} by {add}"
            );
        }
        // A healthy in-sync replica may go: two of three stay in sync.
        let healthy = config(4, &[1, 2, 3], &[1, 2, 3]);
        assert_eq!(
            plan_replace(&healthy, r(2), r(4)),
            Ok(swapped(config(5, &[1, 4, 3], &[1, 3]), 2, 4))
        );
        // A faulted one may go even when few are in sync: none is lost.
        let lonely = config(4, &[1, 2, 3], &[2]);
        assert_eq!(
            plan_replace(&lonely, r(3), r(4)),
            Ok(swapped(config(5, &[1, 2, 4], &[2]), 3, 4))
        );
        assert_eq!(
            plan_replace(&lonely, r(2), r(4)),
            Err(ReplaceError::TooFewInSync {
                replica: r(2),
                left: 0,
                members: 3
            })
        );
    }

    #[test]
    fn a_moved_replica_stays_in_sync_until_its_successor_is() {
        let r = ReplicaId;
        let healthy = config(4, &[1, 2, 3], &[1, 2, 3]);
        let started = plan_move(&healthy, r(2), r(4)).unwrap();
        assert_eq!(started, moving(5, &[1, 2, 3, 4], &[1, 2, 3], (2, 4)));
        // Starting the move needs a majority of the list before it as well.
        assert!(change_quorum_reached(&healthy, &started, &set(&[1, 3])));
        assert!(!change_quorum_reached(&healthy, &started, &set(&[3, 4])));
        // One move at a time; the leaving member is not replaced again.
        assert_eq!(
            plan_move(&started, r(3), r(5)),
            Err(ReplaceError::MoveUnderWay(started.moving.unwrap()))
        );
        assert_eq!(
            plan_replace(&started, r(2), r(5)),
            Err(ReplaceError::Leaving(r(2)))
        );
        // The successor failing is replaced as any faulted replica is; the
        // move goes on with the new one.
        assert_eq!(
            plan_replace(&started, r(4), r(5)),
            Ok(swapped(moving(6, &[1, 2, 3, 5], &[1, 2, 3], (2, 5)), 4, 5))
        );
        // The grow of the successor takes r2 out.
        assert_eq!(plan_grow(&started, r(4)), config(6, &[1, 3, 4], &[1, 3, 4]));
        // Also when another member is out of sync: r3 failed during the copy.
        let shrunk = plan_shrink(&started, &set(&[3])).unwrap();
        assert_eq!(shrunk, moving(6, &[1, 2, 3, 4], &[1, 2], (2, 4)));
        assert_eq!(plan_grow(&shrunk, r(4)), config(7, &[1, 3, 4], &[1, 4]));
        // The grow of another member keeps the move going.
        assert_eq!(
            plan_grow(&shrunk, r(3)),
            moving(7, &[1, 2, 3, 4], &[1, 2, 3], (2, 4))
        );
        // An open carries the move on, also when only the two members
        // that stay answer.
        let answers = vec![
            (r(1), started.clone()),
            (r(3), started.clone()),
            (r(4), started.clone()),
        ];
        assert_eq!(
            plan_open(&started.members, 9, &answers),
            Ok(moving(9, &[1, 2, 3, 4], &[1, 3], (2, 4)))
        );
        assert_eq!(
            plan_open(&started.members, 9, &answers[..2]),
            Ok(moving(9, &[1, 2, 3, 4], &[1, 3], (2, 4)))
        );
        assert_eq!(
            plan_open(&started.members, 9, &answers[1..]),
            Err(OpenError::NoMajority {
                prepared: 2,
                members: 4,
                rule: "a majority of the members both with and without the one moving",
            })
        );
        // Only the successor can be replaced during the move: swapping r1
        // for r5 would make {3, 5} a quorum, which misses {1, 2, 4}, a
        // quorum of the move before it.
        let stays = Err(ReplaceError::StaysDuringMove {
            replica: r(1),
            moving: started.moving.unwrap(),
        });
        assert_eq!(plan_replace(&started, r(1), r(5)), stays);
        let swapped = moving(6, &[5, 2, 3, 4], &[2, 3], (2, 4));
        assert!(swapped.quorum_reached(&set(&[3, 5])));
        assert!(started.quorum_reached(&set(&[1, 2, 4])));
    }

    #[test]
    fn a_change_of_members_needs_both_majorities() {
        let before = config(1, &[1, 2, 3], &[1, 2, 3]);
        let after = config(2, &[1, 2, 4], &[1, 2]);
        for (accepted, reached) in [
            (set(&[1, 2]), true),
            (set(&[2, 4]), false),
            (set(&[2, 3]), false),
            (set(&[1, 3, 4]), true),
        ] {
            assert_eq!(
                change_quorum_reached(&before, &after, &accepted),
                reached,
                "{accepted:?}"
            );
        }
    }

    /// Why a change of members needs both majorities: every set of replicas
    /// that took the change meets every later majority of either list, so an
    /// opening target, whichever list it starts from, hears of the change. A
    /// majority of the new list alone does not: {2, 4} took it, and the old
    /// list's majority {1, 3} never hears of it.
    #[test]
    fn a_replacement_is_seen_by_every_majority_of_either_list() {
        let before = config(1, &[1, 2, 3], &[1, 2, 3]);
        let after = config(2, &[1, 2, 4], &[1, 2]);
        let all = subsets(&[1, 2, 3, 4]);
        let majorities: Vec<&BTreeSet<ReplicaId>> = all
            .iter()
            .filter(|q| before.quorum_reached(q) || after.quorum_reached(q))
            .collect();
        let mut new_list_only_misses = false;
        for took in &all {
            let missed = majorities.iter().any(|q| q.is_disjoint(took));
            if change_quorum_reached(&before, &after, took) {
                assert!(!missed, "{took:?} took the change, a majority misses it");
            } else if after.quorum_reached(took) && missed {
                new_list_only_misses = true;
            }
        }
        assert!(new_list_only_misses);
    }

    /// The lost write a second reader found: r3 replaced by r4, the
    /// change taken by r1 and r4 only (r2 had promised a newer epoch to a
    /// target that opened on {2, 3} and acknowledged a write on r2 alone).
    /// {1, 4} is a majority of the new list but not of the old: until the
    /// replacement is settled, an opener that hears only them opens nothing.
    /// The target that installed it settles it with one more change.
    #[test]
    fn a_replacement_needs_both_lists_until_it_is_settled() {
        let before = config(4, &[1, 2, 3], &[1, 2]);
        let replaced = plan_replace(&before, ReplicaId(3), ReplicaId(4)).unwrap();
        assert_eq!(
            replaced.voting_lists(),
            vec![ids(&[1, 2, 4]), ids(&[1, 2, 3])]
        );
        assert!(!replaced.quorum_reached(&set(&[1, 4])));
        assert!(replaced.quorum_reached(&set(&[1, 2])));
        let answers = vec![
            (ReplicaId(1), replaced.clone()),
            (ReplicaId(4), replaced.clone()),
        ];
        assert_eq!(
            plan_open(&ids(&[1, 2, 4]), 7, &answers),
            Err(OpenError::NoMajority {
                prepared: 2,
                members: 3,
                rule: "a majority of the members both before and after the replacement",
            })
        );
        // An open carries it on; its next change settles it.
        let opened = plan_open(
            &ids(&[1, 2, 4]),
            7,
            &[answers[0].clone(), (ReplicaId(2), replaced.clone())],
        )
        .unwrap();
        assert_eq!(opened, swapped(config(7, &[1, 2, 4], &[1, 2]), 3, 4));
        let settled = opened.settled().unwrap();
        assert_eq!(settled, config(8, &[1, 2, 4], &[1, 2]));
        assert!(settled.quorum_reached(&set(&[1, 4])));
        assert_eq!(settled.settled(), None);
        assert_eq!(plan_shrink(&opened, &set(&[2])).unwrap().swapped, None);
        // Replacing the successor of a move adds the move before it.
        let move_2_to_4 = moving(5, &[1, 2, 3, 4], &[1, 2, 3], (2, 4));
        let new_successor = plan_replace(&move_2_to_4, ReplicaId(4), ReplicaId(5)).unwrap();
        assert_eq!(
            new_successor.voting_lists(),
            vec![ids(&[1, 2, 3]), ids(&[1, 3, 5]), ids(&[1, 3, 4])]
        );
    }

    #[test]
    fn opening_with_an_old_member_list_asks_the_new_members() {
        let replaced = config(6, &[1, 2, 4], &[1, 2]);
        let answers = vec![
            (ReplicaId(2), replaced.clone()),
            (ReplicaId(3), config(3, &[1, 2, 3], &[1, 2, 3])),
        ];
        assert_eq!(
            plan_open(&ids(&[1, 2, 3]), 7, &answers),
            Err(OpenError::OtherMembers {
                members: ids(&[1, 2, 4])
            })
        );
        let answers = vec![
            (ReplicaId(1), replaced.clone()),
            (ReplicaId(4), replaced.clone()),
        ];
        assert_eq!(
            plan_open(&ids(&[1, 2, 4]), 7, &answers),
            Ok(config(7, &[1, 2, 4], &[1]))
        );
        // A minority of the list asked is no reason to turn to another:
        // the replacement may not have reached a majority of the old list.
        assert_eq!(
            plan_open(&ids(&[1, 2, 3]), 7, &[(ReplicaId(1), replaced)]),
            Err(OpenError::NoMajority {
                prepared: 1,
                members: 3,
                rule: "a majority of the members"
            })
        );
    }

    #[test]
    fn a_change_of_its_own_config_stops_at_a_config_it_did_not_persist() {
        let own = config(4, &[1, 2, 3], &[1, 2]);
        let foreign = config(3, &[1, 2, 3], &[2, 3]);
        let answers = |configs: &[(u32, &Config)]| -> Vec<(ReplicaId, Config)> {
            configs
                .iter()
                .map(|(id, config)| (ReplicaId(*id), (*config).clone()))
                .collect()
        };
        // Its own config, and older ones a replica left behind still holds.
        assert_eq!(
            check_own_change(4, &answers(&[(1, &own), (3, &foreign)])),
            Ok(())
        );
        // A config persisted by a change of its own that failed counts as
        // its own.
        assert_eq!(check_own_change(6, &answers(&[(1, &own)])), Ok(()));
        // A target still at epoch 2 whose epochs ran ahead during a
        // partition: epoch 3 is another target's.
        assert_eq!(
            check_own_change(
                2,
                &answers(&[(1, &config(2, &[1, 2, 3], &[1])), (2, &foreign)])
            ),
            Err(Deposed {
                replica: ReplicaId(2),
                seen: 3,
                own: 2
            })
        );
    }

    #[test]
    fn decide_write_cases() {
        let current = config(4, &[1, 2, 3], &[1, 2]);
        let accepted = IoReply::Accepted;
        let fenced = IoReply::Fenced { promised_epoch: 5 };
        let behind = IoReply::Behind { promised_epoch: 3 };
        for (replies, expected) in [
            (
                vec![(1, accepted), (2, accepted)],
                WriteOutcome::Acknowledge,
            ),
            (
                vec![(1, accepted), (2, accepted), (3, fenced)],
                WriteOutcome::Fenced,
            ),
            (
                vec![(1, accepted)],
                WriteOutcome::Shrink { failed: set(&[2]) },
            ),
            (
                vec![(1, behind), (2, accepted)],
                WriteOutcome::Shrink { failed: set(&[1]) },
            ),
            (
                vec![],
                WriteOutcome::Shrink {
                    failed: set(&[1, 2]),
                },
            ),
            (vec![(1, accepted), (2, fenced)], WriteOutcome::Fenced),
        ] {
            let replies: BTreeMap<ReplicaId, IoReply> = replies
                .into_iter()
                .map(|(id, reply)| (ReplicaId(id), reply))
                .collect();
            assert_eq!(decide_write(&current, &replies), expected, "{replies:?}");
        }
    }
}
