//! The source side of a move: exporting a volume over NVMe/TCP to the one
//! host it moves to, unexporting, releasing the copy once the destination has
//! all of it, and connecting to another agent's export as a destination.

mod chain;
mod claim;
mod return_trip;
pub(super) mod snapshots;

pub(super) use return_trip::whole_regions;

use std::sync::Arc;

use tracing::{info, warn};

use crate::{
    context::Context,
    error::AgentError,
    failpoint,
    ids::{SnapshotId, VolumeId},
    nvme::{
        Nqn, TcpAddress,
        auth::{AuthPolicy, DhchapKeys},
        fabrics::{namespace_ids, onward_namespace_ids},
        subsystem_nqn,
        target::{ExportRequest, PortSpec},
        volume_of_subsystem,
    },
    records::unix_now,
    refusal::Refusal,
    store::{ExportRecord, HistoryBefore, VolumeRecord, WarmCopy},
    transfer::{
        Transfers,
        token::{ReleaseToken, TOKENS_KEPT},
    },
    volume::Volumes,
};

/// Keeps `token`'s digest with the export's, dropping the oldest past
/// [`TOKENS_KEPT`].
fn remember_token(digests: &mut Vec<String>, token: &ReleaseToken) {
    digests.push(token.digest());
    let excess = digests.len().saturating_sub(TOKENS_KEPT);
    digests.drain(..excess);
}

impl Context {
    /// What the kernel's target is told for `record`'s recorded export, if
    /// it has one: the thin device, or, for an export made while the
    /// volume arrived, the layer beneath dm-era under the onward ids.
    pub(crate) fn export_request(
        &self,
        record: &VolumeRecord,
    ) -> Result<Option<ExportRequest>, AgentError> {
        let Some(export) = &record.export else {
            return Ok(None);
        };
        let address = self
            .settings
            .nvme
            .export
            .ok_or_else(|| Refusal::NotConfigured {
                setting: "nvme.export_address",
                explanation: format!(
                    "volume {} is exported, but this agent no longer knows the storage network \
                 address other hosts reach it at",
                    record.id
                ),
            })?;
        let subsystem = Nqn::parse("subsystem_nqn", &export.subsystem_nqn)?;
        let (device, namespace) = if export.serves_lower {
            (
                self.naming.lower(&record.id),
                onward_namespace_ids(&subsystem),
            )
        } else {
            (self.thin_name(record), namespace_ids(&record.id))
        };
        Ok(Some(ExportRequest {
            subsystem_nqn: subsystem,
            device_path: device.mapper_path(),
            namespace,
            host_nqn: Nqn::parse("host_nqn", &export.host_nqn)?,
            port: PortSpec {
                id: self.settings.nvme.export_port_id,
                address: TcpAddress::new(address.ip(), address.port()),
            },
            auth: export.auth.clone(),
        }))
    }
}

/// VOLUME_EXPORTED_ELSEWHERE unless `export` is to `requester`.
fn exported_to(id: &VolumeId, export: &ExportRecord, requester: &str) -> Result<(), AgentError> {
    if export.host_nqn == requester {
        return Ok(());
    }
    Err(Refusal::VolumeExportedElsewhere {
        volume: id.clone(),
        host_nqn: export.host_nqn.clone(),
        requester: requester.to_owned(),
    }
    .into())
}

/// PERMISSION_DENIED unless `token` is one the export handed out.
fn check_token(
    id: &VolumeId,
    token: &ReleaseToken,
    export: &ExportRecord,
) -> Result<(), AgentError> {
    if token.matches(&export.release_token_digests) {
        return Ok(());
    }
    Err(AgentError::PermissionDenied {
        reason: format!(
            "the release token does not match the one volume {id}'s export to {} was given; \
             nothing changes",
            export.host_nqn
        ),
    })
}

