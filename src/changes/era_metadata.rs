//! A reader of dm-era's on-disk metadata: the blocks written since an era,
//! read from the metadata snapshot the caller took (`take_metadata_snap`).
//!
//! Format (kernel `dm-era-target.c` and the persistent-data library; see
//! dm-facts §2): 4 KiB little-endian blocks, each checksummed. The
//! superblock names a metadata snapshot, whose copy of the superblock holds
//! the two roots read here: the writeset tree (era -> bitset of the blocks
//! written in that era, not yet digested) and the era array (for every block,
//! the last era a digested writeset saw it written in; 0 = never). A block
//! was written since era N when an archived writeset with key >= N has its
//! bit, or its array entry is >= N. Pure functions of the bytes, over a
//! [`BlockSource`], so tests can feed them anything.

use std::{io, ops::Range};

use crate::error::AgentError;

pub const BLOCK_BYTES: usize = 4096;
const SUPERBLOCK_MAGIC: u64 = 2_126_579_579;
const SUPERBLOCK_CSUM_XOR: u32 = 146_538_381;
const BTREE_CSUM_XOR: u32 = 121_107;
const ARRAY_CSUM_XOR: u32 = 595_846_735;
const INTERNAL_NODE: u32 = 1;
const LEAF_NODE: u32 = 2;
const NODE_HEADER: usize = 32;
const ARRAY_HEADER: usize = 24;
/// Bounds a walk over corrupt metadata that would otherwise loop.
const MAX_DEPTH: usize = 16;

/// Where metadata blocks come from: the metadata device, read directly.
pub trait BlockSource {
    fn read_block(&mut self, block: u64, buf: &mut [u8; BLOCK_BYTES]) -> io::Result<()>;
}

/// One metadata block, checked.
struct Block {
    bytes: Box<[u8; BLOCK_BYTES]>,
}

impl Block {
    fn u32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.bytes[at..at + 4].try_into().unwrap_or([0; 4]))
    }

    fn u64(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.bytes[at..at + 8].try_into().unwrap_or([0; 8]))
    }
}

struct Reader<'a, S: BlockSource> {
    source: &'a mut S,
}

