#![allow(clippy::unwrap_used)]

use super::*;

fn settings(text: &str) -> Result<Settings, AgentError> {
    Config::from_toml(text, Path::new("test.toml"))?.validate()
}

fn config_error(text: &str) -> (String, String) {
    match settings(text).unwrap_err() {
        AgentError::Config { option, reason } => (option, reason),
        other => panic!("{text:?}: expected a config error, got {other:?}"),
    }
}

#[test]
fn empty_config_is_the_embedded_default() {
    let s = settings("").unwrap();
    assert_eq!(s.state_dir, PathBuf::from("/var/lib/dmclone"));
    assert_eq!(s.socket, PathBuf::from("/var/lib/dmclone/agent.sock"));
    assert_eq!(s.dm_prefix, "dmclone");
    assert_eq!(
        s.pool.backing,
        PoolBacking::File {
            path: PathBuf::from("/var/lib/dmclone/pool.img"),
            size: DEFAULT_POOL_FILE_SIZE
        }
    );
    assert_eq!(s.pool.block_size, 64 * KIB);
    assert_eq!(s.pool.low_space_percent, 90);
    assert_eq!(s.pool.max_oversubscription_ratio, 1.0);
    assert_eq!(s.tcp, None);
    assert_eq!(s.log_format, LogFormat::Human);
    assert_eq!(s.change_block_bytes, Some(64 * KIB));
}

#[test]
fn change_tracking_can_be_switched_off_or_coarsened() {
    let off = settings("[volumes]\nchange_tracking = false").unwrap();
    assert_eq!(off.change_block_bytes, None);
    let coarse = settings("[volumes]\nchange_block_size = \"1M\"").unwrap();
    assert_eq!(coarse.change_block_bytes, Some(MIB));
}

#[test]
fn state_dir_moves_the_socket_and_pool_file() {
    let s = settings("state_dir = \"/srv/agent\"\n[pool]\nfile_size = \"1G\"").unwrap();
    assert_eq!(s.socket, PathBuf::from("/srv/agent/agent.sock"));
    assert_eq!(
        s.pool.backing,
        PoolBacking::File {
            path: PathBuf::from("/srv/agent/pool.img"),
            size: GIB
        }
    );
}

#[test]
fn a_block_device_replaces_the_file() {
    let s = settings("[pool]\ndevice = \"/dev/vdb\"\nblock_size = \"128K\"").unwrap();
    assert_eq!(
        s.pool.backing,
        PoolBacking::Device(PathBuf::from("/dev/vdb"))
    );
    assert_eq!(s.pool.block_size, 128 * KIB);
}

