#![allow(clippy::unwrap_used)]

use crate::units::Sectors;
use proptest::prelude::*;

use super::*;

const TYPES: [&str; 8] = [
    "linear",
    "thin-pool",
    "thin",
    "clone",
    "era",
    "flakey",
    "delay",
    "error",
];

fn dev(major: u32, minor: u32) -> DevRef {
    DevRef::from((major, minor))
}

fn parse(type_name: &str, params: &str) -> Target {
    Target::parse(type_name, params)
        .unwrap_or_else(|err| panic!("{type_name} {params:?} should parse: {err}"))
}

fn rejects(type_name: &str, params: &str) -> ParseError {
    let err = Target::parse(type_name, params)
        .expect_err(&format!("{type_name} {params:?} should be rejected"));
    assert_eq!(err.input, params, "the error quotes the input");
    err
}

#[test]
fn clone_line_from_dm_facts_round_trips() {
    let line = "253:1 253:2 253:3 8 1 no_hydration 2 hydration_threshold 256";
    let Target::Clone(clone) = parse("clone", line) else {
        panic!("not a clone")
    };
    assert_eq!(clone.metadata, dev(253, 1));
    assert_eq!(clone.destination, dev(253, 2));
    assert_eq!(clone.source, dev(253, 3));
    assert_eq!(clone.region_sectors, Sectors(8));
    assert!(!clone.hydration);
    assert!(clone.discard_passdown);
    assert_eq!(clone.hydration_threshold, Some(256));
    assert_eq!(clone.hydration_batch_size, None);
    assert_eq!(Target::Clone(clone).params(), line);
}

#[test]
fn clone_renders_minimal_lines() {
    let mut clone = CloneParams {
        metadata: dev(8, 1),
        destination: dev(8, 2),
        source: dev(8, 3),
        region_sectors: Sectors(8),
        hydration: true,
        discard_passdown: true,
        hydration_threshold: None,
        hydration_batch_size: None,
    };
    assert_eq!(Target::Clone(clone.clone()).params(), "8:1 8:2 8:3 8");
    clone.hydration_threshold = Some(1024);
    clone.hydration_batch_size = Some(256);
    // Core args need the feature count in front of them, even when it is 0.
    assert_eq!(
        Target::Clone(clone.clone()).params(),
        "8:1 8:2 8:3 8 0 4 hydration_threshold 1024 hydration_batch_size 256"
    );
    clone.discard_passdown = false;
    clone.hydration = false;
    clone.hydration_threshold = None;
    clone.hydration_batch_size = None;
    assert_eq!(
        Target::Clone(clone).params(),
        "8:1 8:2 8:3 8 2 no_hydration no_discard_passdown"
    );
}

#[test]
fn clone_keywords_are_case_insensitive() {
    let Target::Clone(clone) = parse(
        "clone",
        "1:1 1:2 1:3 16 1 NO_HYDRATION 4 Hydration_Batch_Size 3 hydration_threshold 9",
    ) else {
        panic!("not a clone")
    };
    assert!(!clone.hydration);
    assert_eq!(clone.hydration_threshold, Some(9));
    assert_eq!(clone.hydration_batch_size, Some(3));
}

#[test]
fn clone_rejects_what_its_constructor_rejects() {
    for (params, why) in [
        ("1:1 1:2 1:3", "too few"),
        ("1:1 1:2 1:3 12", "not a power of two"),
        ("1:1 1:2 1:3 4", "below 8"),
        ("1:1 1:2 1:3 4194304", "above 1 GiB"),
        ("1:1 1:2 1:3 8 3 a b c", "too many features"),
        ("1:1 1:2 1:3 8 1 fast", "unknown feature"),
        (
            "1:1 1:2 1:3 8 2 no_hydration no_hydration",
            "duplicate feature",
        ),
        (
            "1:1 1:2 1:3 8 0 3 hydration_threshold 1 x",
            "odd core count",
        ),
        ("1:1 1:2 1:3 8 0 6 a 1 b 2 c 3", "core count above 4"),
        ("1:1 1:2 1:3 8 0 2 speed 1", "unknown core arg"),
        ("1:1 1:2 1:3 8 0 2 hydration_threshold -1", "negative value"),
        (
            "1:1 1:2 1:3 8 0 2 hydration_threshold 1 extra",
            "extra word",
        ),
        ("1:1 1:2 /dev/sda 8", "path instead of MAJ:MIN"),
    ] {
        let err = rejects("clone", params);
        assert!(err.to_string().contains("clone table"), "{why}: {err}");
    }
}

