//! Rate limiting for log lines a remote peer can trigger.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Allows `burst` events per `window`; counts what it suppresses.
#[derive(Debug)]
pub struct LogLimiter {
    window: Duration,
    burst: u32,
    state: Mutex<(Instant, u32, u64)>,
}

impl LogLimiter {
    /// A limiter allowing `burst` lines per `window`.
    pub fn new(burst: u32, window: Duration) -> Self {
        Self {
            window,
            burst,
            state: Mutex::new((Instant::now(), 0, 0)),
        }
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
        if let Some(suppressed) = $limiter.allow(std::time::Instant::now()) {
            tracing::warn!(suppressed, $($arg)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_suppresses_then_reports() {
        let l = LogLimiter::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0), None);
        assert_eq!(l.allow(t0), None);
        assert_eq!(l.allow(t0 + Duration::from_secs(11)), Some(2));
    }
}
