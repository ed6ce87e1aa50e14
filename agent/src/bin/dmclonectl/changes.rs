//! `dmclonectl volume checkpoint` and `volume changes`: changed-block
//! tracking with dm-era.

use dmclone::api::proto::v1::{
    Extent, GetChangedBlocksRequest, MarkCheckpointRequest, get_changed_blocks_request::Since,
    snapshots_client::SnapshotsClient,
};
use serde_json::json;
use tonic::transport::Channel;

use crate::{Failure, output};

/// Marks a point in the volume's change history and prints its era.
pub async fn checkpoint(channel: Channel, id: String, as_json: bool) -> Result<(), Failure> {
    let checkpoint = SnapshotsClient::new(channel)
        .mark_checkpoint(MarkCheckpointRequest { volume_id: id })
        .await?
        .into_inner();
    if as_json {
        output::json(&json!({
            "volume_id": checkpoint.volume_id,
            "era": checkpoint.era,
        }));
    } else {
        println!("{}", checkpoint.era);
    }
    Ok(())
}

/// The extents written since an era or a snapshot, read to the end of the
/// stream.
pub async fn changes(
    channel: Channel,
    id: String,
    since: Since,
    as_json: bool,
) -> Result<(), Failure> {
    let mut stream = SnapshotsClient::new(channel)
        .get_changed_blocks(GetChangedBlocksRequest {
            volume_id: id.clone(),
            since: Some(since),
        })
        .await?
        .into_inner();
    let mut changed = Changed::default();
    while let Some(batch) = stream.message().await? {
        changed.since_era = batch.since_era;
        changed.next_era = batch.next_era;
        changed.block_bytes = batch.block_bytes;
        changed.add(batch.extents);
    }
    if as_json {
        output::json(&changed.to_json(&id));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = changed
        .extents
        .iter()
        .map(|e| {
            // The offset exact (it names a block), the length for the eye.
            vec![e.offset_bytes.to_string(), output::size(e.length_bytes)]
        })
        .collect();
    output::table(&["OFFSET", "LENGTH"], &rows);
    println!("{}", changed.summary());
    Ok(())
}

/// The whole answer: every batch's extents, touching ones joined.
#[derive(Debug, Default)]
struct Changed {
    extents: Vec<Extent>,
    since_era: u64,
    next_era: u64,
    block_bytes: u64,
}

impl Changed {
    /// Appends a batch (batches arrive in offset order).
    fn add(&mut self, extents: Vec<Extent>) {
        for extent in extents {
            match self.extents.last_mut() {
                Some(last) if last.offset_bytes + last.length_bytes == extent.offset_bytes => {
                    last.length_bytes += extent.length_bytes;
                }
                _ => self.extents.push(extent),
            }
        }
    }

    fn total_bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.length_bytes).sum()
    }

    fn summary(&self) -> String {
        let count = self.extents.len();
        format!(
            "{count} extent{}, {} ({} bytes) changed since era {}; next era {} (ask since it for what is new); {} blocks",
            if count == 1 { "" } else { "s" },
            output::size(self.total_bytes()),
            self.total_bytes(),
            self.since_era,
            self.next_era,
            output::size(self.block_bytes),
        )
    }

    /// The documented, stable JSON shape of `volume changes --json`.
    fn to_json(&self, volume_id: &str) -> serde_json::Value {
        json!({
            "volume_id": volume_id,
            "since_era": self.since_era,
            "next_era": self.next_era,
            "block_bytes": self.block_bytes,
            "extent_count": self.extents.len(),
            "changed_bytes": self.total_bytes(),
            "extents": self.extents.iter().map(|e| json!({
                "offset_bytes": e.offset_bytes,
                "length_bytes": e.length_bytes,
            })).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extent(offset_bytes: u64, length_bytes: u64) -> Extent {
        Extent {
            offset_bytes,
            length_bytes,
        }
    }

    #[test]
    fn batches_join_into_one_answer() {
        let mut changed = Changed {
            since_era: 3,
            next_era: 5,
            block_bytes: 65536,
            ..Default::default()
        };
        changed.add(vec![extent(0, 65536), extent(196_608, 65536)]);
        changed.add(vec![extent(262_144, 65536), extent(1 << 20, 131_072)]);
        assert_eq!(
            changed.extents,
            vec![
                extent(0, 65536),
                extent(196_608, 131_072),
                extent(1 << 20, 131_072)
            ]
        );
        assert_eq!(
            changed.summary(),
            "3 extents, 320.0KiB (327680 bytes) changed since era 3; next era 5 (ask since it for what is new); 64.0KiB blocks"
        );
        let value = changed.to_json("v");
        assert_eq!(value["extent_count"], 3);
        assert_eq!(value["changed_bytes"], 327_680);
        assert_eq!(value["extents"][1]["length_bytes"], 131_072);
        assert_eq!(
            Changed::default().summary(),
            "0 extents, 0B (0 bytes) changed since era 0; next era 0 (ask since it for what is new); 0B blocks"
        );
    }
}