#[test]
fn thin_pool_and_thin_lines() {
    let pool = ThinPool {
        metadata: dev(7, 0),
        data: dev(7, 1),
        data_block_sectors: Sectors(128),
        low_water_blocks: 32,
        features: ThinPoolFeatures {
            skip_block_zeroing: true,
            error_if_no_space: true,
            ..ThinPoolFeatures::default()
        },
    };
    let line = "7:0 7:1 128 32 2 skip_block_zeroing error_if_no_space";
    assert_eq!(Target::ThinPool(pool.clone()).params(), line);
    assert_eq!(parse("thin-pool", line), Target::ThinPool(pool));
    assert_eq!(
        parse("thin-pool", "7:0 7:1 256 0 1 Ignore_Discard"),
        Target::ThinPool(ThinPool {
            metadata: dev(7, 0),
            data: dev(7, 1),
            data_block_sectors: Sectors(256),
            low_water_blocks: 0,
            features: ThinPoolFeatures {
                ignore_discard: true,
                ..ThinPoolFeatures::default()
            },
        })
    );
    rejects("thin-pool", "7:0 7:1 100 0");
    rejects("thin-pool", "7:0 7:1 128 0 5 a b c d e");
    rejects("thin-pool", "7:0 7:1 128 0 2 read_only");

    assert_eq!(
        Target::Thin(Thin {
            pool: dev(253, 0),
            device_id: 7,
            external_origin: Some(dev(8, 16)),
        })
        .params(),
        "253:0 7 8:16"
    );
    rejects("thin", "253:0 16777216");
    rejects("thin", "253:0 1 8:16 8:17");
}

#[test]
fn era_flakey_delay_and_linear_lines() {
    assert_eq!(
        parse("era", "8:1 8:2 128"),
        Target::Era(Era {
            metadata: dev(8, 1),
            origin: dev(8, 2),
            block_sectors: Sectors(128)
        })
    );
    // era does not need a power of two, only a multiple of 8.
    parse("era", "8:1 8:2 24");
    rejects("era", "8:1 8:2 12");
    rejects("era", "8:1 8:2 0");

    let flakey = Flakey {
        device: dev(7, 3),
        offset: Sectors(0),
        up_seconds: 5,
        down_seconds: 1,
        features: vec![
            FlakeyFeature::ErrorWrites,
            FlakeyFeature::CorruptBioByte {
                nth: 32,
                direction: BioDirection::Read,
                value: 1,
                flags: 0,
            },
        ],
    };
    let line = "7:3 0 5 1 6 error_writes corrupt_bio_byte 32 r 1 0";
    assert_eq!(Target::Flakey(flakey.clone()).params(), line);
    assert_eq!(parse("flakey", line), Target::Flakey(flakey));
    rejects("flakey", "7:3 0 0 0");
    rejects("flakey", "7:3 0 5 1 2 drop_writes");
    rejects("flakey", "7:3 0 5 1 5 corrupt_bio_byte 0 r 1 0");

    assert_eq!(parse("delay", "7:1 0 50"), parse("delay", "7:1   0\t50"));
    assert_eq!(
        Target::Delay(Delay {
            read: DelayLeg {
                device: dev(7, 1),
                offset: Sectors(0),
                delay_ms: 0
            },
            write: Some(DelayLeg {
                device: dev(7, 2),
                offset: Sectors(8),
                delay_ms: 400
            }),
            flush: None,
        })
        .params(),
        "7:1 0 0 7:2 8 400"
    );
    rejects("delay", "7:1 0 50 7:2");
    rejects("delay", "7:1 0 50 7:2 0 1 7:3 0 1 7:4");

    assert_eq!(parse("linear", "8:16 2048").params(), "8:16 2048");
    rejects("linear", "8:16");
    rejects("linear", "8:16 2048 7");
    assert!(Target::parse("striped", "2 8 8:1 0 8:2 0").is_err());
}

