//! What can go wrong in the instance manager.

use crate::instance_api::Role;

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        tool: String,
        status: String,
        stderr: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("sql: {0}")]
    Sql(#[from] tokio_postgres::Error),
    #[error("postgres exited: {0}")]
    PostgresExited(String),
    #[error("postgres did not accept connections within {0:?}")]
    NotReady(std::time::Duration),
    #[error("no OS user {0:?}")]
    UnknownUser(String),
    #[error("this instance is a {actual:?}; the request needs a {needed:?}")]
    WrongRole { actual: Role, needed: Role },
    #[error("postgres is not running")]
    NotRunning,
    #[error("{0}")]
    Invalid(String),
}

impl InstanceError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// Whether the request was wrong (4xx) rather than the instance failing (5xx).
    pub fn is_client_error(&self) -> bool {
        matches!(self, Self::WrongRole { .. } | Self::Invalid(_))
    }
}
