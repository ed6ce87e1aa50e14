//! Identifiers of volumes, snapshots and transfers: validated once, at the
//! edge, so everything below can build device names and store keys from them.
//!
//! Cinder names everything by UUID. We accept the canonical 36-character form
//! in either case and keep it lower-case, so `ABC…` and `abc…` are the same
//! volume (and the same device name).

use std::fmt;

/// A request field that does not hold a valid id; the API reports it as an
/// invalid argument (see `AgentError::InvalidArgument`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct InvalidId {
    pub field: &'static str,
    pub reason: String,
}

const UUID_LEN: usize = 36;
const HYPHENS: [usize; 4] = [8, 13, 18, 23];

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $what:literal, $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        // Stored as the plain string it always was; a stored id that is not
        // a UUID fails the store's decoding instead of going on unchecked.
        impl TryFrom<String> for $name {
            type Error = InvalidId;

            fn try_from(raw: String) -> Result<Self, InvalidId> {
                Self::parse(&raw)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl $name {
            /// What this id names, for messages.
            pub const WHAT: &'static str = $what;

            /// Validates `raw` as a UUID; the error names the request field.
            pub fn parse(raw: &str) -> Result<Self, InvalidId> {
                canonical_uuid(raw).map(Self).map_err(|reason| InvalidId {
                    field: $field,
                    reason: format!("{} id {}: {reason}", $what, quoted(raw)),
                })
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

uuid_id!(
    /// A volume's id (Cinder's `volume.name_id`).
    VolumeId,
    "volume",
    "volume_id"
);
uuid_id!(
    /// A snapshot's id.
    SnapshotId,
    "snapshot",
    "snapshot_id"
);
uuid_id!(
    /// A transfer's id.
    TransferId,
    "transfer",
    "transfer_id"
);

/// A thin device's id in the pool, handed out by the store (never reused
/// while a record holds it).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct ThinId(pub u32);

impl fmt::Display for ThinId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The lower-case canonical form of a hyphenated UUID, or why `raw` is not one.
fn canonical_uuid(raw: &str) -> Result<String, String> {
    if raw.is_empty() {
        return Err(
            "is empty; expected a UUID such as 0b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11".into(),
        );
    }
    if raw.len() != UUID_LEN {
        return Err(format!(
            "has {} characters; a UUID has {UUID_LEN} (8-4-4-4-12 hex digits)",
            raw.chars().count()
        ));
    }
    for (index, byte) in raw.bytes().enumerate() {
        let ok = if HYPHENS.contains(&index) {
            byte == b'-'
        } else {
            byte.is_ascii_hexdigit()
        };
        if !ok {
            return Err(format!(
                "is not a UUID: unexpected character at position {}",
                index + 1
            ));
        }
    }
    Ok(raw.to_ascii_lowercase())
}

/// Quotes caller input for a message, cut short so that a huge string cannot
/// flood logs or replies.
pub fn quoted(raw: &str) -> String {
    const SHOWN: usize = 64;
    if raw.chars().count() <= SHOWN {
        return format!("{raw:?}");
    }
    let head: String = raw.chars().take(SHOWN).collect();
    format!("{head:?}… ({} bytes)", raw.len())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn accepts_uuids_in_either_case_and_keeps_them_lower_case() {
        let id = VolumeId::parse("0B9D1C3E-5F1A-4F7E-9A57-3F0C2B8F6D11").unwrap();
        assert_eq!(id.as_str(), "0b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11");
        assert_eq!(
            id,
            VolumeId::parse("0b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11").unwrap()
        );
    }

    #[test]
    fn rejections_name_the_field_and_the_problem() {
        let cases = [
            ("", "is empty"),
            ("vol-1", "has 5 characters"),
            ("0b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d1g", "position 36"),
            ("0b9d1c3e05f1a-4f7e-9a57-3f0c2b8f6d11", "position 9"),
            ("{b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d1}", "position 1"),
        ];
        for (raw, expected) in cases {
            let err = VolumeId::parse(raw).unwrap_err();
            let InvalidId { field, reason } = &err;
            assert_eq!(*field, "volume_id");
            assert!(reason.contains(expected), "{raw:?}: {reason}");
        }
    }

    #[test]
    fn huge_input_is_quoted_briefly() {
        let huge = "x".repeat(1 << 20);
        let err = SnapshotId::parse(&huge).unwrap_err().to_string();
        assert!(err.len() < 400, "{} bytes", err.len());
        assert!(err.contains("1048576 bytes"), "{err}");
    }

    proptest! {
        #[test]
        fn accepted_ids_make_valid_device_names(raw in "\\PC{0,40}|[0-9a-fA-F-]{36}") {
            if let Ok(id) = VolumeId::parse(&raw) {
                prop_assert_eq!(id.as_str().len(), UUID_LEN);
                let name = format!("dmclone-{id}");
                prop_assert!(crate::dm::names::DeviceName::new(&name).is_ok());
            }
        }
    }
}
