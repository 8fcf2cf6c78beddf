//! Capped exponential backoff with equal jitter, as a pure value type.
//!
//! "Equal jitter" (in the terms of the AWS architecture blog's backoff
//! study): half of the capped delay is fixed and the other half random, so
//! a delay is never shorter than half the ceiling. (Full jitter would pick
//! anywhere between zero and the ceiling.)
//!
//! The caller supplies the randomness (a number in `[0, 1)`) so the schedule
//! is deterministic under test.

use std::time::Duration;

/// Reconnect delays: `base * 2^attempt`, capped, with equal jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `base` and never waiting longer than `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The delay before the next attempt; `unit` is a random number in `[0, 1)`.
    ///
    /// Equal jitter: uniformly between half the capped exponential delay and
    /// the whole of it, so a fleet reconnecting at once spreads out while no
    /// delay falls below half its ceiling.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX));
        let ceiling = exp.min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let unit = unit.clamp(0.0, 1.0);
        ceiling.mul_f64(0.5 + 0.5 * unit)
    }

    /// Call after a successful connection: the next failure starts small again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// How many delays were handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let ds: Vec<_> = (0..10).map(|_| b.next_delay(1.0)).collect();
        assert_eq!(ds[0], Duration::from_millis(100));
        assert_eq!(ds[1], Duration::from_millis(200));
        assert_eq!(ds[2], Duration::from_millis(400));
        assert_eq!(ds[9], Duration::from_secs(5));
        assert!(ds.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn jitter_stays_within_half_to_full() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        for _ in 0..3 {
            b.next_delay(0.0);
        }
        assert_eq!(b.next_delay(0.0), Duration::from_millis(400));
        b.reset();
        assert_eq!(b.attempts(), 0);
        assert_eq!(b.next_delay(0.5), Duration::from_millis(75));
    }

    /// Equal jitter's bounds: every delay lies in `[ceiling / 2, ceiling]`,
    /// both ends are reached, and the randomness spreads delays between them.
    #[test]
    fn equal_jitter_stays_between_half_and_all_of_the_ceiling() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(5);
        for attempt in 0..12u32 {
            let ceiling = base.saturating_mul(1 << attempt).min(cap);
            let at = |unit: f64| {
                let mut b = Backoff::new(base, cap);
                for _ in 0..attempt {
                    b.next_delay(0.0);
                }
                b.next_delay(unit)
            };
            assert_eq!(at(0.0), ceiling / 2, "attempt {attempt}: lowest");
            assert_eq!(at(1.0), ceiling, "attempt {attempt}: highest");
            let mut last = Duration::ZERO;
            for i in 0..100 {
                let d = at(f64::from(i) / 100.0);
                assert!(
                    d >= ceiling / 2 && d <= ceiling,
                    "attempt {attempt}: {d:?} of {ceiling:?}"
                );
                assert!(d >= last, "a larger unit never gives a shorter delay");
                last = d;
            }
            // Out-of-range randomness is clamped, never below half.
            assert_eq!(at(-3.0), ceiling / 2);
            assert_eq!(at(7.0), ceiling);
        }
    }

    #[test]
    fn never_overflows() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        for _ in 0..1000 {
            assert!(b.next_delay(0.99) <= Duration::from_secs(30));
        }
    }
}
