//! Hydration progress: regions to bytes, the current rate and the time left.
//! Pure: the monitor feeds it observations.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

/// How far back the rate looks: long enough to smooth the kernel's bursts
/// (a commit every second), short enough to follow a throttle change.
const WINDOW: Duration = Duration::from_secs(5);

/// How close to its end (at the current rate) a copy is looked at often.
pub const ENDGAME_HORIZON: Duration = Duration::from_millis(1500);

/// How often a copy is looked at close to its end: the most by which its
/// end is seen late.
pub const ENDGAME_TICK: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub hydrated_regions: u64,
    pub total_regions: u64,
    samples: VecDeque<(Instant, u64)>,
    /// When the hydrated count last moved.
    last_change: Option<Instant>,
}

impl Progress {
    /// Records the hydrated count seen at `now`.
    pub fn observe(&mut self, now: Instant, hydrated: u64, total: u64) {
        if hydrated != self.hydrated_regions || self.last_change.is_none() {
            self.last_change = Some(now);
        }
        self.hydrated_regions = hydrated;
        self.total_regions = total;
        self.samples.push_back((now, hydrated));
        while self
            .samples
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > WINDOW)
            && self.samples.len() > 2
        {
            self.samples.pop_front();
        }
    }

    /// Starts the rate afresh: the count jumped without copying (a return
    /// trip marked unchanged regions held).
    pub fn forget_rate(&mut self) {
        self.samples.clear();
    }

    /// Regions per second over the window; 0 until two samples exist.
    pub fn regions_per_second(&self) -> f64 {
        let (Some((t0, r0)), Some((t1, r1))) = (self.samples.front(), self.samples.back()) else {
            return 0.0;
        };
        let seconds = t1.duration_since(*t0).as_secs_f64();
        if seconds <= 0.0 || r1 < r0 {
            return 0.0;
        }
        (r1 - r0) as f64 / seconds
    }

    /// Seconds left at the current rate; `None` when no rate is known.
    pub fn eta_seconds(&self) -> Option<u64> {
        let left = self.total_regions.saturating_sub(self.hydrated_regions);
        if left == 0 {
            return Some(0);
        }
        let rate = self.regions_per_second();
        (rate > 0.0).then(|| (left as f64 / rate).ceil() as u64)
    }

    /// Copying is not expected now (held while the volume moves on,
    /// paused, deferred): the time until it is again is no stall.
    pub fn not_stalled(&mut self, now: Instant) {
        self.last_change = Some(now);
    }

    /// How long the count has not moved.
    pub fn stalled_for(&self, now: Instant) -> Duration {
        self.last_change
            .map_or(Duration::ZERO, |at| now.duration_since(at))
    }

    /// Whether the rest should be copied within `horizon` at the current
    /// rate (never while nothing moves).
    pub fn ends_within(&self, horizon: Duration) -> bool {
        let left = self.total_regions.saturating_sub(self.hydrated_regions);
        let rate = self.regions_per_second();
        left > 0 && rate > 0.0 && left as f64 / rate <= horizon.as_secs_f64()
    }

    /// The longest wait before the next look at a clone whose waits are
    /// otherwise `tick` long. dm-clone signals its end only when it commits
    /// its metadata, on a 1 s timer, so a watcher that only waits for the
    /// event sees the end up to a second late: close to the end it looks
    /// every [`ENDGAME_TICK`] instead, and a flush makes the clone commit
    /// (and signal) the moment the last region is in.
    ///
    /// Until a rate is known (the first look, or after the rate started
    /// afresh) it looks again after [`ENDGAME_TICK`], then after as long
    /// as it has watched, up to `tick`: a copy of a few regions (a return
    /// trip's) ends before a whole tick would have passed.
    pub fn next_look(&self, tick: Duration) -> Duration {
        if self.ends_within(ENDGAME_HORIZON) {
            return tick.min(ENDGAME_TICK);
        }
        let watched = match (self.samples.front(), self.samples.back()) {
            (Some((first, _)), Some((last, _))) => last.duration_since(*first),
            _ => return tick,
        };
        if self.regions_per_second() == 0.0 && !self.is_complete() {
            watched.max(ENDGAME_TICK).min(tick)
        } else {
            tick
        }
    }

    pub fn is_complete(&self) -> bool {
        self.total_regions > 0 && self.hydrated_regions == self.total_regions
    }
}

