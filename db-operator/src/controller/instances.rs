//! How the controller reaches the instance managers: a small trait with the HTTP
//! implementation first; tests put a fake behind it.

use std::time::Duration;

use futures::future::BoxFuture;

use crate::instance_api::{DemoteReport, InstanceReport, PrimaryAddress, ReplicationSettings};
use crate::instance_client::{ClientError, InstanceClient};

use super::resources::API_PORT;

/// One instance: its name and, once the Pod is scheduled, its IP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceTarget {
    pub name: String,
    pub pod_ip: Option<String>,
}

pub trait InstanceApi: Send + Sync {
    fn status<'a>(
        &'a self,
        target: &'a InstanceTarget,
    ) -> BoxFuture<'a, Result<InstanceReport, ClientError>>;
    fn promote<'a>(
        &'a self,
        target: &'a InstanceTarget,
    ) -> BoxFuture<'a, Result<InstanceReport, ClientError>>;
    fn follow<'a>(
        &'a self,
        target: &'a InstanceTarget,
        primary: &'a PrimaryAddress,
    ) -> BoxFuture<'a, Result<InstanceReport, ClientError>>;
    fn set_replication<'a>(
        &'a self,
        target: &'a InstanceTarget,
        settings: &'a ReplicationSettings,
    ) -> BoxFuture<'a, Result<InstanceReport, ClientError>>;
    fn demote<'a>(
        &'a self,
        target: &'a InstanceTarget,
        primary: &'a PrimaryAddress,
    ) -> BoxFuture<'a, Result<DemoteReport, ClientError>>;
}

/// The instance managers' HTTP API on each Pod's IP.
#[derive(Default)]
pub struct HttpInstanceApi;

impl HttpInstanceApi {
    fn client(target: &InstanceTarget, timeout: Duration) -> Result<InstanceClient, ClientError> {
        let ip = target
            .pod_ip
            .as_ref()
            .ok_or_else(|| ClientError::Unreachable {
                url: target.name.clone(),
                message: "the Pod has no IP yet".into(),
            })?;
        Ok(InstanceClient::new(format!("http://{ip}:{API_PORT}")).with_timeout(timeout))
    }
}

/// A status probe must be quick: a silent primary is the failover signal.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
const ACTION_TIMEOUT: Duration = Duration::from_secs(90);

impl InstanceApi for HttpInstanceApi {
    fn status<'a>(
        &'a self,
        target: &'a InstanceTarget,
    ) -> BoxFuture<'a, Result<InstanceReport, ClientError>> {
        Box::pin(async move { Self::client(target, PROBE_TIMEOUT)?.status().await })
    }

    fn promote<'a>(
        &'a self,
        target: &'a InstanceTarget,
    ) -> BoxFuture<'a, Result<InstanceReport, ClientError>> {
        Box::pin(async move { Self::client(target, ACTION_TIMEOUT)?.promote().await })
    }

    fn follow<'a>(
        &'a self,
        target: &'a InstanceTarget,
        primary: &'a PrimaryAddress,
    ) -> BoxFuture<'a, Result<InstanceReport, ClientError>> {
        Box::pin(async move { Self::client(target, ACTION_TIMEOUT)?.follow(primary).await })
    }

    fn set_replication<'a>(
        &'a self,
        target: &'a InstanceTarget,
        settings: &'a ReplicationSettings,
    ) -> BoxFuture<'a, Result<InstanceReport, ClientError>> {
        Box::pin(async move {
            Self::client(target, ACTION_TIMEOUT)?
                .set_replication(settings)
                .await
        })
    }

    fn demote<'a>(
        &'a self,
        target: &'a InstanceTarget,
        primary: &'a PrimaryAddress,
    ) -> BoxFuture<'a, Result<DemoteReport, ClientError>> {
        Box::pin(async move { Self::client(target, ACTION_TIMEOUT)?.demote(primary).await })
    }
}
