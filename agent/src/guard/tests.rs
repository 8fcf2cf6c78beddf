//! Tests of the fence guard: the pure machine, the `/proc` parsing, and the
//! socket loop killing a real process (under tokio's paused time).

use super::*;
use novacron_shared::clock::TimeSource;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn t(name: &str, pid: i32) -> Target {
    Target {
        name: name.into(),
        pid,
        start_ticks: 42,
    }
}

#[test]
fn it_fires_once_exactly_at_the_fire_instant() {
    let (clock, _) = Clock::manual();
    let t0 = clock.now();
    let mut g = Guard::default();
    assert_eq!(g.hello(t0).fire_in_ms, None);
    let targets = vec![t("a", 100), t("b", 101)];
    assert!(g
        .step(
            t0,
            GuardEvent::Arm {
                fire_at: t0 + ms(5_000),
                targets: targets.clone()
            }
        )
        .is_empty());
    assert_eq!(g.next_timer(), Some(t0 + ms(5_000)));
    assert_eq!(g.hello(t0 + ms(1_000)).fire_in_ms, Some(4_000));
    assert!(g.step(t0 + ms(4_999), GuardEvent::Tick).is_empty());
    assert_eq!(g.step(t0 + ms(5_000), GuardEvent::Tick), targets);
    assert!(g.step(t0 + ms(6_000), GuardEvent::Tick).is_empty(), "once");
    assert_eq!(g.hello(t0 + ms(6_000)).fire_in_ms, Some(0));
    assert!(!g.armed());
}

#[test]
fn renewals_move_the_fire_instant_and_disarm_stands_down() {
    let (clock, _) = Clock::manual();
    let t0 = clock.now();
    let mut g = Guard::default();
    let arm = |at| GuardEvent::Arm {
        fire_at: at,
        targets: vec![t("a", 100)],
    };
    g.step(t0, arm(t0 + ms(5_000)));
    // A renewal before the instant pushes it on.
    assert!(g.step(t0 + ms(4_900), arm(t0 + ms(9_900))).is_empty());
    assert!(g.step(t0 + ms(9_899), GuardEvent::Tick).is_empty());
    // A renewal that comes too late does not save the targets.
    assert_eq!(g.step(t0 + ms(9_900), arm(t0 + ms(15_000))).len(), 1);
    // ...but arms afresh (a live agent with a new lease).
    assert!(g.armed());
    g.step(t0 + ms(10_000), GuardEvent::Disarm);
    assert!(!g.armed());
    assert!(g.step(t0 + ms(20_000), GuardEvent::Tick).is_empty());
    // Armed for an instant already past: fires at once.
    assert_eq!(g.step(t0 + ms(20_000), arm(t0 + ms(19_000))).len(), 1);
}

#[test]
fn start_ticks_are_read_after_the_last_parenthesis() {
    let stat = "4242 (qemu-system-x86) (weird) name) S 1 4242 4242 0 -1 4194560 \
                123 0 0 0 5 6 0 0 20 0 4 0 987654 123456 789 18446744073709551615";
    assert_eq!(parse_start_ticks(stat), Some(987_654));
    assert_eq!(parse_start_ticks("1 (x) S 1"), None);
    assert_eq!(parse_start_ticks("garbage"), None);
    // This process, for real.
    assert!(start_ticks(i32::try_from(std::process::id()).unwrap_or(0)).is_some());
}

#[test]
fn a_target_whose_pid_was_reused_is_not_killed() {
    let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
    let pid = i32::try_from(child.id()).unwrap();
    let real = start_ticks(pid).unwrap();
    assert!(!kill(&Target {
        name: "x".into(),
        pid,
        start_ticks: real + 1
    }));
    assert!(
        child.try_wait().unwrap().is_none(),
        "killed despite another start time"
    );
    assert!(kill(&Target {
        name: "x".into(),
        pid,
        start_ticks: real
    }));
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9));
}

