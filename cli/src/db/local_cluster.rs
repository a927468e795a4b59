//! One local database as `strata up` runs it: the local stand-in for the
//! operator's reconcile of a PostgresCluster, with processes instead of Pods
//! and the files in `DIR/db/NAME/` instead of the Kubernetes API.
//!
//! Every half second it makes sure each instance's volume is attached and
//! mounted and its instance manager runs (the first as a new primary, the
//! others as replicas of the recorded primary), polls every instance's API,
//! fails over when the primary is lost, runs a requested switchover, points
//! the stable addresses at the primary and the replicas, and writes the
//! observed status. The decisions are the operator's (`decisions.rs`,
//! `orchestration.rs`); the recorded primary is the single record of who is
//! primary, as the custom resource's status is in Kubernetes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use strata_csi::attach::Attacher;
use strata_node::cluster::ClusterFile;
use strata_operator::decisions::{choose_promotion, resolve_primary, PrimaryWatch};
use strata_operator::instance_api::{InstanceReport, PrimaryAddress, Role};
use strata_operator::instance_client::InstanceClient;
use strata_operator::orchestration::{self, Member, OrchestrationError};
use tokio::sync::watch;

use super::process;
use super::proxy::Proxy;
use super::record::{
    self, DbDir, DbSpec, DbStatus, InstanceSpec, InstanceStatus, Phase, SwitchoverRequest,
    SwitchoverResult,
};
use super::storage::{self, MountedVolume};

const TICK: Duration = Duration::from_millis(500);
/// A dead instance manager is restarted after this long, as a Pod would be.
const RESTART_DELAY: Duration = Duration::from_secs(1);
/// How long a primary that runs but does not answer (or is not ready) is
/// given before it is fenced and replaced. A primary whose instance manager
/// exited is replaced at once: its postgres died with it.
const FAILOVER_DELAY: Duration = Duration::from_secs(10);
/// How long a switchover target may take to receive the demoted primary's last WAL.
const SWITCHOVER_PATIENCE: Duration = Duration::from_secs(60);
/// How long the API of an instance may take to answer a status poll.
const POLL_TIMEOUT: Duration = Duration::from_secs(2);
/// Failed reconciles in a row after which a cluster being created is failed;
/// fewer are retried quietly (a node restarting, a slow attach).
const FAILURES_BEFORE_FAILED: u32 = 5;
/// Failed starts of instance managers after which a cluster being created is failed.
const FAILED_STARTS_BEFORE_FAILED: u32 = 3;

struct LocalInstance {
    spec: InstanceSpec,
    dir: PathBuf,
    /// Short timeout, for polls.
    status_api: InstanceClient,
    /// Promotion and demotion wait for postgres.
    api: InstanceClient,
    volume: Option<MountedVolume>,
    /// The volume of an instance manager that exited, to be attached anew
    /// before the instance starts again: its target may have died with a
    /// storage node, leaving a device that only answers I/O errors.
    stale_volume: Option<MountedVolume>,
    /// A detach of the stale volume failed already (said once, retried quietly).
    detach_retrying: bool,
    process: Option<Child>,
    /// Not started again before this instant.
    restart_at: Option<Instant>,
    starts: u32,
    report: Option<InstanceReport>,
    /// The last postmaster pid the instance reported: it must be gone before
    /// another instance is promoted in this one's place.
    postmaster_pid: Option<u32>,
}

impl LocalInstance {
    fn new(db: &DbDir, spec: InstanceSpec) -> LocalInstance {
        let base = format!("http://127.0.0.1:{}", spec.api_port);
        LocalInstance {
            dir: db.instance_dir(&spec.name),
            status_api: InstanceClient::new(base.clone()).with_timeout(POLL_TIMEOUT),
            api: InstanceClient::new(base),
            spec,
            volume: None,
            stale_volume: None,
            detach_retrying: false,
            process: None,
            restart_at: None,
            starts: 0,
            report: None,
            postmaster_pid: None,
        }
    }

    fn name(&self) -> &str {
        &self.spec.name
    }

    fn address(&self) -> PrimaryAddress {
        PrimaryAddress {
            host: "127.0.0.1".into(),
            port: self.spec.pg_port,
        }
    }