impl<S: BlockSource> Reader<'_, S> {
    fn read(&mut self, block: u64, csum_xor: u32, what: &str) -> Result<Block, AgentError> {
        let mut bytes = Box::new([0u8; BLOCK_BYTES]);
        self.source
            .read_block(block, &mut bytes)
            .map_err(|source| AgentError::Io {
                context: format!("reading dm-era metadata block {block} ({what})"),
                source,
            })?;
        let block_read = Block { bytes };
        let stored = block_read.u32(0);
        let computed = checksum(&block_read.bytes[4..]) ^ csum_xor;
        if stored != computed {
            return Err(corrupt(format!(
                "{what} at block {block} has checksum {stored:#x}, computed {computed:#x}"
            )));
        }
        // Array blocks keep their number after four u32 fields, the others
        // after two.
        let said = block_read.u64(if csum_xor == ARRAY_CSUM_XOR { 16 } else { 8 });
        if said != block {
            return Err(corrupt(format!(
                "{what} at block {block} says it is block {said}"
            )));
        }
        Ok(block_read)
    }

    /// Every (key, value bytes) of a btree, in key order.
    fn btree_entries(
        &mut self,
        root: u64,
        value_size: usize,
        out: &mut Vec<(u64, Vec<u8>)>,
        depth: usize,
    ) -> Result<(), AgentError> {
        if depth > MAX_DEPTH {
            return Err(corrupt("btree deeper than any dm-era writes".into()));
        }
        let node = self.read(root, BTREE_CSUM_XOR, "btree node")?;
        let flags = node.u32(4);
        let entries = node.u32(16) as usize;
        let max_entries = node.u32(20) as usize;
        let node_value_size = node.u32(24) as usize;
        let values_at = NODE_HEADER + max_entries * 8;
        let expected_size = if flags & INTERNAL_NODE != 0 {
            8
        } else {
            value_size
        };
        if entries > max_entries
            || node_value_size != expected_size
            || values_at + max_entries * node_value_size > BLOCK_BYTES
        {
            return Err(corrupt(format!(
                "btree node {root}: {entries} of {max_entries} entries of {node_value_size} bytes"
            )));
        }
        for i in 0..entries {
            let key = node.u64(NODE_HEADER + i * 8);
            let value = &node.bytes[values_at + i * node_value_size..][..node_value_size];
            if flags & INTERNAL_NODE != 0 {
                let child = u64::from_le_bytes(value.try_into().unwrap_or([0; 8]));
                self.btree_entries(child, value_size, out, depth + 1)?;
            } else if flags & LEAF_NODE != 0 {
                out.push((key, value.to_vec()));
            } else {
                return Err(corrupt(format!("btree node {root} has flags {flags:#x}")));
            }
        }
        Ok(())
    }

    /// Calls `each(index, value bytes)` for the first `len` entries of a
    /// dm-array of `value_size`-byte values.
    fn array_values(
        &mut self,
        root: u64,
        value_size: usize,
        len: u64,
        mut each: impl FnMut(u64, &[u8]),
    ) -> Result<(), AgentError> {
        let mut blocks = Vec::new();
        self.btree_entries(root, 8, &mut blocks, 0)?;
        let mut index = 0u64;
        for (key, value) in blocks {
            let block = u64::from_le_bytes(value.try_into().unwrap_or([0; 8]));
            let array = self.read(block, ARRAY_CSUM_XOR, "array block")?;
            let max_entries = u64::from(array.u32(4));
            let entries = array.u32(8) as usize;
            if array.u32(12) as usize != value_size
                || entries as u64 > max_entries
                || ARRAY_HEADER + entries * value_size > BLOCK_BYTES
                || key * max_entries != index
            {
                return Err(corrupt(format!(
                    "array block {block} (index {key}): {entries} of {max_entries} values of {} bytes",
                    array.u32(12)
                )));
            }
            for i in 0..entries {
                if index >= len {
                    return Ok(());
                }
                each(
                    index,
                    &array.bytes[ARRAY_HEADER + i * value_size..][..value_size],
                );
                index += 1;
            }
        }
        Ok(())
    }
}

/// What the metadata says about one volume since `era`.
pub fn written_since<S: BlockSource>(
    source: &mut S,
    era: u32,
) -> Result<Vec<Range<u64>>, AgentError> {
    let mut reader = Reader { source };
    let superblock = reader.read(0, SUPERBLOCK_CSUM_XOR, "superblock")?;
    if superblock.u64(32) != SUPERBLOCK_MAGIC {
        return Err(corrupt(format!(
            "superblock magic {:#x} is not dm-era's",
            superblock.u64(32)
        )));
    }
    let nr_blocks = u64::from(superblock.u32(180));
    let snapshot = superblock.u64(216);
    if snapshot == 0 {
        return Err(AgentError::Internal(
            "dm-era holds no metadata snapshot to read".into(),
        ));
    }
    let held = reader.read(snapshot, SUPERBLOCK_CSUM_XOR, "metadata snapshot")?;
    let (writesets_root, array_root) = (held.u64(200), held.u64(208));

    let mut written = vec![false; nr_blocks as usize];
    let mut writesets = Vec::new();
    reader.btree_entries(writesets_root, 12, &mut writesets, 0)?;
    let oldest_writeset = writesets.first().map(|(key, _)| *key);
    for (key, value) in writesets.iter().filter(|(key, _)| *key >= u64::from(era)) {
        let bits = u64::from(u32::from_le_bytes(value[0..4].try_into().unwrap_or([0; 4])));
        let root = u64::from_le_bytes(value[4..12].try_into().unwrap_or([0; 8]));
        if bits > nr_blocks {
            return Err(corrupt(format!(
                "writeset of era {key} has {bits} bits for {nr_blocks} blocks"
            )));
        }
        reader.array_values(root, 8, bits.div_ceil(64), |word_index, bytes| {
            let word = u64::from_le_bytes(bytes.try_into().unwrap_or([0; 8]));
            for bit in 0..64 {
                let block = word_index * 64 + bit;
                if word & (1 << bit) != 0 && block < bits {
                    written[block as usize] = true;
                }
            }
        })?;
    }
    // Every writeset from `era` on is still undigested: the array holds
    // nothing newer, so it need not be read.
    if oldest_writeset.is_none_or(|oldest| oldest > u64::from(era)) {
        reader.array_values(array_root, 4, nr_blocks, |block, bytes| {
            let last = u32::from_le_bytes(bytes.try_into().unwrap_or([0; 4]));
            if last >= era {
                written[block as usize] = true;
            }
        })?;
    }
    Ok(ranges(&written))
}

