//! `novacron vms ...`.

use std::collections::BTreeMap;
use std::io::Read;

use serde_json::{json, Value};

use crate::args::{CreateArgs, SnapshotCommand, VmListArgs, VmsCommand};
use crate::ctx::{state, text, Ctx};
use crate::table::{fields, Table};
use crate::units::{enc, human_mib, now_ms, when};
use crate::CliError;

/// Runs a `vms` subcommand.
pub async fn run(ctx: &mut Ctx, command: VmsCommand) -> Result<(), CliError> {
    match command {
        VmsCommand::List(args) => list(ctx, args).await,
        VmsCommand::Show { vm } => {
            let v = ctx.resolve_vm(&vm).await?;
            if ctx.json() {
                return ctx.print_json(&v);
            }
            let host = ctx.host_label(&text(&v["host"])).await;
            ctx.emit(&show(&v, &host, now_ms()))
        }
        VmsCommand::Create(args) => create(ctx, *args).await,
        VmsCommand::Delete { vm } => {
            let (id, name) = ctx.vm_id(&vm).await?;
            let v = ctx.delete(&format!("/v1/vms/{id}")).await?;
            ctx.report(&v, || {
                format!("deleted VM {name} ({id}); its host removes it with its volumes")
            })
        }
        VmsCommand::Start { vm } => power(ctx, &vm, "start").await,
        VmsCommand::Stop { vm } => power(ctx, &vm, "stop").await,
        VmsCommand::Suspend { vm } => power(ctx, &vm, "suspend").await,
        VmsCommand::Resume { vm } => power(ctx, &vm, "resume").await,
        VmsCommand::Reboot { vm } => {
            let (id, name) = ctx.vm_id(&vm).await?;
            let v = ctx.post(&format!("/v1/vms/{id}/reboot"), json!({})).await?;
            command_done(ctx, &v, format!("reboot of VM {name}"), || {
                format!("rebooted VM {name}")
            })
        }
        VmsCommand::Snapshot { command } => snapshot(ctx, command).await,
    }
}

async fn list(ctx: &mut Ctx, args: VmListArgs) -> Result<(), CliError> {
    let host = match &args.host {
        Some(h) => Some(ctx.host_id(h).await?),
        None => None,
    };
    let extra = [("host", host), ("name_prefix", args.name_prefix.clone())];
    let v = ctx.list(&crate::ctx::VMS, &extra, args.limit, args.all).await?;
    if ctx.json() {
        return ctx.print_json(&v);
    }
    let vms = v["vms"].as_array().ok_or(CliError::Unexpected("VM list"))?;
    let mut hosts = BTreeMap::new();
    for vm in vms {
        let h = text(&vm["host"]);
        if let std::collections::btree_map::Entry::Vacant(e) = hosts.entry(h) {
            let label = ctx.host_label(e.key()).await;
            e.insert(label);
        }
    }
    ctx.emit(&table(vms, &hosts, now_ms()))
}

