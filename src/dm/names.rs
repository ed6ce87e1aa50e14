//! Device-mapper device names: validated once, so the ioctl layer never sees a
//! name the kernel would reject or one that could escape `/dev/mapper`.

use std::{fmt, path::PathBuf};

use crate::{
    error::{Error, Result},
    ids::{SnapshotId, VolumeId},
};

/// The kernel's limit is 128 bytes including the terminating NUL.
const MAX_NAME_LEN: usize = 127;

/// A device-mapper device name that is safe to use as a file name under
/// `/dev/mapper`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceName(String);

impl DeviceName {
    /// Accepts ASCII letters, digits and `._+-`, not starting with `.` or `-`.
    pub fn new(name: &str) -> Result<Self> {
        let reject = |reason: &str| Error::InvalidName {
            name: name.to_owned(),
            reason: reason.to_owned(),
        };
        if name.is_empty() {
            return Err(reject("empty"));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(reject("longer than 127 bytes"));
        }
        if name.starts_with(['.', '-']) {
            return Err(reject("starts with '.' or '-'"));
        }
        if let Some(bad) = name.chars().find(|c| !is_name_char(*c)) {
            return Err(reject(&format!(
                "character {bad:?} is not allowed (use A-Z a-z 0-9 . _ + -)"
            )));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The stable path of the device, `/dev/mapper/<name>`.
    pub fn mapper_path(&self) -> PathBuf {
        PathBuf::from("/dev/mapper").join(&self.0)
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-')
}

impl fmt::Display for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for DeviceName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// The agent's device names, all starting with its prefix (default
/// `dmclone`), so that every device maps back to its role and volume without
/// consulting anything else:
///
/// ```text
/// <prefix>-<volume-id>        the public device of a volume
/// <prefix>-thin-<volume-id>   the volume's thin device
/// <prefix>-emeta-<volume-id>  the thin device holding its dm-era metadata
/// <prefix>-era-<volume-id>    dm-era over an unpublished volume, for a moment
/// <prefix>-snap-<snapshot-id> a snapshot, activated for a moment
/// <prefix>-sread-<snapshot-id> a snapshot a move's destination reads from
/// <prefix>-pool, <prefix>-pool-meta, <prefix>-pool-data
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Naming {
    prefix: String,
}

/// What a device name of ours stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceRole {
    Pool,
    PoolMeta,
    PoolData,
    /// The public device of the volume with this id.
    Public(String),
    /// The thin device of the volume with this id.
    Thin(String),
    /// The metadata device of the clone bringing this volume here.
    CloneMetadata(String),
    /// A snapshot with this id, activated for a moment.
    Snapshot(String),
    /// A snapshot with this id, activated while the destination of its
    /// volume's move reads what it must copy of it.
    SnapshotRead(String),
    /// The dm-era metadata device of the volume with this id.
    EraMetadata(String),
    /// The device dm-era sits on while the volume with this id arrives (its
    /// dm-clone), and after it arrived until its public device is next made.
    Lower(String),
    /// dm-era over an unpublished volume, activated for a moment.
    EraProbe(String),
    /// Our prefix, but a role this agent version does not know.
    Other(String),
}

impl Naming {
    pub fn new(prefix: &str) -> Result<Self> {
        DeviceName::new(prefix)?;
        Ok(Self {
            prefix: prefix.to_owned(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn pool(&self) -> DeviceName {
        self.name("pool")
    }

    pub fn pool_meta(&self) -> DeviceName {
        self.name("pool-meta")
    }

    pub fn pool_data(&self) -> DeviceName {
        self.name("pool-data")
    }

    pub fn public(&self, volume: &VolumeId) -> DeviceName {
        self.name(volume.as_str())
    }

    pub fn thin(&self, volume: &VolumeId) -> DeviceName {
        self.name(&format!("thin-{volume}"))
    }

    /// The metadata device of a clone bringing the volume here.
    pub fn clone_metadata(&self, volume: &VolumeId) -> DeviceName {
        self.name(&format!("cmeta-{volume}"))
    }

    /// The thin device holding the volume's dm-era metadata.
    pub fn era_metadata(&self, volume: &VolumeId) -> DeviceName {
        self.name(&format!("emeta-{volume}"))
    }

    /// The layer beneath an arriving volume's dm-era: its dm-clone, then the
    /// volume's thin id activated a second time once the volume is local.
    pub fn lower(&self, volume: &VolumeId) -> DeviceName {
        self.name(&format!("lower-{volume}"))
    }

    /// dm-era over an unpublished volume, activated only for a moment.
    pub fn era_probe(&self, volume: &VolumeId) -> DeviceName {
        self.name(&format!("era-{volume}"))
    }

    /// A snapshot, activated only for a moment.
    pub fn snapshot(&self, snapshot: &SnapshotId) -> DeviceName {
        self.name(&format!("snap-{snapshot}"))
    }

    /// A snapshot, activated while a move's destination reads from it.
    pub fn snapshot_read(&self, snapshot: &SnapshotId) -> DeviceName {
        self.name(&format!("sread-{snapshot}"))
    }

    /// The role of a device name, or `None` if it is not ours.
    pub fn parse(&self, name: &str) -> Option<DeviceRole> {
        let rest = name.strip_prefix(&self.prefix)?.strip_prefix('-')?;
        let is_id = |s: &str| VolumeId::parse(s).is_ok_and(|id| id.as_str() == s);
        Some(match rest {
            "pool" => DeviceRole::Pool,
            "pool-meta" => DeviceRole::PoolMeta,
            "pool-data" => DeviceRole::PoolData,
            id if is_id(id) => DeviceRole::Public(id.to_owned()),
            other => {
                let with_id = |role: &str| other.strip_prefix(role).filter(|id| is_id(id));
                if let Some(id) = with_id("thin-") {
                    DeviceRole::Thin(id.to_owned())
                } else if let Some(id) = with_id("cmeta-") {
                    DeviceRole::CloneMetadata(id.to_owned())
                } else if let Some(id) = with_id("snap-") {
                    DeviceRole::Snapshot(id.to_owned())
                } else if let Some(id) = with_id("sread-") {
                    DeviceRole::SnapshotRead(id.to_owned())
                } else if let Some(id) = with_id("emeta-") {
                    DeviceRole::EraMetadata(id.to_owned())
                } else if let Some(id) = with_id("era-") {
                    DeviceRole::EraProbe(id.to_owned())
                } else if let Some(id) = with_id("lower-") {
                    DeviceRole::Lower(id.to_owned())
                } else {
                    DeviceRole::Other(other.to_owned())
                }
            }
        })
    }

    fn name(&self, suffix: &str) -> DeviceName {
        // The prefix is a valid name and the suffixes are ids and fixed
        // words, so the result is valid and at most 24 + 42 bytes long.
        DeviceName(format!("{}-{suffix}", self.prefix))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn accepts_volume_style_names() {
        let name = DeviceName::new("dmclone-0b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11").unwrap();
        assert_eq!(
            name.mapper_path(),
            PathBuf::from("/dev/mapper/dmclone-0b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11")
        );
    }

    #[test]
    fn rejects_path_escapes_and_odd_characters() {
        for bad in ["", "../x", "a/b", ".hidden", "-flag", "sp ace", "é", "a\0b"] {
            let err = DeviceName::new(bad).unwrap_err();
            assert!(
                err.to_string().contains("invalid device-mapper name"),
                "{bad:?}: {err}"
            );
        }
        assert!(DeviceName::new(&"a".repeat(128)).is_err());
        assert!(DeviceName::new(&"a".repeat(127)).is_ok());
    }

    proptest! {
        #[test]
        fn accepted_names_never_contain_a_slash(s in "\\PC{0,140}") {
            if let Ok(name) = DeviceName::new(&s) {
                prop_assert!(!name.as_str().contains('/'));
                prop_assert!(name.as_str().len() <= MAX_NAME_LEN);
                let path = name.mapper_path();
                prop_assert_eq!(path.parent(), Some(std::path::Path::new("/dev/mapper")));
            }
        }
    }

    #[test]
    fn every_name_parses_back_to_its_role() {
        let naming = Naming::new("dmclone").unwrap();
        let id = VolumeId::parse("0b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11").unwrap();
        let cases = [
            (naming.pool(), DeviceRole::Pool),
            (naming.pool_meta(), DeviceRole::PoolMeta),
            (naming.pool_data(), DeviceRole::PoolData),
            (naming.public(&id), DeviceRole::Public(id.to_string())),
            (naming.thin(&id), DeviceRole::Thin(id.to_string())),
            (
                naming.clone_metadata(&id),
                DeviceRole::CloneMetadata(id.to_string()),
            ),
            (
                naming.era_metadata(&id),
                DeviceRole::EraMetadata(id.to_string()),
            ),
            (naming.era_probe(&id), DeviceRole::EraProbe(id.to_string())),
            (naming.lower(&id), DeviceRole::Lower(id.to_string())),
            (
                naming.snapshot(&SnapshotId::parse(id.as_str()).unwrap()),
                DeviceRole::Snapshot(id.to_string()),
            ),
        ];
        for (name, role) in cases {
            assert!(DeviceName::new(name.as_str()).is_ok(), "{name}");
            assert_eq!(naming.parse(name.as_str()), Some(role), "{name}");
        }
        assert_eq!(naming.public(&id).as_str(), format!("dmclone-{id}"));
        assert_eq!(
            naming.parse("dmclone-clone-meta-x"),
            Some(DeviceRole::Other("clone-meta-x".into()))
        );
        assert_eq!(naming.parse("dmclonex-pool"), None);
        assert_eq!(naming.parse("other-pool"), None);
        assert_eq!(
            naming.parse("dmclone-0B9D1C3E-5F1A-4F7E-9A57-3F0C2B8F6D11"),
            Some(DeviceRole::Other(
                "0B9D1C3E-5F1A-4F7E-9A57-3F0C2B8F6D11".into()
            )),
            "ids in names are always lower-case"
        );
    }
}
