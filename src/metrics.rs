//! Prometheus metrics: one typed struct, one registry. Event-like figures
//! (RPCs, finalizes) are recorded where they happen; state-like figures
//! (pool usage, volumes and transfers by state, per-transfer progress) are
//! read from the agent at scrape time, so they are never stale.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransferLabels {
    transfer: String,
    volume: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

fn rpc_histogram() -> Histogram {
    // 100 µs .. ~3 min
    Histogram::new(exponential_buckets(0.0001, 3.0, 14))
}

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    /// A scrape refills the state-like families and encodes them; two at
    /// once would clear each other's series half-way.
    scrape: std::sync::Mutex<()>,
    rpc_requests: Family<RpcLabels, Counter>,
    rpc_duration: Family<MethodLabel, Histogram, fn() -> Histogram>,
    finalize_latency: Histogram,
    finalize_pause: Histogram,
    reconcile_duration: FloatGauge,
    pool_data_size: Gauge,
    pool_data_used: Gauge,
    pool_metadata_size: Gauge,
    pool_metadata_used: Gauge,
    pool_low_space: Gauge,
    volumes: Family<StateLabel, Gauge>,
    transfers: Family<StateLabel, Gauge>,
    transfer_hydrated_bytes: Family<TransferLabels, Gauge>,
    transfer_size_bytes: Family<TransferLabels, Gauge>,
    transfer_hydrated_regions: Family<TransferLabels, Gauge>,
    transfer_regions: Family<TransferLabels, Gauge>,
    transfer_rate: Family<TransferLabels, FloatGauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Scrape-time figures of one transfer.
#[derive(Debug, Clone)]
pub struct TransferFigures {
    pub transfer: String,
    pub volume: String,
    pub hydrated_bytes: u64,
    pub size_bytes: u64,
    pub hydrated_regions: u64,
    pub regions: u64,
    pub bytes_per_second: f64,
}

