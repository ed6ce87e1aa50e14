use dmclone::units::Sectors;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use dmclone::dm::table::{Linear, Segment, Table, Target};

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn mapper_node_follows_the_device_without_udev() {
    let dm = kernel();
    let prefix = "dmct-node";
    remove_all_with_prefix(&dm, prefix).await;
    let disk = LoopDisk::with_pattern(4 * MIB, 5);
    let name = name(prefix, "lin");
    let linear = Target::Linear(Linear {
        device: disk.dev,
        offset: Sectors(0),
    });
    let state = dm
        .create(
            &name,
            Some("DMCT-node-uuid"),
            &table(disk.sectors(), linear),
        )
        .await
        .unwrap();

    let meta = std::fs::metadata(name.mapper_path()).unwrap();
    assert!(meta.file_type().is_block_device());
    assert_eq!(
        nix::sys::stat::major(meta.rdev()) as u32,
        state.device.major
    );
    assert_eq!(
        nix::sys::stat::minor(meta.rdev()) as u32,
        state.device.minor
    );
    assert!(
        state.dm_node().exists(),
        "devtmpfs node {:?}",
        state.dm_node()
    );
    assert_eq!(read_at(&name.mapper_path(), 0, 4096), pattern(5, 0, 4096));

    let listed = dm.list().await.unwrap();
    let entry = listed.iter().find(|d| d.name == name.as_str()).unwrap();
    assert_eq!(entry.device, state.device);

    dm.remove(&name).await.unwrap();
    assert!(
        !name.mapper_path().exists(),
        "node left behind after remove"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn multi_segment_table_maps_each_range_and_reads_back() {
    let dm = kernel();
    let prefix = "dmct-segments";
    remove_all_with_prefix(&dm, prefix).await;
    let first = LoopDisk::with_pattern(2 * MIB, 21);
    let second = LoopDisk::with_pattern(2 * MIB, 22);
    let name = name(prefix, "joined");
    let table = Table::new(vec![
        Segment {
            start: Sectors(0),
            len: Sectors(first.sectors()),
            target: Target::Linear(Linear {
                device: first.dev,
                offset: Sectors(0),
            }),
        },
        Segment {
            start: Sectors(first.sectors()),
            len: Sectors(second.sectors()),
            target: Target::Linear(Linear {
                device: second.dev,
                offset: Sectors(0),
            }),
        },
    ])
    .unwrap();
    dm.create(&name, None, &table).await.unwrap();

    assert_eq!(dm.table(&name).await.unwrap(), table);
    assert_eq!(read_at(&name.mapper_path(), 0, 4096), pattern(21, 0, 4096));
    assert_eq!(
        read_at(&name.mapper_path(), 2 * MIB, 4096),
        pattern(22, 0, 4096)
    );
    assert_eq!(dm.status(&name).await.unwrap().len(), 2);
    dm.remove(&name).await.unwrap();
}
