//! A client of the instance manager's HTTP API, for the controller and the tests.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::instance_api::{
    ApiError, DemoteReport, InstanceReport, PrimaryAddress, ReplicationSettings,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("{url}: timed out after {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("{url}: HTTP {status}: {message}")]
    Refused {
        url: String,
        status: u16,
        message: String,
    },
    #[error("{url}: unexpected answer: {message}")]
    BadAnswer { url: String, message: String },
}

/// Talks to one instance manager at `base` (e.g. `http://10.0.0.5:8000`).
#[derive(Clone)]
pub struct InstanceClient {
    base: String,
    http: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

impl InstanceClient {
    pub fn new(base: impl Into<String>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        Self {
            base: base.into().trim_end_matches('/').to_string(),
            http: Client::builder(TokioExecutor::new()).build(connector),
            // Promotion and demotion wait for postgres; status answers at once.
            timeout: Duration::from_secs(120),
        }
    }

    /// Limits every request (a health probe wants a short one).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub async fn status(&self) -> Result<InstanceReport, ClientError> {
        self.request::<(), _>(http::Method::GET, "/status", None)
            .await
    }

    pub async fn promote(&self) -> Result<InstanceReport, ClientError> {
        self.request::<(), _>(http::Method::POST, "/promote", None)
            .await
    }

    pub async fn demote(&self, primary: &PrimaryAddress) -> Result<DemoteReport, ClientError> {
        self.request(http::Method::POST, "/demote", Some(primary))
            .await
    }

    pub async fn follow(&self, primary: &PrimaryAddress) -> Result<InstanceReport, ClientError> {
        self.request(http::Method::POST, "/follow", Some(primary))
            .await
    }

    pub async fn set_replication(
        &self,
        settings: &ReplicationSettings,
    ) -> Result<InstanceReport, ClientError> {
        self.request(http::Method::POST, "/replication", Some(settings))
            .await
    }

    async fn request<B: Serialize, T: DeserializeOwned>(
        &self,
        method: http::Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let payload = match body {
            Some(b) => serde_json::to_vec(b).expect("API requests always serialize"),
            None => Vec::new(),
        };
        let request = http::Request::builder()
            .method(method)
            .uri(&url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(payload)))
            .map_err(|e| ClientError::Unreachable {
                url: url.clone(),
                message: e.to_string(),
            })?;
        let exchange = async {
            let response =
                self.http
                    .request(request)
                    .await
                    .map_err(|e| ClientError::Unreachable {
                        url: url.clone(),
                        message: e.to_string(),
                    })?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| ClientError::Unreachable {
                    url: url.clone(),
                    message: e.to_string(),
                })?
                .to_bytes();
            Ok::<_, ClientError>((status, body))
        };
        let (status, body) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout {
                url: url.clone(),
                timeout: self.timeout,
            })??;
        if !status.is_success() {
            let message = serde_json::from_slice::<ApiError>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).chars().take(300).collect());
            return Err(ClientError::Refused {
                url,
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::BadAnswer {
            url,
            message: e.to_string(),
        })
    }
}