    fn socket_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.spec.pg_port))
    }

    fn member(&self) -> Member {
        Member {
            name: self.spec.name.clone(),
            api: self.api.clone(),
            postgres: self.address(),
        }
    }

    fn is_running(&self) -> bool {
        self.process.is_some()
    }

    fn ready_as(&self, role: Role) -> bool {
        self.is_running()
            && self
                .report
                .as_ref()
                .is_some_and(|r| r.ready && r.role == role)
    }

    fn may_start(&self, now: Instant) -> bool {
        self.process.is_none() && self.volume.is_some() && self.restart_at.is_none_or(|t| now >= t)
    }

    fn start(&mut self, spec: &DbSpec, primary: Option<&PrimaryAddress>) -> anyhow::Result<()> {
        let volume = self.volume.as_ref().context("the volume is not mounted")?;
        let child = process::spawn(spec, &self.spec, &self.dir, &volume.data_dir(), primary)?;
        self.starts += 1;
        eprintln!(
            "db {}: started {} (pid {}) as {}",
            spec.name,
            self.spec.name,
            child.id(),
            match primary {
                Some(p) => format!("a replica of {p}"),
                None => "the primary".into(),
            }
        );
        self.process = Some(child);
        self.report = None;
        Ok(())
    }

    /// SIGKILL: the instance is lost at once (fencing a primary).
    fn kill(&mut self) {
        if let Some(mut child) = self.process.take() {
            process::kill(&mut child);
            self.restart_at = Some(Instant::now() + RESTART_DELAY);
            self.stale_volume = self.volume.take();
        }
        self.report = None;
    }
}

pub struct LocalCluster {
    db: DbDir,
    spec: DbSpec,
    cluster: ClusterFile,
    attacher: Attacher,
    instances: Vec<LocalInstance>,
    /// The single record of who is primary.
    primary: Option<String>,
    watch: PrimaryWatch,
    rw: Proxy,
    ro: Proxy,
    failovers: u32,
    last_switchover: Option<SwitchoverResult>,
    message: Option<String>,
    /// The cluster has been ready once (creation is over).
    created: bool,
    /// Reconciles in a row that failed: a new cluster whose creation keeps
    /// failing (no room for its volumes...) is reported failed.
    failures: u32,
    /// Instance managers that failed while the cluster was being created,
    /// and why the last one did: three of them fail the creation.
    creation_exits: u32,
    creation_error: Option<String>,
}

/// Runs the database `name` of the local cluster in `dir` until `strata up`
/// stops (instances stopped, volumes detached and kept) or `strata db rm`
/// asks for its removal (volumes deleted, its folder removed).
pub async fn run(dir: PathBuf, name: String, mut shutdown: watch::Receiver<bool>) {
    let db = DbDir::new(&dir, &name);
    let mut tick = tokio::time::interval(TICK);
    let mut cluster = loop {
        match LocalCluster::load(&dir, &db).await {
            Ok(cluster) => break cluster,
            Err(err) => {
                // Nothing runs yet: record why, and let `strata db rm` remove it.
                eprintln!("db {name}: {err:#}");
                let _ = write_unloadable_status(&db, &err);
                if db.deleting_path().exists() {
                    let _ = std::fs::remove_dir_all(&db.0);
                    return;
                }
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                }
            }
        }
    };
    loop {
        tokio::select! {
            _ = shutdown.changed() => {
                cluster.stop_all().await;
                let _ = cluster.write_status();
                return;
            }
            _ = tick.tick() => {}
        }
        if db.deleting_path().exists() {
            match cluster.delete().await {
                Ok(()) => {
                    eprintln!("db {name}: deleted");
                    return;
                }
                Err(err) => cluster.message = Some(format!("deleting: {err:#}")),
            }
        } else if let Err(err) = cluster.reconcile().await {
            let text = format!("{err:#}");
            if cluster.message.as_deref() != Some(&text) {
                eprintln!("db {name}: {text}");
            }
            cluster.message = Some(text);
            cluster.failures += 1;
        } else {
            cluster.message = None;
            cluster.failures = 0;
        }
        if let Err(err) = cluster.write_status() {
            eprintln!("db {name}: writing status: {err:#}");
        }
    }
}

