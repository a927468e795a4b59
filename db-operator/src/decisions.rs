//! The pure decisions of high availability, kept apart from the Kubernetes and HTTP
//! plumbing so they can be tested case by case: which replica to promote, which
//! instance is the primary when more than one claims it, which replicas to remove
//! on scale-down, and when a failover is due.

use std::cmp::Reverse;
use std::time::{Duration, Instant};

use crate::instance_api::{InstanceReport, Role};
use crate::lsn::Lsn;

/// How far an instance's WAL goes, for ranking: a higher timeline beats any LSN on
/// a lower one (its history contains a promotion the others have not seen).
fn progress(report: &InstanceReport) -> (u32, Lsn) {
    (
        report.timeline.unwrap_or(0),
        report.wal_position().unwrap_or_default(),
    )
}

/// The replica to promote when `failed` is lost: among replicas that answer and
/// accept connections, the one with the most WAL; ties go to the lowest name so the
/// choice is the same on every run.
pub fn choose_promotion<'a>(
    reports: &'a [InstanceReport],
    failed: &str,
) -> Option<&'a InstanceReport> {
    reports
        .iter()
        .filter(|r| r.name != failed && r.role == Role::Replica && r.ready)
        .filter(|r| r.wal_position().is_some())
        .max_by_key(|r| (progress(r), Reverse(r.name.clone())))
}

/// Who is primary when the reports are in, and who must be fenced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrimaryResolution {
    pub primary: Option<String>,
    /// Instances that claim to be primary but are not: they must be stopped (their
    /// Pod deleted) before they take writes the real primary never sees.
    pub fence: Vec<String>,
}

/// Resolves the claims of the instances that report themselves primary. The
/// recorded primary (the Kubernetes API is the single record) keeps the role while
/// it claims it; otherwise the claimant furthest ahead wins.
pub fn resolve_primary(reports: &[InstanceReport], recorded: Option<&str>) -> PrimaryResolution {
    let mut claimants: Vec<&InstanceReport> = reports
        .iter()
        .filter(|r| r.role == Role::Primary && r.ready)
        .collect();
    if claimants.is_empty() {
        return PrimaryResolution {
            primary: None,
            fence: Vec::new(),
        };
    }
    let winner = match recorded.and_then(|name| claimants.iter().find(|r| r.name == name)) {
        Some(r) => r.name.clone(),
        None => {
            claimants.sort_by_key(|r| (Reverse(progress(r)), r.name.clone()));
            claimants[0].name.clone()
        }
    };
    let mut fence: Vec<String> = claimants
        .iter()
        .filter(|r| r.name != winner)
        .map(|r| r.name.clone())
        .collect();
    fence.sort();
    PrimaryResolution {
        primary: Some(winner),
        fence,
    }
}

/// The `count` instances to remove on scale-down: never the primary; first the ones
/// that do not answer, then the least advanced replicas, the newest name first among
/// equals. `instances` is every instance name; `reports` those that answered.
pub fn choose_removals(
    instances: &[String],
    reports: &[InstanceReport],
    primary: Option<&str>,
    count: usize,
) -> Vec<String> {
    let mut candidates: Vec<(Option<(u32, Lsn)>, &String)> = instances
        .iter()
        .filter(|name| Some(name.as_str()) != primary)
        .map(|name| {
            let report = reports.iter().find(|r| &r.name == name && r.ready);
            (report.map(progress), name)
        })
        .collect();
    // None (no answer) sorts before Some; among equals the newest name goes first.
    candidates.sort_by(|(pa, na), (pb, nb)| pa.cmp(pb).then_with(|| instance_order(nb, na)));
    candidates
        .into_iter()
        .take(count)
        .map(|(_, name)| name.clone())
        .collect()
}

/// Orders instance names by their numeric suffix (`pg-10` after `pg-9`).
pub fn instance_order(a: &str, b: &str) -> std::cmp::Ordering {
    fn key(name: &str) -> (u64, &str) {
        let digits = name.rsplit('-').next().unwrap_or("");
        (digits.parse().unwrap_or(0), name)
    }
    key(a).cmp(&key(b))
}

/// Whether a replica has all the WAL a demoted primary wrote. `final_lsn` is where
/// its shutdown checkpoint record starts; a flush position past it means the whole
/// record (and everything before it) is on the replica's disk, so promoting it loses
/// nothing.
pub fn caught_up(replica: &InstanceReport, final_lsn: Lsn) -> bool {
    replica.received_lsn.is_some_and(|r| r > final_lsn)
}

