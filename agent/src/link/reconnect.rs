//! When and how hard the link tries again: the QUIC timeouts, the capped
//! exponential backoff between attempts ([`Reconnect`], pure), the hurry of
//! a host whose HA lease is at stake ([`urgency`], pure), and the wait
//! itself, which beats the watchdog so that waiting by design never looks
//! like a stuck loop.

use std::time::{Duration, Instant};

use novacron_shared::backoff::Backoff;
use novacron_shared::notify::Beat;
use tokio::sync::watch;

use crate::ha::LeaseHandle;

/// Idle timeout of the QUIC connection.
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed to connect and get the first reply.
pub(super) const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// The QUIC idle timeout of a session on a host with HA VMs: half the
/// lease (1 s..=10 s). Any packet from the server keeps it alive (its QUIC
/// stack acknowledges every heartbeat, acked by the lease or not), so
/// only a dead or unreachable server times out. Pure.
pub fn session_idle_timeout(lease: Duration) -> Duration {
    (lease / 2).clamp(Duration::from_secs(1), IDLE_TIMEOUT)
}

/// How hard a host with HA VMs reconnects while its HA lease is at stake
/// (held, the one a previous run may have held, or lapsed with the HA VMs
/// kept): attempts at most `lease / 10` apart, each
/// given up after `lease / 5`, so a server back within the lease is
/// reached before the lease runs out (a QUIC handshake whose first packets
/// went to a dead server would otherwise wait for its retransmission
/// timer, which doubles to seconds). `None`: nothing at stake, the usual
/// backoff and open timeout. Pure.
pub fn urgency(state: crate::lease::State, lease: Duration) -> Option<(Duration, Duration)> {
    use crate::lease::State;
    match state {
        // Lapsed: HA VMs run on without a lease; regaining one ends that.
        State::NoLease { .. } | State::Leased { .. } | State::Renewing { .. } | State::Lapsed { .. } => {
            Some((
                (lease / 10).max(Duration::from_millis(100)),
                (lease / 5).clamp(Duration::from_millis(500), OPEN_TIMEOUT),
            ))
        }
        State::SelfFencing { .. } | State::Fenced { .. } => None,
    }
}

/// First delay before reconnecting.
pub const RECONNECT_BASE: Duration = Duration::from_millis(200);
/// Longest delay before reconnecting.
pub const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// When the link tries again: capped exponential backoff with equal jitter
/// after every ended attempt, starting small again once a session got a
/// welcome. Pure: `now` and the randomness come in.
#[derive(Debug, Clone)]
pub struct Reconnect {
    backoff: Backoff,
}

impl Default for Reconnect {
    fn default() -> Self {
        Self {
            backoff: Backoff::new(RECONNECT_BASE, RECONNECT_MAX),
        }
    }
}

impl Reconnect {
    /// A session got a welcome: the next failure starts from the base delay.
    pub fn connected(&mut self) {
        self.backoff.reset();
    }

    /// An attempt ended at `now`: when to try again (`unit` in `[0, 1)`).
    pub fn next_attempt(&mut self, now: Instant, unit: f64) -> Instant {
        now + self.backoff.next_delay(unit)
    }
}

/// The delay before the next attempt after one ended at `now`: the
/// backoff's, capped by the lease's urgency when the host has HA VMs
/// (only they hurry: a fleet's worth of agents retrying every half second
/// would swamp a restarting server).
pub(super) fn retry_delay(
    reconnect: &mut Reconnect,
    lease: Option<&LeaseHandle>,
    now: Instant,
    unit: f64,
) -> Duration {
    let delay = reconnect.next_attempt(now, unit).saturating_duration_since(now);
    match lease
        .filter(|l| l.has_ha_vms())
        .and_then(|l| urgency(l.state(), l.timing().lease))
    {
        Some((cap, _)) => delay.min(cap),
        None => delay,
    }
}

