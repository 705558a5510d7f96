//! The one place where domain errors become gRPC statuses.

use crate::control::ControlError;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

impl From<ControlError> for Status {
    fn from(error: ControlError) -> Status {
        match error {
            ControlError::InvalidArgument { field, reason } => Status::with_error_details(
                Code::InvalidArgument,
                format!("{field}: {reason}"),
                ErrorDetails::with_bad_request_violation(field, reason),
            ),
            ControlError::NotFound(m) => Status::not_found(m),
            ControlError::AlreadyExists(m) => Status::already_exists(m),
            ControlError::FailedPrecondition(m) => Status::failed_precondition(m),
            ControlError::PermissionDenied(m) => Status::permission_denied(m),
            ControlError::Unavailable(m) => Status::unavailable(m),
            ControlError::Overloaded {
                message,
                retry_after,
            } => Status::with_error_details(
                Code::ResourceExhausted,
                message,
                ErrorDetails::with_retry_info(Some(retry_after)),
            ),
            ControlError::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                Status::internal(m)
            }
        }
    }
}
