//! Human output: aligned columns in the style of `lvs`, binary sizes.

/// Prints rows under a header, each column as wide as its widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// `64.0MiB`, `1.5GiB`, `512B`: one decimal, binary units, as `lvs` prints.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

/// Used share of a total, as a whole percentage.
pub fn percent(used: u64, total: u64) -> String {
    if total == 0 {
        return "-".into();
    }
    format!("{}%", used * 100 / total)
}

pub fn json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_lvs() {
        assert_eq!(size(512), "512B");
        assert_eq!(size(64 * 1024 * 1024), "64.0MiB");
        assert_eq!(size(3 * 1024 * 1024 * 1024 / 2), "1.5GiB");
        assert_eq!(percent(1, 3), "33%");
        assert_eq!(percent(1, 0), "-");
    }
}