/// Waits `delay` (tokio timers) or until shutdown, beating every
/// [`WAIT_BEAT`].
pub(super) async fn wait(delay: Duration, beat: Option<&Beat>, shutdown: &mut watch::Receiver<bool>) {
    let mut left = delay;
    while !left.is_zero() && !*shutdown.borrow() {
        let step = left.min(WAIT_BEAT);
        tokio::select! {
            _ = tokio::time::sleep(step) => {}
            _ = shutdown.changed() => {}
        }
        left -= step;
        if let Some(b) = beat {
            b.beat().await;
        }
    }
}

/// How often a reconnect wait beats the watchdog.
const WAIT_BEAT: Duration = Duration::from_secs(5);

/// The longest the link loop goes without a beat when healthy: a connect
/// attempt (the open timeout, resolving, the handshake) or a wait step.
pub const LOOP_GAP: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;
    use novacron_shared::clock::Clock;

    #[test]
    fn reconnects_back_off_and_start_small_after_a_welcome() {
        let (clock, time) = Clock::manual();
        let mut r = Reconnect::default();
        // The whole delay when the randomness is at its top (1.0 is
        // clamped to it), half of it at the bottom.
        let mut waits = Vec::new();
        for _ in 0..10 {
            let at = r.next_attempt(clock.now(), 1.0);
            let wait = at - clock.now();
            waits.push(wait);
            time.advance(wait);
        }
        assert_eq!(waits[0], RECONNECT_BASE);
        assert_eq!(waits[1], RECONNECT_BASE * 2);
        assert_eq!(waits[2], RECONNECT_BASE * 4);
        assert_eq!(*waits.last().unwrap_or(&Duration::ZERO), RECONNECT_MAX);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]), "{waits:?}");
        assert_eq!(r.next_attempt(clock.now(), 0.0) - clock.now(), RECONNECT_MAX / 2);
        r.connected();
        assert_eq!(r.next_attempt(clock.now(), 1.0) - clock.now(), RECONNECT_BASE);
        let before = r.next_attempt(clock.now(), 1.0) - clock.now();
        assert_eq!(r.next_attempt(clock.now(), 1.0) - clock.now(), before * 2);
    }

    #[test]
    fn reconnects_hurry_while_a_lease_is_at_stake_and_back_off_when_fenced() {
        use crate::lease::State;
        let (clock, _) = Clock::manual();
        let t = clock.now();
        let lease = Duration::from_secs(5);
        for held in [
            State::NoLease { fence_at: t },
            State::Leased { renewed_from: t },
            State::Renewing { renewed_from: t },
        ] {
            let (every, open) = urgency(held, lease).unwrap_or_else(|| panic!("{held:?}: at stake"));
            assert_eq!(
                (every, open),
                (Duration::from_millis(500), Duration::from_secs(1))
            );
            // Several attempts fit in what is left of a lease.
            assert!(every + open < lease / 3);
        }
        assert_eq!(urgency(State::SelfFencing { since: t }, lease), None);
        // A dead server is noticed well before the lease runs out.
        assert_eq!(session_idle_timeout(lease), Duration::from_millis(2500));
        assert!(session_idle_timeout(lease) + Duration::from_secs(1) < lease);
        assert_eq!(session_idle_timeout(Duration::from_secs(600)), IDLE_TIMEOUT);
        assert_eq!(
            session_idle_timeout(Duration::from_secs(1)),
            Duration::from_secs(1)
        );
        assert_eq!(urgency(State::Fenced { since: t }, lease), None);
        // Bounds for extreme leases.
        assert_eq!(
            urgency(State::Leased { renewed_from: t }, Duration::from_secs(1)),
            Some((Duration::from_millis(100), Duration::from_millis(500)))
        );
        assert_eq!(
            urgency(State::Leased { renewed_from: t }, Duration::from_secs(600)).map(|u| u.1),
            Some(OPEN_TIMEOUT)
        );
    }
}
