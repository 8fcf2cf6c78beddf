//! The HA lease's driver: owns the pure [`Lease`] behind a handle that the
//! link (heartbeats, acks, sessions, lease terms) and the VM loop (may an
//! HA VM start now?) share, ticks it at [`Lease::next_timer`], and performs
//! [`Action::FenceHaVms`] through the hypervisor. It runs as a task of its
//! own, not in the session loop: the lease must run out and fence while
//! the link is down.
//!
//! Fencing stops every NovaCron domain that is HA, by its domain metadata
//! or by the last desired state received (kill: libvirt destroy; or
//! shutdown, then destroy after the grace), until none runs, then reports
//! [`Event::HaVmsGone`]. It never touches a domain NovaCron did not define.
//!
//! Every lease action is logged once, with `at_ms` (Unix ms of the
//! [`Clock`]'s wall clock) so tests can order events across processes; the
//! messages are the constants in [`msg`].
//!
//! Terms: [`terms_to_timing`] validates what the server sends (refused
//! terms leave the old ones in force); accepted terms are applied to the
//! lease at once and saved ([`save_terms`]) so the next start counts its
//! no-lease deadline with the saved lease length ([`initial_timing`]) and
//! keeps the saved isolation response ([`LeaseHandle::resume_saved`]).
//!
//! The peer witness (`crate::witness`) talks to the lease through this
//! handle only: it watches [`LeaseViews`] ([`LeaseHandle::watch_views`])
//! and hands back its confirmation ([`LeaseHandle::set_confirmation`]);
//! the fence guard watches [`GuardView`], whose deadline follows the
//! confirmation and which stands down under keep-running.

use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use novacron_shared::clock::Clock;
use novacron_shared::ids::VmId;
use novacron_shared::lease::{LeaseTiming, DEFAULT_FENCE_TIME, DEFAULT_LEASE};
use novacron_shared::protocol::{FenceStyle, LeaseTerms, VmState};
use novacron_shared::witness::LeaseView;
use tokio::sync::{mpsc, watch, Notify};

use crate::error::HvError;
use crate::hypervisor::Hypervisor;
use crate::lease::{Action, Event, FenceMode, GuardDuty, Lease, LeaseError, State};
use crate::reconcile::Gate;
use crate::vmops::ObservedVm;

/// The log messages of lease actions (each with an `at_ms` field).
pub mod msg {
    /// A lease began.
    pub const ACQUIRED: &str = "HA lease acquired";
    /// No renewal for a third of the lease.
    pub const RENEWING: &str = "HA lease renewing";
    /// Renewals resumed.
    pub const RENEWED: &str = "HA lease renewed";
    /// The lease (or a previous run's) ended.
    pub const LOST: &str = "HA lease lost";
    /// Fencing began.
    pub const FENCING: &str = "HA fencing started";
    /// One HA VM was stopped by the fence.
    pub const VM_KILLED: &str = "HA VM killed";
    /// Every HA VM is gone.
    pub const FENCED: &str = "HA fence done";
    /// The lease ended and the HA VMs stay (keep-running, or the peer
    /// witness confirms).
    pub const KEPT: &str = "HA lease lost; HA VMs kept running";
    /// New terms are in force.
    pub const TERMS: &str = "HA lease terms applied";
}

/// Shortest lease the agent accepts.
pub const MIN_LEASE: Duration = Duration::from_secs(1);
/// Longest lease the agent accepts.
pub const MAX_LEASE: Duration = Duration::from_secs(600);
/// Shortest fence time the agent accepts.
pub const MIN_FENCE_TIME: Duration = Duration::from_millis(100);
/// Longest fence time the agent accepts.
pub const MAX_FENCE_TIME: Duration = Duration::from_secs(60);
/// Pause between fence attempts when libvirt failed.
pub const FENCE_RETRY: Duration = Duration::from_millis(200);
/// At most one warning per this interval for refused terms and failing
/// fence attempts.
pub const WARN_EVERY: Duration = Duration::from_secs(30);

