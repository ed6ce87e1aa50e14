//! The rig: source, NVMe/TCP, thin pool and destination.

use dmclone::units::{Sectors, sectors};
use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::{Duration, Instant},
};

use dmclone::{
    aligned::AlignedBuf,
    dm::{
        Kernel, LiveKernel,
        events::EventMonitor,
        kernel::{DeviceMapper, Flush},
        names::DeviceName,
        status::{CloneMode, CloneStatus, Health},
        table::{DevRef, Table, Target as DmTarget, Thin, ThinPool},
    },
    error::Error as DmError,
    ids::VolumeId,
    nvme::{
        ConnectOptions, ConnectRequest, ConnectTimeouts, Controller, ExportRequest, Host, HostId,
        NamespaceDevice, Nqn, PortSpec, Target as NvmeTarget, TcpAddress, namespace_ids,
    },
    stack::{self, CloneDevices, CloneLayer, EraLayer, SwapOutcome},
    transfer::progress::Progress,
};
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::{
    CLONE_META_BYTES, HOST_ID, MIB, NQN_BASE, PATTERN_SEED, POOL_BLOCK_SECTORS, POOL_META_BYTES,
    PORT_ID, PREFIX, STALE_SEED, VOLUME,
    blockdev::{LoopFile, WriteWatcher, overwrite, pattern_into, sha256_of},
    common::{BenchResult, fio, run_tool},
    era_writes::{ERA_BLOCK_BYTES, LOCAL_ERA_META_THIN_ID},
    params::{Knobs, Params},
    report::ms,
    tools::SEQ_READ,
};

pub(crate) struct Rig {
    pub(crate) dm: DeviceMapper,
    /// The same device-mapper behind the agent's kernel seam, with the
    /// event watcher: what the agent's stack routines run on.
    pub(crate) kernel: LiveKernel,
    pub(crate) nvme_target: NvmeTarget,
    pub(crate) nvme_host: Host,
    pub(crate) subsystem: Nqn,
    pub(crate) controller: Controller,
    pub(crate) namespace: NamespaceDevice,
    pub(crate) size: u64,
    pub(crate) dest: DeviceName,
    pub(crate) dest_dev: DevRef,
    /// The destination thin device's table.
    pub(crate) dest_table: Table,
    pub(crate) pool_dev: DevRef,
    /// dm-era's metadata for the finalized public device, as the agent
    /// stacks a tracked volume: a thin device of the pool, formatted once.
    pub(crate) local_meta: DevRef,
    pub(crate) public: DeviceName,
    pub(crate) clone_meta: LoopFile,
    pub(crate) source: LoopFile,
    pub(crate) source_sha: String,
    pub(crate) stale: AlignedBuf,
    pub(crate) zeros: AlignedBuf,
    pub(crate) event_retries: u32,
    pub(crate) hydration_timeout: Duration,
    // Dropped last: the loop devices' backing files.
    pub(crate) _pool_meta: LoopFile,
    pub(crate) _pool_data: LoopFile,
    pub(crate) _dir: TempDir,
}

/// The public device of a finalized, tracked volume, as the agent maps it
/// (the agent's own table builder): dm-era over the destination thin device.
pub(crate) fn local_table(size: u64, metadata: DevRef, destination: DevRef) -> BenchResult<Table> {
    let era = EraLayer {
        metadata,
        block_bytes: ERA_BLOCK_BYTES,
    };
    Ok(stack::local_table(size, destination, Some(era))?)
}

/// A new thin device of the pool for dm-era's metadata, sized as the agent
/// sizes it (a fresh thin device reads as zeros, so dm-era formats it).
pub(crate) async fn era_metadata_device(
    dm: &DeviceMapper,
    pool_dev: DevRef,
    thin_id: u32,
    role: &str,
) -> BenchResult<DevRef> {
    dm.message(&dm_name("pool")?, 0, &format!("create_thin {thin_id}"))
        .await?;
    let bytes = dmclone::changes::era_metadata_bytes(
        dmclone::config::DEFAULT_MAX_VOLUME_SIZE,
        ERA_BLOCK_BYTES,
    );
    let table = Table::single(
        sectors(bytes),
        DmTarget::Thin(Thin {
            pool: pool_dev,
            device_id: thin_id,
            external_origin: None,
        }),
    )?;
    Ok(dm.create(&dm_name(role)?, None, &table).await?.device)
}

