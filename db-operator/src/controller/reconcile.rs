//! One reconcile of a `PostgresCluster`: validate, create what is missing, watch the
//! primary, fail over, scale, and record what was seen in the status.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{finalizer, Event as FinalizerEvent};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::instances::InstanceTarget;
use super::resources::{
    self, instance_name, CLUSTER_LABEL, INSTANCE_LABEL, ROLE_LABEL, SPEC_HASH_ANNOTATION,
};
use super::{Context, Error, FIELD_MANAGER, FINALIZER};
use crate::crd::{
    ClusterPhase, Condition, InstanceRole, InstanceStatus, PostgresCluster, PostgresClusterStatus,
    PrimaryUpdateStrategy,
};
use crate::decisions::{
    caught_up, choose_promotion, choose_removals, instance_order, resolve_primary,
};
use crate::instance_api::{InstanceReport, PrimaryAddress, ReplicationSettings, Role};
use crate::validation::{parse_quantity, validate};

/// How often a healthy cluster is looked at: the failover delay is measured
/// between these looks, so it bounds how late a failover can start.
const POLL: Duration = Duration::from_secs(5);
/// How often while the primary does not answer.
const POLL_UNHEALTHY: Duration = Duration::from_secs(1);

pub async fn reconcile(pgc: Arc<PostgresCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = pgc
        .namespace()
        .ok_or_else(|| Error::NoNamespace(pgc.name_any()))?;
    let api: Api<PostgresCluster> = Api::namespaced(ctx.client.clone(), &ns);
    ctx.metrics.reconciles.inc();
    finalizer(&api, FINALIZER, pgc, |event| async {
        match event {
            FinalizerEvent::Apply(pgc) => apply(&pgc, &ctx).await,
            FinalizerEvent::Cleanup(pgc) => cleanup(&pgc, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

fn watch_key(pgc: &PostgresCluster) -> String {
    format!("{}/{}", pgc.namespace().unwrap_or_default(), pgc.name_any())
}

async fn publish(
    ctx: &Context,
    pgc: &PostgresCluster,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) -> Result<(), Error> {
    tracing::info!(cluster = pgc.name_any(), reason, note, "event");
    ctx.recorder
        .publish(
            &Event {
                type_,
                reason: reason.into(),
                note: Some(note),
                action: action.into(),
                secondary: None,
            },
            &pgc.object_ref(&()),
        )
        .await?;
    Ok(())
}

/// Sets a condition, keeping its transition time when its status did not change.
fn set_condition(
    status: &mut PostgresClusterStatus,
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
) {
    let value = if ok { "True" } else { "False" };
    let previous = status.conditions.iter().find(|c| c.type_ == type_);
    let last_transition_time = match previous {
        Some(c) if c.status == value => c.last_transition_time.clone(),
        _ => Some(now()),
    };
    status.conditions.retain(|c| c.type_ != type_);
    status.conditions.push(Condition {
        type_: type_.into(),
        status: value.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time,
    });
    status.conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
}

async fn patch_status(
    ctx: &Context,
    pgc: &PostgresCluster,
    status: &PostgresClusterStatus,
) -> Result<(), Error> {
    let api: Api<PostgresCluster> =
        Api::namespaced(ctx.client.clone(), &pgc.namespace().unwrap_or_default());
    let patch = Patch::Apply(json!({
        "apiVersion": "strata.io/v1alpha1",
        "kind": "PostgresCluster",
        "status": status,
    }));
    api.patch_status(
        &pgc.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &patch,
    )
    .await?;
    Ok(())
}

/// Server-side apply of an object the operator owns wholly.
async fn apply_owned<K>(api: &Api<K>, object: &K) -> Result<(), Error>
where
    K: Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(
        &object.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await?;
    Ok(())
}

/// Secrets are created once: a new password on every reconcile would lock clients out.
async fn ensure_secrets(ctx: &Context, pgc: &PostgresCluster, ns: &str) -> Result<(), Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    for secret in resources::secrets(pgc) {
        if api.get_opt(&secret.name_any()).await?.is_none() {
            api.create(&PostParams::default(), &secret).await?;
        }
    }
    Ok(())
}

/// What the cluster's Pods and PVCs are, and what their instance managers say.
struct Observed {
    pods: Vec<Pod>,
    /// Every instance that has a PVC or a Pod, in instance order.
    members: Vec<String>,
    /// Each instance's PVC and the bytes it requests (None: unreadable).
    pvcs: BTreeMap<String, Option<u64>>,
    reports: Vec<InstanceReport>,
}

impl Observed {
    fn pod(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.name_any() == name)
    }

    fn target(&self, name: &str) -> InstanceTarget {
        InstanceTarget {
            name: name.to_string(),
            pod_ip: self
                .pod(name)
                .and_then(|p| p.status.as_ref())
                .and_then(|s| s.pod_ip.clone()),
        }
    }

    fn report(&self, name: &str) -> Option<&InstanceReport> {
        self.reports.iter().find(|r| r.name == name)
    }

    fn is_ready_primary(&self, name: &str) -> bool {
        self.report(name)
            .is_some_and(|r| r.ready && r.role == Role::Primary)
    }
}

async fn observe(ctx: &Context, pgc: &PostgresCluster, ns: &str) -> Result<Observed, Error> {
    let selector = format!("{CLUSTER_LABEL}={}", pgc.name_any());
    let lp = ListParams::default().labels(&selector);
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), ns)
        .list(&lp)
        .await?
        .items;
    let pvcs: BTreeMap<String, Option<u64>> =
        Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), ns)
            .list(&lp)
            .await?
            .items
            .iter()
            .map(|pvc| (pvc.name_any(), requested_bytes(pvc)))
            .collect();
    let mut members: Vec<String> = pods
        .iter()
        .filter(|p| p.labels().contains_key(INSTANCE_LABEL))
        .map(|p| p.name_any())
        .chain(pvcs.keys().cloned())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    members.sort_by(|a, b| instance_order(a, b));
    let mut observed = Observed {
        pods,
        members,
        pvcs,
        reports: Vec::new(),
    };
    for pod in &observed.pods {
        let target = observed.target(&pod.name_any());
        match ctx.instances.status(&target).await {
            Ok(report) => observed.reports.push(report),
            Err(e) => tracing::debug!(instance = target.name, error = %e, "no status"),
        }
    }
    Ok(observed)
}

/// The storage a PVC asks for, in bytes.
fn requested_bytes(pvc: &PersistentVolumeClaim) -> Option<u64> {
    let requests = pvc.spec.as_ref()?.resources.as_ref()?.requests.as_ref()?;
    parse_quantity(&requests.get("storage")?.0).ok()
}

/// Grows every instance's PVC to `storage.size`; the CSI driver then grows the
/// Strata volume and the filesystem, and PostgreSQL sees the space without a
/// restart. A volume cannot shrink: a smaller size changes nothing and says so
/// in the `StorageSize` condition and a Warning Event.
async fn grow_volumes(
    ctx: &Context,
    pgc: &PostgresCluster,
    ns: &str,
    observed: &Observed,
    status: &mut PostgresClusterStatus,
) -> Result<(), Error> {
    let size = &pgc.spec.storage.size;
    let Ok(wanted) = parse_quantity(size) else {
        return Ok(()); // validate() refused it already
    };
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let mut larger = Vec::new();
    for (name, requested) in &observed.pvcs {
        match *requested {
            Some(bytes) if bytes < wanted => {
                let patch = json!({"spec": {"resources": {"requests": {"storage": size}}}});
                pvcs.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
                publish(
                    ctx,
                    pgc,
                    EventType::Normal,
                    "VolumeExpanding",
                    "Expanding",
                    format!("growing the volume of {name} to {size}"),
                )
                .await?;
            }
            Some(bytes) if bytes > wanted => larger.push(name.clone()),
            _ => {}
        }
    }
    if larger.is_empty() {
        set_condition(
            status,
            "StorageSize",
            true,
            "Applied",
            &format!("every volume asks for {size}"),
        );
    } else {
        let message = format!(
            "storage.size {size} is smaller than the volumes of {}; a volume cannot shrink, \
             so they keep their size",
            larger.join(", ")
        );
        if status
            .conditions
            .iter()
            .all(|c| c.type_ != "StorageSize" || c.message != message)
        {
            publish(
                ctx,
                pgc,
                EventType::Warning,
                "StorageShrinkRefused",
                "Expanding",
                message.clone(),
            )
            .await?;
        }
        set_condition(status, "StorageSize", false, "ShrinkRefused", &message);
    }
    Ok(())
}

