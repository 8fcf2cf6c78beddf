//! `novacron burst`: the cloud burst caps and what is used of them, the VMs
//! in the cloud with their cost, the VMs waiting and why, and orphans; and
//! the cloud side of one VM for `vms show`.

use std::collections::BTreeMap;

use novacron_api::burst::{BurstStatus, CloudState, Repatriation, VmCloud};
use novacron_shared::ids::HostId;

use crate::ctx::{opt, word, Ctx};
use crate::table::{fields, Table};
use crate::units::{ago, now_ms};
use crate::CliError;

/// Runs `burst`.
pub async fn run(ctx: &mut Ctx) -> Result<(), CliError> {
    let v = ctx.api.burst().await?;
    if ctx.json() {
        return ctx.print_json(&v);
    }
    let mut hosts = BTreeMap::new();
    for h in v
        .instances
        .iter()
        .filter_map(|c| c.repatriation.as_ref().map(|r| r.host))
    {
        if let std::collections::btree_map::Entry::Vacant(e) = hosts.entry(h) {
            let label = ctx.host_label(h).await;
            e.insert(label);
        }
    }
    ctx.emit(&status(&v, &hosts, now_ms()))
}

/// Dollars for people: at least two decimals, up to four when they matter
/// (`$0.0104`, `$2.50`, `$200.00`).
pub fn usd(v: f64) -> String {
    let s = format!("{v:.4}");
    let (whole, frac) = s.split_once('.').unwrap_or((&s, ""));
    let frac = frac.trim_end_matches('0');
    format!("${whole}.{frac:0<2}")
}

/// `used of max`, and the percentage when the cap is not zero.
fn of(used: String, max: String, ratio: Option<f64>) -> String {
    match ratio {
        Some(r) if r.is_finite() => format!("{used} of {max} ({:.0} %)", r * 100.0),
        _ => format!("{used} of {max}"),
    }
}

fn ratio(used: f64, max: f64) -> Option<f64> {
    (max > 0.0).then(|| used / max)
}

/// What is worth knowing about a cloud VM beyond its state: the last
/// error (with the retry), a move home, its deletion.
fn note(c: &VmCloud, hosts: &BTreeMap<HostId, String>, now: u64) -> String {
    let mut parts = Vec::new();
    if c.deleted {
        parts.push("deleted: terminating its instance".to_string());
    }
    if let Some(r) = &c.repatriation {
        parts.push(repatriation(r, hosts, now));
    }
    if let Some(e) = &c.last_error {
        let retry = c
            .retry_at_ms
            .map_or_else(String::new, |t| format!(", retry {}", ago(t, now)));
        parts.push(format!("{e} (attempt {}{retry})", c.attempts));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join("; ")
    }
}

/// A move home for people.
fn repatriation(r: &Repatriation, hosts: &BTreeMap<HostId, String>, now: u64) -> String {
    let host = hosts.get(&r.host).cloned().unwrap_or_else(|| r.host.to_string());
    match r.running_ms {
        Some(t) => format!(
            "going home to {host}: runs there since {}, terminating the instance",
            ago(t, now)
        ),
        None => format!("going home to {host} (since {})", ago(r.started_ms, now)),
    }
}

/// A cloud VM's state for people: the broker's state, and the provider's
/// when it says something else (`stopping (provider: running)`).
fn state(c: &VmCloud) -> String {
    let ours = word(&c.state);
    match &c.provider_state {
        Some(p) if *p != ours => format!("{ours} (provider: {p})"),
        _ => ours,
    }
}

