//! Error types of the library. The API layer maps [`Error::kind`] to wire codes in
//! one place; nothing below it knows about gRPC.

use std::{io, path::PathBuf};

use nix::errno::Errno;

pub use crate::refusal::Refusal;

/// A line of kernel or user text that does not have the expected shape.
///
/// The message quotes the input so that an operator can see exactly what the
/// kernel (or a caller) produced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot parse {what} from {input:?}: {reason}")]
pub struct ParseError {
    /// What was being parsed, e.g. "clone status".
    pub what: &'static str,
    /// The offending input, verbatim.
    pub input: String,
    /// Why it was rejected.
    pub reason: String,
}

impl ParseError {
    pub fn new(what: &'static str, input: &str, reason: impl Into<String>) -> Self {
        Self {
            what,
            input: input.to_owned(),
            reason: reason.into(),
        }
    }
}

/// Coarse classes of failure, the only thing the API layer needs to pick a code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller's input is wrong; retrying the same call cannot succeed.
    InvalidArgument,
    /// The named object does not exist.
    NotFound,
    /// An object with this id exists and differs from the request.
    AlreadyExists,
    /// The object's state forbids the call; change the state first.
    FailedPrecondition,
    /// The caller proved no right to this object (a secret it lacks).
    PermissionDenied,
    /// No room: the pool is (nearly) full.
    ResourceExhausted,
    /// The object is open or in use; retrying later may succeed.
    Busy,
    /// The environment lacks something (device-mapper, a target module).
    Unavailable,
    /// The agent does not do this yet.
    Unimplemented,
    /// Anything else: a kernel or I/O failure we did not expect.
    Internal,
}

/// Errors of the device-mapper layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "device-mapper is not available on this host ({reason}); load dm-mod and the dm-clone, dm-era and dm-thin-pool modules"
    )]
    DmUnavailable { reason: String },

    #[error("device-mapper {op} on {device:?} failed: {errno} ({detail})")]
    Ioctl {
        op: &'static str,
        device: String,
        errno: Errno,
        detail: String,
    },

    #[error(
        "loading a table into {device:?} failed: {errno}; the kernel log has the target's reason. Table:\n{table}"
    )]
    TableLoad {
        device: String,
        errno: Errno,
        table: String,
    },

    #[error("device-mapper device {device:?} does not exist")]
    NoSuchDevice { device: String },

    #[error(
        "device-mapper device {device:?} is busy (open count {open_count}); close its users first"
    )]
    DeviceBusy { device: String, open_count: i32 },

    #[error("invalid device-mapper table: {0}")]
    InvalidTable(String),

    #[error("invalid device-mapper name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },

    #[error(transparent)]
    Parse(#[from] ParseError),

    #[error("{context} {path:?}: {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("device-mapper call failed: {0}")]
    Other(String),
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::DmUnavailable { .. } => ErrorKind::Unavailable,
            Error::NoSuchDevice { .. } => ErrorKind::NotFound,
            Error::DeviceBusy { .. } => ErrorKind::Busy,
            Error::InvalidTable(_) | Error::InvalidName { .. } => ErrorKind::InvalidArgument,
            Error::Ioctl { errno, .. } | Error::TableLoad { errno, .. } => match errno {
                Errno::ENXIO | Errno::ENODEV => ErrorKind::NotFound,
                Errno::EBUSY => ErrorKind::Busy,
                _ => ErrorKind::Internal,
            },
            Error::Parse(_) | Error::Io { .. } | Error::Other(_) => ErrorKind::Internal,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<crate::ids::InvalidId> for AgentError {
    fn from(err: crate::ids::InvalidId) -> Self {
        AgentError::InvalidArgument {
            field: err.field,
            reason: err.reason,
        }
    }
}

/// Errors of the agent: what the API reports to callers. Each variant is one
/// class of [`ErrorKind`]; messages say what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },

    #[error("{what} {id} does not exist")]
    NotFound { what: &'static str, id: String },

    #[error("{what} {id} already exists {detail}")]
    AlreadyExists {
        what: &'static str,
        id: String,
        detail: String,
    },

    /// The object's state forbids the call; the refusal says which state
    /// and carries a stable reason code.
    #[error(transparent)]
    Refused(#[from] Refusal),

    /// The kernel has something other than what the store says; the agent
    /// does not overwrite it on its own.
    #[error("the kernel disagrees with the agent's state: {0}")]
    Conflict(String),

    #[error("{reason}")]
    ResourceExhausted { reason: String },

    /// The caller lacks what the object requires of it (a release token).
    #[error("{reason}")]
    PermissionDenied { reason: String },

    #[error("{reason}")]
    Unavailable { reason: String },

    #[error("{0}")]
    Unimplemented(String),

    #[error("configuration: {option}: {reason}")]
    Config { option: String, reason: String },

    #[error("state store {path:?}: {reason}")]
    Store { path: PathBuf, reason: String },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    #[error(transparent)]
    Dm(#[from] Error),

    #[error("internal error: {0}")]
    Internal(String),
}

impl AgentError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            AgentError::InvalidArgument { .. } => ErrorKind::InvalidArgument,
            AgentError::NotFound { .. } => ErrorKind::NotFound,
            AgentError::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            AgentError::Refused(_) | AgentError::Conflict(_) => ErrorKind::FailedPrecondition,
            AgentError::ResourceExhausted { .. } => ErrorKind::ResourceExhausted,
            AgentError::PermissionDenied { .. } => ErrorKind::PermissionDenied,
            AgentError::Unavailable { .. } => ErrorKind::Unavailable,
            AgentError::Unimplemented(_) => ErrorKind::Unimplemented,
            // Below the API, a caller never hands us tables, names or
            // devices: a dm error about them is ours, not the caller's.
            AgentError::Dm(err) => match err.kind() {
                ErrorKind::Unavailable | ErrorKind::Busy => ErrorKind::Unavailable,
                _ => ErrorKind::Internal,
            },
            AgentError::Config { .. }
            | AgentError::Store { .. }
            | AgentError::Io { .. }
            | AgentError::Internal(_) => ErrorKind::Internal,
        }
    }
}
