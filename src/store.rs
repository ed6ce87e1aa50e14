//! The durable state: an embedded redb database in the state directory.
//!
//! The store holds what the agent *intends*; the kernel holds what *is*.
//! Every multi-step operation first writes its intent (a [`Pending`] step on
//! the volume's record, with any thin id it will use) in one transaction, then
//! changes the kernel, then clears the intent. After a crash, reconciliation
//! reads the intents and finishes or rolls back each step.
//!
//! redb takes an exclusive lock on the file, so a second agent on the same
//! state directory fails to open the store instead of fighting the first.

use std::{
    ops::Range,
    path::{Path, PathBuf},
    sync::Arc,
};

pub use crate::transfer::phase::TransferPhase;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::{
    error::AgentError,
    ids::{SnapshotId, ThinId, TransferId, VolumeId},
    nvme::auth::DhchapKeys,
    transfer::token::ReleaseToken,
};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");
const TRANSFERS: TableDefinition<&str, &[u8]> = TableDefinition::new("transfers");
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");

const SCHEMA_VERSION: u32 = 1;
const KEY_SCHEMA: &str = "schema_version";
const KEY_NODE_ID: &str = "node_id";
const KEY_HOST_ID: &str = "nvme_host_id";
const KEY_NEXT_THIN_ID: &str = "next_thin_id";
/// Thin ids are 24 bits; 0 is left unused so that "no id" is never valid.
const FIRST_THIN_ID: u32 = 1;
pub const MAX_THIN_ID: u32 = (1 << 24) - 1;
/// redb's default cache is 1 GiB; our records are small and few.
const CACHE_BYTES: usize = 4 << 20;
pub const STORE_FILE: &str = "state.redb";

/// One volume as the agent means it to be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: VolumeId,
    pub size_bytes: u64,
    /// The volume's thin device id in the pool.
    pub thin_id: ThinId,
    /// Whether the public device should exist.
    pub published: bool,
    pub created_unix: i64,
    /// A multi-step change in progress; `None` when the volume is at rest.
    #[serde(default)]
    pub pending: Option<Pending>,
    /// Set when reconciliation found the kernel disagreeing in a way the agent
    /// must not repair on its own; the volume refuses changes until cleared.
    #[serde(default)]
    pub quarantine: Option<String>,
    /// The transfer bringing this volume here, while it is not finished.
    #[serde(default)]
    pub transfer: Option<TransferId>,
    /// The NVMe/TCP export of this volume to another host, while it moves.
    #[serde(default)]
    pub export: Option<ExportRecord>,
    /// What the volume was made from, for callers; it does not depend on it.
    #[serde(default)]
    pub source_snapshot: Option<SnapshotId>,
    #[serde(default)]
    pub source_volume: Option<VolumeId>,
    /// Changed-block tracking with dm-era; `None` for volumes made without.
    #[serde(default)]
    pub tracking: Option<ChangeTracking>,
    /// The public device's dm-era maps `<prefix>-lower-<id>` (the volume
    /// arrived with dm-era above its dm-clone) instead of the thin device,
    /// until the public device is next made.
    #[serde(default, skip_serializing_if = "is_false")]
    pub on_lower: bool,
    /// The volume moved away and this host keeps its last copy, read-only,
    /// for a move back (`transfer.keep_source_copy_seconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm: Option<WarmCopy>,
}

/// The copy a volume left behind when it moved away: never written again,
/// unexported, unpublished, dropped at `until_unix`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarmCopy {
    /// The host the volume left for (its NQN).
    pub left_for: String,
    pub left_unix: i64,
    pub until_unix: i64,
}

fn is_false(value: &bool) -> bool {
    !*value
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

/// A volume's dm-era: its metadata lives in a thin device of the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeTracking {
    /// The tag of the current history: the high half of every era callers
    /// see, new whenever history starts again.
    #[serde(default)]
    pub history: u32,
    pub metadata_thin_id: ThinId,
    pub metadata_bytes: u64,
    /// dm-era's block: the granularity of changed extents.
    pub block_bytes: u64,
    /// The first era whose writes dm-era saw: earlier changes are unknown
    /// (the content came from a snapshot, a revert or another host). `None`
    /// until dm-era next runs over the volume, which fixes it.
    pub known_from_era: Option<u32>,
    /// Where this history began: the volume arrived here from that node,
    /// which held it under that history tag. What changed since is what
    /// this history saw, so a return trip there copies only that. `None`
    /// for a history that began here (made here, reverted, restarted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<HistoryOrigin>,
}

/// A node and the history tag a volume had there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryOrigin {
    pub node_id: String,
    pub history: u32,
}

