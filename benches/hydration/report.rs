//! Output: printed and kept for hydration.txt.

use std::time::Duration;

#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) text: String,
}

impl Report {
    pub(crate) fn line(&mut self, line: impl AsRef<str>) {
        println!("{}", line.as_ref());
        self.text.push_str(line.as_ref());
        self.text.push('\n');
    }
}

macro_rules! out {
    ($report:expr) => { $report.line("") };
    ($report:expr, $($arg:tt)*) => { $report.line(format!($($arg)*)) };
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
