//! NVMe in-band authentication (DH-HMAC-CHAP, NVMe base spec 8.13): the
//! secrets an export's host entry holds and the destination presents when it
//! connects. Both directions are authenticated: the host proves it holds
//! the host secret, the target (controller) the controller secret, over an
//! FFDHE exchange, so a host that only claims the right NQN gets nothing.
//!
//! A secret is written the way the kernel and nvme-cli read it:
//! `DHHC-1:00:<base64(key || crc32(key) little-endian)>:` with a 32-byte key
//! used as is (`00`: no transformation; `nvme_auth_extract_key` in
//! drivers/nvme/common/auth.c checks length and CRC).

use std::fmt;

use base64::{Engine, engine::general_purpose::STANDARD};
use serde::{Deserialize, Serialize};

use crate::error::AgentError;

/// The HMAC both sides negotiate (`dhchap_hash` of the host entry).
pub const HASH: &str = "hmac(sha256)";
/// The Diffie-Hellman group of the exchange (`dhchap_dhgroup`).
pub const DH_GROUP: &str = "ffdhe2048";

const KEY_BYTES: usize = 32;
const PREFIX: &str = "DHHC-1:00:";

/// One DH-HMAC-CHAP secret. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DhchapSecret(String);

impl DhchapSecret {
    /// A fresh secret from the operating system's random source.
    pub fn generate() -> Result<Self, AgentError> {
        let mut key = [0u8; KEY_BYTES];
        getrandom::fill(&mut key)
            .map_err(|err| AgentError::Internal(format!("no random bytes for a secret: {err}")))?;
        let mut framed = key.to_vec();
        framed.extend_from_slice(&crc32fast::hash(&key).to_le_bytes());
        Ok(Self(format!("{PREFIX}{}:", STANDARD.encode(framed))))
    }

    /// A secret a caller passed on; empty is none. The format is checked
    /// here, so a mangled secret is INVALID_ARGUMENT, not a refused connect.
    pub fn parse(field: &'static str, text: &str) -> Result<Option<Self>, AgentError> {
        if text.is_empty() {
            return Ok(None);
        }
        let bad = |reason: &str| AgentError::InvalidArgument {
            field,
            reason: format!("not a DH-HMAC-CHAP secret (DHHC-1:00:<base64>:): {reason}"),
        };
        let body = text
            .strip_prefix("DHHC-1:")
            .and_then(|rest| rest.split_once(':'))
            .and_then(|(_, rest)| rest.strip_suffix(':'))
            .ok_or_else(|| bad("wrong framing"))?;
        let framed = STANDARD.decode(body).map_err(|_| bad("not base64"))?;
        if ![36, 52, 68].contains(&framed.len()) {
            return Err(bad("a key is 32, 48 or 64 bytes"));
        }
        let (key, crc) = framed.split_at(framed.len() - 4);
        if crc32fast::hash(key).to_le_bytes() != crc {
            return Err(bad("its checksum does not match"));
        }
        Ok(Some(Self(text.to_owned())))
    }

    /// The secret for the one place that needs it in the clear.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for DhchapSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DhchapSecret(<redacted>)")
    }
}

/// The two secrets of one host entry: the host's and the controller's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DhchapKeys {
    pub host: DhchapSecret,
    pub ctrl: DhchapSecret,
}

impl DhchapKeys {
    pub fn generate() -> Result<Self, AgentError> {
        Ok(Self {
            host: DhchapSecret::generate()?,
            ctrl: DhchapSecret::generate()?,
        })
    }
}

/// The refusal of an export with secrets on a kernel whose NVMe target
/// cannot authenticate hosts.
pub fn unsupported() -> AgentError {
    crate::refusal::Refusal::NotConfigured {
        setting: "nvme.auth",
        explanation: "this kernel's NVMe target cannot authenticate hosts (it is built without \
                      CONFIG_NVME_TARGET_AUTH, as Debian 12's 6.1 is): set nvme.auth = \"none\" \
                      to export without DH-HMAC-CHAP, and firewall the export port"
            .into(),
    }
    .into()
}

/// Whether exports must authenticate their host (`nvme.auth`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthPolicy {
    /// Every export gets DH-HMAC-CHAP secrets; a kernel that cannot
    /// authenticate exports nothing.
    #[default]
    Required,
    /// Exports admit the allowed host NQN without authentication.
    None,
}

impl AuthPolicy {
    /// The policy a name stands for (`required`, `none`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "required" => Some(Self::Required),
            "none" => Some(Self::None),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_generated_secret_reads_back_and_never_shows_in_debug() {
        let keys = DhchapKeys::generate().unwrap();
        assert_ne!(keys.host, keys.ctrl);
        for secret in [&keys.host, &keys.ctrl] {
            let text = secret.expose();
            assert!(
                text.starts_with("DHHC-1:00:") && text.ends_with(':'),
                "{text}"
            );
            assert_eq!(
                DhchapSecret::parse("s", text).unwrap().as_ref(),
                Some(secret)
            );
        }
        let shown = format!("{keys:?}");
        assert!(!shown.contains(keys.host.expose()) && !shown.contains(keys.ctrl.expose()));
    }

    #[test]
    fn mangled_secrets_are_refused_before_the_kernel_sees_them() {
        let good = DhchapSecret::generate().unwrap().expose().to_owned();
        assert_eq!(DhchapSecret::parse("s", "").unwrap(), None);
        let flipped = {
            let mut bytes = good.clone().into_bytes();
            let at = "DHHC-1:00:".len() + 2;
            bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
            String::from_utf8(bytes).unwrap()
        };
        for bad in [
            "secret".to_owned(),
            good.trim_end_matches(':').to_owned(),
            "DHHC-1:00:AAAA:".to_owned(),
            flipped,
        ] {
            let err = DhchapSecret::parse("dhchap_host_secret", &bad).unwrap_err();
            assert!(
                matches!(
                    err,
                    AgentError::InvalidArgument {
                        field: "dhchap_host_secret",
                        ..
                    }
                ),
                "{bad}: {err:?}"
            );
        }
    }

    /// The example key of nvme-cli's documentation framing: 32 zero bytes
    /// and their CRC-32, as `nvme gen-dhchap-key` would frame them.
    #[test]
    fn the_frame_is_the_kernels() {
        let zeros = [0u8; 32];
        let mut framed = zeros.to_vec();
        framed.extend_from_slice(&crc32fast::hash(&zeros).to_le_bytes());
        let text = format!("DHHC-1:00:{}:", STANDARD.encode(&framed));
        assert!(DhchapSecret::parse("s", &text).unwrap().is_some());
        assert_eq!(
            crc32fast::hash(&zeros),
            0x190a_55ad,
            "CRC-32 (IEEE) of 32 zero bytes"
        );
    }
}
