//! Synthetic dm-era metadata, laid out as the kernel lays it out (see
//! [`super::era_metadata`]): for the reader's tests, which also damage it on
//! purpose, and for the bench of the reader's memory. Not for production:
//! the real-kernel tests prove the reader against metadata dm-era wrote.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
};

use super::era_metadata::{
    ARRAY_CSUM_XOR, ARRAY_HEADER, BLOCK_BYTES, BTREE_CSUM_XOR, BlockSource, INTERNAL_NODE,
    LEAF_NODE, NODE_HEADER, SUPERBLOCK_CSUM_XOR, SUPERBLOCK_MAGIC, checksum,
};

/// Bytes of a writeset entry: its number of bits (u32), its bitset's root.
pub const WRITESET_VALUE_BYTES: usize = 12;

/// Metadata blocks by number; unset blocks read as an error.
#[derive(Debug, Default, Clone)]
pub struct Image {
    pub blocks: BTreeMap<u64, Box<[u8; BLOCK_BYTES]>>,
    next: u64,
}

impl BlockSource for Image {
    fn read_block(&mut self, block: u64, buf: &mut [u8; BLOCK_BYTES]) -> io::Result<()> {
        let stored = self
            .blocks
            .get(&block)
            .ok_or_else(|| io::Error::other(format!("no block {block}")))?;
        buf.copy_from_slice(&stored[..]);
        Ok(())
    }

    fn block_count(&mut self) -> io::Result<u64> {
        Ok(self.blocks.last_key_value().map_or(0, |(last, _)| last + 1))
    }
}

/// The most entries the kernel puts in a btree node of `value_size`-byte
/// values (persistent-data rounds down to a multiple of three).
pub fn max_node_entries(value_size: usize) -> usize {
    3 * ((BLOCK_BYTES - NODE_HEADER) / (8 + value_size) / 3)
}

/// Values in one dm-array block.
pub fn array_block_entries(value_size: usize) -> usize {
    (BLOCK_BYTES - ARRAY_HEADER) / value_size
}

impl Image {
    /// Metadata of a volume of `last_era.len()` blocks: the era array
    /// `last_era` and the undigested writesets (era -> blocks written).
    pub fn era(last_era: &[u32], writesets: &BTreeMap<u32, BTreeSet<u64>>) -> Self {
        let mut image = Image::default();
        let nr_blocks = last_era.len() as u32;
        let array_root = image.era_array(last_era);
        let entries: Vec<_> = writesets
            .iter()
            .map(|(era, set)| (*era, nr_blocks, image.bitset(u64::from(nr_blocks), set)))
            .collect();
        let writesets_root = image.writesets(&entries);
        image.superblocks(nr_blocks, writesets_root, array_root);
        image
    }

    /// Metadata of a volume of `nr_blocks` blocks whose whole history is one
    /// undigested writeset of `era` with the bits `words`. The era array is
    /// empty: a reader asked since `era` never needs it.
    pub fn one_writeset(nr_blocks: u32, era: u32, words: &[u64]) -> Self {
        let mut image = Image::default();
        let array_root = image.era_array(&[]);
        let bitset_root = image.bitset_words(words);
        let writesets_root = image.writesets(&[(era, nr_blocks, bitset_root)]);
        image.superblocks(nr_blocks, writesets_root, array_root);
        image
    }

    /// The next free block; 0 and 1 are the superblocks.
    pub fn allocate(&mut self) -> u64 {
        self.next += 1;
        self.next + 1
    }

    /// Stores `bytes` at `at` with the checksum of its kind (`csum_xor`).
    pub fn put(&mut self, at: u64, mut bytes: Box<[u8; BLOCK_BYTES]>, csum_xor: u32) {
        let csum = checksum(&bytes[4..]) ^ csum_xor;
        bytes[0..4].copy_from_slice(&csum.to_le_bytes());
        self.blocks.insert(at, bytes);
    }

