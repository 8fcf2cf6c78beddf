//! Live migration and drain between two real libvirtd hosts, each in its
//! own network namespace (`packaging/dev/testbed.sh hosts-up 2`), with a
//! running TCG guest: the guest keeps running on the target and the API
//! shows its new host; a migration that cannot reach its target fails,
//! and the VM keeps running on its source. Needs root, QEMU, libvirt and
//! the guest files (`.ci/run` provides them); fails loudly without.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use novacron_e2e::{
    assert_holds, domstate as domstate_at, guest_dir, testbed_command, wait_for, Agent, Server,
};
use serde_json::{json, Value};

/// One namespaced libvirt host.
#[derive(Debug, Clone)]
struct NsHost {
    /// Also its network namespace's name.
    name: String,
    local_uri: String,
    migration_uri: String,
}

/// The namespaced hosts; torn down on drop.
struct Hosts(Vec<NsHost>);

impl Hosts {
    fn up(n: usize) -> Hosts {
        let out = testbed_command()
            .args(["hosts-up", &n.to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "`testbed.sh hosts-up {n}` failed (needs root and `testbed.sh install`):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let hosts: Vec<NsHost> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                (f.len() == 4).then(|| NsHost {
                    name: f[0].into(),
                    local_uri: f[2].into(),
                    migration_uri: f[3].into(),
                })
            })
            .collect();
        assert_eq!(
            hosts.len(),
            n,
            "hosts-up printed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        Hosts(hosts)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = testbed_command().arg("hosts-down").output();
    }
}

/// The domain's state on a host (`Some("running")`, `Some("shut off")`,
/// ...), or `None` when that host's libvirtd answers that it has no such
/// domain; any other failure fails the test (`novacron_e2e::domstate`).
fn domstate(h: &NsHost, uuid: &str) -> Option<String> {
    domstate_at(&h.local_uri, uuid)
}

/// The check above tells "no such domain" from "no answer": a missing
/// domain on the running libvirtd is `None`, and a host whose libvirtd is
/// unreachable fails instead of passing for one that lacks the domain.
#[test]
fn domstate_tells_a_missing_domain_from_an_unreachable_host() {
    let missing = "00000000-0000-0000-0000-00000000dead";
    assert_eq!(domstate_at("qemu:///system", missing), None);
    let dead = "qemu+unix:///system?socket=/nonexistent/novacron-test/libvirt-sock";
    let r = std::panic::catch_unwind(|| domstate_at(dead, missing));
    let msg = r.expect_err("an unreachable libvirtd passed for a missing domain");
    let msg = msg
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_else(|| panic!("panic payload is not a String"));
    assert!(msg.contains("failed to connect to the hypervisor"), "{msg}");
}

/// Waits for an operation to end; returns it.
fn wait_op(server: &Server, op: &Value) -> Value {
    let id = op["id"].as_str().unwrap().to_string();
    let mut percents = Vec::new();
    let done = wait_for("the operation to end", Duration::from_secs(180), || {
        let o = server.get(&format!("/v1/operations/{id}"));
        percents.push(o["progress"]["percent"].as_u64().unwrap_or(0));
        matches!(o["state"].as_str(), Some("succeeded" | "failed")).then_some(o)
    });
    eprintln!(
        "operation {} {}: {} ms",
        done["kind"],
        done["state"],
        done["updated_ms"].as_u64().unwrap_or(0) - done["created_ms"].as_u64().unwrap_or(0)
    );
    assert!(
        percents.windows(2).all(|w| w[0] <= w[1]) || done["state"] == "failed",
        "progress only moves forward: {percents:?}"
    );
    done
}

