//! Pure text of the NVMe/TCP boundary: the option string written to
//! `/dev/nvme-fabrics`, its `instance=N,cntlid=C` reply, the `address` a
//! controller reports in sysfs, and namespace identities. No I/O.

use std::{fmt, net::IpAddr};

use super::auth::{DhchapKeys, DhchapSecret};
use crate::{
    error::{AgentError, ParseError},
    ids::VolumeId,
    nvme::nqn::{HostId, Nqn},
};

/// The NVMe/TCP port nvmet and nvme-cli use for I/O controllers. The kernel
/// host's default for an omitted `trsvcid` is 8009, the discovery port.
pub const DEFAULT_TRSVCID: u16 = 4420;

/// A fabrics write longer than a page is refused with ENOMEM.
const MAX_OPTIONS_BYTES: usize = 4096;

/// Where an NVMe/TCP target listens: `traddr` and `trsvcid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TcpAddress {
    pub ip: IpAddr,
    pub port: u16,
}

impl TcpAddress {
    pub fn new(ip: IpAddr, port: u16) -> Self {
        Self { ip, port }
    }

    /// nvmet's `addr_adrfam` value.
    pub fn adrfam(&self) -> &'static str {
        match self.ip {
            IpAddr::V4(_) => "ipv4",
            IpAddr::V6(_) => "ipv6",
        }
    }

    /// `traddr` in the canonical text form; the kernel compares it as a string
    /// when it looks for an existing controller.
    pub fn traddr(&self) -> String {
        self.ip.to_string()
    }

    pub fn trsvcid(&self) -> String {
        self.port.to_string()
    }

    /// Reads `traddr`/`trsvcid` text back (configfs or sysfs).
    pub fn from_parts(traddr: &str, trsvcid: &str) -> Option<Self> {
        Some(Self {
            ip: traddr.trim().parse().ok()?,
            port: trsvcid.trim().parse().ok()?,
        })
    }
}

impl fmt::Display for TcpAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}", self.port),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}", self.port),
        }
    }
}

/// The identity nvmet reports for a namespace. Stable across moves because it
/// is derived from the volume alone: wherever the volume is exported from, the
/// destination sees the same UUID and can check it is reading the right volume.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NamespaceIds {
    /// `device_uuid`, in the 8-4-4-4-12 form configfs and sysfs print.
    pub uuid: String,
    /// `device_nguid`, in the same form (configfs prints it with `%pUb`).
    pub nguid: String,
}

/// The volume id is already a random UUID unique to the volume, so it serves
/// as the namespace UUID as is; the NGUID carries the same 16 bytes. An
/// operator can map a namespace to its Cinder volume at a glance.
///
/// The Linux host ignores a namespace whose ids another connected subsystem
/// already reports ("ignoring nsid 1 because of duplicate IDs"), so one host
/// must not connect two exports of the same volume at once.
pub fn namespace_ids(volume: &VolumeId) -> NamespaceIds {
    NamespaceIds {
        uuid: volume.as_str().to_owned(),
        nguid: volume.as_str().to_owned(),
    }
}

/// A volume that moves on while still arriving (a chained move, A→B→C) is
/// exported by B under identities of its own, derived from the export's
/// subsystem NQN (which names B and the volume): a kernel connected to both
/// A's and B's export of the volume, as one test bed kernel playing three
/// hosts is, would otherwise ignore the second namespace. The destination
/// accepts these beside [`namespace_ids`], both computed from what it
/// connects to.
pub fn onward_namespace_ids(subsystem: &Nqn) -> NamespaceIds {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("dmclone onward export {subsystem}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    // RFC 9562 version 8 (custom), variant 10.
    bytes[6] = (bytes[6] & 0x0f) | 0x80;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    );
    NamespaceIds {
        nguid: uuid.clone(),
        uuid,
    }
}

/// How long the host keeps a lost connection alive, in whole seconds (the
/// kernel's units). Unbounded retrying (`ctrl_loss_tmo=-1`) is not offered: a
/// dm-clone over a source that never returns would stall reads and a flushing
/// suspend forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectTimeouts {
    /// After this long without a connection the controller is deleted.
    pub ctrl_loss_tmo_secs: u32,
    /// Pause between reconnect attempts; at least 1.
    pub reconnect_delay_secs: u32,
    /// After this long, I/O fails instead of waiting for a reconnect;
    /// `None`: I/O waits until the controller is lost (`ctrl_loss_tmo`).
    pub fast_io_fail_tmo_secs: Option<u32>,
}