/// The whole status: the budget block, then cloud VMs, waiting VMs and
/// orphans; `hosts` names the hosts VMs go home to.
pub fn status(v: &BurstStatus, hosts: &BTreeMap<HostId, String>, now: u64) -> String {
    let b = &v.budget;
    let on = if v.enabled {
        let provider = match (&v.provider, &v.region) {
            (Some(p), Some(r)) => format!("{p}, {r}"),
            (Some(p), None) => p.clone(),
            _ => "no provider".into(),
        };
        format!("on ({provider}; fleet tag {})", v.fleet)
    } else {
        "off ([burst] enabled = false, or no provider configured)".into()
    };
    let mut out = fields(&[
        ("bursting", on),
        (
            "instances",
            of(
                b.instances.to_string(),
                b.max_instances.to_string(),
                ratio(f64::from(b.instances), f64::from(b.max_instances)),
            ),
        ),
        (
            "per hour",
            of(
                usd(b.usd_per_hour),
                usd(b.max_usd_per_hour),
                ratio(b.usd_per_hour, b.max_usd_per_hour),
            ),
        ),
        (
            "this month",
            format!(
                "{} ({})",
                of(
                    usd(b.month_usd),
                    usd(b.max_usd_per_month),
                    ratio(b.month_usd, b.max_usd_per_month),
                ),
                b.month
            ),
        ),
        ("total", format!("{} accrued in the cloud", usd(v.total_usd))),
    ]);
    out.push('\n');
    if v.instances.is_empty() {
        out.push_str("no VMs in the cloud\n");
    } else {
        let mut t = Table::new(&[
            "VM",
            "NAME",
            "STATE",
            "INSTANCE",
            "TYPE",
            "PRIVATE IP",
            ">$/H",
            ">ACCRUED",
            "NOTE",
        ]);
        for c in &v.instances {
            t.row(vec![
                c.vm.to_string(),
                c.name.clone().unwrap_or_else(|| "-".into()),
                state(c),
                opt(c.instance.as_deref()),
                c.instance_type.clone(),
                opt(c.private_ip.as_deref()),
                usd(c.usd_per_hour),
                usd(c.accrued_usd),
                note(c, hosts, now),
            ]);
        }
        out.push_str(&t.render());
    }
    if !v.pending.is_empty() {
        out.push_str("\nwaiting:\n");
        let mut t = Table::new(&["VM", "NAME", "BURSTABLE", "REASON"]);
        for p in &v.pending {
            t.row(vec![
                p.vm.to_string(),
                p.name.clone(),
                if p.burstable { "yes" } else { "no" }.into(),
                p.reason.clone(),
            ]);
        }
        out.push_str(&t.render());
    }
    if !v.orphans.is_empty() {
        out.push_str("\norphans (tagged with this fleet, owned by no VM):\n");
        let mut t = Table::new(&["INSTANCE", "TYPE", "STATE", "VM TAG", "FIRST SEEN", "TERMINATED"]);
        for o in &v.orphans {
            t.row(vec![
                o.instance.clone(),
                o.instance_type.clone(),
                o.provider_state.clone(),
                opt(o.vm_tag.as_deref()),
                ago(o.first_seen_ms, now),
                o.terminate_at_ms
                    .map_or_else(|| "never (only reported)".into(), |t| ago(t, now)),
            ]);
        }
        out.push_str(&t.render());
    }
    out
}

