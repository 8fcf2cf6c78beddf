//! The simulated host: the agent (the real `Lease` and `EpochGuard`, its
//! heartbeat loop, session, desired state and reconciler), its fence guard
//! (the real `novacron_agent::guard::Guard`, armed as the agent's guard
//! client arms it) and its hypervisor (VM copies booting, running, dying).

use super::*;

impl World {
    pub(super) fn agent_inc(&self, host: usize) -> Option<u64> {
        self.hosts[host].agent.as_ref().map(|a| a.inc)
    }

    pub(super) fn agent_start(&mut self, host: usize) {
        let h = &mut self.hosts[host];
        if !h.up || h.agent.is_some() {
            return;
        }
        h.inc += 1;
        let local = h.clock.local(self.now);
        let Ok(mut lease) = Lease::new(self.cfg.agent_timing, FenceMode::Kill, local) else {
            self.violate("the agent's lease refused its timing".into());
            return;
        };
        // Saved terms: a previous run held a lease (the run begins with
        // VMs running under one), and the isolation response it had.
        lease.assume_prior_run();
        let _ = lease.set_isolation(local, self.cfg.isolation);
        if h.inc == 1 {
            // The run begins in a steady state: the agent's first start
            // holds the lease its last heartbeat earned (so its first
            // heartbeats report one, as a running fleet's do).
            let earned = lease
                .step(local, Event::HeartbeatSent { seq: u64::MAX - 1 })
                .and_then(|_| lease.step(local, Event::AckReceived { seq: u64::MAX - 1 }));
            if let Err(e) = earned {
                self.violate(format!(
                    "h{} lease refused the lease it starts with: {e}",
                    host + 1
                ));
                return;
            }
        }
        if self.cfg.fence_guard {
            // A previous run's deadline, as its guard holds it: it ended
            // half a fence time before the guard fires.
            if let Some(fire_in) = h.guard.hello(local).fire_in_ms {
                let half = self.cfg.agent_timing.fence_time / 2;
                lease.limit_no_lease(local + Duration::from_millis(fire_in).saturating_sub(half));
            }
            h.guard_view = None;
        }
        h.agent = Some(Agent {
            inc: h.inc,
            lease,
            guard: EpochGuard::new(),
            session: None,
            seq: 0,
            desired: None,
            converged_sent: None,
            last_rx: local,
            timer_at: None,
            fencing: false,
            witness: Witness::new(),
            witness_at: None,
            loss_start: None,
            confirmation: None,
            lapsed: false,
            confirmed_logged: false,
            lock_wait: BTreeMap::new(),
        });
        self.schedule_agent_timer(host);
        self.guard_publish(host);
        self.agent_beat(host);
    }

    /// Tells the fence guard what changed, as the agent's guard client
    /// does: armed at `deadline + F/2` with the running HA copies,
    /// disarmed once fenced, left alone while fencing.
    pub(super) fn guard_publish(&mut self, host: usize) {
        if !self.cfg.fence_guard {
            return;
        }
        let h = &self.hosts[host];
        let Some(a) = h.agent.as_ref() else { return };
        let copies: Vec<u64> = h.copies.values().filter(|c| c.ha).map(|c| c.id).collect();
        let view: GuardView = match a.lease.guard_duty() {
            GuardDuty::Arm { deadline } => (Some(self.guard_fire_at(host, deadline)), copies, false),
            GuardDuty::Keep => (None, copies, false),
            GuardDuty::StandDown => (None, copies, true),
        };
        if h.guard_view.as_ref() == Some(&view) {
            return;
        }
        let event = match &view {
            (Some(fire_at), copies, _) => GuardEvent::Arm {
                fire_at: *fire_at,
                targets: h
                    .copies
                    .iter()
                    .filter(|(_, c)| copies.contains(&c.id))
                    .map(|(vm, c)| Target {
                        name: format!("vm{vm}"),
                        pid: c.id as i32,
                        start_ticks: c.id,
                    })
                    .collect(),
            },
            (None, _, true) => GuardEvent::Disarm,
            (None, _, false) => {
                self.hosts[host].guard_view = Some(view);
                return;
            }
        };
        self.hosts[host].guard_view = Some(view);
        self.guard_step(host, event);
    }

