//! `dmclonectl volume ...`

use clap::{ArgGroup, Subcommand};
use dmclone::{
    api::proto::v1::{
        CreateVolumeRequest, DeleteVolumeRequest, ExportVolumeRequest, ExtendVolumeRequest,
        GetVolumeRequest, ListVolumesRequest, PublishVolumeRequest, UnexportVolumeRequest,
        UnpublishVolumeRequest, Volume, get_changed_blocks_request::Since,
        volumes_client::VolumesClient,
    },
    api::volume_state_name,
    config::parse_size,
};
use serde_json::json;
use tonic::transport::Channel;

use crate::{Failure, output};

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Every volume with its size, allocation and state.
    List {
        /// Also the warm copies of volumes that moved away.
        #[arg(long)]
        all: bool,
    },
    /// One volume.
    Show { id: String },
    /// Create an empty volume (SIZE like 10G; rounded up to whole MiB).
    Create {
        id: String,
        #[arg(value_parser = parse_size)]
        size: u64,
    },
    /// Delete a volume (refused while published).
    Delete { id: String },
    /// Grow a volume to SIZE.
    Extend {
        id: String,
        #[arg(value_parser = parse_size)]
        size: u64,
    },
    /// Make /dev/mapper/<prefix>-<id> present and print its path.
    Publish { id: String },
    /// Remove the public device (refused while it is open).
    Unpublish { id: String },
    /// Export over NVMe/TCP to the one host it moves to (or that attaches it).
    Export {
        id: String,
        /// The destination's host NQN (`dmclonectl node` there).
        #[arg(long)]
        host_nqn: String,
        /// The source of a move: print the release token the destination
        /// needs (`transfer start --release-token`) to release this copy.
        #[arg(long)]
        for_transfer: bool,
    },
    /// Remove the export. A move's source needs its release token or --force.
    Unexport {
        id: String,
        /// The release token `volume export --for-transfer` printed.
        #[arg(long, env = "DMCLONE_RELEASE_TOKEN", hide_env_values = true)]
        release_token: Option<String>,
        /// Withdraw a move's source without its token: its destination
        /// loses the source (audited).
        #[arg(long)]
        force: bool,
    },
    /// Mark a point in the volume's change history; print its era.
    Checkpoint { id: String },
    /// Extents written since a checkpoint's era or a snapshot.
    #[command(group(ArgGroup::new("since").required(true)))]
    Changes {
        id: String,
        /// An era from `volume checkpoint`.
        #[arg(long, value_name = "ERA", group = "since")]
        since_era: Option<u64>,
        /// A snapshot of the volume.
        #[arg(long, value_name = "SNAPSHOT_ID", group = "since")]
        since_snapshot: Option<String>,
    },
}

pub async fn run(channel: Channel, command: VolumeCommand, as_json: bool) -> Result<(), Failure> {
    let mut client = VolumesClient::new(channel.clone());
    match command {
        VolumeCommand::List { all } => {
            let volumes = client
                .list_volumes(ListVolumesRequest { include_warm: all })
                .await?
                .into_inner()
                .volumes;
            show(&volumes, as_json);
        }
        VolumeCommand::Show { id } => {
            let volume = client
                .get_volume(GetVolumeRequest { volume_id: id })
                .await?
                .into_inner();
            show(&[volume], as_json);
        }
        VolumeCommand::Create { id, size } => {
            let volume = client
                .create_volume(CreateVolumeRequest {
                    volume_id: id,
                    size_bytes: size,
                    ..Default::default()
                })
                .await?
                .into_inner();
            show(&[volume], as_json);
        }
        VolumeCommand::Delete { id } => {
            client
                .delete_volume(DeleteVolumeRequest {
                    volume_id: id.clone(),
                })
                .await?;
            done(as_json, "deleted", &id);
        }
        VolumeCommand::Extend { id, size } => {
            let volume = client
                .extend_volume(ExtendVolumeRequest {
                    volume_id: id,
                    new_size_bytes: size,
                })
                .await?
                .into_inner();
            show(&[volume], as_json);
        }
        VolumeCommand::Publish { id } => {
            let path = client
                .publish_volume(PublishVolumeRequest {
                    volume_id: id.clone(),
                })
                .await?
                .into_inner()
                .device_path;
            if as_json {
                output::json(&json!({ "volume_id": id, "device_path": path }));
            } else {
                println!("{path}");
            }
        }
        VolumeCommand::Export {
            id,
            host_nqn,
            for_transfer,
        } => {
            let request = ExportVolumeRequest {
                volume_id: id,
                host_nqn,
                for_transfer,
            };
            return crate::transfer::export(channel, request, as_json).await;
        }
        VolumeCommand::Unexport {
            id,
            release_token,
            force,
        } => {
            let request = UnexportVolumeRequest {
                volume_id: id,
                release_token: release_token.unwrap_or_default(),
                force,
            };
            return crate::transfer::unexport(channel, request, as_json).await;
        }
        VolumeCommand::Checkpoint { id } => {
            return crate::changes::checkpoint(channel, id, as_json).await;
        }
        VolumeCommand::Changes {
            id,
            since_era,
            since_snapshot,
        } => {
            let since = match (since_era, since_snapshot) {
                (Some(era), _) => Since::Era(era),
                (None, Some(snapshot)) => Since::SnapshotId(snapshot),
                (None, None) => {
                    return Err(Failure::Usage(
                        "name the start: --since-era ERA or --since-snapshot SNAPSHOT_ID".into(),
                    ));
                }
            };
            return crate::changes::changes(channel, id, since, as_json).await;
        }
        VolumeCommand::Unpublish { id } => {
            client
                .unpublish_volume(UnpublishVolumeRequest {
                    volume_id: id.clone(),
                })
                .await?;
            done(as_json, "unpublished", &id);
        }
    }
    Ok(())
}

fn done(as_json: bool, what: &str, id: &str) {
    if as_json {
        output::json(&json!({ "volume_id": id, "result": what }));
    } else {
        println!("{what} {id}");
    }
}

fn show(volumes: &[Volume], as_json: bool) {
    if as_json {
        output::json(&json!({ "volumes": volumes.iter().map(to_json).collect::<Vec<_>>() }));
        return;
    }
    let rows: Vec<Vec<String>> = volumes
        .iter()
        .map(|v| {
            vec![
                v.volume_id.clone(),
                output::size(v.size_bytes),
                output::size(v.allocated_bytes),
                volume_state_name(v.state()).to_owned(),
                if v.published {
                    v.device_path.clone()
                } else {
                    "-".into()
                },
            ]
        })
        .collect();
    output::table(&["VOLUME", "SIZE", "ALLOC", "STATE", "DEVICE"], &rows);
}

/// The documented, stable JSON shape of one volume.
pub fn to_json(volume: &Volume) -> serde_json::Value {
    json!({
        "volume_id": volume.volume_id,
        "size_bytes": volume.size_bytes,
        "allocated_bytes": volume.allocated_bytes,
        "state": volume_state_name(volume.state()),
        "state_reason": volume.state_reason,
        "published": volume.published,
        "device_path": volume.device_path,
        "change_tracking": volume.change_tracking,
    })
}
