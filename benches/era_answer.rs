//! Peak memory of a changed-blocks answer: dm-era metadata of a 4 TiB
//! volume at 64 KiB era blocks (67,108,864 blocks) with every other block
//! written, the worst case for the number of extents (33,554,432), read the
//! way the agent reads it (`DeviceBlocks` + `written_since`) and cut into
//! messages by the code the API streams them with (`extent_batches`).
//!
//! The metadata is synthetic (`changes::era_synthetic`): one undigested
//! writeset holding every written block, asked since its era, so the era
//! array need not be written out. It goes to a file under cargo's target
//! tmp dir (O_DIRECT needs a real file system, which /tmp may not be).
//!
//! Prints the blocks, the extents streamed, the messages, the wall time and
//! the peak resident memory (VmHWM) before and after the read, which
//! `/proc/self/clear_refs` resets once the metadata is written, so the
//! figure after is the read's own peak. Under `cargo test --benches` (no
//! `--bench`) it runs a 4 GiB volume, as a quick check.

use std::{io::Write, time::Instant};

use dmclone::changes::{
    ChangedBlocks, EXTENTS_PER_MESSAGE,
    era_metadata::{DeviceBlocks, written_since},
    era_synthetic::Image,
};

const ERA_BLOCK: u64 = 64 << 10;
const WRITESET_ERA: u32 = 5;
/// Bits 0, 2, 4, ... of every word: every other block written.
const EVERY_OTHER_BLOCK: u64 = 0x5555_5555_5555_5555;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let full = std::env::args().any(|arg| arg == "--bench");
    let volume_bytes: u64 = if full { 4 << 40 } else { 4 << 30 };
    let blocks = volume_bytes / ERA_BLOCK;

    let mut metadata = tempfile::NamedTempFile::new_in(env!("CARGO_TARGET_TMPDIR"))?;
    let metadata_bytes = write_metadata(metadata.as_file_mut(), blocks)?;
    let reset = reset_peak_memory();

    let before = memory_kib("VmHWM");
    let started = Instant::now();
    let mut device = DeviceBlocks::open(metadata.path())?;
    let written = written_since(&mut device, WRITESET_ERA, blocks)?;
    let read_done = started.elapsed();
    let answer = ChangedBlocks {
        since_era: u64::from(WRITESET_ERA),
        next_era: u64::from(WRITESET_ERA) + 1,
        block_bytes: ERA_BLOCK,
        volume_bytes,
        written,
    };
    let (messages, extents) = answer
        .extent_batches(EXTENTS_PER_MESSAGE)
        .fold((0u64, 0u64), |(messages, extents), batch| {
            (messages + 1, extents + batch.len() as u64)
        });
    let elapsed = started.elapsed();
    let after = memory_kib("VmHWM");

    assert_eq!(extents, blocks / 2, "every other block is one extent");
    println!(
        "era_answer: {} volume at {} KiB era blocks",
        bytes(volume_bytes),
        ERA_BLOCK >> 10
    );
    println!("  metadata file         {}", bytes(metadata_bytes));
    println!("  blocks                {blocks}");
    println!("  extents streamed      {extents}");
    println!("  messages              {messages} (at most {EXTENTS_PER_MESSAGE} extents each)");
    println!(
        "  bitset                {}",
        bytes(answer.written.heap_bytes() as u64)
    );
    println!(
        "  wall time             {:.3} s (read {:.3} s, batching {:.3} s)",
        elapsed.as_secs_f64(),
        read_done.as_secs_f64(),
        (elapsed - read_done).as_secs_f64()
    );
    println!("  peak RSS before read  {} ({reset})", kib(before));
    println!("  peak RSS after read   {}", kib(after));
    Ok(())
}

/// Writes metadata for `blocks` blocks with every other one written in one
/// undigested writeset; returns its size.
fn write_metadata(file: &mut std::fs::File, blocks: u64) -> std::io::Result<u64> {
    let nr_blocks = u32::try_from(blocks).map_err(std::io::Error::other)?;
    let words = vec![EVERY_OTHER_BLOCK; blocks.div_ceil(64) as usize];
    let image = Image::one_writeset(nr_blocks, WRITESET_ERA, &words);
    let mut out = std::io::BufWriter::new(file);
    image.write_to(&mut out)?;
    out.flush()?;
    out.get_ref().sync_all()?;
    out.get_ref().metadata().map(|m| m.len())
}

/// Resets VmHWM to the current resident size (Linux 4.0 and later), so the
/// peak after the read is the read's, not the metadata builder's.
fn reset_peak_memory() -> &'static str {
    match std::fs::write("/proc/self/clear_refs", "5") {
        Ok(()) => "peak reset after writing the metadata",
        Err(_) => "peak NOT reset: includes writing the metadata",
    }
}

/// A field of /proc/self/status, in KiB.
fn memory_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn kib(value: Option<u64>) -> String {
    value.map_or("unknown".into(), |kib| bytes(kib << 10))
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 40 => format!("{} TiB", n >> 40),
        n if n >= 1 << 30 => format!("{} GiB", n >> 30),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / f64::from(1 << 20)),
        n => format!("{:.1} KiB", n as f64 / 1024.0),
    }
}
