#![allow(clippy::unwrap_used)]

use crate::units::Sectors;
use proptest::prelude::*;

use super::*;

#[test]
fn clone_status_from_dm_facts() {
    let line =
        "8 27/4096 8 0/2048 0 1 no_hydration 4 hydration_threshold 1 hydration_batch_size 1 rw";
    let status: CloneStatus = line.parse().unwrap();
    assert_eq!(
        status.metadata,
        Usage {
            used: 27,
            total: 4096
        }
    );
    assert_eq!(status.region_sectors, Sectors(8));
    assert_eq!((status.hydrated_regions, status.total_regions), (0, 2048));
    assert_eq!(status.hydrating_regions, 0);
    assert!(status.features.no_hydration);
    assert!(!status.features.no_discard_passdown);
    assert_eq!(status.hydration_threshold, 1);
    assert_eq!(status.hydration_batch_size, 1);
    assert_eq!(status.mode, CloneMode::ReadWrite);
    assert!(!status.is_fully_hydrated());
    assert_eq!(status.to_string(), line);
}

#[test]
fn clone_status_fully_hydrated_and_read_only() {
    let line =
        "8 140/4096 1024 65536/65536 0 0 4 hydration_threshold 1024 hydration_batch_size 256 ro";
    let status: CloneStatus = line.parse().unwrap();
    assert!(status.is_fully_hydrated());
    assert_eq!(status.hydrated_fraction(), 1.0);
    assert_eq!(status.mode, CloneMode::ReadOnly);
    assert_eq!(status.to_string(), line);
}

#[test]
fn clone_failure_words() {
    assert_eq!("Fail".parse::<CloneHealth>().unwrap(), Health::Fail);
    assert_eq!("Error".parse::<CloneHealth>().unwrap(), Health::Error);
    assert!("Fail".parse::<CloneStatus>().is_err());
}

#[test]
fn clone_status_rejects_malformed_lines_quoting_them() {
    for line in [
        "",
        "8 27/4096 8 0/2048 0 0 4 hydration_threshold 1 hydration_batch_size 1",
        "8 27/4096 8 2049/2048 0 0 4 hydration_threshold 1 hydration_batch_size 1 rw",
        "8 5000/4096 8 0/2048 0 0 4 hydration_threshold 1 hydration_batch_size 1 rw",
        "8 27/4096 8 0/2048 0 1 turbo 4 hydration_threshold 1 hydration_batch_size 1 rw",
        "8 27/4096 8 0/2048 0 0 2 hydration_threshold 1 rw",
        "8 27-4096 8 0/2048 0 0 4 hydration_threshold 1 hydration_batch_size 1 rw",
        "8 27/4096 8 0/2048 0 0 4 hydration_threshold 1 hydration_batch_size 1 Fail",
    ] {
        let err = line.parse::<CloneStatus>().expect_err(line);
        assert_eq!(err.input, line);
        assert!(err.to_string().contains("clone status"), "{err}");
    }
}

#[test]
fn era_status_with_and_without_held_root() {
    let line = "8 30/2048 5 -";
    let status: EraStatus = line.parse().unwrap();
    assert_eq!(status.current_era, 5);
    assert_eq!(status.held_root, None);
    assert_eq!(status.to_string(), line);
    let held: EraStatus = "8 31/2048 6 17".parse().unwrap();
    assert_eq!(held.held_root, Some(17));
    assert!("8 31/2048 6".parse::<EraStatus>().is_err());
    assert!("8 31/2048 x -".parse::<EraStatus>().is_err());
}