    /// Steps the fence guard; the QEMUs it kills (by pid and start time:
    /// only the very copy it was armed with) die within `F/2` (within
    /// `(F − grace)/2` with the witness grace, which moves its firing
    /// that much later).
    pub(super) fn guard_step(&mut self, host: usize, event: GuardEvent) {
        let h = &mut self.hosts[host];
        let local = h.clock.local(self.now);
        let kills = h.guard.step(local, event);
        let next = h.guard.next_timer().map(|i| h.clock.real_at(i).max(self.now));
        if next != h.guard_timer {
            h.guard_timer = next;
            if let Some(t) = next {
                self.at(t, Ev::GuardTimer { host });
            }
        }
        if !kills.is_empty() {
            self.stats.guard_kills += 1;
            self.stats.checks.keep_running += 1;
            if self.cfg.isolation == IsolationResponse::KeepRunning {
                self.violate(format!("keep-running: h{}'s fence guard killed HA VMs", host + 1));
            }
            self.note(format!(
                "h{} fence guard fires: kills {} HA QEMU(s)",
                host + 1,
                kills.len()
            ));
        }
        let half = (self.cfg.agent_timing.fence_time / 2).as_nanos() as u64;
        for t in kills {
            let hit = self.hosts[host]
                .copies
                .iter()
                .find(|(_, c)| c.id == t.start_ticks && c.id as i32 == t.pid)
                .map(|(vm, c)| (*vm, c.id));
            let Some((vm, copy)) = hit else { continue };
            if let Some(c) = self.hosts[host].copies.get_mut(&vm) {
                c.phase = Phase::Dying;
            }
            let gone = self.now + self.rng.random_range(0..=half);
            self.at(gone, Ev::CopyGone { host, vm, copy });
        }
    }

    pub(super) fn schedule_agent_timer(&mut self, host: usize) {
        let h = &mut self.hosts[host];
        let clock = h.clock;
        let Some(a) = h.agent.as_mut() else { return };
        let next = a.lease.next_timer().map(|i| clock.real_at(i).max(self.now));
        if next == a.timer_at {
            return;
        }
        a.timer_at = next;
        let inc = a.inc;
        if let Some(t) = next {
            self.at(t, Ev::AgentTimer { host, inc });
        }
    }

    pub(super) fn agent_event(&mut self, host: usize, ev: Event) {
        let local = self.hosts[host].clock.local(self.now);
        let Some(a) = self.hosts[host].agent.as_mut() else {
            return;
        };
        let actions = match a.lease.step(local, ev) {
            Ok(actions) => actions,
            Err(e) => {
                self.violate(format!("h{} lease refused an event: {e}", host + 1));
                return;
            }
        };
        self.lease_actions(host, actions);
        self.schedule_agent_timer(host);
        self.witness_sync(host);
        self.guard_publish(host);
    }

    /// Carries out what the lease asked for.
    pub(super) fn lease_actions(&mut self, host: usize, actions: Vec<Action>) {
        let local = self.hosts[host].clock.local(self.now);
        for act in actions {
            match act {
                Action::FenceHaVms { .. } => {
                    // The whole fence time: the server's wait covers the
                    // lease plus the witness grace, then the fence time.
                    let f = self.cfg.agent_timing.fence_time;
                    if self.hosts[host].agent.as_ref().is_some_and(|a| a.lapsed) {
                        self.note(format!("h{} cannot confirm: fences", host + 1));
                    }
                    if let Some(a) = self.hosts[host].agent.as_mut() {
                        a.lapsed = false;
                    }
                    self.fence_within(host, f);
                }
                Action::HaVmsKept { until } => {
                    let confirmed = self.hosts[host]
                        .agent
                        .as_ref()
                        .is_some_and(|a| a.witness.peer_confirmation(local).is_some());
                    let line = match until {
                        None => format!("h{} keeps running its HA VMs (keep-running)", host + 1),
                        Some(_) if confirmed => {
                            self.stats.witness_holds += 1;
                            format!("h{} peers confirm the server is lost: keeps its HA VMs", host + 1)
                        }
                        Some(_) => format!("h{} waits the witness grace", host + 1),
                    };
                    if let Some(a) = self.hosts[host].agent.as_mut() {
                        a.lapsed = true;
                        a.confirmed_logged = confirmed;
                    }
                    self.note(line);
                }
                Action::LeaseAcquired { .. } => {
                    if let Some(a) = self.hosts[host].agent.as_mut() {
                        a.confirmation = None;
                        if std::mem::take(&mut a.lapsed) {
                            self.note(format!("h{} regains its lease", host + 1));
                        }
                    }
                }
                Action::LeaseLost { deadline } => {
                    if let Some(a) = self.hosts[host].agent.as_mut() {
                        a.loss_start = Some(deadline);
                    }
                    self.note(format!("h{} lease lost", host + 1));
                }
                Action::Renewing { .. } | Action::Renewed { .. } | Action::AckIgnored { .. } => {}
            }
        }
    }

