//! The HA driver's hardware fences: one [`FenceMachine`] per host being
//! fenced, its commands run as tasks whose results come back on a channel,
//! every step an HA event. A host confirmed off is reported to the lease
//! view at once ([`Fleet::fence_confirmed_off`]).

use std::collections::BTreeMap;
use std::time::Instant;

use novacron_shared::ids::HostId;
use novacron_shared::protocol::IsolationResponse;
use tokio::sync::mpsc;

use crate::config::HaConfig;
use crate::fleet::Fleet;
use crate::ha::fence::{
    FenceAction, FenceCommand, FenceEvent, FenceMachine, FencePolicy, FenceStatus, Next, Ran,
};
use crate::ha::lease::HostState;

/// A command's result, back from its task.
pub(super) type Done = (HostId, FenceAction, Ran);

/// The fences the driver runs.
pub(super) struct Fences {
    command: Option<FenceCommand>,
    policy: FencePolicy,
    machines: BTreeMap<HostId, FenceMachine>,
    names: BTreeMap<HostId, String>,
    tx: mpsc::UnboundedSender<Done>,
}

impl Fences {
    /// The fences of `config` (none without `[ha.fence]`), and where their
    /// results arrive.
    pub(super) fn new(config: &HaConfig) -> (Self, mpsc::UnboundedReceiver<Done>) {
        let (tx, rx) = mpsc::unbounded_channel();
        // Retried only where nothing else guards: keep-running without
        // disk locks. Elsewhere a failed fence falls back to the lease
        // wait (self-fence) or the disk lock.
        let retry = (config.isolation == IsolationResponse::KeepRunning && !config.disk_locks)
            .then_some(config.retry);
        let f = config.hardware_fence();
        let fences = Self {
            command: f.map(|f| f.command()),
            policy: FencePolicy {
                retries: f.map_or(0, |f| f.retries),
                retry,
            },
            machines: BTreeMap::new(),
            names: BTreeMap::new(),
            tx,
        };
        (fences, rx)
    }

    /// `host`'s fence state and last error.
    pub(super) fn status(&self, host: HostId) -> (FenceStatus, Option<String>) {
        self.machines.get(&host).map_or((FenceStatus::Idle, None), |m| {
            (m.status(), m.last_error().map(str::to_string))
        })
    }

    /// Every fence not idle, by host.
    pub(super) fn all(&self) -> BTreeMap<HostId, (FenceStatus, Option<String>)> {
        self.machines.keys().map(|h| (*h, self.status(*h))).collect()
    }

    /// When a failed fence is retried next.
    pub(super) fn next_wakeup(&self) -> Option<Instant> {
        self.machines.values().filter_map(FenceMachine::next_wakeup).min()
    }

    /// Forgets the fences of hosts whose lease neither expired nor was
    /// fenced (heard again, in maintenance, or gone).
    pub(super) fn settle(&mut self, fleet: &Fleet, hosts: &[(HostId, HostState, String)]) {
        for (id, _, name) in hosts {
            self.names.insert(*id, name.clone());
        }
        let keep = |h: &HostId| {
            hosts
                .iter()
                .any(|(id, s, _)| id == h && matches!(s, HostState::LeaseExpired | HostState::Fenced))
        };
        let gone: Vec<HostId> = self.machines.keys().filter(|h| !keep(h)).copied().collect();
        for h in gone {
            if let Some(m) = self.machines.remove(&h) {
                if m.busy() {
                    fleet.bus.ha(
                        Some(h),
                        None,
                        format!("hardware fence of host {h} abandoned: the host is back"),
                    );
                }
            }
        }
    }

    /// Starts fencing `host`.
    pub(super) fn start(&mut self, fleet: &Fleet, host: HostId) {
        if self.command.is_none() {
            return;
        }
        let policy = self.policy;
        let m = self
            .machines
            .entry(host)
            .or_insert_with(|| FenceMachine::new(policy));
        let next = m.start();
        if !next.events.is_empty() {
            tracing::warn!(host = %host, "HA: hardware fence started");
        }
        self.carry_out(fleet, host, next);
    }

    /// Retries failed fences whose time came.
    pub(super) fn poll(&mut self, fleet: &Fleet, now: Instant) {
        let due: Vec<(HostId, Next)> = self
            .machines
            .iter_mut()
            .map(|(h, m)| (*h, m.poll(now)))
            .filter(|(_, n)| n.run.is_some())
            .collect();
        for (h, n) in due {
            self.carry_out(fleet, h, n);
        }
    }

    /// A command's result arrived at `now`.
    pub(super) fn done(&mut self, fleet: &Fleet, now: Instant, (host, action, ran): Done) {
        let Some(m) = self.machines.get_mut(&host) else {
            return;
        };
        let next = m.done(now, action, &ran);
        let off = matches!(m.status(), FenceStatus::Off);
        self.carry_out(fleet, host, next);
        if off {
            if let Err(e) = fleet.fence_confirmed_off(host, now) {
                tracing::error!(host = %host, error = %e, "HA: host confirmed off by its fence is not known to the lease view");
            }
        }
    }

    fn carry_out(&self, fleet: &Fleet, host: HostId, next: Next) {
        let name = self.names.get(&host).cloned().unwrap_or_else(|| host.to_string());
        for e in next.events {
            let text = match e {
                FenceEvent::Started { attempt: 1 } => {
                    format!(
                        "hardware fence of host {name} started: powering it off before its HA VMs restart"
                    )
                }
                FenceEvent::Started { attempt } => {
                    format!("hardware fence of host {name}: attempt {attempt}")
                }
                FenceEvent::Step { action, what } => {
                    format!("hardware fence of host {name}: {} → {what}", action.as_str())
                }
                FenceEvent::Off { already: true } => {
                    format!("hardware fence: host {name} confirmed off (it was off already)")
                }
                FenceEvent::Off { already: false } => {
                    format!("hardware fence: host {name} powered off and confirmed off")
                }
                FenceEvent::AttemptFailed { error } => {
                    format!("hardware fence of host {name}: attempt failed ({error}); trying again")
                }
                FenceEvent::Failed { error } => {
                    let then = match self.policy.retry {
                        Some(r) => format!(
                            "it stays fencing and is retried in {}",
                            novacron_shared::duration::format(r)
                        ),
                        None => "falling back to the lease wait or the disk lock".into(),
                    };
                    tracing::error!(host = %host, error = %error, "HA: hardware fence failed");
                    format!("ALERT: hardware fence of host {name} failed ({error}); {then}")
                }
            };
            fleet.bus.ha(Some(host), None, text);
        }
        if let (Some(action), Some(cmd)) = (next.run, self.command.as_ref()) {
            let argv = cmd.argv_for(&name, action);
            let timeout = cmd.timeout;
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let ran = crate::ha::fence::run(&argv, timeout).await;
                let _ = tx.send((host, action, ran));
            });
        }
    }
}
