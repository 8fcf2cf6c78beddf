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
        let grace_ms = if self.cfg.witness {
            u32::try_from(self.cfg.witness_grace.as_millis()).unwrap_or(u32::MAX)
        } else {
            0
        };
        WitnessTerms {
            peers,
            quorum,
            grace_ms,
        }
    }

    /// What `host` answers a peer: `Contact::of` its lease's peer view
    /// (nothing while its agent is down: the endpoint lives in it).
    fn answer_of(&self, host: usize) -> Option<Contact> {
        let h = &self.hosts[host];
        let a = h.agent.as_ref()?;
        Some(Contact::of(a.lease.peer_view(), h.clock.local(self.now)))
    }

    /// The lease view `host`'s own witness runs rounds for.
    fn round_view(&self, host: usize) -> LeaseView {
        self.hosts[host]
            .agent
            .as_ref()
            .map_or(LeaseView::Idle, |a| a.lease.witness_view())
    }

    /// Brings `host`'s witness up to date with its lease, hands its
    /// confirmation to the lease, and reschedules its timer.
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
        // The core's confirmation, its grace past the lease end included.
        let confirmation = a.witness.confirmed_until(local);
        let real = a.witness.peer_confirmation(local);
        if confirmation != a.confirmation {
            a.confirmation = confirmation;
            let actions = a.lease.set_confirmation(local, confirmation);
            if real.is_some() && a.lapsed && !a.confirmed_logged {
                a.confirmed_logged = true;
                self.stats.witness_holds += 1;
                self.note(format!(
                    "h{} peers confirm the server is lost: keeps its HA VMs",
                    host + 1
                ));
            }
            self.lease_actions(host, actions);
            self.schedule_agent_timer(host);
            self.guard_publish(host);
        }
        let Some(a) = self.hosts[host].agent.as_mut() else {
            return;
        };
        let next = a
            .witness
            .next_timer(local)
            .map(|i| clock.real_at(i).max(self.now));
        if next != a.witness_at {
            a.witness_at = next;
            let inc = a.inc;
            if let Some(t) = next {
                self.at(t, Ev::WitnessTimer { host, inc });
            }
        }
    }

    /// The witness's timer: a round due is started (a query to every
    /// listed peer); a lapsed confirmation is handed to the lease.
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
        self.witness_sync(host);
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
                a.witness.answer(local, m.round, from, contact);
                self.witness_sync(m.asker);
            }
        }
    }
}
