//! Real-kernel tier: every test here drives device-mapper in a booted Linux
//! kernel with dm-clone, dm-era and dm-thin-pool. `tests/run-all` runs this
//! binary inside a guest; on a host without device-mapper each test fails.
#![allow(clippy::unwrap_used)]

mod support;

// The agent's tests talk to it over gRPC: tonic and the generated clients
// are their vocabulary (clippy.toml keeps them out of the library's domain).
#[allow(clippy::disallowed_types)]
mod agent;
mod clone;
mod devices;
mod era;
mod errors;
mod events;
mod nvme;
mod targets;
mod thin;
