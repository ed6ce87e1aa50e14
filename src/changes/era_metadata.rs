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
//!
//! Bounded by design, whatever the bytes say: the answer is one bit per
//! block of the volume (metadata claiming more blocks is refused), a walk
//! holds one node per level, and a call reads at most a few times as many
//! blocks as the metadata device has.

use std::{io, ops::Range};

use crate::error::AgentError;

pub const BLOCK_BYTES: usize = 4096;
pub(super) const SUPERBLOCK_MAGIC: u64 = 2_126_579_579;
pub(super) const SUPERBLOCK_CSUM_XOR: u32 = 146_538_381;
pub(super) const BTREE_CSUM_XOR: u32 = 121_107;
pub(super) const ARRAY_CSUM_XOR: u32 = 595_846_735;
pub(super) const INTERNAL_NODE: u32 = 1;
pub(super) const LEAF_NODE: u32 = 2;
pub(super) const NODE_HEADER: usize = 32;
pub(super) const ARRAY_HEADER: usize = 24;
/// Levels of btree nodes from a root to a leaf: dm-era's trees, with over a
/// hundred entries a node, never come near it.
const MAX_DEPTH: usize = 16;
const WRITESET_VALUE_BYTES: usize = 12;

/// Where metadata blocks come from: the metadata device, read directly.
pub trait BlockSource {
    fn read_block(&mut self, block: u64, buf: &mut [u8; BLOCK_BYTES]) -> io::Result<()>;

    /// How many 4 KiB blocks the metadata device has.
    fn block_count(&mut self) -> io::Result<u64>;
}

/// The most blocks one call may read from a metadata device of
/// `device_blocks` blocks. The trees of a valid snapshot reference each
/// block about once, and where dm-array shares one block among the entries
/// of a fresh array, the device is still sized to hold every array unshared,
/// so reads stay near the device's size; 4x that, plus room for the
/// superblocks and the small trees of a tiny device, is generous. A corrupt
/// tree whose internal nodes point many times at the same child (a DAG
/// that multiplies at every level) exceeds it long before it costs real
/// time.
fn read_budget(device_blocks: u64) -> u64 {
    device_blocks.saturating_mul(4).saturating_add(64)
}

/// The blocks of a volume written since an era: one bit per era block.
#[derive(Clone, PartialEq, Eq)]
pub struct WrittenBlocks {
    words: Vec<u64>,
    blocks: u64,
}

impl WrittenBlocks {
    /// `blocks` blocks, none written.
    pub fn new(blocks: u64) -> Self {
        Self {
            words: vec![0; blocks.div_ceil(64) as usize],
            blocks,
        }
    }

    /// The number of blocks, written or not.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Marks `block` written; blocks past the end are not there to mark.
    pub fn set(&mut self, block: u64) {
        if block < self.blocks {
            self.words[(block / 64) as usize] |= 1 << (block % 64);
        }
    }

    pub fn contains(&self, block: u64) -> bool {
        block < self.blocks && self.words[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    /// How many blocks were written.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|word| u64::from(word.count_ones()))
            .sum()
    }

    /// Bytes the bits take on the heap.
    pub fn heap_bytes(&self) -> usize {
        self.words.capacity() * size_of::<u64>()
    }

    /// The written blocks as ranges of block indices, in order, found as
    /// they are asked for.
    pub fn runs(&self) -> Runs<'_> {
        Runs {
            bits: self,
            from: 0,
        }
    }

    /// Marks the blocks of the 64 starting at `word_index * 64` whose bits
    /// are set in `word`, up to the end.
    fn mark_word(&mut self, word_index: u64, word: u64) {
        let first = word_index.saturating_mul(64);
        if let Some(slot) = self.words.get_mut(word_index as usize) {
            *slot |= word & low_bits(self.blocks.saturating_sub(first));
        }
    }

    /// The first block from `from` on whose bit is `written`, if any.
    fn next_with(&self, from: u64, written: bool) -> Option<u64> {
        let flip = if written { 0 } else { !0 };
        let mut index = from / 64;
        let mut word = (self.words.get(index as usize)? ^ flip) & (!0 << (from % 64));
        while word == 0 {
            index += 1;
            word = self.words.get(index as usize)? ^ flip;
        }
        let found = index * 64 + u64::from(word.trailing_zeros());
        // Unused bits of the last word read as unwritten.
        (found < self.blocks).then_some(found)
    }
}

