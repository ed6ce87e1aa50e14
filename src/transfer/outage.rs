//! A move's NVMe/TCP source going away and coming back. While the kernel
//! reconnects by itself, the transfer is DEGRADED and background copying
//! stops (a failed copy is retried at once, so a fail-fast source would spin
//! a kernel worker); once the kernel has given up on the connection
//! (`ctrl_loss_tmo`), the agent connects again itself and puts the new
//! namespace under the clone. Regions already copied never touch the source.

use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::hydrate::Transfers;
use crate::{
    error::AgentError,
    nvme::{Link, Nqn},
    store::{SourceRecord, TransferPhase, TransferRecord},
};

/// The least time between two connects of the agent's own to a lost
/// source: the kernel's own reconnect delay.
const RECONNECT_EVERY: Duration = Duration::from_secs(2);

/// How long a connection seen live is taken as live without looking again:
/// a rate-limited transfer is looked at every few milliseconds, and each
/// look at the connection reads every NVMe controller's attributes.
const LIVE_FOR: Duration = Duration::from_millis(500);

/// What one monitor remembers of its transfer's source between looks.
#[derive(Debug, Default)]
pub(super) struct SourceWatch {
    down: bool,
    last_connect: Option<Instant>,
    seen_live: Option<Instant>,
}

/// The source's state as the monitor acts on it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum SourceHealth {
    /// Reachable (or a local device, or not hydrating).
    Reachable,
    /// Unreachable: copying stops, the transfer is DEGRADED for `reason`.
    Down { reason: String },
    /// The agent connected again and reloaded the clone over the new
    /// namespace: the table's own copy settings are back in force.
    Reattached,
}

impl Transfers {
    /// Looks at the connection to the transfer's source and, when the
    /// kernel has given up on it, connects again (at most every
    /// [`RECONNECT_EVERY`]).
    pub(super) async fn check_source(
        &self,
        transfer: &TransferRecord,
        watch: &mut SourceWatch,
    ) -> SourceHealth {
        let SourceRecord::NvmeTcp {
            subsystem_nqn,
            address,
            port,
            ..
        } = &transfer.source
        else {
            return SourceHealth::Reachable;
        };
        if transfer.phase != TransferPhase::Hydrating {
            return SourceHealth::Reachable;
        }
        let now = Instant::now();
        if watch
            .seen_live
            .is_some_and(|at| now.duration_since(at) < LIVE_FOR)
        {
            return SourceHealth::Reachable;
        }
        let link = match Nqn::parse("subsystem_nqn", subsystem_nqn) {
            Ok(nqn) => self.ctx.fabric.link(&nqn).await,
            Err(err) => Err(err),
        };
        let source = format!("{address}:{port}");
        // Reasons stay the same while the outage lasts: a change is logged.
        let health = match link {
            Ok(Link::Live) => SourceHealth::Reachable,
            Ok(Link::Interrupted { state }) => SourceHealth::Down {
                reason: format!(
                    "the connection to the source {source} is {state}: background copying is \
                     stopped and reads of regions not yet copied {}; regions already copied are \
                     unaffected; the kernel reconnects every 2 s",
                    self.waiting_reads()
                ),
            },
            Ok(Link::Lost) => match self.reconnect(transfer, watch, now).await {
                Ok(true) => SourceHealth::Reattached,
                Ok(false) => SourceHealth::Down {
                    reason: lost(&source, "the agent connects again"),
                },
                Err(err) => SourceHealth::Down {
                    reason: lost(
                        &source,
                        &format!("connecting again failed ({err}); the agent retries"),
                    ),
                },
            },
            Err(err) => SourceHealth::Down {
                reason: format!("cannot see the connection to the source {source}: {err}"),
            },
        };
        watch.seen_live = (health == SourceHealth::Reachable).then_some(now);
        let down = matches!(health, SourceHealth::Down { .. });
        if watch.down && !down {
            info!(transfer = %transfer.id, %source, "the source answers again");
        }
        watch.down = down;
        health
    }

    /// What a guest's read of a region not yet copied does meanwhile.
    fn waiting_reads(&self) -> String {
        let nvme = &self.ctx.settings.nvme;
        match nvme.fast_io_fail_timeout_seconds {
            Some(seconds) => format!("wait up to {seconds} s, then fail"),
            None => format!("wait up to {} s, then fail", nvme.ctrl_loss_timeout_seconds),
        }
    }

    /// Connects to the source again and reloads the clone over the new
    /// namespace, under the volume's lock. `Ok(false)`: not yet time to try.
    async fn reconnect(
        &self,
        transfer: &TransferRecord,
        watch: &mut SourceWatch,
        now: Instant,
    ) -> Result<bool, AgentError> {
        if watch
            .last_connect
            .is_some_and(|at| now.duration_since(at) < RECONNECT_EVERY)
        {
            return Ok(false);
        }
        watch.last_connect = Some(now);
        let _held = self.ctx.locks.lock(&transfer.volume_id).await;
        let (Some(volume), Some(current)) = (
            self.ctx.record(&transfer.volume_id).await?,
            self.ctx.transfer_record(&transfer.id).await?,
        ) else {
            return Ok(false);
        };
        if current.phase != TransferPhase::Hydrating {
            return Ok(false);
        }
        self.ctx.reload_arriving(&volume, &current).await?;
        warn!(transfer = %transfer.id, "connected to the source again; the clone reads through the new connection");
        Ok(true)
    }
}

fn lost(source: &str, retrying: &str) -> String {
    format!(
        "the source {source} is unreachable and the kernel gave up on the connection: reads of \
         regions not yet copied fail until it answers; {retrying} every {} s",
        RECONNECT_EVERY.as_secs()
    )
}
