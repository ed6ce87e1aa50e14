//! The one place where library errors become gRPC statuses.
//!
//! Codes follow what a caller can do about the error: fix the request
//! (INVALID_ARGUMENT), accept the state (NOT_FOUND, ALREADY_EXISTS), change the
//! state first (FAILED_PRECONDITION), wait for space (RESOURCE_EXHAUSTED) or
//! retry later (UNAVAILABLE). Anything unexpected is INTERNAL, never a
//! caller's mistake.
//!
//! A refusal (FAILED_PRECONDITION because of an object's state) also carries
//! a `google.rpc.ErrorInfo` in the standard `grpc-status-details-bin`
//! trailer: `reason` is the refusal's stable code, `domain` is
//! [`ERROR_DOMAIN`], `metadata` names the ids involved. Programs act on the
//! reason, never on the message.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::{AgentError, ErrorKind, Refusal};

/// The `ErrorInfo.domain` of every reason this agent sends.
pub const ERROR_DOMAIN: &str = "dmclone.v1";

pub fn status_of(err: &AgentError) -> Status {
    let code = code_of(err.kind());
    match err {
        AgentError::Refused(refusal) => {
            Status::with_error_details(code, err.to_string(), error_details_of(refusal))
        }
        _ => Status::new(code, err.to_string()),
    }
}

fn error_details_of(refusal: &Refusal) -> ErrorDetails {
    let metadata: HashMap<String, String> = refusal
        .metadata()
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect();
    ErrorDetails::with_error_info(refusal.reason(), ERROR_DOMAIN, metadata)
}

/// The refusal reason a status carries: `ErrorInfo.reason` of our domain, if
/// the status has one (agents before reasons sent none).
pub fn reason_of(status: &Status) -> Option<String> {
    status
        .get_details_error_info()
        .filter(|info| info.domain == ERROR_DOMAIN)
        .map(|info| info.reason)
}

pub fn code_of(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::PermissionDenied => Code::PermissionDenied,
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
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::ids::VolumeId;

    const VOLUME: &str = "0b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11";

    fn volume() -> VolumeId {
        VolumeId::parse(VOLUME).unwrap()
    }

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
                AgentError::Refused(Refusal::VolumeBeingCreated { volume: volume() }),
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
                AgentError::PermissionDenied {
                    reason: "wrong release token".into(),
                },
                Code::PermissionDenied,
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

    #[test]
    fn a_refusal_carries_its_reason_and_ids_as_error_info() {
        let refusal = Refusal::VolumeArriving {
            volume: volume(),
            transfer: crate::ids::TransferId::parse("7c0e4a52-1d3b-4c1e-8f00-2b6a7f1d9e01")
                .unwrap(),
            hint: "abort the transfer to remove it",
        };
        let err = AgentError::from(refusal.clone());
        let status = status_of(&err);
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(status.message(), refusal.to_string());

        // What a client gets: the status decoded from its wire form.
        let received = Status::from_header_map(status.clone().into_http::<()>().headers())
            .expect("a status in the headers");
        assert_eq!(received.code(), Code::FailedPrecondition);
        let info = received
            .get_details_error_info()
            .expect("an ErrorInfo detail");
        assert_eq!(info.reason, "VOLUME_ARRIVING");
        assert_eq!(info.domain, "dmclone.v1");
        assert_eq!(
            info.metadata,
            HashMap::from([
                ("volume_id".to_owned(), VOLUME.to_owned()),
                (
                    "transfer_id".to_owned(),
                    "7c0e4a52-1d3b-4c1e-8f00-2b6a7f1d9e01".to_owned()
                ),
            ])
        );
        assert_eq!(reason_of(&received).as_deref(), Some("VOLUME_ARRIVING"));
    }

    #[test]
    fn other_errors_carry_no_details() {
        for err in [
            AgentError::Conflict("table".into()),
            AgentError::NotFound {
                what: "volume",
                id: VOLUME.into(),
            },
            AgentError::Internal("bug".into()),
        ] {
            let status = status_of(&err);
            assert!(status.details().is_empty(), "{err}");
            assert!(status.get_details_error_info().is_none(), "{err}");
            assert_eq!(reason_of(&status), None, "{err}");
        }
    }

    #[test]
    fn reasons_of_another_domain_are_not_ours() {
        let status = Status::with_error_details(
            Code::FailedPrecondition,
            "someone else's",
            ErrorDetails::with_error_info("VOLUME_PUBLISHED", "example.com", HashMap::new()),
        );
        assert_eq!(reason_of(&status), None);
    }
}
