//! `novacron vms ...`.

use std::collections::BTreeMap;
use std::io::Read;

use novacron_api::burst::CloudState;
use novacron_api::hosts::CommandReply;
use novacron_api::vms::{CreateSnapshot, CreateVm, DeletedVm, PlacementRules, Vm, VmList};
use novacron_shared::ids::HostId;
use novacron_shared::placement::BurstRule;
use novacron_shared::protocol::CommandOutcome;
use novacron_shared::spec::{DiskSpec, NicAttach, Power, VmSpec};

use crate::args::{CreateArgs, SnapshotCommand, VmListArgs, VmsCommand};
use crate::ctx::{word, Ctx};
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
            let host = ctx.vm_host_label(&v).await;
            let mut hosts = BTreeMap::new();
            if let Some(r) = v.cloud.as_ref().and_then(|c| c.repatriation.as_ref()) {
                let label = ctx.host_label(r.host).await;
                hosts.insert(r.host, label);
            }
            ctx.emit(&show(&v, &host, &hosts, now_ms()))
        }
        VmsCommand::Create(args) => create(ctx, *args).await,
        VmsCommand::Delete { vm } => {
            let (id, name) = ctx.vm_id(&vm).await?;
            let v: DeletedVm = ctx.delete(&format!("/v1/vms/{id}")).await?;
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
            let v: CommandReply = ctx.post_empty(&format!("/v1/vms/{id}/reboot")).await?;
            command_done(ctx, &v, format!("reboot of VM {name}"), || {
                format!("rebooted VM {name}")
            })
        }
        VmsCommand::Snapshot { command } => snapshot(ctx, command).await,
    }
}

async fn list(ctx: &mut Ctx, args: VmListArgs) -> Result<(), CliError> {
    let host = match &args.host {
        Some(h) => Some(ctx.host_id(h).await?.to_string()),
        None => None,
    };
    let extra = [("host", host), ("name_prefix", args.name_prefix.clone())];
    let v: VmList = ctx.list(&extra, args.limit, args.all).await?;
    if ctx.json() {
        return ctx.print_json(&v);
    }
    let mut hosts = BTreeMap::new();
    for vm in &v.vms {
        if let Some(h) = vm.placement.host() {
            if let std::collections::btree_map::Entry::Vacant(e) = hosts.entry(h) {
                let label = ctx.host_label(h).await;
                e.insert(label);
            }
        }
    }
    ctx.emit(&table(&v.vms, &hosts, now_ms()))
}

/// Where a VM is, for people: its host's name (`hosts` maps ids to
/// names), its cloud instance (`aws:i-…`), `launching` while its
/// instance is being launched, or `pending`.
fn placed(v: &Vm, hosts: &BTreeMap<HostId, String>) -> String {
    use novacron_shared::placement::Placement;
    match &v.placement {
        Placement::Host(h) => hosts.get(h).cloned().unwrap_or_else(|| h.to_string()),
        Placement::Cloud { provider, instance } => format!("{provider}:{instance}"),
        Placement::Pending { .. } if v.cloud.as_ref().is_some_and(|c| c.state == CloudState::Launching) => {
            "launching".into()
        }
        Placement::Pending { .. } => "pending".into(),
    }
}

/// A VM's state for people: what its host reports, else its cloud
/// instance's state (`cloud running`), else `-`.
fn vm_state(v: &Vm) -> String {
    match (&v.observed, &v.cloud) {
        (Some(o), _) => word(&o.state),
        (None, Some(c)) => format!("cloud {}", word(&c.state)),
        (None, None) => "-".into(),
    }
}

/// The VM table; `hosts` maps host ids to names.
fn table(vms: &[Vm], hosts: &BTreeMap<HostId, String>, now: u64) -> String {
    let mut t = Table::new(&[
        "ID", "NAME", "HOST", "POWER", "STATE", ">VCPUS", ">MEMORY", ">DISK", "CREATED",
    ]);
    for v in vms {
        let spec = &v.vm.spec;
        t.row(vec![
            v.vm.id.to_string(),
            spec.name.clone(),
            placed(v, hosts),
            word(&v.vm.power),
            vm_state(v),
            spec.vcpus.to_string(),
            human_mib(spec.memory_mib),
            disk_total(spec),
            crate::units::ago(v.created_ms, now),
        ]);
    }
    t.render()
}