/// Scrape-time state of the agent.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub pool_data_size: u64,
    pub pool_data_used: u64,
    pub pool_metadata_size: u64,
    pub pool_metadata_used: u64,
    pub pool_low_space: bool,
    pub volumes_by_state: Vec<(&'static str, u64)>,
    pub transfers_by_state: Vec<(&'static str, u64)>,
    pub transfers: Vec<TransferFigures>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("dmclone");
        let metrics = Self {
            rpc_requests: Family::default(),
            rpc_duration: Family::new_with_constructor(rpc_histogram),
            finalize_latency: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            finalize_pause: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            reconcile_duration: FloatGauge::default(),
            pool_data_size: Gauge::default(),
            pool_data_used: Gauge::default(),
            pool_metadata_size: Gauge::default(),
            pool_metadata_used: Gauge::default(),
            pool_low_space: Gauge::default(),
            volumes: Family::default(),
            transfers: Family::default(),
            transfer_hydrated_bytes: Family::default(),
            transfer_size_bytes: Family::default(),
            transfer_hydrated_regions: Family::default(),
            transfer_regions: Family::default(),
            transfer_rate: Family::default(),
            registry: Registry::default(),
            scrape: std::sync::Mutex::default(),
        };
        let r = &mut registry;
        r.register(
            "rpc_requests",
            "gRPC calls handled, by method and status code",
            metrics.rpc_requests.clone(),
        );
        r.register_with_unit(
            "rpc_duration",
            "Time to handle a gRPC call",
            Unit::Seconds,
            metrics.rpc_duration.clone(),
        );
        r.register_with_unit(
            "transfer_finalize_latency",
            "From the kernel's hydration-complete event to the public device mapping the local copy",
            Unit::Seconds,
            metrics.finalize_latency.clone(),
        );
        r.register_with_unit(
            "transfer_finalize_pause",
            "How long I/O on the public device was held for the switch to the local copy",
            Unit::Seconds,
            metrics.finalize_pause.clone(),
        );
        r.register_with_unit(
            "reconcile_duration",
            "Duration of the last start-up reconciliation",
            Unit::Seconds,
            metrics.reconcile_duration.clone(),
        );
        r.register_with_unit(
            "pool_data_size",
            "Thin pool data space",
            Unit::Bytes,
            metrics.pool_data_size.clone(),
        );
        r.register_with_unit(
            "pool_data_used",
            "Thin pool data space in use",
            Unit::Bytes,
            metrics.pool_data_used.clone(),
        );
        r.register_with_unit(
            "pool_metadata_size",
            "Thin pool metadata space",
            Unit::Bytes,
            metrics.pool_metadata_size.clone(),
        );
        r.register_with_unit(
            "pool_metadata_used",
            "Thin pool metadata space in use",
            Unit::Bytes,
            metrics.pool_metadata_used.clone(),
        );
        r.register(
            "pool_low_space",
            "1 when the pool reached its low-space mark and refuses new allocations",
            metrics.pool_low_space.clone(),
        );
        r.register("volumes", "Volumes by state", metrics.volumes.clone());
        r.register(
            "transfers",
            "Transfers on this host by state",
            metrics.transfers.clone(),
        );
        r.register_with_unit(
            "transfer_hydrated",
            "Bytes of a transfer copied so far",
            Unit::Bytes,
            metrics.transfer_hydrated_bytes.clone(),
        );
        r.register_with_unit(
            "transfer_size",
            "Bytes a transfer copies in all",
            Unit::Bytes,
            metrics.transfer_size_bytes.clone(),
        );
        r.register(
            "transfer_hydrated_regions",
            "Regions of a transfer copied so far",
            metrics.transfer_hydrated_regions.clone(),
        );
        r.register(
            "transfer_regions",
            "Regions a transfer copies in all",
            metrics.transfer_regions.clone(),
        );
        r.register(
            "transfer_rate_bytes_per_second",
            "Current copy rate of a transfer (last 5 s)",
            metrics.transfer_rate.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// One finished call. `code` names its outcome as the API layer reports
    /// it (`Ok`, `AlreadyExists`, ...); this module does not know the wire.
    pub fn rpc(&self, method: &str, code: &str, seconds: f64) {
        self.rpc_requests
            .get_or_create(&RpcLabels {
                method: method.to_owned(),
                code: code.to_owned(),
            })
            .inc();
        self.rpc_duration
            .get_or_create(&MethodLabel {
                method: method.to_owned(),
            })
            .observe(seconds);
    }

    pub fn finalized(&self, latency_seconds: Option<f64>, pause_seconds: Option<f64>) {
        if let Some(latency) = latency_seconds {
            self.finalize_latency.observe(latency);
        }
        if let Some(pause) = pause_seconds {
            self.finalize_pause.observe(pause);
        }
    }

    pub fn reconciled(&self, seconds: f64) {
        self.reconcile_duration.set(seconds);
    }

    /// The text exposition after taking in the agent's current state.
    pub fn render(&self, snapshot: &Snapshot) -> String {
        // Each scrape refills everything it shows: one that panicked leaves
        // nothing for the next to distrust.
        let _one_scrape = self
            .scrape
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.pool_data_size.set(as_i64(snapshot.pool_data_size));
        self.pool_data_used.set(as_i64(snapshot.pool_data_used));
        self.pool_metadata_size
            .set(as_i64(snapshot.pool_metadata_size));
        self.pool_metadata_used
            .set(as_i64(snapshot.pool_metadata_used));
        self.pool_low_space.set(i64::from(snapshot.pool_low_space));
        for (family, counts) in [
            (&self.volumes, &snapshot.volumes_by_state),
            (&self.transfers, &snapshot.transfers_by_state),
        ] {
            family.clear();
            for (state, count) in counts {
                family
                    .get_or_create(&StateLabel {
                        state: (*state).to_owned(),
                    })
                    .set(as_i64(*count));
            }
        }
        for family in [
            &self.transfer_hydrated_bytes,
            &self.transfer_size_bytes,
            &self.transfer_hydrated_regions,
            &self.transfer_regions,
        ] {
            family.clear();
        }
        self.transfer_rate.clear();
        for t in &snapshot.transfers {
            let labels = TransferLabels {
                transfer: t.transfer.clone(),
                volume: t.volume.clone(),
            };
            self.transfer_hydrated_bytes
                .get_or_create(&labels)
                .set(as_i64(t.hydrated_bytes));
            self.transfer_size_bytes
                .get_or_create(&labels)
                .set(as_i64(t.size_bytes));
            self.transfer_hydrated_regions
                .get_or_create(&labels)
                .set(as_i64(t.hydrated_regions));
            self.transfer_regions
                .get_or_create(&labels)
                .set(as_i64(t.regions));
            self.transfer_rate
                .get_or_create(&labels)
                .set(t.bytes_per_second);
        }
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let metrics = Metrics::new();
        metrics.rpc("CreateVolume", "Ok", 0.002);
        metrics.rpc("CreateVolume", "AlreadyExists", 0.001);
        metrics.finalized(Some(0.04), Some(0.02));
        metrics.reconciled(1.5);
        let text = metrics.render(&Snapshot {
            pool_data_size: 100,
            pool_data_used: 40,
            volumes_by_state: vec![("available", 3)],
            transfers: vec![TransferFigures {
                transfer: "t".into(),
                volume: "v".into(),
                hydrated_bytes: 10,
                size_bytes: 20,
                hydrated_regions: 1,
                regions: 2,
                bytes_per_second: 5.5,
            }],
            ..Snapshot::default()
        });
        for line in [
            r#"dmclone_rpc_requests_total{method="CreateVolume",code="Ok"} 1"#,
            r#"dmclone_rpc_requests_total{method="CreateVolume",code="AlreadyExists"} 1"#,
            r#"dmclone_rpc_duration_seconds_count{method="CreateVolume"} 2"#,
            "dmclone_transfer_finalize_latency_seconds_count 1",
            "dmclone_reconcile_duration_seconds 1.5",
            "dmclone_pool_data_used_bytes 40",
            r#"dmclone_volumes{state="available"} 3"#,
            r#"dmclone_transfer_hydrated_bytes{transfer="t",volume="v"} 10"#,
            r#"dmclone_transfer_rate_bytes_per_second{transfer="t",volume="v"} 5.5"#,
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    fn with_transfers(names: &[&str]) -> Snapshot {
        Snapshot {
            transfers: names
                .iter()
                .map(|name| TransferFigures {
                    transfer: (*name).into(),
                    volume: (*name).into(),
                    hydrated_bytes: 1,
                    size_bytes: 2,
                    hydrated_regions: 1,
                    regions: 2,
                    bytes_per_second: 1.0,
                })
                .collect(),
            ..Snapshot::default()
        }
    }

    fn series_of(text: &str) -> usize {
        text.lines()
            .filter(|line| line.starts_with("dmclone_transfer_rate_bytes_per_second{"))
            .count()
    }

    #[test]
    fn concurrent_scrapes_each_see_every_series_of_their_state() {
        let metrics = std::sync::Arc::new(Metrics::new());
        let scrapers: Vec<_> = [&["a", "b", "c"][..], &["d", "e"][..]]
            .into_iter()
            .map(|names| {
                let metrics = std::sync::Arc::clone(&metrics);
                let state = with_transfers(names);
                std::thread::spawn(move || {
                    (0..2000)
                        .map(|_| series_of(&metrics.render(&state)))
                        .filter(|seen| *seen != state.transfers.len())
                        .count()
                })
            })
            .collect();
        for scraper in scrapers {
            assert_eq!(
                scraper.join().expect("a scraper that did not panic"),
                0,
                "scrapes that lost or mixed series"
            );
        }
    }
}
