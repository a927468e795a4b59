//! The one error type of the driver and the one place it becomes a gRPC
//! status: each variant is the code the CSI spec names for that failure.

use strata_node::cluster::volumes::VolumeError;
use tonic::Code;

use crate::command::CommandError;

#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// An operation on the same volume is already in flight.
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    Internal(String),
}

impl CsiError {
    pub fn invalid(message: impl Into<String>) -> CsiError {
        CsiError::InvalidArgument(message.into())
    }

    /// `what` is REQUIRED by the spec and was left empty.
    pub fn required(what: &str) -> CsiError {
        CsiError::InvalidArgument(format!("{what} is required"))
    }
}

impl From<CsiError> for tonic::Status {
    fn from(err: CsiError) -> tonic::Status {
        use tonic::Status;
        match err {
            CsiError::InvalidArgument(m) => Status::invalid_argument(m),
            CsiError::NotFound(m) => Status::not_found(m),
            CsiError::AlreadyExists(m) => Status::already_exists(m),
            CsiError::OutOfRange(m) => Status::out_of_range(m),
            CsiError::ResourceExhausted(m) => Status::resource_exhausted(m),
            CsiError::FailedPrecondition(m) => Status::failed_precondition(m),
            CsiError::Aborted(m) => Status::aborted(m),
            CsiError::Unavailable(m) => Status::unavailable(m),
            CsiError::Unimplemented(m) => Status::unimplemented(m),
            CsiError::Internal(m) => Status::internal(m),
        }
    }
}

impl From<VolumeError> for CsiError {
    fn from(err: VolumeError) -> CsiError {
        let message = err.to_string();
        match err {
            VolumeError::NotFound(_) | VolumeError::SnapshotNotFound(_) => {
                CsiError::NotFound(message)
            }
            VolumeError::AlreadyExists { .. } | VolumeError::SnapshotExists { .. } => {
                CsiError::AlreadyExists(message)
            }
            VolumeError::Invalid(_) => CsiError::InvalidArgument(message),
            VolumeError::NoRoom(_) => CsiError::ResourceExhausted(message),
            VolumeError::Unavailable(_) => CsiError::Unavailable(message),
            // Not retried away: an operator deletes the old copies.
            VolumeError::SnapshotConflict(_) => CsiError::FailedPrecondition(message),
            // A node's own answer keeps its meaning; what the CSI spec has
            // no code for is the plugin's internal failure.
            VolumeError::Node { status, .. } => match status.code() {
                Code::NotFound => CsiError::NotFound(message),
                Code::AlreadyExists => CsiError::AlreadyExists(message),
                Code::InvalidArgument => CsiError::InvalidArgument(message),
                Code::OutOfRange => CsiError::OutOfRange(message),
                Code::FailedPrecondition => CsiError::FailedPrecondition(message),
                Code::ResourceExhausted => CsiError::ResourceExhausted(message),
                // Another target took the volume while this one opened.
                Code::Aborted => CsiError::Aborted(message),
                Code::Unavailable | Code::DeadlineExceeded => CsiError::Unavailable(message),
                _ => CsiError::Internal(message),
            },
        }
    }
}

impl From<CommandError> for CsiError {
    fn from(err: CommandError) -> CsiError {
        CsiError::Internal(err.to_string())
    }
}

impl From<std::io::Error> for CsiError {
    fn from(err: std::io::Error) -> CsiError {
        CsiError::Internal(err.to_string())
    }
}

pub type CsiResult<T> = Result<T, CsiError>;

#[cfg(test)]
mod tests {
    use super::*;

    fn code(err: VolumeError) -> Code {
        tonic::Status::from(CsiError::from(err)).code()
    }

    #[test]
    fn storage_errors_become_the_codes_the_csi_spec_names() {
        let node = |status| VolumeError::Node {
            node: "node-a".into(),
            status,
        };
        assert_eq!(code(VolumeError::NotFound("v".into())), Code::NotFound);
        assert_eq!(
            code(VolumeError::AlreadyExists {
                name: "v".into(),
                nodes: "node-a".into()
            }),
            Code::AlreadyExists
        );
        assert_eq!(
            code(VolumeError::Invalid("x".into())),
            Code::InvalidArgument
        );
        assert_eq!(
            code(VolumeError::NoRoom("x".into())),
            Code::ResourceExhausted
        );
        assert_eq!(
            code(VolumeError::Unavailable("x".into())),
            Code::Unavailable
        );
        assert_eq!(
            code(node(tonic::Status::resource_exhausted("pool full"))),
            Code::ResourceExhausted
        );
        assert_eq!(
            code(node(tonic::Status::failed_precondition("shrink"))),
            Code::FailedPrecondition
        );
        assert_eq!(code(node(tonic::Status::aborted("fenced"))), Code::Aborted);
        assert_eq!(
            code(node(tonic::Status::deadline_exceeded("slow"))),
            Code::Unavailable
        );
        assert_eq!(code(node(tonic::Status::data_loss("?"))), Code::Internal);
        // The node's name stays in the message, so the operator knows where to look.
        let status = tonic::Status::from(CsiError::from(node(tonic::Status::internal("disk"))));
        assert!(status.message().contains("node-a"), "{}", status.message());
    }
}