/// A volume exported to the one host it moves to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportRecord {
    pub host_nqn: String,
    pub subsystem_nqn: String,
    /// SHA-256 digests of the release tokens handed out with the export,
    /// newest last (see `transfer::token`). Empty: an export for an
    /// attachment, which nobody may release.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub release_token_digests: Vec<String>,
    /// The DH-HMAC-CHAP secrets of the host entry (shared by every export
    /// to that host); `None` without authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<DhchapKeys>,
    /// An export for a move not yet claimed by its destination: when it is
    /// withdrawn (Unix seconds). `None`: claimed, or not for a move.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_deadline_unix: Option<i64>,
    /// Made while the volume was still arriving here: the export serves
    /// the layer beneath dm-era (the clone, later the thin id activated a
    /// second time), which must stay while the export does.
    #[serde(default, skip_serializing_if = "is_false")]
    pub serves_lower: bool,
    /// For a move: the volume's history as it was when exported, if it
    /// began with a copy on another node. The export restarts the history
    /// (writes through it would go unseen), but dm-era counts on, so a
    /// return trip to that node still learns what changed since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_before: Option<HistoryBefore>,
    /// For a move: the history tag the export ended. A snapshot taken in
    /// that history has an era dm-era can answer from: what changed since
    /// it bounds where it differs from what is exported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_history: Option<u32>,
}

/// Where a history began and dm-era's first era of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryBefore {
    pub origin: HistoryOrigin,
    pub from_era: u32,
}

impl ExportRecord {
    /// Whether the export is the source of a move.
    pub fn for_transfer(&self) -> bool {
        !self.release_token_digests.is_empty()
    }
}

impl VolumeRecord {
    /// How many fresh thin ids the volume needs: its own, and one for its
    /// era metadata when it tracks changes.
    pub fn thin_ids_needed(&self) -> u32 {
        1 + u32::from(self.tracking.is_some())
    }

    /// Takes the volume's thin id, then its era metadata's, from `ids`
    /// (fresh ids from [`Store::allocate_and_commit`]).
    pub fn take_thin_ids(&mut self, ids: &mut impl Iterator<Item = ThinId>) {
        let mut next = || {
            ids.next()
                .expect("allocated as many ids as thin_ids_needed")
        };
        self.thin_id = next();
        if let Some(tracking) = self.tracking.as_mut() {
            tracking.metadata_thin_id = next();
        }
    }

    /// The pool's thin ids this volume owns: its own, and its era
    /// metadata's when it tracks changes.
    pub fn owned_thin_ids(&self) -> Vec<ThinId> {
        std::iter::once(self.thin_id)
            .chain(self.tracking.as_ref().map(|t| t.metadata_thin_id))
            .collect()
    }
}

/// The intent of an operation that touches the kernel in several steps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Pending {
    /// The thin device may or may not exist yet; rolled back after a crash.
    Create,
    /// Devices and the thin device may be partly gone; finished after a crash.
    Delete,
    /// The record already has the new size; devices may still have the old.
    Extend { from_bytes: u64 },
    /// The record says published; the public device may not exist yet.
    Publish,
    /// The record says unpublished; the public device may still exist.
    Unpublish,
    /// The record already names the new thin device, a snapshot of
    /// `snapshot_thin`; the old one may still exist. Finished after a crash.
    Revert {
        old_thin: ThinId,
        snapshot_thin: ThinId,
    },
    /// A snapshot travelling here with its volume by this transfer: its
    /// thin device is made and filled after the volume arrived.
    Arrive { transfer: TransferId },
}

/// A thin snapshot of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: SnapshotId,
    pub volume_id: VolumeId,
    pub thin_id: ThinId,
    /// The volume's size when the snapshot was taken.
    pub size_bytes: u64,
    pub created_unix: i64,
    /// `Create` (rolled back after a crash) or `Delete` (finished).
    #[serde(default)]
    pub pending: Option<Pending>,
    /// The volume's first era after the snapshot, as callers see eras:
    /// what changed since the snapshot is what was written in it or later.
    #[serde(default)]
    pub era: Option<u64>,
    /// For a snapshot made here by travel (it has no era): where it may
    /// differ from the volume. Unset for a snapshot taken here.
    #[serde(default)]
    pub arrived_from: Option<ArrivedFrom>,
}

