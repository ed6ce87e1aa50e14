//! Error types of the library. The API layer maps [`Error::kind`] to wire codes in
//! one place; nothing below it knows about gRPC.

use std::{io, path::PathBuf};

use nix::errno::Errno;

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
    /// The object is open or in use; retrying later may succeed.
    Busy,
    /// The environment lacks something (device-mapper, a target module).
    Unavailable,
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
