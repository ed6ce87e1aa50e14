use dmclone::dm::{
    status::{ThinPoolHealth, ThinStatus},
    table::{Target, Thin},
};

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn thin_pool_serves_independent_thin_volumes() {
    let dm = kernel();
    let prefix = "dmct-thin";
    remove_all_with_prefix(&dm, prefix).await;
    let pool = PoolFixture::create(&dm, prefix, 256 * MIB).await;

    let volume_sectors = 64 * MIB / SECTOR;
    let mut volumes = Vec::new();
    for id in [1u32, 2] {
        dm.message(&pool.name, 0, &format!("create_thin {id}"))
            .await
            .unwrap();
        let name = name(prefix, &format!("vol{id}"));
        let target = Target::Thin(Thin {
            pool: pool.dev,
            device_id: id,
            external_origin: None,
        });
        dm.create(&name, None, &table(volume_sectors, target))
            .await
            .unwrap();
        volumes.push(name);
    }

    // Fresh thin volumes read as zeros and map nothing.
    let fresh: ThinStatus = dm.status_of(&volumes[0], 0).await.unwrap();
    assert_eq!(fresh.mapped_sectors(), Some(Sectors(0)), "{fresh:?}");
    assert_eq!(read_at(&volumes[0].mapper_path(), 0, 4096), vec![0u8; 4096]);

    let data = pattern(7, 0, MIB as usize);
    write_at(&volumes[0].mapper_path(), 3 * MIB, &data);
    assert_eq!(
        read_at(&volumes[0].mapper_path(), 3 * MIB, MIB as usize),
        data
    );
    assert_eq!(
        read_at(&volumes[1].mapper_path(), 3 * MIB, 4096),
        vec![0u8; 4096],
        "writes to one thin volume must not show in another"
    );

    let written: ThinStatus = dm.status_of(&volumes[0], 0).await.unwrap();
    assert_eq!(written.mapped_sectors(), Some(sectors(MIB)), "{written:?}");
    let pool_status: ThinPoolHealth = dm.status_of(&pool.name, 0).await.unwrap();
    let used = pool_status.used_data_blocks().expect("pool is healthy");
    assert_eq!(used, MIB / SECTOR / POOL_BLOCK_SECTORS, "{pool_status:?}");

    remove_all_with_prefix(&dm, prefix).await;
}
