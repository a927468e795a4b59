//! `/metrics` (Prometheus text format) and `/healthz` over HTTP.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::pool::Pool;

pub fn router(pool: Arc<Pool>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(pool)
}

async fn metrics(State(pool): State<Arc<Pool>>) -> impl IntoResponse {
    let usage = pool.usage();
    let m = pool.metrics();
    m.pool_capacity_bytes.set(usage.capacity as i64);
    m.pool_used_bytes.set(usage.used as i64);
    m.pool_provisioned_bytes.set(usage.provisioned as i64);
    m.volumes.set(pool.list_volumes().len() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
}

/// Healthy when the pool can make its state durable.
async fn healthz(State(pool): State<Arc<Pool>>) -> impl IntoResponse {
    match pool.commit().await {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
        Err(err) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {err}\n"),
        ),
    }
}
