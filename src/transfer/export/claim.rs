//! Exports for a move wait for their destination: the destination agent
//! claims the export once it has connected, and an export nobody claimed
//! within `nvme.unclaimed_export_seconds` is withdrawn, with its release
//! tokens and secrets. The kernel does not say which hosts are connected
//! (nvmet lists controllers only in debugfs, which Debian's kernels do not
//! build), so the destination's word, proven by the release token, is what
//! counts.

use std::{sync::Weak, time::Duration};

use tracing::{info, warn};

use super::{Exports, check_token, exported_to};
use crate::{
    context::Context,
    error::AgentError,
    ids::VolumeId,
    nvme::Nqn,
    records::unix_now,
    refusal::Refusal,
    store::VolumeRecord,
    transfer::{
        Transfers,
        release::{ReturnTripAsk, SourceAnswer},
        token::ReleaseToken,
    },
    volume::Volumes,
};

/// Whether `record`'s export waited for its claim past `now`.
fn unclaimed_past(record: &VolumeRecord, now: i64) -> bool {
    record
        .export
        .as_ref()
        .and_then(|export| export.claim_deadline_unix)
        .is_some_and(|deadline| deadline <= now)
}

/// How often exports are checked: often enough that one outlives its
/// deadline by at most a quarter of the wait, and never busier than once a
/// second.
fn sweep_interval(unclaimed_export_seconds: u64) -> Duration {
    Duration::from_secs((unclaimed_export_seconds / 4).clamp(1, 30))
}

impl Exports {
    /// The destination has connected to the export of `id` for a move, so
    /// the export no longer expires. Only for the host it is exported to,
    /// with one of its release tokens; a repeat changes nothing. Answers
    /// where the volume comes from, for the destination's record: this
    /// host, then the hosts this one still copies it from, nearest first;
    /// the volume's history tag here; and, when `return_trip` asks, what
    /// changed since the volume left the destination's copy.
    pub async fn claim_export(
        &self,
        id: &VolumeId,
        host_nqn: &str,
        token: Option<&ReleaseToken>,
        return_trip: Option<&ReturnTripAsk>,
    ) -> Result<SourceAnswer, AgentError> {
        let mut answer = self.claim(id, host_nqn, token).await?;
        if let Some(ask) = return_trip {
            answer.return_trip = Some(self.return_trip_delta(id, ask).await);
        }
        Ok(answer)
    }

    async fn claim(
        &self,
        id: &VolumeId,
        host_nqn: &str,
        token: Option<&ReleaseToken>,
    ) -> Result<SourceAnswer, AgentError> {
        let host = Nqn::parse("host_nqn", host_nqn)?;
        let _held = self.ctx.locks.lock(id.as_str()).await;
        let mut record = self
            .exported_for_move_to(id, &host, token, "a claim of its export")
            .await?;
        if let Some(export) = record.export.as_mut()
            && export.claim_deadline_unix.take().is_some()
        {
            self.ctx.put(&record).await?;
            info!(volume = %id, host = %host, "its destination claimed the export: it no longer expires");
        }
        Ok(SourceAnswer {
            upstream: self.chain_from_here(&record).await?,
            history: record.tracking.as_ref().map(|t| t.history),
            return_trip: None,
            snapshots: self.travelling_snapshots(&record).await?,
        })
    }

    /// The record of volume `id` when it is exported for a move to `host`
    /// and `token` is one of the export's release tokens; `asking` names
    /// the request for the refusal without one. Callers hold the lock.
    pub(super) async fn exported_for_move_to(
        &self,
        id: &VolumeId,
        host: &Nqn,
        token: Option<&ReleaseToken>,
        asking: &str,
    ) -> Result<VolumeRecord, AgentError> {
        let record = self
            .ctx
            .record(id)
            .await?
            .ok_or_else(|| AgentError::NotFound {
                what: "volume",
                id: id.to_string(),
            })?;
        let not_for_transfer = |why| Refusal::ExportNotForTransfer {
            volume: id.clone(),
            why,
        };
        let Some(export) = &record.export else {
            return Err(not_for_transfer(
                "is not exported (an export not claimed in time is withdrawn)",
            )
            .into());
        };
        exported_to(id, export, host.as_str())?;
        if !export.for_transfer() {
            return Err(not_for_transfer("is exported for an attachment, not for a move").into());
        }
        let token = token.ok_or_else(|| AgentError::PermissionDenied {
            reason: format!("{asking} of volume {id} needs the release token its export was given"),
        })?;
        check_token(id, token, export)?;
        Ok(record)
    }

    /// Withdraws every export for a move that was not claimed by its
    /// deadline, as of `now`; returns how many went. One that cannot be
    /// withdrawn is logged and tried again at the next sweep.
    pub(crate) async fn expire_unclaimed(&self, now: i64) -> Result<usize, AgentError> {
        let records = self.ctx.store_call(|store| store.volumes()).await?;
        let mut expired = 0;
        for record in records.iter().filter(|record| unclaimed_past(record, now)) {
            match self.expire(&record.id, now).await {
                Ok(true) => expired += 1,
                Ok(false) => {}
                Err(err) => {
                    warn!(volume = %record.id, error = %err, "cannot withdraw an unclaimed export yet")
                }
            }
        }
        Ok(expired)
    }

    async fn expire(&self, id: &VolumeId, now: i64) -> Result<bool, AgentError> {
        let _held = self.ctx.locks.lock(id.as_str()).await;
        // Under the lock: a claim may have come in since the list was read.
        let Some(mut record) = self.ctx.record(id).await? else {
            return Ok(false);
        };
        if !unclaimed_past(&record, now) {
            return Ok(false);
        }
        self.remove_export(id).await?;
        if let Some(export) = record.export.take() {
            self.ctx.put(&record).await?;
            warn!(
                target: "dmclone::audit",
                volume = %id,
                host = %export.host_nqn,
                "withdrew an export for a move that its destination did not claim within \
                 nvme.unclaimed_export_seconds; its release tokens are void"
            );
        }
        Ok(true)
    }

    /// Withdraws unclaimed exports past their deadline for as long as the
    /// agent runs.
    pub(crate) fn spawn_expiry(&self) {
        let weak: Weak<Context> = std::sync::Arc::downgrade(&self.ctx);
        let every = sweep_interval(self.ctx.settings.nvme.unclaimed_export_seconds);
        self.ctx.background.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(ctx) = weak.upgrade() else { return };
                let exports =
                    Exports::new(ctx.clone(), Volumes::new(ctx.clone()), Transfers::new(ctx));
                if let Err(err) = exports.expire_unclaimed(unix_now()).await {
                    warn!(error = %err, "cannot look for unclaimed exports; trying again later");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unclaimed_exports_are_checked_at_a_quarter_of_the_wait_within_bounds() {
        assert_eq!(sweep_interval(1), Duration::from_secs(1));
        assert_eq!(sweep_interval(8), Duration::from_secs(2));
        assert_eq!(sweep_interval(600), Duration::from_secs(30));
    }
}