#[test]
fn tables_must_be_contiguous_from_zero() {
    let lin = |start, len| Segment {
        start: Sectors(start),
        len: Sectors(len),
        target: Target::Error,
    };
    assert!(Table::new(vec![]).is_err());
    assert!(Table::new(vec![lin(0, 0)]).is_err());
    assert!(Table::new(vec![lin(1, 8)]).is_err());
    assert!(Table::new(vec![lin(0, 8), lin(9, 8)]).is_err());
    assert!(Table::new(vec![lin(0, 8), lin(4, 8)]).is_err());
    assert!(Table::new(vec![lin(0, u64::MAX), lin(u64::MAX, 1)]).is_err());
    let table = Table::new(vec![lin(0, 8), lin(8, 16)]).unwrap();
    assert_eq!(table.len_sectors(), Sectors(24));
    assert_eq!(table.to_string(), "0 8 error\n8 16 error");
}

#[test]
fn multi_segment_table_renders_ioctl_targets() {
    let table = Table::new(vec![
        Segment {
            start: Sectors(0),
            len: Sectors(2048),
            target: parse("clone", "253:5 253:6 259:0 8 1 no_hydration"),
        },
        Segment {
            start: Sectors(2048),
            len: Sectors(1024),
            target: parse("thin", "253:0 4"),
        },
    ])
    .unwrap();
    let targets = table.to_ioctl_targets();
    assert_eq!(
        targets,
        vec![
            (
                0,
                2048,
                "clone".to_owned(),
                "253:5 253:6 259:0 8 1 no_hydration".to_owned()
            ),
            (2048, 1024, "thin".to_owned(), "253:0 4".to_owned()),
        ]
    );
    assert_eq!(Table::parse_lines(&targets).unwrap(), table);
}

fn dev_ref() -> impl Strategy<Value = DevRef> {
    (0u32..4096, 0u32..(1 << 20)).prop_map(DevRef::from)
}

fn thin_pool() -> impl Strategy<Value = ThinPool> {
    (
        dev_ref(),
        dev_ref(),
        1u64..=16384,
        any::<u64>(),
        prop::array::uniform5(any::<bool>()),
    )
        .prop_filter("at most four features", |(.., f)| {
            f.iter().filter(|on| **on).count() <= 4
        })
        .prop_map(|(metadata, data, blocks, low_water_blocks, f)| ThinPool {
            metadata,
            data,
            data_block_sectors: Sectors(blocks * 128),
            low_water_blocks,
            features: ThinPoolFeatures {
                skip_block_zeroing: f[0],
                ignore_discard: f[1],
                no_discard_passdown: f[2],
                read_only: f[3],
                error_if_no_space: f[4],
            },
        })
}

fn clone_params() -> impl Strategy<Value = CloneParams> {
    (
        (dev_ref(), dev_ref(), dev_ref()),
        3u32..=21,
        any::<(bool, bool)>(),
        any::<(Option<u32>, Option<u32>)>(),
    )
        .prop_map(
            |((metadata, destination, source), shift, (hydration, discard), (t, b))| CloneParams {
                metadata,
                destination,
                source,
                region_sectors: Sectors(1 << shift),
                hydration,
                discard_passdown: discard,
                hydration_threshold: t,
                hydration_batch_size: b,
            },
        )
}

fn flakey_feature() -> impl Strategy<Value = FlakeyFeature> {
    prop_oneof![
        Just(FlakeyFeature::DropWrites),
        Just(FlakeyFeature::ErrorWrites),
        Just(FlakeyFeature::ErrorReads),
        (1u32.., any::<bool>(), any::<u8>(), any::<u32>()).prop_map(|(nth, read, value, flags)| {
            FlakeyFeature::CorruptBioByte {
                nth,
                direction: if read {
                    BioDirection::Read
                } else {
                    BioDirection::Write
                },
                value,
                flags,
            }
        }),
    ]
}

