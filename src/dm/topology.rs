//! What a block device is made of, as sysfs tells it: the devices a
//! device-mapper device sits on (`slaves/`), the partitions of a disk, the
//! file behind a loop device. Used to refuse a transfer source that is, or
//! sits on, the agent's own storage: compared by device numbers and the
//! dependency tree, never by path strings.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use super::table::DevRef;

/// A sysfs tree (`/sys`, or a copy in tests).
#[derive(Debug, Clone)]
pub struct Sysfs {
    root: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Self::at("/sys")
    }
}

/// Sysfs's answers about devices never nest deeper than this; a loop in a
/// corrupt or hostile tree ends here.
const MAX_DEVICES: usize = 4096;

impl Sysfs {
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn node(&self, dev: DevRef) -> PathBuf {
        self.root
            .join("dev/block")
            .join(format!("{}:{}", dev.major, dev.minor))
    }

    /// The devices named in one of `dev`'s directories (`slaves`, or a
    /// disk's own entries for its partitions), by the number in their `dev`.
    fn devices_in(dir: &Path, only_partitions: bool) -> Vec<DevRef> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|entry| !only_partitions || entry.path().join("partition").exists())
            .filter_map(|entry| read_dev(&entry.path().join("dev")))
            .collect()
    }

    /// `dev` and every device it sits on, transitively; with
    /// `partitions`, each one's partitions too (a disk holds them).
    pub fn reach(&self, dev: DevRef, partitions: bool) -> BTreeSet<DevRef> {
        let mut seen = BTreeSet::new();
        let mut next = vec![dev];
        while let Some(dev) = next.pop() {
            if seen.len() >= MAX_DEVICES || !seen.insert(dev) {
                continue;
            }
            let node = self.node(dev);
            next.extend(Self::devices_in(&node.join("slaves"), false));
            if partitions {
                next.extend(Self::devices_in(&node, true));
            }
        }
        seen
    }

    /// The file behind a loop device, if `dev` is one.
    pub fn loop_backing(&self, dev: DevRef) -> Option<PathBuf> {
        let text = std::fs::read_to_string(self.node(dev).join("loop/backing_file")).ok()?;
        Some(PathBuf::from(text.trim_end()))
    }
}

/// What identifies the block device `dev` (at `path`) across reboots,
/// where its number and path may change: its device-mapper uuid, its
/// WWID or serial, a loop device's file and offset, or else its size and a
/// checksum of its first MiB; always with its size.
pub fn identity(sysfs: &Sysfs, path: &Path, dev: DevRef) -> std::io::Result<String> {
    use std::io::{Read, Seek};
    let node = sysfs.node(dev);
    let text = |relative: &str| {
        std::fs::read_to_string(node.join(relative))
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
    };
    let mut file = std::fs::File::open(path)?;
    let size = file.seek(std::io::SeekFrom::End(0))?;
    let named = text("dm/uuid")
        .map(|uuid| format!("dm-uuid {uuid}"))
        .or_else(|| text("wwid").map(|id| format!("wwid {id}")))
        .or_else(|| text("device/wwid").map(|id| format!("wwid {id}")))
        .or_else(|| text("device/serial").map(|id| format!("serial {id}")))
        .or_else(|| {
            let file = text("loop/backing_file")?;
            Some(format!(
                "loop {file} at {}",
                text("loop/offset").unwrap_or_default()
            ))
        });
    if let Some(named) = named {
        return Ok(format!("{named}, {size} bytes"));
    }
    let mut head = Vec::with_capacity(1 << 20);
    file.seek(std::io::SeekFrom::Start(0))?;
    file.take(1 << 20).read_to_end(&mut head)?;
    Ok(format!(
        "first MiB crc32c {:08x}, {size} bytes",
        crc32c::crc32c(&head)
    ))
}

fn read_dev(path: &Path) -> Option<DevRef> {
    let text = std::fs::read_to_string(path).ok()?;
    let (major, minor) = text.trim().split_once(':')?;
    Some(DevRef::from((major.parse().ok()?, minor.parse().ok()?)))
}