    /// When the fence guard fires for a fence deadline: `F/2` after it
    /// (behind the agent's own fence).
    pub(super) fn guard_fire_at(&self, _host: usize, deadline: Instant) -> Instant {
        deadline + self.cfg.agent_timing.fence_time / 2
    }

    /// The agent's fence: every HA copy killed within `budget`.
    pub(super) fn fence_within(&mut self, host: usize, budget: Duration) {
        self.stats.fences += 1;
        self.stats.checks.keep_running += 1;
        if self.cfg.isolation == IsolationResponse::KeepRunning {
            self.violate(format!(
                "keep-running: h{} fenced its HA VMs on a lease expiry",
                host + 1
            ));
        }
        self.note(format!("h{} fences its HA VMs", host + 1));
        let f = budget.as_nanos() as u64;
        let now = self.now;
        let victims: Vec<(usize, u64)> = self.hosts[host]
            .copies
            .iter()
            .filter(|(_, c)| c.ha && c.phase != Phase::Dying)
            .map(|(v, c)| (*v, c.id))
            .collect();
        for (vm, copy) in victims {
            let gone = now + self.rng.random_range(0..=f);
            if let Some(c) = self.hosts[host].copies.get_mut(&vm) {
                c.phase = Phase::Dying;
            }
            self.at(gone, Ev::CopyGone { host, vm, copy });
        }
        if let Some(a) = self.hosts[host].agent.as_mut() {
            a.fencing = true;
        }
        self.after_copy_gone(host);
    }

    pub(super) fn after_copy_gone(&mut self, host: usize) {
        self.witness_sync(host);
        self.guard_publish(host);
        let ha_left = self.hosts[host].copies.values().any(|c| c.ha);
        let fencing = self.hosts[host].agent.as_ref().is_some_and(|a| a.fencing);
        if fencing && !ha_left {
            if let Some(a) = self.hosts[host].agent.as_mut() {
                a.fencing = false;
            }
            self.agent_event(host, Event::HaVmsGone);
        }
        self.reconcile(host);
    }

    pub(super) fn agent_beat(&mut self, host: usize) {
        let clock = self.hosts[host].clock;
        let local = clock.local(self.now);
        let idle = self.cfg.idle_timeout;
        let Some(a) = self.hosts[host].agent.as_mut() else {
            return;
        };
        let inc = a.inc;
        if a.session.is_some() && local.saturating_duration_since(a.last_rx) > idle {
            a.session = None;
        }
        if a.session.is_none() {
            self.agent_connect(host);
        }
        let Some(a) = self.hosts[host].agent.as_mut() else {
            return;
        };
        if let Some(sid) = a.session {
            a.seq += 1;
            let seq = a.seq;
            let left = a.lease.lease_left(local);
            self.agent_event(host, Event::HeartbeatSent { seq });
            self.send_up(sid, Up::Heartbeat(seq, left));
        }
        self.reconcile(host);
        let next = clock.real_at(local + self.cfg.heartbeat);
        self.at(next, Ev::AgentBeat { host, inc });
    }

    pub(super) fn agent_connect(&mut self, host: usize) {
        let reachable = self.server.alive && !self.blocked(host, false) && !self.blocked(host, true);
        if !reachable {
            return;
        }
        let sid = self.next_sid;
        self.next_sid += 1;
        self.sessions.insert(
            sid,
            Session {
                host,
                up: Stream::default(),
                down: Stream::default(),
            },
        );
        let local = self.hosts[host].clock.local(self.now);
        if let Some(a) = self.hosts[host].agent.as_mut() {
            a.session = Some(sid);
            a.seq = 0;
            a.desired = None;
            a.converged_sent = None;
            a.last_rx = local;
        }
        self.agent_event(host, Event::SessionStarted);
        self.send_up(sid, Up::Hello);
    }

