//! The one place where library errors become gRPC statuses.
//!
//! Codes follow what a caller can do about the error: fix the request
//! (INVALID_ARGUMENT), accept the state (NOT_FOUND, ALREADY_EXISTS), change the
//! state first (FAILED_PRECONDITION), wait for space (RESOURCE_EXHAUSTED) or
//! retry later (UNAVAILABLE). Anything unexpected is INTERNAL, never a
//! caller's mistake.

use tonic::{Code, Status};

use crate::error::{AgentError, ErrorKind};

pub fn status_of(err: &AgentError) -> Status {
    Status::new(code_of(err.kind()), err.to_string())
}

pub fn code_of(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::Busy | ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Unimplemented => Code::Unimplemented,
        ErrorKind::Internal => Code::Internal,
    }
}

/// The name a call's code carries in metrics: the code's Rust name, as
/// the labels have always read (`Ok`, `AlreadyExists`); written out so
/// that dashboards do not depend on tonic's Debug output.
pub fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "Ok",
        Code::Cancelled => "Cancelled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_labels_keep_the_code_names() {
        for value in 0..=16 {
            let code = Code::from_i32(value);
            assert_eq!(code_label(code), format!("{code:?}"), "code {value}");
        }
    }

    #[test]
    fn each_error_class_has_its_own_code() {
        let cases = [
            (
                AgentError::InvalidArgument {
                    field: "size_bytes",
                    reason: "must be greater than zero".into(),
                },
                Code::InvalidArgument,
            ),
            (
                AgentError::NotFound {
                    what: "volume",
                    id: "x".into(),
                },
                Code::NotFound,
            ),
            (
                AgentError::AlreadyExists {
                    what: "volume",
                    id: "x".into(),
                    detail: "with size 1".into(),
                },
                Code::AlreadyExists,
            ),
            (
                AgentError::FailedPrecondition("published".into()),
                Code::FailedPrecondition,
            ),
            (
                AgentError::Conflict("table".into()),
                Code::FailedPrecondition,
            ),
            (
                AgentError::ResourceExhausted {
                    reason: "full".into(),
                },
                Code::ResourceExhausted,
            ),
            (
                AgentError::Unavailable {
                    reason: "no dm".into(),
                },
                Code::Unavailable,
            ),
            (
                AgentError::Unimplemented("snapshots".into()),
                Code::Unimplemented,
            ),
            (AgentError::Internal("bug".into()), Code::Internal),
        ];
        for (err, code) in cases {
            let status = status_of(&err);
            assert_eq!(status.code(), code, "{err}");
            assert_eq!(status.message(), err.to_string());
        }
    }
}