pub(crate) fn dm_name(role: &str) -> BenchResult<DeviceName> {
    Ok(DeviceName::new(&format!("{PREFIX}-{role}"))?)
}

pub(crate) fn nqn(name: &str) -> BenchResult<Nqn> {
    Ok(Nqn::parse("bench", &format!("{NQN_BASE}:{name}"))?)
}

/// Removes every device with the bench's prefix, each once nothing holds it
/// open (stacked devices go first).
pub(crate) async fn remove_bench_devices(dm: &DeviceMapper) -> BenchResult<()> {
    crate::common::remove_devices_with_prefix(dm, PREFIX).await
}

/// Fails loudly, with what to do, when this kernel cannot run the bench.
pub(crate) async fn preflight() -> BenchResult<(DeviceMapper, NvmeTarget, Host, String)> {
    let dm = DeviceMapper::open().map_err(|err| {
        format!(
            "no device-mapper here ({err}). Run the bench with benches/run, which boots a guest \
             kernel, or benches/run --host on a host with dm-clone, dm-thin-pool and NVMe/TCP"
        )
    })?;
    let loaded: Vec<String> = dm
        .target_versions()
        .await?
        .into_iter()
        .map(|t| format!("{} {}.{}.{}", t.name, t.version.0, t.version.1, t.version.2))
        .collect();
    // era: every rig finalizes onto dm-era, as the agent does.
    let needed = ["clone", "thin-pool", "thin", "linear", "era"];
    for needed in &needed {
        if !loaded.iter().any(|t| t.split(' ').next() == Some(needed)) {
            return Err(format!(
                "the kernel has no {needed} target (loaded: {}); modprobe dm_clone dm_thin_pool dm_era",
                loaded.join(", ")
            )
            .into());
        }
    }
    let nvme_target = NvmeTarget::open().map_err(|err| format!("NVMe target: {err}"))?;
    let nvme_host = Host::open().map_err(|err| format!("NVMe/TCP host: {err}"))?;
    run_tool("fio", &["--version".into()]).map_err(|err| format!("fio is needed: {err}"))?;
    run_tool("dd", &["--version".into()]).map_err(|err| format!("dd is needed: {err}"))?;
    let targets = loaded
        .iter()
        .filter(|t| needed.contains(&t.split(' ').next().unwrap_or("")))
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    Ok((dm, nvme_target, nvme_host, targets))
}