/// Where a snapshot made here by travel may differ from its volume: what
/// the volume had written to it since `era`, and `differs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArrivedFrom {
    /// The volume's first era (as callers see eras) after the volume was
    /// snapshotted to begin the chain of arriving snapshots this one was
    /// made along.
    pub era: u64,
    /// The byte ranges written to make this snapshot and those it was made
    /// from, in order and merged. Stored as `[start, end]` pairs: a
    /// record may hold thousands.
    #[serde(with = "range_pairs")]
    pub differs: Vec<Range<u64>>,
}

/// Ranges as `[start, end]` pairs, half the size of serde's own form.
mod range_pairs {
    use std::ops::Range;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(ranges: &[Range<u64>], to: S) -> Result<S::Ok, S::Error> {
        let pairs: Vec<[u64; 2]> = ranges.iter().map(|r| [r.start, r.end]).collect();
        pairs.serialize(to)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(from: D) -> Result<Vec<Range<u64>>, D::Error> {
        let pairs = Vec::<[u64; 2]>::deserialize(from)?;
        Ok(pairs.into_iter().map(|[start, end]| start..end).collect())
    }
}

impl Record for SnapshotRecord {
    const TABLE: Table = SNAPSHOTS;
    fn key(&self) -> &str {
        self.id.as_str()
    }
}

/// A transfer on its destination: the source, the clone stack's pieces and
/// where it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferRecord {
    pub id: TransferId,
    pub volume_id: VolumeId,
    pub source: SourceRecord,
    pub phase: TransferPhase,
    /// Length of the clone segment (the source's size when the move began).
    pub clone_bytes: u64,
    pub region_bytes: u64,
    pub hydration_threshold: u32,
    pub hydration_batch_size: u32,
    /// 0: unlimited.
    #[serde(default)]
    pub max_bytes_per_second: u64,
    /// Thin id of the clone's metadata device.
    pub metadata_thin_id: ThinId,
    pub metadata_bytes: u64,
    pub created_unix: i64,
    #[serde(default)]
    pub finished_unix: Option<i64>,
    /// Why the transfer failed or was aborted; how finalize went.
    #[serde(default)]
    pub message: String,
    /// Measured when finalizing: how long I/O was held, and how long after
    /// the kernel's completion the public device was switched.
    #[serde(default)]
    pub finalize_pause_micros: Option<u64>,
    #[serde(default)]
    pub done_to_finalized_micros: Option<u64>,
    /// The source agent acknowledged releasing its copy.
    #[serde(default)]
    pub source_released: bool,
    /// After an abort: the source agent acknowledged withdrawing its
    /// export.
    #[serde(default)]
    pub export_withdrawn: bool,
    /// The source agent acknowledged that this destination claimed its
    /// export (connected), so the export no longer expires.
    #[serde(default)]
    pub export_claimed: bool,
    /// Finalizing has switched the public table to the local copy; the
    /// clone's metadata may already be gone.
    #[serde(default)]
    pub switched_local: bool,
    /// The clone is `<prefix>-lower-<id>`, beneath the public device's
    /// dm-era, which tracks writes from presentation on; otherwise the
    /// clone is the public device (transfers started before this existed,
    /// and volumes without change tracking).
    #[serde(default, skip_serializing_if = "is_false")]
    pub era_above: bool,
    /// The volume's history tag here when dm-era came up above the clone:
    /// while the volume's history is still this one, its dm-era saw every
    /// write made here since it was presented. `None`: recorded before
    /// this existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arrival_history: Option<u32>,
    /// The hosts the volume comes from, nearest first: the source, then
    /// whatever the source itself was still copying from when it answered
    /// this destination's claim. `None` until the source answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<Vec<String>>,
    /// Done without finalizing here: the host this copy was exported to
    /// holds every byte and released it (a chain A→B→C: this is B). The
    /// copy is dropped and the source released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passed_on_to: Option<String>,
    /// The volume came back onto the copy it left here (a warm copy): the
    /// clone's destination is that copy's thin device, and regions the
    /// source says are unchanged are not copied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub return_trip: Option<ReturnTrip>,
    /// The caller asked to leave the volume's snapshots on the source.
    #[serde(default, skip_serializing_if = "is_false")]
    pub leave_snapshots: bool,
    /// The source's list of the volume's snapshots (its answer to the
    /// claim) was considered here: planned to travel, none offered, or
    /// left there. Until then the source is not released.
    #[serde(default, skip_serializing_if = "is_false")]
    pub snapshots_listed: bool,
    /// The volume's snapshots travelling here after it (oldest first), as
    /// the source listed them; each has a record here, arriving until it
    /// has arrived. Empty: none travel.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotId>,
    /// Those that arrived here: the source deletes exactly these when it
    /// is released.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots_arrived: Vec<SnapshotId>,
    /// Bytes of snapshot content received from the source.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub snapshot_bytes: u64,
}

