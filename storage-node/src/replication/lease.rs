//! Read leases: a target cut off from the majority stops serving reads
//! before a newer target can serve writes.
//!
//! Writes need no lease: a replica refuses every request of an older epoch,
//! and a write must reach every in-sync replica. A read goes to one replica,
//! the local one first. Without a lease, a target cut off from the majority
//! whose local replica the newer target did not reach would go on returning
//! data the newer target has overwritten since.
//!
//! The rule is the leader lease of Raft, over monotonic clocks (only their
//! rates need to agree, not their readings):
//!
//! * A target serves reads until `sent + LEASE * 4/5`, where `sent` is when it
//!   sent the newest request that a majority of the members (during a move,
//!   a quorum of its config: `Config::quorum_reached`) accepted at its
//!   epoch. Writes renew it; an idle target renews it with `Digest` requests
//!   of no extents, and a read that finds it expired renews it first.
//! * A replica remembers when it last accepted a data request or a config
//!   (`Persist`). When it promises a newer epoch, it answers with what is
//!   left of `LEASE` since then, and a newer target waits out the longest
//!   such remainder of the replicas it prepared before it serves anything.
//!
//! With one member list, any majority the old target renewed with shares a
//! replica with the majority the new target prepared, and that replica
//! accepted the old target's request before it promised the new epoch. So
//! the old target's lease ends, by its own clock, at least `LEASE / 5`
//! before the new target starts, by that replica's. When the member list
//! changes, a lease renewed under the old list ({2, 3} of [1, 2, 3]) need
//! not meet a quorum of the new one ({1, 4} of [1, 2, 4], once a replacement
//! is settled); but the target persisted the new config on a quorum of it
//! after that renewal, and those replicas count the persist, so one of them
//! is among those the new target prepared. A replica that restarted does
//! not know when it last accepted a request; it counts from its start.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a replica's acceptance of a request backs its target's reads.
pub const LEASE: Duration = Duration::from_secs(1);

/// The part of [`LEASE`] a target relies on; the rest is the margin for
/// clock rates and scheduling.
const USABLE: Duration = Duration::from_millis(LEASE.as_millis() as u64 * 4 / 5);

/// A monotonic instant as nanoseconds since `base`, for atomics.
struct Clock {
    base: Instant,
}

impl Clock {
    fn nanos(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_nanos() as u64
    }
}

/// The target's side: until when it may serve reads.
pub struct ReadLease {
    clock: Clock,
    /// Nanoseconds since `clock.base`; 0 = never held.
    until: AtomicU64,
}

impl Default for ReadLease {
    fn default() -> Self {
        ReadLease {
            clock: Clock {
                base: Instant::now(),
            },
            until: AtomicU64::new(0),
        }
    }
}

impl ReadLease {
    /// A majority accepted a request this target sent at `sent`.
    pub fn extend(&self, sent: Instant) {
        let until = self.clock.nanos(sent + USABLE);
        self.until.fetch_max(until, Ordering::AcqRel);
    }

    pub fn is_valid(&self) -> bool {
        self.clock.nanos(Instant::now()) < self.until.load(Ordering::Acquire)
    }

    /// Whether the lease ends within `margin` from now (or has ended).
    pub fn ends_within(&self, margin: Duration) -> bool {
        self.clock.nanos(Instant::now() + margin) >= self.until.load(Ordering::Acquire)
    }
}

/// The replica's side: when it last accepted a data request.
pub struct LastAccepted {
    clock: Clock,
    /// Nanoseconds since `clock.base`, plus one; 0 = never.
    at: AtomicU64,
}

impl Default for LastAccepted {
    /// Starts as if a request was accepted now: a replica that restarted
    /// cannot know when it accepted one last.
    fn default() -> Self {
        LastAccepted {
            clock: Clock {
                base: Instant::now(),
            },
            at: AtomicU64::new(1),
        }
    }
}

impl LastAccepted {
    /// For a replica created just now: no target has used it yet.
    pub fn never() -> Self {
        let last = LastAccepted::default();
        last.at.store(0, Ordering::Release);
        last
    }

    pub fn touch(&self) {
        self.at
            .fetch_max(self.clock.nanos(Instant::now()) + 1, Ordering::AcqRel);
    }

    /// What is left of [`LEASE`] since the last accepted request.
    pub fn lease_remaining(&self) -> Duration {
        let at = self.at.load(Ordering::Acquire);
        if at == 0 {
            return Duration::ZERO;
        }
        let since = Duration::from_nanos((self.clock.nanos(Instant::now()) + 1).saturating_sub(at));
        LEASE.saturating_sub(since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_lasts_four_fifths_of_lease_from_when_the_request_was_sent() {
        let lease = ReadLease::default();
        assert!(!lease.is_valid(), "held before any majority answered");
        let sent = Instant::now();
        lease.extend(sent);
        assert!(lease.is_valid());
        assert!(lease.ends_within(LEASE));
        assert!(!lease.ends_within(Duration::ZERO));
        // An older request does not shorten it.
        lease.extend(sent - LEASE);
        assert!(lease.is_valid());
        let old = ReadLease::default();
        old.extend(Instant::now() - LEASE);
        assert!(!old.is_valid(), "a lease from a request sent LEASE ago");
    }

    #[test]
    fn a_replica_reports_what_is_left_since_its_last_accepted_request() {
        let last = LastAccepted::default();
        let left = last.lease_remaining();
        assert!(
            left > LEASE / 2 && left <= LEASE,
            "counts from its start: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
        assert!(last.lease_remaining() <= LEASE - Duration::from_millis(50));
        last.touch();
        assert!(last.lease_remaining() > LEASE - Duration::from_millis(50));
        let new = LastAccepted::never();
        assert_eq!(new.lease_remaining(), Duration::ZERO);
        new.touch();
        assert!(new.lease_remaining() > LEASE / 2);
    }
}
