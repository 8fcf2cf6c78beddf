//! systemd's service notification protocol (`sd_notify(3)`) and a watchdog
//! over the process's main loops.
//!
//! - [`Notifier`] sends `READY=1`, `STATUS=…`, `STOPPING=1` and `WATCHDOG=1`
//!   datagrams to `$NOTIFY_SOCKET` (a path, or an abstract name starting with
//!   `@`). Without the variable (not started by systemd) it does nothing.
//! - [`Liveness`] holds one [`Beat`] per main loop; each loop calls
//!   [`Beat::beat`] once per iteration. [`Liveness::stalled`] is the pure
//!   decision (the clock's `now` in): a loop is stalled when its last beat
//!   is older than the gap it registered.
//! - [`spawn_watchdog`] pings at half of `$WATCHDOG_USEC` (systemd's
//!   advice) **only while no loop is stalled**: a stuck loop stops the pings
//!   and systemd restarts the service after `WatchdogSec`.
//! - Test fault: `NOVACRON_FREEZE=<loop>@<seconds>` makes the named loop
//!   stop for good at its first beat that many seconds after start (see
//!   [`Freeze`]), so the tests can show that a frozen loop stops the pings.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::clock::Clock;

/// The environment variable of the freeze test fault.
pub const FREEZE_ENV: &str = "NOVACRON_FREEZE";

/// Sends service notifications to systemd (or to whatever `NOTIFY_SOCKET`
/// names; nothing when it is unset).
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

/// A bad `NOTIFY_SOCKET` or `WATCHDOG_USEC`.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The socket address is neither a path nor an abstract name.
    #[error("NOTIFY_SOCKET {0:?}: not an absolute path or an @abstract name")]
    BadSocket(String),
    /// `WATCHDOG_USEC` is not a positive number.
    #[error("WATCHDOG_USEC {0:?}: not a positive number of microseconds")]
    BadWatchdog(String),
    /// The datagram socket could not be made.
    #[error("cannot open a datagram socket for NOTIFY_SOCKET {addr:?}")]
    Socket {
        /// The socket named.
        addr: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn disabled() -> Self {
        Self {
            target: None,
            watchdog: None,
        }
    }

    /// From `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`. Children
    /// (the agent's fence guard) inherit the variables but send nothing,
    /// and systemd only listens to the main process (`NotifyAccess=main`).
    pub fn from_env() -> Result<Self, NotifyError> {
        let socket = std::env::var("NOTIFY_SOCKET").ok();
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        let watchdog = watchdog_period(usec.as_deref(), pid.as_deref(), std::process::id())?;
        let Some(addr) = socket.filter(|s| !s.is_empty()) else {
            return Ok(Self::disabled());
        };
        let sockaddr = socket_addr(&addr)?;
        let sock = UnixDatagram::unbound().map_err(|source| NotifyError::Socket {
            addr: addr.clone(),
            source,
        })?;
        Ok(Self {
            target: Some((sock, sockaddr)),
            watchdog,
        })
    }

    /// Whether notifications go anywhere.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// How often the watchdog wants a ping (half of `WATCHDOG_USEC`), if it
    /// is on.
    pub fn watchdog_period(&self) -> Option<Duration> {
        self.watchdog.filter(|_| self.enabled())
    }

    /// Sends one notification (newline-separated `KEY=value` lines).
    /// Failures are returned for the caller to log; they never stop the
    /// service.
    pub fn send(&self, state: &str) -> io::Result<()> {
        match &self.target {
            Some((sock, addr)) => sock.send_to_addr(state.as_bytes(), addr).map(|_| ()),
            None => Ok(()),
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.log(self.send(&format!("READY=1\nSTATUS={}", one_line(status))));
    }

    /// A status line only.
    pub fn status(&self, status: &str) {
        self.log(self.send(&format!("STATUS={}", one_line(status))));
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) {
        self.log(self.send("STOPPING=1\nSTATUS=stopping"));
    }

    fn log(&self, r: io::Result<()>) {
        if let Err(e) = r {
            tracing::warn!(error = %e, "cannot notify systemd");
        }
    }
}

fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

/// `NOTIFY_SOCKET` → a socket address: an absolute path, or `@name` for the
/// abstract namespace.
pub fn socket_addr(s: &str) -> Result<SocketAddr, NotifyError> {
    use std::os::linux::net::SocketAddrExt;
    let bad = || NotifyError::BadSocket(s.to_string());
    if let Some(name) = s.strip_prefix('@') {
        SocketAddr::from_abstract_name(name.as_bytes()).map_err(|_| bad())
    } else if s.starts_with('/') {
        SocketAddr::from_pathname(s).map_err(|_| bad())
    } else {
        Err(bad())
    }
}

/// The ping period: half of `WATCHDOG_USEC`, when the watchdog is meant for
/// this process (`WATCHDOG_PID` unset or ours).
pub fn watchdog_period(
    usec: Option<&str>,
    pid: Option<&str>,
    my_pid: u32,
) -> Result<Option<Duration>, NotifyError> {
    let Some(usec) = usec.filter(|u| !u.is_empty()) else {
        return Ok(None);
    };
    if let Some(p) = pid.filter(|p| !p.is_empty()) {
        if p.trim().parse::<u32>().ok() != Some(my_pid) {
            return Ok(None);
        }
    }
    match usec.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(Some(Duration::from_micros(n) / 2)),
        _ => Err(NotifyError::BadWatchdog(usec.to_string())),
    }
}

