use dmclone::units::Sectors;
use std::time::Duration;

use dmclone::{
    dm::{
        events::EventMonitor,
        status::ThinPoolHealth,
        table::{Target, Thin, ThinPool, ThinPoolFeatures},
    },
    error::ErrorKind,
};

use crate::support::*;

/// A thin pool raises an event when free space falls to its low-water mark;
/// the monitor must deliver it without anyone polling the pool's status.
#[tokio::test(flavor = "multi_thread")]
async fn pool_low_water_event_reaches_the_waiter() {
    let dm = kernel();
    let prefix = "dmct-lowwater";
    remove_all_with_prefix(&dm, prefix).await;
    let events = EventMonitor::start().unwrap();
    let meta = LoopDisk::metadata(8 * MIB);
    let data = LoopDisk::new(64 * MIB);
    let total_blocks = data.sectors() / POOL_BLOCK_SECTORS;
    let pool = name(prefix, "pool");
    let pool_target = Target::ThinPool(ThinPool {
        metadata: meta.dev,
        data: data.dev,
        data_block_sectors: Sectors(POOL_BLOCK_SECTORS),
        // Two free blocks short of full: the first allocation crosses it.
        low_water_blocks: total_blocks - 2,
        features: ThinPoolFeatures::default(),
    });
    let pool_dev = dm
        .create(&pool, None, &table(data.sectors(), pool_target))
        .await
        .unwrap()
        .device;
    dm.message(&pool, 0, "create_thin 1").await.unwrap();
    let thin = name(prefix, "thin");
    let thin_target = Target::Thin(Thin {
        pool: pool_dev,
        device_id: 1,
        external_origin: None,
    });
    dm.create(&thin, None, &table(data.sectors(), thin_target))
        .await
        .unwrap();

    let seen = dm.info(&pool).await.unwrap().unwrap().event_nr;
    assert_eq!(events.counter(&pool), Some(seen));
    // Three blocks' worth of writes, so free space drops below the mark.
    write_at(
        &thin.mapper_path(),
        0,
        &pattern(3, 0, (3 * POOL_BLOCK_SECTORS * SECTOR) as usize),
    );
    let now = tokio::time::timeout(Duration::from_secs(30), events.wait_for_event(&pool, seen))
        .await
        .expect("low-water event within 30 s")
        .unwrap();
    assert!(now > seen);
    let status: ThinPoolHealth = dm.status_of(&pool, 0).await.unwrap();
    assert!(status.used_data_blocks().unwrap() >= 3, "{status:?}");
    remove_all_with_prefix(&dm, prefix).await;
}

/// A waiter whose device disappears is told so instead of waiting forever.
#[tokio::test(flavor = "multi_thread")]
async fn waiting_on_a_removed_device_ends_with_not_found() {
    let dm = kernel();
    let prefix = "dmct-vanish";
    remove_all_with_prefix(&dm, prefix).await;
    let events = EventMonitor::start().unwrap();
    let disk = LoopDisk::new(4 * MIB);
    let name = name(prefix, "lin");
    let linear = Target::Linear(dmclone::dm::table::Linear {
        device: disk.dev,
        offset: Sectors(0),
    });
    let state = dm
        .create(&name, None, &table(disk.sectors(), linear))
        .await
        .unwrap();

    let waiter = {
        let name = name.clone();
        async move { events.wait_for_event(&name, state.event_nr).await }
    };
    let remover = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        dm.remove(&name).await.unwrap();
    };
    let (result, ()) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(waiter, remover)
    })
    .await
    .expect("the wait ends once the device is gone");
    let err = result.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err:?}");
}
