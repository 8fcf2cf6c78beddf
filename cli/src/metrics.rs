//! `novacron top` (the fleet's latest values, refreshed) and `novacron
//! metrics` (one host's or VM's series over a range).

use std::collections::BTreeMap;
use std::io::IsTerminal as _;

use novacron_api::metrics::{LatestMetrics, LatestOwner, MetricsAnswer};

use crate::args::{MetricsArgs, TopArgs};
use crate::ctx::Ctx;
use crate::table::Table;
use crate::units::{iso, query};
use crate::CliError;

/// Latest values of one owner, by (name, label).
type Values = BTreeMap<(String, String), f64>;

fn values(owner: &LatestOwner) -> Values {
    owner
        .values
        .iter()
        .map(|v| ((v.name.clone(), v.label.clone().unwrap_or_default()), v.value))
        .collect()
}

fn sum(v: &Values, name: &str) -> Option<f64> {
    let mut it = v
        .iter()
        .filter(|((n, _), _)| n == name)
        .map(|(_, x)| *x)
        .peekable();
    it.peek()?;
    Some(it.sum())
}

fn get(v: &Values, name: &str, label: &str) -> Option<f64> {
    v.get(&(name.to_string(), label.to_string())).copied()
}

/// Bytes (or bytes per second) for people: 1.5 MiB.
pub fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn pct(x: Option<f64>) -> String {
    x.map_or_else(|| "-".into(), |v| format!("{:.1}", v * 100.0))
}

fn rate(x: Option<f64>) -> String {
    x.map_or_else(|| "-".into(), |v| format!("{}/s", human_bytes(v)))
}

/// A host's CPU busy share from per-mode rates.
pub fn busy(v: &Values) -> Option<f64> {
    let total = sum(v, "host.cpu")?;
    if total <= 0.0 {
        return None;
    }
    let idle = get(v, "host.cpu", "idle").unwrap_or(0.0) + get(v, "host.cpu", "iowait").unwrap_or(0.0);
    Some((total - idle) / total)
}

async fn render(ctx: &mut Ctx, args: &TopArgs) -> Result<String, CliError> {
    let hosts: LatestMetrics = ctx.get("/v1/metrics/latest?owner=host").await?;
    let vms: LatestMetrics = ctx.get("/v1/metrics/latest?owner=vm").await?;
    let mut out = String::new();
    let mut t = Table::new(&[
        "HOST",
        ">CPU%",
        ">LOAD1",
        ">MEM%",
        ">MEM USED",
        ">PSI CPU%",
        ">NET RX",
        ">NET TX",
        ">DISK R",
        ">DISK W",
    ]);
    let mut rows = Vec::new();
    for h in &hosts.owners {
        let v = values(h);
        let total = get(&v, "host.memory", "total");
        let avail = get(&v, "host.memory", "available");
        let used = total.zip(avail).map(|(t, a)| t - a);
        rows.push((
            busy(&v).unwrap_or(-1.0),
            vec![
                match h.id.parse() {
                    Ok(id) => ctx.host_label(id).await,
                    Err(_) => h.id.clone(),
                },
                pct(busy(&v)),
                get(&v, "host.load", "1m").map_or_else(|| "-".into(), |l| format!("{l:.2}")),
                pct(used.zip(total).map(|(u, t)| u / t)),
                used.map_or_else(|| "-".into(), human_bytes),
                pct(get(&v, "host.pressure", "cpu_some")),
                rate(sum(&v, "host.net.rx_bytes")),
                rate(sum(&v, "host.net.tx_bytes")),
                rate(sum(&v, "host.disk.read_bytes")),
                rate(sum(&v, "host.disk.write_bytes")),
            ],
        ));
    }
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    for (_, r) in rows {
        t.row(r);
    }
    out.push_str(&t.render());
    if !args.no_vms {
        let mut t = Table::new(&[
            "VM", "HOST", ">CPU%", ">VCPUS", ">MEM", ">DISK R", ">DISK W", ">NET RX", ">NET TX",
        ]);
        let mut rows = Vec::new();
        for o in &vms.owners {
            let v = values(o);
            let cpu = get(&v, "vm.cpu", "");
            rows.push((
                cpu.unwrap_or(-1.0),
                vec![
                    match o.id.parse() {
                        Ok(id) => ctx.vm_label(id).await,
                        Err(_) => o.id.clone(),
                    },
                    match o.host.as_deref().map(str::parse) {
                        Some(Ok(h)) => ctx.host_label(h).await,
                        _ => o.host.clone().unwrap_or_else(|| "-".into()),
                    },
                    pct(cpu),
                    get(&v, "vm.vcpus", "").map_or_else(|| "-".into(), |c| format!("{c:.0}")),
                    get(&v, "vm.memory", "current").map_or_else(|| "-".into(), human_bytes),
                    rate(sum(&v, "vm.block.read_bytes")),
                    rate(sum(&v, "vm.block.write_bytes")),
                    rate(sum(&v, "vm.net.rx_bytes")),
                    rate(sum(&v, "vm.net.tx_bytes")),
                ],
            ));
        }
        rows.sort_by(|a, b| b.0.total_cmp(&a.0));
        out.push('\n');
        for (_, r) in rows.into_iter().take(args.limit) {
            t.row(r);
        }
        out.push_str(&t.render());
    }
    Ok(out)
}

