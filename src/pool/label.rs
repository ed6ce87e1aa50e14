//! The pool label: the first 4 KiB of the device the pool lives on, saying
//! where metadata and data sit. Pure code: layout planning, encoding, decoding.
//!
//! The label makes a pool device self-describing (the layout survives a lost
//! state directory) and lets the agent tell its own device from someone
//! else's: a device with neither a valid label nor a blank first MiB is never
//! written to.

use serde::{Deserialize, Serialize};

use crate::config::{MAX_METADATA_SIZE, MIB, Size};

pub const LABEL_BYTES: usize = 4096;
/// Metadata starts here; the label and alignment padding sit before it.
pub const METADATA_OFFSET: u64 = MIB;
/// The region that must be all zero for a device to count as blank.
pub const BLANK_CHECK_BYTES: usize = MIB as usize;
const MAGIC: &str = "dmclone pool label\n";
const VERSION: u32 = 1;
const MIN_METADATA: u64 = 16 * MIB;
const MIN_DATA_BLOCKS: u64 = 16;

/// Where things are on the pool device, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolLayout {
    pub version: u32,
    pub metadata_offset: u64,
    pub metadata_bytes: u64,
    pub data_offset: u64,
    pub data_bytes: u64,
    pub block_bytes: u64,
}

impl PoolLayout {
    /// Lays out a fresh pool on a device of `device_bytes`.
    pub fn plan(
        device_bytes: u64,
        block_bytes: u64,
        metadata_bytes: Option<u64>,
    ) -> Result<Self, String> {
        let metadata_bytes = metadata_bytes.unwrap_or_else(|| default_metadata(device_bytes));
        let data_offset = round_up(METADATA_OFFSET + metadata_bytes, block_bytes.max(MIB));
        let data_bytes = device_bytes.saturating_sub(data_offset) / block_bytes * block_bytes;
        if data_bytes < MIN_DATA_BLOCKS * block_bytes {
            return Err(format!(
                "{} is too small for a pool with {} of metadata and {} blocks",
                Size(device_bytes),
                Size(metadata_bytes),
                Size(block_bytes)
            ));
        }
        Ok(Self {
            version: VERSION,
            metadata_offset: METADATA_OFFSET,
            metadata_bytes,
            data_offset,
            data_bytes,
            block_bytes,
        })
    }

    pub fn data_blocks(&self) -> u64 {
        self.data_bytes / self.block_bytes
    }

    /// The label block: magic line, JSON, CRC line, zero padding.
    pub fn encode(&self) -> Vec<u8> {
        let body = format!(
            "{MAGIC}{}\n",
            serde_json::to_string(self).unwrap_or_default()
        );
        let mut block =
            format!("{body}crc32 {:08x}\n", crc32fast::hash(body.as_bytes())).into_bytes();
        block.resize(LABEL_BYTES, 0);
        block
    }

    /// What the first 4 KiB of a device say: our label, blank, or foreign.
    pub fn decode(block: &[u8]) -> Found {
        if block.iter().all(|b| *b == 0) {
            return Found::Blank;
        }
        let text_end = block.iter().position(|b| *b == 0).unwrap_or(block.len());
        let Ok(text) = std::str::from_utf8(&block[..text_end]) else {
            return Found::Foreign;
        };
        let Some(rest) = text.strip_prefix(MAGIC) else {
            return Found::Foreign;
        };
        let Some((json, crc_line)) = rest.split_once('\n') else {
            return Found::Damaged("the label is cut short".into());
        };
        let body_len = MAGIC.len() + json.len() + 1;
        let expected = format!("crc32 {:08x}\n", crc32fast::hash(&block[..body_len]));
        if crc_line != expected {
            return Found::Damaged("the label's checksum does not match".into());
        }
        match serde_json::from_str::<PoolLayout>(json) {
            Ok(layout) if layout.version == VERSION => Found::Label(layout),
            Ok(layout) => {
                Found::Damaged(format!("label version {} is not {VERSION}", layout.version))
            }
            Err(err) => Found::Damaged(format!("the label does not decode: {err}")),
        }
    }
}

