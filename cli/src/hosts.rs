//! `novacron hosts ...` and `novacron drain`.

use novacron_api::hosts::{Host, HostList};
use novacron_api::operations::OperationAccepted;
use novacron_shared::protocol::Capacity;

use crate::args::{DrainArgs, HostsCommand};
use crate::ctx::{opt, word, Ctx};
use crate::table::{fields, Table};
use crate::units::{ago, human_mib, now_ms, when};
use crate::{ops, CliError};

/// Runs a `hosts` subcommand.
pub async fn run(ctx: &mut Ctx, command: HostsCommand) -> Result<(), CliError> {
    match command {
        HostsCommand::List => {
            let v: HostList = ctx.get("/v1/hosts").await?;
            if ctx.json() {
                return ctx.print_json(&v);
            }
            ctx.emit(&list(&v.hosts, now_ms()))
        }
        HostsCommand::Show { host } => {
            let id = ctx.host_id(&host).await?;
            let v: Host = ctx.get(&format!("/v1/hosts/{id}")).await?;
            if ctx.json() {
                return ctx.print_json(&v);
            }
            ctx.emit(&show(&v, now_ms()))
        }
        HostsCommand::Cordon { host } => cordon(ctx, &host, true).await,
        HostsCommand::Uncordon { host } => cordon(ctx, &host, false).await,
        HostsCommand::Drain(args) => drain(ctx, args).await,
        HostsCommand::Maintenance { host, state } => maintenance(ctx, &host, state == "on").await,
        HostsCommand::Fence { host, action } => fence(ctx, &host, &action).await,
    }
}

async fn fence(ctx: &mut Ctx, host: &str, action: &str) -> Result<(), CliError> {
    use novacron_api::ha::{FenceAction, FenceReply, FenceRequest};
    let id = ctx.host_id(host).await?;
    let action = if action == "off" {
        FenceAction::Off
    } else {
        FenceAction::Status
    };
    let v: FenceReply = ctx
        .post(&format!("/v1/hosts/{id}/fence"), &FenceRequest { action })
        .await?;
    ctx.report(&v, || fence_reply(host, &v))
}

/// The fence command's answer, for people.
fn fence_reply(host: &str, v: &novacron_api::ha::FenceReply) -> String {
    use novacron_api::ha::PowerState;
    let exit = match (v.exit_code, v.timed_out) {
        (_, true) => "timed out (killed)".to_string(),
        (Some(c), false) => format!("exit {c}"),
        (None, false) => "did not run".to_string(),
    };
    let said = match (v.power, v.done) {
        (Some(PowerState::On), _) => format!("host {host} is on"),
        (Some(PowerState::Off), _) => format!("host {host} is off"),
        (Some(PowerState::Unknown), _) => format!("host {host}'s power state is unknown"),
        (None, Some(true)) => format!("host {host} powered off"),
        (None, _) => format!("the fence could not power host {host} off"),
    };
    let output = v.output.trim_end();
    if output.is_empty() {
        format!("{said} ({exit})")
    } else {
        format!("{said} ({exit})\n{output}")
    }
}

async fn maintenance(ctx: &mut Ctx, host: &str, on: bool) -> Result<(), CliError> {
    let id = ctx.host_id(host).await?;
    let v: Host = ctx
        .post(
            &format!("/v1/hosts/{id}/maintenance"),
            &novacron_api::ha::SetMaintenance { maintenance: on },
        )
        .await?;
    ctx.report(&v, || {
        let who = format!("{} ({id})", v.name);
        if on {
            format!("host {who} is in maintenance: it is never fenced and its VMs stay placed on it")
        } else {
            format!("host {who} left maintenance (lease: {})", word(&v.lease))
        }
    })
}

async fn cordon(ctx: &mut Ctx, host: &str, on: bool) -> Result<(), CliError> {
    let id = ctx.host_id(host).await?;
    let action = if on { "cordon" } else { "uncordon" };
    let v: Host = ctx.post_empty(&format!("/v1/hosts/{id}/{action}")).await?;
    ctx.report(&v, || {
        let who = format!("{} ({id})", v.name);
        if on {
            format!("cordoned host {who}: no new VMs will be placed on it")
        } else {
            format!("uncordoned host {who}: new VMs may be placed on it again")
        }
    })
}

async fn drain(ctx: &mut Ctx, args: DrainArgs) -> Result<(), CliError> {
    let h = ctx.resolve_host(&args.host).await?;
    let id = h.id;
    let v: OperationAccepted = ctx.post_empty(&format!("/v1/hosts/{id}/drain")).await?;
    let op_id = v.operation.id;
    if args.wait {
        eprintln!("draining host {} ({id}): operation {op_id}", h.name);
        return ops::wait_and_report(ctx, &op_id.to_string()).await;
    }
    ctx.report(&v, || {
        format!(
            "draining host {} ({id}): operation {op_id}\nfollow it with: novacron operations wait {op_id}",
            h.name
        )
    })
}

fn host_state(h: &Host) -> String {
    let mut s = word(&h.state);
    if h.cordoned {
        s.push_str(",cordoned");
    }
    // Only what is unusual: an online lease is the normal case.
    if h.lease != novacron_api::ha::LeaseState::Online {
        s.push(',');
        s.push_str(&word(&h.lease));
    }
    if h.fence.state != novacron_api::ha::FenceState::Idle {
        s.push_str(",fence-");
        s.push_str(&word(&h.fence.state));
    }
    s
}

fn storage(cap: &Capacity) -> String {
    match cap.storage_mib {
        0 => "-".into(),
        total => format!("{} of {}", human_mib(cap.storage_free_mib), human_mib(total)),
    }
}

