//! The instance manager with real PostgreSQL 15 servers: bootstrap and streaming
//! replication, a switchover that loses nothing, and a failover after SIGKILL that
//! loses no acknowledged commit, after which the old primary rejoins by pg_rewind.

mod harness;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::{require_postgres, wait_gone, Cluster, APP_PASSWORD};
use strata_operator::instance_api::Role;
use strata_operator::instance_client::ClientError;
use strata_operator::lsn::Lsn;
use strata_operator::orchestration::{failover, switchover};
use tokio_postgres::Client;

async fn current_lsn(client: &Client) -> Lsn {
    let text: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("current lsn")
        .get(0);
    text.parse().expect("an LSN")
}

async fn ids(client: &Client) -> BTreeSet<i64> {
    client
        .query("SELECT id FROM ledger", &[])
        .await
        .expect("read the ledger")
        .into_iter()
        .map(|r| r.get(0))
        .collect()
}

/// Acknowledged ids that `present` lacks: a lost commit. Reported by count and a
/// few examples, not as the whole set.
fn assert_nothing_lost(acked: &BTreeSet<i64>, present: &BTreeSet<i64>, on: &str) {
    let lost: Vec<i64> = acked.difference(present).copied().collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged commits are missing on {on}, e.g. {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(5)]
    );
}

/// Commits one row per transaction through `client` until a commit fails; every id
/// whose COMMIT was acknowledged goes into the ledger.
fn spawn_writer(client: Client, ledger: Arc<Mutex<BTreeSet<i64>>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for id in 1.. {
            match client
                .execute("INSERT INTO ledger (id) VALUES ($1)", &[&id])
                .await
            {
                Ok(_) => {
                    ledger.lock().unwrap().insert(id);
                }
                Err(_) => return,
            }
        }
    })
}

