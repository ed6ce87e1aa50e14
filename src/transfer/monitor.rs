//! One task per running transfer: it sleeps on the clone device's dm event
//! (with a short tick for progress, shorter still close to the end), keeps
//! the progress and rate, notices a stalled or failing clone, applies a
//! bytes-per-second limit, and finalizes the moment the kernel reports every
//! region hydrated.

use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{
    hydrate::{TICK, Transfers},
    outage::{SourceHealth, SourceWatch},
};

use crate::{
    context::Context,
    dm::{
        Kernel,
        status::{CloneMode, CloneStatus, Health},
    },
    error::AgentError,
    failpoint,
    ids::TransferId,
    stack::{self, SwapOutcome},
    store::{Change, TransferPhase, TransferRecord, VolumeRecord},
};

/// What the monitor does after one look at the clone.
enum Next {
    Wait,
    Finalize,
    Stop,
}

/// What one monitor carries from one look to the next.
#[derive(Debug, Default)]
struct Watch {
    limiter: RateLimiter,
    pace: Pace,
    /// The clone's hydrated bytes when it last spent from the host budget;
    /// `None` until the first look of a monitor that took over a transfer
    /// started earlier (after a restart), whose past copies are not charged.
    host_seen: Option<u64>,
    events: EventSource,
    source: SourceWatch,
    gate: CopyGate,
}

/// Background copying stops (threshold 0) while the byte budget is
/// overdrawn, the source is unreachable or the volume moves on from here,
/// and starts again when none holds. What the clone copies at is read from
/// its status at every look, never remembered: a table loaded again (a
/// resize, a new namespace of the source, an agent's restart) copies at what
/// it was built with, and a message the kernel refused is simply told again.
#[derive(Debug, Default)]
struct CopyGate {
    over_budget: bool,
    source_down: bool,
    moving_on: bool,
}

impl CopyGate {
    fn closed(&self) -> bool {
        self.over_budget || self.source_down || self.moving_on
    }

    /// The messages that bring a clone copying at threshold `live` to the
    /// gate's word, copying at `threshold` and `batch` when open.
    fn messages(&self, live: u32, threshold: u32, batch: u32) -> Vec<String> {
        let tell = |n: u32| format!("hydration_threshold {n}");
        match (self.closed(), live) {
            (true, 0) => vec![],
            (true, _) => vec![tell(0)],
            (false, live) if live == threshold => vec![],
            (false, 0) => vec![format!("hydration_batch_size {batch}"), tell(threshold)],
            (false, _) => vec![tell(threshold)],
        }
    }
}

impl Watch {
    /// `copying_from_zero`: the clone was just built to hydrate, so every
    /// byte it copies, also before the first look, spends from the limits.
    fn new(copying_from_zero: bool) -> Self {
        Self {
            host_seen: copying_from_zero.then_some(0),
            ..Self::default()
        }
    }
}

impl Transfers {
    /// Watches a transfer to its end. `copying_from_zero`: its clone was
    /// just built and hydrates at once (not a deferred start, nor a
    /// transfer taken over after a restart).
    pub(crate) fn spawn_monitor(&self, transfer_id: TransferId, copying_from_zero: bool) {
        let transfers = self.clone();
        self.ctx.background.spawn(async move {
            if let Err(err) = transfers.monitor(&transfer_id, copying_from_zero).await {
                warn!(transfer = %transfer_id, error = %err, "transfer monitor stopped");
                transfers.ctx.registry.with_live(&transfer_id, |live| {
                    live.degraded =
                        Some(format!("the agent stopped watching this transfer: {err}"));
                    live.copying = false;
                });
            }
        });
    }