/// What sits at the start of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    Label(PoolLayout),
    /// All zero: free for a new pool (after the whole first MiB is checked).
    Blank,
    /// Someone else's data: never touched.
    Foreign,
    /// Our magic, but the rest is not readable: never touched either.
    Damaged(String),
}

/// data / 512, i.e. twice what mapping every 64 KiB block needs, within the
/// kernel's limits.
fn default_metadata(device_bytes: u64) -> u64 {
    round_up(device_bytes / 512, MIB).clamp(MIN_METADATA, MAX_METADATA_SIZE)
}

fn round_up(value: u64, unit: u64) -> u64 {
    value.div_ceil(unit) * unit
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use proptest::prelude::*;

    use super::*;
    use crate::config::{GIB, KIB, TIB};

    #[test]
    fn small_and_large_devices_get_sensible_layouts() {
        let small = PoolLayout::plan(GIB, 64 * KIB, None).unwrap();
        assert_eq!(small.metadata_offset, MIB);
        assert_eq!(small.metadata_bytes, 16 * MIB);
        assert_eq!(small.data_offset, 17 * MIB);
        assert_eq!(small.data_bytes, GIB - 17 * MIB);
        let large = PoolLayout::plan(4 * TIB, 64 * KIB, None).unwrap();
        assert_eq!(large.metadata_bytes, 8 * GIB);
        let huge = PoolLayout::plan(64 * TIB, 64 * KIB, None).unwrap();
        assert_eq!(huge.metadata_bytes, MAX_METADATA_SIZE);
    }

    #[test]
    fn data_starts_on_a_block_boundary_and_ends_on_one() {
        let layout = PoolLayout::plan(10 * GIB + 12345, 4 * MIB, Some(33 * MIB)).unwrap();
        assert_eq!(layout.data_offset % (4 * MIB), 0);
        assert_eq!(layout.data_bytes % (4 * MIB), 0);
        assert!(layout.data_offset >= METADATA_OFFSET + 33 * MIB);
        assert!(layout.data_offset + layout.data_bytes <= 10 * GIB + 12345);
    }

    #[test]
    fn a_device_too_small_is_refused_with_sizes() {
        let err = PoolLayout::plan(17 * MIB, 64 * KIB, None).unwrap_err();
        assert!(err.contains("17 MiB is too small"), "{err}");
    }

    #[test]
    fn labels_round_trip_and_damage_is_detected() {
        let layout = PoolLayout::plan(GIB, 64 * KIB, None).unwrap();
        let block = layout.encode();
        assert_eq!(block.len(), LABEL_BYTES);
        assert_eq!(PoolLayout::decode(&block), Found::Label(layout));

        let mut flipped = block.clone();
        let digit = flipped.iter().position(|b| *b == b'1').unwrap();
        flipped[digit] = b'2';
        assert!(matches!(PoolLayout::decode(&flipped), Found::Damaged(_)));

        assert_eq!(PoolLayout::decode(&[0u8; LABEL_BYTES]), Found::Blank);
        let mut ext4ish = vec![0u8; LABEL_BYTES];
        ext4ish[1080] = 0x53;
        assert_eq!(PoolLayout::decode(&ext4ish), Found::Foreign);
    }

    proptest! {
        #[test]
        fn arbitrary_blocks_never_panic(block in proptest::collection::vec(any::<u8>(), 0..LABEL_BYTES)) {
            let _ = PoolLayout::decode(&block);
        }

        #[test]
        fn planned_layouts_fit_their_device(
            device in (64 * MIB)..(100 * TIB),
            block_shift in 0u32..8,
        ) {
            let block = (64 * KIB) << block_shift;
            if let Ok(layout) = PoolLayout::plan(device, block, None) {
                prop_assert!(layout.data_offset >= layout.metadata_offset + layout.metadata_bytes);
                prop_assert!(layout.data_offset + layout.data_bytes <= device);
                prop_assert_eq!(layout.data_bytes % block, 0);
                prop_assert_eq!(PoolLayout::decode(&layout.encode()), Found::Label(layout));
            }
        }
    }
}