/// An export, as the source reports it to the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportView {
    pub volume_id: String,
    pub subsystem_nqn: String,
    pub address: String,
    pub port: u16,
    pub host_nqn: String,
    /// A fresh release token, for an export for a move.
    pub release_token: Option<ReleaseToken>,
    /// The secrets the host connects with (`nvme.auth = required`).
    pub auth: Option<DhchapKeys>,
    /// Unclaimed by its destination, the export is withdrawn then (Unix
    /// seconds).
    pub claim_deadline_unix: Option<i64>,
}

/// Who asks to withdraw an export, and with what right.
#[derive(Debug, Clone, Default)]
pub struct UnexportRequest {
    /// The export's release token, if the caller holds it.
    pub token: Option<ReleaseToken>,
    /// Withdraw an export for a move without its token.
    pub force: bool,
    /// A peer's own host: the only host whose exports it may withdraw.
    pub peer_host: Option<String>,
}

/// The source side of a move: exporting a volume and releasing it.
#[derive(Debug, Clone)]
pub struct Exports {
    ctx: Arc<Context>,
    /// A released volume is deleted as a delete call would.
    volumes: Volumes,
    /// A copy released while still arriving releases its own source.
    transfers: Transfers,
}

impl Exports {
    pub(crate) fn new(ctx: Arc<Context>, volumes: Volumes, transfers: Transfers) -> Self {
        Self {
            ctx,
            volumes,
            transfers,
        }
    }

    /// The NQN prefix of this node's exports.
    fn export_prefix(&self) -> String {
        format!("nqn.2014-08.io.dmclone:{}", self.ctx.node_id)
    }

    /// Exports the volume to `host_nqn`; `for_transfer` makes it the
    /// source of a move, answered with a fresh release token. Repeating
    /// the call is harmless, and a repeat without `for_transfer` keeps the
    /// tokens handed out before (restoring exports at start does that).
    pub async fn export_volume(
        &self,
        id: &VolumeId,
        host_nqn: &str,
        for_transfer: bool,
    ) -> Result<ExportView, AgentError> {
        let host = Nqn::parse("host_nqn", host_nqn)?;
        let address = self.ctx.settings.nvme.export.ok_or_else(|| {
            Refusal::NotConfigured {
                setting: "nvme.export_address",
                explanation: "this agent exports nothing until it knows the storage network address other hosts reach it at".into(),
            }
        })?;
        let _held = self.ctx.locks.lock(id.as_str()).await;
        let mut record = self.ctx.ready_record(id, "be exported").await?;
        let serves_lower = match &record.transfer {
            Some(transfer) => {
                self.check_onward(&record, transfer, &host, for_transfer)
                    .await?;
                true
            }
            None => {
                if for_transfer {
                    self.refuse_while_snapshots_arrive(id).await?;
                }
                record.export.as_ref().is_some_and(|e| e.serves_lower)
            }
        };
        let subsystem = subsystem_nqn(&self.export_prefix(), id)?;
        let token = for_transfer.then(ReleaseToken::generate).transpose()?;
        let deadline = for_transfer.then(|| self.claim_deadline());
        // Exports to one host share its secrets: two exports to it at
        // once (a drain) must not each make their own pair.
        let _host_held = self.ctx.locks.lock(format!("export-host {host}")).await;
        let auth = self.host_secrets(&record, &host).await?;
        match &mut record.export {
            Some(existing) if existing.host_nqn != host.as_str() => {
                return Err(AgentError::AlreadyExists {
                    what: "export of volume",
                    id: id.to_string(),
                    detail: format!(
                        "to {}; unexport it before exporting to {host}",
                        existing.host_nqn
                    ),
                });
            }
            Some(existing) => {
                let fresh_auth = existing.auth != auth;
                existing.auth.clone_from(&auth);
                if let Some(token) = &token {
                    remember_token(&mut existing.release_token_digests, token);
                }
                // A repeat gives an unclaimed export a fresh wait; a claimed
                // one (its destination is connected) or one for an
                // attachment never expires.
                if existing.claim_deadline_unix.is_some() && deadline.is_some() {
                    existing.claim_deadline_unix = deadline;
                }
                if token.is_some() || fresh_auth {
                    self.ctx.put(&record).await?;
                }
            }
            None => {
                let mut digests = Vec::new();
                if let Some(token) = &token {
                    remember_token(&mut digests, token);
                }
                let history_before =
                    record
                        .tracking
                        .as_ref()
                        .filter(|_| for_transfer)
                        .and_then(|t| {
                            Some(HistoryBefore {
                                origin: t.origin.clone()?,
                                from_era: t.known_from_era?,
                            })
                        });
                record.export = Some(ExportRecord {
                    host_nqn: host.to_string(),
                    subsystem_nqn: subsystem.to_string(),
                    release_token_digests: digests,
                    auth: auth.clone(),
                    claim_deadline_unix: deadline,
                    serves_lower,
                    history_before,
                    ended_history: record
                        .tracking
                        .as_ref()
                        .filter(|_| for_transfer)
                        .map(|t| t.history),
                });
                // The export serves the thin device below dm-era: what the
                // other host writes is never tracked, so the history ends.
                crate::changes::restart_history(&mut record);
                self.ctx.put(&record).await?;
                failpoint::hit("export.after_record");
            }
        }
        let request = self
            .ctx
            .export_request(&record)?
            .ok_or_else(|| AgentError::Internal(format!("volume {id}'s export is not recorded")))?;
        self.ctx.fabric.export(&request).await?;
        let claim_deadline_unix = record.export.as_ref().and_then(|e| e.claim_deadline_unix);
        info!(volume = %id, host = %host, subsystem = %subsystem, %address, for_transfer, ?claim_deadline_unix, "exported");
        Ok(ExportView {
            volume_id: id.to_string(),
            subsystem_nqn: subsystem.to_string(),
            address: address.ip().to_string(),
            port: address.port(),
            host_nqn: host.to_string(),
            release_token: token,
            auth,
            claim_deadline_unix,
        })
    }

