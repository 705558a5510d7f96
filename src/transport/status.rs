//! The one place where domain errors become gRPC statuses. Internal faults and database outages
//! reach the client as a short message with a correlation id; their detail goes to the log only.

use crate::control::ControlError;
use rand::Rng;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// A short random id that ties a client's error to the server's log line.
fn correlation_id() -> String {
    format!("{:016x}", rand::rng().random::<u64>())
}

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
            ControlError::Unauthenticated(m) => Status::unauthenticated(m),
            ControlError::Unavailable(m) => Status::unavailable(m),
            ControlError::Overloaded {
                message,
                retry_after,
            } => Status::with_error_details(
                Code::ResourceExhausted,
                message,
                ErrorDetails::with_retry_info(Some(retry_after)),
            ),
            ControlError::DatabaseUnavailable(detail) => {
                let id = correlation_id();
                crate::store::outage_log(|| {
                    tracing::error!(error.id = %id, error = %detail, "request failed: database unavailable");
                });
                Status::unavailable(format!(
                    "database unavailable (error id {id}); try again later"
                ))
            }
            ControlError::Internal(detail) => {
                let id = correlation_id();
                tracing::error!(error.id = %id, error = %detail, "internal error");
                Status::internal(format!("internal error (error id {id})"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_detail_stays_in_the_log() {
        let status = Status::from(ControlError::Internal(
            "UPDATE devices SET secret = 'x' failed: disk I/O error".into(),
        ));
        assert_eq!(status.code(), Code::Internal);
        assert!(status.message().starts_with("internal error (error id "));
        assert!(
            !status.message().contains("devices"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn database_outage_names_the_database_without_its_error() {
        let status = Status::from(ControlError::DatabaseUnavailable(
            "could not connect to server at 10.1.2.3:5432 as user flotilla".into(),
        ));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("database unavailable"));
        assert!(
            !status.message().contains("10.1.2.3"),
            "{}",
            status.message()
        );
    }
}
