//! `novacron ha ...` (the fleet's HA state, and releasing *held*).

use novacron_api::ha::{GuardState, HaOverview, VmHaState};

use crate::args::HaCommand;
use crate::ctx::{word, Ctx};
use crate::table::{fields, Table};
use crate::units::{ago, now_ms, when};
use crate::CliError;

/// Runs an `ha` subcommand.
pub async fn run(ctx: &mut Ctx, command: HaCommand) -> Result<(), CliError> {
    match command {
        HaCommand::Status => {
            let v: HaOverview = ctx.get("/v1/ha").await?;
            if ctx.json() {
                return ctx.print_json(&v);
            }
            ctx.emit(&status(&v, now_ms()))
        }
        HaCommand::Release => {
            let v: HaOverview = ctx.post_empty("/v1/ha/release").await?;
            ctx.report(&v, || match v.guard {
                GuardState::Normal => {
                    "released: the HA VMs of fenced hosts are restarted elsewhere now".to_string()
                }
                other => format!("the guard is {}", word(&other)),
            })
        }
    }
}

/// The overview: the guard and timing, then hosts that are not online,
/// then the VMs of fenced hosts.
fn status(v: &HaOverview, now: u64) -> String {
    let mut out = fields(&[
        (
            "restarts",
            if v.enabled {
                "on"
            } else {
                "off ([ha] enabled = false)"
            }
            .to_string(),
        ),
        (
            "guard",
            match (&v.guard, &v.held) {
                (GuardState::Held, Some(h)) => format!(
                    "held since {}: {} of {} hosts went silent together; release with `novacron ha release`",
                    when(h.since_ms, now),
                    h.silent,
                    h.monitored
                ),
                (g, _) => word(g),
            },
        ),
        ("isolation", word(&v.isolation)),
        (
            "guards",
            format!(
                "disk locks {}, hardware fence {}",
                if v.disk_locks { "on" } else { "off" },
                if v.hardware_fence { "on" } else { "off" }
            ),
        ),
        (
            "witness",
            if v.witness.enabled {
                format!(
                    "on: quorum {} of {} host(s) reporting a witness; {} push(es)",
                    v.witness.quorum, v.witness.peers, v.witness.pushes
                )
            } else {
                "off".to_string()
            },
        ),
        ("lease", format!("{} ms", v.lease_ms)),
        (
            "fenced after",
            format!(
                "{} ms of silence (fence time {} ms)",
                v.fenced_after_ms, v.fence_time_ms
            ),
        ),
    ]);
    let mut hosts = Table::new(&["HOST", "NAME", "LEASE", "FENCE"]);
    let mut unusual = 0;
    for h in &v.hosts {
        let fencing = h.fence.state != novacron_api::ha::FenceState::Idle;
        if h.lease != novacron_api::ha::LeaseState::Online || fencing {
            unusual += 1;
            let fence = match &h.fence.error {
                Some(e) => format!("{} ({e})", word(&h.fence.state)),
                None => word(&h.fence.state),
            };
            hosts.row(vec![h.id.to_string(), h.name.clone(), word(&h.lease), fence]);
        }
    }
    out.push('\n');
    if unusual == 0 {
        out.push_str(&format!("all {} hosts hold their lease\n", v.hosts.len()));
    } else {
        out.push_str(&hosts.render());
    }
    if !v.vms.is_empty() {
        out.push('\n');
        let mut t = Table::new(&["VM", "NAME", "HOST", "STATE", "SINCE", "WHY"]);
        for m in &v.vms {
            t.row(vec![
                m.id.to_string(),
                m.name.clone(),
                m.host.to_string(),
                word(&m.state),
                ago(m.since_ms, now),
                m.why.clone(),
            ]);
        }
        out.push_str(&t.render());
        let lost = v.vms.iter().filter(|m| m.state == VmHaState::Lost).count();
        if lost > 0 {
            out.push_str(&format!(
                "{lost} VM(s) lost: not HA (or not meant to run); they come back with their host\n"
            ));
        }
    }
    if !v.lock_waits.is_empty() {
        out.push('\n');
        let mut t = Table::new(&["VM", "NAME", "HOST", "SINCE", "WAITING"]);
        for w in &v.lock_waits {
            t.row(vec![
                w.id.to_string(),
                w.name.clone(),
                w.host.to_string(),
                ago(w.since_ms, now),
                w.waiting.clone(),
            ]);
        }
        out.push_str(&t.render());
        out.push_str("an expected wait: the start is retried until the old copy is gone\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overview() -> HaOverview {
        serde_json::from_value(serde_json::json!({
            "enabled": true, "lease_ms": 5000, "fence_time_ms": 2000, "fenced_after_ms": 7513,
            "guard": "held", "held": {"since_ms": 1_700_000_000_000u64, "silent": 2, "monitored": 3},
            "hosts": [
                {"id": "00000000-0000-0000-0000-000000000001", "name": "hv-1", "lease": "fenced"},
                {"id": "00000000-0000-0000-0000-000000000002", "name": "hv-2", "lease": "online"}
            ],
            "vms": [
                {"id": "00000000-0000-0000-0000-00000000000a", "name": "db", "host": "00000000-0000-0000-0000-000000000001",
                 "state": "waiting", "why": "held: many hosts went silent", "since_ms": 1_700_000_000_000u64},
                {"id": "00000000-0000-0000-0000-00000000000b", "name": "batch", "host": "00000000-0000-0000-0000-000000000001",
                 "state": "lost", "why": "not HA", "since_ms": 1_700_000_000_000u64}
            ]
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn held_says_how_to_release_and_lists_only_unusual_hosts() {
        let out = status(&overview(), 1_700_000_010_000);
        assert!(out.contains("2 of 3 hosts went silent together"), "{out}");
        assert!(out.contains("novacron ha release"), "{out}");
        assert!(out.contains("hv-1") && out.contains("fenced"), "{out}");
        assert!(!out.contains("hv-2"), "an online host is not listed: {out}");
        assert!(out.contains("db") && out.contains("waiting"), "{out}");
        assert!(out.contains("1 VM(s) lost"), "{out}");
        assert!(out.contains("isolation:") && out.contains("self-fence"), "{out}");
    }

    #[test]
    fn fencing_hosts_lock_waits_and_the_witness_show() {
        let mut v = overview();
        v.hosts[1].fence = novacron_api::ha::HostFence {
            state: novacron_api::ha::FenceState::Fencing,
            error: None,
        };
        v.witness = novacron_api::ha::WitnessOverview {
            enabled: true,
            quorum: 2,
            peers: 3,
            pushes: 7,
        };
        v.lock_waits.push(novacron_api::ha::LockWait {
            id: novacron_shared::ids::VmId(12),
            name: "pg".into(),
            host: novacron_shared::ids::HostId(2),
            waiting: "disk lock held (on host h2)".into(),
            since_ms: 1_700_000_000_000,
        });
        let out = status(&v, 1_700_000_010_000);
        assert!(
            out.contains("hv-2") && out.contains("fencing"),
            "a fencing host is listed: {out}"
        );
        assert!(out.contains("quorum 2 of 3"), "{out}");
        assert!(
            out.contains("pg") && out.contains("disk lock held (on host h2)"),
            "{out}"
        );
        assert!(out.contains("expected wait"), "{out}");
    }

    #[test]
    fn a_calm_fleet_says_so() {
        let mut v = overview();
        v.guard = GuardState::Normal;
        v.held = None;
        v.vms.clear();
        v.hosts[0].lease = novacron_api::ha::LeaseState::Online;
        let out = status(&v, 0);
        assert!(out.contains("all 2 hosts hold their lease"), "{out}");
        assert!(out.contains("guard:") && out.contains("normal"), "{out}");
    }
}
