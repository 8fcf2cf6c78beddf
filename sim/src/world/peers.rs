//! The peer witness: each agent runs the real
//! `novacron_shared::witness::Witness` on its own clock, fed the lease view
//! of its `Lease`; queries and answers travel between agents over links of
//! their own (cut per host, lossy and slow on demand, each message delayed
//! on its own so they reorder), and a peer answers from its lease at the
//! moment the query reaches it.

use super::*;

/// The address a simulated host's witness "listens" on (only its host id
/// matters to the core).
fn addr(host: usize) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([10, 0, (host / 250) as u8, (host % 250) as u8 + 1], 7444))
}

impl World {
    /// The witness terms the server pushes to `host`: every other host,
    /// and the quorum of the monitored hosts.
    pub(super) fn witness_terms(&self, host: usize) -> WitnessTerms {
        let peers = (0..self.hosts.len())
            .filter(|&h| h != host)
            .map(|h| WitnessPeer {
                host: self.hosts[h].id,
                addr: addr(h),
            })
            .collect();
        let quorum = if self.cfg.broken.quorum_of_one {
            1
        } else {
            witness::quorum(self.hosts.len())
        };
        WitnessTerms { peers, quorum }
    }

    /// What `host` answers a peer: its lease as it stands (`NeverLeased`
    /// before it held one in this run of the agent, `Lost` since the end
    /// of the one it held).
    fn answer_of(&self, host: usize) -> Option<Contact> {
        let h = &self.hosts[host];
        let a = h.agent.as_ref()?;
        let local = h.clock.local(self.now);
        let view = match a.lease.state() {
            State::NoLease { .. } => return Some(Contact::NeverLeased),
            State::Leased { .. } | State::Renewing { .. } => LeaseView::Leased {
                until: a.lease.deadline()?,
            },
            State::SelfFencing { .. } | State::Fenced { .. } => match a.loss_start {
                Some(since) => LeaseView::Lost { since },
                None => return Some(Contact::NeverLeased),
            },
        };
        Some(Contact::of(view, local))
    }

    /// The lease view `host`'s own witness runs rounds for: a restarted
    /// agent's no-lease deadline counts as a lease while it still has HA
    /// VMs to defend; a host with nothing to defend is idle.
    fn round_view(&self, host: usize) -> LeaseView {
        let h = &self.hosts[host];
        let Some(a) = h.agent.as_ref() else {
            return LeaseView::Idle;
        };
        let defends = h.copies.values().any(|c| c.ha && c.phase != Phase::Dying);
        match a.lease.state() {
            State::NoLease { fence_at } if defends => LeaseView::Leased { until: fence_at },
            State::NoLease { .. } => LeaseView::Idle,
            State::Leased { .. } | State::Renewing { .. } => match a.lease.deadline() {
                Some(until) => LeaseView::Leased { until },
                None => LeaseView::Idle,
            },
            State::SelfFencing { .. } | State::Fenced { .. } => match a.loss_start {
                Some(since) if defends => LeaseView::Lost { since },
                _ => LeaseView::Idle,
            },
        }
    }

    /// Brings `host`'s witness up to date with its lease and reschedules
    /// its timer.
    pub(super) fn witness_sync(&mut self, host: usize) {
        if !self.cfg.witness {
            return;
        }
        let view = self.round_view(host);
        let clock = self.hosts[host].clock;
        let local = clock.local(self.now);
        let Some(a) = self.hosts[host].agent.as_mut() else {
            return;
        };
        a.witness.set_lease(view);
        let mut next = a.witness.next_timer(local);
        if a.witness_hold {
            if let Some(g) = a.loss_start.map(|e| e + self.cfg.witness_grace) {
                if !self.cfg.witness_grace.is_zero() && g > local {
                    next = Some(next.map_or(g, |n| n.min(g)));
                }
            }
        }
        let next = next.map(|i| clock.real_at(i).max(self.now));
        if next != a.witness_at {
            a.witness_at = next;
            let inc = a.inc;
            if let Some(t) = next {
                self.at(t, Ev::WitnessTimer { host, inc });
            }
        }
    }

