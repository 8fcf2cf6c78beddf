//! The agent's VM loop: carries out the reconciler's plans on libvirt,
//! pushes lifecycle events and fresh inventories to the server, runs
//! one-off commands off the session loop, and notices libvirtd restarts.
//!
//! Nothing here acts before the server has sent a desired state: an agent
//! that starts while the server is away leaves every VM as it is. An HA VM
//! is started (or resumed) only when the HA lease allows it, asked when
//! the plan is made and again right before the start.
//!
//! Time comes from the [`Clock`] the wiring passes in; when a round is due
//! (event debounce, periodic resync) is decided by [`Triggers`], which takes
//! `now` as an argument.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use novacron_shared::clock::Clock;
use novacron_shared::ids::OpId;
use novacron_shared::protocol::{
    AgentMessage, CommandKind, CommandOutcome, CommandProgress, CommandResult, DesiredState, DriftKind,
    ReconcileReport, VmEvent,
};
use tokio::sync::{mpsc, watch};

use crate::error::HvError;
use crate::events::LifecycleEvent;
use crate::ha::LeaseHandle;
use crate::hypervisor::Hypervisor;
use crate::reconcile::{Action, ActionError, Gate, Reconciler};
use crate::vmops::ObservedVm;

/// Settings for the VM loop.
#[derive(Debug, Clone)]
pub struct ConvergeConfig {
    /// How long a guest gets to shut down before it is powered off.
    pub shutdown_grace: Duration,
    /// How often libvirt is checked and the state re-read without events.
    pub resync_every: Duration,
    /// How often the libvirt connection is checked.
    pub ping_every: Duration,
    /// The HA lease that gates starting HA VMs; `None`: HA VMs are never
    /// started.
    pub lease: Option<LeaseHandle>,
    /// The loop's watchdog heartbeat; `None`: unwatched.
    pub beat: Option<std::sync::Arc<novacron_shared::notify::Beat>>,
}

impl Default for ConvergeConfig {
    fn default() -> Self {
        Self {
            shutdown_grace: Duration::from_secs(120),
            resync_every: Duration::from_secs(30),
            ping_every: Duration::from_secs(2),
            lease: None,
            beat: None,
        }
    }
}

/// Most passes in a row before waiting for the next trigger.
const MAX_PASSES: usize = 8;
/// Events within this window are coalesced into one inventory.
const EVENT_DEBOUNCE: Duration = Duration::from_millis(100);

/// Queues a message for the server; when the queue is full (a long
/// disconnect) the message is dropped: the next session starts with a
/// fresh inventory and report anyway.
fn post(outbox: &mpsc::Sender<AgentMessage>, msg: AgentMessage) {
    if outbox.try_send(msg).is_err() {
        tracing::debug!("server queue full; message dropped (state is resent on reconnect)");
    }
}

/// When the next reconcile round is due: after a burst of libvirt events
/// has settled (a start emits several; they make one round), and at least
/// every `resync_every` even without events. A new desired state never
/// waits for the event window (the loop starts a round at once). Pure:
/// `now` comes in.
#[derive(Debug, Clone)]
pub struct Triggers {
    resync_every: Duration,
    last_round: Instant,
    settle_at: Option<Instant>,
}

impl Triggers {
    /// Triggers for a loop whose last round was at `now`.
    pub fn new(resync_every: Duration, now: Instant) -> Self {
        Self {
            resync_every,
            last_round: now,
            settle_at: None,
        }
    }

    /// A libvirt event arrived: a round follows once the burst settles (the
    /// window opens with the burst's first event and is not pushed back).
    pub fn event(&mut self, now: Instant) {
        self.settle_at.get_or_insert(now + EVENT_DEBOUNCE);
    }

    /// When the current burst settles, if one is open.
    pub fn settle_at(&self) -> Option<Instant> {
        self.settle_at
    }

    /// Whether a periodic resync is due at `now`.
    pub fn resync_due(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_round) >= self.resync_every
    }

    /// A round ran at `now`: it covers every event so far.
    pub fn ran(&mut self, now: Instant) {
        self.last_round = now;
        self.settle_at = None;
    }
}