#[test]
fn every_bad_option_is_named_with_its_problem() {
    let cases = [
        ("state_dir = \"relative\"", "state_dir", "absolute"),
        ("socket = \"sock\"", "socket", "absolute"),
        (
            &format!("socket = \"/{}\"", "s".repeat(120)),
            "socket",
            "at most 107",
        ),
        ("dm_prefix = \"Bad-Prefix\"", "dm_prefix", "lower-case"),
        ("node_id = \"a b\"", "node_id", "1 to 64"),
        (
            "[pool]\ndevice = \"/dev/vdb\"\nfile_size = \"1G\"",
            "pool.device",
            "exclude",
        ),
        ("[pool]\ndevice = \"vdb\"", "pool.device", "absolute"),
        (
            "[pool]\nfile_size = \"1M\"",
            "pool.file_size",
            "minimum of 64 MiB",
        ),
        (
            "[pool]\nblock_size = \"96K\"",
            "pool.block_size",
            "multiple of 64 KiB",
        ),
        ("[pool]\nblock_size = \"2G\"", "pool.block_size", "1 GiB"),
        (
            "[pool]\nmetadata_size = \"1M\"",
            "pool.metadata_size",
            "2 MiB..16 GiB",
        ),
        (
            "[pool]\nlow_space_percent = 100",
            "pool.low_space_percent",
            "1..=99",
        ),
        (
            "[pool]\nmax_oversubscription_ratio = 0.0",
            "pool.max_oversubscription_ratio",
            "0.1",
        ),
        ("[volumes]\nmax_size = 4096", "volumes.max_size", "1 MiB"),
        (
            "[volumes]\nchange_block_size = \"2M\"",
            "volumes.change_block_size",
            "4 KiB to 1 MiB",
        ),
        (
            "[volumes]\nchange_block_size = \"96K\"",
            "volumes.change_block_size",
            "power of two",
        ),
        (
            "[transfer]\nregion_size = \"3M\"",
            "transfer.region_size",
            "power of two",
        ),
        (
            "[transfer]\nregion_size = \"2K\"",
            "transfer.region_size",
            "4 KiB to 1 GiB",
        ),
        (
            "[transfer]\nhydration_threshold = 0",
            "transfer.hydration_threshold",
            "at least 1",
        ),
        (
            "[transfer]\nstall_seconds = 0",
            "transfer.stall_seconds",
            "at least 1",
        ),
        (
            "[transfer]\nmax_chain_depth = 0",
            "transfer.max_chain_depth",
            "outside 1..=8",
        ),
        (
            "[nvme]\nfast_io_fail_timeout_seconds = 0",
            "nvme.fast_io_fail_timeout_seconds",
            "must be 1 to",
        ),
        (
            "[nvme]\nctrl_loss_timeout_seconds = 30\nfast_io_fail_timeout_seconds = 31",
            "nvme.fast_io_fail_timeout_seconds",
            "(30)",
        ),
        (
            "[nvme]\nunclaimed_export_seconds = 0",
            "nvme.unclaimed_export_seconds",
            "at least 1",
        ),
        (
            "[nvme]\nexport_address = \"storage\"",
            "nvme.export_address",
            "not an IP",
        ),
        (
            "[nvme]\nexport_address = \"0.0.0.0\"",
            "nvme.export_address",
            "not 0.0.0.0",
        ),
        ("[nvme]\nexport_port = 0", "nvme.export_port", "not be 0"),
        ("[peers]\nca = \"/ca.pem\"", "peers.tls_cert", "go together"),
        ("[tcp]\nlisten = \"nowhere\"", "tcp.listen", "address:port"),
        (
            "[metrics]\nlisten = \"9477\"",
            "metrics.listen",
            "address:port",
        ),
        (
            "[tcp]\nlisten = \"0.0.0.0:7443\"",
            "tcp.tls_cert",
            "mutual TLS",
        ),
        (
            "[tcp]\ntls_key = \"/k.pem\"",
            "tcp.tls_key",
            "tcp.listen is not",
        ),
        ("[log]\nlevel = \" \"", "log.level", "empty"),
        (
            "[tcp]\nlisten = \"0.0.0.0:7443\"\ntls_cert = \"/c\"\ntls_key = \"/k\"\nclient_ca = \"/ca\"",
            "tcp.client",
            "no client may call",
        ),
        (
            "[tcp]\nlisten = \"0.0.0.0:7443\"\ntls_cert = \"/c\"\ntls_key = \"/k\"\nclient_ca = \"/ca\"\n[[tcp.client]]\nidentity = \"hv2\"\nrole = \"peer\"",
            "tcp.client",
            "needs host_nqn",
        ),
        (
            "[tcp]\nlisten = \"0.0.0.0:7443\"\ntls_cert = \"/c\"\ntls_key = \"/k\"\nclient_ca = \"/ca\"\n[[tcp.client]]\nidentity = \"mon\"\nrole = \"reader\"\nhost_nqn = \"nqn.2014-08.org.nvmexpress:uuid:0a000000-0000-4000-8000-000000000001\"",
            "tcp.client",
            "for peers only",
        ),
        (
            "[tcp]\nlisten = \"0.0.0.0:7443\"\ntls_cert = \"/c\"\ntls_key = \"/k\"\nclient_ca = \"/ca\"\n[[tcp.client]]\nidentity = \"a\"\nrole = \"driver\"\n[[tcp.client]]\nidentity = \"a\"\nrole = \"reader\"",
            "tcp.client",
            "listed twice",
        ),
        (
            "[tcp]\n[[tcp.client]]\nidentity = \"a\"\nrole = \"driver\"",
            "tcp.client",
            "tcp.listen is not",
        ),
    ];
    for (text, option, reason) in cases {
        let (got_option, got_reason) = config_error(text);
        assert_eq!(got_option, option, "{text:?}: {got_reason}");
        assert!(got_reason.contains(reason), "{text:?}: {got_reason}");
    }
}

#[test]
fn unknown_options_and_wrong_types_are_rejected_with_their_place() {
    let (origin, reason) = config_error("[pool]\nfile_sise = \"1G\"");
    assert_eq!(origin, "test.toml");
    assert!(reason.contains("file_sise"), "{reason}");
    let (_, reason) = config_error("[pool]\nfile_size = \"lots\"");
    assert!(reason.contains("not a size"), "{reason}");
    let (_, reason) = config_error("[log]\nformat = \"xml\"");
    assert!(reason.contains("xml"), "{reason}");
}

