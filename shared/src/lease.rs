//! Lease timing shared by the agent (which fences itself) and the server
//! (which restarts a host's HA VMs elsewhere only after that host must have
//! fenced), and the inequality that keeps the agent's deadline first.
//!
//! # The safety argument
//!
//! Times below are real (physical) times; each side measures only on its
//! own monotonic clock, whose rate differs from real time by at most
//! `ρ = MAX_DRIFT_PPM / 10⁶` either way.
//!
//! - The agent sends heartbeat `n` at real time `s_n`. When the ack of `n`
//!   arrives, its lease runs until `s_n + L` on its own clock, which is no
//!   later than real `s_n + L / (1 − ρ)`. Then it fences: every HA VM is
//!   killed within `F` (real), so all are gone by `s_n + L / (1 − ρ) + F`.
//!   An ack can only renew the lease from the *send* time of the heartbeat
//!   it acknowledges, never from when it arrived.
//! - The server receives heartbeat `m` (the last one it got) at real time
//!   `r_m ≥ s_m`, and `m ≥ n` for the newest heartbeat `n` whose ack the
//!   agent received (the agent cannot hold an ack of a heartbeat the server
//!   never got), so `r_m ≥ s_n`. It declares the host fenced `W` later on
//!   its own clock: at real time no earlier than `r_m + W / (1 + ρ)`.
//! - Safe when the server's declaration comes after the agent's fence:
//!   `r_m + W / (1 + ρ) > s_n + L / (1 − ρ) + F`, which, since `r_m ≥ s_n`,
//!   holds whenever `W > (1 + ρ)(L / (1 − ρ) + F)`. [`LeaseTiming::fenced_after`]
//!   is that bound plus [`SAFETY_MARGIN`], rounded up to the millisecond.
//!
//! What it does not cover (the next guards do): a clock drifting faster
//! than the bound, a process frozen longer than the lease while holding
//! a running QEMU (the kill then lands late), and disks written after the
//! fence. The storage lock of the HA-guards issue removes the dependence on
//! timing for the disks.

use std::time::Duration;

/// The largest rate difference between any monotonic clock and real time
/// that the arithmetic allows for: 1,000 ppm (0.1 %). Crystal oscillators
/// and NTP-slewed clocks stay well inside 500 ppm; this doubles it.
pub const MAX_DRIFT_PPM: u64 = 1_000;

/// Added on top of the drift-corrected bound: absorbs scheduling delay
/// between the server's timer and its decision, and rounding.
pub const SAFETY_MARGIN: Duration = Duration::from_millis(500);

/// The lease an acknowledged heartbeat buys when the server's `[ha]`
/// config does not say otherwise (`L`). With 1 s heartbeats, four may be
/// lost in a row without the lease running out.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(5);

/// Longest the agent may take, from its lease deadline, to have killed
/// every HA VM (SIGKILL of QEMU through libvirt's destroy; measured in
/// milliseconds on the test bed, bounded generously).
pub const DEFAULT_FENCE_TIME: Duration = Duration::from_secs(2);

/// The lease an agent holds, and how long the server waits before it
/// treats a silent host as fenced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTiming {
    /// `L`: how long an acknowledged heartbeat keeps the lease, counted
    /// from when the agent sent it.
    pub lease: Duration,
    /// `F`: how long the agent may take to fence after its deadline.
    pub fence_time: Duration,
}

impl LeaseTiming {
    /// A lease of `lease` with the default fence time.
    pub fn new(lease: Duration) -> Self {
        Self {
            lease,
            fence_time: DEFAULT_FENCE_TIME,
        }
    }

    /// `W`: from the last heartbeat the server received, how long (on the
    /// server's clock) until the host must have fenced:
    /// `(1 + ρ)(L / (1 − ρ) + F) + margin`, rounded up to the millisecond.
    pub fn fenced_after(&self) -> Duration {
        let ppm = u128::from(MAX_DRIFT_PPM);
        let million = 1_000_000u128;
        let l = self.lease.as_nanos();
        let f = self.fence_time.as_nanos();
        // L / (1 − ρ), rounded up.
        let l_slow = (l * million).div_ceil(million - ppm);
        // (1 + ρ) · (…), rounded up.
        let w = ((l_slow + f) * (million + ppm)).div_ceil(million);
        let w = Duration::from_nanos(u64::try_from(w).unwrap_or(u64::MAX)) + SAFETY_MARGIN;
        round_up_ms(w)
    }

    /// Whether `fenced_after` is safe for clocks drifting by `drift_ppm`
    /// (for tests at and past the bound): the server's earliest real
    /// declaration time exceeds the agent's latest real fence time.
    pub fn is_safe_for(&self, wait: Duration, drift_ppm: u64) -> bool {
        let million = 1_000_000u128;
        let ppm = u128::from(drift_ppm);
        if ppm >= million {
            return false;
        }
        // Compare W / (1 + ρ) > L / (1 − ρ) + F, cross-multiplied in
        // integers: W·(1 − ρ) > (L + F·(1 − ρ))·(1 + ρ), all scaled by 10⁶.
        let w = wait.as_nanos();
        let l = self.lease.as_nanos();
        let f = self.fence_time.as_nanos();
        let lhs = w * (million - ppm) * million;
        let rhs = (l * million + f * (million - ppm)) * (million + ppm);
        lhs > rhs
    }
}

fn round_up_ms(d: Duration) -> Duration {
    let ms = d.as_nanos().div_ceil(1_000_000);
    Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_waits_past_the_agents_latest_fence() {
        for lease_ms in [1_000u64, 3_000, 5_000, 10_000, 60_000] {
            let t = LeaseTiming::new(Duration::from_millis(lease_ms));
            let w = t.fenced_after();
            assert!(t.is_safe_for(w, MAX_DRIFT_PPM), "lease {lease_ms} ms: W = {w:?}");
            assert!(w > t.lease + t.fence_time, "{w:?}");
        }
    }

    #[test]
    fn the_bound_is_tight_without_the_margin() {
        // Without the margin, W sits within a millisecond of the bound:
        // a wait a couple of milliseconds shorter is unsafe at the drift
        // bound — so the check can fail, and the margin is what keeps the
        // rounding and timer slack on the safe side.
        let t = LeaseTiming::new(Duration::from_secs(5));
        let bare = t.fenced_after() - SAFETY_MARGIN;
        assert!(t.is_safe_for(bare, MAX_DRIFT_PPM));
        assert!(!t.is_safe_for(bare - Duration::from_millis(2), MAX_DRIFT_PPM));
        // 5 s lease, 2 s fence, 0.1 %: (1.001)(5 / 0.999 + 2) = 7.0120… s.
        assert_eq!(bare, Duration::from_millis(7_013));
    }

    #[test]
    fn clocks_drifting_past_the_bound_break_the_guarantee() {
        // The margin covers some excess drift, not any: at 10 % the chosen
        // wait is no longer safe, and the check says so.
        let t = LeaseTiming::new(Duration::from_secs(5));
        let w = t.fenced_after();
        assert!(t.is_safe_for(w, MAX_DRIFT_PPM * 2));
        assert!(!t.is_safe_for(w, 100_000));
        assert!(!t.is_safe_for(w, 1_000_000));
    }
}