    async fn monitor(&self, id: &TransferId, copying_from_zero: bool) -> Result<(), AgentError> {
        let mut watch = Watch::new(copying_from_zero);
        loop {
            let Some(transfer) = self.ctx.transfer_record(id).await? else {
                self.ctx.registry.forget(id);
                return Ok(());
            };
            // dm-clone signals on the device that carries it.
            let clone = self.ctx.clone_device(&transfer);
            let seen = self.ctx.dm.event_counter(&clone).unwrap_or(0);
            match self.look(&transfer, &mut watch).await? {
                Next::Stop => return Ok(()),
                Next::Finalize => {
                    if self.finalize(id).await? {
                        return Ok(());
                    }
                }
                Next::Wait => {}
            }
            // A byte budget needs a close look; otherwise the kernel's event
            // wakes us and the tick only refreshes progress.
            let tick = if self.ctx.byte_limit(&transfer, 0) > 0 {
                LIMITED_TICK
            } else {
                TICK
            };
            let (wake, tick) = self.ctx.registry.with_live(id, |live| {
                (live.wake.clone(), live.progress.next_look(tick))
            });
            let waited = wait_for_change(self.ctx.dm.as_ref(), &clone, seen, &wake, tick).await;
            if let Some(pause) = watch.events.after_wait(waited, tick) {
                // The wait ended at once: look again only after a pause.
                tokio::select! {
                    () = wake.notified() => {}
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
    }

    /// Reads the clone's status once and decides what comes next.
    async fn look(&self, transfer: &TransferRecord, watch: &mut Watch) -> Result<Next, AgentError> {
        match transfer.phase {
            TransferPhase::Finalizing => return Ok(Next::Finalize),
            phase if phase.is_finished() => return Ok(Next::Stop),
            TransferPhase::Starting => return Ok(Next::Wait),
            _ => {}
        }
        let source = self.check_source(transfer, &mut watch.source).await;
        let clone = self.ctx.clone_device(transfer);
        let moving_on = self.moving_on(transfer).await?;
        let now = Instant::now();
        let status = match self
            .ctx
            .dm
            .status_of::<Health<CloneStatus>>(&clone, 0)
            .await
        {
            Ok(Health::Running(status)) => status,
            Ok(other) => {
                self.set_degraded(transfer, Some(format!(
                    "the clone's metadata reports {other}: the kernel stopped this clone; an operator must repair its metadata"
                )));
                return Ok(Next::Wait);
            }
            Err(err) => {
                // After a reboot the stack may not have come back (its source
                // was unreachable at start): build it again until it does.
                let reason = match self.rebuild(transfer).await {
                    Ok(()) => None,
                    Err(rebuild) => Some(format!(
                        "cannot read the clone's status ({err}) nor bring its devices back ({rebuild}); retrying"
                    )),
                };
                self.set_degraded(transfer, reason);
                return Ok(Next::Wait);
            }
        };
        let stall_limit = Duration::from_secs(self.ctx.settings.transfer.stall_seconds);
        let stalled = self.ctx.registry.with_live(&transfer.id, |live| {
            live.progress
                .observe(now, status.hydrated_regions, status.total_regions);
            if status.is_fully_hydrated()
                && transfer.phase != TransferPhase::Deferred
                && live.completed_at.is_none()
            {
                live.completed_at = Some(now);
            }
            live.copying = transfer.phase == TransferPhase::Hydrating
                && !status.is_fully_hydrated()
                && moving_on.is_none();
            if !live.copying {
                live.progress.not_stalled(now);
            }
            live.note.clone_from(&moving_on);
            live.progress.stalled_for(now)
        });
        let degraded = if let SourceHealth::Down { reason } = &source {
            Some(reason.clone())
        } else if status.mode == CloneMode::ReadOnly {
            Some("the clone's metadata went read-only (a metadata write failed); hydrated regions still work, the rest needs repair".to_owned())
        } else if transfer.phase == TransferPhase::Hydrating
            && !status.is_fully_hydrated()
            && moving_on.is_none()
            && stalled >= stall_limit
        {
            // The same words while the stall lasts: a change is logged.
            Some(format!(
                "no region copied for {} s or more: the source may be unreachable or failing, or the volume's own I/O leaves the copy no turn; hydration resumes by itself",
                stall_limit.as_secs()
            ))
        } else {
            watch.events.failure.as_ref().map(|failure| {
                format!(
                    "device-mapper events do not reach the agent ({failure}): the transfer is looked at every {} ms instead, so its end may be seen late",
                    watch.events.pause.as_millis()
                )
            })
        };
        self.set_degraded(transfer, degraded);
        let _ = self
            .ctx
            .registry
            .updates
            .send(self.ctx.transfer_view(transfer));
        // A deferred clone whose destination wrote (or discarded) every
        // region holds the whole volume, but only the commit says that the
        // source let go and the volume's home may change: it waits for it.
        if status.is_fully_hydrated()
            && status.mode == CloneMode::ReadWrite
            && transfer.phase != TransferPhase::Deferred
        {
            // The clone commits its metadata now rather than on its next
            // tick: its end is on disk (and signalled) before the swap.
            if let Err(err) = self.ctx.dm.flush(&clone).await {
                warn!(transfer = %transfer.id, error = %err, "cannot flush the finished clone; the swap's suspend commits it");
            }
            return Ok(Next::Finalize);
        }
        if transfer.phase == TransferPhase::Hydrating {
            watch.gate.source_down = matches!(source, SourceHealth::Down { .. });
            watch.gate.moving_on = moving_on.is_some();
            self.gate_copying(transfer, watch, &status).await;
        } else {
            // What is copied while paused or deferred (the copies in flight
            // at a pause, the regions writes touch) is no limit's to charge.
            let bytes = copied_bytes(transfer, &status);
            watch.limiter.seen = bytes;
            watch.host_seen = Some(bytes);
        }
        Ok(Next::Wait)
    }

    /// Why this copy waits, while the volume moves on from here: the host it
    /// is exported to has connected (claimed the export) and copies it,
    /// reading what this host lacks through it. This copy is dropped once
    /// that host holds every byte, so copying here would only halve the
    /// bandwidth that host gets; writes here still copy the regions they
    /// touch, and the copy resumes if that move is aborted.
    async fn moving_on(&self, transfer: &TransferRecord) -> Result<Option<String>, AgentError> {
        let Some(volume) = self.ctx.record(&transfer.volume_id).await? else {
            return Ok(None);
        };
        Ok(volume
            .export
            .filter(|e| e.serves_lower && e.for_transfer() && e.claim_deadline_unix.is_none())
            .map(|e| {
                format!(
                    "moving on: {} copies the volume through this host, so this copy waits (it \
                     is dropped once that host holds every byte)",
                    e.host_nqn
                )
            }))
    }

    /// Builds a transfer's stack again, under its volume's lock.
    async fn rebuild(&self, transfer: &TransferRecord) -> Result<(), AgentError> {
        let _held = self.ctx.locks.lock(&transfer.volume_id).await;
        // Read again under the lock: a call may have finished it meanwhile
        // (an abort, or a pass-on that tore the stack down).
        let Some(transfer) = self.ctx.transfer_record(&transfer.id).await? else {
            return Ok(());
        };
        let Some(volume) = self.ctx.record(&transfer.volume_id).await? else {
            return Ok(());
        };
        if transfer.phase.is_finished() {
            return Ok(());
        }
        self.ctx.rebuild_stack(&volume, &transfer).await
    }

    fn set_degraded(&self, transfer: &TransferRecord, reason: Option<String>) {
        let changed = self.ctx.registry.with_live(&transfer.id, |live| {
            let changed = live.degraded != reason;
            live.degraded = reason.clone();
            changed
        });
        if changed {
            match &reason {
                Some(reason) => warn!(transfer = %transfer.id, %reason, "transfer degraded"),
                None => info!(transfer = %transfer.id, "transfer no longer degraded"),
            }
        }
    }

    /// dm-clone has no rate limit of its own: the monitor stops background
    /// copies (threshold 0) while the transfer's own limit or the host's
    /// budget is overdrawn (see `RateLimiter`, `HostBudget`) or its source
    /// is unreachable, and restores the threshold once none holds. Writes
    /// still hydrate the regions they touch.
    async fn gate_copying(
        &self,
        transfer: &TransferRecord,
        watch: &mut Watch,
        status: &CloneStatus,
    ) {
        let now = Instant::now();
        let bytes = copied_bytes(transfer, status);
        let (own, region) = (own_knobs(transfer), transfer.region_bytes);
        let own_limit = transfer.max_bytes_per_second;
        let copying = status.hydration_threshold > 0;
        // Copies come in starts of up to `in_flight` regions: a bucket that
        // cannot hold two of them would hold copying back after every one.
        let (in_flight, _) = watch.pace.knobs(own, region, own_limit);
        watch.limiter.granule = 2 * region * u64::from(in_flight);
        if watch.host_seen.is_none() {
            watch.limiter.seen = bytes;
        }
        watch.limiter.step(now, bytes, own_limit);
        let unspent = watch.limiter.take_unspent();
        if copying {
            watch.pace.widen(own, region, own_limit, unspent);
        }
        let copied = bytes.saturating_sub(watch.host_seen.replace(bytes).unwrap_or(bytes));
        let host = self.ctx.registry.spend_budget(Spending {
            now,
            copied,
            budget: self.ctx.settings.transfer.max_bytes_per_second,
            own,
            region,
            copying,
        });
        watch.gate.over_budget = watch.limiter.holding || host.holding;
        let (threshold, batch) = tighter(watch.pace.knobs(own, region, own_limit), host.knobs);
        for message in watch
            .gate
            .messages(status.hydration_threshold, threshold, batch)
        {
            if let Err(err) = self.ctx.message_clone(transfer, &message).await {
                // The status at the next look says it was not taken.
                warn!(transfer = %transfer.id, error = %err, "cannot stop or restart background copying");
                return;
            }
        }
    }

    /// Switches the public device from the clone to the local thin device,
    /// with I/O held only for the swap. Returns whether the transfer is done;
    /// `false` means hydration turned out incomplete and continues.
    pub(crate) async fn finalize(&self, id: &TransferId) -> Result<bool, AgentError> {
        let Some(transfer) = self.ctx.transfer_record(id).await? else {
            return Ok(true);
        };
        let _held = self.ctx.locks.lock(&transfer.volume_id).await;
        // Read again under the lock: a call may have changed it meanwhile.
        let Some(mut transfer) = self.ctx.transfer_record(id).await? else {
            return Ok(true);
        };
        if transfer.phase.is_finished() {
            return Ok(true);
        }
        let volume_id = transfer.volume_id.clone();
        let Some(mut volume) = self.ctx.record(&volume_id).await? else {
            return Err(AgentError::Internal(format!(
                "transfer {id} has no volume record"
            )));
        };
        if transfer.phase != TransferPhase::Finalizing {
            transfer.phase = TransferPhase::Finalizing;
            self.ctx.put_transfer(&transfer).await?;
        }
        failpoint::hit("finalize.after_record");
        let public = self.ctx.naming.public(&volume_id);
        if !transfer.switched_local {
            if self.ctx.clone_is_live(&transfer).await?
                && !self.swap_to_local(&volume, &mut transfer).await?
            {
                transfer.phase = TransferPhase::Hydrating;
                self.ctx.put_transfer(&transfer).await?;
                return Ok(false);
            }
            // The public device is local from here, recorded or not.
            failpoint::hit("finalize.after_resume");
            transfer.switched_local = true;
            self.ctx.put_transfer(&transfer).await?;
        }
        failpoint::hit("finalize.after_swap");
        self.ctx
            .note_history_start(
                &mut volume,
                &crate::changes::EraDevice::public(public.clone()),
            )
            .await?;
        // The clone's metadata goes while the source is let go: the two
        // are independent, and the transfer is done only after both.
        let metadata = self.ctx.metadata_name(&volume);
        let (dropped, ()) = tokio::join!(
            async {
                self.ctx.remove_device_if_present(&metadata).await?;
                self.ctx.pool.delete_thin(transfer.metadata_thin_id).await
            },
            self.ctx.detach_source(&transfer.source),
        );
        dropped?;
        transfer.phase = TransferPhase::Done;
        transfer.finished_unix = Some(crate::records::unix_now());
        if transfer.message.is_empty() {
            transfer.message = "hydrated and switched to the local copy".into();
        }
        volume.transfer = None;
        self.ctx.commit_pair(&volume, &transfer).await?;
        self.ctx.registry.forget(id);
        if let Err(err) = self.ctx.withdraw_unpublished(volume).await {
            // The transfer is done; the next reconcile removes the device.
            warn!(transfer = %transfer.id, error = %err, "cannot withdraw the unpublished device");
        }
        let seconds = |micros: Option<u64>| micros.map(|m| m as f64 / 1e6);
        self.ctx.metrics.finalized(
            seconds(transfer.done_to_finalized_micros),
            seconds(transfer.finalize_pause_micros),
        );
        self.after_arrival(&transfer).await;
        info!(
            transfer = %transfer.id,
            volume = %volume_id,
            device = %public,
            pause_micros = transfer.finalize_pause_micros.unwrap_or(0),
            done_to_finalized_micros = transfer.done_to_finalized_micros.unwrap_or(0),
            "transfer finalized: the volume is local"
        );
        Ok(true)
    }

    /// Switches the clone's device to the local copy while the clone is
    /// complete, through the one swap routine (see [`stack::swap_under_io`]):
    /// the local table is loaded beside the clone, and the clone's
    /// completeness is checked while suspended. An incomplete clone resumes
    /// unchanged. Beneath dm-era the local table is the volume's thin device
    /// (its thin id activated a second time), so dm-era is not touched;
    /// otherwise the public device's own local table (its dm-era opens its
    /// metadata outside the pause) replaces the clone.
    async fn swap_to_local(
        &self,
        volume: &VolumeRecord,
        transfer: &mut TransferRecord,
    ) -> Result<bool, AgentError> {
        let clone = self.ctx.clone_device(transfer);
        let local = if transfer.era_above {
            self.ctx
                .pool
                .thin_table(volume.thin_id, volume.size_bytes)?
        } else {
            let destination = self.ctx.ensure_thin_device(volume).await?;
            self.ctx.local_table(volume, destination).await?
        };
        let outcome =
            stack::swap_under_io(self.ctx.dm.as_ref(), &clone, &local, stack::clone_ready).await?;
        let SwapOutcome::Swapped(timings) = outcome else {
            warn!(transfer = %transfer.id, "finalize found regions still to copy; hydration continues");
            return Ok(false);
        };
        let completed_at = self
            .ctx
            .registry
            .with_live(&transfer.id, |live| live.completed_at);
        transfer.finalize_pause_micros = Some(timings.pause().as_micros() as u64);
        transfer.done_to_finalized_micros = completed_at.map(|at| at.elapsed().as_micros() as u64);
        Ok(true)
    }

    /// Restarts the monitors of unfinished transfers after reconciliation.
    pub(crate) fn resume_monitors(&self, transfers: &[TransferRecord]) {
        for transfer in transfers {
            if !transfer.phase.is_finished() {
                self.spawn_monitor(transfer.id.clone(), false);
                self.spawn_claim(transfer);
            } else if transfer.phase == TransferPhase::Done {
                let (transfers, transfer) = (self.clone(), transfer.clone());
                self.ctx
                    .background
                    .spawn(async move { transfers.after_arrival(&transfer).await });
            } else if transfer.phase == TransferPhase::Aborted {
                self.spawn_withdraw(transfer);
            }
        }
    }

    /// Clears a finished transfer from its volume (used by reconciliation).
    pub(crate) async fn detach_finished(&self, volume: &VolumeRecord) -> Result<(), AgentError> {
        let mut volume = volume.clone();
        volume.transfer = None;
        self.ctx
            .store_call(move |store| store.commit(vec![Change::put(&volume)?]))
            .await
    }
}

/// Sleeps until the device's event counter moves, a call wakes the monitor,
/// or the progress tick passes. An error means the wait could not begin.
async fn wait_for_change(
    events: &dyn Kernel,
    public: &crate::dm::names::DeviceName,
    seen: u32,
    wake: &tokio::sync::Notify,
    tick: Duration,
) -> Result<(), crate::Error> {
    tokio::select! {
        waited = events.wait_for_event(public, seen) => waited.map(drop),
        () = wake.notified() => Ok(()),
        () = tokio::time::sleep(tick) => Ok(()),
    }
}

/// Whether the kernel's events reach the monitor. A wait that fails returns
/// at once, so the monitor would spin; it pauses instead, longer each time
/// up to [`MAX_EVENTLESS_PAUSE`], and says why while the failure lasts.
#[derive(Debug, Default)]
struct EventSource {
    failure: Option<String>,
    pause: Duration,
}

/// The longest a monitor without events waits between two looks: the delay
/// with which it may see a transfer's end.
const MAX_EVENTLESS_PAUSE: Duration = Duration::from_secs(5);

impl EventSource {
    /// Takes in how the last wait ended; returns the pause before the next
    /// look when the wait failed.
    fn after_wait(&mut self, waited: Result<(), crate::Error>, tick: Duration) -> Option<Duration> {
        match waited {
            Ok(()) => {
                self.failure = None;
                self.pause = Duration::ZERO;
                None
            }
            // A device the event monitor has not listed yet (it lists them
            // at the next event of any device) or that is gone (a rebuild's
            // business, which the look reports): look again after the tick,
            // as often as with events, or a byte limit would be enforced
            // seconds late.
            Err(crate::Error::NoSuchDevice { .. }) => {
                self.failure = None;
                self.pause = Duration::ZERO;
                Some(tick)
            }
            // Only a failing event source is this one's.
            Err(err) => {
                self.failure = Some(err.to_string());
                self.pause = (self.pause * 2).clamp(tick, MAX_EVENTLESS_PAUSE);
                Some(self.pause)
            }
        }
    }
}

/// What the clone has copied: its hydrated regions less those a return
/// trip marked held without copying, which no limit is to charge.
fn copied_bytes(transfer: &TransferRecord, status: &CloneStatus) -> u64 {
    (status.hydrated_regions * transfer.region_bytes).saturating_sub(transfer.skipped_bytes())
}

/// How many regions a rate-limited transfer keeps in flight. A start puts
/// at most a quarter second of its limit in flight (dm-clone cannot stop a
/// copy it began, so the bucket must repay what one start overshoots), but
/// one region at a time may copy slower than the limit when each takes long
/// (many transfers sharing one path): credit then goes unspent and the
/// transfer runs under its share. Each region's worth left unspent while
/// copying was allowed doubles the regions in flight, up to the transfer's
/// own threshold; an overshoot that brings is repaid like any other.
#[derive(Debug, Default)]
struct Pace {
    in_flight: u32,
    /// Credit left unspent since the regions in flight last grew.
    unspent: f64,
}

impl Pace {
    /// The copy knobs (threshold, batch) of a transfer whose own are `own`
    /// under `limit` bytes per second (0: its own).
    fn knobs(&self, own: (u32, u32), region_bytes: u64, limit: u64) -> (u32, u32) {
        let (bounded, batch) = bounded_knobs(own, region_bytes, limit);
        if limit == 0 {
            return (bounded, batch);
        }
        (bounded.max(self.in_flight.min(own.0)), batch)
    }

    /// Notes credit left `unspent` while copying was allowed; true when the
    /// regions in flight grew.
    fn widen(&mut self, own: (u32, u32), region_bytes: u64, limit: u64, unspent: f64) -> bool {
        if limit == 0 {
            return false;
        }
        self.unspent += unspent;
        if self.unspent < region_bytes as f64 {
            return false;
        }
        self.unspent = 0.0;
        let (now, _) = self.knobs(own, region_bytes, limit);
        self.in_flight = now.saturating_mul(2).min(own.0.max(1));
        self.in_flight > now
    }
}

/// One look's spending from the host budget.
pub(crate) struct Spending {
    now: Instant,
    /// Bytes the transfer copied since its last look.
    copied: u64,
    /// The host's budget in bytes per second; 0: none.
    budget: u64,
    own: (u32, u32),
    region: u64,
    /// Whether the transfer was allowed to copy since its last look.
    copying: bool,
}

/// What the host budget allows one transfer now.
pub(crate) struct Allowance {
    holding: bool,
    knobs: (u32, u32),
}

/// The host's byte budget (`transfer.max_bytes_per_second`) as one bucket
/// that every transfer spends from: what one transfer leaves unspent (it
/// ended with credit, waits for its source, copies slowly) is the others'
/// to spend, where per-transfer shares of the budget would lose it. All
/// hold while the bucket is overdrawn and copy again together; the regions
/// in flight on the host (a quarter second of the budget, widened by
/// `Pace` while the host leaves credit unspent) are split equally among the
/// transfers copying, so they share the budget equally.
#[derive(Debug, Default)]
pub(crate) struct HostBudget {
    bucket: RateLimiter,
    pace: Pace,
}

impl HostBudget {
    pub(crate) fn spend(&mut self, spending: Spending, copying: usize) -> Allowance {
        let Spending {
            now,
            copied,
            budget,
            own,
            region,
            copying: allowed,
        } = spending;
        if budget == 0 {
            self.bucket.spend(now, 0.0, 0);
            return Allowance {
                holding: false,
                knobs: own,
            };
        }
        if self
            .bucket
            .since
            .is_some_and(|since| now.duration_since(since) > BUDGET_IDLE)
        {
            // Nothing copied under the budget for a while: start afresh
            // rather than count the idle time as credit left unspent.
            *self = HostBudget::default();
        }
        // The pace counts regions in flight on the whole host: a width
        // found while few transfers copied is then split among more.
        let copying = u32::try_from(copying.max(1)).unwrap_or(u32::MAX);
        let all = (own.0.max(1).saturating_mul(copying), 1);
        let (total, _) = self.pace.knobs(all, region, budget);
        self.bucket.granule = 2 * region * u64::from(total);
        self.bucket.spend(now, copied as f64, budget);
        let unspent = self.bucket.take_unspent();
        if allowed {
            self.pace.widen(all, region, budget, unspent);
        }
        let (total, _) = self.pace.knobs(all, region, budget);
        Allowance {
            holding: self.bucket.holding,
            knobs: (total.div_ceil(copying).clamp(1, own.0.max(1)), 1),
        }
    }
}

/// How long the host budget may go unspent before it starts afresh: limited
/// transfers look every `LIMITED_TICK`, so a longer gap means none copied.
const BUDGET_IDLE: Duration = Duration::from_secs(1);

/// The lower threshold and batch of two sets of knobs.
fn tighter(a: (u32, u32), b: (u32, u32)) -> (u32, u32) {
    (a.0.min(b.0), a.1.min(b.1))
}

/// A transfer's own copy knobs (threshold, batch).
fn own_knobs(transfer: &TransferRecord) -> (u32, u32) {
    (transfer.hydration_threshold, transfer.hydration_batch_size)
}

fn bounded_knobs((threshold, batch): (u32, u32), region_bytes: u64, limit: u64) -> (u32, u32) {
    if limit == 0 {
        return (threshold, batch);
    }
    let burst_regions = (limit / 4 / region_bytes.max(1)).max(1);
    let within = u32::try_from(burst_regions).unwrap_or(u32::MAX);
    (threshold.min(within).max(1), 1)
}

impl Context {
    /// The bytes per second the transfer may copy now: its own limit, or
    /// its equal share of the host's budget among the transfers copying
    /// (and `joining` more) when that is lower; 0: no limit.
    pub(crate) fn byte_limit(&self, transfer: &TransferRecord, joining: usize) -> u64 {
        byte_limit(
            transfer.max_bytes_per_second,
            self.settings.transfer.max_bytes_per_second,
            self.registry.copying() + joining,
        )
    }
}

/// A transfer's own limit and the host's budget shared equally among the
/// `copying` transfers, whichever is lower; 0 stands for no limit.
fn byte_limit(own: u64, host_budget: u64, copying: usize) -> u64 {
    if host_budget == 0 {
        return own;
    }
    let share = host_budget / copying.max(1) as u64;
    if own == 0 { share } else { own.min(share) }
}

/// How often a rate-limited transfer's bytes are checked: what is copied
/// between two looks past the budget becomes debt that the next pause repays.
const LIMITED_TICK: Duration = Duration::from_millis(20);

/// A token bucket over the clone's hydrated bytes. Credit accrues at the
/// limit and is capped at a quarter second of it (the largest burst); copies
/// spend it, and may overdraw it because dm-clone cannot be stopped mid-copy.
/// Copying stops while the balance is negative and starts again once it is
/// back above half the cap, so an overshoot is repaid instead of forgiven and
/// the long-run rate stays at the limit however slowly the monitor looks.
/// The cap is at least `granule` bytes (two starts' worth of regions):
/// below it, a bucket spent by one start's copies holds copying back after
/// each one and credit earned while they copy is lost at the cap.
#[derive(Debug, Default)]
struct RateLimiter {
    since: Option<Instant>,
    /// The hydrated bytes `step` saw last.
    seen: u64,
    granule: u64,
    balance: f64,
    holding: bool,
    /// Credit lost at the cap while copying was allowed (see `Pace`).
    unspent: f64,
}

impl RateLimiter {
    /// Spends what the clone hydrated since the last step, or since `seen`
    /// was set (`hydrated_bytes` counts from the clone's start).
    /// `Some(true)`: stop copying; `Some(false)`: copy again; `None`: leave it.
    fn step(&mut self, now: Instant, hydrated_bytes: u64, limit: u64) -> Option<bool> {
        let spent = hydrated_bytes.saturating_sub(self.seen);
        self.seen = hydrated_bytes;
        self.spend(now, spent as f64, limit)
    }

    /// Spends `spent` bytes at `now`, as `step`.
    fn spend(&mut self, now: Instant, spent: f64, limit: u64) -> Option<bool> {
        if limit == 0 {
            self.since = None;
            return self.set_holding(false);
        }
        let cap = (limit as f64 / 4.0).max(self.granule as f64);
        let then = match self.since {
            Some(then) => then,
            None => {
                self.balance = cap;
                now
            }
        };
        self.since = Some(now);
        let earned = now.duration_since(then).as_secs_f64() * limit as f64;
        let balance = self.balance + earned - spent;
        if !self.holding && balance > cap {
            self.unspent += balance - cap;
        }
        self.balance = balance.min(cap);
        if self.balance < 0.0 {
            self.set_holding(true)
        } else if self.balance >= cap / 2.0 {
            self.set_holding(false)
        } else {
            None
        }
    }

    /// The credit lost at the cap since the last call.
    fn take_unspent(&mut self) -> f64 {
        std::mem::take(&mut self.unspent)
    }

    fn set_holding(&mut self, hold: bool) -> Option<bool> {
        (self.holding != hold).then(|| {
            self.holding = hold;
            hold
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_gate_tells_the_clone_only_what_its_live_threshold_lacks() {
        let open = CopyGate::default();
        assert!(open.messages(16, 16, 8).is_empty());
        assert_eq!(open.messages(4, 16, 8), ["hydration_threshold 16"]);
        assert_eq!(
            open.messages(0, 16, 8),
            ["hydration_batch_size 8", "hydration_threshold 16"],
            "a clone copying nothing (stopped, or a table loaded again) starts"
        );
        let closed = CopyGate {
            moving_on: true,
            ..CopyGate::default()
        };
        assert_eq!(closed.messages(16, 16, 8), ["hydration_threshold 0"]);
        assert!(closed.messages(0, 16, 8).is_empty());
    }

    #[test]
    fn a_device_not_listed_yet_is_looked_at_every_tick_and_a_failing_source_less_often() {
        let mut events = EventSource::default();
        let unlisted = || {
            Err(crate::Error::NoSuchDevice {
                device: "dmt-lower-x".into(),
            })
        };
        for _ in 0..4 {
            assert_eq!(events.after_wait(unlisted(), ms(20)), Some(ms(20)));
            assert!(events.failure.is_none(), "not a failure of the events");
        }
        let failing = || Err(crate::Error::Other("the monitor stopped".into()));
        let pauses: Vec<_> = (0..4)
            .map(|_| events.after_wait(failing(), ms(500)))
            .collect();
        assert_eq!(
            pauses,
            [
                Some(ms(500)),
                Some(ms(1000)),
                Some(ms(2000)),
                Some(ms(4000))
            ]
        );
        assert!(events.failure.is_some());
        assert_eq!(events.after_wait(Ok(()), ms(500)), None);
        assert!(events.failure.is_none());
    }

    #[test]
    fn under_a_limit_one_start_puts_at_most_a_quarter_second_in_flight() {
        let own = |limit| bounded_knobs((16, 8), 1 << 20, limit);
        assert_eq!(own(0), (16, 8), "no limit: its own knobs");
        assert_eq!(own(8 << 20), (2, 1), "2 MiB in a quarter second");
        assert_eq!(own(1 << 20), (1, 1), "at least one region");
        assert_eq!(own(1 << 30), (16, 1), "never above its own");
    }

    #[test]
    fn credit_left_unspent_widens_the_regions_in_flight_up_to_the_transfers_own() {
        let (own, region, limit) = ((16, 8), 1 << 20, 2 << 20);
        let mut pace = Pace::default();
        assert_eq!(
            pace.knobs(own, region, limit),
            (1, 1),
            "a quarter second is under a region"
        );
        assert!(
            !pace.widen(own, region, limit, 1000.0),
            "less than a region unspent"
        );
        assert!(
            !pace.widen(own, region, 0, 1e12),
            "no limit, nothing to widen"
        );
        assert!(
            pace.widen(own, region, limit, region as f64 - 1000.0),
            "a region in all"
        );
        assert_eq!(pace.knobs(own, region, limit), (2, 1));
        for _ in 0..10 {
            pace.widen(own, region, limit, 1e12);
        }
        assert_eq!(
            pace.knobs(own, region, limit),
            (16, 1),
            "never above its own"
        );
        assert!(
            !pace.widen(own, region, limit, 1e12),
            "nothing left to widen"
        );
        assert_eq!(
            pace.knobs(own, region, 0),
            (16, 8),
            "no limit: its own knobs"
        );
    }

    /// Copies `seconds` under `limit` where each region takes `latency`, as
    /// the monitor looks every 20 ms; returns the bytes copied.
    fn copy_with_slow_regions(limit: u64, latency: f64, seconds: u64, widening: bool) -> f64 {
        let (own, region) = ((16, 1), 1000);
        let t0 = Instant::now();
        let (mut limiter, mut pace) = (RateLimiter::default(), Pace::default());
        let (mut bytes, mut copying) = (0.0f64, true);
        for tick in 0..=seconds * 50 {
            limiter.granule = 2 * region * u64::from(pace.knobs(own, region, limit).0);
            if let Some(hold) = limiter.step(t0 + ms(tick * 20), bytes as u64, limit) {
                copying = !hold;
            }
            let unspent = limiter.take_unspent();
            if widening {
                pace.widen(own, region, limit, unspent);
            }
            if copying {
                let in_flight = f64::from(pace.knobs(own, region, limit).0);
                bytes += in_flight * region as f64 / latency * 0.02;
            }
        }
        bytes
    }

    #[test]
    fn a_transfer_whose_regions_copy_slowly_still_reaches_its_limit() {
        // One region in flight copies 2,000 B/s: half the limit.
        let limit = 4000;
        let alone = copy_with_slow_regions(limit, 0.5, 60, false);
        assert!(
            alone < 0.6 * 60.0 * limit as f64,
            "one region at a time: {alone}"
        );
        let widened = copy_with_slow_regions(limit, 0.5, 60, true);
        let ratio = widened / (60.0 * limit as f64);
        assert!(
            (0.95..=1.02).contains(&ratio),
            "widened: {ratio:.3} of the limit"
        );
    }

    #[test]
    fn what_transfers_ending_early_leave_of_the_host_budget_the_others_spend() {
        // Four moves of different sizes; one region in flight copies 2,000
        // B/s, each one's equal share while all four copy.
        let (own, region, budget, latency) = ((16, 1), 1000u64, 8000u64, 0.5);
        let sizes = [20_000u64, 40_000, 60_000, 80_000];
        let t0 = Instant::now();
        let mut host = HostBudget::default();
        let (mut copied, mut seen, mut allowed) = ([0.0f64; 4], [0u64; 4], [true; 4]);
        let mut tick = 0u64;
        while (0..4).any(|i| (copied[i] as u64) < sizes[i]) {
            tick += 1;
            assert!(tick < 10_000, "never finished: {copied:?}");
            let now = t0 + ms(tick * 20);
            let unfinished: Vec<usize> =
                (0..4).filter(|&i| (copied[i] as u64) < sizes[i]).collect();
            let copying = unfinished.len();
            for i in unfinished {
                let spending = Spending {
                    now,
                    copied: copied[i] as u64 - seen[i],
                    budget,
                    own,
                    region,
                    copying: allowed[i],
                };
                seen[i] = copied[i] as u64;
                let allowance = host.spend(spending, copying);
                allowed[i] = !allowance.holding;
                if allowed[i] {
                    let rate = f64::from(allowance.knobs.0) * region as f64 / latency;
                    copied[i] = (copied[i] + rate * 0.02).min(sizes[i] as f64);
                }
            }
        }
        let seconds = tick as f64 * 0.02;
        let ratio = sizes.iter().sum::<u64>() as f64 / budget as f64 / seconds;
        assert!(
            (0.95..=1.05).contains(&ratio),
            "{seconds:.2} s: {ratio:.3} of the budget"
        );
        let mut none = HostBudget::default();
        let free = none.spend(
            Spending {
                now: t0,
                copied: 1 << 30,
                budget: 0,
                own,
                region,
                copying: true,
            },
            4,
        );
        assert!(!free.holding && free.knobs == own, "no budget: no hold");
    }

    #[test]
    fn the_host_budget_is_shared_equally_and_a_lower_own_limit_stays() {
        assert_eq!(byte_limit(0, 0, 5), 0, "no limit at all");
        assert_eq!(byte_limit(7, 0, 5), 7, "no budget: the transfer's own");
        assert_eq!(byte_limit(0, 100, 4), 25, "an equal share");
        assert_eq!(byte_limit(0, 100, 0), 100, "alone before its first look");
        assert_eq!(byte_limit(10, 100, 4), 10, "its own limit is lower");
        assert_eq!(byte_limit(40, 100, 4), 25, "the share is lower");
    }

    #[test]
    fn the_limiter_spends_a_quarter_second_burst_then_holds() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::default();
        assert_eq!(limiter.step(t0, 0, 1000), None);
        assert_eq!(limiter.step(t0 + ms(100), 200, 1000), None);
        assert_eq!(limiter.step(t0 + ms(200), 600, 1000), Some(true));
        assert_eq!(limiter.step(t0 + ms(300), 600, 1000), None, "still in debt");
        assert_eq!(
            limiter.step(t0 + ms(400), 600, 1000),
            None,
            "below half the cap"
        );
        assert_eq!(limiter.step(t0 + ms(500), 600, 1000), Some(false));
    }

    #[test]
    fn a_bucket_holds_at_least_its_granule() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter {
            granule: 2000,
            ..RateLimiter::default()
        };
        limiter.step(t0, 0, 1000);
        // A quarter second of 1000 B/s is 250 B; two 1000 B regions fit.
        assert_eq!(limiter.step(t0 + ms(10), 1000, 1000), None, "one region in");
        assert_eq!(limiter.step(t0 + ms(20), 2000, 1000), None, "two");
        assert_eq!(
            limiter.step(t0 + ms(30), 3000, 1000),
            Some(true),
            "past the bucket"
        );
    }

    #[test]
    fn copies_made_before_the_first_look_are_charged() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::default();
        assert_eq!(
            limiter.step(t0, 3000, 1000),
            Some(true),
            "3 s worth copied before the monitor first looked is debt"
        );
        let mut taken_over = RateLimiter {
            seen: 3000,
            ..RateLimiter::default()
        };
        assert_eq!(
            taken_over.step(t0, 3000, 1000),
            None,
            "a transfer taken over after a restart starts with credit"
        );
    }

    #[test]
    fn an_overshoot_is_repaid_before_copying_again() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::default();
        limiter.step(t0, 0, 1000);
        // A slow look finds 3 s worth copied after 1 s: 1.75 s of debt.
        assert_eq!(limiter.step(t0 + ms(1000), 3000, 1000), Some(true));
        assert_eq!(limiter.step(t0 + ms(2000), 3000, 1000), None);
        assert_eq!(limiter.step(t0 + ms(2800), 3000, 1000), None);
        assert_eq!(limiter.step(t0 + ms(2900), 3000, 1000), Some(false));
    }

    #[test]
    fn the_long_run_rate_is_the_limit_whatever_the_copy_speed() {
        for copy_speed in [2_000u64, 10_000, 100_000] {
            let t0 = Instant::now();
            let mut limiter = RateLimiter::default();
            let (mut bytes, mut copying) = (0u64, true);
            for tick in 0..=1000u64 {
                if let Some(hold) = limiter.step(t0 + ms(tick * 20), bytes, 1000) {
                    copying = !hold;
                }
                if copying {
                    bytes += copy_speed * 20 / 1000;
                }
            }
            // 20 s at 1000 B/s, plus at most the opening burst and one tick.
            let most = 20_000 + 250 + copy_speed * 20 / 1000;
            assert!(bytes <= most, "{copy_speed} B/s copied {bytes} > {most}");
            assert!(bytes >= 19_000, "{copy_speed} B/s copied only {bytes}");
        }
    }

    #[test]
    fn lifting_the_limit_releases_a_hold() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::default();
        limiter.step(t0, 0, 1000);
        assert_eq!(limiter.step(t0 + ms(10), 5000, 1000), Some(true));
        assert_eq!(limiter.step(t0 + ms(20), 5000, 0), Some(false));
        assert_eq!(limiter.step(t0 + ms(30), 9000, 0), None);
    }
}
