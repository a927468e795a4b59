//! Replacing a replica by a new one on another node, on request (`strata
//! volume replace-replica`, through the node's gRPC API) or automatically
//! when a replica stays faulted longer than `Replacement::after`.
//!
//! A faulted or lost replica is replaced in one configuration change
//! (`membership::plan_replace`): the old member leaves and the new, empty
//! one joins, not in sync, at a new epoch taken by a majority of the old and
//! of the new member list. A healthy, in-sync replica is moved instead
//! (`membership::plan_move`): the new one joins as a fourth member and the
//! old one stays in sync, taking every write, until the new one is in sync;
//! the change that grows the in-sync set by the new one takes the old one
//! out. Either way the rebuilder treats the new replica like any replica
//! that is behind: it takes every write from then on, gets a copy of every
//! extent that differs from an in-sync replica (all the data the volume
//! holds, since it is empty), and joins the in-sync set. The old replica's
//! data is deleted once it is out of the member list and its node answers.
//!
//! A move can be given up while the copy runs
//! (`membership::plan_cancel_move`): the new replica leaves and the old one
//! stays, as before the move.
//!
//! For automatic replacement, the node finds the candidate nodes through its
//! `Discovery` (the cluster file of `strata up`, or the headless Service's
//! DNS name in Kubernetes) and places the new replica as `strata volume
//! create` would.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::sweep::Sweeper;
use super::{Answer, VolumeTarget};
use crate::cluster::{volumes, Discovery};
use crate::replication::membership::{self, ReplicaId};
use crate::replication::replica::Member;
use crate::replication::wire::{Op, Request};

/// How often the target looks for replicas faulted long enough.
const REPLACE_POLL: Duration = Duration::from_secs(1);
/// How often it tries to delete replaced replicas whose node was down.
const CLEANUP_EVERY: u32 = 10;
/// The longest wait before an automatic replacement that failed is tried
/// again (no spare node yet, say).
const REPLACE_RETRY_MAX: Duration = Duration::from_secs(60);

/// What a target needs to place new replicas and delete replaced ones.
#[derive(Debug, Clone)]
pub struct Replacement {
    /// How long a replica stays out of the in-sync set and not being
    /// rebuilt (or, in the set, unreachable) before it is replaced
    /// automatically (None: only on request).
    pub after: Option<Duration>,
    /// Where the other nodes are found: those that may take a new replica,
    /// and those that hold a replaced one.
    pub discovery: Discovery,
    /// Sweeps the cluster for leftover replicas of the node's targets' volumes.
    pub sweeper: Arc<Sweeper>,
}

impl Replacement {
    pub fn new(after: Option<Duration>, discovery: Discovery) -> Replacement {
        Replacement {
            after,
            sweeper: Sweeper::new(discovery.clone()),
            discovery,
        }
    }
}

/// Why a replica could not be replaced.
#[derive(Debug, thiserror::Error)]
pub enum ReplaceError {
    #[error("{0}")]
    Membership(#[from] membership::ReplaceError),
    #[error("node {0} holds a replica of the volume already")]
    NodeHoldsReplica(String),
    /// A move was asked for a replica that cannot stay in sync during the
    /// copy (the caller's view of the volume was older than the target's).
    #[error(
        "the replica on {node} is {why}, so it cannot stay in sync while its successor is \
         copied; replace it instead"
    )]
    CannotMove { node: String, why: &'static str },
    #[error("the target was fenced by a newer one")]
    Fenced,
    /// The configuration change did not reach a majority.
    #[error("{0}")]
    Change(String),
}