fn disk_total(spec: &VmSpec) -> String {
    if spec.disks.is_empty() {
        return "-".into();
    }
    human_mib(spec.disks.iter().filter_map(|d| d.size_mib).sum())
}

/// Items joined with `, `, or `-` when there are none.
fn joined(parts: Vec<String>) -> String {
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

/// A burst rule for people: `burst (after 5m, types t3.micro, m5.large,
/// image debian, stays in the cloud)`.
fn burst_rule(b: &BurstRule) -> String {
    let mut parts = Vec::new();
    match b.after_ms {
        Some(0) => parts.push("at once".into()),
        Some(ms) => parts.push(format!(
            "after {}",
            novacron_shared::duration::format(std::time::Duration::from_millis(ms))
        )),
        None => {}
    }
    if !b.instance_types.is_empty() {
        parts.push(format!("types {}", b.instance_types.join(", ")));
    }
    if let Some(i) = &b.image {
        parts.push(format!("image {i}"));
    }
    if !b.repatriate {
        parts.push("stays in the cloud".into());
    }
    if parts.is_empty() {
        "burst".into()
    } else {
        format!("burst ({})", parts.join("; "))
    }
}

/// One VM, as `key: value` lines; `host` is its host's name, `hosts`
/// names the host a cloud VM goes home to.
fn show(v: &Vm, host: &str, hosts: &BTreeMap<HostId, String>, now: u64) -> String {
    let spec = &v.vm.spec;
    let disks = joined(
        spec.disks
            .iter()
            .map(|d| {
                let size = d.size_mib.map_or_else(|| "template size".into(), human_mib);
                match &d.template {
                    Some(t) => format!("{} {size} (from {t})", d.name),
                    None => format!("{} {size}", d.name),
                }
            })
            .collect(),
    );
    let nics = joined(
        spec.nics
            .iter()
            .map(|n| {
                let attach = match &n.attach {
                    NicAttach::Network(x) => format!("network {x}"),
                    NicAttach::Bridge(x) => format!("bridge {x}"),
                };
                match &n.mac {
                    Some(m) => format!("{attach} ({m})"),
                    None => attach,
                }
            })
            .collect(),
    );
    let pairs = |m: &BTreeMap<String, String>| joined(m.iter().map(|(k, v)| format!("{k}={v}")).collect());
    let rules = &v.rules;
    let mut placement = Vec::new();
    if let Some(h) = rules.host {
        placement.push(format!("host {h}"));
    }
    if let Some(g) = &rules.anti_affinity {
        placement.push(format!("anti-affinity {g}"));
    }
    if let Some(g) = &rules.affinity {
        placement.push(format!("affinity {g}"));
    }
    if !rules.required_labels.is_empty() {
        placement.push(format!("labels {}", pairs(&rules.required_labels)));
    }
    if rules.wait {
        placement.push("waits for a host".into());
    }
    if let Some(b) = &rules.burst {
        placement.push(burst_rule(b));
    }
    let where_ = match &v.placement {
        novacron_shared::placement::Placement::Host(h) => format!("{host} ({h})"),
        novacron_shared::placement::Placement::Cloud { provider, instance } => {
            format!("cloud {provider}, instance {instance}")
        }
        novacron_shared::placement::Placement::Pending { reason } => format!("pending: {reason}"),
    };
    let mut lines = vec![
        ("id", v.vm.id.to_string()),
        ("name", spec.name.clone()),
        ("host", where_),
        ("power", word(&v.vm.power)),
        (
            "state",
            match (&v.observed, &v.cloud) {
                (Some(o), _) => word(&o.state),
                (None, Some(c)) => format!("in the cloud, {} (see cloud below)", word(&c.state)),
                (None, None) => "unknown (not reported by its host yet)".into(),
            },
        ),
        ("vcpus", spec.vcpus.to_string()),
        ("memory", human_mib(spec.memory_mib)),
        ("disks", disks),
        ("nics", nics),
        ("machine", spec.machine.as_str().to_string()),
        (
            "ha",
            match v.ha.as_ref() {
                Some(h) => match (&h.waiting, &h.fenced) {
                    (Some(w), _) => format!("{} (waiting: {w})", spec.ha),
                    (None, Some(f)) => format!("{} ({}: {})", spec.ha, word(&f.state), f.why),
                    (None, None) => format!("{} (epoch {}, {} restart(s))", spec.ha, h.epoch, h.restarts),
                },
                None => spec.ha.to_string(),
            },
        ),
        ("labels", pairs(&spec.labels)),
        ("placement", joined(placement)),
        (
            "snapshots",
            joined(
                v.observed
                    .as_ref()
                    .map(|o| o.snapshots.clone())
                    .unwrap_or_default(),
            ),
        ),
        ("created", when(v.created_ms, now)),
        ("last op", v.vm.op_id.to_string()),
    ];
    if let Some(c) = &v.cloud {
        lines.extend(crate::burst::vm_fields(c, hosts, now));
    }
    fields(&lines)
}

/// The `POST /v1/vms` body from the flags.
async fn body_from_flags(ctx: &mut Ctx, a: CreateArgs) -> Result<CreateVm, CliError> {
    let disks = a
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| DiskSpec {
            name: d
                .name
                .clone()
                .unwrap_or_else(|| if i == 0 { "root".into() } else { format!("disk{i}") }),
            size_mib: Some(d.size_mib),
            template: None,
        })
        .collect();
    let host = match &a.host {
        Some(h) => Some(ctx.host_id(h).await?),
        None => None,
    };
    let (Some(name), Some(vcpus), Some(memory_mib)) = (a.name, a.vcpus, a.memory) else {
        return Err(CliError::Usage(
            "--name, --vcpus and --memory are needed without --file".into(),
        ));
    };
    Ok(CreateVm {
        spec: VmSpec {
            name,
            vcpus,
            memory_mib,
            disks,
            nics: Vec::new(),
            cloud_init: None,
            boot: None,
            machine: Default::default(),
            ha: false,
            labels: a.labels.into_iter().collect(),
            ephemeral: false,
            ha_priority: 0,
        },
        power: if a.stopped { Power::Stopped } else { Power::Running },
        placement: PlacementRules {
            host,
            required_labels: a.require_labels.into_iter().collect(),
            affinity: a.affinity,
            anti_affinity: a.anti_affinity,
            wait: a.wait,
            burst: a.burst.then(|| BurstRule {
                after_ms: a
                    .burst_after
                    .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                repatriate: !a.no_repatriate,
                instance_types: a.burst_types,
                image: a.burst_image,
            }),
        },
    })
}