    /// A btree node at `at`: a leaf of `value_size`-byte values, or an
    /// internal node (8-byte child block numbers).
    pub fn node_at(
        &mut self,
        at: u64,
        internal: bool,
        entries: &[(u64, Vec<u8>)],
        value_size: usize,
    ) {
        let max = max_node_entries(value_size);
        let flags = if internal { INTERNAL_NODE } else { LEAF_NODE };
        let mut b = Box::new([0u8; BLOCK_BYTES]);
        b[4..8].copy_from_slice(&flags.to_le_bytes());
        b[8..16].copy_from_slice(&at.to_le_bytes());
        b[16..20].copy_from_slice(&(entries.len() as u32).to_le_bytes());
        b[20..24].copy_from_slice(&(max as u32).to_le_bytes());
        b[24..28].copy_from_slice(&(value_size as u32).to_le_bytes());
        for (i, (key, value)) in entries.iter().enumerate() {
            b[NODE_HEADER + i * 8..][..8].copy_from_slice(&key.to_le_bytes());
            b[NODE_HEADER + max * 8 + i * value_size..][..value_size].copy_from_slice(value);
        }
        self.put(at, b, BTREE_CSUM_XOR);
    }

    pub fn leaf(&mut self, entries: &[(u64, Vec<u8>)], value_size: usize) -> u64 {
        let at = self.allocate();
        self.node_at(at, false, entries, value_size);
        at
    }

    /// An internal node over `children`: (lowest key below, child block).
    pub fn internal(&mut self, children: &[(u64, u64)]) -> u64 {
        let at = self.allocate();
        self.internal_at(at, children);
        at
    }

    pub fn internal_at(&mut self, at: u64, children: &[(u64, u64)]) {
        let entries: Vec<_> = children
            .iter()
            .map(|(key, child)| (*key, child.to_le_bytes().to_vec()))
            .collect();
        self.node_at(at, true, &entries, 8);
    }

    /// A btree of `entries` (in key order): full leaves, then levels of
    /// internal nodes until one root.
    pub fn btree(&mut self, entries: &[(u64, Vec<u8>)], value_size: usize) -> u64 {
        if entries.is_empty() {
            return self.leaf(&[], value_size);
        }
        let mut level: Vec<(u64, u64)> = entries
            .chunks(max_node_entries(value_size))
            .map(|chunk| (chunk[0].0, self.leaf(chunk, value_size)))
            .collect();
        while level.len() > 1 {
            level = level
                .chunks(max_node_entries(8))
                .map(|chunk| (chunk[0].0, self.internal(chunk)))
                .collect();
        }
        level[0].1
    }

    /// A dm-array of the `value_size`-byte values packed in `values`.
    pub fn array(&mut self, values: &[u8], value_size: usize) -> u64 {
        let per_block = array_block_entries(value_size);
        let mut blocks = Vec::new();
        for (index, chunk) in values.chunks(per_block * value_size).enumerate() {
            let at = self.allocate();
            let mut b = Box::new([0u8; BLOCK_BYTES]);
            b[4..8].copy_from_slice(&(per_block as u32).to_le_bytes());
            b[8..12].copy_from_slice(&((chunk.len() / value_size) as u32).to_le_bytes());
            b[12..16].copy_from_slice(&(value_size as u32).to_le_bytes());
            b[16..24].copy_from_slice(&at.to_le_bytes());
            b[ARRAY_HEADER..][..chunk.len()].copy_from_slice(chunk);
            self.put(at, b, ARRAY_CSUM_XOR);
            blocks.push((index as u64, at.to_le_bytes().to_vec()));
        }
        self.btree(&blocks, 8)
    }

    /// The era array: the last era each block was written in.
    pub fn era_array(&mut self, last_era: &[u32]) -> u64 {
        let values: Vec<u8> = last_era.iter().flat_map(|era| era.to_le_bytes()).collect();
        self.array(&values, 4)
    }