/// What the HA driver refuses or fails at.
#[derive(Debug, thiserror::Error)]
pub enum HaError {
    /// Lease terms outside the accepted ranges.
    #[error("lease terms refused: {0}")]
    TermsRefused(String),
    /// The lease refused the terms.
    #[error("lease terms refused")]
    TermsLease(#[source] LeaseError),
    /// The saved terms could not be written.
    #[error("cannot save the lease terms to {path}")]
    SaveTerms {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Validates terms from the server: lease 1 s..=10 min, fence time
/// 100 ms..=60 s, a shutdown grace shorter than the fence time.
pub fn terms_to_timing(t: &LeaseTerms) -> Result<(LeaseTiming, FenceMode), HaError> {
    let lease = Duration::from_millis(u64::from(t.lease_ms));
    let fence_time = Duration::from_millis(u64::from(t.fence_time_ms));
    if !(MIN_LEASE..=MAX_LEASE).contains(&lease) {
        return Err(HaError::TermsRefused(format!(
            "lease {lease:?} is outside {MIN_LEASE:?}..={MAX_LEASE:?}"
        )));
    }
    if !(MIN_FENCE_TIME..=MAX_FENCE_TIME).contains(&fence_time) {
        return Err(HaError::TermsRefused(format!(
            "fence time {fence_time:?} is outside {MIN_FENCE_TIME:?}..={MAX_FENCE_TIME:?}"
        )));
    }
    let mode = match t.fence {
        FenceStyle::Kill => FenceMode::Kill,
        FenceStyle::ShutdownThenKill { grace_ms } => {
            let grace = Duration::from_millis(u64::from(grace_ms));
            if grace >= fence_time {
                return Err(HaError::TermsRefused(format!(
                    "shutdown grace {grace:?} is not shorter than the fence time {fence_time:?}"
                )));
            }
            FenceMode::ShutdownThenKill { grace }
        }
    };
    Ok((LeaseTiming { lease, fence_time }, mode))
}

/// The terms saved at `path`, if readable and valid.
pub fn load_terms(path: &Path) -> Option<LeaseTerms> {
    let text = std::fs::read_to_string(path).ok()?;
    let terms: LeaseTerms = serde_json::from_str(&text).ok()?;
    terms_to_timing(&terms).ok()?;
    Some(terms)
}

/// Saves terms at `path` (atomically).
pub fn save_terms(path: &Path, terms: &LeaseTerms) -> Result<(), HaError> {
    let save = |source| HaError::SaveTerms {
        path: path.display().to_string(),
        source,
    };
    let text = serde_json::to_string(terms).map_err(|e| save(std::io::Error::other(e)))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(save)?;
    }
    novacron_shared::files::write_private(path, text.as_bytes()).map_err(save)
}

/// The timing and mode an agent starts with: the saved terms, else
/// [`DEFAULT_LEASE`] and [`DEFAULT_FENCE_TIME`], killing.
pub fn initial_timing(saved: Option<&LeaseTerms>) -> (LeaseTiming, FenceMode) {
    saved.and_then(|t| terms_to_timing(t).ok()).unwrap_or((
        LeaseTiming {
            lease: DEFAULT_LEASE,
            fence_time: DEFAULT_FENCE_TIME,
        },
        FenceMode::Kill,
    ))
}

/// Lets one warning through per interval (pure: `now` comes in).
#[derive(Debug, Clone)]
pub struct WarnLimit {
    every: Duration,
    next: Option<Instant>,
    suppressed: u64,
}

impl WarnLimit {
    /// At most one warning per `every`.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            next: None,
            suppressed: 0,
        }
    }

    /// Whether to log now; when yes, how many were held back since.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if self.next.is_some_and(|n| now < n) {
            self.suppressed += 1;
            return None;
        }
        self.next = Some(now + self.every);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// What the fence acts on: the hypervisor in production, a model in tests.
pub trait Fencer: Clone + Send + Sync + 'static {
    /// The NovaCron domains that are HA (by metadata, or listed in
    /// `known`) and not off.
    fn running_ha(&self, known: Vec<VmId>) -> impl Future<Output = Result<Vec<VmId>, HvError>> + Send;
    /// Powers one off at once.
    fn kill(&self, vm: VmId) -> impl Future<Output = Result<(), HvError>> + Send;
    /// Shuts one down, powering it off after `grace`; whether it had to.
    fn shutdown(&self, vm: VmId, grace: Duration) -> impl Future<Output = Result<bool, HvError>> + Send;
}

