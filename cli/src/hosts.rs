//! `novacron hosts ...` and `novacron drain`.

use serde_json::{json, Value};

use crate::args::{DrainArgs, HostsCommand};
use crate::ctx::{state, text, Ctx};
use crate::table::{fields, Table};
use crate::units::{ago, human_mib, now_ms, when};
use crate::{ops, CliError};

/// Runs a `hosts` subcommand.
pub async fn run(ctx: &mut Ctx, command: HostsCommand) -> Result<(), CliError> {
    match command {
        HostsCommand::List => {
            let v = ctx.get("/v1/hosts").await?;
            if ctx.json() {
                return ctx.print_json(&v);
            }
            let hosts = v["hosts"].as_array().ok_or(CliError::Unexpected("hosts list"))?;
            ctx.emit(&list(hosts, now_ms()))
        }
        HostsCommand::Show { host } => {
            let id = ctx.host_id(&host).await?;
            let v = ctx.get(&format!("/v1/hosts/{id}")).await?;
            if ctx.json() {
                return ctx.print_json(&v);
            }
            ctx.emit(&show(&v, now_ms()))
        }
        HostsCommand::Cordon { host } => cordon(ctx, &host, true).await,
        HostsCommand::Uncordon { host } => cordon(ctx, &host, false).await,
        HostsCommand::Drain(args) => drain(ctx, args).await,
    }
}

async fn cordon(ctx: &mut Ctx, host: &str, on: bool) -> Result<(), CliError> {
    let id = ctx.host_id(host).await?;
    let action = if on { "cordon" } else { "uncordon" };
    let v = ctx.post(&format!("/v1/hosts/{id}/{action}"), json!({})).await?;
    ctx.report(&v, || {
        let who = format!("{} ({id})", text(&v["name"]));
        if on {
            format!("cordoned host {who}: no new VMs will be placed on it")
        } else {
            format!("uncordoned host {who}: new VMs may be placed on it again")
        }
    })
}

async fn drain(ctx: &mut Ctx, args: DrainArgs) -> Result<(), CliError> {
    let h = ctx.resolve_host(&args.host).await?;
    let id = text(&h["id"]);
    let v = ctx.post(&format!("/v1/hosts/{id}/drain"), json!({})).await?;
    let op = &v["operation"];
    let op_id = op["id"]
        .as_str()
        .ok_or(CliError::Unexpected("operation id"))?
        .to_string();
    if args.wait {
        eprintln!("draining host {} ({id}): operation {op_id}", text(&h["name"]));
        return ops::wait_and_report(ctx, &op_id).await;
    }
    ctx.report(&v, || {
        format!(
            "draining host {} ({id}): operation {op_id}\nfollow it with: novacron operations wait {op_id}",
            text(&h["name"])
        )
    })
}

/// Whether a host is cordoned, when the API says.
fn cordoned(h: &Value) -> Option<bool> {
    h["cordoned"].as_bool()
}

fn host_state(h: &Value) -> String {
    let mut s = state(&h["state"]);
    if cordoned(h) == Some(true) {
        s.push_str(",cordoned");
    }
    s
}

fn storage(cap: &Value) -> String {
    match (cap["storage_free_mib"].as_u64(), cap["storage_mib"].as_u64()) {
        (_, Some(0)) | (_, None) => "-".into(),
        (Some(free), Some(total)) => format!("{} of {}", human_mib(free), human_mib(total)),
        (None, Some(total)) => human_mib(total),
    }
}

/// The host table.
fn list(hosts: &[Value], now: u64) -> String {
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
        let cap = &h["capacity"];
        t.row(vec![
            text(&h["id"]),
            text(&h["name"]),
            host_state(h),
            text(&h["vm_count"]),
            text(&cap["cpus"]),
            cap["memory_mib"]
                .as_u64()
                .map(human_mib)
                .unwrap_or_else(|| "-".into()),
            storage(cap),
            text(&h["agent_version"]),
            if h["connected"] == true {
                "connected".into()
            } else {
                h["last_seen_ms"]
                    .as_u64()
                    .map(|ms| ago(ms, now))
                    .unwrap_or_else(|| "-".into())
            },
        ]);
    }
    t.render()
}

/// One host, as `key: value` lines.
fn show(h: &Value, now: u64) -> String {
    let cap = &h["capacity"];
    let ms = |k: &str| h[k].as_u64().map(|v| when(v, now)).unwrap_or_else(|| "-".into());
    let addresses = h["addresses"]
        .as_array()
        .map(|a| a.iter().map(text).collect::<Vec<_>>().join(", "))
        .unwrap_or_default();
    let mut rows = vec![
        ("id", text(&h["id"])),
        ("name", text(&h["name"])),
        ("state", state(&h["state"])),
        ("connected", text(&h["connected"])),
    ];
    if let Some(c) = cordoned(h) {
        rows.push(("cordoned", c.to_string()));
    }
    rows.extend([
        ("vms", text(&h["vm_count"])),
        ("cpus", text(&cap["cpus"])),
        (
            "memory",
            cap["memory_mib"]
                .as_u64()
                .map(human_mib)
                .unwrap_or_else(|| "-".into()),
        ),
        ("storage free", storage(cap)),
        ("agent", text(&h["agent_version"])),
        ("protocol", text(&h["protocol_version"])),
        ("addresses", addresses),
        ("enrolled", ms("first_seen_ms")),
        ("last seen", ms("last_seen_ms")),
        ("cert serial", text(&h["cert_serial"])),
        (
            "cert expires",
            h["cert_not_after"]
                .as_u64()
                .map(|s| when(s.saturating_mul(1000), now))
                .unwrap_or_else(|| "-".into()),
        ),
    ]);
    fields(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Value {
        json!({
            "id": "00000000-0000-0000-0000-000000000001", "name": "hv-1",
            "addresses": ["10.0.0.1:4000"],
            "capacity": {"cpus": 8, "memory_mib": 16384, "storage_mib": 102400, "storage_free_mib": 51200},
            "agent_version": "0.1.0", "first_seen_ms": 1_000, "last_seen_ms": 1_700_000_000_000u64,
            "state": "Online", "cert_serial": "ab", "cert_not_after": 1_800_000_000,
            "connected": true, "protocol_version": 1, "vm_count": 3
        })
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
        h["cordoned"] = json!(true);
        h["connected"] = json!(false);
        let out = list(&[h.clone()], 1_700_000_005_000);
        assert!(out.contains("online,cordoned"), "{out}");
        assert!(out.contains("5s ago"), "{out}");
        assert!(show(&h, 1_700_000_005_000).contains("cordoned:      true"));
    }
}
