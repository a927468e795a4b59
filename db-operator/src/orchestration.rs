//! The multi-instance procedures, driven over the instance managers' HTTP APIs:
//! a planned switchover without data loss, and a failover once the old primary is
//! fenced. The controller runs them with Pods; the tests run them with processes.

use std::time::{Duration, Instant};

use crate::decisions::{caught_up, choose_promotion};
use crate::instance_api::{InstanceReport, PrimaryAddress};
use crate::instance_client::{ClientError, InstanceClient};
use crate::lsn::Lsn;

/// One instance as the procedures see it: how to reach its API and its postgres.
#[derive(Clone)]
pub struct Member {
    pub name: String,
    pub api: InstanceClient,
    pub postgres: PrimaryAddress,
}

#[derive(Debug, thiserror::Error)]
pub enum OrchestrationError {
    #[error(transparent)]
    Instance(#[from] ClientError),
    #[error("{name} did not receive WAL up to {needed} within {waited:?} (it has {has:?})")]
    CatchUpTimeout {
        name: String,
        needed: Lsn,
        has: Option<Lsn>,
        waited: Duration,
    },
    #[error("no replica can be promoted: none is ready")]
    NoCandidate,
}

/// What a switchover did.
#[derive(Debug, Clone)]
pub struct SwitchoverOutcome {
    pub final_lsn: Lsn,
    pub new_primary: InstanceReport,
    pub elapsed: Duration,
}

/// Planned switchover from `old` to `new`: demote `old` with a clean shutdown (its
/// last WAL reaches the standbys), wait until `new` has received all of it, promote
/// `new`, and point the `others` at it. Loses no committed transaction.
pub async fn switchover(
    old: &Member,
    new: &Member,
    others: &[Member],
    patience: Duration,
) -> Result<SwitchoverOutcome, OrchestrationError> {
    let started = Instant::now();
    let demoted = old.api.demote(&new.postgres).await?;
    let final_lsn = demoted.final_lsn;
    let deadline = Instant::now() + patience;
    loop {
        let report = new.api.status().await?;
        let received = report.received_lsn;
        if caught_up(&report, final_lsn) {
            break;
        }
        if Instant::now() > deadline {
            return Err(OrchestrationError::CatchUpTimeout {
                name: new.name.clone(),
                needed: final_lsn,
                has: received,
                waited: patience,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let new_primary = new.api.promote().await?;
    for other in others {
        other.api.follow(&new.postgres).await?;
    }
    Ok(SwitchoverOutcome {
        final_lsn,
        new_primary,
        elapsed: started.elapsed(),
    })
}

/// What a failover did.
#[derive(Debug, Clone)]
pub struct FailoverOutcome {
    pub promoted: String,
    pub promoted_report: InstanceReport,
    /// Every replica's report at the moment of the decision.
    pub candidates: Vec<InstanceReport>,
}

/// Failover after the primary `failed` was fenced (its postgres is gone): promote
/// the replica with the most WAL and make the other replicas follow it. Replicas that
/// do not answer are left out of the decision.
pub async fn failover(
    failed: &str,
    replicas: &[Member],
) -> Result<FailoverOutcome, OrchestrationError> {
    let mut reports = Vec::new();
    for member in replicas {
        match member.api.status().await {
            Ok(report) => reports.push(report),
            Err(e) => tracing::warn!(instance = member.name, error = %e, "no status"),
        }
    }
    let chosen = choose_promotion(&reports, failed)
        .ok_or(OrchestrationError::NoCandidate)?
        .name
        .clone();
    let winner = replicas
        .iter()
        .find(|m| m.name == chosen)
        .expect("the chosen replica is a member");
    tracing::info!(promoted = chosen, failed, "failing over");
    let promoted_report = winner.api.promote().await?;
    for other in replicas.iter().filter(|m| m.name != chosen) {
        if let Err(e) = other.api.follow(&winner.postgres).await {
            // A replica that cannot be told now is told by the next reconcile.
            tracing::warn!(instance = other.name, error = %e, "could not repoint replica");
        }
    }
    Ok(FailoverOutcome {
        promoted: chosen,
        promoted_report,
        candidates: reports,
    })
}