    /// A dm-bitset: an array of 64-bit words, bit `b % 64` of word `b / 64`.
    pub fn bitset_words(&mut self, words: &[u64]) -> u64 {
        let values: Vec<u8> = words.iter().flat_map(|word| word.to_le_bytes()).collect();
        self.array(&values, 8)
    }

    pub fn bitset(&mut self, nr_bits: u64, set: &BTreeSet<u64>) -> u64 {
        let mut words = vec![0u64; nr_bits.div_ceil(64) as usize];
        for bit in set.iter().filter(|bit| **bit < nr_bits) {
            words[(bit / 64) as usize] |= 1 << (bit % 64);
        }
        self.bitset_words(&words)
    }

    /// The writeset tree over (era, number of bits, bitset root).
    pub fn writesets(&mut self, writesets: &[(u32, u32, u64)]) -> u64 {
        let entries: Vec<_> = writesets
            .iter()
            .map(|(era, bits, root)| (u64::from(*era), writeset_value(*bits, *root)))
            .collect();
        self.btree(&entries, WRITESET_VALUE_BYTES)
    }

    /// The live superblock (block 0) holding a metadata snapshot (block 1)
    /// with these roots.
    pub fn superblocks(&mut self, nr_blocks: u32, writesets_root: u64, array_root: u64) {
        for (at, held) in [(0u64, 1u64), (1, 0)] {
            let mut b = Box::new([0u8; BLOCK_BYTES]);
            b[8..16].copy_from_slice(&at.to_le_bytes());
            b[32..40].copy_from_slice(&SUPERBLOCK_MAGIC.to_le_bytes());
            b[180..184].copy_from_slice(&nr_blocks.to_le_bytes());
            b[200..208].copy_from_slice(&writesets_root.to_le_bytes());
            b[208..216].copy_from_slice(&array_root.to_le_bytes());
            b[216..224].copy_from_slice(&held.to_le_bytes());
            self.put(at, b, SUPERBLOCK_CSUM_XOR);
        }
    }

    /// The blocks that are dm-array blocks (told by their checksum).
    pub fn array_blocks(&self) -> Vec<u64> {
        self.blocks
            .iter()
            .filter(|(_, bytes)| stored_csum(bytes) == checksum(&bytes[4..]) ^ ARRAY_CSUM_XOR)
            .map(|(at, _)| *at)
            .collect()
    }

    /// Changes block `at` and gives it the checksum of its kind again, so
    /// that a reader sees damage beyond what a checksum catches.
    pub fn rewrite(&mut self, at: u64, change: impl FnOnce(&mut [u8; BLOCK_BYTES])) {
        let Some(bytes) = self.blocks.get_mut(&at) else {
            return;
        };
        let computed = checksum(&bytes[4..]);
        let csum_xor = stored_csum(bytes) ^ computed;
        change(bytes);
        let csum = checksum(&bytes[4..]) ^ csum_xor;
        bytes[0..4].copy_from_slice(&csum.to_le_bytes());
    }

    /// The image as a device: every block from 0 to the last, unset ones
    /// zero.
    pub fn write_to(&self, out: &mut impl io::Write) -> io::Result<()> {
        let zero = [0u8; BLOCK_BYTES];
        let count = self.blocks.last_key_value().map_or(0, |(last, _)| last + 1);
        for at in 0..count {
            out.write_all(self.blocks.get(&at).map_or(&zero[..], |bytes| &bytes[..]))?;
        }
        Ok(())
    }
}

pub fn writeset_value(nr_bits: u32, bitset_root: u64) -> Vec<u8> {
    let mut value = nr_bits.to_le_bytes().to_vec();
    value.extend(bitset_root.to_le_bytes());
    value
}

fn stored_csum(bytes: &[u8; BLOCK_BYTES]) -> u32 {
    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}
