//! strata-operator: the PostgresCluster controller, with `/metrics` and `/healthz`.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::routing::get;
use clap::Parser;
use strata_operator::metrics::Metrics;

#[derive(Parser, Debug)]
#[command(about = "Runs Strata's PostgresCluster controller")]
struct Args {
    /// Address of the /metrics and /healthz endpoints.
    #[arg(long, env = "STRATA_OPERATOR_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes client configuration (in-cluster or kubeconfig)")?;
    let metrics = Arc::new(Metrics::default());
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let served = metrics.clone();
    let router = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(move || async move { served.render() }));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    tracing::info!(listen = %args.listen, "strata-operator starting");
    strata_operator::controller::run(client, metrics).await;
    Ok(())
}
