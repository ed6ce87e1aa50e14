//! Changed-block tracking with dm-era, through the agent: checkpoints,
//! changed extents since a checkpoint or a snapshot, history across
//! unpublish/publish and a kill -9, and where history has to start again.

use std::{collections::BTreeSet, path::Path};

use dmclone::api::proto::v1::{
    GetChangedBlocksRequest, MarkCheckpointRequest, get_changed_blocks_request::Since,
    snapshots_client::SnapshotsClient,
};
use proptest::{
    prelude::*,
    test_runner::{Config, TestCaseError, TestRunner},
};
use tonic::Code;

use super::{
    api::{VOL_A, VOL_B, create, delete, get, publish, unpublish},
    fixture::AgentProcess,
    snapshots::{from_snapshot, revert, snapshot},
};
use crate::support::*;

/// The agent's default dm-era block.
pub const BLOCK: u64 = 64 * 1024;
const SIZE: u64 = 64 * MIB;
const S1: &str = "5a9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d01";
const S2: &str = "5a9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d02";

pub async fn checkpoint(agent: &AgentProcess, volume: &str) -> Result<u64, tonic::Status> {
    SnapshotsClient::new(agent.channel().await)
        .mark_checkpoint(MarkCheckpointRequest {
            volume_id: volume.into(),
        })
        .await
        .map(|r| r.into_inner().era)
}

/// The era blocks the agent reports written since `since`, checking that
/// every message agrees on the eras and the granularity.
pub async fn changed(
    agent: &AgentProcess,
    volume: &str,
    since: Since,
) -> Result<BTreeSet<u64>, tonic::Status> {
    let mut stream = SnapshotsClient::new(agent.channel().await)
        .get_changed_blocks(GetChangedBlocksRequest {
            volume_id: volume.into(),
            since: Some(since),
        })
        .await?
        .into_inner();
    let mut blocks = BTreeSet::new();
    let mut messages = 0;
    while let Some(message) = stream.message().await? {
        messages += 1;
        assert_eq!(message.block_bytes, BLOCK, "{message:?}");
        assert!(message.since_era < message.next_era, "{message:?}");
        for extent in message.extents {
            assert!(extent.length_bytes > 0, "{extent:?}");
            assert_eq!(extent.offset_bytes % BLOCK, 0, "{extent:?}");
            let end = (extent.offset_bytes + extent.length_bytes).div_ceil(BLOCK);
            blocks.extend(extent.offset_bytes / BLOCK..end);
        }
    }
    assert!(messages >= 1, "an answer is at least one message");
    Ok(blocks)
}

/// The era blocks a write of `len` bytes at `offset` touches.
pub fn blocks_of(offset: u64, len: u64) -> impl Iterator<Item = u64> {
    offset / BLOCK..(offset + len).div_ceil(BLOCK)
}

fn write_blocks(path: &Path, blocks: &[u64], seed: u64) {
    for block in blocks {
        write_at(path, block * BLOCK + 8192, &pattern(seed, *block, 4096));
    }
}

#[derive(Debug, Clone)]
enum Step {
    /// 4 KiB-aligned write, possibly across era blocks.
    Write {
        offset: u64,
        len: u64,
    },
    Checkpoint,
    /// Unpublish, optionally mark a checkpoint while unpublished (dm-era is
    /// then activated for the call alone), publish again.
    Republish {
        checkpoint: bool,
    },
    Compare,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..SIZE / 4096, 1u64..=40).prop_map(|(page, pages)| Step::Write {
            offset: page * 4096,
            len: (pages * 4096).min(SIZE - page * 4096),
        }),
        2 => Just(Step::Checkpoint),
        1 => any::<bool>().prop_map(|checkpoint| Step::Republish { checkpoint }),
        2 => Just(Step::Compare),
    ]
}

/// Every point so far (era 0 for the empty volume, then each checkpoint)
/// with the blocks written since it.
struct Model {
    points: Vec<(u64, BTreeSet<u64>)>,
}

impl Model {
    fn wrote(&mut self, offset: u64, len: u64) {
        for (_, blocks) in &mut self.points {
            blocks.extend(blocks_of(offset, len));
        }
    }

    fn mark(&mut self, era: u64) -> Result<(), TestCaseError> {
        let last = self.points.last().map_or(0, |(e, _)| *e);
        prop_assert!(era > last, "checkpoint era {era} after era {last}");
        self.points.push((era, BTreeSet::new()));
        Ok(())
    }

    async fn compare(&self, agent: &AgentProcess, volume: &str) -> Result<(), TestCaseError> {
        for (era, expected) in &self.points {
            let got = changed(agent, volume, Since::Era(*era)).await.unwrap();
            prop_assert_eq!(&got, expected, "changed since era {}", era);
        }
        Ok(())
    }
}