    fn claim_deadline(&self) -> i64 {
        let wait =
            i64::try_from(self.ctx.settings.nvme.unclaimed_export_seconds).unwrap_or(i64::MAX);
        unix_now().saturating_add(wait)
    }

    /// The DH-HMAC-CHAP secrets of an export of `record` to `host`, under
    /// `nvme.auth = required`: the ones it has, else those of another
    /// export to the same host (nvmet keeps one host entry per host NQN,
    /// shared by every subsystem that admits it), else fresh ones.
    async fn host_secrets(
        &self,
        record: &crate::store::VolumeRecord,
        host: &Nqn,
    ) -> Result<Option<DhchapKeys>, AgentError> {
        if self.ctx.settings.nvme.auth == AuthPolicy::None {
            return Ok(None);
        }
        // Before anything is recorded: a kernel that cannot authenticate
        // gets a refusal that changes nothing.
        if !self.ctx.fabric.authenticates_hosts().await? {
            return Err(crate::nvme::auth::unsupported());
        }
        if let Some(keys) = record.export.as_ref().and_then(|e| e.auth.clone()) {
            return Ok(Some(keys));
        }
        let records = self.ctx.store_call(|store| store.volumes()).await?;
        let shared = records.into_iter().find_map(|other| {
            other
                .export
                .filter(|export| export.host_nqn == host.as_str())
                .and_then(|export| export.auth)
        });
        match shared {
            Some(keys) => Ok(Some(keys)),
            None => DhchapKeys::generate().map(Some),
        }
    }