fn write_unloadable_status(db: &DbDir, err: &anyhow::Error) -> anyhow::Result<()> {
    record::write_json(
        &db.status_path(),
        &DbStatus {
            phase: Phase::Failed,
            primary: None,
            instances: Vec::new(),
            message: Some(format!("{err:#}")),
            failovers: 0,
            last_switchover: None,
            supervisor_pid: std::process::id(),
        },
    )
}

impl LocalCluster {
    async fn load(dir: &Path, db: &DbDir) -> anyhow::Result<LocalCluster> {
        let spec = db.spec()?;
        let previous = db.status()?;
        let cluster = ClusterFile::load(dir)?;
        let attacher = Attacher::new(dir).context("preparing the attach folder")?;
        let listen = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let rw = Proxy::start(listen(spec.rw_port))
            .await
            .with_context(|| format!("listening on 127.0.0.1:{} (read-write)", spec.rw_port))?;
        let ro = Proxy::start(listen(spec.ro_port))
            .await
            .with_context(|| format!("listening on 127.0.0.1:{} (read-only)", spec.ro_port))?;
        let instances = spec
            .instances
            .iter()
            .cloned()
            .map(|i| LocalInstance::new(db, i))
            .collect();
        let created = previous
            .as_ref()
            .is_some_and(|s| s.phase != Phase::Creating);
        Ok(LocalCluster {
            db: db.clone(),
            cluster,
            attacher,
            instances,
            primary: previous.as_ref().and_then(|s| s.primary.clone()),
            watch: PrimaryWatch::default(),
            rw,
            ro,
            failovers: previous.as_ref().map_or(0, |s| s.failovers),
            last_switchover: previous.and_then(|s| s.last_switchover),
            message: None,
            created,
            failures: 0,
            creation_exits: 0,
            creation_error: None,
            spec,
        })
    }

    fn instance(&self, name: &str) -> Option<&LocalInstance> {
        self.instances.iter().find(|i| i.name() == name)
    }

    fn instance_mut(&mut self, name: &str) -> Option<&mut LocalInstance> {
        self.instances.iter_mut().find(|i| i.name() == name)
    }

    /// The last reports of the running instances.
    fn reports(&self) -> Vec<InstanceReport> {
        self.instances
            .iter()
            .filter(|i| i.is_running())
            .filter_map(|i| i.report.clone())
            .collect()
    }

    fn primary_instance(&self) -> Option<&LocalInstance> {
        self.primary.as_deref().and_then(|p| self.instance(p))
    }

    async fn reconcile(&mut self) -> anyhow::Result<()> {
        // A lost primary is replaced before anything slower (attaching volumes).
        self.reap_exited()?;
        self.poll().await;
        self.keep_a_primary().await?;
        self.mount_volumes().await?;
        self.start_replicas()?;
        self.update_proxies();
        if let Some(request) =
            record::read_json_if_present::<SwitchoverRequest>(&self.db.switchover_path())?
        {
            let outcome = self.switchover(request.to.as_deref()).await;
            if let Err(err) = &outcome {
                eprintln!("db {}: switchover failed: {err:#}", self.spec.name);
            }
            self.last_switchover = Some(SwitchoverResult {
                id: request.id,
                to: outcome.as_ref().ok().cloned(),
                error: outcome.err().map(|e| format!("{e:#}")),
            });
            std::fs::remove_file(self.db.switchover_path())?;
            self.update_proxies();
        }
        Ok(())
    }

    /// Volumes first: an instance starts only on its mounted volume.
    async fn mount_volumes(&mut self) -> anyhow::Result<()> {
        for instance in &mut self.instances {
            if let Some(stale) = &instance.stale_volume {
                // Busy while the lost postgres's last processes exit: next tick.
                match storage::unmount_and_detach(
                    &self.attacher,
                    &self.db,
                    &instance.spec.name,
                    stale,
                )
                .await
                {
                    Ok(()) => {
                        instance.stale_volume = None;
                        instance.detach_retrying = false;
                    }
                    Err(err) => {
                        if !instance.detach_retrying {
                            eprintln!("db {}: {err:#}; retrying", self.spec.name);
                            instance.detach_retrying = true;
                        }
                        continue;
                    }
                }
            }
        }
        let unmounted = self
            .instances
            .iter_mut()
            .filter(|i| i.volume.is_none() && i.stale_volume.is_none());
        for instance in unmounted {
            storage::ensure_volume(&self.cluster, &self.spec, &instance.spec).await?;
            let volume =
                storage::attach_and_mount(&self.cluster, &self.attacher, &self.db, &instance.spec)
                    .await?;
            eprintln!(
                "db {}: volume {} attached as {} at {}",
                self.spec.name,
                instance.spec.volume,
                storage::device_name(&volume),
                volume.mount_point.display()
            );
            instance.volume = Some(volume);
        }
        Ok(())
    }