/// The freeze test fault: the loop it names stops for good at its first
/// beat `after` the start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Freeze {
    /// The loop's name (as registered).
    pub name: String,
    /// How long after the start.
    pub after: Duration,
}

impl Freeze {
    /// `NAME@SECONDS` (seconds may be fractional); `NAME` alone is `@0`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (name, secs) = match s.split_once('@') {
            Some((n, t)) => (n, t),
            None => (s, "0"),
        };
        let secs: f64 = secs
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite() && *v >= 0.0)
            .ok_or_else(|| format!("{FREEZE_ENV}={s:?}: expected LOOP@SECONDS"))?;
        if name.is_empty() {
            return Err(format!("{FREEZE_ENV}={s:?}: no loop named"));
        }
        Ok(Self {
            name: name.to_string(),
            after: Duration::from_secs_f64(secs),
        })
    }
}

#[derive(Debug)]
struct Entry {
    name: &'static str,
    max_gap: Duration,
    last: Arc<Mutex<Instant>>,
}

/// The main loops of a process and when each last went round.
#[derive(Debug, Clone)]
pub struct Liveness {
    clock: Clock,
    started: Instant,
    freeze: Option<Freeze>,
    loops: Arc<Mutex<Vec<Entry>>>,
}

impl Liveness {
    /// No loops yet; `freeze` is the test fault (see [`Liveness::from_env`]).
    pub fn new(clock: Clock, freeze: Option<Freeze>) -> Self {
        let started = clock.now();
        Self {
            clock,
            started,
            freeze,
            loops: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// With the freeze fault read from `NOVACRON_FREEZE` (a malformed value
    /// is an error: a test that asks for a fault must get it).
    pub fn from_env(clock: Clock) -> Result<Self, String> {
        let freeze = match std::env::var(FREEZE_ENV) {
            Ok(s) if !s.is_empty() => Some(Freeze::parse(&s)?),
            _ => None,
        };
        if let Some(f) = &freeze {
            tracing::warn!(target_loop = %f.name, after = ?f.after, "test fault {FREEZE_ENV}: that loop will freeze");
        }
        Ok(Self::new(clock, freeze))
    }

    /// Registers a loop that goes round at least every `max_gap` when it is
    /// healthy (its worst normal wait, with room to spare).
    pub fn register(&self, name: &'static str, max_gap: Duration) -> Beat {
        let last = Arc::new(Mutex::new(self.clock.now()));
        lock(&self.loops).push(Entry {
            name,
            max_gap,
            last: last.clone(),
        });
        let freeze_at = self
            .freeze
            .as_ref()
            .filter(|f| f.name == name)
            .map(|f| self.started + f.after);
        Beat {
            name,
            clock: self.clock.clone(),
            last,
            freeze_at,
        }
    }

    /// The loops whose last beat is older than their gap at `now`, with how
    /// long ago they last went round.
    pub fn stalled(&self, now: Instant) -> Vec<(&'static str, Duration)> {
        lock(&self.loops)
            .iter()
            .filter_map(|e| {
                let ago = now.saturating_duration_since(*lock(&e.last));
                (ago > e.max_gap).then_some((e.name, ago))
            })
            .collect()
    }

    /// The registered loops' names.
    pub fn names(&self) -> Vec<&'static str> {
        lock(&self.loops).iter().map(|e| e.name).collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One main loop's heartbeat.
#[derive(Debug)]
pub struct Beat {
    name: &'static str,
    clock: Clock,
    last: Arc<Mutex<Instant>>,
    freeze_at: Option<Instant>,
}

impl Beat {
    /// The loop went round. Under the freeze fault, past its time, this
    /// never returns (the loop is stuck, as a deadlock would leave it).
    pub async fn beat(&self) {
        let now = self.clock.now();
        if self.freeze_at.is_some_and(|t| now >= t) {
            tracing::warn!(
                target_loop = self.name,
                "test fault {FREEZE_ENV}: this loop is frozen now"
            );
            std::future::pending::<()>().await;
        }
        *lock(&self.last) = now;
    }
}

/// Pings the watchdog from a thread of its own at the notifier's period,
/// while no loop of `liveness` is stalled. Logs when a loop stalls and when
/// it recovers (once each, not every period). `None` when the watchdog is
/// off.
pub fn spawn_watchdog(
    notifier: Arc<Notifier>,
    liveness: Liveness,
) -> io::Result<Option<std::thread::JoinHandle<()>>> {
    let Some(period) = notifier.watchdog_period() else {
        return Ok(None);
    };
    tracing::info!(?period, loops = ?liveness.names(), "systemd watchdog on");
    std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            let mut was_stalled = false;
            loop {
                let stalled = liveness.stalled(liveness.clock.now());
                if stalled.is_empty() {
                    if was_stalled {
                        tracing::warn!("every main loop goes round again; watchdog pings resume");
                    }
                    if let Err(e) = notifier.send("WATCHDOG=1") {
                        tracing::warn!(error = %e, "cannot ping the systemd watchdog");
                    }
                } else if !was_stalled {
                    tracing::error!(?stalled, "a main loop is stuck; watchdog pings stop (systemd restarts the service after WatchdogSec)");
                    notifier.status(&format!("stuck: {}", stalled[0].0));
                }
                was_stalled = !stalled.is_empty();
                // The ping's own pace, in production; the decision above
                // is the pure `stalled`, tested on a manual clock.
                #[allow(clippy::disallowed_methods)]
                std::thread::sleep(period);
            }
        })
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_period_is_half_the_interval_and_only_for_us() {
        assert_eq!(
            watchdog_period(Some("2000000"), None, 7).unwrap(),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            watchdog_period(Some("2000000"), Some("7"), 7).unwrap(),
            Some(Duration::from_secs(1))
        );
        assert_eq!(watchdog_period(Some("2000000"), Some("8"), 7).unwrap(), None);
        assert_eq!(watchdog_period(None, None, 7).unwrap(), None);
        assert!(watchdog_period(Some("0"), None, 7).is_err());
        assert!(watchdog_period(Some("soon"), None, 7).is_err());
    }

    #[test]
    fn socket_addresses() {
        assert!(socket_addr("/run/systemd/notify")
            .unwrap()
            .as_pathname()
            .is_some());
        use std::os::linux::net::SocketAddrExt;
        assert_eq!(
            socket_addr("@nc-test").unwrap().as_abstract_name(),
            Some(&b"nc-test"[..])
        );
        assert!(socket_addr("relative/path").is_err());
    }

    #[test]
    fn freeze_fault_parses() {
        assert_eq!(
            Freeze::parse("link@3").unwrap(),
            Freeze {
                name: "link".into(),
                after: Duration::from_secs(3)
            }
        );
        assert_eq!(Freeze::parse("ha-driver").unwrap().after, Duration::ZERO);
        assert!(Freeze::parse("@3").is_err());
        assert!(Freeze::parse("link@-1").is_err());
        assert!(Freeze::parse("link@x").is_err());
    }

    #[test]
    fn a_loop_past_its_gap_is_stalled_until_it_beats_again() {
        let (clock, manual) = Clock::manual();
        let live = Liveness::new(clock.clone(), None);
        let fast = live.register("fast", Duration::from_secs(2));
        let _slow = live.register("slow", Duration::from_secs(60));
        manual.advance(Duration::from_secs(2));
        assert!(live.stalled(clock.now()).is_empty());
        manual.advance(Duration::from_secs(1));
        assert_eq!(live.stalled(clock.now()), vec![("fast", Duration::from_secs(3))]);
        block_on(fast.beat());
        assert!(live.stalled(clock.now()).is_empty());
        manual.advance(Duration::from_secs(58));
        let names: Vec<_> = live.stalled(clock.now()).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec!["fast", "slow"]);
    }

