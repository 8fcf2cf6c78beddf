//! Tests of the lease driver under tokio's paused time, on a model host.

use super::*;
use novacron_shared::clock::TimeSource;
use novacron_shared::protocol::IsolationResponse;
use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

/// Time that follows tokio's (paused) clock.
struct TokioTime {
    base: tokio::time::Instant,
}

impl TimeSource for TokioTime {
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
    fn wall(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_767_225_600) + (tokio::time::Instant::now() - self.base)
    }
}

fn tokio_clock() -> Clock {
    Clock::from_source(Arc::new(TokioTime {
        base: tokio::time::Instant::now(),
    }))
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// One stop by the fence: the VM, when, how.
type Stop = (VmId, tokio::time::Instant, &'static str);

/// A model host: domains (HA by metadata?, running?), and when each was
/// stopped by the fence.
#[derive(Clone, Default)]
struct Model {
    vms: Arc<Mutex<HashMap<VmId, (bool, bool)>>>,
    stops: Arc<Mutex<Vec<Stop>>>,
    /// Calls that fail before libvirt "comes back".
    fail_first: Arc<Mutex<u32>>,
}

impl Model {
    fn with(vms: &[(u128, bool, bool)]) -> Self {
        let m = Model::default();
        for &(id, ha, running) in vms {
            lock(&m.vms).insert(VmId(id), (ha, running));
        }
        m
    }
    fn stops(&self) -> Vec<Stop> {
        lock(&self.stops).clone()
    }
    fn running(&self, id: u128) -> bool {
        lock(&self.vms).get(&VmId(id)).is_some_and(|v| v.1)
    }
    fn fail(&self) -> Result<(), HvError> {
        let mut f = lock(&self.fail_first);
        if *f > 0 {
            *f -= 1;
            return Err(HvError::Gone);
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Fencer for Model {
    async fn running_ha(&self, known: Vec<VmId>) -> Result<Vec<VmId>, HvError> {
        self.fail()?;
        let mut v: Vec<VmId> = lock(&self.vms)
            .iter()
            .filter(|(id, (ha, running))| *running && (*ha || known.contains(id)))
            .map(|(id, _)| *id)
            .collect();
        v.sort_by_key(|id| id.0);
        Ok(v)
    }
    async fn kill(&self, vm: VmId) -> Result<(), HvError> {
        self.fail()?;
        if let Some(v) = lock(&self.vms).get_mut(&vm) {
            v.1 = false;
        }
        lock(&self.stops).push((vm, tokio::time::Instant::now(), "kill"));
        Ok(())
    }
    async fn shutdown(&self, vm: VmId, grace: Duration) -> Result<bool, HvError> {
        self.fail()?;
        // The model's guests ignore the power button: killed after the grace.
        tokio::time::sleep(grace).await;
        if let Some(v) = lock(&self.vms).get_mut(&vm) {
            v.1 = false;
        }
        lock(&self.stops).push((vm, tokio::time::Instant::now(), "shutdown"));
        Ok(true)
    }
}

const L: Duration = Duration::from_secs(6);

struct Rig {
    t0: tokio::time::Instant,
    lease: LeaseHandle,
    model: Model,
    _stop: watch::Sender<bool>,
}

fn rig(model: Model, mode: FenceMode) -> Rig {
    let t0 = tokio::time::Instant::now();
    let (lease, driver) = LeaseHandle::new(LeaseTiming::new(L), mode, tokio_clock(), None).unwrap();
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(run(lease.clone(), driver, model.clone(), stop_rx));
    Rig {
        t0,
        lease,
        model,
        _stop: stop,
    }
}

async fn at(t: tokio::time::Instant) {
    tokio::time::sleep_until(t).await;
}

/// Heartbeat 1 sent at t0 + 1 s, acked 50 ms later: the lease ends at
/// t0 + 7 s (sent + L).
async fn leased(r: &Rig) {
    r.lease.step(Event::SessionStarted);
    at(r.t0 + ms(1_000)).await;
    r.lease.step(Event::HeartbeatSent { seq: 1 });
    at(r.t0 + ms(1_050)).await;
    r.lease.step(Event::AckReceived { seq: 1 });
    assert!(r.lease.may_start_ha(r.lease.clock.now()));
}

#[tokio::test(start_paused = true)]
async fn the_fence_kills_ha_vms_exactly_at_the_deadline_and_not_before() {
    let r = rig(
        Model::with(&[(1, true, true), (2, false, true), (3, true, false)]),
        FenceMode::Kill,
    );
    leased(&r).await;
    let deadline = r.t0 + ms(1_000) + L;
    at(deadline - ms(1)).await;
    assert!(r.model.stops().is_empty(), "fenced before the deadline");
    assert!(matches!(r.lease.state(), State::Renewing { .. }));
    at(deadline + ms(100)).await;
    assert_eq!(r.model.stops(), vec![(VmId(1), deadline, "kill")]);
    assert!(r.model.running(2), "a non-HA VM was touched");
    assert!(
        matches!(r.lease.state(), State::Fenced { .. }),
        "{:?}",
        r.lease.state()
    );
}

#[tokio::test(start_paused = true)]
async fn a_renewal_just_before_the_deadline_prevents_the_fence() {
    let r = rig(Model::with(&[(1, true, true)]), FenceMode::Kill);
    leased(&r).await;
    let deadline = r.t0 + ms(1_000) + L;
    // Heartbeat 2 goes out 100 ms before the deadline; its ack arrives
    // 1 ms before it.
    at(deadline - ms(100)).await;
    r.lease.step(Event::HeartbeatSent { seq: 2 });
    at(deadline - ms(1)).await;
    r.lease.step(Event::AckReceived { seq: 2 });
    at(deadline + ms(1_000)).await;
    assert!(r.model.stops().is_empty(), "{:?}", r.model.stops());
    // The renewed lease ends L after heartbeat 2 was sent.
    let next = deadline - ms(100) + L;
    at(next - ms(1)).await;
    assert!(r.model.stops().is_empty());
    at(next + ms(10)).await;
    assert_eq!(r.model.stops(), vec![(VmId(1), next, "kill")]);
}

#[tokio::test(start_paused = true)]
async fn an_ack_arriving_after_the_deadline_does_not_save_the_lease() {
    let r = rig(Model::with(&[(1, true, true)]), FenceMode::Kill);
    leased(&r).await;
    let deadline = r.t0 + ms(1_000) + L;
    at(deadline - ms(500)).await;
    r.lease.step(Event::HeartbeatSent { seq: 2 });
    at(deadline).await;
    at(deadline + ms(1)).await;
    r.lease.step(Event::AckReceived { seq: 2 });
    at(deadline + ms(100)).await;
    assert_eq!(r.model.stops(), vec![(VmId(1), deadline, "kill")]);
}

#[tokio::test(start_paused = true)]
async fn new_terms_mid_lease_move_the_fence() {
    let r = rig(Model::with(&[(1, true, true)]), FenceMode::Kill);
    leased(&r).await;
    at(r.t0 + ms(2_000)).await;
    let terms = LeaseTerms {
        lease_ms: 3_000,
        fence_time_ms: 1_000,
        fence: FenceStyle::Kill,
        isolation: IsolationResponse::SelfFence,
    };
    r.lease.apply_terms(&terms).unwrap();
    // 3 s from heartbeat 1's send, not from the terms' arrival.
    let deadline = r.t0 + ms(1_000) + ms(3_000);
    at(deadline - ms(1)).await;
    assert!(r.model.stops().is_empty());
    at(deadline + ms(50)).await;
    assert_eq!(r.model.stops(), vec![(VmId(1), deadline, "kill")]);
}

#[tokio::test(start_paused = true)]
async fn refused_terms_keep_the_old_ones() {
    let r = rig(Model::default(), FenceMode::Kill);
    for bad in [
        (999, 1_000, FenceStyle::Kill),
        (600_001, 1_000, FenceStyle::Kill),
        (5_000, 99, FenceStyle::Kill),
        (5_000, 60_001, FenceStyle::Kill),
        (5_000, 1_000, FenceStyle::ShutdownThenKill { grace_ms: 1_000 }),
    ] {
        let terms = LeaseTerms {
            lease_ms: bad.0,
            fence_time_ms: bad.1,
            fence: bad.2,
            isolation: IsolationResponse::SelfFence,
        };
        let e = r.lease.apply_terms(&terms).unwrap_err();
        assert!(matches!(e, HaError::TermsRefused(_)), "{bad:?}: {e}");
        assert_eq!(r.lease.timing(), LeaseTiming::new(L));
    }
    let ok = LeaseTerms {
        lease_ms: 1_000,
        fence_time_ms: 100,
        fence: FenceStyle::ShutdownThenKill { grace_ms: 99 },
        isolation: IsolationResponse::SelfFence,
    };
    r.lease.apply_terms(&ok).unwrap();
    assert_eq!(r.lease.timing().lease, ms(1_000));
}

#[tokio::test(start_paused = true)]
async fn without_a_lease_since_start_the_fence_comes_at_start_plus_l() {
    let r = rig(Model::with(&[(1, true, true), (2, true, true)]), FenceMode::Kill);
    at(r.t0 + L - ms(1)).await;
    assert!(r.model.stops().is_empty());
    at(r.t0 + L + ms(10)).await;
    let stops = r.model.stops();
    assert_eq!(stops.len(), 2, "{stops:?}");
    assert!(stops.iter().all(|s| s.1 == r.t0 + L), "{stops:?}");
}

#[tokio::test(start_paused = true)]
async fn vms_ha_by_the_desired_state_are_fenced_and_libvirt_failures_are_retried() {
    let model = Model::with(&[(1, false, true), (2, false, true)]);
    *lock(&model.fail_first) = 3;
    let r = rig(model, FenceMode::Kill);
    // VM 1 is HA by the last desired state only (an older definition).
    r.lease.set_ha_vms([VmId(1)]);
    leased(&r).await;
    at(r.t0 + ms(1_000) + L + FENCE_RETRY * 4).await;
    let stops = r.model.stops();
    assert_eq!(stops.iter().map(|s| s.0).collect::<Vec<_>>(), vec![VmId(1)]);
    assert!(r.model.running(2));
    assert!(matches!(r.lease.state(), State::Fenced { .. }));
}

#[tokio::test(start_paused = true)]
async fn shutdown_then_kill_waits_the_grace_in_parallel_and_fences_only_then() {
    let grace = ms(500);
    let r = rig(
        Model::with(&[(1, true, true), (2, true, true)]),
        FenceMode::ShutdownThenKill { grace },
    );
    leased(&r).await;
    let deadline = r.t0 + ms(1_000) + L;
    at(deadline + grace - ms(1)).await;
    assert!(r.model.stops().is_empty());
    assert!(matches!(r.lease.state(), State::SelfFencing { .. }));
    at(deadline + grace + ms(10)).await;
    let stops = r.model.stops();
    assert_eq!(stops.len(), 2);
    assert!(stops.iter().all(|s| s.1 == deadline + grace), "{stops:?}");
    assert!(matches!(r.lease.state(), State::Fenced { .. }));
}

#[tokio::test(start_paused = true)]
async fn the_vm_loop_hears_when_ha_vms_may_start() {
    let r = rig(Model::default(), FenceMode::Kill);
    let mut opened = r.lease.subscribe();
    assert!(!opened.has_changed().unwrap());
    leased(&r).await;
    assert!(opened.has_changed().unwrap(), "a lease acquired");
    opened.borrow_and_update();
    // Renewing, then renewed: told again.
    at(r.t0 + ms(3_100)).await;
    assert!(!r.lease.may_start_ha(r.lease.clock.now()));
    r.lease.step(Event::HeartbeatSent { seq: 2 });
    r.lease.step(Event::AckReceived { seq: 2 });
    assert!(opened.has_changed().unwrap(), "renewals resumed");
}

#[tokio::test(start_paused = true)]
async fn after_the_fence_a_new_ack_of_a_later_heartbeat_acquires_a_lease() {
    let r = rig(Model::with(&[(1, true, true)]), FenceMode::Kill);
    leased(&r).await;
    at(r.t0 + ms(8_000)).await;
    assert!(matches!(r.lease.state(), State::Fenced { .. }));
    r.lease.step(Event::SessionStarted);
    r.lease.step(Event::HeartbeatSent { seq: 1 });
    at(r.t0 + ms(8_010)).await;
    r.lease.step(Event::AckReceived { seq: 1 });
    assert!(matches!(r.lease.state(), State::Leased { .. }));
    assert!(r.lease.may_start_ha(r.lease.clock.now()));
}

#[test]
fn terms_are_saved_and_loaded_and_bad_files_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/lease-terms.json");
    assert_eq!(load_terms(&path), None);
    assert_eq!(
        initial_timing(None),
        (LeaseTiming::new(DEFAULT_LEASE), FenceMode::Kill)
    );
    let t = LeaseTerms {
        lease_ms: 8_000,
        fence_time_ms: 1_500,
        fence: FenceStyle::ShutdownThenKill { grace_ms: 700 },
        isolation: IsolationResponse::SelfFence,
    };
    save_terms(&path, &t).unwrap();
    assert_eq!(load_terms(&path), Some(t));
    assert_eq!(
        initial_timing(Some(&t)),
        (
            LeaseTiming {
                lease: ms(8_000),
                fence_time: ms(1_500)
            },
            FenceMode::ShutdownThenKill { grace: ms(700) }
        )
    );
    std::fs::write(&path, "{\"lease_ms\": 5}").unwrap();
    assert_eq!(load_terms(&path), None);
    let bad = LeaseTerms { lease_ms: 5, ..t };
    save_terms(&path, &bad).unwrap();
    assert_eq!(
        load_terms(&path),
        None,
        "out-of-range terms are not used at start"
    );
}

#[test]
fn accepted_terms_are_written_through_the_handle() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lease-terms.json");
    let (clock, _) = Clock::manual();
    let (h, _driver) =
        LeaseHandle::new(LeaseTiming::new(L), FenceMode::Kill, clock, Some(path.clone())).unwrap();
    let t = LeaseTerms {
        lease_ms: 4_000,
        fence_time_ms: 1_000,
        fence: FenceStyle::Kill,
        isolation: IsolationResponse::SelfFence,
    };
    h.apply_terms(&t).unwrap();
    assert_eq!(load_terms(&path), Some(t));
    let bad = LeaseTerms { lease_ms: 0, ..t };
    assert!(h.apply_terms(&bad).is_err());
    assert_eq!(load_terms(&path), Some(t), "refused terms are not saved");
}

#[test]
fn warnings_are_rate_limited() {
    let (clock, time) = Clock::manual();
    let mut w = WarnLimit::new(ms(1_000));
    assert_eq!(w.allow(clock.now()), Some(0));
    assert_eq!(w.allow(clock.now()), None);
    time.advance(ms(999));
    assert_eq!(w.allow(clock.now()), None);
    time.advance(ms(1));
    assert_eq!(w.allow(clock.now()), Some(2));
}

fn terms(isolation: IsolationResponse) -> LeaseTerms {
    LeaseTerms {
        lease_ms: 6_000,
        fence_time_ms: 2_000,
        fence: FenceStyle::Kill,
        isolation,
    }
}

#[tokio::test(start_paused = true)]
async fn keep_running_stands_the_fence_guard_down_and_self_fence_rearms_it() {
    let r = rig(Model::with(&[(1, true, true)]), FenceMode::Kill);
    leased(&r).await;
    let deadline = (r.t0 + ms(1_000) + L).into_std();
    r.lease.note_observed(&[]);
    assert_eq!(r.lease.guard_view(), (Some(deadline), Some(vec![]), false));
    r.lease
        .apply_terms(&terms(IsolationResponse::KeepRunning))
        .unwrap();
    assert_eq!(
        r.lease.guard_view(),
        (None, Some(vec![]), true),
        "no deadline to hold"
    );
    // Long past the lease end: nothing fenced, nothing startable.
    at(r.t0 + ms(60_000)).await;
    assert!(r.model.stops().is_empty(), "{:?}", r.model.stops());
    assert!(
        matches!(r.lease.state(), State::Lapsed { .. }),
        "{:?}",
        r.lease.state()
    );
    assert!(!r.lease.may_start_ha(r.lease.clock.now()));
    assert_eq!(r.lease.views().peers, LeaseView::Lost { since: deadline });
    // Back to self-fence: the lease is long gone, so the fence runs now.
    r.lease.apply_terms(&terms(IsolationResponse::SelfFence)).unwrap();
    at(r.t0 + ms(60_100)).await;
    assert_eq!(r.model.stops(), vec![(VmId(1), r.t0 + ms(60_000), "kill")]);
    assert!(r.lease.guard_view().2, "fenced: stand down");
}

#[tokio::test(start_paused = true)]
async fn a_renewal_under_self_fence_rearms_the_guard_after_keep_running() {
    let r = rig(Model::with(&[(1, true, true)]), FenceMode::Kill);
    leased(&r).await;
    r.lease
        .apply_terms(&terms(IsolationResponse::KeepRunning))
        .unwrap();
    r.lease.apply_terms(&terms(IsolationResponse::SelfFence)).unwrap();
    let deadline = (r.t0 + ms(1_000) + L).into_std();
    assert_eq!(r.lease.guard_view().0, Some(deadline));
    assert!(!r.lease.guard_view().2);
}

#[tokio::test(start_paused = true)]
async fn saved_keep_running_terms_hold_across_a_restart() {
    let r = rig(Model::with(&[(1, true, true)]), FenceMode::Kill);
    r.lease.resume_saved(&terms(IsolationResponse::KeepRunning));
    assert_eq!(r.lease.isolation(), IsolationResponse::KeepRunning);
    // The witness defends the no-lease deadline; peers hear nothing.
    let fence_at = (r.t0 + L).into_std();
    assert_eq!(r.lease.views().rounds, LeaseView::Leased { until: fence_at });
    assert_eq!(r.lease.views().peers, LeaseView::Idle);
    at(r.t0 + L + ms(10_000)).await;
    assert!(r.model.stops().is_empty(), "a previous run's HA VMs are kept");
    assert!(!r.lease.may_start_ha(r.lease.clock.now()));
}

#[tokio::test(start_paused = true)]
async fn heartbeats_report_the_lease_left_and_a_confirmation_moves_the_fence() {
    let r = rig(Model::with(&[(1, true, true)]), FenceMode::Kill);
    r.lease.step(Event::SessionStarted);
    assert_eq!(r.lease.heartbeat_sent(1), None);
    r.lease.step(Event::AckReceived { seq: 1 });
    at(r.t0 + ms(2_000)).await;
    assert_eq!(r.lease.heartbeat_sent(2), Some(4_000));
    // A confirmation until 1 s past the lease end: the fence waits for it.
    let end = r.t0 + L;
    r.lease.set_confirmation(Some((end + ms(1_000)).into_std()));
    assert_eq!(r.lease.guard_view().0, Some((end + ms(1_000)).into_std()));
    at(end + ms(999)).await;
    assert!(r.model.stops().is_empty());
    at(end + ms(1_100)).await;
    assert_eq!(r.model.stops(), vec![(VmId(1), end + ms(1_000), "kill")]);
}