    fn reap_exited(&mut self) -> anyhow::Result<()> {
        for instance in &mut self.instances {
            let Some(child) = instance.process.as_mut() else {
                continue;
            };
            if let Some(status) = child.try_wait()? {
                let reason = process::exit_reason(&instance.dir)
                    .filter(|_| !status.success())
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default();
                eprintln!(
                    "db {}: instance manager of {} exited ({status}){reason}",
                    self.spec.name, instance.spec.name
                );
                if !self.created && !status.success() {
                    self.creation_exits += 1;
                    self.creation_error =
                        Some(format!("{} exited ({status}){reason}", instance.spec.name));
                }
                instance.process = None;
                instance.report = None;
                instance.restart_at = Some(Instant::now() + RESTART_DELAY);
                instance.stale_volume = instance.volume.take();
            }
        }
        Ok(())
    }

    async fn poll(&mut self) {
        for instance in self.instances.iter_mut().filter(|i| i.is_running()) {
            instance.report = instance.status_api.status().await.ok();
            if let Some(pid) = instance.report.as_ref().and_then(|r| r.postmaster_pid) {
                instance.postmaster_pid = Some(pid);
            }
        }
    }

    /// Bootstraps the first primary, settles competing claims, and replaces a
    /// lost primary.
    async fn keep_a_primary(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        let Some(recorded) = self.primary.clone() else {
            // A new cluster: the first instance initialises the database.
            let first = &mut self.instances[0];
            if first.ready_as(Role::Primary) {
                self.primary = Some(first.name().to_string());
            } else if first.may_start(now) {
                first.start(&self.spec, None)?;
            }
            return Ok(());
        };
        let reports = self.reports();
        let resolution = resolve_primary(&reports, Some(&recorded));
        for name in &resolution.fence {
            eprintln!(
                "db {}: fencing {name}, which claims to be primary besides {}",
                self.spec.name,
                resolution.primary.as_deref().unwrap_or("?")
            );
            if let Some(instance) = self.instance_mut(name) {
                instance.kill();
            }
        }
        if let Some(winner) = resolution.primary.filter(|w| *w != recorded) {
            // The recorded primary no longer claims the role; another does
            // (a promotion whose answer was lost).
            eprintln!("db {}: {winner} is the primary now", self.spec.name);
            self.primary = Some(winner);
            self.watch.reset();
            return Ok(());
        }
        let primary = self
            .instance(&recorded)
            .context("the recorded primary is not an instance")?;
        if primary.ready_as(Role::Primary) {
            self.watch.reset();
            return Ok(());
        }
        if !primary.is_running() {
            return self.fail_over(&recorded).await;
        }
        if self.watch.observe(false, now, FAILOVER_DELAY) {
            eprintln!(
                "db {}: primary {recorded} unhealthy for {FAILOVER_DELAY:?}; fencing it",
                self.spec.name
            );
            if let Some(instance) = self.instance_mut(&recorded) {
                instance.kill();
            }
            return self.fail_over(&recorded).await;
        }
        Ok(())
    }