impl std::fmt::Debug for WrittenBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WrittenBlocks")
            .field("blocks", &self.blocks)
            .field("written", &self.count())
            .finish()
    }
}

/// The lowest `n` bits set (all for 64 or more).
fn low_bits(n: u64) -> u64 {
    if n >= 64 { !0 } else { (1 << n) - 1 }
}

/// Runs of written blocks, see [`WrittenBlocks::runs`].
#[derive(Debug, Clone)]
pub struct Runs<'a> {
    bits: &'a WrittenBlocks,
    from: u64,
}

impl Iterator for Runs<'_> {
    type Item = Range<u64>;

    fn next(&mut self) -> Option<Range<u64>> {
        let start = self.bits.next_with(self.from, true)?;
        let end = self
            .bits
            .next_with(start, false)
            .unwrap_or(self.bits.blocks);
        self.from = end;
        Some(start..end)
    }
}

/// One metadata block, checked.
struct Block {
    bytes: Box<[u8; BLOCK_BYTES]>,
}

impl Block {
    fn u32(&self, at: usize) -> u32 {
        le_u32(&self.bytes[at..at + 4])
    }

    fn u64(&self, at: usize) -> u64 {
        le_u64(&self.bytes[at..at + 8])
    }
}

fn le_u32(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes.try_into().unwrap_or([0; 4]))
}

fn le_u64(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes.try_into().unwrap_or([0; 8]))
}

/// A btree node, its header checked against the block's size.
struct Node {
    block: Block,
    at: u64,
    internal: bool,
    entries: usize,
    values_at: usize,
    value_size: usize,
}

impl Node {
    fn key(&self, i: usize) -> u64 {
        self.block.u64(NODE_HEADER + i * 8)
    }

    fn value(&self, i: usize) -> &[u8] {
        &self.block.bytes[self.values_at + i * self.value_size..][..self.value_size]
    }
}

/// What the held metadata snapshot says.
struct Roots {
    nr_blocks: u64,
    writesets: u64,
    era_array: u64,
}

struct Reader<'a, S: BlockSource> {
    source: &'a mut S,
    device_blocks: u64,
    reads_left: u64,
}

impl<'a, S: BlockSource> Reader<'a, S> {
    fn new(source: &'a mut S) -> Result<Self, AgentError> {
        let device_blocks = source.block_count().map_err(|source| AgentError::Io {
            context: "reading the size of the dm-era metadata device".into(),
            source,
        })?;
        Ok(Self {
            source,
            device_blocks,
            reads_left: read_budget(device_blocks),
        })
    }