/// One case on a fresh volume, removed afterwards whatever the outcome, so
/// that shrinking has room.
async fn run_case(agent: &AgentProcess, volume: &str, steps: &[Step]) -> Result<(), TestCaseError> {
    let mut volumes = agent.volumes().await;
    create(&mut volumes, volume, SIZE).await.unwrap();
    let outcome = run_steps(agent, volume, steps).await;
    let _ = unpublish(&mut volumes, volume).await;
    delete(&mut volumes, volume).await.unwrap();
    outcome
}

async fn run_steps(
    agent: &AgentProcess,
    volume: &str,
    steps: &[Step],
) -> Result<(), TestCaseError> {
    let mut volumes = agent.volumes().await;
    let mut path = publish(&mut volumes, volume).await.unwrap();
    let mut model = Model {
        points: vec![(0, BTreeSet::new())],
    };
    for (i, step) in steps.iter().enumerate() {
        match step {
            Step::Write { offset, len } => {
                let data = pattern(i as u64, *offset, *len as usize);
                write_at(Path::new(&path), *offset, &data);
                model.wrote(*offset, *len);
            }
            Step::Checkpoint => model.mark(checkpoint(agent, volume).await.unwrap())?,
            Step::Republish { checkpoint: mark } => {
                unpublish(&mut volumes, volume).await.unwrap();
                if *mark {
                    model.mark(checkpoint(agent, volume).await.unwrap())?;
                    model.compare(agent, volume).await?;
                }
                path = publish(&mut volumes, volume).await.unwrap();
            }
            Step::Compare => model.compare(agent, volume).await?,
        }
    }
    model.compare(agent, volume).await
}

