//! The simulated server: the real `HostLeases`, HA controller and scheduler,
//! its sessions and acks, and the store that survives its crashes.

use super::*;

impl World {
    pub(super) fn host_id(&self, host: usize) -> HostId {
        self.hosts[host].id
    }

    pub(super) fn host_index(&self, id: HostId) -> Option<usize> {
        self.hosts.iter().position(|h| h.id == id)
    }

    pub(super) fn vm_index(&self, id: VmId) -> Option<usize> {
        self.store.vms.iter().position(|v| v.id == id)
    }

    pub(super) fn desired_for(&self, host: usize) -> Desired {
        let vms = self
            .store
            .vms
            .iter()
            .enumerate()
            .filter(|(_, v)| v.host == Some(host))
            .map(|(i, v)| (i, v.epoch))
            .collect();
        let rec = &self.store.hosts[host];
        Desired {
            gen: rec.gen,
            vms,
            departed: rec.departed.iter().copied().collect(),
        }
    }

    pub(super) fn push_desired(&mut self, host: usize) {
        if let Some(&sid) = self.server.sessions.get(&host) {
            let d = self.desired_for(host);
            self.send_down(sid, Down::Desired(d));
        }
    }

    pub(super) fn server_receive(&mut self, host: usize, sid: u64, m: Up) {
        if !self.server.alive {
            return;
        }
        let local = self.server.clock.local(self.now);
        let id = self.host_id(host);
        let current = self.server.sessions.get(&host).copied();
        if let Up::Hello = m {
            if current.is_some_and(|c| c >= sid) {
                return;
            }
            self.server.sessions.insert(host, sid);
            self.server.last_rx.insert(host, self.now);
            self.server.leases.connected(id, local);
            self.send_down(sid, Down::Terms);
            if self.cfg.witness {
                let terms = self.witness_terms(host);
                self.send_down(sid, Down::Witness(terms));
            }
            self.push_desired(host);
            self.server_step();
            return;
        }
        if current != Some(sid) {
            // A frame of a session this run does not know: a stateless reset.
            self.send_down(sid, Down::Reset);
            return;
        }
        self.server.last_rx.insert(host, self.now);
        match m {
            Up::Heartbeat(_, left) => self.server.leases.heartbeat(id, local, left),
            _ => self.server.leases.heard(id, local),
        }
        match m {
            Up::Hello => {}
            Up::Heartbeat(seq, _) => {
                // Recorded, then under the same lock whether it may be acked.
                if self.cfg.broken.ack_fenced_hosts || self.server.leases.may_ack(id, local) {
                    self.send_down(sid, Down::Ack(seq));
                }
                self.server_step();
            }
            Up::Converged(gen) => {
                let c = self.server.converged.entry(host).or_insert(0);
                *c = (*c).max(gen);
                self.server_step();
            }
        }
    }

    pub(super) fn server_idle_check(&mut self) {
        let idle = self.cfg.idle_timeout.as_nanos() as u64;
        let stale: Vec<usize> = self
            .server
            .sessions
            .keys()
            .copied()
            .filter(|h| self.server.last_rx.get(h).is_some_and(|t| self.now > t + idle))
            .collect();
        let local = self.server.clock.local(self.now);
        for h in stale {
            self.server.sessions.remove(&h);
            let id = self.host_id(h);
            self.server.leases.disconnected(id, local);
        }
    }

    /// One step of the server under its one lock: leases ticked, the
    /// controller stepped, its decisions carried out.
    pub(super) fn server_step(&mut self) {
        if !self.server.alive {
            return;
        }
        let local = self.server.clock.local(self.now);
        let transitions: Vec<Transition> = self.server.leases.tick(local);
        let mut fenced = false;
        for t in &transitions {
            if t.to == HostState::Fenced {
                if let Some(h) = self.host_index(t.host) {
                    self.store.hosts[h].must_return = true;
                    fenced = true;
                }
            }
        }
        for t in &transitions {
            if matches!(t.to, HostState::Fenced | HostState::Returning) || t.from == HostState::Fenced {
                if let Some(h) = self.host_index(t.host) {
                    self.note(format!("server: h{} {:?} -> {:?}", h + 1, t.from, t.to));
                }
            }
        }
        if fenced && self.crash_point(CrashPoint::Fenced) {
            return;
        }
        self.fences_settle();
        let hosts = self.host_inputs();
        let vms: Vec<VmInput> = self
            .store
            .vms
            .iter()
            .map(|v| VmInput {
                id: v.id,
                host: v.host.map(|h| self.hosts[h].id),
                ha: v.ha,
                priority: v.priority,
                running: true,
                epoch: v.epoch,
                migrating: false,
                created_ms: v.created_ms,
            })
            .collect();
        let decisions = self.server.ctl.step(local, &hosts, &vms);
        for d in decisions {
            if !self.server.alive {
                return;
            }
            self.apply(d);
        }
        self.schedule_server_tick();
    }