impl VolumeTarget {
    /// Replaces member `remove` by `add`, an empty replica already created
    /// on another node with the new member list. With `keep_until_copied`
    /// (a move), `remove` stays until `add` is in sync. Returns once the
    /// change is persisted; the rebuilder fills the new replica.
    pub async fn replace_member(
        &self,
        remove: u32,
        add: Member,
        keep_until_copied: bool,
    ) -> Result<(), ReplaceError> {
        let _exclusive = self.gate.write().await;
        if self.is_fenced() {
            return Err(ReplaceError::Fenced);
        }
        let current = self.current();
        let (remove, add_id) = (ReplicaId(remove), ReplicaId(add.id));
        let next = match keep_until_copied {
            true => membership::plan_move(&current, remove, add_id)?,
            false => membership::plan_replace(&current, remove, add_id)?,
        };
        let removed = self.index_of(remove);
        if keep_until_copied {
            // The caller decided on a move from its own look at the volume;
            // the target's config and links are the newer word.
            let why = if !current.in_sync.contains(&remove) {
                Some("out of sync")
            } else if !matches!(
                self.send_one(removed, Request::new(Op::GetState, 0, 0))
                    .await,
                Answer::Done(_)
            ) {
                Some("unreachable")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(ReplaceError::CannotMove {
                    node: self.node_of(removed),
                    why,
                });
            }
        }
        let member_nodes: Vec<String> = self
            .member_indexes(&current)
            .into_iter()
            .map(|index| self.node_of(index))
            .collect();
        if member_nodes.contains(&add.node) {
            return Err(ReplaceError::NodeHoldsReplica(add.node));
        }
        let node = add.node.clone();
        {
            // A slot stays behind for a member that left (a move given up)
            // or failed to join; its id may come back for a new replica once
            // the old one is deleted. The new one gets a fresh slot: the old
            // link leads to the deleted replica.
            let mut slots = self.slots.write().expect("slots lock");
            match slots.iter().position(|slot| slot.member.id == add.id) {
                Some(index) => slots[index] = super::Slot::new(add),
                None => slots.push(super::Slot::new(add)),
            }
        }
        {
            // The old replica of that id is gone from the new one's node
            // (the node refuses a second replica of a volume), so a deletion
            // still pending there would delete the new one.
            let mut replaced = self.replaced.lock().expect("replaced lock");
            if replaced.get(&add_id.0) == Some(&node) {
                replaced.remove(&add_id.0);
            }
        }
        if !keep_until_copied {
            // A rebuild of the leaving member stops; its writes stop with it.
            self.abort_rebuild(removed, "replaced");
        }
        self.commit_change(&current, next)
            .await
            .map_err(|reason| match self.is_fenced() {
                true => ReplaceError::Fenced,
                false => ReplaceError::Change(reason),
            })?;
        self.settle_replacement().await;
        if keep_until_copied {
            tracing::warn!(
                volume = %self.volume,
                moving = %self.node_of(removed),
                to = %node,
                epoch = self.epoch(),
                "moving a replica: the old one stays in sync until the new one has a full copy"
            );
        } else {
            self.retire(removed);
            tracing::warn!(
                volume = %self.volume,
                removed = %self.node_of(removed),
                added = %node,
                epoch = self.epoch(),
                "replica replaced; the new one is rebuilt with a full copy"
            );
        }
        Ok(())
    }

    /// Gives up the move under way (`membership::plan_cancel_move`): the
    /// successor leaves, its copy stops, and its replica is deleted once its
    /// node answers; the member that was being moved stays as it was (in
    /// sync, unless it failed meanwhile). Returns the member that stays and
    /// the successor.
    pub async fn cancel_move(&self) -> Result<(Member, Member), ReplaceError> {
        let _exclusive = self.gate.write().await;
        if self.is_fenced() {
            return Err(ReplaceError::Fenced);
        }
        let current = self.current();
        let (next, moving) = membership::plan_cancel_move(&current)?;
        let (stays, successor) = (
            self.index_of(moving.leaving),
            self.index_of(moving.successor),
        );
        // Its copy stops now: the rebuild's last step (the grow that would
        // end the move) waits for the gate and then finds it aborted.
        self.abort_rebuild(successor, "move cancelled");
        self.commit_change(&current, next)
            .await
            .map_err(|reason| match self.is_fenced() {
                true => ReplaceError::Fenced,
                false => ReplaceError::Change(reason),
            })?;
        self.drop_member_data(successor);
        let (stays, successor) = (self.member(stays), self.member(successor));
        tracing::warn!(
            volume = %self.volume,
            stays = %stays.node,
            dropped = %successor.node,
            epoch = self.epoch(),
            "move cancelled: the replica stays where it was"
        );
        Ok((stays, successor))
    }