#[test]
fn targets_come_from_libvirt_pid_files_naming_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let mut qemu = std::process::Command::new("sh")
        .args(["-c", "sleep 30; true", "-name", "guest=web,debug-threads=on"])
        .spawn()
        .unwrap();
    let pid = i32::try_from(qemu.id()).unwrap();
    // Right after the exec the kernel may still show an empty command line.
    for _ in 0..100_000 {
        if std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty()) {
            break;
        }
        std::thread::yield_now();
    }
    std::fs::write(dir.path().join("web.pid"), format!("{pid}\n")).unwrap();
    let got = target_of(dir.path(), "web").unwrap();
    assert_eq!((got.pid, got.name.as_str()), (pid, "web"));
    assert_eq!(Some(got.start_ticks), start_ticks(pid));
    assert_eq!(target_of(dir.path(), "missing"), None);
    // A pid file whose process names another guest (or none) is no target.
    std::fs::write(dir.path().join("we.pid"), format!("{pid}\n")).unwrap();
    assert_eq!(target_of(dir.path(), "we"), None);
    let me = std::process::id();
    std::fs::write(dir.path().join("db.pid"), format!("{me}\n")).unwrap();
    assert_eq!(target_of(dir.path(), "db"), None);
    let _ = qemu.kill();
    let _ = qemu.wait();
}

#[test]
fn the_guest_name_must_match_whole() {
    assert!(names_guest(b"qemu\0-name\0guest=web,debug-threads=on\0", "web"));
    assert!(names_guest(b"qemu\0-name\0guest=web\0", "web"));
    assert!(!names_guest(
        b"qemu\0-name\0guest=web-2,debug-threads=on\0",
        "web"
    ));
    assert!(!names_guest(b"qemu\0-name\0xguest=web\0", "web"));
}

/// Time that follows tokio's (paused) clock.
struct TokioTime;

impl TimeSource for TokioTime {
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
    fn wall(&self) -> SystemTime {
        UNIX_EPOCH
    }
}

#[tokio::test(start_paused = true)]
async fn the_guard_kills_what_a_vanished_agent_armed_and_tells_the_next_agent() {
    let clock = Clock::from_source(Arc::new(TokioTime));
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("guard.sock");
    let server = tokio::spawn({
        let socket = socket.clone();
        let clock = clock.clone();
        async move { serve(&socket, clock).await }
    });
    let mut qemu = std::process::Command::new("sleep").arg("30").spawn().unwrap();
    let pid = i32::try_from(qemu.id()).unwrap();
    let target = Target {
        name: "ha-1".into(),
        pid,
        start_ticks: start_ticks(pid).unwrap(),
    };
    // Let the guard bind.
    let mut conn = None;
    for _ in 0..100 {
        tokio::task::yield_now().await;
        if let Ok(c) = UnixStream::connect(&socket).await {
            conn = Some(c);
            break;
        }
    }
    let conn = conn.unwrap();
    let (r, mut w) = conn.into_split();
    let mut r = BufReader::new(r);
    let hello: FromGuard = serde_json::from_str(&read_line(&mut r).await.unwrap().unwrap()).unwrap();
    assert_eq!(hello.fire_in_ms, None);
    let armed_at = tokio::time::Instant::now();
    let arm = ToGuard::Arm {
        fire_in_ms: 3_000,
        targets: vec![target],
    };
    w.write_all(&line(&arm).unwrap()).await.unwrap();
    // The agent vanishes (kill -9): the guard stays armed.
    drop((r, w));
    tokio::time::sleep_until(armed_at + ms(2_900)).await;
    assert!(qemu.try_wait().unwrap().is_none(), "killed before the deadline");
    // A restarted agent hears the remaining time.
    let c = UnixStream::connect(&socket).await.unwrap();
    let (r2, w2) = c.into_split();
    let mut r2 = BufReader::new(r2);
    let hello: FromGuard = serde_json::from_str(&read_line(&mut r2).await.unwrap().unwrap()).unwrap();
    assert_eq!(hello.fire_in_ms, Some(100));
    drop((r2, w2));
    tokio::time::sleep_until(armed_at + ms(3_100)).await;
    // The kill is a real signal to a real process: wait for it to land
    // (on the real clock: tokio's is paused; a loaded machine may take a
    // while to deliver and reap it).
    let real = Clock::system();
    let since = real.now();
    let mut status = None;
    while real.since(since) < Duration::from_secs(10) {
        status = qemu.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        std::thread::yield_now();
    }
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.and_then(|s| s.signal()),
        Some(9),
        "the HA QEMU was not killed"
    );
    // Nothing left to guard and no agent: it exits and removes its socket.
    tokio::time::sleep(ALONE_EXIT + ms(100)).await;
    assert!(server.is_finished(), "the guard did not exit");
    server.await.unwrap().unwrap();
    assert!(!socket.exists());
}