    #[test]
    fn the_frozen_loop_stops_beating_after_its_time() {
        let (clock, manual) = Clock::manual();
        let live = Liveness::new(
            clock.clone(),
            Some(Freeze {
                name: "link".into(),
                after: Duration::from_secs(3),
            }),
        );
        let link = live.register("link", Duration::from_secs(2));
        let other = live.register("converge", Duration::from_secs(2));
        manual.advance(Duration::from_secs(2));
        assert!(poll_once(link.beat()), "before its time the loop goes on");
        manual.advance(Duration::from_secs(1));
        assert!(!poll_once(link.beat()), "at its time the beat never returns");
        assert!(poll_once(other.beat()), "other loops are not frozen");
        manual.advance(Duration::from_secs(3));
        assert!(poll_once(other.beat()));
        assert_eq!(live.stalled(clock.now()), vec![("link", Duration::from_secs(4))]);
    }

    #[test]
    fn notifications_reach_the_socket() {
        let dir = std::env::temp_dir().join(format!("nc-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            target: Some((
                UnixDatagram::unbound().unwrap(),
                socket_addr(path.to_str().unwrap()).unwrap(),
            )),
            watchdog: Some(Duration::from_secs(1)),
        };
        n.ready("serving\nnow");
        let mut buf = [0u8; 256];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving now");
        assert_eq!(n.watchdog_period(), Some(Duration::from_secs(1)));
        assert_eq!(Notifier::disabled().watchdog_period(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn poll_once<F: std::future::Future>(f: F) -> bool {
        let mut f = std::pin::pin!(f);
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        f.as_mut().poll(&mut cx).is_ready()
    }

    fn block_on<F: std::future::Future>(f: F) {
        assert!(poll_once(f), "the beat did not complete");
    }
}