    /// Settles the replacement that made the current config, if any
    /// (`membership::Config::settled`): one more change, after which a
    /// quorum is a majority of the new member list alone. The caller holds
    /// the gate exclusively. A failure is only logged: the config keeps the
    /// stricter quorum, which is as safe, until the next change settles it.
    pub(super) async fn settle_replacement(&self) {
        let current = self.current();
        let Some(settled) = current.settled() else {
            return;
        };
        if let Err(reason) = self.commit_change(&current, settled).await {
            tracing::warn!(
                volume = %self.volume,
                %reason,
                "could not settle the replacement yet; the next change will"
            );
        }
    }

    /// Notes that member `index` was replaced (or moved) and left the
    /// volume: its data is deleted from its node once the node answers.
    pub(super) fn retire(&self, index: usize) {
        self.drop_member_data(index);
        self.local
            .pool()
            .metrics()
            .replaced_replicas
            .get_or_create(&self.labels())
            .inc();
    }

    /// Has the data of member `index`, which left the volume, deleted from
    /// its node once the node answers (see `spawn_replacer`).
    fn drop_member_data(&self, index: usize) {
        self.replaced
            .lock()
            .expect("replaced lock")
            .insert(self.id_of(index), self.node_of(index));
        self.cleanup_due.store(true, Ordering::Release);
    }

    /// Replaces member `remove` on a node the placement rules choose, and
    /// deletes the old replica if its node answers.
    async fn replace_automatically(
        &self,
        discovery: &Discovery,
        remove: u32,
    ) -> Result<String, String> {
        let from = self.node_of(self.index_of(ReplicaId(remove)));
        let cluster = discovery.cluster().await.map_err(|e| e.to_string())?;
        let planned = volumes::create_replacement(&cluster, &self.volume, &from, None)
            .await
            .map_err(|e| e.to_string())?;
        let member = Member {
            id: planned.member.id,
            node: planned.member.node.clone(),
            address: planned.member.address.clone(),
        };
        let replaced = self
            .replace_member(remove, member, planned.keep_until_copied)
            .await;
        // The old replica, if its node answers, or the new one if it did
        // not join.
        volumes::delete_retired(&cluster, &self.volume).await;
        replaced.map_err(|err| err.to_string())?;
        Ok(planned.node.name)
    }

    /// Deletes the replicas this target replaced on nodes that are back.
    async fn delete_replaced(&self, discovery: &Discovery) {
        let pending = self.replaced.lock().expect("replaced lock").clone();
        if pending.is_empty() {
            return;
        }
        let Ok(cluster) = discovery.cluster().await else {
            return;
        };
        for (id, node) in pending {
            let Ok(entry) = cluster.node(&node) else {
                continue;
            };
            if volumes::delete_replica_by_id(entry, &self.volume, self.expected_replica(id))
                .await
                .is_ok()
            {
                tracing::info!(volume = %self.volume, %node, "the replaced replica is gone from its node");
                self.replaced.lock().expect("replaced lock").remove(&id);
            }
        }
    }
}

/// Has the node's sweeper look for leftover replicas of the target's
/// volume (see `sweep`).
pub(super) fn sweep_for(target: &Arc<VolumeTarget>) {
    if let Some(replacement) = &target.options.replacement {
        replacement.sweeper.add(target);
    }
}