impl Fencer for Hypervisor {
    async fn running_ha(&self, known: Vec<VmId>) -> Result<Vec<VmId>, HvError> {
        let (_, vms) = self.observe().await?;
        Ok(vms
            .iter()
            .filter(|o| !matches!(o.state, VmState::Stopped | VmState::Crashed))
            .filter_map(|o| o.meta.as_ref())
            .filter(|m| m.ha || known.contains(&m.vm))
            .map(|m| m.vm)
            .collect())
    }

    async fn kill(&self, vm: VmId) -> Result<(), HvError> {
        self.destroy(vm).await
    }

    async fn shutdown(&self, vm: VmId, grace: Duration) -> Result<bool, HvError> {
        Hypervisor::shutdown(self, vm, grace).await
    }
}

struct Inner {
    lease: Lease,
    /// HA VMs of the last desired state received (kept across sessions).
    ha_vms: HashSet<VmId>,
    terms_file: Option<PathBuf>,
    fence_tx: mpsc::UnboundedSender<FenceMode>,
    warn: WarnLimit,
    /// Bumped whenever HA VMs may have become startable.
    opened: watch::Sender<u64>,
    /// Running HA domains (names), as the VM loop last saw them; `None`
    /// before its first look.
    running_ha: Option<Vec<String>>,
    /// What the fence guard is told: the deadline, the running HA domains,
    /// whether to stand down; bumped when it changes.
    guard: watch::Sender<GuardView>,
    /// What the peer witness is told; bumped when it changes.
    views: watch::Sender<LeaseViews>,
}

/// What the fence guard needs: the deadline to arm (`None`: keep the last
/// one while fencing, or stand down), the running HA domains (`None` until
/// the VM loop first looked), and whether to stand down (the agent has
/// fenced, or keep-running is in force: no deadline to hold).
pub type GuardView = (Option<Instant>, Option<Vec<String>>, bool);

/// The lease as the peer witness needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseViews {
    /// For its own rounds ([`Lease::witness_view`]).
    pub rounds: LeaseView,
    /// What peers are told ([`Lease::peer_view`]).
    pub peers: LeaseView,
}

fn send_changed<T: PartialEq>(tx: &watch::Sender<T>, value: T) {
    tx.send_if_modified(|v| {
        if *v == value {
            false
        } else {
            *v = value;
            true
        }
    });
}

impl Inner {
    fn publish(&mut self) {
        let (deadline, stand_down) = match self.lease.guard_duty() {
            GuardDuty::Arm { deadline } => (Some(deadline), false),
            GuardDuty::Keep => (None, false),
            GuardDuty::StandDown => (None, true),
        };
        send_changed(&self.guard, (deadline, self.running_ha.clone(), stand_down));
        send_changed(
            &self.views,
            LeaseViews {
                rounds: self.lease.witness_view(),
                peers: self.lease.peer_view(),
            },
        );
    }
}

/// The shared handle on the agent's lease.
#[derive(Clone)]
pub struct LeaseHandle {
    inner: Arc<Mutex<Inner>>,
    wake: Arc<Notify>,
    clock: Clock,
}

impl std::fmt::Debug for LeaseHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseHandle")
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

/// The driver's half: receives the fence requests.
#[derive(Debug)]
pub struct LeaseDriver {
    fences: mpsc::UnboundedReceiver<FenceMode>,
}

