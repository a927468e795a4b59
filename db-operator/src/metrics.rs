//! Prometheus metrics of the operator, served at `/metrics` with `/healthz`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub reconciles: Counter,
    pub reconcile_failures: Family<ErrorLabels, Counter>,
    pub failovers: Counter,
    pub switchovers: Counter,
    pub fenced_instances: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("strata_operator");
        let reconciles = Counter::default();
        let reconcile_failures = Family::<ErrorLabels, Counter>::default();
        let failovers = Counter::default();
        let switchovers = Counter::default();
        let fenced_instances = Counter::default();
        registry.register("reconciles", "Reconciles started", reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Reconciles that failed, by kind of error",
            reconcile_failures.clone(),
        );
        registry.register(
            "failovers",
            "Replicas promoted after the primary was lost",
            failovers.clone(),
        );
        registry.register(
            "switchovers",
            "Planned switchovers completed",
            switchovers.clone(),
        );
        registry.register(
            "fenced_instances",
            "Instance Pods deleted to keep them from taking writes",
            fenced_instances.clone(),
        );
        Self {
            registry,
            reconciles,
            reconcile_failures,
            failovers,
            switchovers,
            fenced_instances,
        }
    }
}

impl Metrics {
    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