    pub(super) fn agent_receive(&mut self, host: usize, sid: u64, m: Down) {
        let local = self.hosts[host].clock.local(self.now);
        let Some(a) = self.hosts[host].agent.as_mut() else {
            return;
        };
        if a.session != Some(sid) {
            return;
        }
        a.last_rx = local;
        match m {
            Down::Terms => {
                let actions = a.lease.set_isolation(local, self.cfg.isolation);
                self.lease_actions(host, actions);
                self.schedule_agent_timer(host);
                self.guard_publish(host);
            }
            Down::Witness(t) => {
                if self.cfg.witness {
                    a.witness.set_terms(Some(t));
                    self.witness_sync(host);
                }
            }
            Down::Desired(d) => {
                a.desired = Some(d);
                self.reconcile(host);
            }
            Down::Ack(seq) => {
                self.agent_event(host, Event::AckReceived { seq });
                self.reconcile(host);
            }
            Down::Reset => {
                a.session = None;
                self.agent_connect(host);
                let Some(a) = self.hosts[host].agent.as_mut() else {
                    return;
                };
                if let Some(sid) = a.session {
                    a.seq += 1;
                    let seq = a.seq;
                    let left = a.lease.lease_left(local);
                    self.agent_event(host, Event::HeartbeatSent { seq });
                    self.send_up(sid, Up::Heartbeat(seq, left));
                }
            }
        }
    }

    /// The agent's reconciler: starts desired VMs (HA ones only under
    /// `may_start_ha` and the epoch guard), destroys departed ones, and
    /// reports converged.
    pub(super) fn reconcile(&mut self, host: usize) {
        let local = self.hosts[host].clock.local(self.now);
        let Some(a) = self.hosts[host].agent.as_ref() else {
            return;
        };
        let Some(d) = a.desired.clone() else { return };
        let sid = a.session;
        let f = self.cfg.agent_timing.fence_time.as_nanos() as u64;
        for &(vm, epoch) in &d.vms {
            let present = self.hosts[host].copies.get(&vm).copied();
            let ha = self.store.vms[vm].ha;
            let id = self.store.vms[vm].id;
            let Some(a) = self.hosts[host].agent.as_mut() else {
                return;
            };
            match present {
                Some(c) if c.phase != Phase::Dying => {
                    a.guard.admit(id, epoch.max(c.epoch));
                }
                Some(_) => {}
                None => {
                    if ha && !a.lease.may_start_ha(local) {
                        continue;
                    }
                    if a.lock_wait.get(&vm).is_some_and(|&(_, next)| next > self.now) {
                        continue;
                    }
                    if !a.guard.admit(id, epoch) {
                        continue;
                    }
                    if !self.lock_disk(host, vm) {
                        continue;
                    }
                    self.start_copy(host, vm, epoch);
                }
            }
        }
        for &vm in &d.departed {
            let Some(c) = self.hosts[host].copies.get_mut(&vm) else {
                continue;
            };
            if c.phase != Phase::Dying {
                c.phase = Phase::Dying;
                let copy = c.id;
                let gone = self.now + self.rng.random_range(0..=f);
                self.at(gone, Ev::CopyGone { host, vm, copy });
            }
        }
        let clean = d
            .departed
            .iter()
            .all(|v| !self.hosts[host].copies.contains_key(v));
        let Some(a) = self.hosts[host].agent.as_mut() else {
            return;
        };
        if clean && a.converged_sent != Some(d.gen) {
            a.converged_sent = Some(d.gen);
            if let Some(sid) = sid {
                self.send_up(sid, Up::Converged(d.gen));
            }
        }
    }

    pub(super) fn start_copy(&mut self, host: usize, vm: usize, epoch: u64) {
        self.next_copy += 1;
        let copy = VmCopy {
            id: self.next_copy,
            since: 0,
            epoch,
            ha: self.store.vms[vm].ha,
            phase: Phase::Booting,
        };
        let seen = self.started_epoch.get(&vm).copied().unwrap_or(0);
        if epoch < seen {
            self.violate(format!(
                "vm{} started at epoch {epoch} after a copy at epoch {seen}",
                vm
            ));
        }
        self.started_epoch.insert(vm, epoch.max(seen));
        self.hosts[host].copies.insert(vm, copy);
        if self.cfg.disk_locks {
            self.locks.insert(vm, (host, copy.id));
        }
        if copy.ha {
            self.note(format!("h{} starts vm{vm} at epoch {epoch}", host + 1));
        }
        let (lo, hi) = self.cfg.boot_ms;
        let boot = self.rng.random_range(lo * MS..=hi * MS);
        self.at(
            self.now + boot,
            Ev::BootDone {
                host,
                vm,
                copy: copy.id,
            },
        );
        self.witness_sync(host);
        self.guard_publish(host);
    }
}