    fn read(&mut self, block: u64, csum_xor: u32, what: &str) -> Result<Block, AgentError> {
        self.charge_read(block, what)?;
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

    /// Refuses a block the device does not have, and a read past the budget.
    fn charge_read(&mut self, block: u64, what: &str) -> Result<(), AgentError> {
        if block >= self.device_blocks {
            return Err(corrupt(format!(
                "{what} at block {block} is past the end of the {}-block metadata device",
                self.device_blocks
            )));
        }
        if self.reads_left == 0 {
            return Err(corrupt(format!(
                "its trees need more than {} block reads from a {}-block metadata device: \
                 nodes are shared many times over",
                read_budget(self.device_blocks),
                self.device_blocks
            )));
        }
        self.reads_left -= 1;
        Ok(())
    }

    /// The live superblock's size and the roots of the snapshot it holds.
    fn held_roots(&mut self) -> Result<Roots, AgentError> {
        let superblock = self.read(0, SUPERBLOCK_CSUM_XOR, "superblock")?;
        if superblock.u64(32) != SUPERBLOCK_MAGIC {
            return Err(corrupt(format!(
                "superblock magic {:#x} is not dm-era's",
                superblock.u64(32)
            )));
        }
        let snapshot = superblock.u64(216);
        if snapshot == 0 {
            return Err(AgentError::Internal(
                "dm-era holds no metadata snapshot to read".into(),
            ));
        }
        let held = self.read(snapshot, SUPERBLOCK_CSUM_XOR, "metadata snapshot")?;
        Ok(Roots {
            nr_blocks: u64::from(superblock.u32(180)),
            writesets: held.u64(200),
            era_array: held.u64(208),
        })
    }

    fn read_node(&mut self, at: u64, leaf_value_size: usize) -> Result<Node, AgentError> {
        let block = self.read(at, BTREE_CSUM_XOR, "btree node")?;
        let flags = block.u32(4);
        let entries = block.u32(16) as usize;
        let max_entries = block.u32(20) as usize;
        let value_size = block.u32(24) as usize;
        let internal = match flags {
            INTERNAL_NODE => true,
            LEAF_NODE => false,
            _ => return Err(corrupt(format!("btree node {at} has flags {flags:#x}"))),
        };
        let expected_size = if internal { 8 } else { leaf_value_size };
        let values_at = NODE_HEADER + max_entries * 8;
        if entries > max_entries
            || value_size != expected_size
            || values_at + max_entries * value_size > BLOCK_BYTES
        {
            return Err(corrupt(format!(
                "btree node {at}: {entries} of {max_entries} entries of {value_size} bytes"
            )));
        }
        Ok(Node {
            block,
            at,
            internal,
            entries,
            values_at,
            value_size,
        })
    }

    /// Calls `visit(reader, key, value bytes)` for every entry of a btree's
    /// leaves, in key order, holding one node per level meanwhile.
    fn walk_btree<F>(
        &mut self,
        root: u64,
        value_size: usize,
        visit: &mut F,
    ) -> Result<(), AgentError>
    where
        F: FnMut(&mut Self, u64, &[u8]) -> Result<(), AgentError>,
    {
        self.walk_node(root, value_size, &mut Vec::new(), visit)
    }

    fn walk_node<F>(
        &mut self,
        at: u64,
        value_size: usize,
        ancestors: &mut Vec<u64>,
        visit: &mut F,
    ) -> Result<(), AgentError>
    where
        F: FnMut(&mut Self, u64, &[u8]) -> Result<(), AgentError>,
    {
        let node = self.read_node(at, value_size)?;
        ancestors.push(at);
        for i in 0..node.entries {
            if node.internal {
                let child = le_u64(node.value(i));
                check_descent(&node, child, ancestors)?;
                self.walk_node(child, value_size, ancestors, visit)?;
            } else {
                visit(self, node.key(i), node.value(i))?;
            }
        }
        ancestors.pop();
        Ok(())
    }

    /// Calls `each(index, value bytes)` for the first `len` entries of a
    /// dm-array of `value_size`-byte values; an array with fewer is refused.
    fn array_values(
        &mut self,
        root: u64,
        value_size: usize,
        len: u64,
        each: &mut impl FnMut(u64, &[u8]),
    ) -> Result<(), AgentError> {
        let per_block = ((BLOCK_BYTES - ARRAY_HEADER) / value_size) as u64;
        let mut index = 0u64;
        self.walk_btree(root, 8, &mut |reader, key, value| {
            let at = le_u64(value);
            if key.checked_mul(per_block) != Some(index) {
                return Err(corrupt(format!(
                    "array block {at} has index {key} where index {} belongs",
                    index / per_block
                )));
            }
            let array = reader.read_array_block(at, value_size, per_block)?;
            for value in array.bytes[ARRAY_HEADER..]
                .chunks_exact(value_size)
                .take(array.u32(8) as usize)
            {
                if index < len {
                    each(index, value);
                }
                index += 1;
            }
            Ok(())
        })?;
        if index < len {
            return Err(corrupt(format!(
                "array at block {root} holds {index} values where {len} belong"
            )));
        }
        Ok(())
    }

    fn read_array_block(
        &mut self,
        at: u64,
        value_size: usize,
        per_block: u64,
    ) -> Result<Block, AgentError> {
        let array = self.read(at, ARRAY_CSUM_XOR, "array block")?;
        let max_entries = u64::from(array.u32(4));
        let entries = u64::from(array.u32(8));
        let stored_size = array.u32(12) as usize;
        if stored_size != value_size || max_entries != per_block || entries > max_entries {
            return Err(corrupt(format!(
                "array block {at}: {entries} of {max_entries} values of {stored_size} bytes, \
                 where up to {per_block} of {value_size} bytes belong"
            )));
        }
        Ok(array)
    }

    /// Marks the blocks of every undigested writeset from `era` on; returns
    /// the era of the oldest writeset there is.
    fn mark_writesets(
        &mut self,
        root: u64,
        era: u32,
        written: &mut WrittenBlocks,
    ) -> Result<Option<u64>, AgentError> {
        let mut oldest = None;
        self.walk_btree(root, WRITESET_VALUE_BYTES, &mut |reader, key, value| {
            oldest.get_or_insert(key);
            if key >= u64::from(era) {
                reader.mark_writeset(key, value, written)?;
            }
            Ok(())
        })?;
        Ok(oldest)
    }

    fn mark_writeset(
        &mut self,
        era: u64,
        value: &[u8],
        written: &mut WrittenBlocks,
    ) -> Result<(), AgentError> {
        let bits = u64::from(le_u32(&value[0..4]));
        let root = le_u64(&value[4..12]);
        if bits > written.blocks() {
            return Err(corrupt(format!(
                "writeset of era {era} has {bits} bits for {} blocks",
                written.blocks()
            )));
        }
        self.array_values(root, 8, bits.div_ceil(64), &mut |word_index, bytes| {
            let first = word_index * 64;
            written.mark_word(word_index, le_u64(bytes) & low_bits(bits - first));
        })
    }

    /// Marks the blocks the era array says were last written in `era` or
    /// later.
    fn mark_era_array(
        &mut self,
        root: u64,
        era: u32,
        written: &mut WrittenBlocks,
    ) -> Result<(), AgentError> {
        let blocks = written.blocks();
        self.array_values(root, 4, blocks, &mut |block, bytes| {
            if le_u32(bytes) >= era {
                written.set(block);
            }
        })
    }
}

/// Refuses to go down into `child` from `parent` when that would loop or
/// go deeper than dm-era's trees go.
fn check_descent(parent: &Node, child: u64, ancestors: &[u64]) -> Result<(), AgentError> {
    if ancestors.contains(&child) {
        return Err(corrupt(format!(
            "btree node {child} is its own ancestor: node {} points back at it",
            parent.at
        )));
    }
    if ancestors.len() >= MAX_DEPTH {
        return Err(corrupt(format!(
            "btree node {} points deeper than the {MAX_DEPTH} levels any dm-era tree has",
            parent.at
        )));
    }
    Ok(())
}

/// The blocks of a volume of `volume_blocks` era blocks written since `era`,
/// from the metadata snapshot dm-era holds. Metadata that tracks more
/// blocks than the volume has is refused, which bounds the answer by the
/// volume's size.
pub fn written_since<S: BlockSource>(
    source: &mut S,
    era: u32,
    volume_blocks: u64,
) -> Result<WrittenBlocks, AgentError> {
    let mut reader = Reader::new(source)?;
    let roots = reader.held_roots()?;
    if roots.nr_blocks > volume_blocks {
        return Err(corrupt(format!(
            "it tracks {} blocks, the volume has {volume_blocks}",
            roots.nr_blocks
        )));
    }
    let mut written = WrittenBlocks::new(roots.nr_blocks);
    let oldest_writeset = reader.mark_writesets(roots.writesets, era, &mut written)?;
    // Every writeset from `era` on is still undigested: the array holds
    // nothing newer, so it need not be read.
    if oldest_writeset.is_none_or(|oldest| oldest > u64::from(era)) {
        reader.mark_era_array(roots.era_array, era, &mut written)?;
    }
    Ok(written)
}

/// The eras whose writesets the kernel has not yet digested into the era
/// array, in the held metadata snapshot (for diagnostics and tests).
pub fn undigested_eras<S: BlockSource>(source: &mut S) -> Result<Vec<u64>, AgentError> {
    let mut reader = Reader::new(source)?;
    let roots = reader.held_roots()?;
    let mut eras = Vec::new();
    reader.walk_btree(roots.writesets, WRITESET_VALUE_BYTES, &mut |_, era, _| {
        eras.push(era);
        Ok(())
    })?;
    Ok(eras)
}

/// Linux's `crc32c(~0, data)`: the CRC-32C register without the final
/// inversion the standard checksum applies.
pub(super) fn checksum(data: &[u8]) -> u32 {
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

    /// The device's size by seeking to its end: for a block device that is
    /// what BLKGETSIZE64 reports, for a regular file its length, and it
    /// needs no ioctl (the crate keeps the `unsafe` nix's ioctl wrappers
    /// take to one module). Reads use offsets, so the file position does
    /// not matter.
    fn block_count(&mut self) -> io::Result<u64> {
        use std::io::Seek;
        let bytes = (&self.file).seek(io::SeekFrom::End(0))?;
        Ok(bytes / BLOCK_BYTES as u64)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;
    use crate::changes::era_synthetic::{Image, WRITESET_VALUE_BYTES, writeset_value};

    fn blocks(written: &WrittenBlocks) -> BTreeSet<u64> {
        written.runs().flatten().collect()
    }

    /// The runs, found one block at a time.
    fn runs_by_block(written: &WrittenBlocks) -> Vec<Range<u64>> {
        let mut runs: Vec<Range<u64>> = Vec::new();
        for block in (0..written.blocks()).filter(|b| written.contains(*b)) {
            match runs.last_mut() {
                Some(last) if last.end == block => last.end = block + 1,
                _ => runs.push(block..block + 1),
            }
        }
        runs
    }

    fn bits(blocks: u64, set: impl IntoIterator<Item = u64>) -> WrittenBlocks {
        let mut written = WrittenBlocks::new(blocks);
        set.into_iter().for_each(|block| written.set(block));
        written
    }

    /// The roots the held snapshot names: (writesets, era array).
    fn roots(image: &Image) -> (u64, u64) {
        let held = &image.blocks[&1];
        (le_u64(&held[200..208]), le_u64(&held[208..216]))
    }

    fn nr_blocks(image: &Image) -> u32 {
        le_u32(&image.blocks[&0][180..184])
    }

    #[test]
    fn checksum_is_linux_crc32c_without_the_final_inversion() {
        // crc32c("123456789") is 0xe3069283; Linux's variant is its inverse.
        assert_eq!(checksum(b"123456789"), !0xe306_9283);
    }

    #[test]
    fn runs_cross_words_and_stop_at_the_last_block() {
        let set = (3..5).chain(60..70).chain(127..129).chain(190..200);
        let written = bits(200, set);
        let runs: Vec<_> = written.runs().collect();
        assert_eq!(runs, vec![3..5, 60..70, 127..129, 190..200]);
        assert_eq!(written.count(), 24);

        let all = bits(130, 0..130);
        assert_eq!(all.runs().collect::<Vec<_>>(), vec![0..130]);
        let whole_words = bits(128, 0..128);
        assert_eq!(whole_words.runs().collect::<Vec<_>>(), vec![0..128]);
        assert_eq!(bits(130, []).runs().count(), 0);
        assert_eq!(WrittenBlocks::new(0).runs().count(), 0);

        let alternate = bits(131, (0..131).step_by(2));
        assert_eq!(alternate.runs().count(), 66);
        assert_eq!(alternate.runs().last(), Some(130..131));
        // Blocks past the end are not there to mark.
        assert_eq!(
            bits(10, [9, 10, 64]).runs().collect::<Vec<_>>(),
            vec![9..10]
        );
    }

    #[test]
    fn the_bits_of_a_writeset_word_past_its_end_are_dropped() {
        let mut written = WrittenBlocks::new(70);
        written.mark_word(1, !0);
        written.mark_word(2, !0);
        assert_eq!(written.runs().collect::<Vec<_>>(), vec![64..70]);
    }

    #[test]
    fn reads_the_array_and_the_undigested_writesets() {
        let mut last_era = vec![0u32; 3000];
        last_era[5] = 2;
        last_era[2500] = 4;
        let writesets = BTreeMap::from([(6, BTreeSet::from([7, 2999])), (7, BTreeSet::from([8]))]);
        let mut image = Image::era(&last_era, &writesets);
        let mut since = |era| blocks(&written_since(&mut image, era, 3000).unwrap());
        assert_eq!(since(1), BTreeSet::from([5, 7, 8, 2500, 2999]));
        assert_eq!(since(3), BTreeSet::from([7, 8, 2500, 2999]));
        assert_eq!(since(7), BTreeSet::from([8]));
        assert_eq!(since(8), BTreeSet::new());
    }

    fn internal_nodes(image: &Image) -> usize {
        image
            .blocks
            .values()
            .filter(|block| le_u32(&block[4..8]) == INTERNAL_NODE)
            .count()
    }

    #[test]
    fn reads_trees_with_internal_nodes() {
        // 300,000 eras fill 295 array blocks, more than one leaf holds.
        let last_era: Vec<u32> = (0..300_000u32).map(|b| u32::from(b % 7 == 0)).collect();
        let mut image = Image::era(&last_era, &BTreeMap::new());
        assert_eq!(internal_nodes(&image), 1);
        let written = written_since(&mut image, 1, 300_000).unwrap();
        assert_eq!(written.count(), 300_000u64.div_ceil(7));
        assert!(written.contains(299_999) && !written.contains(299_998));

        // 9,000,000 bits: 140,625 words in 277 array blocks, each word with
        // its first and last bit set: runs {0}, {63, 64}, ..., {8,999,999}.
        let words = vec![0x8000_0000_0000_0001u64; 9_000_000 / 64];
        let mut image = Image::one_writeset(9_000_000, 3, &words);
        assert_eq!(internal_nodes(&image), 1);
        let written = written_since(&mut image, 3, 9_000_000).unwrap();
        assert_eq!(written.runs().count(), 140_626);
        assert_eq!(written.runs().nth(1), Some(63..65));
        assert_eq!(written.runs().last(), Some(8_999_999..9_000_000));
    }

    #[test]
    fn refuses_damaged_metadata() {
        let mut image = Image::era(&[1, 2, 3], &BTreeMap::new());
        image.blocks.get_mut(&2).unwrap()[100] ^= 1;
        let err = written_since(&mut image, 1, 3).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
        let mut unheld = Image::era(&[1], &BTreeMap::new());
        unheld.rewrite(0, |superblock| superblock[216..224].fill(0));
        let err = written_since(&mut unheld, 1, 1).unwrap_err();
        assert!(err.to_string().contains("no metadata snapshot"), "{err}");
    }

    #[test]
    fn refuses_metadata_of_more_blocks_than_the_volume_has() {
        let mut image = Image::era(&[1; 100], &BTreeMap::new());
        let err = written_since(&mut image, 1, 99).unwrap_err();
        assert!(
            err.to_string()
                .contains("tracks 100 blocks, the volume has 99"),
            "{err}"
        );
        image.rewrite(0, |superblock| {
            superblock[180..184].copy_from_slice(&u32::MAX.to_le_bytes());
        });
        let err = written_since(&mut image, 1, 100).unwrap_err();
        assert!(
            err.to_string()
                .contains("tracks 4294967295 blocks, the volume has 100"),
            "{err}"
        );
    }

    #[test]
    fn a_node_that_is_its_own_ancestor_is_named() {
        let mut image = Image::era(&[1; 10], &BTreeMap::new());
        let (_, array_root) = roots(&image);
        let top = image.allocate();
        let below = image.internal(&[(0, top)]);
        image.internal_at(top, &[(0, below)]);
        image.superblocks(10, top, array_root);
        let err = written_since(&mut image, 1, 10).unwrap_err();
        assert!(
            err.to_string().contains(&format!(
                "btree node {top} is its own ancestor: node {below}"
            )),
            "{err}"
        );
    }

    /// Damage a reader must refuse, applied to valid metadata read since era
    /// 1, which reads every tree of it.
    #[derive(Debug, Clone)]
    enum Damage {
        /// The writeset tree (or the era array's) under a chain of
        /// `length` internal nodes whose last points back at its first.
        Loop { length: usize, in_era_array: bool },
        /// The writeset tree under `levels` internal nodes whose `fanout`
        /// entries all point at the level below: fanout^levels paths.
        SharedChildren { levels: usize, fanout: usize },
        /// An array block's header rewritten: (field offset, value).
        ArrayHeader {
            which: prop::sample::Index,
            field: usize,
            value: u32,
        },
        /// A writeset claiming more bits than the volume has blocks.
        WritesetPastTheEnd { claimed: u32 },
        /// A writeset whose bitset holds fewer words than its bits need.
        ShortBitset { missing_words: u64 },
        /// The superblock claiming more blocks than its era array holds.
        ShortEraArray { claimed: u32 },
        /// The superblock claiming more blocks than the volume has.
        HugeNrBlocks { claimed: u32 },
        /// An internal node pointing past the end of the device.
        ChildPastTheEnd { beyond: u64 },
    }

    fn damage() -> impl Strategy<Value = Damage> {
        prop_oneof![
            (1..=MAX_DEPTH, any::<bool>()).prop_map(|(length, in_era_array)| Damage::Loop {
                length,
                in_era_array
            }),
            (8..MAX_DEPTH, 2..=252usize)
                .prop_map(|(levels, fanout)| Damage::SharedChildren { levels, fanout }),
            (any::<prop::sample::Index>(), 1019..=u32::MAX).prop_map(|(which, value)| {
                Damage::ArrayHeader {
                    which,
                    field: 8,
                    value,
                }
            }),
            (any::<prop::sample::Index>(), any::<u32>())
                .prop_filter("a valid count", |(_, v)| *v != 509 && *v != 1018)
                .prop_map(|(which, value)| Damage::ArrayHeader {
                    which,
                    field: 4,
                    value
                }),
            (any::<prop::sample::Index>(), any::<u32>())
                .prop_filter("a valid size", |(_, v)| *v != 4 && *v != 8)
                .prop_map(|(which, value)| Damage::ArrayHeader {
                    which,
                    field: 12,
                    value
                }),
            (1600..=u32::MAX).prop_map(|claimed| Damage::WritesetPastTheEnd { claimed }),
            (1..30u64).prop_map(|missing_words| Damage::ShortBitset { missing_words }),
            (1600..100_000u32).prop_map(|claimed| Damage::ShortEraArray { claimed }),
            prop_oneof![Just(u32::MAX), 1600..u32::MAX]
                .prop_map(|claimed| Damage::HugeNrBlocks { claimed }),
            prop_oneof![Just(u64::MAX), 0..1u64 << 40]
                .prop_map(|beyond| Damage::ChildPastTheEnd { beyond }),
        ]
    }

    /// Applies `damage`; returns the volume's size in blocks to ask with and
    /// what the error must say.
    fn apply(image: &mut Image, damage: &Damage) -> (u64, &'static str) {
        let blocks = nr_blocks(image);
        let volume = u64::from(blocks);
        let (writesets_root, array_root) = roots(image);
        match damage {
            Damage::Loop {
                length,
                in_era_array,
            } => {
                let chain: Vec<u64> = (0..*length).map(|_| image.allocate()).collect();
                for (i, at) in chain.iter().enumerate() {
                    image.internal_at(*at, &[(0, chain[(i + 1) % chain.len()])]);
                }
                if *in_era_array {
                    image.superblocks(blocks, writesets_root, chain[0]);
                } else {
                    image.superblocks(blocks, chain[0], array_root);
                }
                (volume, "is its own ancestor")
            }
            Damage::SharedChildren { levels, fanout } => {
                let mut root = writesets_root;
                for _ in 0..*levels {
                    root = image.internal(&vec![(0, root); *fanout]);
                }
                image.superblocks(blocks, root, array_root);
                (volume, "block reads")
            }
            Damage::ArrayHeader {
                which,
                field,
                value,
            } => {
                let arrays = image.array_blocks();
                image.rewrite(*which.get(&arrays), |b| {
                    b[*field..*field + 4].copy_from_slice(&value.to_le_bytes());
                });
                (volume, "array block")
            }
            Damage::WritesetPastTheEnd { claimed } => {
                let bitset = image.bitset(volume, &BTreeSet::new());
                let entries = [(9, writeset_value(*claimed, bitset))];
                let root = image.leaf(&entries, WRITESET_VALUE_BYTES);
                image.superblocks(blocks, root, array_root);
                (volume, "bits for")
            }
            Damage::ShortBitset { missing_words } => {
                let words = volume.div_ceil(64).saturating_sub(*missing_words);
                let bitset = image.bitset_words(&vec![!0; words as usize]);
                let entries = [(9, writeset_value(blocks, bitset))];
                let root = image.leaf(&entries, WRITESET_VALUE_BYTES);
                image.superblocks(blocks, root, array_root);
                (volume, "values where")
            }
            Damage::ShortEraArray { claimed } => {
                image.superblocks(*claimed, writesets_root, array_root);
                (u64::from(*claimed), "values where")
            }
            Damage::HugeNrBlocks { claimed } => {
                image.superblocks(*claimed, writesets_root, array_root);
                (volume, "the volume has")
            }
            Damage::ChildPastTheEnd { beyond } => {
                let end = image.block_count().unwrap() + 1;
                let root = image.internal(&[(0, writesets_root), (7, end.saturating_add(*beyond))]);
                image.superblocks(blocks, root, array_root);
                (volume, "past the end")
            }
        }
    }

    /// A source that counts its reads.
    struct Counted<'a> {
        image: &'a mut Image,
        reads: u64,
    }

    impl BlockSource for Counted<'_> {
        fn read_block(&mut self, block: u64, buf: &mut [u8; BLOCK_BYTES]) -> io::Result<()> {
            self.reads += 1;
            self.image.read_block(block, buf)
        }

        fn block_count(&mut self) -> io::Result<u64> {
            self.image.block_count()
        }
    }