impl Default for ConnectTimeouts {
    /// I/O waits as long as the kernel retries (a guest rides out a hang;
    /// an error on its root disk it does not), and that is bounded.
    fn default() -> Self {
        Self {
            ctrl_loss_tmo_secs: 120,
            reconnect_delay_secs: 2,
            fast_io_fail_tmo_secs: None,
        }
    }
}

impl ConnectTimeouts {
    fn validate(&self) -> Result<(), AgentError> {
        let invalid = |reason: String| AgentError::InvalidArgument {
            field: "timeouts",
            reason,
        };
        if self.reconnect_delay_secs == 0 {
            return Err(invalid("reconnect_delay must be at least 1 second".into()));
        }
        // The kernel parses these with match_int.
        for (name, value) in [
            ("ctrl_loss_tmo", self.ctrl_loss_tmo_secs),
            ("reconnect_delay", self.reconnect_delay_secs),
            ("fast_io_fail_tmo", self.fast_io_fail_tmo_secs.unwrap_or(0)),
        ] {
            if i32::try_from(value).is_err() {
                return Err(invalid(format!("{name} {value} exceeds {}", i32::MAX)));
            }
        }
        Ok(())
    }
}

/// Everything a connect writes to `/dev/nvme-fabrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    pub address: TcpAddress,
    pub subsystem_nqn: Nqn,
    pub host_nqn: Nqn,
    pub host_id: HostId,
    pub timeouts: ConnectTimeouts,
    /// DH-HMAC-CHAP secrets the export's host entry holds; `None` connects
    /// without authentication.
    pub auth: Option<DhchapKeys>,
}

impl ConnectOptions {
    /// The option string, every token explicit (`trsvcid` in particular: the
    /// kernel's default is the discovery port).
    pub fn render(&self) -> Result<String, AgentError> {
        self.render_with(|secret| secret.expose().to_owned())
    }

    /// The option string as messages and logs may show it: secrets redacted.
    pub fn shown(&self) -> String {
        self.render_with(|_| "<redacted>".to_owned())
            .unwrap_or_else(|err| err.to_string())
    }

    fn render_with(&self, secret: impl Fn(&DhchapSecret) -> String) -> Result<String, AgentError> {
        self.timeouts.validate()?;
        let t = &self.timeouts;
        let mut text = format!(
            "transport=tcp,traddr={},trsvcid={},nqn={},hostnqn={},hostid={},\
             ctrl_loss_tmo={},reconnect_delay={},fast_io_fail_tmo={}",
            self.address.traddr(),
            self.address.trsvcid(),
            self.subsystem_nqn,
            self.host_nqn,
            self.host_id,
            t.ctrl_loss_tmo_secs,
            t.reconnect_delay_secs,
            // -1 is the kernel's "never fail early", written out like the rest.
            t.fast_io_fail_tmo_secs.map_or(-1, i64::from),
        );
        if let Some(keys) = &self.auth {
            text.push_str(&format!(
                ",dhchap_secret={},dhchap_ctrl_secret={}",
                secret(&keys.host),
                secret(&keys.ctrl)
            ));
        }
        if text.len() > MAX_OPTIONS_BYTES {
            return Err(AgentError::InvalidArgument {
                field: "connect options",
                reason: format!(
                    "{} bytes; /dev/nvme-fabrics takes at most {MAX_OPTIONS_BYTES}",
                    text.len()
                ),
            });
        }
        Ok(text)
    }
}

/// What `/dev/nvme-fabrics` answers after a successful connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectReply {
    /// The controller is `/dev/nvme<instance>`.
    pub instance: u32,
    pub cntlid: u16,
}

impl ConnectReply {
    /// Parses `instance=N,cntlid=C\n`. The `-1` values a read without a
    /// preceding write reports are rejected: no controller was created.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let bad = |reason: &str| ParseError::new("nvme-fabrics reply", text, reason);
        let line = text.lines().next().unwrap_or_default();
        let mut instance = None;
        let mut cntlid = None;
        for token in line.split(',') {
            match token.split_once('=') {
                Some(("instance", value)) => instance = Some(value),
                Some(("cntlid", value)) => cntlid = Some(value),
                _ => {}
            }
        }
        let instance = instance.ok_or_else(|| bad("no instance="))?;
        let cntlid = cntlid.ok_or_else(|| bad("no cntlid="))?;
        Ok(Self {
            instance: instance
                .parse()
                .map_err(|_| bad("instance is not a controller number"))?,
            cntlid: cntlid
                .parse()
                .map_err(|_| bad("cntlid is not a controller id"))?,
        })
    }

    /// The controller's name in /dev and /sys/class/nvme.
    pub fn controller_name(&self) -> String {
        format!("nvme{}", self.instance)
    }
}