    /// Withdraws the volume's export. An export for a move goes only with
    /// its release token or by force; a peer withdraws only exports to its
    /// own host, and an export already gone counts as withdrawn for it.
    pub async fn unexport_volume(
        &self,
        id: &VolumeId,
        request: &UnexportRequest,
    ) -> Result<(), AgentError> {
        let _held = self.ctx.locks.lock(id.as_str()).await;
        let mut record = self
            .ctx
            .record(id)
            .await?
            .ok_or_else(|| AgentError::NotFound {
                what: "volume",
                id: id.to_string(),
            })?;
        if let Some(export) = &record.export {
            if let Some(peer_host) = &request.peer_host {
                exported_to(id, export, peer_host)?;
            }
            if export.for_transfer() {
                if request.force {
                    warn!(target: "dmclone::audit", volume = %id, host = %export.host_nqn, "forced unexport of a move's source: its destination loses the source");
                } else {
                    match &request.token {
                        Some(token) => check_token(id, token, export)?,
                        None => {
                            return Err(Refusal::ExportForTransfer {
                                volume: id.clone(),
                                host_nqn: export.host_nqn.clone(),
                            }
                            .into());
                        }
                    }
                }
            }
        } else if request.peer_host.is_some() {
            return Ok(());
        }
        self.remove_export(id).await?;
        failpoint::hit("unexport.after_unexport");
        if record.export.take().is_some() {
            self.ctx.put(&record).await?;
            info!(volume = %id, "unexported");
        }
        Ok(())
    }

    async fn remove_export(&self, id: &VolumeId) -> Result<(), AgentError> {
        let subsystem = subsystem_nqn(&self.export_prefix(), id)?;
        self.ctx.fabric.unexport(&subsystem).await
    }

    /// The destination has every region: drop this host's copy. Only the
    /// destination the copy was exported to for a move, holding one of the
    /// export's release tokens, may ask; and not while the copy is attached
    /// here.
    pub async fn release_volume(
        &self,
        id: &VolumeId,
        host_nqn: &str,
        token: Option<&ReleaseToken>,
    ) -> Result<(), AgentError> {
        self.release_volume_and_snapshots(id, host_nqn, token, &[])
            .await
    }

    /// A release that also drops the volume's snapshots in `moved` (they
    /// arrived on the destination). Snapshots not listed stay, and keep the
    /// copy, as a warm copy, while they do.
    pub async fn release_volume_and_snapshots(
        &self,
        id: &VolumeId,
        host_nqn: &str,
        token: Option<&ReleaseToken>,
        moved: &[SnapshotId],
    ) -> Result<(), AgentError> {
        let host = Nqn::parse("host_nqn", host_nqn)?;
        let _held = self.ctx.locks.lock(id.as_str()).await;
        let Some(mut record) = self.ctx.record(id).await? else {
            info!(volume = %id, "release of an absent volume: already released");
            return Ok(());
        };
        if record
            .warm
            .as_ref()
            .is_some_and(|warm| warm.left_for == host.as_str())
        {
            info!(volume = %id, "release of a warm copy: already released");
            return Ok(());
        }
        let not_for_transfer = |why| Refusal::ExportNotForTransfer {
            volume: id.clone(),
            why,
        };
        let Some(export) = &record.export else {
            return Err(not_for_transfer("is not exported").into());
        };
        exported_to(id, export, host.as_str())?;
        if !export.for_transfer() {
            return Err(not_for_transfer("is exported for an attachment, not for a move").into());
        }
        let token = token.ok_or_else(|| AgentError::PermissionDenied {
            reason: format!(
                "a release of volume {id} needs the release token its export was given; the \
                 copy stays"
            ),
        })?;
        check_token(id, token, export)?;
        if record.published {
            return Err(Refusal::VolumePublished {
                volume: id.clone(),
                device: self.ctx.naming.public(id).mapper_path(),
                hint: "the copy stays until it is unpublished here (detached)",
            }
            .into());
        }
        if let Some(transfer) = record.transfer.clone() {
            return self.pass_on(record, &transfer, &host).await;
        }
        self.remove_export(id).await?;
        failpoint::hit("release.after_unexport");
        let staying = self.drop_moved_snapshots(id, moved).await?;
        // The record keeps its export (and its tokens) until the delete
        // removes it or the copy turns warm, so a release cut short here is
        // repeated with the same token.
        let keep_seconds = self.ctx.settings.transfer.keep_source_copy_seconds;
        if (keep_seconds > 0 && record.tracking.is_some()) || staying > 0 {
            let now = unix_now();
            let until = now.saturating_add(i64::try_from(keep_seconds).unwrap_or(i64::MAX));
            record.export = None;
            record.warm = Some(WarmCopy {
                left_for: host.as_str().to_owned(),
                left_unix: now,
                until_unix: until,
            });
            self.ctx.put(&record).await?;
            info!(volume = %id, host = %host, until_unix = until, "released: the volume now lives on the destination; this host keeps a warm copy");
            return Ok(());
        }
        self.volumes.delete_locked(id, record).await?;
        info!(volume = %id, host = %host, "released: the volume now lives on the destination only");
        Ok(())
    }

