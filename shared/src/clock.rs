//! The one clock: monotonic time for deadlines, leases and backoff, and wall
//! time for timestamps people read.
//!
//! Logic never reads the time itself: it takes `now` as an argument, and the
//! drivers that feed it hold a [`Clock`]. Production uses
//! [`Clock::system`]; tests use a [`ManualClock`] they advance by hand (and
//! can make the wall clock jump while monotonic time goes on), so nothing
//! that tests a timeout sleeps for real. (Async drivers wait on tokio
//! timers, which follow `tokio::time::pause` in their own tests.)
//!
//! This is the only module allowed to call `Instant::now` and
//! `SystemTime::now` (`clippy.toml` bans them everywhere else).

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where a [`Clock`] reads the time.
pub trait TimeSource: Send + Sync + 'static {
    /// Monotonic time: never goes back, unaffected by wall-clock changes.
    fn now(&self) -> Instant;
    /// Wall-clock time: may jump (NTP, an operator).
    fn wall(&self) -> SystemTime;
}

/// A cheap, cloneable handle on a time source.
#[derive(Clone)]
pub struct Clock(Arc<dyn TimeSource>);

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Clock").finish_non_exhaustive()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

/// The operating system's clocks.
#[derive(Debug)]
struct System;

impl TimeSource for System {
    #[allow(clippy::disallowed_methods)] // the one place that reads the OS clock
    fn now(&self) -> Instant {
        Instant::now()
    }

    #[allow(clippy::disallowed_methods)] // the one place that reads the OS clock
    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
}

impl Clock {
    /// The operating system's monotonic and wall clocks.
    pub fn system() -> Self {
        Self(Arc::new(System))
    }

    /// A clock on any time source.
    pub fn from_source(source: Arc<dyn TimeSource>) -> Self {
        Self(source)
    }

    /// A clock that moves only when the returned [`ManualClock`] is advanced.
    pub fn manual() -> (Self, Arc<ManualClock>) {
        let m = Arc::new(ManualClock::new());
        (Self(m.clone()), m)
    }

    /// Monotonic now.
    pub fn now(&self) -> Instant {
        self.0.now()
    }

    /// Wall-clock now.
    pub fn wall(&self) -> SystemTime {
        self.0.wall()
    }

    /// Wall-clock now in milliseconds since the Unix epoch.
    pub fn unix_ms(&self) -> u64 {
        unix_ms(self.wall())
    }

    /// Monotonic time elapsed since `earlier` (zero if `earlier` is later).
    pub fn since(&self, earlier: Instant) -> Duration {
        self.now().saturating_duration_since(earlier)
    }
}

/// Milliseconds since the Unix epoch (0 before it, saturating far after it).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A time source that moves only when told to: monotonic time by
/// [`advance`](Self::advance), wall time by `advance` and, on its own, by
/// [`jump_wall`](Self::jump_wall).
#[derive(Debug)]
pub struct ManualClock {
    base: Instant,
    state: Mutex<ManualState>,
}

#[derive(Debug)]
struct ManualState {
    elapsed: Duration,
    wall: SystemTime,
}

impl ManualClock {
    /// Starts at an arbitrary monotonic instant and at wall time
    /// 2026-01-01T00:00:00Z.
    pub fn new() -> Self {
        Self::starting_at(UNIX_EPOCH + Duration::from_secs(1_767_225_600))
    }

    /// Starts at the given wall time.
    #[allow(clippy::disallowed_methods)] // a base instant; only offsets from it are ever read
    pub fn starting_at(wall: SystemTime) -> Self {
        Self {
            base: Instant::now(),
            state: Mutex::new(ManualState {
                elapsed: Duration::ZERO,
                wall,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ManualState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves both clocks forward by `d`.
    pub fn advance(&self, d: Duration) {
        let mut s = self.lock();
        s.elapsed += d;
        s.wall += d;
    }

    /// Moves the wall clock alone, forward (`forward = true`) or back by `d`;
    /// monotonic time does not move.
    pub fn jump_wall(&self, d: Duration, forward: bool) {
        let mut s = self.lock();
        if forward {
            s.wall += d;
        } else {
            s.wall = s.wall.checked_sub(d).unwrap_or(UNIX_EPOCH);
        }
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl TimeSource for ManualClock {
    fn now(&self) -> Instant {
        self.base + self.lock().elapsed
    }

    fn wall(&self) -> SystemTime {
        self.lock().wall
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let (clock, m) = Clock::manual();
        let t0 = clock.now();
        let w0 = clock.wall();
        assert_eq!(clock.now(), t0);
        m.advance(Duration::from_millis(1500));
        assert_eq!(clock.since(t0), Duration::from_millis(1500));
        assert_eq!(
            clock.wall().duration_since(w0).unwrap(),
            Duration::from_millis(1500)
        );
    }

    #[test]
    fn a_wall_jump_leaves_monotonic_time_alone() {
        let (clock, m) = Clock::manual();
        let t0 = clock.now();
        let w0 = clock.unix_ms();
        m.jump_wall(Duration::from_secs(3600), false);
        assert_eq!(clock.now(), t0);
        assert_eq!(w0 - clock.unix_ms(), 3_600_000);
        m.jump_wall(Duration::from_secs(7200), true);
        assert_eq!(clock.unix_ms() - w0, 3_600_000);
        assert_eq!(clock.now(), t0);
    }

    #[test]
    fn unix_ms_before_the_epoch_is_zero() {
        assert_eq!(unix_ms(UNIX_EPOCH - Duration::from_secs(1)), 0);
        assert_eq!(unix_ms(UNIX_EPOCH + Duration::from_millis(42)), 42);
    }

    #[test]
    fn system_clock_moves_forward() {
        let c = Clock::system();
        let a = c.now();
        let b = c.now();
        assert!(b >= a);
        assert!(c.unix_ms() > 1_700_000_000_000);
    }
}