/// Where a candidate source meets the agent's own storage: its devices
/// (`own`), and everything under its pool (`pool`: what the pool's devices
/// sit on, a loop device's file among them). What the agent's clones read
/// from (their sources) is not the agent's: two moves may read one disk.
pub fn meeting_point(
    sysfs: &Sysfs,
    candidate: DevRef,
    own: &[DevRef],
    pool: &[DevRef],
) -> Option<String> {
    let theirs = sysfs.reach(candidate, true);
    let mut ours: BTreeSet<DevRef> = own.iter().copied().collect();
    for dev in pool {
        ours.extend(sysfs.reach(*dev, false));
    }
    if let Some(shared) = theirs.intersection(&ours).next() {
        return Some(format!("device {}:{}", shared.major, shared.minor));
    }
    let our_files: BTreeSet<PathBuf> = ours.iter().filter_map(|d| sysfs.loop_backing(*d)).collect();
    theirs
        .iter()
        .filter_map(|d| sysfs.loop_backing(*d))
        .find(|file| our_files.contains(file))
        .map(|file| format!("the file {}", file.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// One device of a made-up sysfs tree: major:minor, the disk of a
    /// partition, the devices it sits on, a loop device's file.
    type Node<'a> = (&'a str, Option<&'a str>, &'a [&'a str], Option<&'a str>);

    fn tree(devices: &[Node<'_>]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let block = dir.path().join("dev/block");
        std::fs::create_dir_all(&block).unwrap();
        for (dev, parent, slaves, backing) in devices {
            let node = match parent {
                Some(parent) => block.join(parent).join(format!("part-{dev}")),
                None => block.join(dev),
            };
            std::fs::create_dir_all(node.join("slaves")).unwrap();
            std::fs::write(node.join("dev"), format!("{dev}\n")).unwrap();
            if parent.is_some() {
                std::fs::write(node.join("partition"), "1\n").unwrap();
                std::os::unix::fs::symlink(&node, block.join(dev)).unwrap();
            }
            for slave in *slaves {
                let name = node.join("slaves").join(slave.replace(':', "_"));
                std::fs::create_dir_all(&name).unwrap();
                std::fs::write(name.join("dev"), format!("{slave}\n")).unwrap();
            }
            if let Some(file) = backing {
                std::fs::create_dir_all(node.join("loop")).unwrap();
                std::fs::write(node.join("loop/backing_file"), format!("{file}\n")).unwrap();
            }
        }
        dir
    }

    fn dev(text: &str) -> DevRef {
        let (major, minor) = text.split_once(':').unwrap();
        DevRef::from((major.parse().unwrap(), minor.parse().unwrap()))
    }

    #[test]
    fn a_source_that_is_on_or_holds_the_agents_storage_meets_it() {
        // sda (8:0) holds sda1 (8:1, free) and sda3 (8:3, the pool's data);
        // the pool (253:2) sits on 253:0 (metadata, on loop 7:0 over a file)
        // and 253:1 (data, on sda3); a volume (253:3) sits on the pool;
        // someone's linear (253:9) sits on the volume; 7:5 is another loop
        // over the pool's metadata file; 7:6 a loop over an unrelated file;
        // a clone of the agent's (253:5) reads from the disk 8:16.
        let dir = tree(&[
            ("8:16", None, &[], None),
            ("253:5", None, &["253:3", "8:16"], None),
            ("8:0", None, &[], None),
            ("8:1", Some("8:0"), &[], None),
            ("8:3", Some("8:0"), &[], None),
            ("7:0", None, &[], Some("/var/lib/dmclone/pool-meta")),
            ("253:0", None, &["7:0"], None),
            ("253:1", None, &["8:3"], None),
            ("253:2", None, &["253:0", "253:1"], None),
            ("253:3", None, &["253:2"], None),
            ("253:9", None, &["253:3"], None),
            ("7:5", None, &[], Some("/var/lib/dmclone/pool-meta")),
            ("7:6", None, &[], Some("/srv/image.raw")),
        ]);
        let sysfs = Sysfs::at(dir.path());
        let own = [
            dev("253:0"),
            dev("253:1"),
            dev("253:2"),
            dev("253:3"),
            dev("253:5"),
        ];
        let pool = [dev("253:0"), dev("253:1"), dev("253:2")];
        for (candidate, meets) in [
            ("253:3", Some("device ")),
            ("253:2", Some("device ")),
            ("253:9", Some("device ")),
            ("8:3", Some("device 8:3")),
            ("8:0", Some("device 8:3")),
            ("7:0", Some("device 7:0")),
            ("7:5", Some("the file /var/lib/dmclone/pool-meta")),
            ("8:1", None),
            ("7:6", None),
            ("8:16", None),
        ] {
            let found = meeting_point(&sysfs, dev(candidate), &own, &pool);
            match meets {
                Some(prefix) => assert!(
                    found.as_deref().is_some_and(|f| f.starts_with(prefix)),
                    "{candidate}: {found:?}"
                ),
                None => assert_eq!(found, None, "{candidate}"),
            }
        }
    }

    #[test]
    fn an_identity_is_a_name_the_kernel_gives_or_the_content() {
        let dir = tree(&[
            ("253:4", None, &[], None),
            ("7:3", None, &[], Some("/srv/a.raw")),
            ("7:4", None, &[], None),
        ]);
        std::fs::create_dir_all(dir.path().join("dev/block/253:4/dm")).unwrap();
        std::fs::write(dir.path().join("dev/block/253:4/dm/uuid"), "CRYPT-abc\n").unwrap();
        std::fs::write(dir.path().join("dev/block/7:3/loop/offset"), "0\n").unwrap();
        let sysfs = Sysfs::at(dir.path());
        let content = dir.path().join("content");
        std::fs::write(&content, vec![7u8; 8192]).unwrap();
        assert_eq!(
            identity(&sysfs, &content, dev("253:4")).unwrap(),
            "dm-uuid CRYPT-abc, 8192 bytes"
        );
        assert_eq!(
            identity(&sysfs, &content, dev("7:3")).unwrap(),
            "loop /srv/a.raw at 0, 8192 bytes"
        );
        let first = identity(&sysfs, &content, dev("7:4")).unwrap();
        assert!(first.starts_with("first MiB crc32c "), "{first}");
        std::fs::write(&content, vec![8u8; 8192]).unwrap();
        assert_ne!(identity(&sysfs, &content, dev("7:4")).unwrap(), first);
    }

    #[test]
    fn a_looping_tree_ends() {
        let dir = tree(&[
            ("253:0", None, &["253:1"], None),
            ("253:1", None, &["253:0"], None),
        ]);
        let sysfs = Sysfs::at(dir.path());
        assert_eq!(sysfs.reach(dev("253:0"), true).len(), 2);
    }
}