    /// Tells the operator at start what protects this agent's exports.
    async fn say_how_exports_authenticate(&self) {
        if self.ctx.settings.nvme.export.is_none() {
            return;
        }
        match (
            self.ctx.settings.nvme.auth,
            self.ctx.fabric.authenticates_hosts().await,
        ) {
            (AuthPolicy::None, _) => warn!(
                "nvme.auth = none: NVMe/TCP exports admit their host NQN without authentication; \
                 firewall the export port to the storage peers"
            ),
            (AuthPolicy::Required, Ok(true)) => info!(
                hash = crate::nvme::auth::HASH,
                dhgroup = crate::nvme::auth::DH_GROUP,
                "NVMe/TCP exports authenticate host and target with DH-HMAC-CHAP (nvme.auth = required)"
            ),
            (AuthPolicy::Required, Ok(false)) => warn!(
                "this kernel cannot authenticate NVMe/TCP hosts (no CONFIG_NVME_TARGET_AUTH): \
                 every export is refused until nvme.auth = \"none\" is set"
            ),
            (AuthPolicy::Required, Err(err)) => {
                warn!(error = %err, "cannot tell whether the NVMe target authenticates hosts")
            }
        }
    }

    /// After a restart: every recorded export is in place, and exports of
    /// ours that no record names (an unexport cut short) are removed.
    pub(crate) async fn reconcile_exports(&self) -> Result<(), AgentError> {
        let exported = match self.ctx.fabric.exported_subsystems().await {
            Ok(exported) => exported,
            Err(AgentError::Unavailable { reason }) => {
                warn!(%reason, "no NVMe/TCP target in this kernel: exports are unavailable");
                return Ok(());
            }
            Err(err) => return Err(err),
        };
        self.say_how_exports_authenticate().await;
        // Before restoring: an export whose wait for its claim ran out while
        // the agent was down does not come back.
        self.expire_unclaimed(unix_now()).await?;
        let records = self.ctx.store_call(|store| store.volumes()).await?;
        let prefix = self.export_prefix();
        for subsystem in exported {
            let Some(volume) = volume_of_subsystem(&prefix, &subsystem) else {
                continue;
            };
            if !records
                .iter()
                .any(|r| r.id == volume.as_str() && r.export.is_some())
            {
                info!(%subsystem, "removing an export no record names");
                let removed = match Nqn::parse("subsystem_nqn", &subsystem) {
                    Ok(nqn) => self.ctx.fabric.unexport(&nqn).await,
                    Err(err) => Err(err),
                };
                if let Err(err) = removed {
                    warn!(%subsystem, error = %err, "cannot remove an export no record names");
                }
            }
        }
        for record in records {
            if let Some(export) = &record.export {
                let id = record.id.clone();
                if let Err(err) = self.export_volume(&id, &export.host_nqn, false).await {
                    warn!(volume = %id, error = %err, "cannot restore an export");
                }
            }
        }
        Ok(())
    }
}