async fn wait_acked(ledger: &Arc<Mutex<BTreeSet<i64>>>, count: usize) {
    let deadline = Instant::now() + harness::PATIENCE;
    while ledger.lock().unwrap().len() < count {
        assert!(
            Instant::now() < deadline,
            "the writer did not get {count} commits acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn primary_and_two_replicas_replicate_writes() {
    require_postgres();
    let cluster = Cluster::start_with(
        3,
        0,
        &[
            "--user",
            "reporter:CREATEDB",
            "--database",
            "reports:reporter",
        ],
        &[("STRATA_USER_PASSWORD_REPORTER", "reporter-secret")],
    )
    .await;
    let primary = cluster.get("pg-1");

    let report = primary
        .wait_for("both standbys streaming", |r| {
            r.standbys.iter().filter(|s| s.state == "streaming").count() == 2
        })
        .await;
    assert_eq!(report.timeline, Some(1));
    let metrics = strata_operator::instance::api::render_metrics(&report);
    assert!(metrics.contains("strata_instance_primary 1"), "{metrics}");
    assert!(
        metrics.contains("strata_instance_streaming_standbys 2"),
        "{metrics}"
    );

    let db = primary.sql().await;
    // A physical slot per replica keeps the WAL it still needs.
    let slots: Vec<(String, bool)> = db
        .query(
            "SELECT slot_name::text, active FROM pg_replication_slots ORDER BY 1",
            &[],
        )
        .await
        .expect("slots")
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        slots,
        vec![
            ("strata_pg_2".to_string(), true),
            ("strata_pg_3".to_string(), true)
        ]
    );

    db.batch_execute(
        "CREATE TABLE ledger (id bigint PRIMARY KEY, note text);
         INSERT INTO ledger SELECT g, 'row ' || g FROM generate_series(1, 1000) g;",
    )
    .await
    .expect("write on the primary");
    let written = current_lsn(&db).await;

    for name in ["pg-2", "pg-3"] {
        let replica = cluster.get(name);
        let report = replica.wait_replayed(written).await;
        assert_eq!(report.role, Role::Replica);
        assert_eq!(report.following, Some(primary.address()));
        let rdb = replica.sql().await;
        let count: i64 = rdb
            .query_one("SELECT count(*) FROM ledger", &[])
            .await
            .expect("read on a replica")
            .get(0);
        assert_eq!(count, 1000, "{name} sees every row");
        let refused = rdb
            .execute("INSERT INTO ledger (id) VALUES (0)", &[])
            .await
            .expect_err("a replica refuses writes");
        assert_eq!(
            refused.code(),
            Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION),
            "{name}"
        );
    }

    // Role changes that do not fit the role are refused, and change nothing.
    let refused = primary
        .api
        .follow(&cluster.get("pg-2").address())
        .await
        .expect_err("a primary does not follow");
    assert!(
        matches!(refused, ClientError::Refused { status: 409, .. }),
        "{refused}"
    );
    let refused = cluster
        .get("pg-2")
        .api
        .demote(&primary.address())
        .await
        .expect_err("a replica is not demoted");
    assert!(
        matches!(refused, ClientError::Refused { status: 409, .. }),
        "{refused}"
    );
    assert_eq!(
        primary.api.status().await.expect("status").role,
        Role::Primary
    );

    // The application database and its owner come with bootstrap.
    let app = primary.sql_as("app", APP_PASSWORD, "app").await;
    let owner: String = app
        .query_one(
            "SELECT pg_get_userbyid(datdba)::text FROM pg_database WHERE datname = 'app'",
            &[],
        )
        .await
        .expect("app database")
        .get(0);
    assert_eq!(owner, "app");

    // So do the declared user (with its attribute) and database.
    let reporter = primary
        .sql_as("reporter", "reporter-secret", "reports")
        .await;
    let row = reporter
        .query_one(
            "SELECT rolcreatedb, current_database()::text FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .expect("the declared role");
    assert!(row.get::<_, bool>(0), "reporter has CREATEDB");
    assert_eq!(row.get::<_, String>(1), "reports");
}

#[tokio::test]
async fn switchover_loses_no_committed_transaction() {
    require_postgres();
    let cluster = Cluster::start(3, 1).await;
    let old = cluster.get("pg-1");
    let new = cluster.get("pg-2");
    let other = cluster.get("pg-3");
    old.sql()
        .await
        .batch_execute("CREATE TABLE ledger (id bigint PRIMARY KEY)")
        .await
        .expect("create the ledger");

    // Commits keep coming while the switchover runs.
    let ledger = Arc::new(Mutex::new(BTreeSet::new()));
    let writer = spawn_writer(old.sql().await, ledger.clone());
    wait_acked(&ledger, 100).await;

    let outcome = switchover(
        &old.member(),
        &new.member(),
        &[other.member()],
        harness::PATIENCE,
    )
    .await
    .unwrap_or_else(|e| panic!("switchover: {e}\npg-1 log:\n{}", old.log_tail()));
    writer.await.expect("writer task");
    eprintln!("switchover took {:?}", outcome.elapsed);
    assert_eq!(outcome.new_primary.role, Role::Primary);
    assert_eq!(outcome.new_primary.timeline, Some(2));

    let acked = ledger.lock().unwrap().clone();
    let new_db = new.sql().await;
    assert_nothing_lost(&acked, &ids(&new_db).await, "the new primary");

    // The old primary is a replica of the new one; the third one follows it too.
    for replica in [old, other] {
        let report = replica.wait_streaming_replica().await;
        assert_eq!(report.following, Some(new.address()), "{}", replica.name);
    }
    new_db
        .execute("INSERT INTO ledger (id) VALUES (-1)", &[])
        .await
        .expect("the new primary takes writes (a sync standby confirms them)");
    let written = current_lsn(&new_db).await;
    for replica in [old, other] {
        replica.wait_replayed(written).await;
        let present = ids(&replica.sql().await).await;
        assert!(present.contains(&-1), "{} has the new write", replica.name);
        assert_nothing_lost(&acked, &present, &replica.name);
    }
}

#[tokio::test]
async fn failover_after_sigkill_keeps_every_acknowledged_commit_and_the_old_primary_rejoins() {
    require_postgres();
    let mut cluster = Cluster::start(3, 1).await;
    let peers = cluster.peers.clone();
    let db = cluster.get("pg-1").sql().await;
    db.batch_execute("CREATE TABLE ledger (id bigint PRIMARY KEY)")
        .await
        .expect("create the ledger");
    // With ANY 1 of the two standbys synchronous, a COMMIT returns once a standby
    // has flushed it: the most advanced standby holds every acknowledged commit.
    let sync: String = db
        .query_one("SHOW synchronous_standby_names", &[])
        .await
        .expect("show")
        .get(0);
    assert_eq!(sync, r#"ANY 1 ("pg-2", "pg-3")"#);

    let ledger = Arc::new(Mutex::new(BTreeSet::new()));
    let writer = spawn_writer(cluster.get("pg-1").sql().await, ledger.clone());
    wait_acked(&ledger, 300).await;

    let old_postmaster = cluster
        .get("pg-1")
        .api
        .status()
        .await
        .expect("status")
        .postmaster_pid
        .expect("postgres runs");
    let killed_at = Instant::now();
    cluster.get_mut("pg-1").sigkill();
    // Its postgres must not outlive it (PR_SET_PDEATHSIG), or it could take writes.
    wait_gone(old_postmaster, "the killed primary's postmaster").await;
    writer.await.expect("writer task");
    let acked = ledger.lock().unwrap().clone();

    let replicas = [cluster.get("pg-2").member(), cluster.get("pg-3").member()];
    let outcome = failover("pg-1", &replicas).await.expect("failover");
    let promoted = cluster.get(&outcome.promoted);
    let new_db = promoted.sql().await;
    new_db
        .execute("INSERT INTO ledger (id) VALUES (-1)", &[])
        .await
        .expect("the new primary takes writes");
    eprintln!(
        "failover: SIGKILL to the first write on {} took {:?}",
        outcome.promoted,
        killed_at.elapsed()
    );
    // The promoted replica was the most advanced one.
    let best = outcome
        .candidates
        .iter()
        .filter_map(|r| r.wal_position())
        .max()
        .expect("positions");
    let promoted_position = outcome
        .candidates
        .iter()
        .find(|r| r.name == outcome.promoted)
        .and_then(|r| r.wal_position())
        .expect("position of the promoted one");
    assert_eq!(promoted_position, best);
    assert_eq!(outcome.promoted_report.role, Role::Primary);
    assert_eq!(outcome.promoted_report.timeline, Some(2));
    assert_nothing_lost(&acked, &ids(&new_db).await, "the promoted replica");

    // The old primary comes back as a replica of the new one, rewound.
    let new_address = promoted.address();
    cluster.get_mut("pg-1").start(&peers, 1, Some(&new_address));
    let old = cluster.get("pg-1");
    // Streaming on the new timeline: a former primary that was not rewound would
    // stop with "new timeline forked off current database system timeline".
    let report = old
        .wait_for("streaming on timeline 2", |r| {
            r.ready && r.role == Role::Replica && r.streaming && r.timeline == Some(2)
        })
        .await;
    assert_eq!(report.following, Some(new_address));

    new_db
        .execute("INSERT INTO ledger (id) VALUES (-2)", &[])
        .await
        .expect("write after the rejoin");
    let written = current_lsn(&new_db).await;
    let other = if outcome.promoted == "pg-2" {
        "pg-3"
    } else {
        "pg-2"
    };
    for name in ["pg-1", other] {
        let replica = cluster.get(name);
        let report = replica.wait_replayed(written).await;
        assert_eq!(report.timeline, Some(2), "{name} is on the new timeline");
        let present = ids(&replica.sql().await).await;
        assert!(
            present.contains(&-2),
            "{name} has the write after the rejoin"
        );
        assert_nothing_lost(&acked, &present, name);
    }
}

#[tokio::test]
async fn postgres_lives_and_dies_with_its_instance_manager() {
    require_postgres();
    let mut cluster = Cluster::start(1, 0).await;
    let instance = cluster.get_mut("pg-1");
    let postmaster = instance
        .api
        .status()
        .await
        .expect("status")
        .postmaster_pid
        .expect("postgres runs");
    let status = instance.terminate().await;
    assert!(status.success(), "exit status {status}");
    wait_gone(postmaster, "postgres after SIGTERM").await;
    // A fast shutdown, not a crash: pg_control says so.
    let control = std::process::Command::new(format!("{}/pg_controldata", harness::PG_BIN))
        .arg(instance.root.join("data"))
        .env("LC_ALL", "C")
        .output()
        .expect("pg_controldata");
    let control = String::from_utf8_lossy(&control.stdout);
    let state = control
        .lines()
        .find(|l| l.starts_with("Database cluster state:"))
        .unwrap_or_default()
        .to_string();
    assert!(state.ends_with("shut down"), "{state}");

    // Restarted on the same data, then SIGKILLed: postgres must not survive it.
    let peers = vec!["pg-1".to_string()];
    instance.start(&peers, 0, None);
    let report = instance.wait_primary().await;
    let postmaster = report.postmaster_pid.expect("postgres runs");
    instance.sigkill();
    wait_gone(
        postmaster,
        "postgres after its instance manager was SIGKILLed",
    )
    .await;

    // And the other way round: when postgres dies, the instance manager exits with
    // an error, so the kubelet restarts the container (and the instance recovers).
    instance.start(&peers, 0, None);
    let postmaster = instance
        .wait_primary()
        .await
        .postmaster_pid
        .expect("postgres runs");
    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(postmaster as libc::pid_t, libc::SIGKILL) };
    let status = instance.wait_exit().await;
    assert!(!status.success(), "exit status {status}");
}