impl Rig {
    pub(crate) async fn build(
        params: &Params,
        dm: DeviceMapper,
        nvme_target: NvmeTarget,
        nvme_host: Host,
    ) -> BenchResult<Self> {
        let size = params.size;
        let subsystem = nqn("source")?;
        let host_nqn = nqn("host")?;
        let volume = VolumeId::parse(VOLUME)?;

        // Leftovers of an interrupted run on an opted-in host.
        remove_bench_devices(&dm).await?;
        if let Some(controller) = nvme_host.find_connection(&subsystem).await? {
            nvme_host.disconnect(&controller).await?;
        }
        nvme_target.unexport(&subsystem).await?;

        let dir = tempfile::Builder::new()
            .prefix("dmclone-hydration-bench.")
            .tempdir_in(std::env::temp_dir())?;
        let source = LoopFile::create(
            dir.path(),
            "source.img",
            size,
            Some(&|offset, chunk: &mut [u8]| pattern_into(PATTERN_SEED, offset, chunk)),
        )?;
        let pool_meta = LoopFile::create(dir.path(), "pool-meta.img", POOL_META_BYTES, None)?;
        // Room for the whole volume, dm-era's metadata (section 5) and the
        // pool's rounding; sparse on tmpfs, so unused room costs nothing.
        let pool_data_bytes = size + 128 * MIB;
        let pool_data = LoopFile::create(dir.path(), "pool-data.img", pool_data_bytes, None)?;
        let clone_meta = LoopFile::create(dir.path(), "clone-meta.img", CLONE_META_BYTES, None)?;

        let pool = dm_name("pool")?;
        let pool_table = Table::single(
            sectors(pool_data_bytes),
            DmTarget::ThinPool(ThinPool {
                metadata: pool_meta.dev,
                data: pool_data.dev,
                data_block_sectors: Sectors(POOL_BLOCK_SECTORS),
                low_water_blocks: 0,
                features: Default::default(),
            }),
        )?;
        let pool_dev = dm.create(&pool, None, &pool_table).await?.device;
        dm.message(&pool, 0, "create_thin 1").await?;
        let dest = dm_name("dest")?;
        let dest_table = Table::single(
            sectors(size),
            DmTarget::Thin(Thin {
                pool: pool_dev,
                device_id: 1,
                external_origin: None,
            }),
        )?;
        let dest_dev = dm.create(&dest, None, &dest_table).await?.device;
        let local_meta =
            era_metadata_device(&dm, pool_dev, LOCAL_ERA_META_THIN_ID, "local-meta").await?;
        // Formatted now, as the agent formats an arriving volume's at start.
        let probe = dm_name("era-probe")?;
        dm.create(&probe, None, &local_table(size, local_meta, dest_dev)?)
            .await?;
        dm.remove(&probe).await?;

        let port = PortSpec {
            id: PORT_ID,
            address: TcpAddress::new(IpAddr::V4(Ipv4Addr::LOCALHOST), params.port),
        };
        nvme_target
            .export(&ExportRequest {
                subsystem_nqn: subsystem.clone(),
                device_path: source.path.clone(),
                namespace: namespace_ids(&volume),
                host_nqn: host_nqn.clone(),
                port,
                auth: None,
            })
            .await?;
        let connection = nvme_host
            .connect(&ConnectRequest {
                options: ConnectOptions {
                    address: port.address,
                    subsystem_nqn: subsystem.clone(),
                    host_nqn,
                    host_id: HostId::parse(HOST_ID)?,
                    timeouts: ConnectTimeouts::default(),
                    auth: None,
                },
                expected_namespace: vec![namespace_ids(&volume)],
                namespace_timeout: Duration::from_secs(60),
            })
            .await?;
        if connection.namespace.size_bytes != size {
            return Err(format!(
                "the namespace has {} bytes, the source {size}",
                connection.namespace.size_bytes
            )
            .into());
        }

        let mut stale = AlignedBuf::new(MIB as usize);
        pattern_into(STALE_SEED, 0, stale.as_mut_slice());
        let zeros = AlignedBuf::new(MIB as usize);
        let kernel = LiveKernel::from_parts(dm.clone(), EventMonitor::start()?);
        let mut rig = Rig {
            dm,
            kernel,
            nvme_target,
            nvme_host,
            subsystem,
            controller: connection.controller,
            namespace: connection.namespace,
            size,
            dest_dev,
            pool_dev,
            local_meta,
            public: dm_name("public")?,
            dest,
            dest_table,
            clone_meta,
            source_sha: String::new(),
            source,
            stale,
            zeros,
            event_retries: 0,
            hydration_timeout: params.hydration_timeout,
            _pool_meta: pool_meta,
            _pool_data: pool_data,
            _dir: dir,
        };
        // Pre-fill: every block of the destination is allocated now, once.
        let step = Instant::now();
        rig.stale_dest()?;
        let prefill = step.elapsed();
        let step = Instant::now();
        rig.source_sha = sha256_of(&rig.source.path, size)?;
        let hashing = step.elapsed();
        // Warm the NVMe/TCP path once (untimed).
        fio(&rig.namespace.path, SEQ_READ, size)?;
        eprintln!(
            "[bench] ready: destination pre-filled in {:.1} s, source sha256 {} in {:.1} s",
            prefill.as_secs_f64(),
            &rig.source_sha[..16],
            hashing.as_secs_f64()
        );
        Ok(rig)
    }