fn body_from_file(path: &std::path::Path) -> Result<CreateVm, CliError> {
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
    let v: Vm = ctx.post("/v1/vms", &body).await?;
    if ctx.json() {
        return ctx.print_json(&v);
    }
    let host = ctx.vm_host_label(&v).await;
    ctx.emit(&created(&v, &host))
}

/// The line `vms create` prints; `host` is its host's name.
fn created(v: &Vm, host: &str) -> String {
    use novacron_shared::placement::Placement;
    let at = match &v.placement {
        Placement::Host(h) => format!("on host {host} ({h})"),
        Placement::Cloud { provider, instance } => format!("in the cloud ({provider}:{instance})"),
        Placement::Pending { reason } if v.rules.burst.is_some() => {
            format!("pending (it bursts to the cloud unless a host fits first): {reason}")
        }
        Placement::Pending { reason } => format!("pending (placed when a host fits): {reason}"),
    };
    format!(
        "created VM {} ({}) {at}, power {}\n",
        v.vm.spec.name,
        v.vm.id,
        word(&v.vm.power),
    )
}

async fn power(ctx: &mut Ctx, vm: &str, action: &str) -> Result<(), CliError> {
    let (id, name) = ctx.vm_id(vm).await?;
    let v: Vm = ctx.post_empty(&format!("/v1/vms/{id}/{action}")).await?;
    ctx.report(&v, || {
        format!(
            "VM {name}: power set to {} (now {}); its host converges to it",
            word(&v.vm.power),
            vm_state(&v),
        )
    })
}