/// Remembers since when the primary has been unreachable; a failover is due once
/// that lasts longer than the configured delay, so a blip does not cost a promotion.
#[derive(Debug, Default, Clone)]
pub struct PrimaryWatch {
    unhealthy_since: Option<Instant>,
}

impl PrimaryWatch {
    /// Records one observation; answers whether to fail over now.
    pub fn observe(&mut self, healthy: bool, now: Instant, delay: Duration) -> bool {
        if healthy {
            self.unhealthy_since = None;
            return false;
        }
        let since = *self.unhealthy_since.get_or_insert(now);
        now.duration_since(since) >= delay
    }

    pub fn reset(&mut self) {
        self.unhealthy_since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(name: &str, role: Role, ready: bool, timeline: u32, lsn: &str) -> InstanceReport {
        let lsn: Option<Lsn> = Some(lsn.parse().expect("test LSN"));
        InstanceReport {
            name: name.into(),
            role,
            ready,
            timeline: Some(timeline),
            current_lsn: if role == Role::Primary { lsn } else { None },
            received_lsn: if role == Role::Replica { lsn } else { None },
            replayed_lsn: if role == Role::Replica { lsn } else { None },
            replay_lag_bytes: Some(0),
            streaming: true,
            following: None,
            postmaster_pid: Some(1),
            standbys: Vec::new(),
            replication: None,
        }
    }

    fn replica(name: &str, timeline: u32, lsn: &str) -> InstanceReport {
        report(name, Role::Replica, true, timeline, lsn)
    }

    fn primary(name: &str, timeline: u32, lsn: &str) -> InstanceReport {
        report(name, Role::Primary, true, timeline, lsn)
    }

    #[test]
    fn promotion_picks_the_most_advanced_healthy_replica() {
        let mut lagging_received = replica("pg-2", 1, "0/5000000");
        lagging_received.replayed_lsn = Some("0/4000000".parse().unwrap());
        let cases: Vec<(&str, Vec<InstanceReport>, Option<&str>)> = vec![
            (
                "highest LSN wins",
                vec![
                    primary("pg-1", 1, "0/9000000"),
                    replica("pg-2", 1, "0/5000000"),
                    replica("pg-3", 1, "0/6000000"),
                ],
                Some("pg-3"),
            ),
            (
                "received WAL counts, not only replayed",
                vec![lagging_received.clone(), replica("pg-3", 1, "0/4800000")],
                Some("pg-2"),
            ),
            (
                "a higher timeline beats a higher LSN",
                vec![
                    replica("pg-2", 2, "0/3000000"),
                    replica("pg-3", 1, "0/9000000"),
                ],
                Some("pg-2"),
            ),
            (
                "a replica that is not ready is never promoted",
                vec![
                    report("pg-2", Role::Replica, false, 1, "0/9000000"),
                    replica("pg-3", 1, "0/1000000"),
                ],
                Some("pg-3"),
            ),
            (
                "the failed primary is never chosen",
                vec![
                    replica("pg-1", 1, "0/9000000"),
                    replica("pg-2", 1, "0/1000000"),
                ],
                Some("pg-2"),
            ),
            (
                "equal positions: the lowest name, every time",
                vec![
                    replica("pg-3", 1, "0/5000000"),
                    replica("pg-2", 1, "0/5000000"),
                ],
                Some("pg-2"),
            ),
            ("no replica at all", vec![primary("pg-2", 1, "0/1")], None),
            (
                "no replica ready",
                vec![report("pg-2", Role::Replica, false, 1, "0/1")],
                None,
            ),
        ];
        for (what, reports, expected) in cases {
            let chosen = choose_promotion(&reports, "pg-1").map(|r| r.name.as_str());
            assert_eq!(chosen, expected, "{what}");
        }
    }

    #[test]
    fn two_primaries_resolve_to_one_and_the_other_is_fenced() {
        // (what, reports, recorded primary, expected primary, expected fenced)
        type Case<'a> = (
            &'a str,
            Vec<InstanceReport>,
            Option<&'a str>,
            Option<&'a str>,
            Vec<&'a str>,
        );
        let cases: Vec<Case> = vec![
            (
                "one claimant, as recorded",
                vec![primary("pg-1", 1, "0/5"), replica("pg-2", 1, "0/5")],
                Some("pg-1"),
                Some("pg-1"),
                vec![],
            ),
            (
                "the recorded primary keeps the role over a returning old primary",
                vec![
                    primary("pg-1", 1, "0/9000000"),
                    primary("pg-2", 2, "0/1000000"),
                ],
                Some("pg-2"),
                Some("pg-2"),
                vec!["pg-1"],
            ),
            (
                "the recorded one keeps it even when the other is further ahead",
                vec![
                    primary("pg-1", 3, "0/9000000"),
                    primary("pg-2", 2, "0/1000000"),
                ],
                Some("pg-2"),
                Some("pg-2"),
                vec!["pg-1"],
            ),
            (
                "nothing recorded: the higher timeline wins",
                vec![
                    primary("pg-1", 1, "0/9000000"),
                    primary("pg-2", 2, "0/1000000"),
                ],
                None,
                Some("pg-2"),
                vec!["pg-1"],
            ),
            (
                "recorded primary no longer claims: the furthest claimant wins",
                vec![
                    replica("pg-1", 2, "0/1"),
                    primary("pg-2", 2, "0/2000000"),
                    primary("pg-3", 2, "0/3000000"),
                ],
                Some("pg-1"),
                Some("pg-3"),
                vec!["pg-2"],
            ),
            (
                "a claimant that is not ready does not count",
                vec![
                    report("pg-1", Role::Primary, false, 1, "0/9"),
                    primary("pg-2", 2, "0/1"),
                ],
                Some("pg-1"),
                Some("pg-2"),
                vec![],
            ),
            (
                "no claimant",
                vec![replica("pg-1", 1, "0/1")],
                Some("pg-1"),
                None,
                vec![],
            ),
        ];
        for (what, reports, recorded, primary, fence) in cases {
            let resolution = resolve_primary(&reports, recorded);
            assert_eq!(resolution.primary.as_deref(), primary, "{what}");
            assert_eq!(resolution.fence, fence, "{what}");
        }
    }