async fn create_instance(
    ctx: &Context,
    pgc: &PostgresCluster,
    ns: &str,
    instance: &str,
    role: Role,
    peers: &[String],
    has_pvc: bool,
) -> Result<(), Error> {
    if !has_pvc {
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
        pvcs.create(&PostParams::default(), &resources::pvc(pgc, instance))
            .await?;
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    pods.create(
        &PostParams::default(),
        &resources::pod(pgc, instance, role, peers),
    )
    .await?;
    Ok(())
}

/// Deletes a Pod at once (no grace period): its postgres stops taking writes, and
/// the Strata volume's epoch fencing keeps a node that lost touch from writing.
async fn fence(
    ctx: &Context,
    pgc: &PostgresCluster,
    ns: &str,
    instance: &str,
    why: &str,
) -> Result<(), Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    match pods
        .delete(instance, &DeleteParams::default().grace_period(0))
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    ctx.metrics.fenced_instances.inc();
    publish(
        ctx,
        pgc,
        EventType::Warning,
        "Fenced",
        "Fencing",
        format!("deleted the Pod of {instance}: {why}"),
    )
    .await
}

async fn apply(pgc: &PostgresCluster, ctx: &Context) -> Result<Action, Error> {
    let name = pgc.name_any();
    let ns = pgc
        .namespace()
        .ok_or_else(|| Error::NoNamespace(name.clone()))?;
    let mut status = pgc.status.clone().unwrap_or_default();
    status.observed_generation = pgc.metadata.generation;

    if let Err(errors) = validate(&pgc.spec) {
        let message = errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        publish(
            ctx,
            pgc,
            EventType::Warning,
            "InvalidSpec",
            "Validating",
            message.clone(),
        )
        .await?;
        status.phase = Some(ClusterPhase::Invalid);
        set_condition(&mut status, "Valid", false, "InvalidSpec", &message);
        patch_status(ctx, pgc, &status).await?;
        return Ok(Action::await_change());
    }
    set_condition(
        &mut status,
        "Valid",
        true,
        "SpecAccepted",
        "the spec is valid",
    );

    ensure_secrets(ctx, pgc, &ns).await?;
    let observed = observe(ctx, pgc, &ns).await?;
    let desired = pgc.spec.instances as usize;
    grow_volumes(ctx, pgc, &ns, &observed, &mut status).await?;

    if observed.members.is_empty() {
        // A new cluster: the first instance runs initdb; every name it will have
        // is a peer from the start, so its slots keep WAL for the replicas to come.
        let peers: Vec<String> = (1..=pgc.spec.instances)
            .map(|i| instance_name(&name, i))
            .collect();
        let first = peers[0].clone();
        create_instance(ctx, pgc, &ns, &first, Role::Primary, &peers, false).await?;
        publish(
            ctx,
            pgc,
            EventType::Normal,
            "Bootstrapping",
            "Creating",
            format!("created {first}, the first instance (initdb)"),
        )
        .await?;
        apply_services_and_budgets(ctx, pgc, &ns, &first).await?;
        status.phase = Some(ClusterPhase::Initializing);
        status.current_primary = Some(first);
        status.current_primary_timestamp = Some(now());
        set_condition(&mut status, "Ready", false, "Bootstrapping", "initdb");
        patch_status(ctx, pgc, &status).await?;
        return Ok(Action::requeue(POLL_UNHEALTHY));
    }

    // More than one instance says it is primary: the recorded one keeps the role.
    let resolution = resolve_primary(&observed.reports, status.current_primary.as_deref());
    // Pods deleted during this reconcile: not to be labelled or configured below.
    let mut deleted: BTreeSet<String> = resolution.fence.iter().cloned().collect();
    for rogue in &resolution.fence {
        fence(
            ctx,
            pgc,
            &ns,
            rogue,
            "it claims to be primary while another instance is",
        )
        .await?;
    }
    // The recorded primary wins while it claims the role (resolve_primary sees to
    // that); when it does not, an instance that already is primary (a promotion
    // whose record was not written) is adopted rather than promoting another.
    let mut primary = resolution.primary.or(status.current_primary.clone());
    let mut requeue = POLL;

    if let Some(current) = primary.clone() {
        let healthy = observed.is_ready_primary(&current);
        let due = ctx
            .watches
            .lock()
            .expect("watches lock")
            .entry(watch_key(pgc))
            .or_default()
            .observe(
                healthy,
                Instant::now(),
                Duration::from_secs(pgc.spec.failover_delay_seconds.into()),
            );
        if !healthy {
            requeue = POLL_UNHEALTHY;
        }
        // A primary that was never ready (initdb, or a restart of the only
        // instance) is waited for, not failed over.
        let starting = matches!(
            status.phase,
            None | Some(ClusterPhase::Initializing) | Some(ClusterPhase::Invalid)
        );
        if due && !starting {
            match fail_over(ctx, pgc, &ns, &observed, &current, &mut status).await? {
                Failover::Promoted(promoted) => {
                    deleted.insert(current.clone());
                    primary = Some(promoted);
                }
                Failover::Restarted => {
                    deleted.insert(current.clone());
                }
                Failover::Blocked => {}
            }
        }
    }

    let Some(mut primary) = primary else {
        status.phase = Some(ClusterPhase::Initializing);
        set_condition(
            &mut status,
            "Ready",
            false,
            "NoPrimary",
            "no instance is primary",
        );
        patch_status(ctx, pgc, &status).await?;
        return Ok(Action::requeue(POLL_UNHEALTHY));
    };
    let mut observed = observed;
    if let Some(target) = pgc.annotations().get(SWITCHOVER_ANNOTATION).cloned() {
        if let Some(promoted) =
            switch_over(ctx, pgc, &observed, &primary, &target, &mut status).await?
        {
            primary = promoted;
            observed = observe(ctx, pgc, &ns).await?;
        }
    }
    apply_services_and_budgets(ctx, pgc, &ns, &primary).await?;

    // Scale down: the least advanced replicas go, never the primary.
    let mut keep = observed.members.clone();
    if keep.len() > desired {
        let removals = choose_removals(
            &observed.members,
            &observed.reports,
            Some(&primary),
            keep.len() - desired,
        );
        for instance in &removals {
            remove_instance(ctx, &ns, instance).await?;
            deleted.insert(instance.clone());
            publish(
                ctx,
                pgc,
                EventType::Normal,
                "ScaledDown",
                "Scaling",
                format!("removed {instance}, the least advanced replica"),
            )
            .await?;
        }
        keep.retain(|m| !removals.contains(m));
    }

    // Scale up once the primary can be cloned.
    let primary_ready = observed.is_ready_primary(&primary);
    let mut additions = Vec::new();
    if keep.len() < desired && primary_ready {
        let mut next = keep
            .iter()
            .filter_map(|m| m.rsplit('-').next()?.parse::<u32>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        while keep.len() + additions.len() < desired {
            additions.push(instance_name(&name, next));
            next += 1;
        }
    }
    let mut peers: Vec<String> = keep.iter().chain(additions.iter()).cloned().collect();
    peers.sort_by(|a, b| instance_order(a, b));
    for instance in &additions {
        create_instance(ctx, pgc, &ns, instance, Role::Replica, &peers, false).await?;
        publish(
            ctx,
            pgc,
            EventType::Normal,
            "ScaledUp",
            "Scaling",
            format!("created {instance}, a replica of {primary}"),
        )
        .await?;
    }

    // Instances whose Pod is gone (fenced, evicted) come back in the role the
    // record gives them: a former primary returns as a replica and is rewound.
    let mut recreated = false;
    for instance in &keep {
        if observed.pod(instance).is_none() {
            recreated = true;
            let role = if *instance == primary {
                Role::Primary
            } else {
                Role::Replica
            };
            let has_pvc = observed.pvcs.contains_key(instance);
            create_instance(ctx, pgc, &ns, instance, role, &peers, has_pvc).await?;
            publish(
                ctx,
                pgc,
                EventType::Normal,
                "InstanceRecreated",
                "Creating",
                format!("recreated the Pod of {instance} as a {role:?}"),
            )
            .await?;
        }
    }

    label_roles(ctx, &ns, &observed, &deleted, &primary).await?;
    update_replication(ctx, pgc, &observed, &deleted, &peers).await;

    // A rolling update only in a calm cluster: nothing added, removed, fenced or
    // recreated in this round, and every instance ready.
    let calm = primary_ready
        && deleted.is_empty()
        && additions.is_empty()
        && !recreated
        && keep
            .iter()
            .all(|m| observed.report(m).is_some_and(|r| r.ready));
    if calm {
        if let Some(promoted) =
            roll_out(ctx, pgc, &ns, &observed, &keep, &primary, &mut status).await?
        {
            primary = promoted;
            apply_services_and_budgets(ctx, pgc, &ns, &primary).await?;
            observed = observe(ctx, pgc, &ns).await?;
            label_roles(ctx, &ns, &observed, &deleted, &primary).await?;
            requeue = POLL_UNHEALTHY;
        }
    }

    status.current_primary = Some(primary.clone());
    status.instances = peers
        .iter()
        .map(|m| instance_status(m, observed.report(m), observed.report(&primary)))
        .collect();
    status.ready_instances = status.instances.iter().filter(|i| i.ready).count() as u32;
    let all_ready = status.ready_instances as usize == desired && peers.len() == desired;
    let (phase, ready_reason, message) = if !primary_ready {
        let phase = match status.phase {
            None | Some(ClusterPhase::Initializing) | Some(ClusterPhase::Invalid) => {
                ClusterPhase::Initializing
            }
            _ => ClusterPhase::FailingOver,
        };
        (phase, "PrimaryNotReady", format!("{primary} is not ready"))
    } else if all_ready {
        (
            ClusterPhase::Healthy,
            "AllInstancesReady",
            format!("{desired} instances ready, {primary} is primary"),
        )
    } else {
        (
            ClusterPhase::Scaling,
            "InstancesNotReady",
            format!("{} of {desired} instances ready", status.ready_instances),
        )
    };
    status.phase = Some(phase);
    set_condition(
        &mut status,
        "Ready",
        all_ready && primary_ready,
        ready_reason,
        &message,
    );
    patch_status(ctx, pgc, &status).await?;
    Ok(Action::requeue(requeue))
}

/// Asks for a planned switchover to the named instance; removed once handled.
pub const SWITCHOVER_ANNOTATION: &str = "strata.io/switchover-to";
/// How long the new primary may take to receive the old one's last WAL.
const SWITCHOVER_PATIENCE: Duration = Duration::from_secs(60);

async fn clear_switchover_request(ctx: &Context, pgc: &PostgresCluster) -> Result<(), Error> {
    let api: Api<PostgresCluster> =
        Api::namespaced(ctx.client.clone(), &pgc.namespace().unwrap_or_default());
    let patch = json!({"metadata": {"annotations": {SWITCHOVER_ANNOTATION: null}}});
    api.patch(
        &pgc.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

/// Planned switchover: demote the primary cleanly, wait until `target` has all of
/// its WAL, promote `target`. Loses no committed transaction. Answers the new
/// primary, or `None` when the request was refused or rolled back.
async fn switch_over(
    ctx: &Context,
    pgc: &PostgresCluster,
    observed: &Observed,
    primary: &str,
    target: &str,
    status: &mut PostgresClusterStatus,
) -> Result<Option<String>, Error> {
    let outcome = switch_over_unrequested(ctx, pgc, observed, primary, target, status).await;
    // The request is handled (done, refused or rolled back) unless the API failed.
    if outcome.is_ok() {
        clear_switchover_request(ctx, pgc).await?;
    }
    outcome
}

/// The switchover itself, for a request or for a rolling update of the primary.
async fn switch_over_unrequested(
    ctx: &Context,
    pgc: &PostgresCluster,
    observed: &Observed,
    primary: &str,
    target: &str,
    status: &mut PostgresClusterStatus,
) -> Result<Option<String>, Error> {
    if target == primary {
        return Ok(None);
    }
    let target_ready = observed
        .report(target)
        .is_some_and(|r| r.ready && r.role == Role::Replica && r.streaming);
    if !target_ready || !observed.is_ready_primary(primary) {
        publish(
            ctx,
            pgc,
            EventType::Warning,
            "SwitchoverRefused",
            "SwitchingOver",
            format!("{target} is not a streaming replica of a ready primary {primary}"),
        )
        .await?;
        return Ok(None);
    }
    publish(
        ctx,
        pgc,
        EventType::Normal,
        "SwitchoverStarted",
        "SwitchingOver",
        format!("demoting {primary} to hand over to {target}"),
    )
    .await?;
    let rw = PrimaryAddress {
        host: resources::rw_service_name(&pgc.name_any()),
        port: resources::POSTGRES_PORT,
    };
    let demoted = ctx.instances.demote(&observed.target(primary), &rw).await?;
    let deadline = Instant::now() + SWITCHOVER_PATIENCE;
    loop {
        if let Ok(report) = ctx.instances.status(&observed.target(target)).await {
            if caught_up(&report, demoted.final_lsn) {
                break;
            }
        }
        if Instant::now() > deadline {
            // The old primary has every commit: it takes the role back.
            ctx.instances.promote(&observed.target(primary)).await?;
            publish(
                ctx,
                pgc,
                EventType::Warning,
                "SwitchoverFailed",
                "SwitchingOver",
                format!(
                    "{target} did not receive WAL up to {} in {SWITCHOVER_PATIENCE:?}; \
                     {primary} is primary again",
                    demoted.final_lsn
                ),
            )
            .await?;
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ctx.instances.promote(&observed.target(target)).await?;
    ctx.metrics.switchovers.inc();
    status.current_primary = Some(target.to_string());
    status.current_primary_timestamp = Some(now());
    publish(
        ctx,
        pgc,
        EventType::Normal,
        "SwitchedOver",
        "SwitchingOver",
        format!(
            "{target} is primary with all WAL up to {}; {primary} is its replica",
            demoted.final_lsn
        ),
    )
    .await?;
    for report in &observed.reports {
        if report.name != target && report.name != primary && report.role == Role::Replica {
            if let Err(e) = ctx
                .instances
                .follow(&observed.target(&report.name), &rw)
                .await
            {
                tracing::warn!(instance = report.name, error = %e, "could not repoint");
            }
        }
    }
    Ok(Some(target.to_string()))
}

/// Rolling update to the current spec, one instance per reconcile: replicas first,
/// each restarted once the previous one is ready again; then the primary, after a
/// switchover to the most advanced replica (`unsupervised`), or when a person asks
/// for the switchover (`supervised`). Answers the new primary after a switchover.
async fn roll_out(
    ctx: &Context,
    pgc: &PostgresCluster,
    ns: &str,
    observed: &Observed,
    keep: &[String],
    primary: &str,
    status: &mut PostgresClusterStatus,
) -> Result<Option<String>, Error> {
    let want = resources::pod_spec_hash(pgc);
    let outdated = |name: &str| {
        observed
            .pod(name)
            .is_some_and(|p| p.annotations().get(SPEC_HASH_ANNOTATION) != Some(&want))
    };
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    if let Some(replica) = keep.iter().find(|m| m.as_str() != primary && outdated(m)) {
        // A graceful delete: SIGTERM, a fast shutdown; the Pod comes back with
        // the new spec once it is gone.
        pods.delete(replica, &DeleteParams::default()).await?;
        publish(
            ctx,
            pgc,
            EventType::Normal,
            "RollingUpdate",
            "Updating",
            format!("restarting replica {replica} with the new spec"),
        )
        .await?;
        return Ok(None);
    }
    status
        .conditions
        .retain(|c| c.type_ != "PrimaryUpdatePending");
    if !outdated(primary) {
        return Ok(None);
    }
    if pgc.spec.primary_update_strategy == PrimaryUpdateStrategy::Supervised {
        let message = format!(
            "{primary} runs an older spec: annotate {SWITCHOVER_ANNOTATION}=<replica> \
             to switch over, and it restarts as a replica"
        );
        set_condition(status, "PrimaryUpdatePending", true, "Supervised", &message);
        publish(
            ctx,
            pgc,
            EventType::Normal,
            "PrimaryUpdatePending",
            "Updating",
            message,
        )
        .await?;
        return Ok(None);
    }
    let successor = choose_promotion(&observed.reports, primary)
        .filter(|r| r.streaming)
        .map(|r| r.name.clone());
    match successor {
        Some(target) => switch_over_unrequested(ctx, pgc, observed, primary, &target, status).await,
        None => {
            // No replica to hand over to: the only instance restarts in place.
            pods.delete(primary, &DeleteParams::default()).await?;
            publish(
                ctx,
                pgc,
                EventType::Normal,
                "RollingUpdate",
                "Updating",
                format!("restarting {primary}, the only instance, with the new spec"),
            )
            .await?;
            Ok(None)
        }
    }
}

/// What a failover did.
enum Failover {
    /// The replica with the most WAL is primary now.
    Promoted(String),
    /// A single-instance cluster's Pod was deleted to be recreated.
    Restarted,
    /// No replica could take over; nothing was changed.
    Blocked,
}

/// Promotes the most advanced ready replica after fencing the lost primary.
async fn fail_over(
    ctx: &Context,
    pgc: &PostgresCluster,
    ns: &str,
    observed: &Observed,
    failed: &str,
    status: &mut PostgresClusterStatus,
) -> Result<Failover, Error> {
    publish(
        ctx,
        pgc,
        EventType::Warning,
        "PrimaryUnreachable",
        "FailingOver",
        format!(
            "{failed} has not answered as a ready primary for {} s",
            pgc.spec.failover_delay_seconds
        ),
    )
    .await?;
    status.phase = Some(ClusterPhase::FailingOver);
    let Some(chosen) = choose_promotion(&observed.reports, failed) else {
        if observed.members.len() > 1 {
            // Fencing without a successor would only add an outage to an outage.
            publish(
                ctx,
                pgc,
                EventType::Warning,
                "FailoverBlocked",
                "FailingOver",
                format!("no ready replica to promote; {failed} is left as it is"),
            )
            .await?;
            return Ok(Failover::Blocked);
        }
        // The only instance: its Pod is recreated, possibly on another node, where
        // its replicated volume is attached again (epoch fencing keeps the old node
        // out). Until it is ready the cluster counts as starting, not failing over.
        fence(
            ctx,
            pgc,
            ns,
            failed,
            "the only instance is lost; it is recreated",
        )
        .await?;
        status.phase = Some(ClusterPhase::Initializing);
        reset_watch(ctx, pgc);
        return Ok(Failover::Restarted);
    };
    // Fence first: a primary that is only cut off must not keep accepting writes
    // that the new primary will never see.
    fence(ctx, pgc, ns, failed, "the primary is lost").await?;
    let chosen_name = chosen.name.clone();
    let position = chosen
        .wal_position()
        .map(|l| l.to_string())
        .unwrap_or_default();
    ctx.instances
        .promote(&observed.target(&chosen_name))
        .await?;
    ctx.metrics.failovers.inc();
    publish(
        ctx,
        pgc,
        EventType::Normal,
        "Promoted",
        "FailingOver",
        format!("promoted {chosen_name} (WAL at {position}) after {failed} was lost"),
    )
    .await?;
    status.current_primary = Some(chosen_name.clone());
    status.current_primary_timestamp = Some(now());
    reset_watch(ctx, pgc);
    // The replicas stream from the -rw Service, which moves next; asking them to
    // follow it again makes them reconnect now instead of at their next retry.
    let rw = PrimaryAddress {
        host: resources::rw_service_name(&pgc.name_any()),
        port: resources::POSTGRES_PORT,
    };
    for report in &observed.reports {
        if report.name != chosen_name && report.name != failed && report.role == Role::Replica {
            if let Err(e) = ctx
                .instances
                .follow(&observed.target(&report.name), &rw)
                .await
            {
                tracing::warn!(instance = report.name, error = %e, "could not repoint");
            }
        }
    }
    Ok(Failover::Promoted(chosen_name))
}

fn reset_watch(ctx: &Context, pgc: &PostgresCluster) {
    if let Some(watch) = ctx
        .watches
        .lock()
        .expect("watches lock")
        .get_mut(&watch_key(pgc))
    {
        watch.reset();
    }
}

async fn remove_instance(ctx: &Context, ns: &str, instance: &str) -> Result<(), Error> {
    let dp = DeleteParams::default();
    for result in [
        Api::<Pod>::namespaced(ctx.client.clone(), ns)
            .delete(instance, &dp)
            .await
            .map(|_| ()),
        Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), ns)
            .delete(instance, &dp)
            .await
            .map(|_| ()),
    ] {
        match result {
            Ok(()) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

async fn apply_services_and_budgets(
    ctx: &Context,
    pgc: &PostgresCluster,
    ns: &str,
    primary: &str,
) -> Result<(), Error> {
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
    for service in resources::services(pgc, primary) {
        apply_owned(&services, &service).await?;
    }
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), ns);
    for budget in resources::disruption_budgets(pgc) {
        apply_owned(&budgets, &budget).await?;
    }
    Ok(())
}

/// The role label the `-ro` Service and the budgets select on follows the record.
async fn label_roles(
    ctx: &Context,
    ns: &str,
    observed: &Observed,
    deleted: &BTreeSet<String>,
    primary: &str,
) -> Result<(), Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    for pod in &observed.pods {
        let instance = pod.name_any();
        if deleted.contains(&instance) {
            continue;
        }
        let role = if instance == primary {
            Role::Primary
        } else {
            Role::Replica
        };
        let wanted = resources::role_label(role);
        if pod.labels().get(ROLE_LABEL).map(String::as_str) != Some(wanted) {
            let patch = json!({"metadata": {"labels": {ROLE_LABEL: wanted}}});
            pods.patch(&instance, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
        }
    }
    Ok(())
}

/// Tells every ready instance the membership and synchronous count it should use.
async fn update_replication(
    ctx: &Context,
    pgc: &PostgresCluster,
    observed: &Observed,
    deleted: &BTreeSet<String>,
    peers: &[String],
) {
    let settings = ReplicationSettings {
        peers: peers.to_vec(),
        sync_replicas: resources::sync_replicas(pgc),
    };
    for report in &observed.reports {
        if report.ready
            && !deleted.contains(&report.name)
            && peers.contains(&report.name)
            && report.replication.as_ref() != Some(&settings)
        {
            if let Err(e) = ctx
                .instances
                .set_replication(&observed.target(&report.name), &settings)
                .await
            {
                tracing::warn!(instance = report.name, error = %e, "replication settings");
            }
        }
    }
}

fn instance_status(
    name: &str,
    report: Option<&InstanceReport>,
    primary: Option<&InstanceReport>,
) -> InstanceStatus {
    let Some(report) = report else {
        return InstanceStatus {
            name: name.into(),
            role: InstanceRole::Unknown,
            ready: false,
            timeline: None,
            lsn: None,
            lag_bytes: None,
        };
    };
    let primary_lsn = primary.and_then(|p| p.current_lsn);
    let (role, lsn, lag) = match report.role {
        Role::Primary => (InstanceRole::Primary, report.current_lsn, None),
        Role::Replica => (
            InstanceRole::Replica,
            report.replayed_lsn,
            match (primary_lsn, report.replayed_lsn) {
                (Some(p), Some(r)) => Some(p.bytes_after(r)),
                _ => None,
            },
        ),
    };
    InstanceStatus {
        name: name.into(),
        role,
        ready: report.ready,
        timeline: report.timeline,
        lsn: lsn.map(|l| l.to_string()),
        lag_bytes: lag,
    }
}

/// Deletion: the replicas stop first and the primary last, so no replica is ever
/// asked to follow a primary that is already gone. The garbage collector removes
/// the rest through the owner references.
async fn cleanup(pgc: &PostgresCluster, ctx: &Context) -> Result<Action, Error> {
    let ns = pgc
        .namespace()
        .ok_or_else(|| Error::NoNamespace(pgc.name_any()))?;
    publish(
        ctx,
        pgc,
        EventType::Normal,
        "Deleting",
        "Deleting",
        format!("stopping the instances of {}", pgc.name_any()),
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let selector = format!("{CLUSTER_LABEL}={}", pgc.name_any());
    let mut list = pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .items;
    let primary = pgc.status.as_ref().and_then(|s| s.current_primary.clone());
    list.sort_by_key(|p| Some(p.name_any()) == primary);
    for pod in list {
        match pods.delete(&pod.name_any(), &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    ctx.watches
        .lock()
        .expect("watches lock")
        .remove(&watch_key(pgc));
    Ok(Action::await_change())
}

// Against a mocked API server (fixtures.rs) and fake instance managers.
#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use k8s_openapi::api::core::v1::{Pod, PodStatus};
    use serde_json::{json, Value};

    use super::reconcile;
    use crate::controller::fixtures::{test_context, ApiServerVerifier, FakeInstances, Recorded};
    use crate::controller::resources::{self, INSTANCE_LABEL};
    use crate::controller::FINALIZER;
    use crate::crd::{Condition, PostgresCluster, PostgresClusterSpec, PostgresClusterStatus};
    use crate::instance_api::{InstanceReport, ReplicationSettings, Role};

    fn cluster(instances: u32) -> PostgresCluster {
        let spec: PostgresClusterSpec = serde_json::from_value(json!({
            "instances": instances,
            "storage": {"size": "1Gi", "replicas": 3},
            "minSyncReplicas": 1,
            "maxSyncReplicas": 1,
            "failoverDelaySeconds": 1,
        }))
        .unwrap();
        let mut pgc = PostgresCluster::new("db", spec);
        pgc.metadata.namespace = Some("ns".into());
        pgc.metadata.uid = Some("cluster-uid".into());
        pgc.metadata.generation = Some(1);
        pgc.metadata.finalizers = Some(vec![FINALIZER.into()]);
        pgc
    }

    fn with_primary(mut pgc: PostgresCluster, primary: &str) -> PostgresCluster {
        pgc.status = Some(PostgresClusterStatus {
            current_primary: Some(primary.into()),
            phase: Some(crate::crd::ClusterPhase::Healthy),
            ..Default::default()
        });
        pgc
    }

    fn names(n: u32) -> Vec<String> {
        (1..=n).map(|i| format!("db-{i}")).collect()
    }

    fn report(name: &str, role: Role, timeline: u32, lsn: &str) -> InstanceReport {
        let lsn = Some(lsn.parse().unwrap());
        InstanceReport {
            name: name.into(),
            role,
            ready: true,
            timeline: Some(timeline),
            current_lsn: if role == Role::Primary { lsn } else { None },
            received_lsn: if role == Role::Replica { lsn } else { None },
            replayed_lsn: if role == Role::Replica { lsn } else { None },
            replay_lag_bytes: Some(0),
            streaming: role == Role::Replica,
            following: None,
            postmaster_pid: Some(100),
            standbys: Vec::new(),
            replication: None,
        }
    }

    /// A PVC and a running Pod for `name`, as an earlier reconcile made them.
    fn seed_instance(api: &ApiServerVerifier, pgc: &PostgresCluster, name: &str, role: Role) {
        api.seed("persistentvolumeclaims", &resources::pvc(pgc, name));
        let mut pod: Pod = resources::pod(pgc, name, role, &names(pgc.spec.instances));
        pod.status = Some(PodStatus {
            pod_ip: Some(format!("10.0.0.{}", name.trim_start_matches("db-"))),
            ..Default::default()
        });
        api.seed("pods", &pod);
    }

    /// The cluster as the API server now has it (the next reconcile sees this).
    fn stored(api: &ApiServerVerifier) -> PostgresCluster {
        serde_json::from_value(api.get("postgresclusters", "ns", "db").unwrap()).unwrap()
    }

    fn args_of(pod: &Value) -> String {
        pod["spec"]["containers"][0]["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn s(list: &[&str]) -> Vec<String> {
        list.iter().map(|x| x.to_string()).collect()
    }

    fn all_replication(fake: &FakeInstances, reports: Vec<InstanceReport>, peers: u32) {
        for mut r in reports {
            r.replication = Some(ReplicationSettings {
                peers: names(peers),
                sync_replicas: 1,
            });
            fake.set(r);
        }
    }

    #[tokio::test]
    async fn a_new_cluster_first_gets_the_finalizer() {
        let (ctx, api, _) = test_context();
        let mut pgc = cluster(3);
        pgc.metadata.finalizers = None;
        api.seed("postgresclusters", &pgc);
        reconcile(Arc::new(pgc), ctx).await.expect("reconcile");
        let requests = api.take_requests();
        assert_eq!(
            ApiServerVerifier::mutations(&requests),
            s(&["PATCH postgresclusters/db"])
        );
        assert_eq!(
            api.get("postgresclusters", "ns", "db").unwrap()["metadata"]["finalizers"],
            json!([FINALIZER])
        );
    }

    #[tokio::test]
    async fn a_new_cluster_gets_secrets_its_first_instance_services_budgets_and_status() {
        let (ctx, api, _) = test_context();
        let pgc = cluster(3);
        api.seed("postgresclusters", &pgc);
        reconcile(Arc::new(pgc), ctx.clone())
            .await
            .expect("reconcile");
        let requests = api.take_requests();
        assert_eq!(
            ApiServerVerifier::mutations(&requests),
            s(&[
                "POST secrets",
                "POST secrets",
                "POST secrets",
                "POST persistentvolumeclaims",
                "POST pods",
                "PATCH services/db-rw",
                "PATCH services/db-ro",
                "PATCH services/db-r",
                "PATCH poddisruptionbudgets/db-primary",
                "PATCH poddisruptionbudgets/db-replicas",
                "PATCH postgresclusters/db/status",
            ])
        );
        // Objects are applied server-side, by one field manager.
        let apply = requests
            .iter()
            .find(|r| r.target == "services/db-rw")
            .unwrap();
        assert_eq!(apply.content_type, "application/apply-patch+yaml");
        assert!(
            apply.query.contains("fieldManager=strata-operator"),
            "{}",
            apply.query
        );
        assert_eq!(
            ApiServerVerifier::event_reasons(&requests),
            s(&["Bootstrapping"])
        );

        let pod = api.get("pods", "ns", "db-1").expect("the first Pod");
        let args = args_of(&pod);
        assert!(
            !args.contains("--primary"),
            "the first instance runs initdb: {args}"
        );
        assert!(args.contains("--peers db-1,db-2,db-3"), "{args}");
        assert_eq!(pod["metadata"]["ownerReferences"][0]["uid"], "cluster-uid");
        assert_eq!(pod["metadata"]["ownerReferences"][0]["controller"], true);
        let pvc = api.get("persistentvolumeclaims", "ns", "db-1").unwrap();
        assert_eq!(pvc["spec"]["resources"]["requests"]["storage"], "1Gi");
        let rw = api.get("services", "ns", "db-rw").unwrap();
        assert_eq!(rw["spec"]["selector"][INSTANCE_LABEL], "db-1");
        assert_eq!(
            api.names("secrets"),
            s(&["db-app", "db-replication", "db-superuser"])
        );
        let status = stored(&api).status.unwrap();
        assert_eq!(status.current_primary.as_deref(), Some("db-1"));
        assert_eq!(status.phase, Some(crate::crd::ClusterPhase::Initializing));
        assert_eq!(status.observed_generation, Some(1));

        // Again, with db-1 still starting: nothing new, secrets are not regenerated.
        reconcile(Arc::new(stored(&api)), ctx)
            .await
            .expect("reconcile");
        let requests = api.take_requests();
        let mutations = ApiServerVerifier::mutations(&requests);
        assert!(
            !mutations.iter().any(|m| m.starts_with("POST")),
            "{mutations:?}"
        );
    }

    #[tokio::test]
    async fn scale_up_adds_replicas_once_the_primary_is_ready() {
        let (ctx, api, fake) = test_context();
        let pgc = with_primary(cluster(3), "db-1");
        api.seed("postgresclusters", &pgc);
        seed_instance(&api, &pgc, "db-1", Role::Primary);

        // Not before the primary can be cloned.
        reconcile(Arc::new(pgc.clone()), ctx.clone()).await.unwrap();
        let mutations = ApiServerVerifier::mutations(&api.take_requests());
        assert!(
            !mutations.contains(&"POST pods".to_string()),
            "{mutations:?}"
        );

        fake.set(report("db-1", Role::Primary, 1, "0/5000000"));
        reconcile(Arc::new(stored(&api)), ctx).await.unwrap();
        let requests = api.take_requests();
        let posts: Vec<String> = ApiServerVerifier::mutations(&requests)
            .into_iter()
            .filter(|m| m.starts_with("POST"))
            .collect();
        assert_eq!(
            posts,
            s(&[
                "POST persistentvolumeclaims",
                "POST pods",
                "POST persistentvolumeclaims",
                "POST pods",
            ])
        );
        assert_eq!(
            ApiServerVerifier::event_reasons(&requests),
            s(&["ScaledUp", "ScaledUp"])
        );
        for name in ["db-2", "db-3"] {
            let args = args_of(&api.get("pods", "ns", name).expect("replica Pod"));
            assert!(args.contains("--primary db-rw:5432"), "{name}: {args}");
        }
        assert_eq!(
            fake.take_calls(),
            s(&["replication db-1 db-1,db-2,db-3 sync=1"])
        );
        let status = stored(&api).status.unwrap();
        assert_eq!(status.phase, Some(crate::crd::ClusterPhase::Scaling));
        assert_eq!(status.ready_instances, 1);
        assert_eq!(status.instances.len(), 3);
    }

    #[tokio::test]
    async fn scale_down_removes_the_least_advanced_replica_and_never_the_primary() {
        let (ctx, api, fake) = test_context();
        let mut pgc = with_primary(cluster(3), "db-1");
        for (name, role) in [
            ("db-1", Role::Primary),
            ("db-2", Role::Replica),
            ("db-3", Role::Replica),
        ] {
            seed_instance(&api, &pgc, name, role);
        }
        fake.set(report("db-1", Role::Primary, 1, "0/9000000"));
        fake.set(report("db-2", Role::Replica, 1, "0/3000000"));
        fake.set(report("db-3", Role::Replica, 1, "0/8000000"));
        pgc.spec.instances = 2;
        api.seed("postgresclusters", &pgc);
        reconcile(Arc::new(pgc), ctx).await.unwrap();
        let requests = api.take_requests();
        let deletes: Vec<String> = ApiServerVerifier::mutations(&requests)
            .into_iter()
            .filter(|m| m.starts_with("DELETE"))
            .collect();
        assert_eq!(
            deletes,
            s(&["DELETE pods/db-2", "DELETE persistentvolumeclaims/db-2"])
        );
        assert_eq!(
            ApiServerVerifier::event_reasons(&requests),
            s(&["ScaledDown"])
        );
        let mut calls = fake.take_calls();
        calls.sort();
        assert_eq!(
            calls,
            s(&[
                "replication db-1 db-1,db-3 sync=1",
                "replication db-3 db-1,db-3 sync=1"
            ])
        );
        let status = stored(&api).status.unwrap();
        assert_eq!(status.current_primary.as_deref(), Some("db-1"));
        let listed: Vec<String> = status.instances.iter().map(|i| i.name.clone()).collect();
        assert_eq!(listed, s(&["db-1", "db-3"]));
    }

    #[tokio::test]
    async fn a_lost_primary_is_fenced_after_the_delay_and_the_most_advanced_replica_promoted() {
        let (ctx, api, fake) = test_context();
        let pgc = with_primary(cluster(3), "db-1");
        api.seed("postgresclusters", &pgc);
        for (name, role) in [
            ("db-1", Role::Primary),
            ("db-2", Role::Replica),
            ("db-3", Role::Replica),
        ] {
            seed_instance(&api, &pgc, name, role);
        }
        // db-1 does not answer; db-3 has more WAL than db-2.
        fake.set(report("db-2", Role::Replica, 1, "0/3000000"));
        fake.set(report("db-3", Role::Replica, 1, "0/5000000"));

        reconcile(Arc::new(pgc), ctx.clone()).await.unwrap();
        let requests = api.take_requests();
        assert!(
            !ApiServerVerifier::mutations(&requests)
                .iter()
                .any(|m| m.starts_with("DELETE")),
            "no failover before the delay"
        );
        assert!(!fake.take_calls().iter().any(|c| c.starts_with("promote")));

        // failoverDelaySeconds is 1.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        reconcile(Arc::new(stored(&api)), ctx.clone())
            .await
            .unwrap();
        let requests = api.take_requests();
        assert_eq!(
            ApiServerVerifier::event_reasons(&requests),
            s(&["PrimaryUnreachable", "Fenced", "Promoted"])
        );
        let fence = requests
            .iter()
            .find(|r| r.summary() == "DELETE pods/db-1")
            .expect("the old primary's Pod is deleted");
        assert_eq!(fence.body["gracePeriodSeconds"], 0, "fenced at once");
        assert!(api.get("pods", "ns", "db-1").is_none());
        assert!(
            api.get("persistentvolumeclaims", "ns", "db-1").is_some(),
            "its volume stays, to rejoin as a replica"
        );
        let calls = fake.take_calls();
        assert_eq!(calls[0], "promote db-3");
        assert_eq!(calls[1], "follow db-2 db-rw:5432");
        let rw = api.get("services", "ns", "db-rw").unwrap();
        assert_eq!(rw["spec"]["selector"][INSTANCE_LABEL], "db-3", "-rw moved");
        let db3 = api.get("pods", "ns", "db-3").unwrap();
        assert_eq!(db3["metadata"]["labels"][resources::ROLE_LABEL], "primary");
        let status = stored(&api).status.unwrap();
        assert_eq!(status.current_primary.as_deref(), Some("db-3"));
        assert!(status.current_primary_timestamp.is_some());
        let metrics = ctx.metrics.render();
        assert!(
            metrics.contains("strata_operator_failovers_total 1"),
            "{metrics}"
        );
        assert!(metrics.contains("strata_operator_fenced_instances_total 1"));

        // Next round: the old primary's Pod comes back as a replica (pg_rewind).
        reconcile(Arc::new(stored(&api)), ctx).await.unwrap();
        let requests = api.take_requests();
        assert_eq!(
            ApiServerVerifier::event_reasons(&requests),
            s(&["InstanceRecreated"])
        );
        let posts: Vec<String> = ApiServerVerifier::mutations(&requests)
            .into_iter()
            .filter(|m| m.starts_with("POST"))
            .collect();
        assert_eq!(posts, s(&["POST pods"]), "the PVC is reused");
        let args = args_of(&api.get("pods", "ns", "db-1").unwrap());
        assert!(args.contains("--primary db-rw:5432"), "{args}");
    }

    #[tokio::test]
    async fn failover_is_blocked_without_a_ready_replica_and_a_starting_primary_is_waited_for() {
        // Three instances, no replica ready: nothing is fenced.
        let (ctx, api, fake) = test_context();
        let pgc = with_primary(cluster(3), "db-1");
        api.seed("postgresclusters", &pgc);
        for (name, role) in [
            ("db-1", Role::Primary),
            ("db-2", Role::Replica),
            ("db-3", Role::Replica),
        ] {
            seed_instance(&api, &pgc, name, role);
        }
        let mut not_ready = report("db-2", Role::Replica, 1, "0/3000000");
        not_ready.ready = false;
        fake.set(not_ready);
        reconcile(Arc::new(pgc), ctx.clone()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        api.take_requests();
        reconcile(Arc::new(stored(&api)), ctx).await.unwrap();
        let requests = api.take_requests();
        assert_eq!(
            ApiServerVerifier::event_reasons(&requests),
            s(&["PrimaryUnreachable", "FailoverBlocked"])
        );
        assert!(!ApiServerVerifier::mutations(&requests)
            .iter()
            .any(|m| m.starts_with("DELETE")));
        assert!(fake.take_calls().is_empty());

        // A first instance still in initdb past the delay is not touched.
        let (ctx, api, _) = test_context();
        let mut pgc = cluster(1);
        pgc.spec.max_sync_replicas = 0;
        pgc.spec.min_sync_replicas = 0;
        pgc.status = Some(PostgresClusterStatus {
            current_primary: Some("db-1".into()),
            phase: Some(crate::crd::ClusterPhase::Initializing),
            ..Default::default()
        });
        api.seed("postgresclusters", &pgc);
        seed_instance(&api, &pgc, "db-1", Role::Primary);
        reconcile(Arc::new(pgc), ctx.clone()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        reconcile(Arc::new(stored(&api)), ctx).await.unwrap();
        let requests = api.take_requests();
        assert!(ApiServerVerifier::event_reasons(&requests).is_empty());
        assert!(api.get("pods", "ns", "db-1").is_some(), "not fenced");
    }

    #[tokio::test]
    async fn a_lost_single_instance_is_recreated() {
        let (ctx, api, _) = test_context();
        let mut pgc = with_primary(cluster(1), "db-1");
        pgc.spec.max_sync_replicas = 0;
        pgc.spec.min_sync_replicas = 0;
        api.seed("postgresclusters", &pgc);
        seed_instance(&api, &pgc, "db-1", Role::Primary);
        reconcile(Arc::new(pgc), ctx.clone()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        api.take_requests();
        reconcile(Arc::new(stored(&api)), ctx.clone())
            .await
            .unwrap();
        let requests = api.take_requests();
        assert_eq!(
            ApiServerVerifier::event_reasons(&requests),
            s(&["PrimaryUnreachable", "Fenced"])
        );
        assert!(api.get("pods", "ns", "db-1").is_none());
        assert_eq!(
            stored(&api).status.unwrap().phase,
            Some(crate::crd::ClusterPhase::Initializing),
            "starting again, not failing over in a loop"
        );
        // Next round: the same instance comes back on its volume, still primary.
        reconcile(Arc::new(stored(&api)), ctx).await.unwrap();
        let pod = api.get("pods", "ns", "db-1").expect("recreated");
        assert!(!args_of(&pod).contains("--primary"));
    }

    #[tokio::test]
    async fn a_primary_that_recovers_within_the_delay_is_kept() {
        let (ctx, api, fake) = test_context();
        let pgc = with_primary(cluster(2), "db-1");
        api.seed("postgresclusters", &pgc);
        seed_instance(&api, &pgc, "db-1", Role::Primary);
        seed_instance(&api, &pgc, "db-2", Role::Replica);
        fake.set(report("db-2", Role::Replica, 1, "0/3000000"));
        reconcile(Arc::new(pgc), ctx.clone()).await.unwrap();
        fake.set(report("db-1", Role::Primary, 1, "0/3000000"));
        tokio::time::sleep(Duration::from_millis(1100)).await;
        reconcile(Arc::new(stored(&api)), ctx).await.unwrap();
        let requests = api.take_requests();
        assert!(!ApiServerVerifier::mutations(&requests)
            .iter()
            .any(|m| m.starts_with("DELETE")));
        assert!(!fake.take_calls().iter().any(|c| c.starts_with("promote")));
        assert_eq!(
            stored(&api).status.unwrap().current_primary.as_deref(),
            Some("db-1")
        );
    }

    #[tokio::test]
    async fn a_switchover_annotation_hands_over_without_losing_wal() {
        let (ctx, api, fake) = test_context();
        let mut pgc = with_primary(cluster(3), "db-1");
        pgc.metadata.annotations =
            Some([(super::SWITCHOVER_ANNOTATION.to_string(), "db-2".to_string())].into());
        api.seed("postgresclusters", &pgc);
        for (name, role) in [
            ("db-1", Role::Primary),
            ("db-2", Role::Replica),
            ("db-3", Role::Replica),
        ] {
            seed_instance(&api, &pgc, name, role);
        }
        all_replication(
            &fake,
            vec![
                report("db-1", Role::Primary, 1, "0/5000000"),
                report("db-2", Role::Replica, 1, "0/4000000"),
                report("db-3", Role::Replica, 1, "0/4000000"),
            ],
            3,
        );
        reconcile(Arc::new(pgc), ctx).await.unwrap();
        let requests = api.take_requests();
        let calls = fake.take_calls();
        assert_eq!(
            calls,
            s(&[
                "demote db-1 db-rw:5432",
                "promote db-2",
                "follow db-3 db-rw:5432"
            ])
        );
        assert_eq!(
            ApiServerVerifier::event_reasons(&requests),
            s(&["SwitchoverStarted", "SwitchedOver"])
        );
        let rw = api.get("services", "ns", "db-rw").unwrap();
        assert_eq!(rw["spec"]["selector"][INSTANCE_LABEL], "db-2");
        let stored = stored(&api);
        assert_eq!(
            stored.status.unwrap().current_primary.as_deref(),
            Some("db-2")
        );
        assert!(
            !stored
                .metadata
                .annotations
                .unwrap_or_default()
                .contains_key(super::SWITCHOVER_ANNOTATION),
            "the request is removed once done"
        );
        assert!(
            !ApiServerVerifier::mutations(&requests)
                .iter()
                .any(|m| m.starts_with("DELETE")),
            "nobody is fenced in a switchover"
        );
    }

    #[tokio::test]
    async fn a_switchover_to_an_instance_that_is_not_ready_is_refused() {
        let (ctx, api, fake) = test_context();
        let mut pgc = with_primary(cluster(2), "db-1");
        pgc.metadata.annotations =
            Some([(super::SWITCHOVER_ANNOTATION.to_string(), "db-2".to_string())].into());
        api.seed("postgresclusters", &pgc);
        seed_instance(&api, &pgc, "db-1", Role::Primary);
        seed_instance(&api, &pgc, "db-2", Role::Replica);
        let mut lagging = report("db-2", Role::Replica, 1, "0/1000000");
        lagging.streaming = false;
        all_replication(
            &fake,
            vec![report("db-1", Role::Primary, 1, "0/5000000"), lagging],
            2,
        );
        reconcile(Arc::new(pgc), ctx).await.unwrap();
        let requests = api.take_requests();
        assert!(fake.take_calls().is_empty(), "nothing is demoted");
        assert_eq!(
            ApiServerVerifier::event_reasons(&requests),
            s(&["SwitchoverRefused"])
        );
        assert_eq!(
            stored(&api).status.unwrap().current_primary.as_deref(),
            Some("db-1")
        );
    }

    /// A healthy three-instance cluster whose Pods were made from `old`.
    fn seed_healthy(api: &ApiServerVerifier, fake: &FakeInstances, old: &PostgresCluster) {
        for (name, role) in [
            ("db-1", Role::Primary),
            ("db-2", Role::Replica),
            ("db-3", Role::Replica),
        ] {
            seed_instance(api, old, name, role);
        }
        all_replication(
            fake,
            vec![
                report("db-1", Role::Primary, 1, "0/5000000"),
                report("db-2", Role::Replica, 1, "0/4000000"),
                report("db-3", Role::Replica, 1, "0/5000000"),
            ],
            3,
        );
    }

    fn tuned(mut pgc: PostgresCluster) -> PostgresCluster {
        pgc.spec
            .postgresql
            .parameters
            .insert("work_mem".into(), "64MB".into());
        pgc
    }

    #[tokio::test]
    async fn a_changed_spec_restarts_replicas_one_at_a_time_then_switches_the_primary_over() {
        let (ctx, api, fake) = test_context();
        let old = with_primary(cluster(3), "db-1");
        seed_healthy(&api, &fake, &old);
        let new = tuned(old);
        api.seed("postgresclusters", &new);

        reconcile(Arc::new(new.clone()), ctx.clone()).await.unwrap();
        let requests = api.take_requests();
        let deletes: Vec<String> = ApiServerVerifier::mutations(&requests)
            .into_iter()
            .filter(|m| m.starts_with("DELETE"))
            .collect();
        assert_eq!(deletes, s(&["DELETE pods/db-2"]), "one replica at a time");
        assert_eq!(
            ApiServerVerifier::event_reasons(&requests),
            s(&["RollingUpdate"])
        );

        // db-2 is back with the new spec (as the next reconciles would make it).
        seed_instance(&api, &new, "db-2", Role::Replica);
        reconcile(Arc::new(stored(&api)), ctx.clone())
            .await
            .unwrap();
        let deletes: Vec<String> = ApiServerVerifier::mutations(&api.take_requests())
            .into_iter()
            .filter(|m| m.starts_with("DELETE"))
            .collect();
        assert_eq!(deletes, s(&["DELETE pods/db-3"]));

        // Only the primary is left: it hands over to the most advanced replica.
        seed_instance(&api, &new, "db-3", Role::Replica);
        fake.take_calls();
        reconcile(Arc::new(stored(&api)), ctx.clone())
            .await
            .unwrap();
        let requests = api.take_requests();
        assert_eq!(
            fake.take_calls(),
            s(&[
                "demote db-1 db-rw:5432",
                "promote db-3",
                "follow db-2 db-rw:5432"
            ])
        );
        assert_eq!(
            ApiServerVerifier::event_reasons(&requests),
            s(&["SwitchoverStarted", "SwitchedOver"])
        );
        assert_eq!(
            stored(&api).status.unwrap().current_primary.as_deref(),
            Some("db-3")
        );
        let rw = api.get("services", "ns", "db-rw").unwrap();
        assert_eq!(rw["spec"]["selector"][INSTANCE_LABEL], "db-3");

        // The old primary, a replica now, is restarted last.
        reconcile(Arc::new(stored(&api)), ctx).await.unwrap();
        let deletes: Vec<String> = ApiServerVerifier::mutations(&api.take_requests())
            .into_iter()
            .filter(|m| m.starts_with("DELETE"))
            .collect();
        assert_eq!(deletes, s(&["DELETE pods/db-1"]));
    }

    #[tokio::test]
    async fn a_supervised_primary_waits_for_a_person_to_switch_over() {
        let (ctx, api, fake) = test_context();
        let mut old = with_primary(cluster(3), "db-1");
        old.spec.primary_update_strategy = crate::crd::PrimaryUpdateStrategy::Supervised;
        seed_instance(&api, &old, "db-1", Role::Primary);
        let new = tuned(old.clone());
        // The replicas are already updated.
        seed_instance(&api, &new, "db-2", Role::Replica);
        seed_instance(&api, &new, "db-3", Role::Replica);
        all_replication(
            &fake,
            vec![
                report("db-1", Role::Primary, 1, "0/5000000"),
                report("db-2", Role::Replica, 1, "0/5000000"),
                report("db-3", Role::Replica, 1, "0/5000000"),
            ],
            3,
        );
        api.seed("postgresclusters", &new);
        reconcile(Arc::new(new), ctx).await.unwrap();
        let requests = api.take_requests();
        assert!(fake.take_calls().is_empty(), "no switchover on its own");
        assert!(!ApiServerVerifier::mutations(&requests)
            .iter()
            .any(|m| m.starts_with("DELETE")));
        assert_eq!(
            ApiServerVerifier::event_reasons(&requests),
            s(&["PrimaryUpdatePending"])
        );
        let status = stored(&api).status.unwrap();
        let pending = status
            .conditions
            .iter()
            .find(|c| c.type_ == "PrimaryUpdatePending")
            .expect("the condition says what waits");
        assert_eq!(pending.status, "True");
    }

    #[tokio::test]
    async fn of_two_instances_claiming_primary_the_unrecorded_one_is_fenced() {
        let (ctx, api, fake) = test_context();
        let pgc = with_primary(cluster(3), "db-2");
        api.seed("postgresclusters", &pgc);
        seed_instance(&api, &pgc, "db-1", Role::Primary);
        seed_instance(&api, &pgc, "db-2", Role::Primary);
        seed_instance(&api, &pgc, "db-3", Role::Replica);
        all_replication(
            &fake,
            vec![
                // The old primary came back without being rewound: more WAL, old timeline.
                report("db-1", Role::Primary, 1, "0/9000000"),
                report("db-2", Role::Primary, 2, "0/4000000"),
                report("db-3", Role::Replica, 2, "0/4000000"),
            ],
            3,
        );
        reconcile(Arc::new(pgc), ctx).await.unwrap();
        let requests = api.take_requests();
        let deletes: Vec<String> = ApiServerVerifier::mutations(&requests)
            .into_iter()
            .filter(|m| m.starts_with("DELETE"))
            .collect();
        assert_eq!(deletes, s(&["DELETE pods/db-1"]));
        assert_eq!(ApiServerVerifier::event_reasons(&requests), s(&["Fenced"]));
        assert!(fake.take_calls().is_empty(), "nobody is promoted");
        let rw = api.get("services", "ns", "db-rw").unwrap();
        assert_eq!(rw["spec"]["selector"][INSTANCE_LABEL], "db-2");
    }

    #[tokio::test]
    async fn an_invalid_spec_is_refused_with_the_fields_named_and_nothing_is_created() {
        let (ctx, api, _) = test_context();
        let mut pgc = cluster(0);
        pgc.spec.max_sync_replicas = 0;
        pgc.spec.min_sync_replicas = 0;
        pgc.spec
            .postgresql
            .parameters
            .insert("port".into(), "6000".into());
        api.seed("postgresclusters", &pgc);
        reconcile(Arc::new(pgc), ctx).await.unwrap();
        let requests = api.take_requests();
        assert_eq!(
            ApiServerVerifier::mutations(&requests),
            s(&["PATCH postgresclusters/db/status"])
        );
        assert_eq!(
            ApiServerVerifier::event_reasons(&requests),
            s(&["InvalidSpec"])
        );
        let status = stored(&api).status.unwrap();
        assert_eq!(status.phase, Some(crate::crd::ClusterPhase::Invalid));
        let valid = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Valid")
            .unwrap();
        assert_eq!(valid.status, "False");
        assert!(
            valid.message.contains("spec.instances"),
            "{}",
            valid.message
        );
        assert!(
            valid.message.contains("spec.postgresql.parameters.port"),
            "{}",
            valid.message
        );
    }

    /// A healthy 3-instance cluster whose volumes were made at 1Gi, now asking
    /// for `size`; what one reconcile does.
    async fn resized(size: &str) -> (ApiServerVerifier, Vec<Recorded>, PostgresClusterStatus) {
        let (ctx, api, fake) = test_context();
        let mut pgc = with_primary(cluster(3), "db-1");
        for name in ["db-1", "db-2", "db-3"] {
            seed_instance(
                &api,
                &pgc,
                name,
                if name == "db-1" {
                    Role::Primary
                } else {
                    Role::Replica
                },
            );
        }
        pgc.spec.storage.size = size.into();
        api.seed("postgresclusters", &pgc);
        all_replication(
            &fake,
            vec![
                report("db-1", Role::Primary, 1, "0/9000000"),
                report("db-2", Role::Replica, 1, "0/9000000"),
                report("db-3", Role::Replica, 1, "0/9000000"),
            ],
            3,
        );
        reconcile(Arc::new(pgc), ctx).await.unwrap();
        let requests = api.take_requests();
        let status = stored(&api).status.unwrap();
        (api, requests, status)
    }

    fn storage_condition(status: &PostgresClusterStatus) -> &Condition {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == "StorageSize")
            .expect("the StorageSize condition")
    }

    #[tokio::test]
    async fn a_larger_storage_size_grows_every_volume() {
        let (api, requests, status) = resized("2Gi").await;
        assert_eq!(
            ApiServerVerifier::mutations(&requests)
                .into_iter()
                .filter(|m| m.contains("persistentvolumeclaims"))
                .collect::<Vec<_>>(),
            s(&[
                "PATCH persistentvolumeclaims/db-1",
                "PATCH persistentvolumeclaims/db-2",
                "PATCH persistentvolumeclaims/db-3",
            ])
        );
        for name in ["db-1", "db-2", "db-3"] {
            let pvc = api.get("persistentvolumeclaims", "ns", name).unwrap();
            assert_eq!(pvc["spec"]["resources"]["requests"]["storage"], "2Gi");
        }
        assert_eq!(
            ApiServerVerifier::event_reasons(&requests),
            s(&["VolumeExpanding", "VolumeExpanding", "VolumeExpanding"])
        );
        assert_eq!(storage_condition(&status).status, "True");
        assert!(api.get("pods", "ns", "db-1").is_some(), "no restart");
    }

    #[tokio::test]
    async fn a_smaller_storage_size_changes_no_volume_and_says_why() {
        let (api, requests, status) = resized("512Mi").await;
        assert!(
            !ApiServerVerifier::mutations(&requests)
                .iter()
                .any(|m| m.contains("persistentvolumeclaims")),
            "a volume cannot shrink"
        );
        for name in ["db-1", "db-2", "db-3"] {
            let pvc = api.get("persistentvolumeclaims", "ns", name).unwrap();
            assert_eq!(pvc["spec"]["resources"]["requests"]["storage"], "1Gi");
        }
        assert_eq!(
            ApiServerVerifier::event_reasons(&requests),
            s(&["StorageShrinkRefused"])
        );
        let condition = storage_condition(&status);
        assert_eq!(condition.status, "False");
        assert!(
            condition.message.contains("db-1, db-2, db-3") && condition.message.contains("512Mi"),
            "{}",
            condition.message
        );
    }

    #[tokio::test]
    async fn a_healthy_cluster_reports_roles_positions_and_lag() {
        let (ctx, api, fake) = test_context();
        let pgc = with_primary(cluster(3), "db-1");
        api.seed("postgresclusters", &pgc);
        seed_instance(&api, &pgc, "db-1", Role::Primary);
        seed_instance(&api, &pgc, "db-2", Role::Replica);
        seed_instance(&api, &pgc, "db-3", Role::Replica);
        all_replication(
            &fake,
            vec![
                report("db-1", Role::Primary, 1, "0/9000000"),
                report("db-2", Role::Replica, 1, "0/8000000"),
                report("db-3", Role::Replica, 1, "0/9000000"),
            ],
            3,
        );
        reconcile(Arc::new(pgc), ctx).await.unwrap();
        let requests = api.take_requests();
        assert!(ApiServerVerifier::event_reasons(&requests).is_empty());
        assert!(fake.take_calls().is_empty(), "settings already match");
        let status = stored(&api).status.unwrap();
        assert_eq!(status.phase, Some(crate::crd::ClusterPhase::Healthy));
        assert_eq!(status.ready_instances, 3);
        let lags: Vec<(String, Option<u64>)> = status
            .instances
            .iter()
            .map(|i| (i.name.clone(), i.lag_bytes))
            .collect();
        assert_eq!(
            lags,
            vec![
                ("db-1".to_string(), None),
                ("db-2".to_string(), Some(0x1000000)),
                ("db-3".to_string(), Some(0)),
            ]
        );
        assert_eq!(status.instances[0].lsn.as_deref(), Some("0/9000000"));
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.status, "True");
    }

    #[tokio::test]
    async fn deletion_stops_the_replicas_before_the_primary_then_drops_the_finalizer() {
        let (ctx, api, _) = test_context();
        let mut pgc = with_primary(cluster(3), "db-1");
        pgc.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        api.seed("postgresclusters", &pgc);
        seed_instance(&api, &pgc, "db-1", Role::Primary);
        seed_instance(&api, &pgc, "db-2", Role::Replica);
        seed_instance(&api, &pgc, "db-3", Role::Replica);
        reconcile(Arc::new(pgc), ctx).await.unwrap();
        let requests = api.take_requests();
        assert_eq!(
            ApiServerVerifier::mutations(&requests),
            s(&[
                "DELETE pods/db-2",
                "DELETE pods/db-3",
                "DELETE pods/db-1",
                "PATCH postgresclusters/db",
            ])
        );
        assert_eq!(
            ApiServerVerifier::event_reasons(&requests),
            s(&["Deleting"])
        );
        assert_eq!(
            api.get("postgresclusters", "ns", "db").unwrap()["metadata"]["finalizers"],
            json!([])
        );
    }
}
