//! Rate limiting: for log lines a remote peer can trigger ([`LogLimiter`],
//! [`warn_limited!`](crate::warn_limited)) and for API requests per token
//! ([`TokenBuckets`]). Both take `now` as an argument; the limiter holds
//! the [`Clock`] its macro reads.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use novacron_shared::clock::Clock;

/// Allows `burst` events per `window`; counts what it suppresses.
#[derive(Debug)]
pub struct LogLimiter {
    window: Duration,
    burst: u32,
    clock: Clock,
    state: Mutex<(Instant, u32, u64)>,
}

impl LogLimiter {
    /// A limiter allowing `burst` lines per `window`, on the system clock.
    pub fn new(burst: u32, window: Duration) -> Self {
        Self::with_clock(burst, window, Clock::system())
    }

    /// A limiter allowing `burst` lines per `window`, on `clock`.
    pub fn with_clock(burst: u32, window: Duration, clock: Clock) -> Self {
        let start = clock.now();
        Self {
            window,
            burst,
            clock,
            state: Mutex::new((start, 0, 0)),
        }
    }

    /// [`allow`](Self::allow) at the limiter's clock's now.
    pub fn allow_now(&self) -> Option<u64> {
        self.allow(self.clock.now())
    }

    /// `Some(suppressed_since_last)` if a line may be logged now.
    pub fn allow(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if now.duration_since(s.0) >= self.window {
            s.0 = now;
            s.1 = 0;
        }
        if s.1 < self.burst {
            s.1 += 1;
            let suppressed = s.2;
            s.2 = 0;
            Some(suppressed)
        } else {
            s.2 += 1;
            None
        }
    }
}

/// Logs a `warn!` through a limiter, mentioning how many were suppressed.
#[macro_export]
macro_rules! warn_limited {
    ($limiter:expr, $($arg:tt)+) => {
        if let Some(suppressed) = $limiter.allow_now() {
            tracing::warn!(suppressed, $($arg)+);
        }
    };
}

/// Token buckets per key (API token): `rate` requests per second
/// sustained, `burst` at once. `rate` 0 turns limiting off.
#[derive(Debug)]
pub struct TokenBuckets {
    rate: f64,
    burst: f64,
    buckets: Mutex<std::collections::HashMap<String, (f64, Instant)>>,
}

/// Most keys tracked; idle full buckets are dropped past this.
const MAX_BUCKETS: usize = 10_000;

impl TokenBuckets {
    /// Buckets refilling at `rate` per second up to `burst`.
    pub fn new(rate: f64, burst: u32) -> Self {
        Self {
            rate,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::default(),
        }
    }

    /// Takes one token for `key`; `Err(wait)` says when one is available.
    pub fn take(&self, key: &str, now: Instant) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if b.len() >= MAX_BUCKETS && !b.contains_key(key) {
            let (rate, burst) = (self.rate, self.burst);
            b.retain(|_, (tokens, at)| *tokens + now.duration_since(*at).as_secs_f64() * rate < burst);
        }
        let (tokens, at) = b.entry(key.to_string()).or_insert((self.burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_allow_a_burst_then_the_rate_per_key() {
        let b = TokenBuckets::new(10.0, 3);
        let (clock, _) = Clock::manual();
        let t0 = clock.now();
        for _ in 0..3 {
            assert!(b.take("a", t0).is_ok());
        }
        let wait = b.take("a", t0).expect_err("burst used up");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        assert!(b.take("b", t0).is_ok(), "keys are independent");
        assert!(b.take("a", t0 + Duration::from_millis(100)).is_ok(), "refilled");
        assert!(b.take("a", t0 + Duration::from_millis(100)).is_err());
        let off = TokenBuckets::new(0.0, 1);
        for _ in 0..100 {
            assert!(off.take("a", t0).is_ok());
        }
    }

    #[test]
    fn bursts_then_suppresses_then_reports() {
        let (clock, manual) = Clock::manual();
        let l = LogLimiter::with_clock(2, Duration::from_secs(10), clock.clone());
        let t0 = clock.now();
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0), None);
        assert_eq!(l.allow_now(), None, "the limiter's own clock has not moved");
        manual.advance(Duration::from_secs(11));
        assert_eq!(l.allow_now(), Some(2), "a new window reports what it suppressed");
    }
}
