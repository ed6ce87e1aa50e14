use std::collections::BTreeSet;

use dmclone::dm::{
    status::EraStatus,
    table::{Era, Target},
};

use crate::support::*;

const ERA_BLOCK_SECTORS: u64 = 128;
const ERA_BLOCK: u64 = ERA_BLOCK_SECTORS * SECTOR;

/// Blocks written since `era`, read from a metadata snapshot with
/// thin-provisioning-tools (the test's own cross-check; the library gets its
/// own reader with changed-block tracking).
#[allow(clippy::disallowed_types)]
fn written_since(meta: &std::path::Path, era: u32) -> BTreeSet<u64> {
    let output = std::process::Command::new("era_invalidate")
        .args(["--metadata-snapshot", "--written-since", &era.to_string()])
        .arg(meta)
        .output()
        .expect("era_invalidate from thin-provisioning-tools");
    assert!(
        output.status.success(),
        "era_invalidate failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    parse_invalidate_xml(&String::from_utf8_lossy(&output.stdout))
}

/// Reads `<block block="b"/>` and `<range begin="b" end="e"/>` (end
/// exclusive). Debian's tool writes `end = "e"`, so spaces around `=` are
/// allowed.
fn parse_invalidate_xml(xml: &str) -> BTreeSet<u64> {
    let mut blocks = BTreeSet::new();
    for line in xml.lines() {
        if line.contains("<block ") {
            blocks.insert(xml_attr(line, "block").expect("block attribute"));
        } else if line.contains("<range ") {
            let begin = xml_attr(line, "begin").expect("begin attribute");
            let end = xml_attr(line, "end").expect("end attribute");
            blocks.extend(begin..end);
        }
    }
    blocks
}

fn xml_attr(line: &str, key: &str) -> Option<u64> {
    let mut rest = line;
    while let Some(at) = rest.find(key) {
        let after = rest[at + key.len()..].trim_start();
        if let Some(value) = after.strip_prefix('=') {
            let value = value.trim_start().strip_prefix('"')?;
            return value[..value.find('"')?].parse().ok();
        }
        rest = &rest[at + key.len()..];
    }
    None
}

#[tokio::test(flavor = "multi_thread")]
async fn era_reports_exactly_the_blocks_written_since_a_checkpoint() {
    let dm = kernel();
    let prefix = "dmct-era";
    remove_all_with_prefix(&dm, prefix).await;
    let origin = LoopDisk::new(16 * MIB);
    let meta = LoopDisk::metadata(8 * MIB);
    let name = name(prefix, "era");
    let target = Target::Era(Era {
        metadata: meta.dev,
        origin: origin.dev,
        block_sectors: Sectors(ERA_BLOCK_SECTORS),
    });
    dm.create(&name, None, &table(origin.sectors(), target))
        .await
        .unwrap();
    let start: EraStatus = dm.status_of(&name, 0).await.unwrap();

    for block in [3u64, 10, 11] {
        write_at(&name.mapper_path(), block * ERA_BLOCK + 512, &[0xAB; 4096]);
    }
    dm.message(&name, 0, "checkpoint").await.unwrap();
    let after_checkpoint: EraStatus = dm.status_of(&name, 0).await.unwrap();
    assert!(after_checkpoint.current_era > start.current_era);
    write_at(&name.mapper_path(), 20 * ERA_BLOCK, &[0xCD; 4096]);

    dm.message(&name, 0, "take_metadata_snap").await.unwrap();
    let held: EraStatus = dm.status_of(&name, 0).await.unwrap();
    assert!(held.held_root.is_some(), "{held:?}");
    let since_start = written_since(meta.path(), start.current_era);
    let since_checkpoint = written_since(meta.path(), after_checkpoint.current_era);
    dm.message(&name, 0, "drop_metadata_snap").await.unwrap();

    assert_eq!(since_start, BTreeSet::from([3, 10, 11, 20]));
    assert_eq!(since_checkpoint, BTreeSet::from([20]));
    let released: EraStatus = dm.status_of(&name, 0).await.unwrap();
    assert_eq!(released.held_root, None);
    remove_all_with_prefix(&dm, prefix).await;
}

#[test]
fn invalidate_xml_parser_reads_blocks_and_ranges() {
    let xml = "<blocks>\n  <block block=\"3\"/>\n  <range begin=\"10\" end=\"12\"/>\n</blocks>\n";
    assert_eq!(parse_invalidate_xml(xml), BTreeSet::from([3, 10, 11]));
    let debian = "<blocks>\n  <range begin=\"20\" end = \"22\"/>\n</blocks>\n";
    assert_eq!(parse_invalidate_xml(debian), BTreeSet::from([20, 21]));
}

/// The agent's own reader of dm-era metadata against era_invalidate and
/// against the writes themselves, after many eras (the kernel digests older
/// writesets into the era array meanwhile) on an origin of 300,000 blocks,
/// so the trees have inner nodes.
#[tokio::test(flavor = "multi_thread")]
async fn the_metadata_reader_agrees_with_era_invalidate_and_with_the_writes() {
    use dmclone::changes::era_metadata::{
        DeviceBlocks, undigested_eras, written_since as read_since,
    };
    const SMALL_BLOCK: u64 = 4096;
    let dm = kernel();
    let prefix = "dmct-erard";
    remove_all_with_prefix(&dm, prefix).await;
    let origin = LoopDisk::new(1200 * MIB);
    let meta = LoopDisk::metadata(32 * MIB);
    let name = name(prefix, "era");
    let target = Target::Era(Era {
        metadata: meta.dev,
        origin: origin.dev,
        block_sectors: sectors(SMALL_BLOCK),
    });
    dm.create(&name, None, &table(origin.sectors(), target))
        .await
        .unwrap();
    let blocks = origin.sectors() * SECTOR / SMALL_BLOCK;
    let start: EraStatus = dm.status_of(&name, 0).await.unwrap();
    let mut points = vec![(start.current_era, BTreeSet::new())];
    for round in 0..24u64 {
        for i in 0..6 {
            let block = pattern(round, i, 8)
                .iter()
                .fold(0u64, |n, b| n << 8 | u64::from(*b))
                % blocks;
            write_at(
                &name.mapper_path(),
                block * SMALL_BLOCK,
                &[round as u8; 4096],
            );
            for (_, written) in &mut points {
                written.insert(block);
            }
        }
        dm.message(&name, 0, "checkpoint").await.unwrap();
        let now: EraStatus = dm.status_of(&name, 0).await.unwrap();
        points.push((now.current_era, BTreeSet::new()));
        if round < 16 {
            // Time for the kernel to digest writesets into the era array;
            // the last rounds go fast so that some stay undigested.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    for block in [0, blocks / 2, blocks - 1] {
        write_at(&name.mapper_path(), block * SMALL_BLOCK, &[0xEE; 4096]);
        for (_, written) in &mut points {
            written.insert(block);
        }
    }
    dm.message(&name, 0, "take_metadata_snap").await.unwrap();
    let pending = undigested_eras(&mut DeviceBlocks::open(meta.path()).unwrap()).unwrap();
    let last = points.last().unwrap().0;
    assert!(
        pending.contains(&u64::from(last)),
        "the writes of the last era are in an undigested writeset: {pending:?}"
    );
    assert!(
        pending.first() > Some(&u64::from(start.current_era)),
        "some eras are read from the era array: {pending:?}"
    );
    println!(
        "eras {}..={last}, writesets not yet in the era array: {pending:?}",
        start.current_era
    );
    for (era, expected) in &points {
        let mut device = DeviceBlocks::open(meta.path()).unwrap();
        let ours: BTreeSet<u64> = read_since(&mut device, *era, blocks)
            .unwrap()
            .runs()
            .flatten()
            .collect();
        assert_eq!(&ours, expected, "the agent's reader, since era {era}");
        assert_eq!(
            &written_since(meta.path(), *era),
            expected,
            "era_invalidate, since era {era}"
        );
    }
    dm.message(&name, 0, "drop_metadata_snap").await.unwrap();
    remove_all_with_prefix(&dm, prefix).await;
}
