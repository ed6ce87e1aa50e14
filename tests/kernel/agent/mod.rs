//! The agent as a process: its gRPC API against the real kernel, crash
//! recovery, mutual TLS.

pub mod fixture;

mod api;
mod cancel;
mod cancel_moves;
mod chain;
mod changes;
mod cli;
mod crash;
mod moves;
mod observability;
mod outage;
mod reboot;
mod return_trip;
mod scale;
mod snapshots;
mod tls;
mod transfer;
mod travel;
mod warm;