/// What a return trip knows of the copy it lands on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReturnTrip {
    /// The copy's history tag: the volume's history when it left.
    pub history: u32,
    /// The copy's size: regions beyond it are copied.
    pub copy_bytes: u64,
    /// Bytes of the regions marked as held without copying; `None` until
    /// the source answered what changed.
    pub skipped_bytes: Option<u64>,
}

/// Where a transfer copies from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SourceRecord {
    /// A block device already present on this host.
    Device {
        path: String,
        /// What identified the device at the start (see
        /// `dm::topology::identity`); a device found at `path` later must
        /// be the same. Absent in records from before it was kept.
        #[serde(default)]
        identity: Option<String>,
    },
    /// Another agent's NVMe/TCP export.
    NvmeTcp {
        subsystem_nqn: String,
        address: String,
        port: u32,
        agent_endpoint: String,
        /// The export's release token, presented to the source agent.
        /// Absent in records from before tokens, and when the caller gave
        /// none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        release_token: Option<ReleaseToken>,
        /// The DH-HMAC-CHAP secrets to connect with; `None` without
        /// authentication.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        auth: Option<DhchapKeys>,
    },
}

impl SourceRecord {
    /// Where the copy comes from, for people: "nvme-tcp <address>:<port>
    /// <subsystem NQN>" or "device <path>".
    pub fn describe(&self) -> String {
        match self {
            SourceRecord::Device { path, .. } => format!("device {path}"),
            SourceRecord::NvmeTcp {
                subsystem_nqn,
                address,
                port,
                ..
            } => format!("nvme-tcp {address}:{port} {subsystem_nqn}"),
        }
    }
}

impl TransferRecord {
    /// The endpoint of a source agent that has yet to confirm it dropped
    /// its copy; `None` for a local source or one that confirmed.
    pub fn source_to_release(&self) -> Option<&str> {
        match &self.source {
            SourceRecord::NvmeTcp { agent_endpoint, .. }
                if !agent_endpoint.is_empty() && !self.source_released =>
            {
                Some(agent_endpoint)
            }
            _ => None,
        }
    }

    /// After an abort: the source agent that has yet to confirm it
    /// withdrew its export, and the token that lets us ask. `None` where
    /// nobody can be asked (no endpoint or no token) or it confirmed.
    pub fn export_to_withdraw(&self) -> Option<(&str, &ReleaseToken)> {
        match &self.source {
            SourceRecord::NvmeTcp {
                agent_endpoint,
                release_token: Some(token),
                ..
            } if !agent_endpoint.is_empty() && !self.export_withdrawn => {
                Some((agent_endpoint, token))
            }
            _ => None,
        }
    }

    /// While the transfer runs: the source agent that has yet to confirm
    /// our claim of its export, and the token that proves it. `None` where
    /// nobody can be asked or it confirmed.
    pub fn export_to_claim(&self) -> Option<(&str, &ReleaseToken)> {
        self.source_agent()
            .filter(|_| !self.export_claimed && !self.phase.is_finished())
    }

    /// Bytes a return trip marked held without copying (0 for any other).
    pub fn skipped_bytes(&self) -> u64 {
        self.return_trip
            .as_ref()
            .and_then(|trip| trip.skipped_bytes)
            .unwrap_or(0)
    }

    /// Whether `tracking` is the history that began when this transfer
    /// presented the volume (dm-era above the clone from the start), so it
    /// knows every write made here since.
    pub fn history_began_with(&self, tracking: &ChangeTracking) -> bool {
        self.era_above && self.arrival_history == Some(tracking.history)
    }

    /// Done here while the source's list of the volume's snapshots was
    /// never considered (the volume arrived before the claim's answer did):
    /// the source is asked for it before it is released.
    pub fn snapshots_unlisted(&self) -> bool {
        !self.leave_snapshots
            && !self.snapshots_listed
            && self.snapshots.is_empty()
            && self.passed_on_to.is_none()
            && self.source_to_release().is_some()
            && self.source_agent().is_some()
    }

    /// The source agent's endpoint and the export's release token, for a
    /// source that is another agent's export.
    pub fn source_agent(&self) -> Option<(&str, &ReleaseToken)> {
        match &self.source {
            SourceRecord::NvmeTcp {
                agent_endpoint,
                release_token: Some(token),
                ..
            } if !agent_endpoint.is_empty() => Some((agent_endpoint, token)),
            _ => None,
        }
    }

    /// How many moves are in flight up to this destination, where known.
    pub fn chain_depth(&self) -> Option<usize> {
        self.upstream.as_ref().map(Vec::len)
    }

