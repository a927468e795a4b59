//! Failover and switchover times with real PostgreSQL 15 servers, over 10 runs:
//!
//! ```text
//! cargo test -p strata-operator --release --test ha_timing -- --ignored --nocapture
//! ```
//!
//! Failover: from SIGKILL of the primary's instance manager to the first commit
//! acknowledged by the promoted replica (the instance managers' part; the controller
//! adds its detection delay, `failoverDelaySeconds`). Switchover: from the demote
//! request to the first commit acknowledged by the new primary. Both with
//! synchronous replication on (ANY 1 of the other two), three instances.

mod harness;

use std::time::{Duration, Instant};

use harness::{require_postgres, wait_gone, Cluster};
use strata_operator::orchestration::{failover, switchover};

const RUNS: usize = 10;

/// Retries a write until the new primary takes it (a sync standby must confirm).
async fn first_write(instance: &harness::Instance, id: i64) {
    let deadline = Instant::now() + harness::PATIENCE;
    loop {
        if let Ok(client) = harness::try_connect(
            instance.pg_port,
            "postgres",
            harness::SUPERUSER_PASSWORD,
            "postgres",
        )
        .await
        {
            if client
                .execute("INSERT INTO ledger (id) VALUES ($1)", &[&id])
                .await
                .is_ok()
            {
                return;
            }
        }
        assert!(Instant::now() < deadline, "no write accepted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn summary(what: &str, mut times: Vec<Duration>) {
    times.sort();
    let median = (times[times.len() / 2] + times[(times.len() - 1) / 2]) / 2;
    let worst = *times.last().expect("runs");
    println!(
        "{what}: median {:.0} ms, worst {:.0} ms over {} runs",
        median.as_secs_f64() * 1000.0,
        worst.as_secs_f64() * 1000.0,
        times.len()
    );
}

#[tokio::test]
#[ignore = "a measurement: about a minute; run with --ignored --nocapture"]
async fn failover_and_switchover_times() {
    require_postgres();
    let mut failovers = Vec::new();
    let mut switchovers = Vec::new();
    for run in 0..RUNS {
        let mut cluster = Cluster::start(3, 1).await;
        let db = cluster.get("pg-1").sql().await;
        db.batch_execute(
            "CREATE TABLE ledger (id bigint PRIMARY KEY);
             INSERT INTO ledger SELECT generate_series(1, 1000);",
        )
        .await
        .expect("seed");

        let started = Instant::now();
        switchover(
            &cluster.get("pg-1").member(),
            &cluster.get("pg-2").member(),
            &[cluster.get("pg-3").member()],
            harness::PATIENCE,
        )
        .await
        .expect("switchover");
        first_write(cluster.get("pg-2"), -1).await;
        switchovers.push(started.elapsed());

        // pg-1 and pg-3 stream from pg-2 before it is killed.
        for name in ["pg-1", "pg-3"] {
            cluster.get(name).wait_streaming_replica().await;
        }
        let postmaster = cluster
            .get("pg-2")
            .api
            .status()
            .await
            .expect("status")
            .postmaster_pid
            .expect("postgres runs");
        let killed = Instant::now();
        cluster.get_mut("pg-2").sigkill();
        let replicas = [cluster.get("pg-1").member(), cluster.get("pg-3").member()];
        let outcome = failover("pg-2", &replicas).await.expect("failover");
        first_write(cluster.get(&outcome.promoted), -2).await;
        failovers.push(killed.elapsed());
        wait_gone(postmaster, "the killed primary's postmaster").await;
        println!(
            "run {run}: switchover {:?}, failover {:?} (promoted {})",
            switchovers[run], failovers[run], outcome.promoted
        );
    }
    summary("switchover", switchovers);
    summary("failover (SIGKILL to first acknowledged write)", failovers);
}
