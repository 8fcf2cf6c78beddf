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
    /// The fences of `config` (none without `[ha.hardware_fence]`), and where their
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
    /// fenced (heard again, in maintenance, or gone) — unless `off` has
    /// gone out already: the host is going down whatever it said last, so
    /// its fence runs on to the confirmation (then it counts as fenced
    /// until heard again) instead of leaving a powered-off host unfenced.
    pub(super) fn settle(&mut self, fleet: &Fleet, hosts: &[(HostId, HostState, String)]) {
        for (id, _, name) in hosts {
            self.names.insert(*id, name.clone());
        }
        let keep = |h: &HostId, m: &FenceMachine| {
            m.committed()
                || hosts
                    .iter()
                    .any(|(id, s, _)| id == h && matches!(s, HostState::LeaseExpired | HostState::Fenced))
        };
        let gone: Vec<HostId> = self
            .machines
            .iter()
            .filter(|(h, m)| !keep(h, m))
            .map(|(h, _)| *h)
            .collect();
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use novacron_shared::clock::{Clock, ManualClock};

    use super::*;
    use crate::config::HardwareFence;
    use crate::store::{HostRecord, HostState as StoredState, Store};

    const H1: HostId = HostId(1);

    fn fleet(dir: &std::path::Path, script: &str, ha: HaConfig) -> (Arc<Fleet>, Arc<ManualClock>) {
        let store = Store::open(&dir.join("db.redb")).unwrap_or_else(|e| panic!("{e}"));
        store
            .put_hosts(&[HostRecord {
                id: H1,
                name: "hv-1".into(),
                addresses: vec![],
                capacity: Default::default(),
                agent_version: "0".into(),
                first_seen_ms: 0,
                last_seen_ms: 0,
                state: StoredState::Offline,
                cert_serial: "1".into(),
                cert_not_after: 0,
            }])
            .unwrap_or_else(|e| panic!("{e}"));
        let (clock, manual) = Clock::manual();
        let (ca, _) = novacron_shared::pki::FleetCa::generate("t", clock.wall(), Duration::from_secs(3600))
            .unwrap_or_else(|e| panic!("{e}"));
        let ha = HaConfig {
            hardware_fence: Some(HardwareFence {
                command: vec![script.into(), "{host}".into(), "{action}".into()],
                timeout: Duration::from_millis(500),
                retries: 1,
                hosts: Default::default(),
            }),
            ..ha
        };
        let f = Fleet::with_ha(
            store,
            ca,
            crate::config::AgentPolicy::default(),
            crate::scheduler::Policy::default(),
            crate::config::MigrationPolicy::default(),
            ha,
            clock,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        (f, manual)
    }

    fn script(dir: &std::path::Path, body: &str) -> String {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join("fence");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap_or_else(|e| panic!("{e}"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("{e}"));
        p.display().to_string()
    }

    /// Feeds results back until no command is left running.
    async fn drive(f: &Fleet, fences: &mut Fences, rx: &mut mpsc::UnboundedReceiver<Done>) {
        while fences.status(H1).0 == FenceStatus::Fencing {
            let done = tokio::time::timeout(Duration::from_secs(20), rx.recv())
                .await
                .unwrap_or_else(|_| panic!("a fence command never reported"))
                .unwrap_or_else(|| panic!("channel closed"));
            fences.done(f, f.clock().now(), done);
        }
    }

    fn expired(f: &Fleet) -> Vec<(HostId, HostState, String)> {
        vec![(H1, f.lease_state(H1).unwrap_or(HostState::Suspect), "hv-1".into())]
    }

    #[tokio::test]
    async fn a_host_the_fence_finds_on_is_powered_off_confirmed_and_fenced_at_once() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        // A BMC stand-in: on until `off` runs, then off.
        let state = dir.path().join("power");
        let s = script(
            dir.path(),
            &format!(
                "case $2 in off) touch {p}; exit 0;; status) [ -e {p} ] && exit 2; exit 0;; esac; exit 1",
                p = state.display()
            ),
        );
        let (f, clock) = fleet(dir.path(), &s, HaConfig::default());
        let mut events = f.bus.subscribe();
        let t0 = f.clock().now();
        f.ha_connected(H1, t0);
        clock.advance(f.ha_fence_wait() + Duration::from_secs(1));
        f.ha_heard(H1, f.clock().now(), Some(Some(Duration::from_secs(5))));
        f.tick_leases(f.clock().now()).unwrap_or_else(|e| panic!("{e}"));
        clock.advance(f.ha_config().lease + Duration::from_millis(10));
        f.tick_leases(f.clock().now()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(f.lease_state(H1), Some(HostState::LeaseExpired));

        let (mut fences, mut rx) = Fences::new(f.ha_config());
        fences.settle(&f, &expired(&f));
        fences.start(&f, H1);
        assert_eq!(fences.status(H1).0, FenceStatus::Fencing);
        drive(&f, &mut fences, &mut rx).await;
        assert_eq!(fences.status(H1).0, FenceStatus::Off);
        assert!(state.exists(), "off ran");
        let moves = f.tick_leases(f.clock().now()).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            moves.iter().any(|t| t.host == H1 && t.to == HostState::Fenced),
            "fenced without the lease wait: {moves:?}"
        );
        let mut texts = Vec::new();
        while let Ok(e) = events.try_recv() {
            texts.push(e.message.clone());
        }
        for want in ["started", "status", "off →", "powered off and confirmed off"] {
            assert!(texts.iter().any(|t| t.contains(want)), "{want} in {texts:?}");
        }
        // Heard again (powered on): returning, and the fence is forgotten.
        clock.advance(Duration::from_millis(1));
        f.ha_connected(H1, f.clock().now());
        f.tick_leases(f.clock().now()).unwrap_or_else(|e| panic!("{e}"));
        fences.settle(&f, &expired(&f));
        assert_eq!(fences.status(H1).0, FenceStatus::Idle);
    }

    #[tokio::test]
    async fn a_hanging_fence_in_keep_running_without_locks_fails_with_an_alert_and_is_retried() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let s = script(dir.path(), "sleep 30");
        let ha = HaConfig {
            isolation: novacron_shared::protocol::IsolationResponse::KeepRunning,
            ..HaConfig::default()
        };
        let ha = HaConfig {
            retry: Duration::from_secs(5),
            ..ha
        };
        let (f, clock) = fleet(dir.path(), &s, ha);
        let mut events = f.bus.subscribe();
        let (mut fences, mut rx) = Fences::new(f.ha_config());
        fences.settle(&f, &[(H1, HostState::LeaseExpired, "hv-1".into())]);
        fences.start(&f, H1);
        drive(&f, &mut fences, &mut rx).await;
        let (state, error) = fences.status(H1);
        assert_eq!(state, FenceStatus::Failed);
        assert!(error.is_some_and(|e| e.contains("timed out")));
        let mut alert = None;
        while let Ok(e) = events.try_recv() {
            if e.message.starts_with("ALERT") {
                alert = Some(e.message.clone());
            }
        }
        let alert = alert.unwrap_or_else(|| panic!("an alert event"));
        assert!(
            alert.contains("stays fencing") && alert.contains("retried"),
            "{alert}"
        );
        // Retried every `ha.retry`.
        let at = fences.next_wakeup().unwrap_or_else(|| panic!("a retry is due"));
        assert_eq!(at, f.clock().now() + f.ha_config().retry);
        clock.advance(f.ha_config().retry);
        fences.poll(&f, f.clock().now());
        assert_eq!(fences.status(H1).0, FenceStatus::Fencing);
        // Not in self-fence: there the lease wait is the fallback.
        std::fs::create_dir_all(dir.path().join("2")).unwrap_or_else(|e| panic!("{e}"));
        let (f2, _) = fleet(&dir.path().join("2"), &s, HaConfig::default());
        let (fences2, _) = Fences::new(f2.ha_config());
        assert_eq!(fences2.policy.retry, None);
    }
}
