//! Whether an agent's session is alive, counted on the monotonic clock from
//! the last frame it sent: a pure piece (no clock reads, no I/O) that the
//! session loop feeds with `now`. (The HA host leases, `crate::ha::lease`,
//! keep their own last-heard instant.)
//!
//! Owns: the instants of a session's last frame and last persisted
//! last-seen. Must not touch: the session's connection or the store.

use std::time::{Duration, Instant};

/// A session's liveness: silent for `timeout` means dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    last_frame: Instant,
    last_persisted: Instant,
    timeout: Duration,
    persist_every: Duration,
}

impl Liveness {
    /// A session that opened at `now` (the hello counts as a frame); it dies
    /// after `timeout` without a frame, and its last-seen time is persisted
    /// at most every `persist_every`.
    pub fn new(now: Instant, timeout: Duration, persist_every: Duration) -> Self {
        Self {
            last_frame: now,
            last_persisted: now,
            timeout,
            persist_every,
        }
    }

    /// Records a frame received at `now`; returns whether last-seen is due
    /// to be persisted (and counts it as persisted).
    pub fn frame(&mut self, now: Instant) -> bool {
        self.last_frame = self.last_frame.max(now);
        if now.saturating_duration_since(self.last_persisted) >= self.persist_every {
            self.last_persisted = now;
            true
        } else {
            false
        }
    }

    /// When the last frame arrived.
    pub fn last_frame(&self) -> Instant {
        self.last_frame
    }

    /// How long the peer has been silent at `now`.
    pub fn silent_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_frame)
    }

    /// Whether the session is dead at `now`.
    pub fn expired(&self, now: Instant) -> bool {
        self.silent_for(now) >= self.timeout
    }

    /// How long until it expires, from `now` (zero once expired).
    pub fn remaining(&self, now: Instant) -> Duration {
        self.timeout.saturating_sub(self.silent_for(now))
    }

    /// The silence that kills it.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use novacron_shared::clock::Clock;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn silence_for_the_timeout_kills_and_a_frame_revives() {
        let (clock, m) = Clock::manual();
        let mut l = Liveness::new(clock.now(), 10 * S, 15 * S);
        m.advance(9 * S);
        assert!(!l.expired(clock.now()));
        assert_eq!(l.remaining(clock.now()), S);
        assert!(!l.frame(clock.now()), "not due to persist yet");
        m.advance(9 * S);
        assert!(!l.expired(clock.now()), "the frame restarted the count");
        m.advance(S);
        assert!(l.expired(clock.now()));
        assert_eq!(l.remaining(clock.now()), Duration::ZERO);
        assert_eq!(l.silent_for(clock.now()), 10 * S);
    }

    #[test]
    fn last_seen_is_persisted_at_most_every_period() {
        let (clock, m) = Clock::manual();
        let mut l = Liveness::new(clock.now(), 60 * S, 15 * S);
        let mut persisted = 0;
        for _ in 0..60 {
            m.advance(S);
            if l.frame(clock.now()) {
                persisted += 1;
            }
        }
        assert_eq!(persisted, 4, "one per 15 s over 60 s");
    }

    #[test]
    fn an_older_instant_never_moves_the_last_frame_back() {
        let (clock, m) = Clock::manual();
        let t0 = clock.now();
        m.advance(5 * S);
        let mut l = Liveness::new(clock.now(), 10 * S, 15 * S);
        l.frame(t0);
        assert_eq!(l.last_frame(), clock.now());
    }
}
