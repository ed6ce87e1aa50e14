//! The pure text layer sits on every status poll and table swap; these keep
//! an eye on its cost (compare runs of the same machine, not absolute times).

use dmclone::units::Sectors;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use dmclone::dm::{
    status::{CloneStatus, ThinPoolStatus},
    table::{CloneParams, DevRef, Table, Target},
};

const CLONE_STATUS: &str = "8 140/4096 8 31337/65536 12 1 no_hydration 4 hydration_threshold 1024 hydration_batch_size 256 rw";
const POOL_STATUS: &str = "5 141/4096 2/4096 - rw discard_passdown queue_if_no_space - 1024 ";

fn clone_table() -> Table {
    Table::single(
        Sectors(1 << 21),
        Target::Clone(CloneParams {
            metadata: DevRef::from((253, 1)),
            destination: DevRef::from((253, 2)),
            source: DevRef::from((259, 0)),
            region_sectors: Sectors(8),
            hydration: false,
            discard_passdown: true,
            hydration_threshold: Some(1024),
            hydration_batch_size: Some(256),
        }),
    )
    .expect("valid table")
}

fn status_parsing(c: &mut Criterion) {
    c.bench_function("parse clone status", |b| {
        b.iter(|| black_box(CLONE_STATUS).parse::<CloneStatus>())
    });
    c.bench_function("parse thin-pool status", |b| {
        b.iter(|| black_box(POOL_STATUS).parse::<ThinPoolStatus>())
    });
}

fn table_rendering(c: &mut Criterion) {
    let table = clone_table();
    c.bench_function("render clone table", |b| {
        b.iter(|| black_box(&table).to_ioctl_targets())
    });
    let lines = table.to_ioctl_targets();
    c.bench_function("parse clone table", |b| {
        b.iter(|| Table::parse_lines(black_box(&lines)))
    });
}

criterion_group!(benches, status_parsing, table_rendering);
criterion_main!(benches);