/// The host table.
fn list(hosts: &[Host], now: u64) -> String {
    let mut t = Table::new(&[
        "ID",
        "NAME",
        "STATE",
        ">VMS",
        ">CPUS",
        ">MEMORY",
        "STORAGE FREE",
        "AGENT",
        "LAST SEEN",
    ]);
    for h in hosts {
        let cap = &h.capacity;
        t.row(vec![
            h.id.to_string(),
            h.name.clone(),
            host_state(h),
            opt(h.vm_count),
            cap.cpus.to_string(),
            human_mib(cap.memory_mib),
            storage(cap),
            h.agent_version.clone(),
            if h.connected {
                "connected".into()
            } else {
                ago(h.last_seen_ms, now)
            },
        ]);
    }
    t.render()
}

/// One host, as `key: value` lines.
fn show(h: &Host, now: u64) -> String {
    let cap = &h.capacity;
    let rows = vec![
        ("id", h.id.to_string()),
        ("name", h.name.clone()),
        ("state", word(&h.state)),
        ("connected", h.connected.to_string()),
        ("cordoned", h.cordoned.to_string()),
        ("ha lease", word(&h.lease)),
        ("isolation", word(&h.isolation)),
        (
            "hardware fence",
            match &h.fence.error {
                Some(e) => format!("{} (last error: {e})", word(&h.fence.state)),
                None => word(&h.fence.state),
            },
        ),
        (
            "shared storage",
            h.shared_storage.clone().unwrap_or_else(|| "-".into()),
        ),
        ("disk locks", h.disk_locks.clone().unwrap_or_else(|| "-".into())),
        ("vms", opt(h.vm_count)),
        ("cpus", cap.cpus.to_string()),
        ("memory", human_mib(cap.memory_mib)),
        ("storage free", storage(cap)),
        ("agent", h.agent_version.clone()),
        ("protocol", opt(h.protocol_version)),
        ("addresses", h.addresses.join(", ")),
        ("enrolled", when(h.first_seen_ms, now)),
        ("last seen", when(h.last_seen_ms, now)),
        ("cert serial", h.cert_serial.clone()),
        (
            "cert expires",
            u64::try_from(h.cert_not_after)
                .map_or_else(|_| "-".into(), |s| when(s.saturating_mul(1000), now)),
        ),
    ];
    fields(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Host {
        serde_json::from_value(serde_json::json!({
            "id": "00000000-0000-0000-0000-000000000001", "name": "hv-1",
            "addresses": ["10.0.0.1:4000"],
            "capacity": {"cpus": 8, "memory_mib": 16384, "storage_mib": 102400, "storage_free_mib": 51200},
            "agent_version": "0.1.0", "first_seen_ms": 1_000, "last_seen_ms": 1_700_000_000_000u64,
            "state": "online", "cert_serial": "ab", "cert_not_after": 1_800_000_000,
            "connected": true, "protocol_version": 1, "vm_count": 3, "cordoned": false, "labels": {},
            "lease": "online"
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_list_shows_capacity_in_human_units() {
        let out = list(&[host()], 1_700_000_005_000);
        let mut lines = out.lines();
        assert!(lines.next().is_some_and(|l| l.starts_with("ID  ")));
        let row = lines.next().unwrap_or_default();
        for want in ["hv-1", "online", "16 GiB", "50 GiB of 100 GiB", "connected"] {
            assert!(row.contains(want), "{want} in {row}");
        }
    }

    #[test]
    fn cordons_show_when_the_api_reports_them() {
        let mut h = host();
        h.cordoned = true;
        h.connected = false;
        let out = list(std::slice::from_ref(&h), 1_700_000_005_000);
        assert!(out.contains("online,cordoned"), "{out}");
        assert!(out.contains("5s ago"), "{out}");
        let shown = show(&h, 1_700_000_005_000);
        assert!(
            shown
                .lines()
                .any(|l| l.starts_with("cordoned:") && l.trim_end().ends_with(" true")),
            "{shown}"
        );
    }

    #[test]
    fn an_unusual_lease_shows_in_the_state_column() {
        let mut h = host();
        assert!(!list(std::slice::from_ref(&h), 0).contains("online,"));
        h.lease = novacron_api::ha::LeaseState::LeaseExpired;
        let out = list(std::slice::from_ref(&h), 0);
        assert!(out.contains("online,lease-expired"), "{out}");
        assert!(show(&h, 0).contains("lease-expired"));
    }

    #[test]
    fn a_fence_under_way_and_its_error_show() {
        let mut h = host();
        h.fence = novacron_api::ha::HostFence {
            state: novacron_api::ha::FenceState::Failed,
            error: Some("status unknown (timed out)".into()),
        };
        assert!(list(std::slice::from_ref(&h), 0).contains("online,fence-failed"));
        let shown = show(&h, 0);
        assert!(
            shown.contains("failed (last error: status unknown (timed out))"),
            "{shown}"
        );
        assert!(shown.contains("self-fence"), "{shown}");
    }

    #[test]
    fn a_fence_reply_says_what_the_command_found() {
        use novacron_api::ha::{FenceAction, FenceReply, PowerState};
        let off = FenceReply {
            action: FenceAction::Status,
            exit_code: Some(2),
            timed_out: false,
            power: Some(PowerState::Off),
            done: None,
            output: "Chassis Power is off\n".into(),
        };
        assert_eq!(
            fence_reply("hv-1", &off),
            "host hv-1 is off (exit 2)\nChassis Power is off"
        );
        let hung = FenceReply {
            action: FenceAction::Off,
            exit_code: None,
            timed_out: true,
            power: None,
            done: Some(false),
            output: String::new(),
        };
        assert_eq!(
            fence_reply("hv-1", &hung),
            "the fence could not power host hv-1 off (timed out (killed))"
        );
    }
}