    /// Valid metadata of 65 to 1,600 blocks with writesets of eras 6 to 8.
    fn metadata() -> impl Strategy<Value = Image> {
        (
            proptest::collection::vec(0u32..6, 65..1600),
            proptest::collection::btree_map(
                6u32..9,
                proptest::collection::btree_set(0u64..1600, 0..20),
                0..3,
            ),
        )
            .prop_map(|(last_era, writesets)| Image::era(&last_era, &writesets))
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
            let written = written_since(&mut image, since, nr_blocks).unwrap();
            prop_assert_eq!(written.runs().collect::<Vec<_>>(), runs_by_block(&written));
            prop_assert_eq!(blocks(&written), expected);
        }

        #[test]
        fn damaged_metadata_is_refused_within_the_read_budget(
            mut image in metadata(),
            damage in damage(),
        ) {
            let (volume_blocks, says) = apply(&mut image, &damage);
            let budget = read_budget(image.block_count().unwrap());
            let mut source = Counted { image: &mut image, reads: 0 };
            let err = written_since(&mut source, 1, volume_blocks).unwrap_err();
            prop_assert!(err.to_string().contains(says), "{:?}: {}", damage, err);
            prop_assert!(source.reads <= budget, "{} reads", source.reads);
        }

        #[test]
        fn any_rewritten_bytes_end_in_an_answer_or_an_error_within_the_budget(
            mut image in metadata(),
            edits in proptest::collection::vec(
                (any::<prop::sample::Index>(), 4..BLOCK_BYTES, any::<u8>()),
                1..8,
            ),
        ) {
            let volume_blocks = u64::from(nr_blocks(&image));
            let numbers: Vec<u64> = image.blocks.keys().copied().collect();
            for (which, at, byte) in edits {
                image.rewrite(*which.get(&numbers), |b| b[at] = byte);
            }
            let budget = read_budget(image.block_count().unwrap());
            let mut source = Counted { image: &mut image, reads: 0 };
            if let Ok(written) = written_since(&mut source, 1, volume_blocks) {
                prop_assert!(written.blocks() <= volume_blocks);
            }
            prop_assert!(source.reads <= budget, "{} reads", source.reads);
        }

        #[test]
        fn runs_are_the_written_blocks_in_order(
            set in proptest::collection::btree_set(0u64..700, 0..300),
            blocks in 0u64..700,
        ) {
            let written = bits(blocks, set.iter().copied());
            prop_assert_eq!(written.runs().collect::<Vec<_>>(), runs_by_block(&written));
        }
    }
}