/// Bytes of `regions` whole regions, the last one possibly partial.
pub fn bytes_of(regions: u64, total_regions: u64, region_bytes: u64, total_bytes: u64) -> u64 {
    if regions >= total_regions {
        return total_bytes;
    }
    regions * region_bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn until_a_rate_is_known_the_looks_come_soon_then_back_off() {
        let tick = Duration::from_millis(500);
        let start = Instant::now();
        let mut p = Progress::default();
        assert_eq!(p.next_look(tick), tick, "nothing observed yet");
        p.observe(start, 0, 1000);
        assert_eq!(p.next_look(tick), ENDGAME_TICK);
        p.observe(start + ENDGAME_TICK, 0, 1000);
        assert_eq!(p.next_look(tick), ENDGAME_TICK);
        p.observe(start + Duration::from_millis(100), 0, 1000);
        assert_eq!(p.next_look(tick), Duration::from_millis(100));
        p.observe(start + Duration::from_millis(900), 0, 1000);
        assert_eq!(p.next_look(tick), tick, "nothing moves: the tick");
        // A copy far from its end: the tick.
        p.observe(start + Duration::from_millis(1000), 10, 1000);
        assert_eq!(p.next_look(tick), tick);
        // A copy whose rate started afresh is looked at soon again; one
        // that turns out to end soon, often.
        p.forget_rate();
        p.observe(start + Duration::from_millis(1100), 990, 1000);
        assert_eq!(p.next_look(tick), ENDGAME_TICK);
        p.observe(start + Duration::from_millis(1120), 995, 1000);
        assert_eq!(p.next_look(tick), ENDGAME_TICK);
    }

    #[test]
    fn rate_and_eta_follow_the_window() {
        let start = Instant::now();
        let mut p = Progress::default();
        p.observe(start, 0, 1000);
        assert_eq!(p.regions_per_second(), 0.0);
        assert_eq!(p.eta_seconds(), None);
        p.observe(start + Duration::from_secs(1), 100, 1000);
        p.observe(start + Duration::from_secs(2), 200, 1000);
        assert_eq!(p.regions_per_second(), 100.0);
        assert_eq!(p.eta_seconds(), Some(8));
        // Old samples fall out of the window: the rate follows a slowdown.
        for s in 3..=10 {
            p.observe(start + Duration::from_secs(s), 200 + (s - 2) * 10, 1000);
        }
        assert!(
            (p.regions_per_second() - 10.0).abs() < 1e-9,
            "{}",
            p.regions_per_second()
        );
    }

    #[test]
    fn looks_come_often_only_close_to_the_end() {
        let start = Instant::now();
        let tick = Duration::from_millis(500);
        let mut p = Progress::default();
        p.observe(start, 0, 1000);
        // No rate yet: no guess about the end, a second look soon.
        assert!(!p.ends_within(ENDGAME_HORIZON));
        assert_eq!(p.next_look(tick), ENDGAME_TICK);
        p.observe(start + Duration::from_secs(1), 100, 1000);
        // 900 regions left at 100/s: 9 s away.
        assert!(!p.ends_within(ENDGAME_HORIZON));
        assert_eq!(p.next_look(tick), tick);
        p.observe(start + Duration::from_secs(9), 900, 1000);
        // 100 left at 100/s: 1 s away.
        assert!(p.ends_within(ENDGAME_HORIZON));
        assert_eq!(p.next_look(tick), ENDGAME_TICK);
        // A shorter tick of its own (a byte budget) stays.
        assert_eq!(
            p.next_look(Duration::from_millis(5)),
            Duration::from_millis(5)
        );
        // Stalled (the window holds no movement): not close to any end.
        for s in 10..=20 {
            p.observe(start + Duration::from_secs(s), 900, 1000);
        }
        assert!(!p.ends_within(ENDGAME_HORIZON));
        // Done: nothing left to look for.
        p.observe(start + Duration::from_secs(21), 1000, 1000);
        assert!(!p.ends_within(ENDGAME_HORIZON));
    }

    #[test]
    fn stalls_are_measured_from_the_last_change() {
        let start = Instant::now();
        let mut p = Progress::default();
        p.observe(start, 5, 10);
        p.observe(start + Duration::from_secs(3), 5, 10);
        assert_eq!(
            p.stalled_for(start + Duration::from_secs(4)),
            Duration::from_secs(4)
        );
        p.observe(start + Duration::from_secs(5), 6, 10);
        assert_eq!(
            p.stalled_for(start + Duration::from_secs(6)),
            Duration::from_secs(1)
        );
        // Held for 10 s (the volume moved on from here, then that stopped):
        // the hold is no stall.
        p.not_stalled(start + Duration::from_secs(16));
        assert_eq!(
            p.stalled_for(start + Duration::from_secs(17)),
            Duration::from_secs(1)
        );
        p.observe(start + Duration::from_secs(17), 10, 10);
        assert!(p.is_complete());
        assert_eq!(p.eta_seconds(), Some(0));
    }

    #[test]
    fn the_last_region_may_be_partial() {
        assert_eq!(bytes_of(3, 4, 1 << 20, (3 << 20) + 4096), 3 << 20);
        assert_eq!(bytes_of(4, 4, 1 << 20, (3 << 20) + 4096), (3 << 20) + 4096);
    }
}
