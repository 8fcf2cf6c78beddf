use super::*;
use novacron_shared::clock::Clock;

fn code(c: i32) -> Ran {
    Ran {
        exit: Exit::Code(c),
        output: String::new(),
    }
}

fn timed_out() -> Ran {
    Ran {
        exit: Exit::TimedOut,
        output: String::new(),
    }
}

const ON: i32 = 0;
const OFF: i32 = 2;

fn machine(retries: u32, retry: Option<Duration>) -> FenceMachine {
    FenceMachine::new(FencePolicy { retries, retry })
}

fn offs(n: &Next) -> bool {
    n.events.iter().any(|e| matches!(e, FenceEvent::Off { .. }))
}

#[test]
fn on_host_is_powered_off_then_confirmed_off_twice() {
    let (clock, _) = Clock::manual();
    let t = clock.now();
    let mut m = machine(2, None);
    let n = m.start();
    assert_eq!(n.run, Some(FenceAction::Status));
    assert_eq!(n.events, vec![FenceEvent::Started { attempt: 1 }]);
    assert_eq!(m.status(), FenceStatus::Fencing);
    let n = m.done(t, FenceAction::Status, &code(ON));
    assert_eq!(n.run, Some(FenceAction::Off));
    let n = m.done(t, FenceAction::Off, &code(0));
    assert_eq!(n.run, Some(FenceAction::Status), "first confirmation");
    let n = m.done(t, FenceAction::Status, &code(OFF));
    assert_eq!(n.run, Some(FenceAction::Status), "one more confirmation");
    assert_eq!(m.status(), FenceStatus::Fencing, "one off is not enough");
    let n = m.done(t, FenceAction::Status, &code(OFF));
    assert_eq!(n.run, None);
    assert!(n.events.contains(&FenceEvent::Off { already: false }));
    assert_eq!(m.status(), FenceStatus::Off);
    // Starting again does nothing: it is off.
    assert_eq!(m.start(), Next::default());
}

#[test]
fn already_off_counts_as_the_first_confirmation() {
    let (clock, _) = Clock::manual();
    let t = clock.now();
    let mut m = machine(2, None);
    m.start();
    let n = m.done(t, FenceAction::Status, &code(OFF));
    assert_eq!(n.run, Some(FenceAction::Status), "no off for a host already off");
    let n = m.done(t, FenceAction::Status, &code(OFF));
    assert!(n.events.contains(&FenceEvent::Off { already: true }));
    assert_eq!(m.phase(), &Phase::Off { at: t });
}

#[test]
fn a_lying_bmc_that_says_done_but_stays_on_fails_after_the_retries() {
    let (clock, manual) = Clock::manual();
    let mut m = machine(1, Some(Duration::from_secs(5)));
    m.start();
    for attempt in 1..=2 {
        let t = clock.now();
        assert_eq!(
            m.done(t, FenceAction::Status, &code(ON)).run,
            Some(FenceAction::Off)
        );
        assert_eq!(
            m.done(t, FenceAction::Off, &code(0)).run,
            Some(FenceAction::Status)
        );
        let n = m.done(t, FenceAction::Status, &code(ON));
        if attempt == 1 {
            assert_eq!(n.run, Some(FenceAction::Status), "the retry starts at once");
            assert!(n.events.contains(&FenceEvent::Started { attempt: 2 }));
            assert!(
                matches!(&n.events[1], FenceEvent::AttemptFailed { error } if error.contains("still on"))
            );
        } else {
            assert_eq!(n.run, None);
            assert!(matches!(&n.events[1], FenceEvent::Failed { error } if error.contains("still on")));
        }
        manual.advance(Duration::from_millis(10));
    }
    assert_eq!(m.status(), FenceStatus::Failed);
    assert_eq!(m.last_error(), Some("still on after off"));
    // Never silent, never stuck: a new round at the retry.
    let failed_at = clock.now() - Duration::from_millis(10);
    assert_eq!(m.next_wakeup(), Some(failed_at + Duration::from_secs(5)));
    assert_eq!(m.poll(failed_at + Duration::from_secs(4)), Next::default());
    let n = m.poll(failed_at + Duration::from_secs(5));
    assert_eq!(n.run, Some(FenceAction::Status));
    assert_eq!(n.events, vec![FenceEvent::Started { attempt: 1 }]);
}

#[test]
fn timeouts_and_unknown_statuses_fail_the_attempt_and_without_retry_it_stays_failed() {
    let (clock, _) = Clock::manual();
    let t = clock.now();
    let mut m = machine(2, None);
    m.start();
    // A timed-out status, an unknown exit, a failed off: three attempts.
    let n = m.done(t, FenceAction::Status, &timed_out());
    assert_eq!(n.run, Some(FenceAction::Status));
    let n = m.done(t, FenceAction::Status, &code(1));
    assert_eq!(n.run, Some(FenceAction::Status));
    assert_eq!(
        m.done(t, FenceAction::Status, &code(ON)).run,
        Some(FenceAction::Off)
    );
    let n = m.done(t, FenceAction::Off, &timed_out());
    assert_eq!(n.run, None);
    assert!(matches!(n.events.last(), Some(FenceEvent::Failed { error }) if error.contains("off failed")));
    assert_eq!(m.status(), FenceStatus::Failed);
    assert_eq!(m.next_wakeup(), None, "no retry: the caller falls back");
    assert_eq!(m.poll(t + Duration::from_secs(3600)), Next::default());
}

