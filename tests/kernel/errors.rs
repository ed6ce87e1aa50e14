use dmclone::units::Sectors;
use dmclone::{
    Error,
    dm::table::{CloneParams, DevRef, Linear, Target},
    error::ErrorKind,
};

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn malformed_table_is_a_typed_error_naming_device_and_line() {
    let dm = kernel();
    let prefix = "dmct-badtable";
    remove_all_with_prefix(&dm, prefix).await;
    let source = LoopDisk::new(4 * MIB);
    let dest = LoopDisk::new(4 * MIB);
    let meta = LoopDisk::metadata(4 * MIB);
    let name = name(prefix, "clone");
    // The clone is longer than its destination: the kernel's constructor
    // rejects it, and the create must leave nothing behind.
    let too_long = Target::Clone(CloneParams {
        metadata: meta.dev,
        destination: dest.dev,
        source: source.dev,
        region_sectors: Sectors(8),
        hydration: true,
        discard_passdown: true,
        hydration_threshold: None,
        hydration_batch_size: None,
    });
    let err = dm
        .create(&name, None, &table(source.sectors() * 2, too_long))
        .await
        .unwrap_err();
    match &err {
        Error::TableLoad {
            device,
            errno,
            table,
        } => {
            assert_eq!(device, name.as_str());
            assert_eq!(*errno, nix::errno::Errno::EINVAL);
            assert!(
                table.contains(&format!("0 {} clone", source.sectors() * 2)),
                "{table}"
            );
        }
        other => panic!("expected a table load error, got {other:?}"),
    }
    assert!(err.to_string().contains(name.as_str()));
    assert!(
        dm.info(&name).await.unwrap().is_none(),
        "a failed create must not leave a device"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rejected_replacement_keeps_the_old_table_serving() {
    let dm = kernel();
    let prefix = "dmct-badswap";
    remove_all_with_prefix(&dm, prefix).await;
    let disk = LoopDisk::with_pattern(4 * MIB, 11);
    let name = name(prefix, "lin");
    let good = Target::Linear(Linear {
        device: disk.dev,
        offset: Sectors(0),
    });
    dm.create(&name, None, &table(disk.sectors(), good.clone()))
        .await
        .unwrap();
    // A device that does not exist (major 4095 is never registered; a missing
    // loop minor would be created on open) is refused when the table loads; a range
    // past the end of the disk only when the new table is resumed. Either way
    // the old table must come back and keep serving.
    let missing_device = Target::Linear(Linear {
        device: DevRef::from((4095, 0)),
        offset: Sectors(0),
    });
    let beyond_the_end = Target::Linear(Linear {
        device: disk.dev,
        offset: Sectors(disk.sectors() * 4),
    });
    for bad in [missing_device, beyond_the_end] {
        let bad = table(disk.sectors(), bad);
        let err = dm
            .swap_table(&name, &bad)
            .await
            .expect_err(&format!("the kernel accepted {bad}"));
        assert!(matches!(err, Error::TableLoad { .. }), "{err:?}");
        assert!(err.to_string().contains(name.as_str()), "{err}");
        assert_eq!(
            dm.table(&name).await.unwrap(),
            table(disk.sectors(), good.clone())
        );
    }

    let state = dm.info(&name).await.unwrap().unwrap();
    assert!(
        !state.suspended,
        "device left suspended after a rejected swap"
    );
    assert_eq!(
        read_at(&name.mapper_path(), MIB, 4096),
        pattern(11, MIB, 4096)
    );
    remove_all_with_prefix(&dm, prefix).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_and_busy_devices_have_their_own_errors() {
    let dm = kernel();
    let prefix = "dmct-busy";
    remove_all_with_prefix(&dm, prefix).await;
    let missing = name(prefix, "missing");
    let err = dm.status(&missing).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err:?}");
    let err = dm.remove(&missing).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err:?}");

    let disk = LoopDisk::new(4 * MIB);
    let name = name(prefix, "open");
    let linear = Target::Linear(Linear {
        device: disk.dev,
        offset: Sectors(0),
    });
    dm.create(&name, None, &table(disk.sectors(), linear))
        .await
        .unwrap();
    let holder = std::fs::File::open(name.mapper_path()).unwrap();
    let err = dm.remove(&name).await.unwrap_err();
    match &err {
        Error::DeviceBusy { device, open_count } => {
            assert_eq!(device, name.as_str());
            assert_eq!(*open_count, 1);
        }
        other => panic!("expected busy, got {other:?}"),
    }
    assert!(
        dm.info(&name).await.unwrap().is_some(),
        "busy device was removed"
    );
    drop(holder);
    dm.remove(&name).await.unwrap();
    assert!(dm.info(&name).await.unwrap().is_none());
}