    pub(super) fn host_inputs(&self) -> Vec<HostInput> {
        let local = self.server.clock.local(self.now);
        self.server
            .leases
            .hosts()
            .map(|(id, lease)| {
                let h = self.host_index(id).unwrap_or(0);
                HostInput {
                    id,
                    lease,
                    reconciled: self.server.converged.get(&h) == Some(&self.store.hosts[h].gen),
                    loss: self.server.leases.loss(id, local),
                    fence: self
                        .server
                        .fences
                        .get(&h)
                        .map_or(FenceStatus::Idle, FenceMachine::status),
                }
            })
            .collect()
    }

    /// The guard holds every fenced host (no restart may be decided).
    pub(super) fn held(&self) -> bool {
        matches!(self.server.ctl.guard(), GuardState::Held { .. })
    }

    pub(super) fn apply(&mut self, d: Decision) {
        match d {
            Decision::Restart { vm, from, epoch } => self.restart(vm, from, epoch),
            Decision::Fence { host } => {
                if let Some(h) = self.host_index(host) {
                    self.fence_start(h);
                }
            }
            Decision::ReturnedClean { host } => {
                let Some(h) = self.host_index(host) else { return };
                // Stored first (departed and must-return cleared), then the
                // lease view; the fleet does the same.
                self.store.hosts[h].departed.clear();
                self.store.hosts[h].must_return = false;
                self.store.hosts[h].gen += 1;
                if self.crash_point(CrashPoint::ReturnedClean) {
                    return;
                }
                if let Err(e) = self.server.leases.returned_clean(host) {
                    self.violate(format!("returned_clean refused: {e}"));
                    return;
                }
                self.note(format!("server: h{} returned clean", h + 1));
                self.push_desired(h);
            }
            Decision::Lost { vm, host } => {
                let (v, h) = (self.vm_index(vm).unwrap_or(0), self.host_index(host).unwrap_or(0));
                self.note(format!("server: vm{v} lost with h{}", h + 1));
                self.crash_point(CrashPoint::Lost);
            }
            Decision::Held { silent, monitored } => {
                self.note(format!("server: held ({silent} of {monitored} hosts silent)"));
                self.crash_point(CrashPoint::Held);
            }
            Decision::Releasing => self.note("server: releasing".into()),
            Decision::Released { by_operator } => {
                self.note(format!("server: released (by operator: {by_operator})"));
            }
        }
    }

    pub(super) fn restart(&mut self, vm: VmId, from: HostId, epoch: u64) {
        let local = self.server.clock.local(self.now);
        let (Some(v), Some(f)) = (self.vm_index(vm), self.host_index(from)) else {
            self.violate(format!("restart of unknown vm {vm} or host {from}"));
            return;
        };
        self.stats.checks.held += 1;
        self.stats.checks.restart_after_fence += 1;
        if self.held() {
            self.violate(format!("restart of vm{v} decided while held"));
        }
        // The old host must no longer be able to run it.
        let old = &self.hosts[f];
        let copy_left = old.copies.contains_key(&v);
        let may_run = old
            .agent
            .as_ref()
            .is_some_and(|a| matches!(a.lease.state(), State::Leased { .. } | State::Renewing { .. }));
        // In keep-running the old copy may run on: the disk lock (or the
        // hardware fence) is the guard there, checked at every step.
        // So may a copy an operator's release judged down (with the
        // witness on, its host may run it on a confirmation).
        let keep = (self.cfg.disk_locks || self.cfg.broken.locks_assumed)
            && (self.cfg.isolation == IsolationResponse::KeepRunning || self.operator_released);
        if old.up && ((copy_left && !keep) || may_run) {
            self.violate(format!(
                "restart of vm{v} decided while h{} can still run it (copy left: {copy_left}, lease: {:?})",
                f + 1,
                old.agent.as_ref().map(|a| state_name(a.lease.state()))
            ));
        }
        let rec = &self.store.vms[v];
        if rec.host != Some(f) || rec.epoch != epoch || !self.server.leases.must_return(from) {
            self.server.ctl.restart_failed(vm, local, "stale decision".into());
            return;
        }
        let hosts: Vec<scheduler::Host> = (0..self.hosts.len())
            .filter(|&h| self.server.leases.state(self.hosts[h].id) == Some(HostState::Online))
            .map(|h| {
                let mut used = scheduler::Usage::default();
                for r in self.store.vms.iter().filter(|r| r.host == Some(h)) {
                    used.vcpus += r.vcpus;
                    used.memory_mib += r.memory_mib;
                }
                scheduler::Host {
                    id: self.hosts[h].id,
                    up: true,
                    cordoned: false,
                    cpus: self.cfg.host_cpus,
                    memory_mib: self.cfg.host_memory_mib,
                    storage_free_mib: u64::MAX / 4,
                    labels: BTreeMap::new(),
                    load: None,
                    used,
                    groups: Default::default(),
                    shared_storage: Some("pool".into()),
                    disk_locks: self.cfg.disk_locks.then(|| "pool".into()),
                }
            })
            .collect();
        let req = scheduler::Request {
            vcpus: rec.vcpus,
            memory_mib: rec.memory_mib,
            ..Default::default()
        };
        let to = match self
            .server
            .sched
            .place(&scheduler::Policy::default(), &hosts, &req)
        {
            Ok(to) => to,
            Err(nofit) => {
                self.note(format!("server: vm{v} waits: {nofit}"));
                self.server.ctl.restart_failed(vm, local, nofit.to_string());
                return;
            }
        };
        let Some(t) = self.host_index(to) else { return };
        // One store transaction: placement, epoch + 1, departed entry.
        let new_epoch = epoch + 1;
        if new_epoch <= self.store.vms[v].epoch {
            self.violate(format!("vm{v} epoch would not increase"));
        }
        let rec = &mut self.store.vms[v];
        rec.host = Some(t);
        rec.epoch = new_epoch;
        self.store.hosts[f].departed.insert(v);
        self.store.hosts[f].gen += 1;
        self.store.hosts[t].departed.remove(&v);
        self.store.hosts[t].gen += 1;
        self.stats.restarts += 1;
        self.note(format!(
            "server: restart vm{v} h{} -> h{} epoch {new_epoch}",
            f + 1,
            t + 1
        ));
        if self.crash_point(CrashPoint::Restart) {
            return;
        }
        self.push_desired(t);
        if !self.cfg.broken.skip_old_host_push {
            self.push_desired(f);
        }
        self.server.ctl.restart_done(vm);
    }