    pub fn release_token(&self) -> Option<&ReleaseToken> {
        match &self.source {
            SourceRecord::NvmeTcp { release_token, .. } => release_token.as_ref(),
            SourceRecord::Device { .. } => None,
        }
    }
}

impl Record for TransferRecord {
    const TABLE: Table = TRANSFERS;
    fn key(&self) -> &str {
        self.id.as_str()
    }
}

type Table = TableDefinition<'static, &'static str, &'static [u8]>;

/// A kind of record kept in its own table, keyed by its id.
pub trait Record: Serialize + for<'de> Deserialize<'de> {
    const TABLE: Table;
    fn key(&self) -> &str;
}

impl Record for VolumeRecord {
    const TABLE: Table = VOLUMES;
    fn key(&self) -> &str {
        self.id.as_str()
    }
}

/// One change of a transaction.
pub enum Change {
    /// Fails the whole transaction if the key exists.
    Insert {
        table: Table,
        key: String,
        bytes: Vec<u8>,
    },
    Put {
        table: Table,
        key: String,
        bytes: Vec<u8>,
    },
    Remove {
        table: Table,
        key: String,
    },
}

impl std::fmt::Debug for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use redb::TableHandle;
        let (op, table, key) = match self {
            Change::Insert { table, key, .. } => ("insert", table, key),
            Change::Put { table, key, .. } => ("put", table, key),
            Change::Remove { table, key } => ("remove", table, key),
        };
        write!(f, "{op} {}/{key}", table.name())
    }
}

impl Change {
    pub fn insert<R: Record>(record: &R) -> Result<Self, AgentError> {
        Ok(Change::Insert {
            table: R::TABLE,
            key: record.key().to_owned(),
            bytes: encode(record)?,
        })
    }

    pub fn put<R: Record>(record: &R) -> Result<Self, AgentError> {
        Ok(Change::Put {
            table: R::TABLE,
            key: record.key().to_owned(),
            bytes: encode(record)?,
        })
    }

    pub fn remove<R: Record>(key: impl AsRef<str>) -> Self {
        let key = key.as_ref();
        Change::Remove {
            table: R::TABLE,
            key: key.to_owned(),
        }
    }
}

/// Handle on the state database. Cheap to clone; every call blocks on disk
/// I/O (commits fsync), so async callers run it on the blocking pool.
#[derive(Debug, Clone)]
pub struct Store {
    db: Arc<Database>,
    path: PathBuf,
}