    /// The primary `lost` is gone (its instance manager exited or was
    /// killed): make sure its postgres is gone too, then promote the most
    /// advanced ready replica. With no replica to promote, the lost primary
    /// itself starts again as the primary (no other history exists).
    async fn fail_over(&mut self, lost: &str) -> anyhow::Result<()> {
        let now = Instant::now();
        let old = self.instance_mut(lost).context("unknown primary")?;
        if let Some(pid) = old.postmaster_pid.take() {
            process::ensure_gone(pid, Duration::from_secs(5)).await;
        }
        let replicas: Vec<Member> = self
            .instances
            .iter()
            .filter(|i| i.name() != lost && i.is_running())
            .map(LocalInstance::member)
            .collect();
        match orchestration::failover(lost, &replicas).await {
            Ok(outcome) => {
                eprintln!(
                    "db {}: primary {lost} lost; promoted {} (timeline {:?})",
                    self.spec.name, outcome.promoted, outcome.promoted_report.timeline
                );
                // Its answer is its new report: the read-write address moves now.
                if let Some(promoted) = self.instance_mut(&outcome.promoted) {
                    promoted.report = Some(outcome.promoted_report.clone());
                }
                self.primary = Some(outcome.promoted);
                self.failovers += 1;
                self.watch.reset();
                self.update_proxies();
                Ok(())
            }
            Err(OrchestrationError::NoCandidate) => {
                let spec = &self.spec;
                let old = self
                    .instances
                    .iter_mut()
                    .find(|i| i.name() == lost)
                    .context("unknown primary")?;
                if old.may_start(now) {
                    old.start(spec, None)?;
                }
                Ok(())
            }
            Err(err) => Err(err).context("failover"),
        }
    }

    /// Every other instance runs as a replica of the recorded primary once it is ready.
    fn start_replicas(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        let Some(primary) = self
            .primary_instance()
            .filter(|p| p.ready_as(Role::Primary))
        else {
            return Ok(());
        };
        let (name, address) = (primary.name().to_string(), primary.address());
        for instance in &mut self.instances {
            if instance.name() != name && instance.may_start(now) {
                instance.start(&self.spec, Some(&address))?;
            }
        }
        Ok(())
    }

    /// The read-write address leads to the ready primary, the read-only one
    /// to the streaming replicas; nowhere while there is none.
    fn update_proxies(&self) {
        let primary: Vec<SocketAddr> = self
            .primary_instance()
            .filter(|p| p.ready_as(Role::Primary))
            .map(LocalInstance::socket_addr)
            .into_iter()
            .collect();
        let replicas: Vec<SocketAddr> = self
            .instances
            .iter()
            .filter(|i| Some(i.name()) != self.primary.as_deref())
            .filter(|i| i.ready_as(Role::Replica) && i.report.as_ref().is_some_and(|r| r.streaming))
            .map(LocalInstance::socket_addr)
            .collect();
        self.rw.set_backends(primary);
        self.ro.set_backends(replicas);
    }

    /// A planned switchover to `to` (default: the most advanced ready
    /// replica). Answers the new primary.
    async fn switchover(&mut self, to: Option<&str>) -> anyhow::Result<String> {
        let Some(old) = self
            .primary_instance()
            .filter(|p| p.ready_as(Role::Primary))
        else {
            bail!("there is no ready primary to switch over from");
        };
        let old_name = old.name().to_string();
        let target = match to {
            Some(name) => {
                let Some(target) = self.instance(name) else {
                    bail!("no instance {name:?} in database {}", self.spec.name);
                };
                if name == old_name {
                    bail!("{name} is already the primary");
                }
                if !target.ready_as(Role::Replica) {
                    bail!("{name} is not a ready replica");
                }
                name.to_string()
            }
            None => {
                let reports = self.reports();
                choose_promotion(&reports, &old_name)
                    .map(|r| r.name.clone())
                    .context("no ready replica to switch over to")?
            }
        };
        let old = self.instance(&old_name).expect("found above").member();
        let new = self.instance(&target).expect("found above").member();
        let others: Vec<Member> = self
            .instances
            .iter()
            .filter(|i| i.name() != old_name && i.name() != target && i.is_running())
            .map(LocalInstance::member)
            .collect();
        // New connections wait for the new primary rather than reach the one
        // being demoted.
        self.rw.set_backends(Vec::new());
        let outcome = orchestration::switchover(&old, &new, &others, SWITCHOVER_PATIENCE)
            .await
            .with_context(|| format!("switching over from {old_name} to {target}"))?;
        eprintln!(
            "db {}: switched over from {old_name} to {target} in {:?} (final LSN {})",
            self.spec.name, outcome.elapsed, outcome.final_lsn
        );
        self.primary = Some(target.clone());
        self.watch.reset();
        self.poll().await;
        Ok(target)
    }