/// Watches the members and replaces those faulted for longer than
/// `options.replacement.after`, one at a time; deletes the replaced
/// replicas, at once or, if their node was down, once it is back. Ends with
/// the target.
pub(super) fn spawn_replacer(target: &Arc<VolumeTarget>) {
    let Some(replacement) = target.options.replacement.clone() else {
        return;
    };
    let weak = Arc::downgrade(target);
    tokio::spawn(async move {
        // How long each member (by id) is faulted, and when a failed
        // replacement may be tried again (with its last wait).
        let mut clocks = FaultClocks::default();
        let mut retry: BTreeMap<u32, (Instant, Duration)> = BTreeMap::new();
        let mut round = 0u32;
        loop {
            tokio::time::sleep(REPLACE_POLL).await;
            let Some(target) = weak.upgrade() else { return };
            if target.is_fenced() || target.is_closed() {
                return;
            }
            round += 1;
            if target.cleanup_due.swap(false, Ordering::AcqRel) || round % CLEANUP_EVERY == 0 {
                target.delete_replaced(&replacement.discovery).await;
            }
            let Some(after) = replacement.after else {
                continue;
            };
            let config = target.current();
            let attempts = target.rebuild_attempts();
            clocks.retain(|id| config.members.contains(&ReplicaId(id)));
            retry.retain(|id, _| clocks.tracks(*id));
            for &id in &config.members {
                // During a move only the successor can be replaced
                // (`membership::plan_replace`); the member being moved
                // leaves once the successor is in sync.
                if config.moving.is_some_and(|moving| moving.successor != id) {
                    continue;
                }
                // An in-sync replica of an idle volume is dropped by no
                // write; it counts as faulted while it cannot be reached.
                let health = if config.in_sync.contains(&id)
                    && target.connect(target.index_of(id), true).await.is_ok()
                {
                    Health::InSync
                } else if let Some(&(started, copied)) = attempts.get(&target.index_of(id)) {
                    Health::Rebuilding { started, copied }
                } else {
                    Health::Faulted
                };
                if health == Health::InSync {
                    retry.remove(&id.0);
                }
                // A rebuild under way may take long on a big volume; the
                // replica is not replaced while it catches up.
                let Some(faulted_for) = clocks.observe(id.0, health, Instant::now()) else {
                    continue;
                };
                if faulted_for < after
                    || retry.get(&id.0).is_some_and(|(at, _)| Instant::now() < *at)
                {
                    continue;
                }
                let from = target.node_of(target.index_of(id));
                tracing::warn!(
                    volume = %target.volume,
                    node = %from,
                    ?faulted_for,
                    "replacing a replica that stayed faulted"
                );
                match target
                    .replace_automatically(&replacement.discovery, id.0)
                    .await
                {
                    Ok(node) => {
                        tracing::info!(volume = %target.volume, from = %from, to = %node, "automatic replacement started");
                        clocks.forget(id.0);
                        retry.remove(&id.0);
                    }
                    Err(err) => {
                        let wait = retry.get(&id.0).map_or(REPLACE_POLL * 5, |(_, wait)| {
                            (*wait * 2).min(REPLACE_RETRY_MAX)
                        });
                        tracing::warn!(volume = %target.volume, node = %from, %err, ?wait, "could not replace a faulted replica");
                        retry.insert(id.0, (Instant::now() + wait, wait));
                    }
                }
                // One replacement per round: the config changed.
                break;
            }
        }
    });
}

/// What the replacer sees of a member at one look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    /// In sync and reachable.
    InSync,
    /// Being caught up: the attempt under way, and the bytes it copied.
    Rebuilding { started: Instant, copied: u64 },
    /// Out of sync or unreachable, with no rebuild under way.
    Faulted,
}

/// How long each member has been faulted, for automatic replacement.
///
/// A member's clock starts when it is first seen out of sync or unreachable
/// and restarts whenever its rebuild copies more data: a long copy that
/// fails once (a dropped link, a node restart) is taken up again where it
/// stopped instead of being thrown away for a full copy elsewhere, while a
/// member whose rebuilds never copy anything (a pool that takes no data) is
/// still replaced. A member being rebuilt is never due.
#[derive(Debug, Default)]
struct FaultClocks {
    members: BTreeMap<u32, FaultClock>,
}

#[derive(Debug)]
struct FaultClock {
    since: Instant,
    /// The rebuild attempt last seen and the bytes it had copied then.
    attempt: Option<(Instant, u64)>,
}