    #[test]
    fn scale_down_removes_the_least_advanced_replicas_never_the_primary() {
        let names: Vec<String> = ["pg-1", "pg-2", "pg-3", "pg-4"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        // (what, reports, primary, how many to remove, expected removals)
        type Case<'a> = (
            &'a str,
            Vec<InstanceReport>,
            Option<&'a str>,
            usize,
            Vec<&'a str>,
        );
        let cases: Vec<Case> = vec![
            (
                "least advanced first",
                vec![
                    primary("pg-1", 1, "0/9000000"),
                    replica("pg-2", 1, "0/3000000"),
                    replica("pg-3", 1, "0/8000000"),
                    replica("pg-4", 1, "0/5000000"),
                ],
                Some("pg-1"),
                2,
                vec!["pg-2", "pg-4"],
            ),
            (
                "an instance that does not answer goes first",
                vec![
                    primary("pg-1", 1, "0/9000000"),
                    replica("pg-2", 1, "0/3000000"),
                    replica("pg-4", 1, "0/5000000"),
                ],
                Some("pg-1"),
                1,
                vec!["pg-3"],
            ),
            (
                "never the primary, even when it is the least advanced",
                vec![
                    primary("pg-3", 2, "0/1000000"),
                    replica("pg-1", 2, "0/2000000"),
                    replica("pg-2", 2, "0/2000000"),
                    replica("pg-4", 2, "0/2000000"),
                ],
                Some("pg-3"),
                3,
                vec!["pg-4", "pg-2", "pg-1"],
            ),
            (
                "equal positions: the newest instance first",
                vec![
                    primary("pg-1", 1, "0/9"),
                    replica("pg-2", 1, "0/5"),
                    replica("pg-3", 1, "0/5"),
                    replica("pg-4", 1, "0/5"),
                ],
                Some("pg-1"),
                1,
                vec!["pg-4"],
            ),
        ];
        for (what, reports, primary, count, expected) in cases {
            let removed = choose_removals(&names, &reports, primary, count);
            assert_eq!(removed, expected, "{what}");
        }
    }

    #[test]
    fn instance_names_order_by_number() {
        let mut names = vec!["pg-10", "pg-9", "pg-1"];
        names.sort_by(|a, b| instance_order(a, b));
        assert_eq!(names, vec!["pg-1", "pg-9", "pg-10"]);
    }

    #[test]
    fn failover_waits_for_the_delay_and_a_recovery_resets_it() {
        let delay = Duration::from_secs(5);
        let t0 = Instant::now();
        let mut watch = PrimaryWatch::default();
        assert!(!watch.observe(false, t0, delay), "first failure");
        assert!(!watch.observe(false, t0 + Duration::from_secs(4), delay));
        assert!(
            !watch.observe(true, t0 + Duration::from_secs(5), delay),
            "recovered"
        );
        assert!(
            !watch.observe(false, t0 + Duration::from_secs(6), delay),
            "counts anew"
        );
        assert!(
            watch.observe(false, t0 + Duration::from_secs(11), delay),
            "due"
        );
    }
}
