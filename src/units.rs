//! Units the kernel counts in. Byte counts are `u64` bytes throughout the
//! domain, named `*_bytes`; device-mapper tables count 512-byte sectors,
//! which are [`Sectors`] so that the two cannot be mixed up.

use std::{
    fmt,
    iter::Sum,
    ops::{Add, Sub},
    str::FromStr,
};

/// Bytes in a device-mapper sector.
pub const SECTOR: u64 = 512;

/// A length or an offset in 512-byte sectors, as device-mapper tables count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sectors(pub u64);

impl Sectors {
    pub const ZERO: Sectors = Sectors(0);

    /// The bytes these sectors hold.
    pub const fn bytes(self) -> u64 {
        self.0 * SECTOR
    }

    pub fn checked_add(self, other: Sectors) -> Option<Sectors> {
        self.0.checked_add(other.0).map(Sectors)
    }
}

/// Sectors in `bytes`. Every size the agent hands the kernel is a whole
/// number of sectors (volumes are rounded up to at least 1 MiB).
pub const fn sectors(bytes: u64) -> Sectors {
    debug_assert!(
        bytes.is_multiple_of(SECTOR),
        "a byte count the kernel cannot map"
    );
    Sectors(bytes / SECTOR)
}

/// Bytes in `sectors`.
pub const fn bytes(sectors: Sectors) -> u64 {
    sectors.bytes()
}

impl fmt::Display for Sectors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for Sectors {
    type Err = std::num::ParseIntError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        text.parse().map(Sectors)
    }
}

impl Add for Sectors {
    type Output = Sectors;

    fn add(self, other: Sectors) -> Sectors {
        Sectors(self.0 + other.0)
    }
}

impl Sub for Sectors {
    type Output = Sectors;

    fn sub(self, other: Sectors) -> Sectors {
        Sectors(self.0 - other.0)
    }
}

impl Sum for Sectors {
    fn sum<I: Iterator<Item = Sectors>>(iter: I) -> Sectors {
        Sectors(iter.map(|s| s.0).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sectors_and_bytes_convert_both_ways() {
        assert_eq!(sectors(1 << 20), Sectors(2048));
        assert_eq!(Sectors(2048).bytes(), 1 << 20);
        assert_eq!("16384".parse::<Sectors>(), Ok(Sectors(16384)));
        assert_eq!(Sectors(8).to_string(), "8");
        assert_eq!(
            [Sectors(1), Sectors(2)].into_iter().sum::<Sectors>(),
            Sectors(3)
        );
        assert_eq!(Sectors(u64::MAX).checked_add(Sectors(1)), None);
    }
}