/// Random writes, checkpoints and republishing; at every comparison the
/// blocks reported since each point are exactly the era blocks written
/// since it: none missed, none extra.
#[test]
fn changed_blocks_are_exactly_the_blocks_written_since_each_point() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let agent = runtime.block_on(AgentProcess::start("dmctcbt"));
    let mut runner = TestRunner::new(Config {
        cases: 6,
        max_shrink_iters: 16,
        failure_persistence: None,
        ..Config::default()
    });
    let case = std::sync::atomic::AtomicU32::new(0);
    let result = runner.run(&proptest::collection::vec(step(), 4..24), |steps| {
        let n = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let volume = format!("5e9d1c3e-5f1a-4f7e-9a57-3f0c2b8f{n:04x}");
        runtime.block_on(run_case(&agent, &volume, &steps))
    });
    if let Err(err) = result {
        panic!("{err}\nagent log:\n{}", agent.log());
    }
    runtime.block_on(agent.destroy());
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_record_their_era_and_history_survives_a_kill9() {
    let mut agent = AgentProcess::start("dmctcbtsnap").await;
    let mut volumes = agent.volumes().await;
    create(&mut volumes, VOL_A, SIZE).await.unwrap();
    assert!(get(&mut volumes, VOL_A).await.unwrap().change_tracking);
    let path = publish(&mut volumes, VOL_A).await.unwrap();
    write_blocks(Path::new(&path), &[1, 2], 1);

    // Published: dm-era is suspended around the snapshot, so the era it
    // records starts exactly after it.
    let first = snapshot(&agent, S1, VOL_A).await.unwrap();
    assert!(first.has_era, "{first:?}");
    write_blocks(Path::new(&path), &[5], 2);
    let since = |s: &str| Since::SnapshotId(s.to_owned());
    assert_eq!(changed(&agent, VOL_A, since(S1)).await.unwrap(), [5].into());

    // Unpublished: dm-era runs only for the call.
    unpublish(&mut volumes, VOL_A).await.unwrap();
    let second = snapshot(&agent, S2, VOL_A).await.unwrap();
    assert!(second.has_era && second.era > first.era, "{second:?}");
    assert_eq!(changed(&agent, VOL_A, since(S2)).await.unwrap(), [].into());
    let path = publish(&mut volumes, VOL_A).await.unwrap();
    write_blocks(Path::new(&path), &[9], 3);
    assert_eq!(changed(&agent, VOL_A, since(S2)).await.unwrap(), [9].into());
    assert_eq!(
        changed(&agent, VOL_A, since(S1)).await.unwrap(),
        [5, 9].into()
    );
    let before_kill = checkpoint(&agent, VOL_A).await.unwrap();
    write_blocks(Path::new(&path), &[12], 4);

    agent.kill9().await;
    agent.restart().await;
    assert_eq!(
        changed(&agent, VOL_A, since(S1)).await.unwrap(),
        [5, 9, 12].into(),
        "history survives a kill -9"
    );
    assert_eq!(
        changed(&agent, VOL_A, Since::Era(before_kill))
            .await
            .unwrap(),
        [12].into()
    );
    let after = checkpoint(&agent, VOL_A).await.unwrap();
    assert!(after > before_kill);
    assert_eq!(
        changed(&agent, VOL_A, Since::Era(0)).await.unwrap(),
        [1, 2, 5, 9, 12].into(),
        "era 0: everything written since the volume was made"
    );

    let future = changed(&agent, VOL_A, Since::Era(after + 100))
        .await
        .unwrap_err();
    assert_eq!(future.code(), Code::InvalidArgument, "{future:?}");
    assert!(future.message().contains("has not begun"), "{future:?}");
    unpublish(&mut volumes, VOL_A).await.unwrap();
    agent.destroy().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn history_starts_again_when_content_comes_from_elsewhere() {
    let agent = AgentProcess::start("dmctcbtnew").await;
    let mut volumes = agent.volumes().await;
    create(&mut volumes, VOL_A, SIZE).await.unwrap();
    let path = publish(&mut volumes, VOL_A).await.unwrap();
    write_blocks(Path::new(&path), &[1, 2], 1);
    snapshot(&agent, S1, VOL_A).await.unwrap();
    write_blocks(Path::new(&path), &[3], 2);
    unpublish(&mut volumes, VOL_A).await.unwrap();

    // A volume made from a snapshot knows only what is written to it.
    from_snapshot(&mut volumes, VOL_B, SIZE, S1).await.unwrap();
    let unknown = changed(&agent, VOL_B, Since::Era(0)).await.unwrap_err();
    assert_eq!(unknown.code(), Code::FailedPrecondition, "{unknown:?}");
    assert!(unknown.message().contains("known from era"), "{unknown:?}");
    assert_eq!(
        refusal_reason(&unknown).as_deref(),
        Some("ERA_BEFORE_HISTORY")
    );
    let start = checkpoint(&agent, VOL_B).await.unwrap();
    let copy = publish(&mut volumes, VOL_B).await.unwrap();
    write_blocks(Path::new(&copy), &[7], 3);
    assert_eq!(
        changed(&agent, VOL_B, Since::Era(start)).await.unwrap(),
        [7].into()
    );
    let other = changed(&agent, VOL_B, Since::SnapshotId(S1.into()))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::InvalidArgument, "{other:?}");
    // Eras carry their history: one of VOL_A's, or a bare dm-era number,
    // means nothing for VOL_B and is refused, not answered.
    let era_of_a = checkpoint(&agent, VOL_A).await.unwrap();
    for foreign in [era_of_a, start & 0xffff_ffff] {
        let refused = changed(&agent, VOL_B, Since::Era(foreign))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        assert!(refused.message().contains("not from volume"), "{refused:?}");
        assert_eq!(
            refusal_reason(&refused).as_deref(),
            Some("ERA_OTHER_HISTORY")
        );
    }
    unpublish(&mut volumes, VOL_B).await.unwrap();

    // A revert replaces the content: questions about before it are refused.
    let before_revert = checkpoint(&agent, VOL_A).await.unwrap();
    revert(&agent, VOL_A, S1).await.unwrap();
    let stale = changed(&agent, VOL_A, Since::Era(before_revert))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");
    let reverted = changed(&agent, VOL_A, Since::SnapshotId(S1.into()))
        .await
        .unwrap_err();
    assert_eq!(reverted.code(), Code::FailedPrecondition, "{reverted:?}");
    let start = checkpoint(&agent, VOL_A).await.unwrap();
    let path = publish(&mut volumes, VOL_A).await.unwrap();
    write_blocks(Path::new(&path), &[4], 4);
    assert_eq!(
        changed(&agent, VOL_A, Since::Era(start)).await.unwrap(),
        [4].into()
    );
    unpublish(&mut volumes, VOL_A).await.unwrap();

    // Deleting removes dm-era's devices with the volume's.
    delete(&mut volumes, VOL_B).await.unwrap();
    let leftovers: Vec<String> = kernel()
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.name)
        // Other tests, running beside this one, use the same volume ids.
        .filter(|n| n.starts_with(&format!("{}-", agent.prefix)) && n.contains(VOL_B))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    agent.destroy().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn volumes_made_without_tracking_say_so() {
    let agent = AgentProcess::start_with(
        "dmctcbtoff",
        &["--pool-file-size", "1G", "--change-tracking", "false"],
        &[],
    )
    .await;
    let mut volumes = agent.volumes().await;
    create(&mut volumes, VOL_A, SIZE).await.unwrap();
    assert!(!get(&mut volumes, VOL_A).await.unwrap().change_tracking);
    let path = publish(&mut volumes, VOL_A).await.unwrap();
    let table = kernel()
        .table(&dmclone::dm::names::DeviceName::new(&format!("dmctcbtoff-{VOL_A}")).unwrap())
        .await
        .unwrap();
    assert!(table.to_string().contains("linear"), "{table}");
    write_blocks(Path::new(&path), &[1], 1);
    let refused = checkpoint(&agent, VOL_A).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("does not track changed blocks"),
        "{refused:?}"
    );
    assert_eq!(
        refusal_reason(&refused).as_deref(),
        Some("VOLUME_NOT_TRACKED")
    );
    let snap = snapshot(&agent, S1, VOL_A).await.unwrap();
    assert!(!snap.has_era, "{snap:?}");
    unpublish(&mut volumes, VOL_A).await.unwrap();
    agent.destroy().await;
}
