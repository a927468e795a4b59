//! Prometheus metrics of a storage node, served at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The `op` label: read, write, flush, trim or write_zeroes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IoLabels {
    pub volume: String,
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VolumeLabels {
    pub volume: String,
}

pub struct Metrics {
    registry: Registry,
    pub io_ops: Family<IoLabels, Counter>,
    pub io_errors: Family<IoLabels, Counter>,
    pub io_bytes: Family<IoLabels, Counter>,
    pub io_latency: Family<IoLabels, Histogram>,
    pub checksum_failures: Family<VolumeLabels, Counter>,
    pub pool_capacity_bytes: Gauge,
    pub pool_used_bytes: Gauge,
    pub pool_provisioned_bytes: Gauge,
    pub volumes: Gauge,
    pub target_in_sync_replicas: Family<VolumeLabels, Gauge>,
    pub target_epoch: Family<VolumeLabels, Gauge>,
    pub rebuild_copied_bytes: Family<VolumeLabels, Counter>,
    pub rebuild_remaining_extents: Family<VolumeLabels, Gauge>,
    pub repaired_blocks: Family<VolumeLabels, Counter>,
    pub scrub_passes: Family<VolumeLabels, Counter>,
    pub replaced_replicas: Family<VolumeLabels, Counter>,
    pub leftover_surveys: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("strata");
        let io_ops = Family::<IoLabels, Counter>::default();
        let io_errors = Family::<IoLabels, Counter>::default();
        let io_bytes = Family::<IoLabels, Counter>::default();
        // 10 µs .. ~5 s
        let io_latency = Family::<IoLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                1e-5, 2.5, 15,
            ))
        });
        let checksum_failures = Family::<VolumeLabels, Counter>::default();
        let pool_capacity_bytes = Gauge::default();
        let pool_used_bytes = Gauge::default();
        let pool_provisioned_bytes = Gauge::default();
        let volumes = Gauge::default();
        registry.register(
            "volume_io_ops",
            "Completed volume I/O requests",
            io_ops.clone(),
        );
        registry.register(
            "volume_io_errors",
            "Volume I/O requests that failed",
            io_errors.clone(),
        );
        registry.register(
            "volume_io_bytes",
            "Bytes read and written",
            io_bytes.clone(),
        );
        registry.register(
            "volume_io_latency_seconds",
            "Volume I/O latency",
            io_latency.clone(),
        );
        registry.register(
            "checksum_failures",
            "Data blocks whose CRC32 did not match on read",
            checksum_failures.clone(),
        );
        registry.register(
            "pool_capacity_bytes",
            "Data capacity of the pool",
            pool_capacity_bytes.clone(),
        );
        registry.register(
            "pool_used_bytes",
            "Pool data space in use",
            pool_used_bytes.clone(),
        );
        registry.register(
            "pool_provisioned_bytes",
            "Sum of volume sizes",
            pool_provisioned_bytes.clone(),
        );
        registry.register("volumes", "Volumes in the pool", volumes.clone());
        let target_in_sync_replicas = Family::<VolumeLabels, Gauge>::default();
        let target_epoch = Family::<VolumeLabels, Gauge>::default();
        let rebuild_copied_bytes = Family::<VolumeLabels, Counter>::default();
        let rebuild_remaining_extents = Family::<VolumeLabels, Gauge>::default();
        let repaired_blocks = Family::<VolumeLabels, Counter>::default();
        let scrub_passes = Family::<VolumeLabels, Counter>::default();
        let replaced_replicas = Family::<VolumeLabels, Counter>::default();
        let leftover_surveys = Counter::default();
        registry.register(
            "target_in_sync_replicas",
            "Replicas in the in-sync set of a volume served here",
            target_in_sync_replicas.clone(),
        );
        registry.register(
            "target_epoch",
            "Epoch of the volume target served here",
            target_epoch.clone(),
        );
        registry.register(
            "rebuild_copied_bytes",
            "Bytes copied to replicas being rebuilt",
            rebuild_copied_bytes.clone(),
        );
        registry.register(
            "rebuild_remaining_extents",
            "Extents (1 MiB) a running rebuild has still to copy",
            rebuild_remaining_extents.clone(),
        );
        registry.register(
            "repaired_blocks",
            "Blocks rewritten on a replica after a checksum failure (reads and scrub)",
            repaired_blocks.clone(),
        );
        registry.register(
            "scrub_passes",
            "Scrub passes completed over a volume",
            scrub_passes.clone(),
        );
        registry.register(
            "replaced_replicas",
            "Replicas of a volume replaced by a new one on another node (its full copy \
             counts in rebuild_copied_bytes)",
            replaced_replicas.clone(),
        );
        registry.register(
            "leftover_surveys",
            "Looks over the whole cluster for leftover replicas of the volumes served here \
             (one look serves every target due for one)",
            leftover_surveys.clone(),
        );
        Metrics {
            registry,
            io_ops,
            io_errors,
            io_bytes,
            io_latency,
            checksum_failures,
            pool_capacity_bytes,
            pool_used_bytes,
            pool_provisioned_bytes,
            volumes,
            target_in_sync_replicas,
            target_epoch,
            rebuild_copied_bytes,
            rebuild_remaining_extents,
            repaired_blocks,
            scrub_passes,
            replaced_replicas,
            leftover_surveys,
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