/// A VM's cloud side as `vms show` lines; `hosts` names the host it goes
/// home to.
pub fn vm_fields(c: &VmCloud, hosts: &BTreeMap<HostId, String>, now: u64) -> Vec<(&'static str, String)> {
    let ips = match (&c.private_ip, &c.public_ip) {
        (None, None) => "-".to_string(),
        (p, q) => format!("private {}, public {}", opt(p.as_deref()), opt(q.as_deref())),
    };
    let mut out = vec![
        (
            "cloud",
            format!(
                "{} {} ({}), {}",
                c.provider,
                c.instance.as_deref().unwrap_or("(no instance yet)"),
                c.instance_type,
                state(c)
            ),
        ),
        ("cloud image", c.image.clone()),
        ("cloud ips", ips),
        (
            "cloud cost",
            format!("{}/h, {} accrued", usd(c.usd_per_hour), usd(c.accrued_usd)),
        ),
        (
            "burst",
            format!("decided {}: {}", ago(c.decided_ms, now), c.reasons),
        ),
    ];
    if let Some(e) = &c.last_error {
        let retry = c
            .retry_at_ms
            .map_or_else(String::new, |t| format!(", retry {}", ago(t, now)));
        out.push(("cloud error", format!("{e} (attempt {}{retry})", c.attempts)));
    }
    if let Some(r) = &c.repatriation {
        out.push(("repatriation", repatriation(r, hosts, now)));
    }
    if c.state == CloudState::Terminating {
        out.push(("cloud note", "its instance is being terminated".into()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BurstStatus {
        serde_json::from_value(serde_json::json!({
            "enabled": true, "provider": "aws", "region": "eu-west-1", "fleet": "nc-0123",
            "budget": {"max_instances": 4, "instances": 2, "max_usd_per_hour": 2.0, "usd_per_hour": 0.5,
                       "max_usd_per_month": 200.0, "month_usd": 12.34, "month": "2026-12"},
            "instances": [
                {"vm": "00000000-0000-0000-0000-0000000000aa", "name": "web-1", "provider": "aws",
                 "launch_id": "l-1", "state": "running", "instance": "i-0123", "instance_type": "t3.micro",
                 "image": "ami-1", "provider_state": "running", "private_ip": "10.0.0.7",
                 "usd_per_hour": 0.0104, "accrued_usd": 2.5, "decided_ms": 1_700_000_000_000u64,
                 "reasons": "no host has 2 free vCPUs", "attempts": 0,
                 "repatriation": {"host": "00000000-0000-0000-0000-000000000001", "started_ms": 1_700_000_000_000u64}},
                {"vm": "00000000-0000-0000-0000-0000000000bb", "name": "web-2", "provider": "aws",
                 "launch_id": "l-2", "state": "launching", "instance_type": "m5.large", "image": "ami-1",
                 "usd_per_hour": 0.096, "accrued_usd": 0.0, "decided_ms": 1_700_000_000_000u64,
                 "reasons": "full", "attempts": 3, "last_error": "throttled by the provider: RequestLimitExceeded",
                 "retry_at_ms": 1_700_000_070_000u64}
            ],
            "pending": [{"vm": "00000000-0000-0000-0000-0000000000cc", "name": "db-1", "burstable": true,
                         "reason": "the $/h cap ($2.00) would be passed"}],
            "orphans": [{"instance": "i-0999", "instance_type": "t3.small", "provider_state": "running",
                         "first_seen_ms": 1_700_000_000_000u64}],
            "total_usd": 15.0
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn dollars_keep_the_cents_and_what_matters_below() {
        assert_eq!(usd(0.0104), "$0.0104");
        assert_eq!(usd(2.5), "$2.50");
        assert_eq!(usd(200.0), "$200.00");
        assert_eq!(usd(0.0), "$0.00");
        assert_eq!(usd(12.345_67), "$12.3457");
    }

    #[test]
    fn the_status_shows_the_budget_the_cloud_vms_the_waiting_and_the_orphans() {
        let hosts = BTreeMap::from([(HostId(1), "hv-1".to_string())]);
        let out = status(&sample(), &hosts, 1_700_000_060_000);
        for want in [
            "bursting:    on (aws, eu-west-1; fleet tag nc-0123)",
            "instances:   2 of 4 (50 %)",
            "per hour:    $0.50 of $2.00 (25 %)",
            "this month:  $12.34 of $200.00 (6 %) (2026-12)",
            "total:       $15.00 accrued in the cloud",
            "going home to hv-1 (since 1m ago)",
            "throttled by the provider: RequestLimitExceeded (attempt 3, retry in 10s)",
            "the $/h cap ($2.00) would be passed",
            "never (only reported)",
        ] {
            assert!(out.contains(want), "{want:?} in\n{out}");
        }
        let row = |name: &str| {
            out.lines()
                .find(|l| l.contains(name))
                .unwrap_or_else(|| panic!("{name} in\n{out}"))
                .to_string()
        };
        let web1 = row("web-1");
        for want in ["running", "i-0123", "t3.micro", "10.0.0.7", "$0.0104", "$2.50"] {
            assert!(web1.contains(want), "{want} in {web1}");
        }
        let web2 = row("web-2");
        assert!(web2.contains("launching") && web2.contains("m5.large"), "{web2}");
        assert!(row("db-1").contains("yes"));
        assert!(row("i-0999").contains("t3.small"));
    }

    #[test]
    fn off_says_so_and_an_empty_cloud_says_so() {
        let mut v = sample();
        v.enabled = false;
        v.instances.clear();
        v.pending.clear();
        v.orphans.clear();
        v.budget.max_usd_per_month = 0.0;
        let out = status(&v, &BTreeMap::new(), 0);
        assert!(out.contains("bursting:    off"), "{out}");
        assert!(out.contains("no VMs in the cloud"), "{out}");
        assert!(
            out.contains("$12.34 of $0.00 (2026-12)"),
            "no percentage of a zero cap: {out}"
        );
        assert!(!out.contains("waiting") && !out.contains("orphans"), "{out}");
    }

    #[test]
    fn a_vms_cloud_side_names_instance_addresses_cost_error_and_move_home() {
        let v = sample();
        let lines = vm_fields(&v.instances[0], &BTreeMap::new(), 1_700_000_060_000);
        let text = fields(&lines);
        for want in [
            "aws i-0123 (t3.micro), running",
            "private 10.0.0.7, public -",
            "$0.0104/h, $2.50 accrued",
            "no host has 2 free vCPUs",
            "going home to 00000000-0000-0000-0000-000000000001",
        ] {
            assert!(text.contains(want), "{want:?} in\n{text}");
        }
        let text = fields(&vm_fields(&v.instances[1], &BTreeMap::new(), 1_700_000_060_000));
        assert!(
            text.contains("aws (no instance yet) (m5.large), launching"),
            "{text}"
        );
        assert!(text.contains("cloud error:"), "{text}");
        assert!(
            text.contains("RequestLimitExceeded (attempt 3, retry in 10s)"),
            "{text}"
        );
    }
}