/// The target address in a controller's sysfs `address`
/// (`traddr=A,trsvcid=P[,host_traddr=..][,host_iface=..]`).
pub fn parse_sysfs_address(text: &str) -> Option<TcpAddress> {
    let mut traddr = None;
    let mut trsvcid = None;
    for token in text.trim().split(',') {
        match token.split_once('=') {
            Some(("traddr", value)) => traddr = Some(value),
            Some(("trsvcid", value)) => trsvcid = Some(value),
            _ => {}
        }
    }
    TcpAddress::from_parts(traddr?, trsvcid?)
}

/// The number in a name such as `nvme3` (controller) or `nvme-subsys2`.
pub fn instance_of(name: &str, prefix: &str) -> Option<u32> {
    let digits = name.strip_prefix(prefix)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Whether `name` is a namespace disk a program may open: `nvme<A>n<B>`. The
/// hidden per-path disks of native multipath (`nvme<S>c<C>n<B>`) are not.
pub fn is_namespace_disk(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("nvme") else {
        return false;
    };
    let Some((controller, namespace)) = rest.split_once('n') else {
        return false;
    };
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    all_digits(controller) && all_digits(namespace)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::net::{Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;

    use super::*;

    fn options() -> ConnectOptions {
        ConnectOptions {
            address: TcpAddress::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 4420),
            subsystem_nqn: Nqn::parse("nqn", "nqn.2014-08.io.dmclone:node-a:vol").unwrap(),
            host_nqn: Nqn::parse("nqn", "nqn.2014-08.io.dmclone:host-b").unwrap(),
            host_id: HostId::parse("0b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11").unwrap(),
            timeouts: ConnectTimeouts {
                ctrl_loss_tmo_secs: 30,
                reconnect_delay_secs: 2,
                fast_io_fail_tmo_secs: Some(5),
            },
            auth: None,
        }
    }

    #[test]
    fn secrets_are_written_to_the_kernel_and_shown_nowhere_else() {
        let keys = DhchapKeys::generate().unwrap();
        let opts = ConnectOptions {
            auth: Some(keys.clone()),
            ..options()
        };
        let text = opts.render().unwrap();
        assert!(text.ends_with(&format!(
            ",dhchap_secret={},dhchap_ctrl_secret={}",
            keys.host.expose(),
            keys.ctrl.expose()
        )));
        let shown = format!("{} {opts:?}", opts.shown());
        assert!(!shown.contains(keys.host.expose()) && !shown.contains(keys.ctrl.expose()));
        assert!(shown.contains("dhchap_secret=<redacted>"), "{shown}");
    }

    #[test]
    fn renders_every_token_explicitly() {
        assert_eq!(
            options().render().unwrap(),
            "transport=tcp,traddr=10.0.0.2,trsvcid=4420,\
             nqn=nqn.2014-08.io.dmclone:node-a:vol,\
             hostnqn=nqn.2014-08.io.dmclone:host-b,\
             hostid=0b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11,\
             ctrl_loss_tmo=30,reconnect_delay=2,fast_io_fail_tmo=5"
        );
    }

    #[test]
    fn io_that_never_fails_early_is_written_as_minus_one() {
        let mut opts = options();
        opts.timeouts.fast_io_fail_tmo_secs = None;
        let text = opts.render().unwrap();
        assert!(
            text.ends_with(",ctrl_loss_tmo=30,reconnect_delay=2,fast_io_fail_tmo=-1"),
            "{text}"
        );
    }

    #[test]
    fn ipv6_traddr_is_the_bare_address() {
        let mut opts = options();
        opts.address = TcpAddress::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 4421);
        let text = opts.render().unwrap();
        assert!(text.contains(",traddr=::1,trsvcid=4421,"), "{text}");
        assert_eq!(opts.address.adrfam(), "ipv6");
        assert_eq!(opts.address.to_string(), "[::1]:4421");
    }

    #[test]
    fn rejects_timeouts_the_kernel_would_refuse() {
        let mut opts = options();
        opts.timeouts.reconnect_delay_secs = 0;
        assert!(
            opts.render()
                .unwrap_err()
                .to_string()
                .contains("at least 1")
        );
        opts.timeouts.reconnect_delay_secs = 1;
        opts.timeouts.ctrl_loss_tmo_secs = u32::MAX;
        assert!(
            opts.render()
                .unwrap_err()
                .to_string()
                .contains("ctrl_loss_tmo")
        );
    }

    #[test]
    fn parses_the_connect_reply() {
        let reply = ConnectReply::parse("instance=3,cntlid=17\n").unwrap();
        assert_eq!(
            reply,
            ConnectReply {
                instance: 3,
                cntlid: 17
            }
        );
        assert_eq!(reply.controller_name(), "nvme3");
    }

    #[test]
    fn rejects_replies_without_a_controller() {
        // What a read without a write returns: the accepted tokens.
        let listing = "instance=-1,cntlid=-1,transport=%s,traddr=%s\n";
        let err = ConnectReply::parse(listing).unwrap_err();
        assert!(err.to_string().contains("instance"), "{err}");
        for text in [
            "",
            "cntlid=1",
            "instance=2",
            "instance=x,cntlid=1",
            "instance=1,cntlid=70000",
        ] {
            assert!(ConnectReply::parse(text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn parses_sysfs_addresses() {
        let lo = TcpAddress::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 4420);
        assert_eq!(
            parse_sysfs_address("traddr=127.0.0.1,trsvcid=4420\n"),
            Some(lo)
        );
        assert_eq!(
            parse_sysfs_address("traddr=127.0.0.1,trsvcid=4420,host_traddr=127.0.0.2\n"),
            Some(lo)
        );
        assert_eq!(parse_sysfs_address("traddr=127.0.0.1\n"), None);
        assert_eq!(parse_sysfs_address("traddr=host,trsvcid=4420"), None);
    }

    #[test]
    fn recognises_controller_and_namespace_names() {
        assert_eq!(instance_of("nvme12", "nvme"), Some(12));
        assert_eq!(instance_of("nvme-subsys3", "nvme-subsys"), Some(3));
        assert_eq!(instance_of("nvme-fabrics", "nvme"), None);
        assert_eq!(instance_of("nvme", "nvme"), None);
        assert!(is_namespace_disk("nvme0n1"));
        assert!(is_namespace_disk("nvme12n34"));
        assert!(!is_namespace_disk("nvme0c1n1"));
        assert!(!is_namespace_disk("nvme0n1p1"));
        assert!(!is_namespace_disk("nvme0"));
        assert!(!is_namespace_disk("nvmen1"));
    }

    #[test]
    fn namespace_ids_are_the_volume_uuid() {
        let volume = VolumeId::parse("0B9D1C3E-5F1A-4F7E-9A57-3F0C2B8F6D11").unwrap();
        let ids = namespace_ids(&volume);
        assert_eq!(ids.uuid, "0b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11");
        assert_eq!(ids.nguid, ids.uuid);
        assert_eq!(namespace_ids(&volume), ids, "derivation is stable");
    }

    #[test]
    fn onward_ids_are_a_stable_uuid_per_subsystem() {
        let nqn = |node: &str| {
            Nqn::parse(
                "nqn",
                &format!("nqn.2014-08.io.dmclone:{node}:0b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11"),
            )
            .unwrap()
        };
        let b = onward_namespace_ids(&nqn("node-b"));
        assert_eq!(b, onward_namespace_ids(&nqn("node-b")), "stable");
        assert_ne!(b.uuid, onward_namespace_ids(&nqn("node-c")).uuid);
        assert_eq!(b.nguid, b.uuid);
        let groups: Vec<usize> = b.uuid.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{}", b.uuid);
        assert_eq!(&b.uuid[14..15], "8", "version 8: {}", b.uuid);
        assert!(
            matches!(&b.uuid[19..20], "8" | "9" | "a" | "b"),
            "{}",
            b.uuid
        );
        assert!(VolumeId::parse(&b.uuid).is_ok(), "a UUID as volume ids are");
    }

    proptest! {
        #[test]
        fn reply_parser_never_panics(text in "\\PC{0,80}") {
            let _ = ConnectReply::parse(&text);
            let _ = parse_sysfs_address(&text);
            let _ = is_namespace_disk(&text);
        }

        #[test]
        fn reply_round_trips(instance in 0u32..100_000, cntlid in any::<u16>()) {
            let text = format!("instance={instance},cntlid={cntlid}\n");
            prop_assert_eq!(ConnectReply::parse(&text).unwrap(), ConnectReply { instance, cntlid });
        }
    }
}