#[test]
fn thin_pool_status_keeps_its_trailing_space() {
    let line = "0 141/4096 2/4096 - rw discard_passdown queue_if_no_space - 1024 ";
    let status: ThinPoolStatus = line.parse().unwrap();
    assert_eq!(status.transaction_id, 0);
    assert_eq!(
        status.metadata,
        Usage {
            used: 141,
            total: 4096
        }
    );
    assert_eq!(
        status.data,
        Usage {
            used: 2,
            total: 4096
        }
    );
    assert_eq!(status.held_root, None);
    assert_eq!(status.mode, PoolMode::ReadWrite);
    assert_eq!(status.discards, DiscardMode::Passdown);
    assert_eq!(status.no_space, NoSpacePolicy::Queue);
    assert!(!status.needs_check);
    assert_eq!(status.metadata_low_watermark, Some(1024));
    assert_eq!(status.to_string(), line);
    // Accepted without the trailing space and without the watermark too.
    let older: ThinPoolStatus =
        "3 10/100 5/50 12 out_of_data_space ignore_discard error_if_no_space needs_check"
            .parse()
            .unwrap();
    assert_eq!(older.metadata_low_watermark, None);
    assert_eq!(older.mode, PoolMode::OutOfDataSpace);
    assert_eq!(older.discards, DiscardMode::Ignore);
    assert!(older.needs_check);
    assert_eq!(older.held_root, Some(12));
}

#[test]
fn thin_pool_failure_words_and_rejections() {
    assert_eq!("Fail".parse::<ThinPoolHealth>().unwrap(), Health::Fail);
    assert_eq!(
        "Error"
            .parse::<ThinPoolHealth>()
            .unwrap()
            .used_data_blocks(),
        None
    );
    for line in [
        "0 141/4096 2/4096 - rw discard_passdown queue_if_no_space",
        "0 141/4096 2/4096 - xx discard_passdown queue_if_no_space - 1024",
        "0 141/4096 9/4 - rw discard_passdown queue_if_no_space - 1024",
        "0 141/4096 2/4096 - rw discard_passdown queue_if_no_space maybe 1024",
        "0 141/4096 2/4096 - rw discard_passdown queue_if_full - 1024",
    ] {
        let err = line.parse::<ThinPoolStatus>().expect_err(line);
        assert_eq!(err.input, line);
    }
}

#[test]
fn thin_and_delay_status() {
    assert_eq!(
        "2048 4095".parse::<ThinStatus>().unwrap(),
        ThinStatus::Active {
            mapped_sectors: Sectors(2048),
            highest_mapped_sector: Some(Sectors(4095))
        }
    );
    assert_eq!(
        "0 -".parse::<ThinStatus>().unwrap().mapped_sectors(),
        Some(Sectors(0))
    );
    assert_eq!("-".parse::<ThinStatus>().unwrap(), ThinStatus::NotOpen);
    assert_eq!("Fail".parse::<ThinStatus>().unwrap(), ThinStatus::Fail);
    assert!("12".parse::<ThinStatus>().is_err());

    let delay: DelayStatus = "1 2 3".parse().unwrap();
    assert_eq!((delay.reads, delay.writes, delay.flushes), (1, 2, Some(3)));
    assert_eq!("4 5".parse::<DelayStatus>().unwrap().flushes, None);
    assert!("4".parse::<DelayStatus>().is_err());
}

/// Words a newer kernel might append after the documented fields.
const NEWER_FIELDS: &str = " 7 future_flag -";

/// Parses `line` as it is and with `NEWER_FIELDS` appended, expects the same
/// value, and expects the line cut short by whole words to be rejected once
/// it lacks more than its `optional_words` (documented fields that older
/// kernels omit).
fn accepts_appended_fields_rejects_truncation<T>(line: &str, optional_words: usize)
where
    T: FromStr<Err = ParseError> + PartialEq + fmt::Debug,
{
    let documented: T = line.parse().expect(line);
    let extended = format!("{}{NEWER_FIELDS}", line.trim_end());
    assert_eq!(extended.parse::<T>().expect(&extended), documented);

    let words: Vec<&str> = line.split_whitespace().collect();
    for kept in 0..words.len() - optional_words {
        let truncated = words[..kept].join(" ");
        let err = truncated.parse::<T>().expect_err(&truncated);
        assert_eq!(err.input, truncated);
    }
}