/// The eras whose writesets the kernel has not yet digested into the era
/// array, in the held metadata snapshot (for diagnostics and tests).
pub fn undigested_eras<S: BlockSource>(source: &mut S) -> Result<Vec<u64>, AgentError> {
    let mut reader = Reader { source };
    let superblock = reader.read(0, SUPERBLOCK_CSUM_XOR, "superblock")?;
    let held = reader.read(
        superblock.u64(216),
        SUPERBLOCK_CSUM_XOR,
        "metadata snapshot",
    )?;
    let mut writesets = Vec::new();
    reader.btree_entries(held.u64(200), 12, &mut writesets, 0)?;
    Ok(writesets.into_iter().map(|(era, _)| era).collect())
}

/// Runs of `true` as ranges of indices.
fn ranges(flags: &[bool]) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for (i, _) in flags.iter().enumerate().filter(|(_, set)| **set) {
        let i = i as u64;
        match out.last_mut() {
            Some(last) if last.end == i => last.end = i + 1,
            _ => out.push(i..i + 1),
        }
    }
    out
}

/// Linux's `crc32c(~0, data)`: the CRC-32C register without the final
/// inversion the standard checksum applies.
fn checksum(data: &[u8]) -> u32 {
    !crc32c::crc32c(data)
}

fn corrupt(reason: String) -> AgentError {
    AgentError::Internal(format!("dm-era metadata is not as expected: {reason}"))
}

/// Metadata blocks read from the device with O_DIRECT: dm-era writes through
/// its own buffer cache, so the page cache of the device could be stale.
#[derive(Debug)]
pub struct DeviceBlocks {
    file: std::fs::File,
    buf: crate::aligned::AlignedBuf,
}

impl DeviceBlocks {
    pub fn open(path: &std::path::Path) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_DIRECT)
            .open(path)?;
        Ok(Self {
            file,
            buf: crate::aligned::AlignedBuf::new(BLOCK_BYTES),
        })
    }
}