impl LeaseHandle {
    /// A handle on a lease that starts now (no lease yet); accepted terms
    /// are saved to `terms_file` when given.
    pub fn new(
        timing: LeaseTiming,
        mode: FenceMode,
        clock: Clock,
        terms_file: Option<PathBuf>,
    ) -> Result<(Self, LeaseDriver), LeaseError> {
        let lease = Lease::new(timing, mode, clock.now())?;
        let (fence_tx, fences) = mpsc::unbounded_channel();
        let h = Self {
            inner: Arc::new(Mutex::new(Inner {
                lease,
                ha_vms: HashSet::new(),
                terms_file,
                fence_tx,
                warn: WarnLimit::new(WARN_EVERY),
                opened: watch::channel(0).0,
                running_ha: None,
                guard: watch::channel((None, None, false)).0,
                views: watch::channel(LeaseViews {
                    rounds: LeaseView::Idle,
                    peers: LeaseView::Idle,
                })
                .0,
            })),
            wake: Arc::new(Notify::new()),
            clock,
        };
        Ok((h, LeaseDriver { fences }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Steps the lease with `event` now.
    pub fn step(&self, event: Event) {
        let now = self.clock.now();
        let mut g = self.lock();
        self.step_locked(&mut g, now, event);
        drop(g);
        self.wake.notify_one();
    }

    fn step_locked(&self, g: &mut Inner, now: Instant, event: Event) {
        match g.lease.step(now, event) {
            Ok(actions) => self.perform(g, now, &actions),
            Err(e) => tracing::error!(error = %e, ?event, "HA lease event refused"),
        }
        g.publish();
    }

    /// Steps the lease with [`Event::HeartbeatSent`] now and returns what
    /// that heartbeat reports: the lease left at that instant, ms (`None`
    /// without a lease).
    pub fn heartbeat_sent(&self, seq: u64) -> Option<u32> {
        let now = self.clock.now();
        let mut g = self.lock();
        self.step_locked(&mut g, now, Event::HeartbeatSent { seq });
        let left = g.lease.lease_left(now);
        drop(g);
        self.wake.notify_one();
        left.map(|d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX))
    }

    /// The peer witness's confirmation (see [`Lease::set_confirmation`]).
    pub fn set_confirmation(&self, until: Option<Instant>) {
        let now = self.clock.now();
        let mut g = self.lock();
        let actions = g.lease.set_confirmation(now, until);
        self.perform(&mut g, now, &actions);
        g.publish();
        drop(g);
        self.wake.notify_one();
    }

    /// The agent started with `saved` terms: a previous run may have held
    /// a lease under them (the witness defends the no-lease deadline), and
    /// their isolation response is in force until the server says again.
    pub fn resume_saved(&self, saved: &LeaseTerms) {
        let now = self.clock.now();
        let mut g = self.lock();
        g.lease.assume_prior_run();
        let actions = g.lease.set_isolation(now, saved.isolation);
        self.perform(&mut g, now, &actions);
        g.publish();
        drop(g);
        self.wake.notify_one();
    }

    /// Changes whenever what the peer witness needs changes.
    pub fn watch_views(&self) -> watch::Receiver<LeaseViews> {
        self.lock().views.subscribe()
    }

    /// What the peer witness needs now.
    pub fn views(&self) -> LeaseViews {
        *self.lock().views.borrow()
    }

    /// The isolation response in force.
    pub fn isolation(&self) -> novacron_shared::protocol::IsolationResponse {
        self.lock().lease.isolation()
    }

    /// Applies terms from the server (validated; refused ones leave the old
    /// terms in force) and saves them; failures are logged here, with a
    /// rate limit (the server can send terms at will).
    pub fn apply_terms(&self, terms: &LeaseTerms) -> Result<(), HaError> {
        let now = self.clock.now();
        let mut g = self.lock();
        let applied = terms_to_timing(terms).and_then(|(timing, mode)| {
            g.lease
                .set_timing(now, timing, mode)
                .map_err(HaError::TermsLease)
                .map(|a| (timing, mode, a))
        });
        let (timing, mode, mut actions) = match applied {
            Ok(x) => x,
            Err(e) => {
                if let Some(held) = g.warn.allow(now) {
                    tracing::warn!(error = %e, ?terms, suppressed = held, "the server's lease terms are refused; the old ones stay in force");
                }
                return Err(e);
            }
        };
        actions.extend(g.lease.set_isolation(now, terms.isolation));
        tracing::info!(at_ms = self.clock.unix_ms(), lease = ?timing.lease, fence_time = ?timing.fence_time, ?mode, isolation = ?terms.isolation, "{}", msg::TERMS);
        self.perform(&mut g, now, &actions);
        g.publish();
        let file = g.terms_file.clone();
        drop(g);
        self.wake.notify_one();
        // Written (and synced) outside the lock: heartbeats do not wait.
        let saved = match &file {
            Some(path) => save_terms(path, terms),
            None => Ok(()),
        };
        if let Err(e) = &saved {
            if let Some(held) = self.lock().warn.allow(now) {
                tracing::warn!(error = %e, suppressed = held, "the lease terms are in force but not saved; the next start uses the previous ones");
            }
        }
        saved
    }

    /// Changes whenever HA VMs may have become startable (a lease acquired,
    /// renewals resumed): the VM loop plans again at once instead of at its
    /// next resync.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.lock().opened.subscribe()
    }

    /// Brings the no-lease deadline forward to `at` (a previous run's
    /// deadline, from the fence guard).
    pub fn limit_no_lease(&self, at: Instant) {
        let mut g = self.lock();
        g.lease.limit_no_lease(at);
        g.publish();
        drop(g);
        self.wake.notify_one();
    }

    /// Records which HA domains run now (HA by metadata or by the last
    /// desired state), for the fence guard.
    pub fn note_observed(&self, vms: &[ObservedVm]) {
        let mut g = self.lock();
        let mut names: Vec<String> = vms
            .iter()
            .filter(|o| !matches!(o.state, VmState::Stopped | VmState::Crashed))
            .filter(|o| o.meta.as_ref().is_some_and(|m| m.ha || g.ha_vms.contains(&m.vm)))
            .map(|o| o.name.clone())
            .collect();
        names.sort();
        g.running_ha = Some(names);
        g.publish();
    }

    /// Changes whenever what the fence guard needs changes.
    pub fn watch_guard(&self) -> watch::Receiver<GuardView> {
        self.lock().guard.subscribe()
    }

    /// What the fence guard needs now.
    pub fn guard_view(&self) -> GuardView {
        self.lock().guard.borrow().clone()
    }

    /// Whether this host has HA VMs that a lost lease would fence: HA
    /// domains seen running (or not looked at yet), or HA VMs in the last
    /// desired state.
    pub fn has_ha_vms(&self) -> bool {
        let g = self.lock();
        g.running_ha.as_ref().is_none_or(|n| !n.is_empty()) || !g.ha_vms.is_empty()
    }

    /// Records the HA VMs of a desired state just received.
    pub fn set_ha_vms(&self, vms: impl IntoIterator<Item = VmId>) {
        self.lock().ha_vms = vms.into_iter().collect();
    }

    /// Whether an HA VM may be started at `now`.
    pub fn may_start_ha(&self, now: Instant) -> bool {
        self.lock().lease.may_start_ha(now)
    }

    /// The reconciler's gate at `now`: open only while an HA VM may start.
    pub fn gate(&self, now: Instant) -> Gate {
        let g = self.lock();
        if g.lease.may_start_ha(now) {
            Gate::open()
        } else {
            Gate::closed(g.lease.state().name())
        }
    }

    /// Where the lease stands.
    pub fn state(&self) -> State {
        self.lock().lease.state()
    }

    /// The timing in force.
    pub fn timing(&self) -> LeaseTiming {
        self.lock().lease.timing()
    }

    fn next_timer(&self) -> Option<Instant> {
        self.lock().lease.next_timer()
    }

    fn ha_vms(&self) -> Vec<VmId> {
        self.lock().ha_vms.iter().copied().collect()
    }

    fn perform(&self, g: &mut Inner, now: Instant, actions: &[Action]) {
        let at_ms = self.clock.unix_ms();
        let left =
            |d: Instant| u64::try_from(d.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX);
        for a in actions {
            match *a {
                Action::LeaseAcquired { deadline } => {
                    tracing::info!(at_ms, ends_in_ms = left(deadline), "{}", msg::ACQUIRED);
                    g.opened.send_modify(|n| *n += 1);
                }
                Action::Renewing { deadline } => {
                    tracing::warn!(at_ms, ends_in_ms = left(deadline), "{}", msg::RENEWING)
                }
                Action::Renewed { deadline } => {
                    tracing::info!(at_ms, ends_in_ms = left(deadline), "{}", msg::RENEWED);
                    g.opened.send_modify(|n| *n += 1);
                }
                Action::LeaseLost { .. } => tracing::warn!(at_ms, "{}", msg::LOST),
                Action::FenceHaVms { mode } => {
                    if g.fence_tx.send(mode).is_err() {
                        tracing::error!(at_ms, "the HA driver is gone; cannot fence");
                    }
                }
                Action::HaVmsKept { until } => match until {
                    Some(u) => tracing::warn!(
                        at_ms,
                        confirmed_for_ms = left(u),
                        "{} (the peer witness confirms the server is lost to much of the fleet)",
                        msg::KEPT
                    ),
                    None => tracing::warn!(at_ms, "{} (isolation response: keep-running)", msg::KEPT),
                },
                Action::AckIgnored { seq, why } => tracing::debug!(seq, ?why, "heartbeat ack ignored"),
            }
        }
    }
}

/// Runs the lease driver until `shutdown`: ticks the lease at its timers and
/// fences through `fencer` when it asks.
pub async fn run(
    handle: LeaseHandle,
    mut driver: LeaseDriver,
    fencer: impl Fencer,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let next = handle.next_timer();
        let now = handle.clock.now();
        let timer = async {
            match next {
                Some(t) => tokio::time::sleep(t.saturating_duration_since(now)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(mode) = driver.fences.recv() => {
                fence(&handle, &fencer, mode).await;
                handle.step(Event::HaVmsGone);
            }
            _ = timer => handle.step(Event::Tick),
            _ = handle.wake.notified() => {}
            r = shutdown.changed() => {
                if r.is_err() || *shutdown.borrow() {
                    return;
                }
            }
        }
    }
}

/// Stops every running HA VM now; returns once none runs (the driver
/// then reports [`Event::HaVmsGone`]).
pub async fn fence(handle: &LeaseHandle, fencer: &impl Fencer, mode: FenceMode) {
    let clock = &handle.clock;
    tracing::warn!(at_ms = clock.unix_ms(), ?mode, "{}", msg::FENCING);
    let mut warn = WarnLimit::new(WARN_EVERY);
    let mut stopped = 0usize;
    let mut rounds = 0u32;
    loop {
        let vms = match fencer.running_ha(handle.ha_vms()).await {
            Ok(v) => v,
            Err(e) => {
                if let Some(held) = warn.allow(clock.now()) {
                    tracing::error!(error = %e, suppressed = held, "fencing: cannot list the HA VMs; retrying");
                }
                tokio::time::sleep(FENCE_RETRY).await;
                continue;
            }
        };
        if vms.is_empty() {
            break;
        }
        rounds += 1;
        let mut failed = false;
        match mode {
            FenceMode::Kill => {
                for vm in vms {
                    match fencer.kill(vm).await {
                        Ok(()) => {
                            stopped += 1;
                            tracing::warn!(at_ms = clock.unix_ms(), vm = %vm, how = "destroy", "{}", msg::VM_KILLED);
                        }
                        Err(e) => {
                            failed = true;
                            if let Some(held) = warn.allow(clock.now()) {
                                tracing::error!(vm = %vm, error = %e, suppressed = held, "fencing: cannot kill an HA VM; retrying");
                            }
                        }
                    }
                }
            }
            FenceMode::ShutdownThenKill { grace } => {
                let mut set = tokio::task::JoinSet::new();
                for vm in vms {
                    let f = fencer.clone();
                    set.spawn(async move { (vm, f.shutdown(vm, grace).await) });
                }
                while let Some(r) = set.join_next().await {
                    match r {
                        Ok((vm, Ok(forced))) => {
                            stopped += 1;
                            let how = if forced { "destroy after grace" } else { "shutdown" };
                            tracing::warn!(at_ms = clock.unix_ms(), vm = %vm, how, "{}", msg::VM_KILLED);
                        }
                        Ok((vm, Err(e))) => {
                            failed = true;
                            if let Some(held) = warn.allow(clock.now()) {
                                tracing::error!(vm = %vm, error = %e, suppressed = held, "fencing: cannot stop an HA VM; retrying");
                            }
                        }
                        Err(e) => {
                            failed = true;
                            tracing::error!(error = %e, "fencing task failed; retrying");
                        }
                    }
                }
            }
        }
        // A failure, or VMs still running after a round that stopped them
        // all: wait a little before the next round.
        if failed || rounds > 1 {
            tokio::time::sleep(FENCE_RETRY).await;
        }
    }
    tracing::warn!(at_ms = clock.unix_ms(), stopped, "{}", msg::FENCED);
}

#[cfg(test)]
mod tests;