/// Runs the VM loop until `shutdown`, reading the time from `clock`.
pub async fn run(
    hv: Hypervisor,
    cfg: ConvergeConfig,
    clock: Clock,
    mut desired: watch::Receiver<Option<DesiredState>>,
    mut events: mpsc::UnboundedReceiver<LifecycleEvent>,
    outbox: mpsc::Sender<AgentMessage>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut rec = Reconciler::default();
    let mut ping = tokio::time::interval(cfg.ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_connects = None;
    let mut triggers = Triggers::new(cfg.resync_every, clock.now());
    let mut dirty = true;
    let mut lease_opened = cfg.lease.as_ref().map(LeaseHandle::subscribe);
    loop {
        if let Some(b) = &cfg.beat {
            b.beat().await;
        }
        let opened = async {
            match lease_opened.as_mut() {
                Some(rx) => {
                    if rx.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        };
        let settle = triggers
            .settle_at()
            .map(|t| t.saturating_duration_since(clock.now()));
        let settled = async {
            match settle {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = settled => {
                // The burst's window is over: one round for all of it.
                dirty = true;
            }
            _ = opened => {
                // A lease: HA VMs waiting for it may start now.
                dirty = true;
            }
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    return;
                }
            }
            r = desired.changed() => {
                if r.is_err() {
                    return;
                }
                dirty = true;
            }
            Some(ev) = events.recv() => {
                forward(&outbox, &ev, clock.unix_ms());
                triggers.event(clock.now());
            }
            _ = ping.tick() => {
                match hv.ping().await {
                    Ok(c) => {
                        if last_connects.is_some_and(|l| l != c) {
                            tracing::info!("libvirt reconnected; re-reading the host");
                            dirty = true;
                        }
                        last_connects = Some(c);
                    }
                    Err(e) => tracing::warn!(error = %e, "libvirt unavailable"),
                }
                if triggers.resync_due(clock.now()) {
                    dirty = true;
                }
            }
        }
        if dirty {
            let want = desired.borrow().clone();
            tracing::debug!(
                generation = want.as_ref().map(|w| w.generation),
                "reconcile round"
            );
            dirty = !pass(&hv, &cfg, &clock, &mut rec, want.as_ref(), &outbox).await;
            triggers.ran(clock.now());
        }
    }
}

fn forward(outbox: &mpsc::Sender<AgentMessage>, ev: &LifecycleEvent, at_ms: u64) {
    tracing::info!(vm = %ev.name, event = ev.event_name(), detail = ev.detail_name(), "libvirt event");
    post(
        outbox,
        AgentMessage::VmEvent(VmEvent {
            name: ev.name.clone(),
            uuid: ev.uuid.clone(),
            event: ev.event_name().into(),
            detail: ev.detail_name().into(),
            state: ev.state(),
            at_ms,
        }),
    );
}

/// One reconcile round (several plan/act passes); sends the inventory and,
/// with a desired state, a report. Returns whether it finished its work
/// (false: retry on the next tick).
async fn pass(
    hv: &Hypervisor,
    cfg: &ConvergeConfig,
    clock: &Clock,
    rec: &mut Reconciler,
    want: Option<&DesiredState>,
    outbox: &mpsc::Sender<AgentMessage>,
) -> bool {
    let mut done = Vec::new();
    let mut observed: Vec<ObservedVm>;
    let mut passes = 0;
    let plan = loop {
        let (capacity, vms) = match hv.observe().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the host; will retry");
                return false;
            }
        };
        observed = vms;
        if let Some(l) = &cfg.lease {
            l.note_observed(&observed);
        }
        let Some(want) = want else {
            post(
                outbox,
                AgentMessage::Inventory(hv.to_inventory(capacity, &observed)),
            );
            return true;
        };
        // VMs in a live migration are libvirt's to move: left out of the
        // plan on both sides.
        let ids: Vec<_> = want.vms.iter().map(|v| v.id).collect();
        let skip = hv.hands_off(&ids, &want.migrating);
        let skip_uuids: HashSet<String> = skip.iter().map(|id| id.to_string()).collect();
        let wanted: Vec<_> = want
            .vms
            .iter()
            .filter(|v| !skip.contains(&v.id))
            .cloned()
            .collect();
        let seen: Vec<_> = observed
            .iter()
            .filter(|o| !skip_uuids.contains(&o.uuid))
            .map(ObservedVm::to_observed)
            .collect();
        let gate = |now| match &cfg.lease {
            Some(l) => l.gate(now),
            None => Gate::closed("no lease configured"),
        };
        rec.learn_epochs(&wanted, &seen);
        let plan = rec.plan_with(clock.now(), &wanted, &want.departed, &seen, gate(clock.now()));
        tracing::debug!(?plan, "plan");
        passes += 1;
        if plan.actions.is_empty() || passes > MAX_PASSES {
            post(
                outbox,
                AgentMessage::Inventory(hv.to_inventory(capacity, &observed)),
            );
            break plan;
        }
        for a in plan.actions {
            let name = a.vm_name().to_string();
            let line = a.to_string();
            // The lease is asked again at the moment of starting: the plan
            // may be older than the lease's end.
            if let Action::Start(t) | Action::Resume(t) = &a {
                let g = gate(clock.now());
                if !g.ha_allowed && wanted.iter().any(|v| v.id == t.id && v.spec.ha) {
                    tracing::info!(action = %line, lease = g.lease, "not started: waiting for the HA lease");
                    continue;
                }
            }
            let r = act(hv, cfg, a).await;
            match &r {
                Ok(()) => {
                    tracing::info!(action = %line, "reconciled");
                    done.push(line);
                }
                Err(e) if e.kind == DriftKind::DiskLockHeld => {
                    tracing::info!(action = %line, error = %e.message, "not started: a disk is locked by another host; retrying");
                    done.push(format!("{line}: waiting: {}", e.message));
                }
                Err(e) => {
                    tracing::warn!(action = %line, error = %e.message, "reconcile action failed");
                    done.push(format!("{line}: failed: {}", e.message));
                }
            }
            rec.record(clock.now(), &name, r);
        }
    };
    let Some(want) = want else { return true };
    let names: HashSet<&str> = want
        .vms
        .iter()
        .map(|v| v.spec.name.as_str())
        .chain(observed.iter().map(|o| o.name.as_str()))
        .collect();
    rec.forget_except(&names);
    let converged = plan.converged();
    if converged && rec.converged_generation != Some(want.generation) {
        tracing::info!(
            generation = want.generation,
            vms = want.vms.len(),
            "converged on the desired state"
        );
    }
    rec.converged_generation = converged.then_some(want.generation);
    if !done.is_empty() || !converged {
        tracing::info!(
            generation = want.generation,
            converged,
            drift = plan.drift.len(),
            "reconcile pass"
        );
    }
    post(
        outbox,
        AgentMessage::Reconciled(ReconcileReport {
            generation: want.generation,
            converged,
            actions: done,
            drift: plan.drift,
        }),
    );
    true
}