    pub(crate) fn dest_path(&self) -> PathBuf {
        self.dest.mapper_path()
    }

    /// Overwrites the whole destination with bytes that differ from the
    /// source, so a verified copy proves itself; nothing allocates (every
    /// block was written at setup).
    pub(crate) fn stale_dest(&self) -> BenchResult<()> {
        overwrite(&self.dest_path(), self.size, &self.stale)
    }

    pub(crate) fn zero_clone_meta(&self) -> BenchResult<()> {
        overwrite(&self.clone_meta.path, CLONE_META_BYTES, &self.zeros)
    }

    pub(crate) fn verify_dest(&self) -> BenchResult<bool> {
        Ok(sha256_of(&self.dest_path(), self.size)? == self.source_sha)
    }

    /// The agent's clone table for an arriving volume, with these knobs.
    pub(crate) fn clone_table(&self, knobs: &Knobs) -> BenchResult<Table> {
        let layer = CloneLayer {
            clone_bytes: self.size,
            region_bytes: knobs.region_bytes,
            hydration_threshold: knobs.threshold,
            hydration_batch_size: knobs.batch,
            hydrate: true,
            discard_passdown: true,
        };
        let devices = CloneDevices {
            metadata: self.clone_meta.dev,
            destination: self.dest_dev,
            source: self.namespace.device,
        };
        Ok(stack::clone_table(self.size, &layer, devices)?)
    }

    /// The agent's table for an untracked local volume.
    pub(crate) fn linear_table(&self) -> BenchResult<Table> {
        Ok(stack::local_table(self.size, self.dest_dev, None)?)
    }

    /// Fresh metadata, then the clone is created with hydration on; the clock
    /// starts just before the create call. With `stale`, the destination is
    /// overwritten with bytes unlike the source first (for a verified run:
    /// a clone with fresh metadata copies every region whatever the
    /// destination holds, so other runs skip it). With `watch`, the
    /// destination's writes are sampled from just before the create.
    pub(crate) async fn start_clone(
        &self,
        knobs: &Knobs,
        stale: bool,
        watch: bool,
    ) -> BenchResult<Started> {
        self.zero_clone_meta()?;
        if stale {
            self.stale_dest()?;
        }
        let table = self.clone_table(knobs)?;
        let watcher = if watch {
            Some(WriteWatcher::start(self.dest_dev)?)
        } else {
            None
        };
        let at = Instant::now();
        let state = self.dm.create(&self.public, None, &table).await?;
        Ok(Started {
            at,
            seen: state.event_nr,
            watcher,
        })
    }

    pub(crate) async fn clone_status(&self) -> BenchResult<CloneStatus> {
        match self
            .dm
            .status_of::<Health<CloneStatus>>(&self.public, 0)
            .await?
        {
            Health::Running(status) => Ok(status),
            other => Err(format!("the clone reports {other}").into()),
        }
    }

