//! The systemd units' service protocol, exercised the way systemd runs the
//! units (PID 1 is not systemd on the test machines): the unit's
//! `ExecStartPre`, then its `ExecStart` with `NOTIFY_SOCKET` pointed at a
//! socket of the test and `WATCHDOG_USEC` set, as systemd sets it from
//! `WatchdogSec=`. `READY=1` must arrive once the service serves, watchdog
//! pings at half the period, and a frozen main loop (the
//! `NOVACRON_FREEZE` test fault) must stop them.

#![allow(clippy::unwrap_used)]

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use novacron_e2e::{bin, Agent, Server};

/// Real time: these tests watch real processes.
fn now() -> Instant {
    novacron_shared::clock::Clock::system().now()
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The command line of `key` (`ExecStart`, `ExecStartPre`) in the shipped
/// `unit`, with the installed paths replaced by the built binary and the
/// test's config.
fn unit_command(unit: &str, key: &str, config: &Path) -> Command {
    let text = std::fs::read_to_string(repo().join("systemd").join(unit)).unwrap();
    let prefix = format!("{key}=");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("{unit} has no {key}="));
    let mut words = line.split_whitespace().map(|w| {
        if let Some(name) = w.strip_prefix("/usr/bin/") {
            bin(name).display().to_string()
        } else if w.starts_with("/etc/novacron/") {
            config.display().to_string()
        } else {
            w.to_string()
        }
    });
    let mut cmd = Command::new(words.next().unwrap());
    cmd.args(words);
    cmd
}

/// The unit's `WatchdogSec=` in seconds.
fn watchdog_sec(unit: &str) -> u64 {
    let text = std::fs::read_to_string(repo().join("systemd").join(unit)).unwrap();
    let v = text
        .lines()
        .find_map(|l| l.strip_prefix("WatchdogSec="))
        .unwrap_or_else(|| panic!("{unit} has no WatchdogSec="));
    v.trim_end_matches('s').parse().unwrap()
}

struct Notify {
    sock: UnixDatagram,
    path: PathBuf,
    /// Every datagram so far, with when it arrived.
    got: Vec<(Instant, String)>,
}

impl Notify {
    fn bind(dir: &Path) -> Notify {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        Notify {
            sock,
            path,
            got: Vec::new(),
        }
    }

    /// Reads until `done` holds for what arrived, or `timeout` (then panics
    /// with `what` and everything received).
    fn until(&mut self, what: &str, timeout: Duration, done: impl Fn(&[(Instant, String)]) -> bool) {
        let end = now() + timeout;
        let mut buf = [0u8; 4096];
        while !done(&self.got) {
            assert!(
                now() < end,
                "{what}: not within {timeout:?}; received {:?}",
                self.got.iter().map(|(_, m)| m).collect::<Vec<_>>()
            );
            if let Ok(n) = self.sock.recv(&mut buf) {
                self.got
                    .push((now(), String::from_utf8_lossy(&buf[..n]).into_owned()));
            }
        }
    }
}

fn pings(got: &[(Instant, String)]) -> Vec<Instant> {
    got.iter()
        .filter(|(_, m)| m == "WATCHDOG=1")
        .map(|(t, _)| *t)
        .collect()
}

fn ready_at(got: &[(Instant, String)]) -> Option<Instant> {
    got.iter()
        .find(|(_, m)| m.lines().any(|l| l == "READY=1"))
        .map(|(t, _)| *t)
}

/// Starts the unit's service: `ExecStartPre` must pass, then `ExecStart`
/// runs with the notify socket, a 1 s watchdog and `freeze`.
fn start_unit(unit: &str, config: &Path, notify: &Notify, freeze: &str, log: &Path) -> Child {
    let pre = unit_command(unit, "ExecStartPre", config).output().unwrap();
    assert!(
        pre.status.success(),
        "{unit} ExecStartPre failed: {}",
        String::from_utf8_lossy(&pre.stderr)
    );
    unit_command(unit, "ExecStart", config)
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "1000000")
        .env("NOVACRON_FREEZE", freeze)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// Pings at the period (0.5 s for a 1 s watchdog) while the loops go round,
/// then none once `frozen` stopped (past its healthy `gap`); the status
/// names the stuck loop.
fn check_watchdog(notify: &mut Notify, ready: Instant, frozen: &str, gap: Duration) {
    // Three seconds of pings before the fault (it hits 4 s after the start).
    notify.until("three seconds of watchdog pings", Duration::from_secs(10), |g| {
        pings(g).iter().any(|t| *t >= ready + Duration::from_secs(3))
    });
    let early = pings(&notify.got)
        .into_iter()
        .filter(|t| *t > ready && *t <= ready + Duration::from_secs(3))
        .count();
    assert!(
        (4..=8).contains(&early),
        "{early} pings in 3 s after READY; a 1 s watchdog wants one every 0.5 s"
    );
    let want = format!("STATUS=stuck: {frozen}");
    notify.until(
        &format!("{want} after the freeze"),
        gap + Duration::from_secs(20),
        |g| g.iter().any(|(_, m)| *m == want),
    );
    // Nothing more for four periods: the pings stopped.
    let end = now() + Duration::from_secs(2);
    let mut buf = [0u8; 4096];
    while now() < end {
        if let Ok(n) = notify.sock.recv(&mut buf) {
            assert_ne!(&buf[..n], b"WATCHDOG=1", "a watchdog ping after {frozen} froze");
        }
    }
}

#[test]
fn server_unit_signals_ready_and_a_frozen_loop_stops_the_watchdog() {
    assert!(watchdog_sec("novacron-server.service") >= 10);
    let mut server = Server::start("");
    server.kill9();
    let dir = tempfile::tempdir().unwrap();
    let mut notify = Notify::bind(dir.path());
    let log = dir.path().join("server.log");
    let mut child = start_unit(
        "novacron-server.service",
        &server.config,
        &notify,
        "ha-driver@4",
        &log,
    );
    notify.until("READY=1", Duration::from_secs(30), |g| ready_at(g).is_some());
    let ready = ready_at(&notify.got).unwrap();
    let msg = &notify.got.iter().find(|(t, _)| *t == ready).unwrap().1;
    assert!(msg.contains("STATUS=serving"), "{msg}");
    // Serving means both listeners answer.
    let health = std::net::TcpStream::connect(server.api);
    assert!(
        health.is_ok(),
        "READY sent but the API does not accept: {health:?}"
    );
    check_watchdog(&mut notify, ready, "ha-driver", Duration::from_secs(10));
    child.kill().unwrap();
    child.wait().unwrap();
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.contains("a main loop is stuck"), "{logs}");
}

#[test]
fn agent_unit_signals_ready_once_linked_and_a_frozen_link_stops_the_watchdog() {
    assert!(watchdog_sec("novacron-agent.service") >= 30);
    let server = Server::start("");
    let mut agent = Agent::new("unit-host");
    agent.join(&server);
    let dir = tempfile::tempdir().unwrap();
    let mut notify = Notify::bind(dir.path());
    let log = dir.path().join("agent.log");
    let mut child = start_unit("novacron-agent.service", &agent.config, &notify, "link@4", &log);
    notify.until("READY=1", Duration::from_secs(30), |g| ready_at(g).is_some());
    let ready = ready_at(&notify.got).unwrap();
    server.wait_connected(&agent.host_id, true);
    // The link loop's healthy gap is 30 s (a reconnect attempt at most).
    check_watchdog(&mut notify, ready, "link", Duration::from_secs(30));
    child.kill().unwrap();
    child.wait().unwrap();
}