impl Store {
    /// Opens (or creates) `<state_dir>/state.redb`.
    pub fn open(state_dir: &Path) -> Result<Self, AgentError> {
        let path = state_dir.join(STORE_FILE);
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|err| match err {
                redb::DatabaseError::DatabaseAlreadyOpen => AgentError::Unavailable {
                    reason: format!(
                        "the state store {} is in use by another process: another dmclone-agent runs with this state_dir",
                        path.display()
                    ),
                },
                other => store_error(&path, "open", other),
            })?;
        let store = Self {
            db: Arc::new(db),
            path,
        };
        store.check_schema()?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check_schema(&self) -> Result<(), AgentError> {
        let txn = self.write()?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.err("open meta", e))?;
            let found = meta
                .get(KEY_SCHEMA)
                .map_err(|e| self.err("read schema", e))?
                .map(|v| decode::<u32>(&self.path, v.value()))
                .transpose()?;
            match found {
                None => {
                    meta.insert(KEY_SCHEMA, encode(&SCHEMA_VERSION)?.as_slice())
                        .map_err(|e| self.err("write schema", e))?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(other) => {
                    return Err(AgentError::Unavailable {
                        reason: format!(
                            "the state store {} has schema version {other}; this agent knows version {SCHEMA_VERSION}: run the agent version that wrote it",
                            self.path.display()
                        ),
                    });
                }
            }
            for table in [VOLUMES, TRANSFERS, SNAPSHOTS] {
                txn.open_table(table)
                    .map_err(|e| self.err("open tables", e))?;
            }
        }
        txn.commit().map_err(|e| self.err("commit", e))
    }

    /// The node id kept in the store, made from `generate` on first use.
    pub fn node_id(&self, generate: impl FnOnce() -> String) -> Result<String, AgentError> {
        self.meta_or_init(KEY_NODE_ID, generate)
    }

    /// The NVMe host id kept in the store, made from `generate` on first use.
    pub fn host_id(&self, generate: impl FnOnce() -> String) -> Result<String, AgentError> {
        self.meta_or_init(KEY_HOST_ID, generate)
    }

    fn meta_or_init(
        &self,
        key: &str,
        generate: impl FnOnce() -> String,
    ) -> Result<String, AgentError> {
        if let Some(value) = self.meta::<String>(key)? {
            return Ok(value);
        }
        let value = generate();
        self.put_meta(key, &value)?;
        Ok(value)
    }

    /// One record by key.
    pub fn get<R: Record>(&self, key: &str) -> Result<Option<R>, AgentError> {
        let txn = self.db.begin_read().map_err(|e| self.err("read", e))?;
        let table = txn
            .open_table(R::TABLE)
            .map_err(|e| self.err("open table", e))?;
        table
            .get(key)
            .map_err(|e| self.err("read record", e))?
            .map(|v| decode(&self.path, v.value()))
            .transpose()
    }

    /// Every record of a kind, in key order.
    pub fn all<R: Record>(&self) -> Result<Vec<R>, AgentError> {
        let txn = self.db.begin_read().map_err(|e| self.err("read", e))?;
        let table = txn
            .open_table(R::TABLE)
            .map_err(|e| self.err("open table", e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| self.err("list records", e))? {
            let (_, value) = entry.map_err(|e| self.err("list records", e))?;
            out.push(decode(&self.path, value.value())?);
        }
        Ok(out)
    }

    pub fn volume(&self, id: &VolumeId) -> Result<Option<VolumeRecord>, AgentError> {
        self.get(id.as_str())
    }

    pub fn volumes(&self) -> Result<Vec<VolumeRecord>, AgentError> {
        self.all()
    }

    /// Applies every change in one transaction: all or nothing.
    pub fn commit(&self, changes: Vec<Change>) -> Result<(), AgentError> {
        self.allocate_and_commit(0, |_| Ok(changes)).map(drop)
    }

    /// Hands out `count` fresh thin ids and applies the changes `build` makes
    /// with them, in one transaction: an id is never handed out twice, and
    /// never without the records that use it.
    pub fn allocate_and_commit(
        &self,
        count: u32,
        build: impl FnOnce(&[ThinId]) -> Result<Vec<Change>, AgentError>,
    ) -> Result<Vec<ThinId>, AgentError> {
        let txn = self.write()?;
        let ids = {
            let mut meta = txn.open_table(META).map_err(|e| self.err("open meta", e))?;
            let next = meta
                .get(KEY_NEXT_THIN_ID)
                .map_err(|e| self.err("read thin id", e))?
                .map(|v| decode::<u32>(&self.path, v.value()))
                .transpose()?
                .unwrap_or(FIRST_THIN_ID);
            if next.saturating_add(count) > MAX_THIN_ID + 1 {
                return Err(AgentError::ResourceExhausted {
                    reason: format!(
                        "the pool's thin device ids are used up ({MAX_THIN_ID} were handed out)"
                    ),
                });
            }
            if count > 0 {
                meta.insert(KEY_NEXT_THIN_ID, encode(&(next + count))?.as_slice())
                    .map_err(|e| self.err("write thin id", e))?;
            }
            (next..next + count).map(ThinId).collect::<Vec<_>>()
        };
        for change in build(&ids)? {
            self.apply(&txn, change)?;
        }
        txn.commit().map_err(|e| self.err("commit", e))?;
        Ok(ids)
    }

    /// [`Store::allocate_and_commit`] for one fresh thin id.
    pub fn allocate_one_and_commit(
        &self,
        build: impl FnOnce(ThinId) -> Result<Vec<Change>, AgentError>,
    ) -> Result<ThinId, AgentError> {
        let ids = self.allocate_and_commit(1, |ids| build(ids[0]))?;
        Ok(ids[0])
    }

    fn apply(&self, txn: &redb::WriteTransaction, change: Change) -> Result<(), AgentError> {
        let (definition, key) = match &change {
            Change::Insert { table, key, .. }
            | Change::Put { table, key, .. }
            | Change::Remove { table, key } => (*table, key.clone()),
        };
        let mut table = txn
            .open_table(definition)
            .map_err(|e| self.err("open table", e))?;
        match change {
            Change::Insert { bytes, .. } => {
                let exists = table
                    .get(key.as_str())
                    .map_err(|e| self.err("read record", e))?
                    .is_some();
                if exists {
                    return Err(AgentError::Internal(format!(
                        "record {key} is already in the store"
                    )));
                }
                table
                    .insert(key.as_str(), bytes.as_slice())
                    .map_err(|e| self.err("write record", e))?;
            }
            Change::Put { bytes, .. } => {
                table
                    .insert(key.as_str(), bytes.as_slice())
                    .map_err(|e| self.err("write record", e))?;
            }
            Change::Remove { .. } => {
                table
                    .remove(key.as_str())
                    .map_err(|e| self.err("remove record", e))?;
            }
        }
        Ok(())
    }

    /// Removes each of `ids` whose record `removable` still judges so, given
    /// the volume record it names, in one transaction: a record changed since
    /// the caller chose it is judged as it is now. Returns how many went.
    pub fn remove_transfers_if(
        &self,
        ids: &[TransferId],
        removable: impl Fn(&TransferRecord, Option<&VolumeRecord>) -> bool,
    ) -> Result<usize, AgentError> {
        let txn = self.write()?;
        let mut removed = 0;
        {
            let mut transfers = txn
                .open_table(TRANSFERS)
                .map_err(|e| self.err("open table", e))?;
            let volumes = txn
                .open_table(VOLUMES)
                .map_err(|e| self.err("open table", e))?;
            for id in ids {
                let transfer: Option<TransferRecord> = transfers
                    .get(id.as_str())
                    .map_err(|e| self.err("read record", e))?
                    .map(|v| decode(&self.path, v.value()))
                    .transpose()?;
                let Some(transfer) = transfer else { continue };
                let volume: Option<VolumeRecord> = volumes
                    .get(transfer.volume_id.as_str())
                    .map_err(|e| self.err("read record", e))?
                    .map(|v| decode(&self.path, v.value()))
                    .transpose()?;
                if removable(&transfer, volume.as_ref()) {
                    transfers
                        .remove(id.as_str())
                        .map_err(|e| self.err("remove record", e))?;
                    removed += 1;
                }
            }
        }
        txn.commit().map_err(|e| self.err("commit", e))?;
        Ok(removed)
    }

    /// Writes a new volume record with freshly allocated thin ids (the
    /// volume's, and its era metadata's when it tracks changes).
    pub fn insert_volume_with_new_thin_id(
        &self,
        record: VolumeRecord,
    ) -> Result<VolumeRecord, AgentError> {
        let ids = self.allocate_and_commit(record.thin_ids_needed(), |ids| {
            let mut record = record.clone();
            record.take_thin_ids(&mut ids.iter().copied());
            Ok(vec![Change::insert(&record)?])
        })?;
        let mut record = record;
        record.take_thin_ids(&mut ids.into_iter());
        Ok(record)
    }

    pub fn put_volume(&self, record: &VolumeRecord) -> Result<(), AgentError> {
        self.commit(vec![Change::put(record)?])
    }

    pub fn remove_volume(&self, id: &VolumeId) -> Result<(), AgentError> {
        self.commit(vec![Change::remove::<VolumeRecord>(id.as_str())])
    }

    fn meta<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<Option<T>, AgentError> {
        let txn = self.db.begin_read().map_err(|e| self.err("read", e))?;
        let table = txn.open_table(META).map_err(|e| self.err("open meta", e))?;
        table
            .get(key)
            .map_err(|e| self.err("read meta", e))?
            .map(|v| decode(&self.path, v.value()))
            .transpose()
    }

    fn put_meta<T: Serialize>(&self, key: &str, value: &T) -> Result<(), AgentError> {
        let txn = self.write()?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.err("open meta", e))?;
            meta.insert(key, encode(value)?.as_slice())
                .map_err(|e| self.err("write meta", e))?;
        }
        txn.commit().map_err(|e| self.err("commit", e))
    }

    fn write(&self) -> Result<redb::WriteTransaction, AgentError> {
        self.db
            .begin_write()
            .map_err(|e| self.err("begin write", e))
    }

    fn err(&self, op: &str, err: impl std::fmt::Display) -> AgentError {
        store_error(&self.path, op, err)
    }
}