    /// Waits for the clone's completion event as the agent's monitor does
    /// (after one status read: a clone complete before the wait starts
    /// raises nothing we could still see): on the event, or on the agent's
    /// look interval (`Progress::next_look`: often close to the end), and
    /// when a look finds every region in, the agent's flush makes the clone
    /// commit and signal at once instead of on its 1 s tick.
    pub(crate) async fn wait_hydrated(&mut self, seen: u32) -> BenchResult<Completion> {
        let status = self.clone_status().await?;
        if status.is_fully_hydrated() {
            return Ok(Completion {
                received: Instant::now(),
                status,
                via_event: false,
                flushed: false,
                other_events: 0,
            });
        }
        let deadline = Instant::now() + self.hydration_timeout;
        let mut progress = Progress::default();
        progress.observe(
            Instant::now(),
            status.hydrated_regions,
            status.total_regions,
        );
        let mut seen = seen;
        let mut other_events = 0;
        let mut flushed = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "no completion event from {} within {:?}",
                    self.public, self.hydration_timeout
                )
                .into());
            }
            let look = if flushed {
                left
            } else {
                progress.next_look(LOOK_TICK).min(left)
            };
            let waited =
                tokio::time::timeout(look, self.kernel.wait_for_event(&self.public, seen)).await;
            let received = Instant::now();
            let signalled = waited.is_ok();
            match waited {
                Ok(Ok(counter)) => seen = counter,
                // The event watcher has not listed the just-created device yet.
                Ok(Err(DmError::NoSuchDevice { .. }))
                    if self.dm.info(&self.public).await?.is_some() =>
                {
                    self.event_retries += 1;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
                Ok(Err(err)) => return Err(err.into()),
                Err(_look_over) => {}
            }
            let status = self.clone_status().await?;
            progress.observe(received, status.hydrated_regions, status.total_regions);
            if status.mode != CloneMode::ReadWrite {
                return Err(format!("the clone's metadata went {:?}", status.mode).into());
            }
            match (signalled, status.is_fully_hydrated()) {
                (true, true) => {
                    return Ok(Completion {
                        received,
                        status,
                        via_event: true,
                        flushed,
                        other_events,
                    });
                }
                (true, false) => other_events += 1,
                (false, true) if !flushed => {
                    self.kernel.flush(&self.public).await?;
                    flushed = true;
                }
                (false, _) => {}
            }
        }
    }

    /// The agent's finalize where the clone is the public device (untracked
    /// volumes, and tracked ones that began arriving before dm-era went
    /// above the clone), through the agent's own swap routine
    /// (stack::swap_under_io): the local table (dm-era over the
    /// destination) loaded beside the live clone, then, in one kernel step,
    /// suspend with flush, the clone's completeness checked while
    /// suspended, resume (which swaps the tables); an incomplete clone
    /// resumes unchanged.
    pub(crate) async fn finalize(&self) -> BenchResult<Swap> {
        let local = local_table(self.size, self.local_meta, self.dest_dev)?;
        let outcome =
            stack::swap_under_io(&self.kernel, &self.public, &local, stack::clone_ready).await?;
        let swap = Swap::of(outcome)?;
        self.check_local().await?;
        Ok(swap)
    }

    /// The agent's public device over an arriving, tracked volume: dm-era
    /// (the agent's own table builder) above the live clone. Returns its
    /// name; [`Rig::remove_era_above`] takes it away.
    pub(crate) async fn era_above(&self) -> BenchResult<DeviceName> {
        let (clone, _) = self
            .dm
            .live_table(&self.public)
            .await?
            .ok_or("no clone to put dm-era above")?;
        let name = dm_name("era-above")?;
        let table = local_table(self.size, self.local_meta, clone)?;
        self.dm.create(&name, None, &table).await?;
        Ok(name)
    }

    pub(crate) async fn remove_era_above(&self) -> BenchResult<()> {
        self.dm.remove(&dm_name("era-above")?).await?;
        Ok(())
    }

    /// The agent's finalize with dm-era above the clone, through the agent's
    /// own swap routine: only the layer beneath dm-era changes, from the
    /// clone to the destination's thin device (its thin id activated a
    /// second time; loaded beside the clone, suspend with flush,
    /// completeness checked while suspended, resume). dm-era is not touched.
    pub(crate) async fn finalize_beneath_era(&self) -> BenchResult<Swap> {
        let outcome = stack::swap_under_io(
            &self.kernel,
            &self.public,
            &self.dest_table,
            stack::clone_ready,
        )
        .await?;
        let swap = Swap::of(outcome)?;
        let live = self.dm.table(&self.public).await?;
        if live.segments()[0].target.type_name() != "thin" {
            return Err(format!("after the swap the layer beneath dm-era is {live}").into());
        }
        Ok(swap)
    }

    /// Section 3's variant, the agent's order before dm-era was loaded
    /// beside the clone: suspend with flush, status check, load the local table (dm-era
    /// opens its metadata inside the pause), resume. Kept as the baseline
    /// the agent's order is measured against; it is not the agent's code.
    pub(crate) async fn finalize_loading_in_pause(&self) -> BenchResult<Swap> {
        let local = local_table(self.size, self.local_meta, self.dest_dev)?;
        let started = Instant::now();
        self.dm.suspend(&self.public, Flush::Flush).await?;
        let suspended = Instant::now();
        let complete = self.clone_complete().await;
        let checked = Instant::now();
        if !complete {
            self.dm.resume(&self.public).await?;
            return Err("the clone was not complete when suspended for the swap".into());
        }
        let loaded = self.dm.load(&self.public, &local).await;
        let load_done = Instant::now();
        self.dm.resume(&self.public).await?;
        let resumed = Instant::now();
        loaded?;
        self.check_local().await?;
        Ok(Swap {
            started,
            resumed,
            preload: None,
            suspend: suspended - started,
            status: checked - suspended,
            load: Some(load_done - checked),
            resume: resumed - load_done,
        })
    }

    pub(crate) async fn clone_complete(&self) -> bool {
        match self.dm.status(&self.public).await {
            Ok(status) => stack::clone_ready(&status),
            Err(_) => false,
        }
    }

    pub(crate) async fn check_local(&self) -> BenchResult<()> {
        let live = self.dm.table(&self.public).await?;
        if live.segments()[0].target.type_name() != "era" {
            return Err(format!("after the swap the public table is {live}").into());
        }
        Ok(())
    }

    pub(crate) async fn teardown(&self) -> BenchResult<()> {
        remove_bench_devices(&self.dm).await?;
        self.nvme_host.disconnect(&self.controller).await?;
        self.nvme_target.unexport(&self.subsystem).await?;
        Ok(())
    }
}

