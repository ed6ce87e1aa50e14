//! NVMe Qualified Names and host ids: validated once, so everything below can
//! put them into configfs paths and the fabrics option string unescaped.

use std::fmt;

use crate::{
    error::AgentError,
    ids::{VolumeId, quoted},
};

/// The longest NQN the Linux host accepts. The NVMe base specification allows
/// 223 bytes, but the 6.1 fabrics parser rejects `strlen(nqn) >= 223`
/// (`NVMF_NQN_SIZE`), so a 223-byte NQN could be exported and never connected.
pub const MAX_NQN_BYTES: usize = 222;

/// Reserved for discovery controllers; nvmet refuses it as a subsystem name.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// The form the specification reserves for hosts named by a UUID.
const UUID_NQN_PREFIX: &str = "nqn.2014-08.org.nvmexpress:uuid:";

/// A validated NQN: `nqn.<yyyy-mm>.<reverse domain>:<name>`.
///
/// Beyond the specification, the name part is limited to ASCII letters,
/// digits and `.-_:` so that it is safe as a configfs directory name (no `/`)
/// and as a value in the comma-separated fabrics option string (no `,`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Nqn(String);

impl Nqn {
    /// Validates `raw`; `field` names the request field in the error.
    pub fn parse(field: &'static str, raw: &str) -> Result<Self, AgentError> {
        nqn_shape(raw)
            .map(|()| Self(raw.to_owned()))
            .map_err(|reason| AgentError::InvalidArgument {
                field,
                reason: format!("NQN {}: {reason}", quoted(raw)),
            })
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The host id a UUID-form host NQN implies
    /// (`nqn.2014-08.org.nvmexpress:uuid:<uuid>`), as nvme-cli derives it.
    pub fn uuid_host_id(&self) -> Option<HostId> {
        let uuid = self.0.strip_prefix(UUID_NQN_PREFIX)?;
        HostId::parse(uuid).ok()
    }
}

impl fmt::Display for Nqn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The subsystem NQN of a volume's export: `<prefix>:<volume id>`, e.g.
/// `nqn.2014-08.io.dmclone:node-a:0b9d1c3e-…`. The prefix names the exporting
/// node, so two nodes exporting the same volume never share a subsystem name.
pub fn subsystem_nqn(prefix: &str, volume: &VolumeId) -> Result<Nqn, AgentError> {
    Nqn::parse("subsystem_nqn", &format!("{prefix}:{volume}"))
}

/// The volume a subsystem NQN made by [`subsystem_nqn`] with `prefix` names,
/// or `None` for any other subsystem (reconciliation leaves those alone).
pub fn volume_of_subsystem(prefix: &str, nqn: &str) -> Option<VolumeId> {
    let id = nqn.strip_prefix(prefix)?.strip_prefix(':')?;
    VolumeId::parse(id).ok()
}

/// A host id (`hostid=` of the fabrics option string): a UUID, stable per
/// host NQN. Newer kernels refuse a known host NQN with another id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostId(String);

impl HostId {
    pub fn parse(raw: &str) -> Result<Self, AgentError> {
        uuid_shape(raw)
            .map(|()| Self(raw.to_ascii_lowercase()))
            .map_err(|reason| AgentError::InvalidArgument {
                field: "host_id",
                reason: format!("host id {}: {reason}", quoted(raw)),
            })
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why `raw` is not an NQN we accept, if it is not.
fn nqn_shape(raw: &str) -> Result<(), String> {
    if raw.len() > MAX_NQN_BYTES {
        return Err(format!(
            "is {} bytes long; the Linux host accepts at most {MAX_NQN_BYTES}",
            raw.len()
        ));
    }
    if raw == DISCOVERY_NQN {
        return Err("is the discovery NQN, reserved for discovery controllers".into());
    }
    let rest = raw
        .strip_prefix("nqn.")
        .ok_or("does not start with \"nqn.\"")?;
    let rest = strip_date(rest).ok_or("lacks the yyyy-mm. date after \"nqn.\"")?;
    let (domain, name) = rest
        .split_once(':')
        .ok_or("lacks the ':' between the reverse domain name and the name")?;
    check_domain(domain)?;
    if name.is_empty() {
        return Err("has an empty name after ':'".into());
    }
    if let Some(bad) = name.chars().find(|c| !is_name_char(*c)) {
        return Err(format!(
            "contains {bad:?}; names may use ASCII letters, digits and . - _ :"
        ));
    }
    Ok(())
}

/// `yyyy-mm.` with a month 01..12; returns what follows it.
fn strip_date(rest: &str) -> Option<&str> {
    let date = rest.get(..8)?.as_bytes();
    let digits = |range: std::ops::Range<usize>| date[range].iter().all(u8::is_ascii_digit);
    let month_ok = matches!(
        (date[5], date[6]),
        (b'0', b'1'..=b'9') | (b'1', b'0'..=b'2')
    );
    (digits(0..4) && date[4] == b'-' && digits(5..7) && month_ok && date[7] == b'.')
        .then(|| &rest[8..])
}

fn check_domain(domain: &str) -> Result<(), String> {
    let label_ok = |label: &str| {
        !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if domain.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(format!(
            "has {domain:?} as reverse domain name; expected labels of letters, digits and '-' separated by '.'"
        ))
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':')
}

/// 8-4-4-4-12 hex digits.
pub(crate) fn uuid_shape(raw: &str) -> Result<(), String> {
    const HYPHENS: [usize; 4] = [8, 13, 18, 23];
    if raw.len() != 36 {
        return Err(format!(
            "has {} bytes; a UUID has 36 (8-4-4-4-12 hex digits)",
            raw.len()
        ));
    }
    let well_formed = raw.bytes().enumerate().all(|(index, byte)| {
        if HYPHENS.contains(&index) {
            byte == b'-'
        } else {
            byte.is_ascii_hexdigit()
        }
    });
    if well_formed {
        Ok(())
    } else {
        Err("is not a UUID (8-4-4-4-12 hex digits)".into())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use proptest::prelude::*;

    use super::*;

    const VOLUME: &str = "0b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11";
    const PREFIX: &str = "nqn.2014-08.io.dmclone:node-a";

    fn reason(raw: &str) -> String {
        match Nqn::parse("nqn", raw).unwrap_err() {
            AgentError::InvalidArgument { field, reason } => {
                assert_eq!(field, "nqn");
                reason
            }
            other => panic!("{raw:?}: {other:?}"),
        }
    }

    #[test]
    fn subsystem_nqn_is_prefix_colon_volume_and_parses_back() {
        let volume = VolumeId::parse(VOLUME).unwrap();
        let nqn = subsystem_nqn(PREFIX, &volume).unwrap();
        assert_eq!(nqn.as_str(), format!("{PREFIX}:{VOLUME}"));
        assert_eq!(volume_of_subsystem(PREFIX, nqn.as_str()), Some(volume));
        assert_eq!(
            volume_of_subsystem("nqn.2014-08.io.dmclone:node-b", nqn.as_str()),
            None
        );
        assert_eq!(
            volume_of_subsystem(PREFIX, &format!("{PREFIX}x:{VOLUME}")),
            None
        );
        assert_eq!(volume_of_subsystem(PREFIX, &format!("{PREFIX}:vol")), None);
    }

    #[test]
    fn accepts_the_uuid_form_and_derives_its_host_id() {
        let nqn = Nqn::parse(
            "host_nqn",
            &format!("nqn.2014-08.org.nvmexpress:uuid:{VOLUME}"),
        )
        .unwrap();
        assert_eq!(nqn.uuid_host_id().unwrap().as_str(), VOLUME);
        let named = Nqn::parse("host_nqn", "nqn.2014-08.io.dmclone:host-a").unwrap();
        assert_eq!(named.uuid_host_id(), None);
    }

    #[test]
    fn length_limit_is_what_the_kernel_host_accepts() {
        let head = "nqn.2014-08.io.dmclone:";
        let longest = format!("{head}{}", "a".repeat(MAX_NQN_BYTES - head.len()));
        assert!(Nqn::parse("nqn", &longest).is_ok());
        let spec_max = format!("{longest}a");
        assert_eq!(spec_max.len(), 223);
        assert!(
            reason(&spec_max).contains("at most 222"),
            "{}",
            reason(&spec_max)
        );
    }

    #[test]
    fn rejections_say_what_is_wrong() {
        let cases = [
            ("", "does not start with \"nqn.\""),
            ("iqn.2014-08.io.dmclone:x", "does not start"),
            ("nqn.14-08.io.dmclone:x", "yyyy-mm"),
            ("nqn.2014-13.io.dmclone:x", "yyyy-mm"),
            ("nqn.2014-08io.dmclone:x", "yyyy-mm"),
            ("nqn.2014-08.io.dmclone", "lacks the ':'"),
            ("nqn.2014-08.io..dmclone:x", "reverse domain"),
            ("nqn.2014-08.:x", "reverse domain"),
            ("nqn.2014-08.io.dmclone:", "empty name"),
            ("nqn.2014-08.io.dmclone:a,b", "contains ','"),
            ("nqn.2014-08.io.dmclone:a/b", "contains '/'"),
            ("nqn.2014-08.io.dmclone:a b", "contains ' '"),
            ("nqn.2014-08.io.dmclone:a\nb", "contains '\\n'"),
            ("nqn.2014-08.io.dmclone:é", "contains 'é'"),
            (DISCOVERY_NQN, "discovery"),
        ];
        for (raw, expected) in cases {
            let why = reason(raw);
            assert!(why.contains(expected), "{raw:?}: {why}");
        }
    }

    #[test]
    fn host_ids_are_uuids_kept_lower_case() {
        assert_eq!(
            HostId::parse(&VOLUME.to_ascii_uppercase())
                .unwrap()
                .as_str(),
            VOLUME
        );
        assert!(HostId::parse("not-a-uuid").is_err());
        assert!(HostId::parse(&VOLUME.replace('-', "_")).is_err());
    }

    proptest! {
        #[test]
        fn accepted_nqns_are_safe_in_paths_and_option_strings(raw in "\\PC{0,60}|nqn\\.20[0-9]{2}-[01][0-9]\\.[a-z.]{1,12}:[ -~]{0,30}") {
            if let Ok(nqn) = Nqn::parse("nqn", &raw) {
                let text = nqn.as_str();
                prop_assert!(text.len() <= MAX_NQN_BYTES);
                prop_assert!(!text.contains([',', '/', '\n', '=', ' ']));
            }
        }
    }
}