#[test]
fn sizes_read_like_an_operator_writes_them() {
    for (text, bytes) in [
        ("4096", 4096),
        ("64K", 64 * KIB),
        ("64KiB", 64 * KIB),
        ("512m", 512 * MIB),
        ("8G", 8 * GIB),
        ("1.5T", 3 * TIB / 2),
        (" 2 GiB ", 2 * GIB),
    ] {
        assert_eq!(parse_size(text), Ok(bytes), "{text}");
    }
    for bad in ["", "G", "1.5", "-1G", "1X", "99999999999T", "1.0000001K"] {
        assert!(parse_size(bad).is_err(), "{bad}");
    }
}

#[test]
fn size_display_prefers_exact_units() {
    assert_eq!(Size(64 * KIB).to_string(), "64 KiB");
    assert_eq!(Size(3 * GIB).to_string(), "3 GiB");
    assert_eq!(Size(1536 * KIB).to_string(), "1536 KiB");
    assert_eq!(Size(100).to_string(), "100 bytes");
    assert_eq!(Size(GIB + 1).to_string(), "1.0 GiB (1073741825 bytes)");
}

/// The sample shipped next to the binary documents every option and is
/// itself a valid configuration.
#[test]
fn the_sample_config_is_valid_and_names_every_option() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("agent/dmclone-agent.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let parsed = Config::from_toml(&text, &path).unwrap();
    parsed.validate().unwrap();
    let options = [
        "node_id",
        "state_dir",
        "socket",
        "socket_readers",
        "dm_prefix",
        "[pool]",
        "device",
        "file_size",
        "block_size",
        "metadata_size",
        "low_space_percent",
        "max_oversubscription_ratio",
        "[volumes]",
        "max_size",
        "change_tracking",
        "change_block_size",
        "[transfer]",
        "region_size",
        "hydration_threshold",
        "hydration_batch_size",
        "stall_seconds",
        "max_bytes_per_second",
        "keep_finished_seconds",
        "keep_finished",
        "max_chain_depth",
        "[nvme]",
        "export_address",
        "export_port",
        "export_port_id",
        "host_nqn",
        "host_id",
        "ctrl_loss_timeout_seconds",
        "fast_io_fail_timeout_seconds",
        "auth",
        "unclaimed_export_seconds",
        "[peers]",
        "ca",
        "[tcp]",
        "listen",
        "tls_cert",
        "tls_key",
        "client_ca",
        "[limits]",
        "max_calls",
        "max_calls_per_connection",
        "tls_handshake_seconds",
        "call_timeout_seconds",
        "max_watches_per_caller",
        "[metrics]",
        "[log]",
        "level",
        "format",
    ];
    for option in options {
        assert!(
            text.contains(option),
            "the sample does not document {option}"
        );
    }
    // Every commented-out option, uncommented, is valid TOML of the right type.
    let uncommented: String = text
        .lines()
        .map(|line| {
            line.strip_prefix("# ")
                .filter(|l| l.contains(" = "))
                .unwrap_or(line)
        })
        .map(|line| format!("{line}\n"))
        .collect();
    Config::from_toml(&uncommented, &path).unwrap();
}

#[test]
fn a_client_flag_names_an_identity_and_its_role() {
    use super::{ClientConfig, Role, parse_client};
    assert_eq!(
        parse_client("cinder-volume=driver").unwrap(),
        ClientConfig {
            identity: "cinder-volume".into(),
            role: Role::Driver,
            host_nqn: None,
        }
    );
    let peer = parse_client("agent-hv2=peer@nqn.2014-08.org.nvmexpress:uuid:0b").unwrap();
    assert_eq!(peer.role, Role::Peer);
    assert_eq!(
        peer.host_nqn.as_deref(),
        Some("nqn.2014-08.org.nvmexpress:uuid:0b")
    );
    assert!(
        parse_client("cinder")
            .unwrap_err()
            .contains("IDENTITY=ROLE")
    );
    assert!(
        parse_client("cinder=admin")
            .unwrap_err()
            .contains("not a role")
    );
}

#[test]
fn socket_readers_need_a_group_and_a_socket_they_can_reach() {
    let numbered = settings("socket = \"/run/dmclone/agent.sock\"\nsocket_readers = \"4242\"");
    assert_eq!(numbered.unwrap().socket_readers, Some(4242));
    let named = settings("socket = \"/run/dmclone/agent.sock\"\nsocket_readers = \"root\"");
    assert_eq!(named.unwrap().socket_readers, Some(0));
    assert_eq!(settings("").unwrap().socket_readers, None);
    let (option, reason) = config_error("socket_readers = \"4242\"");
    assert_eq!(option, "socket_readers");
    assert!(reason.contains("inside state_dir"), "{reason}");
    let (_, reason) = config_error(
        "socket = \"/run/dmclone/agent.sock\"\nsocket_readers = \"no-such-group-here\"",
    );
    assert!(reason.contains("no group"), "{reason}");
}