#[test]
fn a_slow_command_result_is_awaited_and_stray_results_are_ignored() {
    let (clock, manual) = Clock::manual();
    let mut m = machine(0, None);
    m.start();
    // Nothing times out inside the machine: the runner kills at the
    // timeout and reports it; a slow but successful answer counts.
    manual.advance(Duration::from_secs(9));
    assert_eq!(m.status(), FenceStatus::Fencing);
    // An answer to a command it did not ask for changes nothing.
    assert_eq!(m.done(clock.now(), FenceAction::Off, &code(0)), Next::default());
    assert_eq!(m.phase(), &Phase::Checking);
    let n = m.done(clock.now(), FenceAction::Status, &code(OFF));
    assert_eq!(n.run, Some(FenceAction::Status));
    let n = m.done(clock.now(), FenceAction::Status, &code(OFF));
    assert!(offs(&n));
    // Reset (host back): idle, and a new fence can start.
    m.reset();
    assert_eq!(m.status(), FenceStatus::Idle);
    assert_eq!(m.start().run, Some(FenceAction::Status));
}

#[test]
fn a_confirmation_that_turns_unknown_restarts_the_attempt() {
    let (clock, _) = Clock::manual();
    let t = clock.now();
    let mut m = machine(1, None);
    m.start();
    m.done(t, FenceAction::Status, &code(OFF));
    let n = m.done(t, FenceAction::Status, &timed_out());
    assert!(!offs(&n));
    assert_eq!(n.run, Some(FenceAction::Status));
    assert_eq!(m.phase(), &Phase::Checking, "both confirmations again");
}

fn script(dir: &std::path::Path, name: &str, body: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap_or_else(|e| panic!("{e}"));
    p.display().to_string()
}

#[tokio::test]
async fn the_runner_reports_exit_codes_and_output() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = script(
        dir.path(),
        "f",
        "echo \"fence $1 $2\"; echo oops >&2; case $2 in status) exit 2;; off) exit 0;; *) exit 7;; esac",
    );
    let cmd = FenceCommand {
        argv: vec![s, "{host}".into(), "{action}".into()],
        hosts: BTreeMap::new(),
        timeout: Duration::from_secs(20),
    };
    let r = run(&cmd.argv_for("h1", FenceAction::Status), cmd.timeout).await;
    assert_eq!(r.exit, Exit::Code(2));
    assert_eq!(Power::of(&r), Power::Off);
    assert!(
        r.output.contains("fence h1 status") && r.output.contains("oops"),
        "{r:?}"
    );
    assert_eq!(r.describe(), "exit 2: fence h1 status");
    let r = run(&cmd.argv_for("h1", FenceAction::Off), cmd.timeout).await;
    assert_eq!(r.exit, Exit::Code(0));
    let r = run(&cmd.argv_for("h1", FenceAction::On), cmd.timeout).await;
    assert_eq!(Power::of(&r), Power::Unknown);
    assert_eq!(r.exit, Exit::Code(7));
}

#[tokio::test]
async fn the_runner_kills_a_hanging_command_and_its_children_at_the_timeout() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let pidfile = dir.path().join("child.pid");
    let s = script(
        dir.path(),
        "hang",
        &format!("echo started; sleep 300 & echo $! > {}; wait", pidfile.display()),
    );
    let r = run(&[s], Duration::from_millis(500)).await;
    assert_eq!(r.exit, Exit::TimedOut);
    assert_eq!(Power::of(&r), Power::Unknown);
    assert!(r.output.contains("started"), "{r:?}");
    // The grandchild went with its group.
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap_or_else(|e| panic!("{e}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut gone = false;
    for _ in 0..100 {
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false);
        if !alive {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "the sleep the script started was killed too");
}

#[tokio::test]
async fn the_runner_bounds_the_output_and_reports_a_missing_program() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = script(dir.path(), "loud", "yes fence | head -c 100000; exit 0");
    let r = run(&[s], Duration::from_secs(20)).await;
    assert_eq!(r.exit, Exit::Code(0));
    assert_eq!(r.output.len(), MAX_OUTPUT);
    let r = run(&["/nonexistent/fence".into()], Duration::from_secs(1)).await;
    assert!(
        matches!(&r.exit, Exit::Error(e) if e.contains("cannot start")),
        "{r:?}"
    );
    let r = run(&[], Duration::from_secs(1)).await;
    assert!(matches!(r.exit, Exit::Error(_)));
}