#[test]
fn clone_status_accepts_newer_fields_and_rejects_truncation() {
    accepts_appended_fields_rejects_truncation::<CloneStatus>(
        "8 27/4096 8 0/2048 0 2 no_hydration no_discard_passdown 4 hydration_threshold 1 hydration_batch_size 1 rw",
        0,
    );
    accepts_appended_fields_rejects_truncation::<CloneStatus>(
        "8 140/4096 1024 65536/65536 0 0 4 hydration_threshold 1024 hydration_batch_size 256 ro",
        0,
    );
    let health: CloneHealth = format!(
        "8 27/4096 8 0/2048 0 0 4 hydration_threshold 1 hydration_batch_size 1 rw{NEWER_FIELDS}"
    )
    .parse()
    .unwrap();
    assert!(matches!(health, Health::Running(_)));
}

#[test]
fn era_status_accepts_newer_fields_and_rejects_truncation() {
    accepts_appended_fields_rejects_truncation::<EraStatus>("8 30/2048 5 -", 0);
    accepts_appended_fields_rejects_truncation::<EraStatus>("8 31/2048 6 17", 0);
}

#[test]
fn thin_pool_status_accepts_newer_fields_and_rejects_truncation() {
    // The watermark is optional (older kernels), so the line is complete
    // after the needs_check flag.
    let line = "0 141/4096 2/4096 - rw discard_passdown queue_if_no_space - 1024 ";
    accepts_appended_fields_rejects_truncation::<ThinPoolStatus>(line, 1);
    let extended: ThinPoolStatus = format!("{}{NEWER_FIELDS}", line.trim_end())
        .parse()
        .unwrap();
    assert_eq!(extended.metadata_low_watermark, Some(1024));
    let health: ThinPoolHealth = format!("{line}{NEWER_FIELDS}").parse().unwrap();
    assert_eq!(health.used_data_blocks(), Some(2));
}

#[test]
fn thin_status_accepts_newer_fields_and_rejects_truncation() {
    accepts_appended_fields_rejects_truncation::<ThinStatus>("2048 4095", 0);
    assert_eq!(
        "0 - 9 extra".parse::<ThinStatus>().unwrap(),
        ThinStatus::Active {
            mapped_sectors: Sectors(0),
            highest_mapped_sector: None
        }
    );
}

#[test]
fn delay_status_accepts_newer_fields_and_rejects_truncation() {
    accepts_appended_fields_rejects_truncation::<DelayStatus>("1 2 3", 1);
}

fn usage() -> impl Strategy<Value = Usage> {
    (any::<u64>(), any::<u64>()).prop_map(|(a, b)| Usage {
        used: a.min(b),
        total: a.max(b),
    })
}

fn clone_status() -> impl Strategy<Value = CloneStatus> {
    (
        (any::<u64>(), usage(), any::<u64>(), usage(), any::<u64>()),
        any::<(bool, bool)>(),
        any::<(u32, u32)>(),
        any::<bool>(),
    )
        .prop_map(
            |((block, metadata, region, regions, hydrating), (nh, nd), (t, b), ro)| CloneStatus {
                metadata_block_sectors: Sectors(block),
                metadata,
                region_sectors: Sectors(region),
                hydrated_regions: regions.used,
                total_regions: regions.total,
                hydrating_regions: hydrating,
                features: CloneFeatures {
                    no_hydration: nh,
                    no_discard_passdown: nd,
                },
                hydration_threshold: t,
                hydration_batch_size: b,
                mode: if ro {
                    CloneMode::ReadOnly
                } else {
                    CloneMode::ReadWrite
                },
            },
        )
}