    /// Kills the server if a crash is armed at `point`; whether it did.
    pub(super) fn crash_point(&mut self, point: CrashPoint) -> bool {
        let Some(i) = self.server.crash_at.iter().position(|(p, _)| *p == point) else {
            return false;
        };
        let (_, ms) = self.server.crash_at.remove(i);
        self.note(format!("fault: server killed right after {point:?}, for {ms} ms"));
        self.server_crash(ms);
        true
    }

    pub(super) fn schedule_server_tick(&mut self) {
        if !self.server.alive {
            return;
        }
        let local = self.server.clock.local(self.now);
        let mut next = self.server.leases.next_tick(local);
        if let Some(w) = self.server.ctl.next_wakeup() {
            next = Some(next.map_or(w, |n| n.min(w)));
        }
        if let Some(w) = self
            .server
            .fences
            .values()
            .filter_map(FenceMachine::next_wakeup)
            .min()
        {
            next = Some(next.map_or(w, |n| n.min(w)));
        }
        let mut t = next.map(|i| self.server.clock.real_at(i).max(self.now));
        let idle = self.cfg.idle_timeout.as_nanos() as u64;
        for (h, _) in self.server.sessions.iter() {
            if let Some(rx) = self.server.last_rx.get(h) {
                let at = rx + idle + 1;
                t = Some(t.map_or(at, |x| x.min(at)));
            }
        }
        let Some(mut t) = t else { return };
        if t == self.now {
            // An input to report: the step that follows this one does it.
            t += 1;
        }
        if self.server.tick_at.is_some_and(|x| x <= t && x >= self.now) {
            return;
        }
        self.server.tick_at = Some(t);
        let inc = self.server.inc;
        self.at(t, Ev::ServerTick { inc });
    }

    pub(super) fn server_crash(&mut self, for_ms: u64) {
        self.server.alive = false;
        self.server.inc += 1;
        self.server.sessions.clear();
        self.server.tick_at = None;
        self.at(self.now + for_ms * MS, Ev::ServerStart);
    }

    pub(super) fn server_start(&mut self) {
        let local = self.server.clock.local(self.now);
        let known: Vec<HostId> = self.hosts.iter().map(|h| h.id).collect();
        let restored: Vec<(HostId, Restored)> = known
            .iter()
            .zip(&self.store.hosts)
            .map(|(id, r)| {
                (
                    *id,
                    Restored {
                        maintenance: false,
                        must_return: r.must_return,
                    },
                )
            })
            .collect();
        self.server.alive = true;
        self.server.leases = HostLeases::restored(lease_policy(&self.cfg), restored, local);
        self.server.ctl = Controller::new(policy(&self.cfg), known, local);
        self.server.sched = scheduler::Scheduler::default();
        self.server.fences.clear();
        self.server.last_rx.clear();
        self.server.converged.clear();
        self.note("server starts".into());
        self.schedule_server_tick();
    }
}
