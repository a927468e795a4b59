//! What can make a reconcile fail; it is retried after a pause.

use crate::instance_client::ClientError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("instance manager: {0}")]
    Instance(#[from] ClientError),
    #[error("{0} has no namespace")]
    NoNamespace(String),
}

impl Error {
    /// A short, stable label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(_) => "finalizer",
            Error::Instance(_) => "instance",
            Error::NoNamespace(_) => "no_namespace",
        }
    }
}