fn store_error(path: &Path, op: &str, err: impl std::fmt::Display) -> AgentError {
    AgentError::Store {
        path: path.to_owned(),
        reason: format!("{op}: {err}"),
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, AgentError> {
    serde_json::to_vec(value).map_err(|err| AgentError::Internal(format!("encode record: {err}")))
}

/// A record that does not decode stops the agent: treating it as absent would
/// forget a volume.
fn decode<T: for<'de> Deserialize<'de>>(path: &Path, bytes: &[u8]) -> Result<T, AgentError> {
    serde_json::from_slice(bytes).map_err(|err| AgentError::Store {
        path: path.to_owned(),
        reason: format!(
            "a record does not decode ({err}): {}",
            String::from_utf8_lossy(bytes)
        ),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn record(id: &str) -> VolumeRecord {
        crate::records::new_record(
            &VolumeId::parse(id).unwrap_or_else(|e| panic!("{e}")),
            1 << 30,
        )
    }

    const A: &str = "0b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11";
    const B: &str = "1b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11";

    #[test]
    fn records_and_thin_ids_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let a = store.insert_volume_with_new_thin_id(record(A)).unwrap();
            let b = store.insert_volume_with_new_thin_id(record(B)).unwrap();
            assert_eq!((a.thin_id, b.thin_id), (ThinId(1), ThinId(2)));
            let mut ready = a.clone();
            ready.pending = None;
            ready.published = true;
            store.put_volume(&ready).unwrap();
            store.remove_volume(&b.id).unwrap();
            assert_eq!(store.node_id(|| "n1".into()).unwrap(), "n1");
        }
        let store = Store::open(dir.path()).unwrap();
        let all = store.volumes().unwrap();
        assert_eq!(all.len(), 1);
        assert!(all[0].published && all[0].pending.is_none());
        assert_eq!(store.node_id(|| "other".into()).unwrap(), "n1");
        // Ids are never handed out twice, even after a removal.
        let c = store
            .insert_volume_with_new_thin_id(record("2b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11"))
            .unwrap();
        assert_eq!(c.thin_id, ThinId(3));
    }

    #[test]
    fn a_tracked_volume_gets_a_second_thin_id_for_its_era_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut tracked = record(A);
        tracked.tracking = Some(ChangeTracking {
            history: 9,
            metadata_thin_id: ThinId(0),
            metadata_bytes: 17 << 20,
            block_bytes: 64 << 10,
            known_from_era: Some(0),
            origin: None,
        });
        let a = store.insert_volume_with_new_thin_id(tracked).unwrap();
        let b = store.insert_volume_with_new_thin_id(record(B)).unwrap();
        assert_eq!(a.thin_id, ThinId(1));
        assert_eq!(a.tracking.as_ref().unwrap().metadata_thin_id, ThinId(2));
        assert_eq!(b.thin_id, ThinId(3));
        let stored = store.volume(&VolumeId::parse(A).unwrap()).unwrap().unwrap();
        assert_eq!(stored, a, "the store holds the ids it handed out");
    }

    #[test]
    fn a_second_agent_on_the_same_state_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("another dmclone-agent"), "{err}");
    }

    #[test]
    fn inserting_an_existing_id_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.insert_volume_with_new_thin_id(record(A)).unwrap();
        assert!(store.insert_volume_with_new_thin_id(record(A)).is_err());
        let next = store.insert_volume_with_new_thin_id(record(B)).unwrap();
        assert_eq!(
            next.thin_id,
            ThinId(2),
            "the failed insert must not use up an id"
        );
    }

    #[test]
    fn pending_steps_round_trip_as_tagged_json() {
        let mut r = record(A);
        r.pending = Some(Pending::Extend { from_bytes: 5 });
        let text = String::from_utf8(encode(&r).unwrap()).unwrap();
        assert!(
            text.contains(r#""pending":{"op":"extend","from_bytes":5}"#),
            "{text}"
        );
        assert_eq!(
            decode::<VolumeRecord>(Path::new("x"), text.as_bytes()).unwrap(),
            r
        );
    }

    #[test]
    fn where_a_snapshot_that_arrived_differs_is_kept_as_pairs() {
        let snapshot = SnapshotRecord {
            id: SnapshotId::parse("10000000-0000-4000-8000-000000000001").unwrap(),
            volume_id: VolumeId::parse(A).unwrap(),
            thin_id: ThinId(4),
            size_bytes: 1 << 20,
            created_unix: 1,
            pending: None,
            era: None,
            arrived_from: Some(ArrivedFrom {
                era: (7 << 32) | 2,
                differs: vec![0..4096, 65536..131072],
            }),
        };
        let text = String::from_utf8(encode(&snapshot).unwrap()).unwrap();
        assert!(
            text.contains(r#""differs":[[0,4096],[65536,131072]]"#),
            "{text}"
        );
        assert_eq!(
            decode::<SnapshotRecord>(Path::new("x"), text.as_bytes()).unwrap(),
            snapshot
        );
        // Records from before arrived snapshots kept anything read as none.
        let older = text.replace(
            &text[text.find(r#","arrived_from""#).unwrap()..text.len() - 1],
            "",
        );
        assert_eq!(
            decode::<SnapshotRecord>(Path::new("x"), older.as_bytes())
                .unwrap()
                .arrived_from,
            None
        );
    }
}

#[cfg(test)]
mod compat_tests;
