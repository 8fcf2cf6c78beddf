//! The faults of a run, injected at their times.

use super::*;

impl World {
    pub(super) fn fault(&mut self, index: usize) {
        let fault = self.cfg.faults[index].fault.clone();
        let now = self.now;
        match fault {
            Fault::Partition { host, for_ms } => {
                self.note(format!("fault: h{} link cut for {for_ms} ms", host + 1));
                self.block(host, true, true, for_ms);
            }
            Fault::DropAcks { host, for_ms } => {
                self.note(format!("fault: h{} acks lost for {for_ms} ms", host + 1));
                self.block(host, false, true, for_ms);
            }
            Fault::DropBeats { host, for_ms } => {
                self.note(format!("fault: h{} heartbeats lost for {for_ms} ms", host + 1));
                self.block(host, true, false, for_ms);
            }
            Fault::Flap {
                host,
                down_ms,
                up_ms,
                times,
            } => {
                self.note(format!(
                    "fault: h{} link flaps {times}x ({down_ms} ms down, {up_ms} ms up)",
                    host + 1
                ));
                self.block(host, true, true, down_ms);
                for i in 1..u64::from(times) {
                    let t = now + i * (down_ms + up_ms) * MS;
                    self.cfg.faults.push(crate::config::Timed {
                        at_ms: t / MS,
                        fault: Fault::Partition {
                            host,
                            for_ms: down_ms,
                        },
                    });
                    let index = self.cfg.faults.len() - 1;
                    self.at(t, Ev::Fault { index });
                }
            }
            Fault::Delay { host, max_ms, for_ms } => {
                self.note(format!(
                    "fault: h{} delays up to {max_ms} ms for {for_ms} ms",
                    host + 1
                ));
                self.hosts[host].delay_max_ms = Some(max_ms);
                self.at(now + for_ms * MS, Ev::DelayEnd { host });
            }
            Fault::AgentStop { host, for_ms } => {
                if self.hosts[host].agent.is_some() {
                    self.note(format!("fault: h{} agent stopped for {for_ms} ms", host + 1));
                    self.hosts[host].agent = None;
                    self.at(now + for_ms * MS, Ev::AgentStart { host });
                }
            }
            Fault::HostCrash { host, reboot_ms } => {
                if !self.hosts[host].up {
                    return;
                }
                self.note(format!("fault: h{} crashes", host + 1));
                let held: Vec<usize> = self.hosts[host]
                    .copies
                    .iter()
                    .filter(|(_, c)| c.ha)
                    .map(|(v, _)| *v)
                    .collect();
                let h = &mut self.hosts[host];
                h.up = false;
                h.agent = None;
                h.copies.clear();
                h.guard = FenceGuard::default();
                h.guard_view = None;
                h.guard_timer = None;
                self.locks_die_with(host);
                if let Some(ms) = reboot_ms {
                    self.at(now + ms * MS, Ev::HostBoot { host });
                }
                if self.cfg.profile == Profile::HostLoss {
                    self.crashes.push((host, now, held));
                    let idx = self.crashes.len() - 1;
                    let bound = self.cfg.recovery_bound().as_nanos() as u64;
                    self.at(now + bound, Ev::RecoveryCheck { index: idx });
                }
            }
            Fault::ServerCrash { for_ms } => {
                if self.server.alive {
                    self.note(format!("fault: server killed for {for_ms} ms"));
                    self.server_crash(for_ms);
                }
            }
            Fault::ServerCrashAfter { point, for_ms } => {
                self.server.crash_at.push((point, for_ms));
            }
            Fault::SessionLoss { host } => {
                let Some(sid) = self.hosts[host].agent.as_ref().and_then(|a| a.session) else {
                    return;
                };
                self.note(format!("fault: h{} session lost", host + 1));
                if let Some(a) = self.hosts[host].agent.as_mut() {
                    a.session = None;
                }
                if self.server.alive && self.server.sessions.get(&host) == Some(&sid) {
                    self.server.sessions.remove(&host);
                    let local = self.server.clock.local(now);
                    let id = self.host_id(host);
                    self.server.leases.disconnected(id, local);
                    self.server_step();
                }
            }
            Fault::Isolate { for_ms } => {
                self.note(format!("fault: server unreachable for {for_ms} ms"));
                self.isolated = true;
                self.at(now + for_ms * MS, Ev::UnIsolate);
            }
            Fault::Split { hosts, for_ms, way } => {
                let (up, down, how) = match way {
                    Way::Both => (true, true, "both ways"),
                    Way::Up => (true, false, "their heartbeats lost"),
                    Way::Down => (false, true, "its frames to them lost"),
                };
                let names: Vec<String> = hosts.iter().map(|h| format!("h{}", h + 1)).collect();
                self.note(format!(
                    "fault: server cut from {} ({how}) for {for_ms} ms",
                    names.join(",")
                ));
                for h in hosts {
                    if h < self.hosts.len() {
                        self.block(h, up, down, for_ms);
                    }
                }
            }
            Fault::PeerCut { host, for_ms } => {
                self.note(format!("fault: h{} cut from its peers for {for_ms} ms", host + 1));
                self.hosts[host].peer_cut = true;
                self.at(now + for_ms * MS, Ev::PeerUncut { host });
            }
            Fault::Cut { host, for_ms } => {
                self.note(format!(
                    "fault: h{} cut from the server and its peers for {for_ms} ms",
                    host + 1
                ));
                self.hosts[host].peer_cut = true;
                self.at(now + for_ms * MS, Ev::PeerUncut { host });
                self.block(host, true, true, for_ms);
            }
            Fault::PeerNoise {
                percent,
                max_ms,
                for_ms,
            } => {
                self.note(format!(
                    "fault: peer links lose {percent}% and delay up to {max_ms} ms for {for_ms} ms"
                ));
                self.peer_noise = Some((percent.min(100), max_ms));
                self.at(now + for_ms * MS, Ev::PeerNoiseEnd);
            }
            Fault::Release => {
                if self.server.alive && self.held() {
                    self.note("operator releases held".into());
                    self.operator_released = true;
                    let hosts = self.host_inputs();
                    if let Some(d) = self.server.ctl.release(&hosts) {
                        self.apply(d);
                    }
                    self.server_step();
                }
            }
        }
    }

    pub(super) fn block(&mut self, host: usize, up: bool, down: bool, for_ms: u64) {
        let h = &mut self.hosts[host];
        h.up_blocked |= up;
        h.down_blocked |= down;
        self.at(self.now + for_ms * MS, Ev::Unblock { host, up, down });
    }
}