    /// The witness's timer: a round due is started (a query to every
    /// listed peer), and a confirmation that lapsed without a lease ends
    /// the hold: the agent fences.
    pub(super) fn witness_tick(&mut self, host: usize) {
        let local = self.hosts[host].clock.local(self.now);
        let Some(a) = self.hosts[host].agent.as_mut() else {
            return;
        };
        let inc = a.inc;
        if let Some(round) = a.witness.poll(local) {
            self.stats.rounds += 1;
            for p in &round.peers {
                let Some(peer) = self.host_index(p.host) else {
                    continue;
                };
                self.peer_send(PeerMsg {
                    asker: host,
                    asker_inc: inc,
                    peer,
                    round: round.id,
                    answer: None,
                });
            }
        }
        self.witness_lapse(host);
        // Rearm.
        if let Some(a) = self.hosts[host].agent.as_mut() {
            a.witness_at = None;
        }
        self.witness_sync(host);
    }

    /// A hold whose confirmation has lapsed, without a lease regained,
    /// ends in the fence.
    fn witness_lapse(&mut self, host: usize) {
        let local = self.hosts[host].clock.local(self.now);
        let Some(a) = self.hosts[host].agent.as_mut() else {
            return;
        };
        if !a.witness_hold || a.witness.confirmed_until(local).is_some() {
            return;
        }
        let grace_end = self.grace_end(host);
        if grace_end.is_some_and(|g| local < g) {
            return;
        }
        let Some(a) = self.hosts[host].agent.as_mut() else {
            return;
        };
        a.witness_hold = false;
        self.note(format!("h{} cannot confirm: fences", host + 1));
        // After the grace the kill has the rest of the fence time.
        let f = self.cfg.agent_timing.fence_time;
        let budget = if grace_end.is_some() {
            f.saturating_sub(self.cfg.witness_grace)
        } else {
            f
        };
        self.fence_within(host, budget);
    }

    /// The end of the grace an unconfirmed agent has after its lease end.
    pub(super) fn grace_end(&self, host: usize) -> Option<Instant> {
        if !self.cfg.witness || self.cfg.witness_grace.is_zero() {
            return None;
        }
        let a = self.hosts[host].agent.as_ref()?;
        a.loss_start.map(|e| e + self.cfg.witness_grace)
    }

    /// What the fence guard is armed with while HA VMs are kept past the
    /// lease (it fires `F/2` later): the confirmation's end, and within
    /// the grace the lease end plus half the grace, so that it fires
    /// halfway between the grace's end and `F`, behind the agent's own
    /// fence.
    pub(super) fn hold_deadline(&self, host: usize) -> Option<Instant> {
        let h = &self.hosts[host];
        let a = h.agent.as_ref()?;
        let local = h.clock.local(self.now);
        let grace = a.loss_start.map(|e| e + self.cfg.witness_grace / 2);
        match (a.witness.confirmed_until(local), grace) {
            (Some(c), Some(g)) => Some(c.max(g)),
            (c, g) => c.or(g),
        }
    }

    /// Whether a message between `a` and `b` is lost on the way.
    fn peer_lost(&mut self, a: usize, b: usize) -> bool {
        let down = |h: &Host| !h.up || h.peer_cut;
        if down(&self.hosts[a]) || down(&self.hosts[b]) {
            return true;
        }
        let percent = self.peer_noise.map_or(self.cfg.peer_loss_percent, |(p, _)| {
            p.max(self.cfg.peer_loss_percent)
        });
        percent > 0 && self.rng.random_range(0..100) < u32::from(percent)
    }