fn thin_pool_status() -> impl Strategy<Value = ThinPoolStatus> {
    (
        (any::<u64>(), usage(), usage(), any::<Option<u64>>()),
        0usize..3,
        0usize..3,
        any::<(bool, bool, Option<u64>)>(),
    )
        .prop_map(
            |(
                (transaction_id, metadata, data, held_root),
                mode,
                discards,
                (error, check, mark),
            )| {
                ThinPoolStatus {
                    transaction_id,
                    metadata,
                    data,
                    held_root,
                    mode: [
                        PoolMode::ReadWrite,
                        PoolMode::ReadOnly,
                        PoolMode::OutOfDataSpace,
                    ][mode],
                    discards: [
                        DiscardMode::Ignore,
                        DiscardMode::Passdown,
                        DiscardMode::NoPassdown,
                    ][discards],
                    no_space: if error {
                        NoSpacePolicy::Error
                    } else {
                        NoSpacePolicy::Queue
                    },
                    needs_check: check,
                    metadata_low_watermark: mark,
                }
            },
        )
}

fn status_words() -> impl Strategy<Value = String> {
    let word = prop_oneof![
        Just("no_hydration".to_owned()),
        Just("hydration_threshold".to_owned()),
        Just("hydration_batch_size".to_owned()),
        Just("rw".to_owned()),
        Just("ro".to_owned()),
        Just("-".to_owned()),
        Just("Fail".to_owned()),
        Just("discard_passdown".to_owned()),
        Just("queue_if_no_space".to_owned()),
        (0u64..10).prop_map(|n| n.to_string()),
        (0u64..50, 0u64..50).prop_map(|(a, b)| format!("{a}/{b}")),
        "[a-z/0-9]{0,6}",
    ];
    prop::collection::vec(word, 0..16).prop_map(|w| w.join(" "))
}

fn parse_everything(line: &str) {
    let _ = line.parse::<CloneHealth>();
    let _ = line.parse::<EraStatus>();
    let _ = line.parse::<ThinPoolHealth>();
    let _ = line.parse::<ThinStatus>();
    let _ = line.parse::<DelayStatus>();
}

proptest! {
    #[test]
    fn clone_status_round_trips(status in clone_status()) {
        prop_assert_eq!(status.to_string().parse::<CloneStatus>(), Ok(status.clone()));
        let health = Health::Running(status);
        prop_assert_eq!(health.to_string().parse::<CloneHealth>(), Ok(health));
    }

    #[test]
    fn era_status_round_trips(
        block in any::<u64>(), metadata in usage(), era in any::<u32>(), held in any::<Option<u64>>()
    ) {
        let status = EraStatus { metadata_block_sectors: Sectors(block), metadata, current_era: era, held_root: held };
        prop_assert_eq!(status.to_string().parse::<EraStatus>(), Ok(status));
    }

    #[test]
    fn thin_pool_status_round_trips(status in thin_pool_status()) {
        let line = status.to_string();
        prop_assert!(line.ends_with(' '), "the kernel's trailing space: {:?}", line);
        prop_assert_eq!(line.parse::<ThinPoolStatus>(), Ok(status));
    }

    #[test]
    fn thin_and_delay_status_round_trip(
        mapped in any::<u64>(), highest in any::<Option<u64>>(),
        held in any::<(u64, u64, Option<u64>)>()
    ) {
        let thin = ThinStatus::Active { mapped_sectors: Sectors(mapped), highest_mapped_sector: highest.map(Sectors) };
        prop_assert_eq!(thin.to_string().parse::<ThinStatus>(), Ok(thin));
        let delay = DelayStatus { reads: held.0, writes: held.1, flushes: held.2 };
        prop_assert_eq!(delay.to_string().parse::<DelayStatus>(), Ok(delay));
    }

    #[test]
    fn arbitrary_text_never_panics(line in "\\PC{0,120}") {
        parse_everything(&line);
    }

    #[test]
    fn keyword_soup_never_panics_and_errors_quote_it(line in status_words()) {
        parse_everything(&line);
        if let Err(err) = line.parse::<CloneStatus>() {
            prop_assert_eq!(err.input, line);
        }
    }
}
