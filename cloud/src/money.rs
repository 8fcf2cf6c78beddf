//! Money as integer micro-dollars (no floating point in records or sums).

use serde::{Deserialize, Serialize};

/// An amount in micro-dollars (1 USD = 1,000,000).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MicroUsd(pub u64);

impl MicroUsd {
    /// Whole and fractional dollars, rounded to the nearest micro-dollar;
    /// `None` for a negative, non-finite or absurd amount.
    pub fn from_dollars(d: f64) -> Option<Self> {
        if !d.is_finite() || !(0.0..=1e12).contains(&d) {
            return None;
        }
        Some(Self((d * 1e6).round() as u64))
    }

    /// As dollars (for display and Prometheus).
    pub fn dollars(self) -> f64 {
        self.0 as f64 / 1e6
    }

    /// The cost of running `ms` milliseconds at `self` per hour, rounded up
    /// to the micro-dollar.
    pub fn for_ms(self, ms: u64) -> MicroUsd {
        let n = u128::from(self.0) * u128::from(ms);
        MicroUsd(u64::try_from(n.div_ceil(3_600_000)).unwrap_or(u64::MAX))
    }

    /// Saturating sum.
    pub fn plus(self, o: MicroUsd) -> MicroUsd {
        MicroUsd(self.0.saturating_add(o.0))
    }
}

impl std::fmt::Display for MicroUsd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "${}.{:06}", self.0 / 1_000_000, self.0 % 1_000_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollars_round_trip_and_refuse_nonsense() {
        assert_eq!(MicroUsd::from_dollars(0.0104), Some(MicroUsd(10_400)));
        assert_eq!(MicroUsd::from_dollars(0.0), Some(MicroUsd(0)));
        assert_eq!(MicroUsd::from_dollars(-0.01), None);
        assert_eq!(MicroUsd::from_dollars(f64::NAN), None);
        assert_eq!(MicroUsd::from_dollars(f64::INFINITY), None);
        assert_eq!(MicroUsd(10_400).to_string(), "$0.010400");
        assert!((MicroUsd(1_500_000).dollars() - 1.5).abs() < 1e-12);
    }

    #[test]
    fn cost_is_per_millisecond_and_rounds_up() {
        let hourly = MicroUsd(3_600_000); // $3.60/h = $0.001/s
        assert_eq!(hourly.for_ms(3_600_000), hourly);
        assert_eq!(hourly.for_ms(1000), MicroUsd(1000));
        assert_eq!(hourly.for_ms(1), MicroUsd(1), "a started micro-dollar counts");
        assert_eq!(hourly.for_ms(0), MicroUsd(0));
        assert_eq!(MicroUsd(u64::MAX).for_ms(u64::MAX), MicroUsd(u64::MAX));
    }
}
