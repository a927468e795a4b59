//! The PostgresCluster controller: turns a `PostgresCluster` into Pods, PVCs,
//! Services, Secrets and PodDisruptionBudgets, watches the instances, and fails
//! over when the primary is lost.

pub mod error;
#[cfg(test)]
mod fixtures;
pub mod instances;
pub mod rbac;
pub mod reconcile;
pub mod resources;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};

use crate::crd::PostgresCluster;
use crate::decisions::PrimaryWatch;
use crate::metrics::{ErrorLabels, Metrics};
pub use error::Error;
use instances::InstanceApi;

/// The finalizer that lets the operator stop the instances in order on deletion.
pub const FINALIZER: &str = "postgresclusters.strata.io/finalizer";
/// The field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "strata-operator";

/// What reconcile needs besides the object.
pub struct Context {
    pub client: Client,
    pub instances: Arc<dyn InstanceApi>,
    pub recorder: Recorder,
    /// Since when each cluster's primary has been unreachable (`namespace/name`).
    pub watches: Mutex<HashMap<String, PrimaryWatch>>,
    pub metrics: Arc<Metrics>,
}

impl Context {
    pub fn new(client: Client, instances: Arc<dyn InstanceApi>, metrics: Arc<Metrics>) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            instances,
            watches: Mutex::default(),
            metrics,
        }
    }
}

fn error_policy(pgc: Arc<PostgresCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_failures
        .get_or_create(&ErrorLabels {
            error: error.metric_label(),
        })
        .inc();
    tracing::warn!(
        cluster = pgc.name_any(),
        kind = error.metric_label(),
        error = %error,
        "reconcile failed"
    );
    Action::requeue(Duration::from_secs(5))
}

/// Runs the controller until SIGTERM.
pub async fn run(client: Client, metrics: Arc<Metrics>) {
    let clusters = Api::<PostgresCluster>::all(client.clone());
    let ctx = Arc::new(Context::new(
        client.clone(),
        Arc::new(instances::HttpInstanceApi),
        metrics,
    ));
    Controller::new(clusters, watcher::Config::default())
        .owns(Api::<Pod>::all(client.clone()), watcher::Config::default())
        .owns(
            Api::<PersistentVolumeClaim>::all(client.clone()),
            watcher::Config::default(),
        )
        .owns(Api::<Service>::all(client), watcher::Config::default())
        .shutdown_on_signal()
        .run(reconcile::reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(cluster = object.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile error"),
            }
        })
        .await;
}
