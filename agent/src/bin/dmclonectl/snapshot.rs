//! `dmclonectl snapshot ...`

use clap::Subcommand;
use dmclone::api::{
    proto::v1::{
        CreateSnapshotRequest, DeleteSnapshotRequest, GetSnapshotRequest, ListSnapshotsRequest,
        Snapshot, snapshots_client::SnapshotsClient,
    },
    snapshot_state_name,
};
use serde_json::json;
use tonic::transport::Channel;

use crate::{Failure, output};

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Snapshots of one volume, or of all.
    List {
        #[arg(long)]
        volume: Option<String>,
    },
    /// One snapshot.
    Show {
        id: String,
    },
    /// Take a snapshot of a volume.
    Create {
        /// The snapshot's id (UUID).
        id: String,
        #[arg(long)]
        volume: String,
    },
    Delete {
        id: String,
    },
}

pub async fn run(channel: Channel, command: SnapshotCommand, as_json: bool) -> Result<(), Failure> {
    let mut client = SnapshotsClient::new(channel);
    match command {
        SnapshotCommand::List { volume } => {
            let snapshots = client
                .list_snapshots(ListSnapshotsRequest {
                    volume_id: volume.unwrap_or_default(),
                })
                .await?
                .into_inner()
                .snapshots;
            show(&snapshots, as_json);
        }
        SnapshotCommand::Show { id } => {
            let snapshot = client
                .get_snapshot(GetSnapshotRequest { snapshot_id: id })
                .await?
                .into_inner();
            show(&[snapshot], as_json);
        }
        SnapshotCommand::Create { id, volume } => {
            let snapshot = client
                .create_snapshot(CreateSnapshotRequest {
                    snapshot_id: id,
                    volume_id: volume,
                })
                .await?
                .into_inner();
            show(&[snapshot], as_json);
        }
        SnapshotCommand::Delete { id } => {
            client
                .delete_snapshot(DeleteSnapshotRequest {
                    snapshot_id: id.clone(),
                })
                .await?;
            if as_json {
                output::json(&json!({ "snapshot_id": id, "result": "deleted" }));
            } else {
                println!("deleted {id}");
            }
        }
    }
    Ok(())
}

fn show(snapshots: &[Snapshot], as_json: bool) {
    if as_json {
        let items: Vec<_> = snapshots
            .iter()
            .map(|s| {
                json!({
                    "snapshot_id": s.snapshot_id,
                    "volume_id": s.volume_id,
                    "size_bytes": s.size_bytes,
                    "allocated_bytes": s.allocated_bytes,
                    // null when the volume did not track changes.
                    "era": s.has_era.then_some(s.era),
                    "created_unix_seconds": s.created_unix_seconds,
                    "state": snapshot_state_name(s.state()),
                })
            })
            .collect();
        output::json(&json!({ "snapshots": items }));
        return;
    }
    let rows: Vec<Vec<String>> = snapshots
        .iter()
        .map(|s| {
            vec![
                s.snapshot_id.clone(),
                s.volume_id.clone(),
                snapshot_state_name(s.state()).to_owned(),
                output::size(s.size_bytes),
                output::size(s.allocated_bytes),
                if s.has_era {
                    s.era.to_string()
                } else {
                    "-".into()
                },
            ]
        })
        .collect();
    output::table(
        &["SNAPSHOT", "VOLUME", "STATE", "SIZE", "ALLOC", "ERA"],
        &rows,
    );
}
