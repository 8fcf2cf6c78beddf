//! The server's side of the peer witness (`novacron_shared::witness`):
//! which peers each agent asks, and the quorum it needs.
//!
//! # Rules
//!
//! - Peers of host `h`: the other enrolled hosts that report a witness
//!   address (`Inventory.witness`), hosts in maintenance too (they answer
//!   from their own lease, honestly). At most `max_peers`, taken in host
//!   id order starting after `h` (wrapping), so that capped lists spread
//!   over the fleet.
//! - `quorum = witness::quorum(monitored)`, `monitored` being the enrolled
//!   hosts not in maintenance — the count the mass-failure guard uses.
//!   When the cap (or too few witnesses) leaves fewer peers than the
//!   quorum, the agent's witness can never confirm: it fences as without
//!   one ([`Terms::unreachable`] says so, for a log line).
//!
//! Pure: the fleet's facts in, terms out; the fleet pushes them after the
//! lease terms of every session and whenever they change.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use novacron_shared::ids::HostId;
use novacron_shared::protocol::{WitnessPeer, WitnessTerms};
use novacron_shared::witness;

/// One enrolled host, as the witness terms need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    /// The host.
    pub id: HostId,
    /// In maintenance (not monitored, still a peer).
    pub maintenance: bool,
    /// Where its witness listens, if it reported one.
    pub witness: Option<SocketAddr>,
}

/// The terms of one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Terms {
    /// What is pushed.
    pub terms: WitnessTerms,
    /// Fewer peers than the quorum: the witness cannot confirm.
    pub unreachable: bool,
}

/// The terms of every member, by host.
pub fn terms(members: &[Member], max_peers: usize) -> BTreeMap<HostId, Terms> {
    let mut sorted: Vec<Member> = members.to_vec();
    sorted.sort_by_key(|m| m.id);
    sorted.dedup_by_key(|m| m.id);
    let monitored = sorted.iter().filter(|m| !m.maintenance).count();
    let quorum = witness::quorum(monitored);
    let n = sorted.len();
    let mut out = BTreeMap::new();
    for (i, me) in sorted.iter().enumerate() {
        let peers: Vec<WitnessPeer> = (1..n)
            .map(|k| &sorted[(i + k) % n])
            .filter_map(|m| m.witness.map(|addr| WitnessPeer { host: m.id, addr }))
            .take(max_peers)
            .collect();
        let unreachable = peers.len() < quorum as usize;
        out.insert(
            me.id,
            Terms {
                terms: WitnessTerms { peers, quorum },
                unreachable,
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u128, maintenance: bool, witness: bool) -> Member {
        Member {
            id: HostId(id),
            maintenance,
            witness: witness.then(|| SocketAddr::from(([10, 0, 0, id as u8], 7300))),
        }
    }

    fn peer_ids(t: &Terms) -> Vec<u128> {
        t.terms.peers.iter().map(|p| p.host.0).collect()
    }

    #[test]
    fn peers_are_the_other_hosts_with_a_witness_and_the_quorum_counts_monitored_hosts() {
        let members = [
            member(1, false, true),
            member(2, false, true),
            member(3, true, true),
            member(4, false, false),
            member(5, false, true),
        ];
        let t = terms(&members, 64);
        // Four monitored (3 is in maintenance): needed(4) = 3, quorum 2.
        assert!(t.values().all(|x| x.terms.quorum == witness::quorum(4)));
        assert_eq!(witness::quorum(4), 2);
        assert_eq!(
            peer_ids(&t[&HostId(1)]),
            [2, 3, 5],
            "maintenance hosts answer too"
        );
        assert_eq!(peer_ids(&t[&HostId(4)]), [5, 1, 2, 3], "in id order after itself");
        for (h, x) in &t {
            assert!(!x.terms.peers.iter().any(|p| p.host == *h), "never itself");
            assert!(!x.unreachable);
        }
        assert_eq!(
            t[&HostId(2)].terms.peers[0],
            WitnessPeer {
                host: HostId(3),
                addr: SocketAddr::from(([10, 0, 0, 3], 7300))
            }
        );
    }

    #[test]
    fn a_cap_below_the_quorum_is_reported_unreachable() {
        let members: Vec<Member> = (1..=10).map(|i| member(i, false, true)).collect();
        let t = terms(&members, 3);
        // needed(10) = 6: quorum 5 > 3 peers.
        assert_eq!(t[&HostId(9)].terms.quorum, 5);
        assert_eq!(peer_ids(&t[&HostId(9)]), [10, 1, 2]);
        assert!(t.values().all(|x| x.unreachable));
        let t = terms(&members, 64);
        assert!(t.values().all(|x| !x.unreachable && x.terms.peers.len() == 9));
        // Two hosts: needed is two, quorum one, each the other's peer.
        let t = terms(&members[..2], 64);
        assert_eq!(t[&HostId(1)].terms.quorum, 1);
        assert_eq!(peer_ids(&t[&HostId(1)]), [2]);
    }
}