async fn act(hv: &Hypervisor, cfg: &ConvergeConfig, a: Action) -> Result<(), ActionError> {
    let r = match a {
        Action::Define(vm) | Action::Redefine(vm) => hv.define(vm).await.map(|_| ()),
        Action::Start(t) => hv.start_vm(t.id).await,
        Action::Suspend(t) => hv.suspend(t.id).await,
        Action::Resume(t) => hv.resume(t.id).await,
        Action::Shutdown(t) => hv.shutdown(t.id, cfg.shutdown_grace).await.map(|_| ()),
        Action::Remove { uuid, .. } => hv.remove(uuid).await.map(|_| ()),
        Action::Retag(vm) => hv.retag(vm).await,
        Action::Depart { uuid, keep_disks, .. } => hv.depart(uuid, keep_disks).await.map(|_| ()),
    };
    r.map_err(|e| ActionError {
        kind: match e {
            HvError::DiskLocked(_) => DriftKind::DiskLockHeld,
            _ => DriftKind::Failed,
        },
        message: e.to_string(),
    })
}

/// Outcomes of recent commands, so a retried op id is answered without
/// running it twice.
#[derive(Debug, Default)]
pub struct OpCache {
    done: HashMap<OpId, CommandOutcome>,
    order: VecDeque<OpId>,
    running: HashSet<OpId>,
}

/// How many finished operations are remembered.
const OP_CACHE: usize = 4096;

/// What to do with an incoming command.
#[derive(Debug, PartialEq, Eq)]
pub enum OpStart {
    /// Run it.
    Run,
    /// It is running; its result will follow.
    Running,
    /// It already ran; here is its outcome again.
    Done(CommandOutcome),
}

impl OpCache {
    /// Claims an op id.
    pub fn begin(&mut self, op: OpId) -> OpStart {
        if let Some(o) = self.done.get(&op) {
            return OpStart::Done(o.clone());
        }
        if !self.running.insert(op) {
            return OpStart::Running;
        }
        OpStart::Run
    }

    /// Records an outcome.
    pub fn finish(&mut self, op: OpId, outcome: CommandOutcome) {
        self.running.remove(&op);
        if self.done.insert(op, outcome).is_none() {
            self.order.push_back(op);
        }
        while self.order.len() > OP_CACHE {
            if let Some(old) = self.order.pop_front() {
                self.done.remove(&old);
            }
        }
    }
}