async fn snapshot(ctx: &mut Ctx, command: SnapshotCommand) -> Result<(), CliError> {
    match command {
        SnapshotCommand::Create { vm, name: snap } => {
            let (id, name) = ctx.vm_id(&vm).await?;
            let body = CreateSnapshot { name: snap.clone() };
            let v: CommandReply = ctx.post(&format!("/v1/vms/{id}/snapshots"), &body).await?;
            command_done(ctx, &v, format!("snapshot {snap} of VM {name}"), || {
                format!("took snapshot {snap} of VM {name}")
            })
        }
        SnapshotCommand::Revert { vm, name: snap } => {
            let (id, name) = ctx.vm_id(&vm).await?;
            let v: CommandReply = ctx
                .post_empty(&format!("/v1/vms/{id}/snapshots/{}/revert", enc(&snap)))
                .await?;
            command_done(ctx, &v, format!("revert of VM {name} to {snap}"), || {
                format!("reverted VM {name} to snapshot {snap}")
            })
        }
        SnapshotCommand::Delete { vm, name: snap } => {
            let (id, name) = ctx.vm_id(&vm).await?;
            let v: CommandReply = ctx
                .delete(&format!("/v1/vms/{id}/snapshots/{}", enc(&snap)))
                .await?;
            command_done(ctx, &v, format!("deleting snapshot {snap} of VM {name}"), || {
                format!("deleted snapshot {snap} of VM {name}")
            })
        }
    }
}