/// `novacron top`: hosts (busiest first) and VMs, refreshed every
/// `--interval` until Ctrl-C; `--once` prints one frame.
pub async fn top(ctx: &mut Ctx, args: TopArgs) -> Result<(), CliError> {
    if ctx.json() {
        let hosts: LatestMetrics = ctx.get("/v1/metrics/latest?owner=host").await?;
        let vms: LatestMetrics = ctx.get("/v1/metrics/latest?owner=vm").await?;
        return ctx.print_json(&serde_json::json!({"hosts": hosts.owners, "vms": vms.owners}));
    }
    let tty = std::io::stdout().is_terminal();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let frame = render(ctx, &args).await?;
        if tty && !args.once {
            // Clear the screen and go home, then draw.
            ctx.emit(&format!(
                "\x1b[2J\x1b[H{} (every {:?}, Ctrl-C to quit)\n\n{frame}",
                iso(crate::units::now_ms()),
                args.interval
            ))?;
        } else {
            ctx.emit(&frame)?;
        }
        if args.once {
            return Ok(());
        }
        tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            _ = tokio::time::sleep(args.interval) => {}
        }
    }
}

/// `novacron metrics --host H | --vm V`: per series, the latest value and
/// min/avg/max over the range (or the API's JSON with every point).
pub async fn metrics(ctx: &mut Ctx, args: MetricsArgs) -> Result<(), CliError> {
    enum Of {
        Host(novacron_shared::ids::HostId),
        Vm(novacron_shared::ids::VmId),
    }
    let of = match (&args.host, &args.vm) {
        (Some(h), None) => Of::Host(ctx.host_id(h).await?),
        (None, Some(v)) => Of::Vm(ctx.vm_id(v).await?.0),
        _ => return Err(CliError::Usage("give --host or --vm (one of them)".into())),
    };
    let owner = match &of {
        Of::Host(h) => ("host", h.to_string()),
        Of::Vm(v) => ("vm", v.to_string()),
    };
    let path = format!(
        "/v1/metrics{}",
        query(&[
            (owner.0, Some(owner.1.clone())),
            ("series", args.series.clone()),
            ("from", Some(args.since.clone())),
            ("resolution", Some(args.resolution.clone())),
        ])
    );
    let answer: MetricsAnswer = ctx.get(&path).await?;
    if ctx.json() {
        return ctx.print_json(&answer);
    }
    let mut t = Table::new(&[
        "SERIES", "LABEL", ">LATEST", ">MIN", ">AVG", ">MAX", ">POINTS", "UNIT",
    ]);
    for s in &answer.series {
        let pts = &s.points;
        let vals: Vec<f64> = pts.iter().filter_map(|p| p.get(1).copied()).collect();
        let fmt = |x: Option<f64>| x.map_or_else(|| "-".into(), |v| format!("{v:.4}"));
        let (min, max) = if answer.resolution == "1m" {
            (
                pts.iter().filter_map(|p| p.get(2).copied()).reduce(f64::min),
                pts.iter().filter_map(|p| p.get(3).copied()).reduce(f64::max),
            )
        } else {
            (
                vals.iter().copied().reduce(f64::min),
                vals.iter().copied().reduce(f64::max),
            )
        };
        let avg = (!vals.is_empty()).then(|| vals.iter().sum::<f64>() / vals.len() as f64);
        t.row(vec![
            s.name.clone(),
            s.label.clone().unwrap_or_default(),
            fmt(vals.last().copied()),
            fmt(min),
            fmt(avg),
            fmt(max),
            pts.len().to_string(),
            s.unit.clone(),
        ]);
    }
    let label = match of {
        Of::Host(h) => ctx.host_label(h).await,
        Of::Vm(v) => ctx.vm_label(v).await,
    };
    ctx.emit(&format!(
        "{} {} from {} to {} ({} resolution)\n{}",
        owner.0,
        label,
        iso(answer.from_ms),
        iso(answer.to_ms),
        answer.resolution,
        t.render()
    ))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_share_and_bytes() {
        let owner: LatestOwner = serde_json::from_value(
            serde_json::json!({"owner": "host", "id": "h", "host": null, "values": [
                {"name": "host.cpu", "label": "user", "unit": "s/s", "ts_ms": 1, "value": 0.5},
                {"name": "host.cpu", "label": "system", "unit": "s/s", "ts_ms": 1, "value": 0.25},
                {"name": "host.cpu", "label": "idle", "unit": "s/s", "ts_ms": 1, "value": 1.0},
                {"name": "host.cpu", "label": "iowait", "unit": "s/s", "ts_ms": 1, "value": 0.25},
            ]}),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let v = values(&owner);
        assert_eq!(busy(&v), Some(0.375));
        assert_eq!(human_bytes(512.0), "512 B");
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
        assert_eq!(human_bytes(3.0 * 1024.0 * 1024.0 * 1024.0), "3.0 GiB");
    }
}