/// Runs a command off the session loop and posts its result (and a fresh
/// inventory) when done. A repeated op id is not run again.
pub fn spawn_command(
    hv: Hypervisor,
    cache: Arc<Mutex<OpCache>>,
    op_id: OpId,
    kind: CommandKind,
    outbox: mpsc::Sender<AgentMessage>,
) {
    let start = cache.lock().unwrap_or_else(|p| p.into_inner()).begin(op_id);
    match start {
        OpStart::Running => return,
        OpStart::Done(outcome) => {
            post(
                &outbox,
                AgentMessage::CommandResult(CommandResult { op_id, outcome }),
            );
            return;
        }
        OpStart::Run => {}
    }
    tokio::spawn(async move {
        let r = match kind {
            CommandKind::RefreshInventory => Ok(()),
            CommandKind::Reboot { vm } => hv.reboot(vm).await,
            CommandKind::SnapshotCreate { vm, name } => hv.snapshot_create(vm, name).await,
            CommandKind::SnapshotRevert { vm, name } => hv.snapshot_revert(vm, name).await,
            CommandKind::SnapshotDelete { vm, name } => hv.snapshot_delete(vm, name).await,
            CommandKind::ResizeDisk { vm, disk, size_mib } => hv.resize_disk(vm, disk, size_mib).await,
            CommandKind::Migrate {
                vm,
                dest_uri,
                bandwidth_mib_s,
                timeout_secs,
            } => {
                let (tx, mut rx) = mpsc::unbounded_channel::<crate::migrate::Progress>();
                let forward = {
                    let outbox = outbox.clone();
                    tokio::spawn(async move {
                        while let Some((percent, message)) = rx.recv().await {
                            post(
                                &outbox,
                                AgentMessage::Progress(CommandProgress {
                                    op_id,
                                    percent,
                                    message,
                                }),
                            );
                        }
                    })
                };
                let req = crate::migrate::MigrateRequest {
                    vm,
                    dest_uri,
                    bandwidth_mib_s,
                    timeout: Duration::from_secs(u64::from(timeout_secs.max(1))),
                };
                let r = hv.migrate(req, tx).await;
                let _ = forward.await;
                r
            }
        };
        let outcome = match r {
            Ok(()) => CommandOutcome::Done,
            Err(e) => CommandOutcome::Failed {
                message: e.to_string(),
            },
        };
        tracing::info!(op_id = %op_id, ?outcome, "command finished");
        if let Ok(inv) = hv.inventory().await {
            post(&outbox, AgentMessage::Inventory(inv));
        }
        cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .finish(op_id, outcome.clone());
        post(
            &outbox,
            AgentMessage::CommandResult(CommandResult { op_id, outcome }),
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_burst_makes_one_round_after_the_debounce_window() {
        let (clock, time) = Clock::manual();
        let mut t = Triggers::new(Duration::from_secs(30), clock.now());
        assert_eq!(t.settle_at(), None);
        let first = clock.now();
        t.event(clock.now());
        time.advance(Duration::from_millis(60));
        // Later events of the burst do not push the round back.
        t.event(clock.now());
        assert_eq!(t.settle_at(), Some(first + EVENT_DEBOUNCE));
        time.advance(EVENT_DEBOUNCE);
        t.ran(clock.now());
        assert_eq!(t.settle_at(), None, "the round covered the burst");
        t.event(clock.now());
        assert_eq!(t.settle_at(), Some(clock.now() + EVENT_DEBOUNCE));
    }

    #[test]
    fn a_resync_is_due_after_the_interval_since_the_last_round() {
        let (clock, time) = Clock::manual();
        let every = Duration::from_secs(30);
        let mut t = Triggers::new(every, clock.now());
        time.advance(every - Duration::from_millis(1));
        assert!(!t.resync_due(clock.now()));
        time.advance(Duration::from_millis(1));
        assert!(t.resync_due(clock.now()));
        t.ran(clock.now());
        assert!(!t.resync_due(clock.now()));
        time.advance(every);
        assert!(t.resync_due(clock.now()));
    }

    #[test]
    fn an_op_id_runs_once() {
        let mut c = OpCache::default();
        assert_eq!(c.begin(OpId(1)), OpStart::Run);
        assert_eq!(c.begin(OpId(1)), OpStart::Running);
        c.finish(OpId(1), CommandOutcome::Done);
        assert_eq!(c.begin(OpId(1)), OpStart::Done(CommandOutcome::Done));
        assert_eq!(c.begin(OpId(2)), OpStart::Run);
    }

    #[test]
    fn the_cache_is_bounded() {
        let mut c = OpCache::default();
        for i in 0..(OP_CACHE as u128 + 10) {
            assert_eq!(c.begin(OpId(i)), OpStart::Run);
            c.finish(OpId(i), CommandOutcome::Done);
        }
        assert_eq!(c.done.len(), OP_CACHE);
        assert_eq!(c.begin(OpId(0)), OpStart::Run, "the oldest was forgotten");
    }
}
