//! End-to-end VM management on libvirt test-driver hosts: desired state
//! through the API, the agent's reconciler, lifecycle events, commands,
//! and bad specs, with real server and agent processes.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use novacron_e2e::{wait_for, Agent, Server};
use serde_json::{json, Value};

fn spec(name: &str) -> Value {
    json!({
        "name": name,
        "vcpus": 1,
        "memory_mib": 128,
        "disks": [{"name": "root", "size_mib": 64}],
        "labels": {"tier": "web"}
    })
}

fn put_vms(server: &Server, host: &str, vms: Value) -> Value {
    let (status, v) = server.send("PUT", &format!("/v1/hosts/{host}/vms"), &json!({ "vms": vms }));
    assert_eq!(status, 200, "{v}");
    v
}

fn vms(server: &Server, host: &str) -> Value {
    server.get(&format!("/v1/hosts/{host}/vms"))
}

/// Waits until the agent reports a converged pass for `generation` and
/// returns the host's VMs.
fn wait_converged(server: &Server, host: &str, generation: u64) -> Value {
    wait_for(
        &format!("host {host} converged on generation {generation}"),
        Duration::from_secs(30),
        || {
            let v = vms(server, host);
            let r = &v["report"];
            (r["generation"] == generation && r["converged"] == true).then_some(v)
        },
    )
}

fn observed<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    v["observed"]["vms"]
        .as_array()?
        .iter()
        .find(|o| o["name"] == name)
}

#[test]
fn desired_vms_converge_report_events_and_take_commands() {
    let server = Server::start("heartbeat_interval = \"300ms\"");
    let mut agent = Agent::new("host-vms");
    agent.join(&server);
    agent.start(&[]);
    let host = agent.host_id.clone();
    server.wait_connected(&host, true);

    let d = put_vms(
        &server,
        &host,
        json!([
            {"spec": spec("web-1")},
            {"spec": spec("web-2"), "power": "paused"},
            {"spec": spec("db-1"), "power": "stopped"},
        ]),
    );
    let generation = d["generation"].as_u64().unwrap();
    let v = wait_converged(&server, &host, generation);
    assert_eq!(observed(&v, "web-1").unwrap()["state"], "running");
    assert_eq!(observed(&v, "web-2").unwrap()["state"], "paused");
    assert_eq!(observed(&v, "db-1").unwrap()["state"], "stopped");
    for n in ["web-1", "web-2", "db-1"] {
        assert_eq!(observed(&v, n).unwrap()["managed"], true, "{n}");
    }
    // The test driver's own domain is seen but not managed, and left running.
    assert_eq!(observed(&v, "test").unwrap()["managed"], false);
    assert_eq!(observed(&v, "test").unwrap()["state"], "running");
    // Libvirt pushed lifecycle events, which the server keeps per host.
    let events = v["events"].as_array().unwrap();
    assert!(
        events
            .iter()
            .any(|e| e["name"] == "web-1" && e["event"] == "started"),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["name"] == "web-2" && e["event"] == "suspended"),
        "{events:?}"
    );
    // Storage capacity is reported.
    assert!(v["observed"]["capacity"]["storage_mib"].as_u64().is_some());

    // A command, by VM id: snapshot, then it shows in the inventory.
    let web1 = d["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["spec"]["name"] == "web-1")
        .unwrap();
    let id = web1["id"].as_str().unwrap().to_string();
    let (status, r) = server.send(
        "POST",
        &format!("/v1/hosts/{host}/commands"),
        &json!({"snapshot_create": {"vm": id, "name": "before"}}),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["outcome"], "done", "{r}");
    let v = wait_for("snapshot in inventory", Duration::from_secs(10), || {
        let v = vms(&server, &host);
        (observed(&v, "web-1")?["snapshots"] == json!(["before"])).then_some(v)
    });
    assert_eq!(observed(&v, "web-1").unwrap()["state"], "running");
    // A failing command says why.
    let (status, r) = server.send(
        "POST",
        &format!("/v1/hosts/{host}/commands"),
        &json!({"snapshot_revert": {"vm": id, "name": "nope"}}),
    );
    assert_eq!(status, 200, "{r}");
    assert!(
        r["outcome"]["failed"]["message"]
            .as_str()
            .unwrap()
            .contains("no snapshot named"),
        "{r}"
    );

    // Change power and drop a VM: the agent converges again.
    let d = put_vms(
        &server,
        &host,
        json!([
            {"spec": spec("web-1"), "power": "stopped"},
            {"spec": spec("web-2")},
        ]),
    );
    let generation = d["generation"].as_u64().unwrap();
    let web1_again = d["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["spec"]["name"] == "web-1")
        .unwrap();
    assert_eq!(web1_again["id"], web1["id"], "the VM keeps its id across updates");
    let v = wait_converged(&server, &host, generation);
    assert_eq!(observed(&v, "web-1").unwrap()["state"], "stopped");
    assert_eq!(observed(&v, "web-2").unwrap()["state"], "running");
    assert!(observed(&v, "db-1").is_none(), "db-1 was removed: {v}");
    // The report of the converged pass may be a later, quiet one; the
    // removal shows in the agent's log in any case.
    let log = agent.log();
    assert!(
        log.contains("remove db-1"),
        "report actions {}\n{log}",
        v["report"]["actions"]
    );
}

#[test]
fn bad_specs_are_refused_and_change_nothing() {
    let server = Server::start("");
    let mut agent = Agent::new("host-bad");
    agent.join(&server);
    let host = agent.host_id.clone();
    let before = vms(&server, &host);
    let cases = [
        (json!([{"spec": spec("Bad Name")}]), "name: contains"),
        (json!([{"spec": spec("x'/><evil")}]), "name: contains"),
        (
            json!([{"spec": {"name": "big", "vcpus": 100000, "memory_mib": 1_u64 << 60}}]),
            "vcpus",
        ),
        (
            json!([{"spec": spec("dup")}, {"spec": spec("dup")}]),
            "used twice",
        ),
        (
            json!([{"spec": {"name": "ud", "vcpus": 1, "memory_mib": 128, "cloud_init": {"ssh_authorized_keys": ["<script>"]}}}]),
            "ssh_authorized_keys[0]",
        ),
        (
            json!([{"spec": spec("ok"), "power": "flying"}]),
            "unknown variant",
        ),
    ];
    for (body, want) in cases {
        let (status, v) = server.send("PUT", &format!("/v1/hosts/{host}/vms"), &json!({ "vms": body }));
        assert_eq!(status, 400, "{body}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(want), "{body}: {msg}");
    }
    assert_eq!(vms(&server, &host), before, "nothing changed");
    let (status, _) = server.send(
        "PUT",
        "/v1/hosts/00000000-0000-0000-0000-000000000001/vms",
        &json!({"vms": []}),
    );
    assert_eq!(status, 404);
    let (status, v) = novacron_e2e::http(
        server.api,
        "PUT",
        &format!("/v1/hosts/{host}/vms"),
        None,
        Some("{\"vms\": []}"),
    );
    assert_eq!(status, 401, "{v}");
}