impl FaultClocks {
    /// Notes how member `id` is at `now`; returns how long it has been
    /// faulted when it is faulted with no rebuild under way.
    fn observe(&mut self, id: u32, health: Health, now: Instant) -> Option<Duration> {
        if health == Health::InSync {
            self.members.remove(&id);
            return None;
        }
        let clock = self.members.entry(id).or_insert(FaultClock {
            since: now,
            attempt: None,
        });
        let Health::Rebuilding { started, copied } = health else {
            return Some(now.saturating_duration_since(clock.since));
        };
        let progressed = match clock.attempt {
            Some((seen, before)) if seen == started => copied > before,
            // An attempt not seen before: anything it copied is progress.
            _ => copied > 0,
        };
        if progressed {
            clock.since = now;
        }
        clock.attempt = Some((started, copied));
        None
    }

    /// Whether member `id` has a clock: faulted, or being rebuilt.
    fn tracks(&self, id: u32) -> bool {
        self.members.contains_key(&id)
    }

    fn forget(&mut self, id: u32) {
        self.members.remove(&id);
    }

    fn retain(&mut self, keep: impl Fn(u32) -> bool) {
        self.members.retain(|&id, _| keep(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn a_long_rebuild_interrupted_once_is_not_due_for_replacement() {
        let mut clocks = FaultClocks::default();
        let t0 = Instant::now();
        assert_eq!(clocks.observe(2, Health::Faulted, t0), Some(Duration::ZERO));
        // The node came back: a rebuild copies for an hour.
        let attempt = t0 + MINUTE;
        for minute in 1..=60u64 {
            let health = Health::Rebuilding {
                started: attempt,
                copied: minute << 30,
            };
            assert_eq!(clocks.observe(2, health, t0 + MINUTE * minute as u32), None);
        }
        // Its link drops: between attempts it counts as faulted only since
        // its copy last moved, not since the first fault an hour ago.
        let gap = t0 + MINUTE * 61;
        assert_eq!(clocks.observe(2, Health::Faulted, gap), Some(MINUTE));
    }

    #[test]
    fn rebuilds_that_never_copy_leave_the_clock_running() {
        let mut clocks = FaultClocks::default();
        let t0 = Instant::now();
        clocks.observe(1, Health::Faulted, t0);
        // Attempt after attempt starts and fails before copying a byte.
        for n in 1..=10u32 {
            let started = t0 + MINUTE * n;
            let health = Health::Rebuilding { started, copied: 0 };
            assert_eq!(clocks.observe(1, health, started), None);
            let later = Health::Rebuilding { started, copied: 0 };
            assert_eq!(clocks.observe(1, later, started + MINUTE / 2), None);
        }
        let now = t0 + MINUTE * 11;
        assert_eq!(clocks.observe(1, Health::Faulted, now), Some(MINUTE * 11));
    }

    #[test]
    fn the_clock_restarts_at_the_last_copy_seen() {
        let mut clocks = FaultClocks::default();
        let t0 = Instant::now();
        clocks.observe(3, Health::Faulted, t0);
        // First seen a minute in, having copied already.
        let first = Health::Rebuilding {
            started: t0,
            copied: 500,
        };
        clocks.observe(3, first, t0 + MINUTE);
        assert_eq!(
            clocks.observe(3, Health::Faulted, t0 + MINUTE * 3),
            Some(MINUTE * 2)
        );
        // A second attempt that copies, then stalls.
        let second = t0 + MINUTE * 4;
        let stalled = Health::Rebuilding {
            started: second,
            copied: 100,
        };
        clocks.observe(3, stalled, second);
        clocks.observe(3, stalled, second + MINUTE);
        assert_eq!(
            clocks.observe(3, Health::Faulted, second + MINUTE * 2),
            Some(MINUTE * 2)
        );
    }

    #[test]
    fn a_member_back_in_sync_starts_afresh() {
        let mut clocks = FaultClocks::default();
        let t0 = Instant::now();
        clocks.observe(4, Health::Faulted, t0);
        assert_eq!(clocks.observe(4, Health::InSync, t0 + MINUTE * 30), None);
        assert!(!clocks.tracks(4));
        assert_eq!(
            clocks.observe(4, Health::Faulted, t0 + MINUTE * 31),
            Some(Duration::ZERO)
        );
    }
}
