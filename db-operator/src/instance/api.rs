//! The instance manager's HTTP API (routes listed in `crate::instance_api`).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use super::error::InstanceError;
use super::manager::InstanceManager;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::instance_api::{ApiError, InstanceReport, PrimaryAddress, ReplicationSettings, Role};

pub fn router(manager: Arc<InstanceManager>) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/promote", post(promote))
        .route("/demote", post(demote))
        .route("/follow", post(follow))
        .route("/replication", post(replication))
        .with_state(manager)
}

impl IntoResponse for InstanceError {
    fn into_response(self) -> Response {
        let code = if self.is_client_error() {
            StatusCode::CONFLICT
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        tracing::warn!(error = %self, "request failed");
        (
            code,
            Json(ApiError {
                error: self.to_string(),
            }),
        )
            .into_response()
    }
}

async fn status(State(m): State<Arc<InstanceManager>>) -> Response {
    Json(m.report().await).into_response()
}

async fn healthz(State(m): State<Arc<InstanceManager>>) -> Response {
    if m.report().await.ready {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "postgres is not accepting connections\n",
        )
            .into_response()
    }
}

async fn metrics(State(m): State<Arc<InstanceManager>>) -> Response {
    render_metrics(&m.report().await).into_response()
}

/// The report as Prometheus gauges, built afresh on every scrape: each value is
/// read from postgres at that moment.
pub fn render_metrics(report: &InstanceReport) -> String {
    let mut registry = Registry::with_prefix("strata_instance");
    let gauge = |value: i64| {
        let g: Gauge = Gauge::default();
        g.set(value);
        g
    };
    registry.register(
        "primary",
        "1 when this instance is the primary",
        gauge(i64::from(report.role == Role::Primary)),
    );
    registry.register(
        "ready",
        "1 when postgres accepts connections",
        gauge(i64::from(report.ready)),
    );
    if let Some(timeline) = report.timeline {
        registry.register("timeline", "Current timeline", gauge(timeline.into()));
    }
    if let Some(position) = report.wal_position() {
        registry.register(
            "wal_position_bytes",
            "WAL written (primary) or received (replica)",
            gauge(position.0 as i64),
        );
    }
    if let Some(lag) = report.replay_lag_bytes {
        registry.register(
            "replay_lag_bytes",
            "WAL received but not yet replayed",
            gauge(lag as i64),
        );
    }
    let streaming = report
        .standbys
        .iter()
        .filter(|s| s.state == "streaming")
        .count();
    registry.register(
        "streaming_standbys",
        "Standbys streaming from this primary",
        gauge(streaming as i64),
    );
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .expect("writing to a String cannot fail");
    out
}

async fn promote(State(m): State<Arc<InstanceManager>>) -> Result<Response, InstanceError> {
    Ok(Json(m.promote().await?).into_response())
}

async fn demote(
    State(m): State<Arc<InstanceManager>>,
    Json(primary): Json<PrimaryAddress>,
) -> Result<Response, InstanceError> {
    Ok(Json(m.demote(primary).await?).into_response())
}

async fn follow(
    State(m): State<Arc<InstanceManager>>,
    Json(primary): Json<PrimaryAddress>,
) -> Result<Response, InstanceError> {
    Ok(Json(m.follow(primary).await?).into_response())
}

async fn replication(
    State(m): State<Arc<InstanceManager>>,
    Json(settings): Json<ReplicationSettings>,
) -> Result<Response, InstanceError> {
    Ok(Json(m.set_replication(settings).await?).into_response())
}