#[tokio::test(start_paused = true)]
async fn a_restarted_agent_takes_the_guards_deadline_and_arms_it_with_its_own() {
    use crate::lease::{FenceMode, State};
    use novacron_shared::lease::LeaseTiming;
    let clock = Clock::from_source(Arc::new(TokioTime));
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("guard.sock");
    tokio::spawn({
        let socket = socket.clone();
        let clock = clock.clone();
        async move { serve(&socket, clock).await }
    });
    for _ in 0..100 {
        tokio::task::yield_now().await;
        if socket.exists() {
            break;
        }
    }
    // The previous run armed it to fire in 2 s, then died.
    let c = UnixStream::connect(&socket).await.unwrap();
    let (r, mut w) = c.into_split();
    let mut r = BufReader::new(r);
    read_line(&mut r).await.unwrap();
    let arm = ToGuard::Arm {
        fire_in_ms: 2_000,
        targets: vec![],
    };
    w.write_all(&line(&arm).unwrap()).await.unwrap();
    drop((r, w));
    tokio::time::sleep(ms(10)).await;

    let t0 = clock.now();
    let timing = LeaseTiming::new(ms(5_000)); // F = 2 s
    let (lease, _driver) = LeaseHandle::new(timing, FenceMode::Kill, clock.clone(), None).unwrap();
    let (_stop, stop_rx) = watch::channel(false);
    let cfg = GuardConfig {
        socket: socket.clone(),
        program: None,
        pid_dir: Some(dir.path().to_path_buf()),
    };
    tokio::spawn(run_client(cfg, lease.clone(), clock.clone(), stop_rx));
    tokio::time::sleep(ms(10)).await;
    lease.note_observed(&[]);
    // The old deadline (fire − F/2 = 1 s from then) is now this run's.
    match lease.state() {
        State::NoLease { fence_at } => {
            assert_eq!(fence_at.saturating_duration_since(t0), ms(990), "{fence_at:?}")
        }
        s => panic!("{s:?}"),
    }
    // And the agent armed the guard with it, plus F/2.
    let c = UnixStream::connect(&socket).await.unwrap();
    let (r, _w) = c.into_split();
    let mut r = BufReader::new(r);
    let hello: FromGuard = serde_json::from_str(&read_line(&mut r).await.unwrap().unwrap()).unwrap();
    assert_eq!(hello.fire_in_ms, Some(1_980));
}

#[tokio::test(start_paused = true)]
async fn a_restarted_agent_keeps_the_previous_targets_until_it_has_looked() {
    use crate::lease::FenceMode;
    use novacron_shared::lease::LeaseTiming;
    let clock = Clock::from_source(Arc::new(TokioTime));
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("guard.sock");
    tokio::spawn({
        let socket = socket.clone();
        let clock = clock.clone();
        async move { serve(&socket, clock).await }
    });
    for _ in 0..100 {
        tokio::task::yield_now().await;
        if socket.exists() {
            break;
        }
    }
    let mut qemu = std::process::Command::new("sleep").arg("30").spawn().unwrap();
    let pid = i32::try_from(qemu.id()).unwrap();
    let c = UnixStream::connect(&socket).await.unwrap();
    let (r, mut w) = c.into_split();
    let mut r = BufReader::new(r);
    read_line(&mut r).await.unwrap();
    let arm = ToGuard::Arm {
        fire_in_ms: 2_000,
        targets: vec![Target {
            name: "ha-1".into(),
            pid,
            start_ticks: start_ticks(pid).unwrap(),
        }],
    };
    w.write_all(&line(&arm).unwrap()).await.unwrap();
    drop((r, w));
    tokio::time::sleep(ms(10)).await;
    // A new agent connects, but its VM loop has not looked yet (its view
    // of the running HA QEMUs is unknown, not empty).
    let (lease, _driver) =
        LeaseHandle::new(LeaseTiming::new(ms(5_000)), FenceMode::Kill, clock.clone(), None).unwrap();
    let (_stop, stop_rx) = watch::channel(false);
    let cfg = GuardConfig {
        socket: socket.clone(),
        program: None,
        pid_dir: Some(dir.path().to_path_buf()),
    };
    tokio::spawn(run_client(cfg, lease, clock.clone(), stop_rx));
    tokio::time::sleep(ms(2_100)).await;
    // A real signal to a real process: wait for it on the real clock (a
    // loaded machine may take a while to deliver and reap it).
    let real = Clock::system();
    let since = real.now();
    let status = loop {
        let status = qemu.try_wait().unwrap();
        if status.is_some() || real.since(since) >= Duration::from_secs(10) {
            break status;
        }
        std::thread::yield_now();
    };
    if status.is_none() {
        // Not killed: reap it before failing.
        let _ = qemu.kill();
        let _ = qemu.wait();
    }
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.and_then(|s| s.signal()),
        Some(9),
        "the previous run's target was dropped"
    );
}