impl BlockSource for DeviceBlocks {
    fn read_block(&mut self, block: u64, buf: &mut [u8; BLOCK_BYTES]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let offset = block
            .checked_mul(BLOCK_BYTES as u64)
            .ok_or_else(|| io::Error::other("block number out of range"))?;
        self.file.read_exact_at(self.buf.as_mut_slice(), offset)?;
        buf.copy_from_slice(self.buf.as_slice());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;

    /// Builds dm-era metadata the way the kernel lays it out, small enough
    /// that every tree is one leaf (the real-kernel tests cover deep trees).
    #[derive(Default)]
    struct Image {
        blocks: BTreeMap<u64, [u8; BLOCK_BYTES]>,
        next: u64,
    }

    impl BlockSource for Image {
        fn read_block(&mut self, block: u64, buf: &mut [u8; BLOCK_BYTES]) -> io::Result<()> {
            *buf = *self
                .blocks
                .get(&block)
                .ok_or_else(|| io::Error::other(format!("no block {block}")))?;
            Ok(())
        }
    }

    impl Image {
        fn put(&mut self, block: u64, mut bytes: [u8; BLOCK_BYTES], xor: u32) {
            let csum = checksum(&bytes[4..]) ^ xor;
            bytes[0..4].copy_from_slice(&csum.to_le_bytes());
            self.blocks.insert(block, bytes);
        }

        fn allocate(&mut self) -> u64 {
            self.next += 1;
            self.next + 1 // 0 and 1: the superblocks
        }

        fn leaf(&mut self, entries: &[(u64, Vec<u8>)], value_size: usize) -> u64 {
            let at = self.allocate();
            let max = (BLOCK_BYTES - NODE_HEADER) / (8 + value_size);
            let mut b = [0u8; BLOCK_BYTES];
            b[4..8].copy_from_slice(&LEAF_NODE.to_le_bytes());
            b[8..16].copy_from_slice(&at.to_le_bytes());
            b[16..20].copy_from_slice(&(entries.len() as u32).to_le_bytes());
            b[20..24].copy_from_slice(&(max as u32).to_le_bytes());
            b[24..28].copy_from_slice(&(value_size as u32).to_le_bytes());
            for (i, (key, value)) in entries.iter().enumerate() {
                b[NODE_HEADER + i * 8..][..8].copy_from_slice(&key.to_le_bytes());
                b[NODE_HEADER + max * 8 + i * value_size..][..value_size].copy_from_slice(value);
            }
            self.put(at, b, BTREE_CSUM_XOR);
            at
        }

        /// A dm-array of `values` (each `value_size` bytes).
        fn array(&mut self, values: &[Vec<u8>], value_size: usize) -> u64 {
            let per_block = (BLOCK_BYTES - ARRAY_HEADER) / value_size;
            let mut leaf = Vec::new();
            for (index, chunk) in values.chunks(per_block).enumerate() {
                let at = self.allocate();
                let mut b = [0u8; BLOCK_BYTES];
                b[4..8].copy_from_slice(&(per_block as u32).to_le_bytes());
                b[8..12].copy_from_slice(&(chunk.len() as u32).to_le_bytes());
                b[12..16].copy_from_slice(&(value_size as u32).to_le_bytes());
                b[16..24].copy_from_slice(&at.to_le_bytes());
                for (i, value) in chunk.iter().enumerate() {
                    b[ARRAY_HEADER + i * value_size..][..value_size].copy_from_slice(value);
                }
                self.put(at, b, ARRAY_CSUM_XOR);
                leaf.push((index as u64, at.to_le_bytes().to_vec()));
            }
            self.leaf(&leaf, 8)
        }

        fn bitset(&mut self, nr_bits: u64, set: &BTreeSet<u64>) -> u64 {
            let words = (0..nr_bits.div_ceil(64))
                .map(|w| {
                    let word = (0..64)
                        .filter(|bit| set.contains(&(w * 64 + bit)))
                        .fold(0u64, |word, bit| word | (1 << bit));
                    word.to_le_bytes().to_vec()
                })
                .collect::<Vec<_>>();
            self.array(&words, 8)
        }

        /// Metadata with the era array `last_era` and undigested writesets.
        fn era(last_era: &[u32], writesets: &BTreeMap<u32, BTreeSet<u64>>) -> Self {
            let mut image = Image::default();
            let nr_blocks = last_era.len() as u64;
            let eras = last_era
                .iter()
                .map(|e| e.to_le_bytes().to_vec())
                .collect::<Vec<_>>();
            let array_root = image.array(&eras, 4);
            let entries = writesets
                .iter()
                .map(|(era, set)| {
                    let root = image.bitset(nr_blocks, set);
                    let mut value = (nr_blocks as u32).to_le_bytes().to_vec();
                    value.extend(root.to_le_bytes());
                    (u64::from(*era), value)
                })
                .collect::<Vec<_>>();
            let writesets_root = image.leaf(&entries, 12);
            for (at, held) in [(0u64, 1u64), (1, 0)] {
                let mut b = [0u8; BLOCK_BYTES];
                b[8..16].copy_from_slice(&at.to_le_bytes());
                b[32..40].copy_from_slice(&SUPERBLOCK_MAGIC.to_le_bytes());
                b[180..184].copy_from_slice(&(nr_blocks as u32).to_le_bytes());
                b[200..208].copy_from_slice(&writesets_root.to_le_bytes());
                b[208..216].copy_from_slice(&array_root.to_le_bytes());
                b[216..224].copy_from_slice(&held.to_le_bytes());
                image.put(at, b, SUPERBLOCK_CSUM_XOR);
            }
            image
        }
    }

    fn blocks(ranges: Vec<Range<u64>>) -> BTreeSet<u64> {
        ranges.into_iter().flatten().collect()
    }

    #[test]
    fn checksum_is_linux_crc32c_without_the_final_inversion() {
        // crc32c("123456789") is 0xe3069283; Linux's variant is its inverse.
        assert_eq!(checksum(b"123456789"), !0xe306_9283);
    }

    #[test]
    fn reads_the_array_and_the_undigested_writesets() {
        let mut last_era = vec![0u32; 3000];
        last_era[5] = 2;
        last_era[2500] = 4;
        let writesets = BTreeMap::from([(6, BTreeSet::from([7, 2999])), (7, BTreeSet::from([8]))]);
        let mut image = Image::era(&last_era, &writesets);
        assert_eq!(
            blocks(written_since(&mut image, 1).unwrap()),
            BTreeSet::from([5, 7, 8, 2500, 2999])
        );
        assert_eq!(
            blocks(written_since(&mut image, 3).unwrap()),
            BTreeSet::from([7, 8, 2500, 2999])
        );
        assert_eq!(
            blocks(written_since(&mut image, 7).unwrap()),
            BTreeSet::from([8])
        );
        assert_eq!(
            blocks(written_since(&mut image, 8).unwrap()),
            BTreeSet::new()
        );
    }

    #[test]
    fn refuses_damaged_metadata() {
        let mut image = Image::era(&[1, 2, 3], &BTreeMap::new());
        image.blocks.get_mut(&2).unwrap()[100] ^= 1;
        let err = written_since(&mut image, 1).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
        let mut unheld = Image::era(&[1], &BTreeMap::new());
        let mut superblock = unheld.blocks[&0];
        superblock[216..224].fill(0);
        unheld.put(0, superblock, SUPERBLOCK_CSUM_XOR);
        let err = written_since(&mut unheld, 1).unwrap_err();
        assert!(err.to_string().contains("no metadata snapshot"), "{err}");
    }

    proptest! {
        #[test]
        fn reports_exactly_the_blocks_with_a_later_era(
            last_era in proptest::collection::vec(0u32..6, 1..2100),
            pending in proptest::collection::btree_map(6u32..9, proptest::collection::btree_set(0u64..2100, 0..20), 0..3),
            since in 1u32..10,
        ) {
            let nr_blocks = last_era.len() as u64;
            let pending: BTreeMap<u32, BTreeSet<u64>> = pending
                .into_iter()
                .map(|(era, set)| (era, set.into_iter().filter(|b| *b < nr_blocks).collect()))
                .collect();
            let mut expected: BTreeSet<u64> = (0..nr_blocks)
                .filter(|b| last_era[*b as usize] >= since)
                .collect();
            for (era, set) in &pending {
                if *era >= since {
                    expected.extend(set);
                }
            }
            // The kernel digests the oldest writesets first, so the array
            // never holds an era as new as an undigested writeset's.
            let mut image = Image::era(&last_era, &pending);
            prop_assert_eq!(blocks(written_since(&mut image, since).unwrap()), expected);
        }
    }
}