/// The VM table; `hosts` maps host ids to names.
fn table(vms: &[Value], hosts: &BTreeMap<String, String>, now: u64) -> String {
    let mut t = Table::new(&[
        "ID", "NAME", "HOST", "POWER", "STATE", ">VCPUS", ">MEMORY", ">DISK", "CREATED",
    ]);
    for v in vms {
        let spec = &v["vm"]["spec"];
        let host = text(&v["host"]);
        t.row(vec![
            text(&v["vm"]["id"]),
            text(&spec["name"]),
            hosts.get(&host).cloned().unwrap_or(host),
            text(&v["vm"]["power"]),
            state(&v["observed"]["state"]),
            text(&spec["vcpus"]),
            spec["memory_mib"]
                .as_u64()
                .map(human_mib)
                .unwrap_or_else(|| "-".into()),
            disk_total(spec),
            v["created_ms"]
                .as_u64()
                .map(|ms| crate::units::ago(ms, now))
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    t.render()
}

fn disk_total(spec: &Value) -> String {
    let disks = spec["disks"].as_array().map(Vec::as_slice).unwrap_or_default();
    if disks.is_empty() {
        return "-".into();
    }
    let total: u64 = disks.iter().filter_map(|d| d["size_mib"].as_u64()).sum();
    human_mib(total)
}

/// One VM, as `key: value` lines; `host` is its host's name.
fn show(v: &Value, host: &str, now: u64) -> String {
    let vm = &v["vm"];
    let spec = &vm["spec"];
    let list = |items: Option<&Vec<Value>>, f: &dyn Fn(&Value) -> String| -> String {
        let parts: Vec<String> = items.map(|a| a.iter().map(f).collect()).unwrap_or_default();
        if parts.is_empty() {
            "-".into()
        } else {
            parts.join(", ")
        }
    };
    let disks = list(spec["disks"].as_array(), &|d| {
        let size = d["size_mib"]
            .as_u64()
            .map(human_mib)
            .unwrap_or_else(|| "template size".into());
        match d["template"].as_str() {
            Some(t) => format!("{} {size} (from {t})", text(&d["name"])),
            None => format!("{} {size}", text(&d["name"])),
        }
    });
    let nics = list(spec["nics"].as_array(), &|n| {
        let attach = n["attach"]
            .as_object()
            .and_then(|o| o.iter().next())
            .map(|(k, v)| format!("{k} {}", text(v)))
            .unwrap_or_else(|| text(&n["attach"]));
        match n["mac"].as_str() {
            Some(m) => format!("{attach} ({m})"),
            None => attach,
        }
    });
    let pairs = |o: &Value| -> String {
        let parts: Vec<String> = o
            .as_object()
            .map(|m| m.iter().map(|(k, v)| format!("{k}={}", text(v))).collect())
            .unwrap_or_default();
        if parts.is_empty() {
            "-".into()
        } else {
            parts.join(", ")
        }
    };
    let rules = &v["rules"];
    let mut placement = Vec::new();
    if let Some(h) = rules["host"].as_str() {
        placement.push(format!("host {h}"));
    }
    if let Some(g) = rules["anti_affinity"].as_str() {
        placement.push(format!("anti-affinity {g}"));
    }
    if let Some(g) = rules["affinity"].as_str() {
        placement.push(format!("affinity {g}"));
    }
    if rules["required_labels"]
        .as_object()
        .is_some_and(|m| !m.is_empty())
    {
        placement.push(format!("labels {}", pairs(&rules["required_labels"])));
    }
    let observed = &v["observed"];
    fields(&[
        ("id", text(&vm["id"])),
        ("name", text(&spec["name"])),
        ("host", format!("{host} ({})", text(&v["host"]))),
        ("power", text(&vm["power"])),
        (
            "state",
            if observed.is_null() {
                "unknown (not reported by its host yet)".into()
            } else {
                state(&observed["state"])
            },
        ),
        ("vcpus", text(&spec["vcpus"])),
        (
            "memory",
            spec["memory_mib"]
                .as_u64()
                .map(human_mib)
                .unwrap_or_else(|| "-".into()),
        ),
        ("disks", disks),
        ("nics", nics),
        ("machine", text(&spec["machine"])),
        ("ha", text(&spec["ha"])),
        ("labels", pairs(&spec["labels"])),
        (
            "placement",
            if placement.is_empty() {
                "-".into()
            } else {
                placement.join(", ")
            },
        ),
        ("snapshots", list(observed["snapshots"].as_array(), &text)),
        (
            "created",
            v["created_ms"]
                .as_u64()
                .map(|ms| when(ms, now))
                .unwrap_or_else(|| "-".into()),
        ),
        ("last op", text(&vm["op_id"])),
    ])
}

/// The `POST /v1/vms` body from the flags.
async fn body_from_flags(ctx: &mut Ctx, a: CreateArgs) -> Result<Value, CliError> {
    let disks: Vec<Value> = a
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let name = d
                .name
                .clone()
                .unwrap_or_else(|| if i == 0 { "root".into() } else { format!("disk{i}") });
            json!({"name": name, "size_mib": d.size_mib})
        })
        .collect();
    let labels: BTreeMap<String, String> = a.labels.into_iter().collect();
    let required: BTreeMap<String, String> = a.require_labels.into_iter().collect();
    let host = match &a.host {
        Some(h) => Some(ctx.host_id(h).await?),
        None => None,
    };
    Ok(json!({
        "spec": {
            "name": a.name,
            "vcpus": a.vcpus,
            "memory_mib": a.memory,
            "disks": disks,
            "labels": labels,
        },
        "power": if a.stopped { "stopped" } else { "running" },
        "placement": {
            "host": host,
            "required_labels": required,
            "affinity": a.affinity,
            "anti_affinity": a.anti_affinity,
        },
    }))
}

fn body_from_file(path: &std::path::Path) -> Result<Value, CliError> {
    let shown = path.display().to_string();
    let text = if shown == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map(|_| s)
            .map_err(|source| CliError::SpecFile {
                path: "stdin".into(),
                source,
            })?
    } else {
        std::fs::read_to_string(path).map_err(|source| CliError::SpecFile {
            path: shown.clone(),
            source,
        })?
    };
    serde_json::from_str(&text).map_err(|source| CliError::SpecJson { path: shown, source })
}

async fn create(ctx: &mut Ctx, a: CreateArgs) -> Result<(), CliError> {
    let body = match &a.file {
        Some(path) => body_from_file(path)?,
        None => body_from_flags(ctx, a).await?,
    };
    let v = ctx.post("/v1/vms", body).await?;
    if ctx.json() {
        return ctx.print_json(&v);
    }
    let host_id = text(&v["host"]);
    let host = ctx.host_label(&host_id).await;
    ctx.emit(&format!(
        "created VM {} ({}) on host {host} ({host_id}), power {}\n",
        text(&v["vm"]["spec"]["name"]),
        text(&v["vm"]["id"]),
        text(&v["vm"]["power"]),
    ))
}

