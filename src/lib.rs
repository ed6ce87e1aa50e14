//! dmclone: the library behind the per-hypervisor storage agent.
//!
//! Everything physical happens in the kernel: thin pools hold volumes, dm-clone
//! presents a remote volume locally and copies it in the background, dm-era tracks
//! changed blocks. This crate keeps the kernel boundary thin: [`dm::table`] and
//! [`dm::status`] are pure text rendering and parsing, [`dm::kernel`] is the only
//! module that performs device-mapper ioctls.

pub mod agent;
pub mod aligned;
// The gRPC layer: the one place, with client.rs, that may name tonic and the
// generated code (clippy.toml keeps them out of everything else).
#[allow(clippy::disallowed_types)]
pub mod api;
pub mod changes;
#[allow(clippy::disallowed_types)] // connections to agents: tonic's transport
pub mod client;
pub mod config;
pub mod context;
pub mod dm;
pub mod error;
pub mod failpoint;
pub mod ids;
pub mod locks;
pub mod metrics;
pub mod nvme;
pub mod pool;
mod reconcile;
mod records;
pub mod refusal;
pub mod snapshot;
pub mod stack;
pub mod store;
#[cfg(test)]
mod testing;
pub mod transfer;
pub mod units;
pub mod volume;

pub use error::{AgentError, Error, ParseError};
pub use refusal::Refusal;