fn delay_leg() -> impl Strategy<Value = DelayLeg> {
    (dev_ref(), any::<u64>(), any::<u32>()).prop_map(|(device, offset, delay_ms)| DelayLeg {
        device,
        offset: Sectors(offset),
        delay_ms,
    })
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        (dev_ref(), any::<u64>()).prop_map(|(device, offset)| Target::Linear(Linear {
            device,
            offset: Sectors(offset)
        })),
        thin_pool().prop_map(Target::ThinPool),
        (dev_ref(), 0u32..(1 << 24), prop::option::of(dev_ref())).prop_map(
            |(pool, device_id, external_origin)| Target::Thin(Thin {
                pool,
                device_id,
                external_origin
            })
        ),
        clone_params().prop_map(Target::Clone),
        (dev_ref(), dev_ref(), 1u64..(1 << 28)).prop_map(|(metadata, origin, blocks)| {
            Target::Era(Era {
                metadata,
                origin,
                block_sectors: Sectors(blocks * 8),
            })
        }),
        (
            dev_ref(),
            any::<u64>(),
            (any::<u32>(), 1u32..),
            prop::collection::vec(flakey_feature(), 0..3)
        )
            .prop_map(|(device, offset, (up, down), features)| {
                Target::Flakey(Flakey {
                    device,
                    offset: Sectors(offset),
                    up_seconds: up,
                    down_seconds: down,
                    features,
                })
            }),
        (
            delay_leg(),
            prop::option::of((delay_leg(), prop::option::of(delay_leg())))
        )
            .prop_map(|(read, rest)| Target::Delay(Delay {
                read,
                write: rest.map(|(w, _)| w),
                flush: rest.and_then(|(_, f)| f),
            })),
        Just(Target::Error),
    ]
}

/// Words that steer parsers down their interesting paths.
fn table_words() -> impl Strategy<Value = String> {
    let word = prop_oneof![
        Just("no_hydration".to_owned()),
        Just("no_discard_passdown".to_owned()),
        Just("hydration_threshold".to_owned()),
        Just("hydration_batch_size".to_owned()),
        Just("skip_block_zeroing".to_owned()),
        Just("corrupt_bio_byte".to_owned()),
        Just("drop_writes".to_owned()),
        Just("r".to_owned()),
        Just("-".to_owned()),
        (0u64..10).prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        (0u32..300, 0u32..300).prop_map(|(a, b)| format!("{a}:{b}")),
        "[a-z:0-9]{0,6}",
    ];
    prop::collection::vec(word, 0..14).prop_map(|words| words.join(" "))
}

proptest! {
    #[test]
    fn every_target_round_trips(target in target()) {
        let params = target.params();
        let parsed = Target::parse(target.type_name(), &params);
        prop_assert_eq!(parsed, Ok(target), "params {:?}", params);
    }

    #[test]
    fn tables_round_trip_through_ioctl_form(
        parts in prop::collection::vec((1u64..1 << 40, target()), 1..5)
    ) {
        let mut start = 0;
        let segments: Vec<Segment> = parts
            .into_iter()
            .map(|(len, target)| {
                let segment = Segment { start: Sectors(start), len: Sectors(len), target };
                start += len;
                segment
            })
            .collect();
        let table = Table::new(segments).unwrap();
        prop_assert_eq!(Table::parse_lines(&table.to_ioctl_targets()), Ok(table));
    }

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,80}", index in 0usize..8) {
        let _ = Target::parse(TYPES[index], &text);
        let _ = text.parse::<DevRef>();
    }

    #[test]
    fn keyword_soup_never_panics_and_errors_quote_it(text in table_words(), index in 0usize..8) {
        if let Err(err) = Target::parse(TYPES[index], &text) {
            prop_assert_eq!(err.input, text);
        }
    }

    #[test]
    fn gaps_and_overlaps_are_rejected(len in 1u64..1000, shift in 1u64..1000, overlap in any::<bool>()) {
        let second_start = if overlap { shift % len } else { len + shift };
        let segments = vec![
            Segment { start: Sectors(0), len: Sectors(len), target: Target::Error },
            Segment { start: Sectors(second_start), len: Sectors(8), target: Target::Error },
        ];
        prop_assert!(Table::new(segments).is_err());
    }
}