fn host_of(server: &Server, vm: &str) -> String {
    server.get(&format!("/v1/vms/{vm}"))["host"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn a_running_guest_live_migrates_and_drains_between_two_real_hosts() {
    let guest = guest_dir();
    let hosts = Hosts::up(2);
    let scratch = tempfile::Builder::new()
        .prefix("nc-mig-")
        .tempdir_in("/var/tmp")
        .unwrap();
    // QEMU runs as its own user: the console directory must be reachable.
    let console = scratch.path().join("console");
    std::fs::create_dir_all(&console).unwrap();
    for p in [scratch.path(), console.as_path()] {
        Command::new("chmod").arg("0755").arg(p).status().unwrap();
    }
    let server = Server::start_with(
        "heartbeat_interval = \"300ms\"",
        "",
        "[migration]\ntimeout = \"90s\"\n",
    );
    let mut agents = Vec::new();
    for h in &hosts.0 {
        let vms = format!(
            "virt_type = \"qemu\"\nmigration_uri = \"{}\"\nconsole_log_dir = \"{}\"\nstorage_path = \"{}\"",
            h.migration_uri,
            console.display(),
            scratch.path().join(format!("pool-{}", h.name)).display()
        );
        let mut a = Agent::on(&h.name, &h.local_uri, &vms);
        a.join(&server);
        a.start(&[]);
        server.wait_connected(&a.host_id, true);
        agents.push(a);
    }
    let (h1, h2) = (&hosts.0[0], &hosts.0[1]);
    let (id1, id2) = (agents[0].host_id.clone(), agents[1].host_id.clone());
    wait_for("both hosts to report capacity", Duration::from_secs(30), || {
        [&id1, &id2]
            .iter()
            .all(|id| server.host(id)["capacity"]["memory_mib"].as_u64().unwrap_or(0) > 0)
            .then_some(())
    });

    // A diskless TCG guest booted from the same kernel path on both hosts.
    let spec = json!({
        "name": "mig-1", "vcpus": 1, "memory_mib": 128,
        "boot": {"kernel": guest.join("vmlinuz"), "initrd": guest.join("initrd.img"),
                 "cmdline": "console=ttyS0 panic=-1"}
    });
    let (s, v) = server.send(
        "POST",
        "/v1/vms",
        &json!({"spec": spec, "placement": {"host": id1}}),
    );
    assert_eq!(s, 201, "{v}");
    let vm = v["vm"]["id"].as_str().unwrap().to_string();
    let log = console.join("mig-1.console.log");
    wait_for("the guest to boot on host 1", Duration::from_secs(120), || {
        std::fs::read_to_string(&log)
            .ok()?
            .contains("NOVACRON-GUEST-BOOTED")
            .then_some(())
    });
    wait_for("the server to see it running", Duration::from_secs(20), || {
        (server.get(&format!("/v1/vms/{vm}"))["observed"]["state"] == "running").then_some(())
    });

    // Pre-checks refuse clearly: same host, unknown host, a viewer.
    let (s, v) = server.send("POST", &format!("/v1/vms/{vm}/migrate"), &json!({"host": id1}));
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("already runs"),
        "{v}"
    );
    let (s, v) = server.send(
        "POST",
        &format!("/v1/vms/{vm}/migrate"),
        &json!({"host": "00000000-0000-0000-0000-0000000000ff"}),
    );
    assert_eq!(s, 404, "an unknown target host is not found: {v}");
    assert_eq!(v["error"]["code"], "not_found", "{v}");

    // Live migration to host 2, named.
    let (s, v) = server.send("POST", &format!("/v1/vms/{vm}/migrate"), &json!({"host": id2}));
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["operation"]["kind"], "migrate");
    // While it runs, the VM cannot be deleted or stopped.
    let (s, _) = server.send("DELETE", &format!("/v1/vms/{vm}"), &json!({}));
    let op = wait_op(&server, &v["operation"]);
    assert_eq!(op["state"], "succeeded", "{op:#}");
    assert_eq!(op["progress"]["percent"], 100);
    assert_eq!(s, 409, "a delete during the migration is refused");
    assert_eq!(host_of(&server, &vm), id2, "the API shows the new host");
    assert_eq!(
        domstate(h2, &vm).as_deref(),
        Some("running"),
        "the guest runs on host 2"
    );
    assert_eq!(domstate(h1, &vm), None, "and is gone from host 1");
    wait_for("host 2's agent to own it", Duration::from_secs(20), || {
        let v = server.get(&format!("/v1/vms/{vm}"));
        (v["observed"]["state"] == "running").then_some(())
    });
    // Both agents are converged with nothing left to do: no duplicate
    // appears on host 1 while they keep reconciling.
    assert_holds(
        "host 1 without the migrated VM",
        Duration::from_secs(2),
        || match domstate(h1, &vm) {
            None => Ok(()),
            Some(s) => Err(format!("host 1's agent recreated it ({s})")),
        },
    );

    // A migration whose target refuses connections fails; the VM keeps
    // running on its source and the claim is released.
    let block = |add: bool| {
        let rule = if add {
            "add table inet ncblock; add chain inet ncblock in { type filter hook input priority 0; }; add rule inet ncblock in tcp dport 16509 reject with tcp reset"
        } else {
            "delete table inet ncblock"
        };
        let st = Command::new("ip")
            .args(["netns", "exec", &h1.name, "nft", rule])
            .status()
            .unwrap();
        assert!(st.success(), "nft {rule}");
    };
    block(true);
    let (s, v) = server.send("POST", &format!("/v1/vms/{vm}/migrate"), &json!({"host": id1}));
    assert_eq!(s, 202, "{v}");
    let op = wait_op(&server, &v["operation"]);
    block(false);
    assert_eq!(op["state"], "failed", "{op:#}");
    let err = op["error"].as_str().unwrap();
    assert!(err.contains("keeps running on host"), "{err}");
    assert_eq!(host_of(&server, &vm), id2);
    assert_eq!(
        domstate(h2, &vm).as_deref(),
        Some("running"),
        "still running on its source"
    );
    assert_eq!(domstate(h1, &vm), None, "nothing left on the target");

    // Drain host 2: the VM moves back to host 1 (the only other host) and
    // host 2 is cordoned.
    let (s, v) = server.send("POST", &format!("/v1/hosts/{id2}/drain"), &json!({}));
    assert_eq!(s, 202, "{v}");
    let op = wait_op(&server, &v["operation"]);
    assert_eq!(op["state"], "succeeded", "{op:#}");
    assert_eq!(host_of(&server, &vm), id1);
    assert_eq!(domstate(h1, &vm).as_deref(), Some("running"));
    assert_eq!(domstate(h2, &vm), None);
    let ops = server.get("/v1/operations");
    assert!(ops["operations"].as_array().unwrap().len() >= 4, "{ops:#}");
    // The cordon holds: a new VM pinned to host 2 is refused.
    let (s, v) = server.send(
        "POST",
        "/v1/vms",
        &json!({"spec": {"name": "after-drain", "vcpus": 1, "memory_mib": 64}, "placement": {"host": id2}}),
    );
    assert_eq!(s, 409, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("cordon"), "{v}");
    // The guest itself lived through both moves: it still answers the ACPI
    // power button (its /init prints a marker and powers off).
    let (s, v) = server.send("POST", &format!("/v1/vms/{vm}/stop"), &json!({}));
    assert_eq!(s, 202, "{v}");
    wait_for(
        "the guest to power off by itself",
        Duration::from_secs(60),
        || {
            std::fs::read_to_string(&log)
                .ok()?
                .contains("NOVACRON-GUEST-POWEROFF")
                .then_some(())
        },
    );
    wait_for("the API to show it stopped", Duration::from_secs(30), || {
        (server.get(&format!("/v1/vms/{vm}"))["observed"]["state"] == "stopped").then_some(())
    });
    let (s, _) = server.send("DELETE", &format!("/v1/vms/{vm}"), &json!({}));
    assert_eq!(s, 200);
    wait_for("the guest to be removed", Duration::from_secs(60), || {
        domstate(h1, &vm).is_none().then_some(())
    });
}