/// Reports a command's outcome; a failure exits 1 (after the JSON, in JSON mode).
fn command_done(
    ctx: &Ctx,
    v: &CommandReply,
    what: String,
    done: impl FnOnce() -> String,
) -> Result<(), CliError> {
    if ctx.json() {
        ctx.print_json(v)?;
    }
    match &v.outcome {
        CommandOutcome::Failed { message } => Err(CliError::CommandFailed {
            what,
            message: message.clone(),
        }),
        CommandOutcome::Done if ctx.json() => Ok(()),
        CommandOutcome::Done => ctx.emit(&format!("{}\n", done())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> serde_json::Value {
        serde_json::json!({
            "vm": {"id": "00000000-0000-0000-0000-0000000000aa", "op_id": "00000000-0000-0000-0000-0000000000bb",
                   "spec": {"name": "web-1", "vcpus": 2, "memory_mib": 2048,
                            "disks": [{"name": "root", "size_mib": 20480, "template": "debian.qcow2"},
                                      {"name": "data", "size_mib": 1024}],
                            "nics": [{"attach": {"network": "default"}, "mac": null}],
                            "labels": {"tier": "web"}, "machine": "q35", "ha": false},
                   "power": "running"},
            "placement": {"host": "00000000-0000-0000-0000-000000000001"},
            "host": "00000000-0000-0000-0000-000000000001",
            "rules": {"host": null, "required_labels": {}, "affinity": null, "anti_affinity": "web"},
            "created_ms": 1_700_000_000_000u64,
            "observed": {"name": "web-1", "uuid": "x", "state": "running", "managed": true, "snapshots": ["s1"]}
        })
    }

    fn typed(v: serde_json::Value) -> Vm {
        serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_table_names_hosts_and_sums_disks() {
        let hosts = BTreeMap::from([(HostId(1), "hv-1".to_string())]);
        let out = table(&[typed(vm())], &hosts, 1_700_000_060_000);
        let row = out.lines().nth(1).unwrap_or_default();
        for want in ["web-1", "hv-1", "running", "2 GiB", "21 GiB", "1m ago"] {
            assert!(row.contains(want), "{want} in {row}");
        }
    }

    #[test]
    fn show_lists_everything_people_ask_about() {
        let out = show(&typed(vm()), "hv-1", &BTreeMap::new(), 1_700_000_060_000);
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
        unknown["observed"] = serde_json::Value::Null;
        assert!(show(&typed(unknown), "hv-1", &BTreeMap::new(), 0).contains("unknown (not reported"));
    }

    /// web-1 as a burst VM: in the cloud (or launching, or pending), with
    /// its cloud side.
    fn cloud_vm(placement: serde_json::Value, state: &str, instance: Option<&str>) -> Vm {
        let mut v = vm();
        v["placement"] = placement;
        v["host"] = serde_json::Value::Null;
        v["observed"] = serde_json::Value::Null;
        v["rules"] = serde_json::json!({"wait": true, "burst": {"after_ms": 300_000, "repatriate": false,
                                        "instance_types": ["t3.micro", "m5.large"], "image": "debian"}});
        v["cloud"] = serde_json::json!({
            "vm": "00000000-0000-0000-0000-0000000000aa", "name": "web-1", "provider": "aws",
            "launch_id": "l-1", "state": state, "instance": instance, "instance_type": "t3.micro",
            "image": "ami-1", "private_ip": "10.0.0.7", "public_ip": "54.1.2.3",
            "usd_per_hour": 0.0104, "accrued_usd": 0.25, "decided_ms": 1_700_000_000_000u64,
            "reasons": "no host has 2 free vCPUs", "attempts": 1,
            "last_error": "provider unavailable: 503",
            "repatriation": {"host": "00000000-0000-0000-0000-000000000001", "started_ms": 1_700_000_000_000u64,
                             "running_ms": 1_700_000_030_000u64}
        });
        typed(v)
    }

    #[test]
    fn the_table_shows_cloud_launching_and_pending_vms() {
        let hosts = BTreeMap::new();
        let cloud = cloud_vm(
            serde_json::json!({"cloud": {"provider": "aws", "instance": "i-0123"}}),
            "running",
            Some("i-0123"),
        );
        let pending = serde_json::json!({"pending": {"reason": "full"}});
        let launching = cloud_vm(pending.clone(), "launching", None);
        let mut waiting = vm();
        waiting["placement"] = pending;
        waiting["observed"] = serde_json::Value::Null;
        let out = table(&[cloud, launching, typed(waiting)], &hosts, 1_700_000_060_000);
        let cells: Vec<&str> = out
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().nth(2).unwrap_or_default())
            .collect();
        assert_eq!(cells, ["aws:i-0123", "launching", "pending"], "\n{out}");
        let states: Vec<String> = out
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().skip(4).take(2).collect::<Vec<_>>().join(" "))
            .collect();
        assert_eq!(states, ["cloud running", "cloud launching", "- 2"], "\n{out}");
    }

    #[test]
    fn show_has_the_cloud_side_and_the_burst_rule() {
        let v = cloud_vm(
            serde_json::json!({"cloud": {"provider": "aws", "instance": "i-0123"}}),
            "running",
            Some("i-0123"),
        );
        let hosts = BTreeMap::from([(HostId(1), "hv-1".to_string())]);
        let out = show(&v, "-", &hosts, 1_700_000_060_000);
        for want in [
            "host:          cloud aws, instance i-0123",
            "state:         in the cloud, running (see cloud below)",
            "placement:     waits for a host, burst (after 5m; types t3.micro, m5.large; image debian; stays in the cloud)",
            "cloud:         aws i-0123 (t3.micro), running",
            "cloud ips:     private 10.0.0.7, public 54.1.2.3",
            "cloud cost:    $0.0104/h, $0.25 accrued",
            "cloud error:   provider unavailable: 503 (attempt 1)",
            "repatriation:  going home to hv-1: runs there since 30s ago, terminating the instance",
        ] {
            assert!(out.contains(want), "{want:?} in\n{out}");
        }
        assert!(
            !show(&typed(vm()), "hv-1", &hosts, 0).contains("cloud"),
            "no cloud side, no cloud lines"
        );
        let mut at_once = v.rules.burst.clone().unwrap_or_default();
        at_once.after_ms = Some(0);
        assert_eq!(
            burst_rule(&at_once),
            "burst (at once; types t3.micro, m5.large; image debian; stays in the cloud)"
        );
        let plain = BurstRule {
            repatriate: true,
            ..BurstRule::default()
        };
        assert_eq!(burst_rule(&plain), "burst");
    }

    #[test]
    fn create_says_where_the_vm_went() {
        let out = created(&typed(vm()), "hv-1");
        assert_eq!(
            out,
            "created VM web-1 (00000000-0000-0000-0000-0000000000aa) on host hv-1 (00000000-0000-0000-0000-000000000001), power running\n"
        );
        let pending = serde_json::json!({"pending": {"reason": "no host has 2 free vCPUs"}});
        let out = created(&cloud_vm(pending.clone(), "launching", None), "-");
        assert!(
            out.contains(
                "pending (it bursts to the cloud unless a host fits first): no host has 2 free vCPUs"
            ),
            "{out}"
        );
        let mut plain = vm();
        plain["placement"] = pending;
        assert!(created(&typed(plain), "-").contains("pending (placed when a host fits)"));
    }
}
