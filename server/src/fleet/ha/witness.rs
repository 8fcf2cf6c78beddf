//! Pushing witness terms (`crate::ha::witness`) to agents: after the lease
//! terms of every session, and to every live session whose terms changed
//! whenever the fleet's hosts or witness addresses change (a host
//! connects, reports a new witness address, enters or leaves maintenance,
//! is revoked). Nothing is sent while `[ha.witness] enabled = false`.
//!
//! The addresses come from the hosts' inventories and are kept for this
//! run (a host that disconnects stays a peer: its peers ask it, and an
//! unanswered question counts for nothing).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use novacron_shared::ids::HostId;
use novacron_shared::protocol::{ServerMessage, WitnessTerms};

use super::super::{lock, Fleet};
use super::WitnessStatus;
use crate::ha::lease::HostState;
use crate::ha::witness::{terms, Member, Terms};

/// The witness part's state (under the `Ha` part).
#[derive(Debug, Default)]
pub(in crate::fleet) struct Witness {
    /// Each host's reported witness address.
    addrs: BTreeMap<HostId, SocketAddr>,
    /// What each host was last sent.
    sent: BTreeMap<HostId, WitnessTerms>,
    /// The cap's warning was logged.
    warned: bool,
    status: WitnessStatus,
}

impl Fleet {
    /// Every tracked host's terms now.
    fn witness_terms(&self) -> BTreeMap<HostId, Terms> {
        let states: Vec<(HostId, bool)> = {
            let l = lock(&self.ha.leases);
            l.hosts()
                .map(|(id, s)| (id, s == HostState::Maintenance || l.in_maintenance(id)))
                .collect()
        };
        let w = lock(&self.ha.witness);
        let members: Vec<Member> = states
            .iter()
            .map(|(id, maintenance)| Member {
                id: *id,
                maintenance: *maintenance,
                witness: w.addrs.get(id).copied(),
            })
            .collect();
        terms(&members, self.ha.config.witness.max_peers)
    }

    /// The witness terms to send `host` right after its lease terms
    /// (recorded as sent), or `None` with the witness off.
    pub(in crate::fleet) fn witness_greeting(&self, host: HostId) -> Option<ServerMessage> {
        if !self.ha.config.witness.enabled {
            return None;
        }
        let all = self.witness_terms();
        let t = all.get(&host)?.terms.clone();
        let mut w = lock(&self.ha.witness);
        w.sent.insert(host, t.clone());
        Some(ServerMessage::Witness(t))
    }

    /// `host`'s inventory reported `addr` as its witness address; terms
    /// are pushed when that changed.
    pub(in crate::fleet) fn witness_address(&self, host: HostId, addr: Option<SocketAddr>) {
        let changed = {
            let mut w = lock(&self.ha.witness);
            match addr {
                Some(a) => w.addrs.insert(host, a) != Some(a),
                None => w.addrs.remove(&host).is_some(),
            }
        };
        if changed {
            self.push_witness_terms();
        }
    }

    /// `host` opens a session: its terms go in the greeting.
    pub(in crate::fleet) fn witness_session_opens(&self, host: HostId) {
        lock(&self.ha.witness).sent.remove(&host);
    }

    /// `host` left the fleet: no longer anyone's peer.
    pub(in crate::fleet) fn witness_forget(&self, host: HostId) {
        {
            let mut w = lock(&self.ha.witness);
            w.addrs.remove(&host);
            w.sent.remove(&host);
        }
        self.push_witness_terms();
    }

    /// Sends every live session whose terms changed its new terms.
    pub fn push_witness_terms(&self) {
        if !self.ha.config.witness.enabled {
            return;
        }
        let all = self.witness_terms();
        let unreachable = all.values().any(|t| t.unreachable);
        let mut pushed = Vec::new();
        {
            let mut w = lock(&self.ha.witness);
            for (host, t) in &all {
                // Only sessions greeted with terms get updates (a session
                // being opened gets its terms in its greeting).
                let Some(sent) = w.sent.get(host) else {
                    continue;
                };
                if sent == &t.terms || self.live(*host).is_none() {
                    continue;
                }
                if self.send_to(*host, ServerMessage::Witness(t.terms.clone())) {
                    w.sent.insert(*host, t.terms.clone());
                    pushed.push(*host);
                }
            }
            w.status.pushes += pushed.len() as u64;
            if unreachable && !w.warned && all.len() > 1 {
                w.warned = true;
                tracing::warn!(
                    max_peers = self.ha.config.witness.max_peers,
                    "peer witness: fewer peers than the quorum for some hosts (ha.witness.max_peers, or too few hosts report a witness): those agents fence as without a witness"
                );
            }
        }
        if let Some(t) = pushed.first().and_then(|h| all.get(h)) {
            self.bus.ha(
                None,
                None,
                format!(
                    "witness terms pushed to {} host(s): quorum {} of {} peer(s)",
                    pushed.len(),
                    t.terms.quorum,
                    t.terms.peers.len()
                ),
            );
        }
    }

    /// The witness as the API shows it.
    pub fn witness_status(&self) -> WitnessStatus {
        let enabled = self.ha.config.witness.enabled;
        let all = if enabled {
            self.witness_terms()
        } else {
            BTreeMap::new()
        };
        let w = lock(&self.ha.witness);
        WitnessStatus {
            enabled,
            quorum: all.values().map(|t| t.terms.quorum).next().unwrap_or(0),
            peers: w.addrs.len(),
            pushes: w.status.pushes,
        }
    }
}