    fn peer_send(&mut self, m: PeerMsg) {
        if self.peer_lost(m.asker, m.peer) {
            return;
        }
        let (lo, hi) = self.cfg.peer_delay_ms;
        let hi = self.peer_noise.map_or(hi, |(_, max)| hi.max(max)).max(lo);
        let d = self.rng.random_range(lo * MS..=hi * MS);
        let id = self.next_msg;
        self.next_msg += 1;
        self.peer_msgs.insert(id, m);
        self.at(self.now + d, Ev::Peer { msg: id });
    }

    pub(super) fn peer_deliver(&mut self, id: u64) {
        let Some(m) = self.peer_msgs.remove(&id) else {
            return;
        };
        let down = |h: &Host| !h.up || h.peer_cut;
        if down(&self.hosts[m.asker]) || down(&self.hosts[m.peer]) {
            return;
        }
        match m.answer {
            None => {
                // The peer's witness endpoint lives in its agent.
                let Some(contact) = self.answer_of(m.peer) else {
                    return;
                };
                self.peer_send(PeerMsg {
                    answer: Some(contact),
                    ..m
                });
            }
            Some(contact) => {
                if self.agent_inc(m.asker) != Some(m.asker_inc) {
                    return;
                }
                let local = self.hosts[m.asker].clock.local(self.now);
                let from = self.hosts[m.peer].id;
                let ignores_skew = self.cfg.broken.witness_ignores_skew;
                let view = self.round_view(m.asker);
                let Some(a) = self.hosts[m.asker].agent.as_mut() else {
                    return;
                };
                let contact = match (contact, view) {
                    // Broken on purpose: the loss is made to look as if
                    // it began with ours, however far apart they are.
                    (
                        Contact::Lost { .. },
                        LeaseView::Lost { since } | LeaseView::Leased { until: since },
                    ) if ignores_skew => Contact::Lost {
                        for_ms: local.saturating_duration_since(since).as_millis() as u64,
                    },
                    (c, _) => c,
                };
                let confirmed = a.witness.answer(local, m.round, from, contact);
                if confirmed && a.witness_hold && a.witness.confirmed_until(local).is_some() {
                    let first = !a.confirmed_once;
                    a.confirmed_once = true;
                    if first {
                        self.stats.witness_holds += 1;
                        self.note(format!(
                            "h{} peers confirm the server is lost: keeps its HA VMs",
                            m.asker + 1
                        ));
                    }
                }
                self.witness_sync(m.asker);
                self.guard_publish(m.asker);
            }
        }
    }

    /// The agent's fence was due (its lease ran out): with the witness
    /// confirming, or in keep-running, its HA VMs stay. Returns whether
    /// the fence goes ahead.
    ///
    /// Until the agent's core takes the confirmation itself, this stands
    /// in for it the way the agent's HA task is specified to: the fence
    /// deadline is the later of the lease end and the confirmation, and
    /// the lease is let go (marked fenced) so that a later ack can grant
    /// a new one while the VMs run on.
    pub(super) fn fence_due(&mut self, host: usize) -> bool {
        let local = self.hosts[host].clock.local(self.now);
        let keep = self.cfg.isolation == IsolationResponse::KeepRunning;
        let Some(a) = self.hosts[host].agent.as_mut() else {
            return false;
        };
        let confirmed = self.cfg.witness && a.witness.confirmed_until(local).is_some();
        let grace = self.cfg.witness && !self.cfg.witness_grace.is_zero() && a.witness.armed();
        if !keep && !confirmed && !grace {
            return true;
        }
        let stepped = a.lease.step(local, Event::HaVmsGone);
        if !keep {
            a.witness_hold = true;
            a.confirmed_once = confirmed;
        }
        if let Err(e) = stepped {
            self.violate(format!("h{} lease refused an event: {e}", host + 1));
        }
        if keep {
            self.note(format!("h{} keeps running its HA VMs (keep-running)", host + 1));
        } else if confirmed {
            self.stats.witness_holds += 1;
            self.note(format!(
                "h{} peers confirm the server is lost: keeps its HA VMs",
                host + 1
            ));
        }
        false
    }
}