    /// Stops every instance manager (postgres's fast shutdown), then unmounts
    /// and detaches the volumes.
    async fn stop_all(&mut self) {
        self.rw.set_backends(Vec::new());
        self.ro.set_backends(Vec::new());
        for instance in &self.instances {
            if let Some(child) = &instance.process {
                process::terminate(child);
            }
        }
        for instance in &mut self.instances {
            if let Some(mut child) = instance.process.take() {
                if process::wait_or_kill(&mut child).await.is_none() {
                    eprintln!(
                        "db {}: {} did not stop in time; killed it",
                        self.spec.name, instance.spec.name
                    );
                }
            }
            instance.report = None;
            for volume in [instance.volume.take(), instance.stale_volume.take()]
                .into_iter()
                .flatten()
            {
                if let Err(err) = storage::unmount_and_detach(
                    &self.attacher,
                    &self.db,
                    &instance.spec.name,
                    &volume,
                )
                .await
                {
                    eprintln!(
                        "db {}: detaching {}: {err:#}",
                        self.spec.name, instance.spec.volume
                    );
                }
            }
        }
    }

    /// `strata db rm`: everything stops, the volumes are deleted, the folder removed.
    async fn delete(&mut self) -> anyhow::Result<()> {
        self.message = Some("deleting".into());
        let _ = self.write_status();
        self.stop_all().await;
        for instance in &self.instances {
            storage::detach_recorded(&self.attacher, &self.db, &instance.spec.name).await?;
            storage::delete_volume(&self.cluster, &instance.spec.volume).await?;
        }
        std::fs::remove_dir_all(&self.db.0)
            .with_context(|| format!("removing {}", self.db.0.display()))
    }

    fn phase(&mut self) -> Phase {
        if self.db.deleting_path().exists() {
            return Phase::Deleting;
        }
        let primary_ready = self
            .primary_instance()
            .is_some_and(|p| p.ready_as(Role::Primary));
        let all_ready = self.instances.iter().all(|i| {
            if Some(i.name()) == self.primary.as_deref() {
                i.ready_as(Role::Primary)
            } else {
                i.ready_as(Role::Replica) && i.report.as_ref().is_some_and(|r| r.streaming)
            }
        });
        if primary_ready && all_ready {
            self.created = true;
        }
        match (self.created, primary_ready, all_ready) {
            (false, _, _)
                if self.failures >= FAILURES_BEFORE_FAILED
                    || self.creation_exits >= FAILED_STARTS_BEFORE_FAILED =>
            {
                Phase::Failed
            }
            (false, _, _) => Phase::Creating,
            (true, true, true) => Phase::Ready,
            (true, true, false) => Phase::Degraded,
            (true, false, _) => Phase::Unavailable,
        }
    }

    fn write_status(&mut self) -> anyhow::Result<()> {
        let phase = self.phase();
        let primary_lsn = self
            .primary_instance()
            .and_then(|p| p.report.as_ref())
            .and_then(|r| r.current_lsn);
        let instances = self
            .instances
            .iter()
            .map(|i| {
                let report = i.report.as_ref();
                let replayed = report.and_then(|r| r.replayed_lsn);
                InstanceStatus {
                    name: i.spec.name.clone(),
                    node: i.volume.as_ref().map_or(&i.spec.node, |v| &v.node).clone(),
                    role: report.map(|r| r.role),
                    ready: report.is_some_and(|r| r.ready),
                    streaming: report.is_some_and(|r| r.streaming),
                    timeline: report.and_then(|r| r.timeline),
                    lsn: report.and_then(|r| r.wal_position()).map(|l| l.to_string()),
                    lag_bytes: match (report.map(|r| r.role), primary_lsn, replayed) {
                        (Some(Role::Replica), Some(p), Some(r)) => Some(p.bytes_after(r)),
                        _ => None,
                    },
                    pid: i.process.as_ref().map(Child::id),
                    device: i.volume.as_ref().map(storage::device_name),
                    restarts: i.starts.saturating_sub(1),
                }
            })
            .collect();
        record::write_json(
            &self.db.status_path(),
            &DbStatus {
                phase,
                primary: self.primary.clone(),
                instances,
                message: self
                    .message
                    .clone()
                    .or_else(|| self.creation_error.clone().filter(|_| !self.created)),
                failovers: self.failovers,
                last_switchover: self.last_switchover.clone(),
                supervisor_pid: std::process::id(),
            },
        )
    }
}