async fn power(ctx: &mut Ctx, vm: &str, action: &str) -> Result<(), CliError> {
    let (id, name) = ctx.vm_id(vm).await?;
    let v = ctx.post(&format!("/v1/vms/{id}/{action}"), json!({})).await?;
    ctx.report(&v, || {
        format!(
            "VM {name}: power set to {} (now {}); its host converges to it",
            text(&v["vm"]["power"]),
            state(&v["observed"]["state"]),
        )
    })
}

async fn snapshot(ctx: &mut Ctx, command: SnapshotCommand) -> Result<(), CliError> {
    match command {
        SnapshotCommand::Create { vm, name: snap } => {
            let (id, name) = ctx.vm_id(&vm).await?;
            let v = ctx
                .post(&format!("/v1/vms/{id}/snapshots"), json!({"name": snap}))
                .await?;
            command_done(ctx, &v, format!("snapshot {snap} of VM {name}"), || {
                format!("took snapshot {snap} of VM {name}")
            })
        }
        SnapshotCommand::Revert { vm, name: snap } => {
            let (id, name) = ctx.vm_id(&vm).await?;
            let v = ctx
                .post(
                    &format!("/v1/vms/{id}/snapshots/{}/revert", enc(&snap)),
                    json!({}),
                )
                .await?;
            command_done(ctx, &v, format!("revert of VM {name} to {snap}"), || {
                format!("reverted VM {name} to snapshot {snap}")
            })
        }
        SnapshotCommand::Delete { vm, name: snap } => {
            let (id, name) = ctx.vm_id(&vm).await?;
            let v = ctx
                .delete(&format!("/v1/vms/{id}/snapshots/{}", enc(&snap)))
                .await?;
            command_done(ctx, &v, format!("deleting snapshot {snap} of VM {name}"), || {
                format!("deleted snapshot {snap} of VM {name}")
            })
        }
    }
}

/// Reports a command's `{op_id, outcome}`: the outcome is `"done"` or
/// `{"failed": {"message"}}`; a failure exits 1 (after the JSON, in JSON mode).
fn command_done(ctx: &Ctx, v: &Value, what: String, done: impl FnOnce() -> String) -> Result<(), CliError> {
    let failed = v["outcome"]["failed"]["message"].as_str().map(str::to_string);
    if ctx.json() {
        ctx.print_json(v)?;
    } else if failed.is_none() {
        ctx.emit(&format!("{}\n", done()))?;
    }
    match failed {
        Some(message) => Err(CliError::CommandFailed { what, message }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> Value {
        json!({
            "vm": {"id": "00000000-0000-0000-0000-0000000000aa", "op_id": "00000000-0000-0000-0000-0000000000bb",
                   "spec": {"name": "web-1", "vcpus": 2, "memory_mib": 2048,
                            "disks": [{"name": "root", "size_mib": 20480, "template": "debian.qcow2"},
                                      {"name": "data", "size_mib": 1024}],
                            "nics": [{"attach": {"network": "default"}, "mac": null}],
                            "labels": {"tier": "web"}, "machine": "q35", "ha": false},
                   "power": "running"},
            "host": "00000000-0000-0000-0000-000000000001",
            "rules": {"host": null, "required_labels": {}, "affinity": null, "anti_affinity": "web"},
            "created_ms": 1_700_000_000_000u64,
            "observed": {"name": "web-1", "uuid": "x", "state": "Running", "managed": true, "snapshots": ["s1"]}
        })
    }

    #[test]
    fn the_table_names_hosts_and_sums_disks() {
        let hosts = BTreeMap::from([(
            "00000000-0000-0000-0000-000000000001".to_string(),
            "hv-1".to_string(),
        )]);
        let out = table(&[vm()], &hosts, 1_700_000_060_000);
        let row = out.lines().nth(1).unwrap_or_default();
        for want in ["web-1", "hv-1", "running", "2 GiB", "21 GiB", "1m ago"] {
            assert!(row.contains(want), "{want} in {row}");
        }
    }

    #[test]
    fn show_lists_everything_people_ask_about() {
        let out = show(&vm(), "hv-1", 1_700_000_060_000);
        for want in [
            "host:       hv-1 (00000000-0000-0000-0000-000000000001)",
            "state:      running",
            "disks:      root 20 GiB (from debian.qcow2), data 1 GiB",
            "nics:       network default",
            "placement:  anti-affinity web",
            "snapshots:  s1",
            "labels:     tier=web",
        ] {
            assert!(out.contains(want), "{want:?} in\n{out}");
        }
        let mut unknown = vm();
        unknown["observed"] = Value::Null;
        assert!(show(&unknown, "hv-1", 0).contains("unknown (not reported"));
    }
}