pub(crate) struct Started {
    pub(crate) at: Instant,
    pub(crate) seen: u32,
    pub(crate) watcher: Option<WriteWatcher>,
}

#[derive(Debug)]
pub(crate) struct Completion {
    pub(crate) received: Instant,
    pub(crate) status: CloneStatus,
    pub(crate) via_event: bool,
    /// The event came after the end-of-copy flush, not on the clone's tick.
    pub(crate) flushed: bool,
    pub(crate) other_events: u32,
}

/// The agent monitor's look interval away from a copy's end.
const LOOK_TICK: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy)]
pub(crate) struct Swap {
    /// The suspend call.
    pub(crate) started: Instant,
    pub(crate) resumed: Instant,
    /// A load before the suspend, outside the pause window.
    pub(crate) preload: Option<Duration>,
    pub(crate) suspend: Duration,
    pub(crate) status: Duration,
    /// A load inside the pause window.
    pub(crate) load: Option<Duration>,
    pub(crate) resume: Duration,
}

impl Swap {
    /// The timings of a swap through the agent's routine; a clone found
    /// incomplete while suspended is an error here.
    pub(crate) fn of(outcome: SwapOutcome) -> BenchResult<Self> {
        let SwapOutcome::Swapped(timings) = outcome else {
            return Err("the clone was not complete when suspended for the swap".into());
        };
        Ok(Swap {
            started: timings.started,
            resumed: timings.resumed,
            preload: Some(timings.preload),
            suspend: timings.suspend,
            status: timings.check,
            load: None,
            resume: timings.resume,
        })
    }

    pub(crate) fn total(&self) -> Duration {
        self.resumed - self.started
    }

    pub(crate) fn json(&self) -> Value {
        json!({
            "total_ms": ms(self.total()),
            "preload_ms": self.preload.map(ms),
            "suspend_ms": ms(self.suspend),
            "status_ms": ms(self.status),
            "load_ms": self.load.map(ms),
            "resume_ms": ms(self.resume),
        })
    }
}
