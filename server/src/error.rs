//! The server's domain error, and its one mapping to gRPC status codes.

use crate::store::StoreError;

/// What went wrong, worded for the person who will read it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// Worth trying again shortly.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Whether this refuses the caller for who it is or what it may do (a
    /// wrong secret, an unknown id, a role too low): what guessing is counted
    /// by. A store that does not answer is not.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Error::Unauthenticated(_) | Error::PermissionDenied(_))
    }
}

impl From<flotilla_proto::limits::NameError> for Error {
    fn from(e: flotilla_proto::limits::NameError) -> Self {
        Self::InvalidArgument(e.to_string())
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Status;
        match e {
            Error::InvalidArgument(m) => Status::invalid_argument(m),
            Error::Unauthenticated(m) => Status::unauthenticated(m),
            Error::PermissionDenied(m) => Status::permission_denied(m),
            Error::NotFound(m) => Status::not_found(m),
            Error::AlreadyExists(m) => Status::already_exists(m),
            Error::FailedPrecondition(m) => Status::failed_precondition(m),
            Error::ResourceExhausted(m) => Status::resource_exhausted(m),
            Error::Unavailable(m) => Status::unavailable(m),
            Error::Store(e) => {
                tracing::error!(error = %e, "store failure");
                Status::unavailable(format!("the server's store failed: {e}; retry later"))
            }
            Error::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                Status::internal(m)
            }
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
