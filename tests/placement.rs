//! VMs through the API: created, placed by the scheduler on three
//! test-driver hosts of different sizes, run by their agents; capacity,
//! anti-affinity and cordons honoured; clear refusals.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use novacron_e2e::{wait_for, Agent, Server};
use serde_json::{json, Value};

/// A test-driver host file with `cpus` CPUs and `mem_gib` GiB.
fn node(dir: &std::path::Path, name: &str, cpus: u32, mem_gib: u64) -> String {
    let path = dir.join(format!("{name}.xml"));
    std::fs::write(
        &path,
        format!(
            "<node><cpu><mhz>2000</mhz><model>x86_64</model><active>{cpus}</active><total>{cpus}</total>\
             <nodes>1</nodes><sockets>1</sockets><cores>{cpus}</cores><threads>1</threads></cpu>\
             <memory>{}</memory></node>",
            mem_gib << 20
        ),
    )
    .unwrap();
    format!("test://{}", path.display())
}

fn vm(name: &str, vcpus: u32, mem: u64) -> Value {
    json!({"name": name, "vcpus": vcpus, "memory_mib": mem, "disks": [{"name": "root", "size_mib": 64}]})
}

#[test]
fn vms_are_placed_within_capacity_and_rules_and_run() {
    let server = Server::start("heartbeat_interval = \"300ms\"");
    let dir = tempfile::tempdir().unwrap();
    let sizes = [("small", 2u32, 4u64), ("medium", 4, 8), ("large", 8, 16)];
    let mut agents = Vec::new();
    let mut host_of = HashMap::new();
    for (name, cpus, mem) in sizes {
        let mut a = Agent::on(name, &node(dir.path(), name, cpus, mem), "");
        a.join(&server);
        a.start(&[]);
        server.wait_connected(&a.host_id, true);
        host_of.insert(a.host_id.clone(), (name, cpus, mem));
        agents.push(a);
    }
    // Capacity arrives with the first inventory.
    wait_for("capacity of every host", Duration::from_secs(20), || {
        let hosts = server.get("/v1/hosts");
        hosts["hosts"]
            .as_array()?
            .iter()
            .all(|h| h["capacity"]["memory_mib"].as_u64().unwrap_or(0) > 0)
            .then_some(())
    });

    // Three VMs that must not share a host, then 27 ordinary ones.
    let mut ids = Vec::new();
    for i in 0..3 {
        let (status, v) = server.send(
            "POST",
            "/v1/vms",
            &json!({"spec": vm(&format!("db-{i}"), 1, 1024), "placement": {"anti_affinity": "db"}}),
        );
        assert_eq!(status, 201, "{v}");
        ids.push(v["vm"]["id"].as_str().unwrap().to_string());
    }
    let (status, v) = server.send(
        "POST",
        "/v1/vms",
        &json!({"spec": vm("db-3", 1, 1024), "placement": {"anti_affinity": "db"}}),
    );
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["error"]["code"], "no_capacity");
    assert_eq!(
        v["error"]["message"], "no host fits: 3 hosts excluded by anti-affinity",
        "{v}"
    );
    for i in 0..27 {
        let (status, v) = server.send(
            "POST",
            "/v1/vms",
            &json!({"spec": vm(&format!("web-{i}"), 1, 512)}),
        );
        assert_eq!(status, 201, "{v}");
        ids.push(v["vm"]["id"].as_str().unwrap().to_string());
    }

    // Where did they go?
    let list = server.get("/v1/vms?limit=1000");
    let vms = list["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 30);
    let mut used: HashMap<String, (u64, u64)> = HashMap::new();
    let mut db_hosts = std::collections::HashSet::new();
    for v in vms {
        let host = v["host"].as_str().unwrap().to_string();
        let e = used.entry(host.clone()).or_default();
        e.0 += v["vm"]["spec"]["vcpus"].as_u64().unwrap();
        e.1 += v["vm"]["spec"]["memory_mib"].as_u64().unwrap();
        if v["vm"]["spec"]["name"].as_str().unwrap().starts_with("db-") {
            assert!(db_hosts.insert(host), "two db VMs on one host");
        }
    }
    assert_eq!(db_hosts.len(), 3);
    for (host, (vcpus, mem)) in &used {
        let (name, cpus, gib) = host_of[host];
        assert!(
            *vcpus <= u64::from(cpus) * 4,
            "{name}: {vcpus} vCPUs on {cpus} CPUs"
        );
        assert!(*mem <= gib << 10, "{name}: {mem} MiB on {gib} GiB");
    }
    // Spread: the large host takes the most, every host takes some.
    assert_eq!(used.len(), 3, "{used:?}");

    // Every VM runs on its host, as the agents report.
    for id in &ids {
        wait_for(&format!("VM {id} running"), Duration::from_secs(30), || {
            let v = server.get(&format!("/v1/vms/{id}"));
            (v["observed"]["state"] == "running").then_some(())
        });
    }

    // Memory runs out: a clear refusal naming the filter.
    let (status, v) = server.send("POST", "/v1/vms", &json!({"spec": vm("huge", 1, 64 * 1024)}));
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["error"]["message"], "no host fits: 3 hosts exhausted memory");
    let (status, v) = server.send("POST", "/v1/vms", &json!({"spec": vm("web-0", 1, 512)}));
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["error"]["code"], "name_taken");

    // A cordoned host takes nothing new.
    let large = host_of.iter().find(|(_, v)| v.0 == "large").unwrap().0.clone();
    let (status, _) = server.send("POST", &format!("/v1/hosts/{large}/cordon"), &json!({}));
    assert_eq!(status, 200);
    for i in 0..4 {
        let (status, v) = server.send(
            "POST",
            "/v1/vms",
            &json!({"spec": vm(&format!("late-{i}"), 1, 256)}),
        );
        assert_eq!(status, 201, "{v}");
        assert_ne!(v["host"].as_str().unwrap(), large, "placed on a cordoned host");
    }

    // Power and deletion go through the desired state.
    let id = &ids[3];
    let (status, _) = server.send("POST", &format!("/v1/vms/{id}/stop"), &json!({}));
    assert_eq!(status, 202);
    wait_for("the VM stopped", Duration::from_secs(30), || {
        (server.get(&format!("/v1/vms/{id}"))["observed"]["state"] == "stopped").then_some(())
    });
    let (status, _) = server.send("DELETE", &format!("/v1/vms/{id}"), &json!({}));
    assert_eq!(status, 200);
    let (status, _) = novacron_e2e::http(
        server.api,
        "GET",
        &format!("/v1/vms/{id}"),
        Some(&server.token),
        None,
    );
    assert_eq!(status, 404);
    let host = vms.iter().find(|v| v["vm"]["id"] == id.as_str()).unwrap()["host"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for("the VM gone from its host", Duration::from_secs(30), || {
        let h = server.get(&format!("/v1/hosts/{host}/vms"));
        let gone = !h["observed"]["vms"]
            .as_array()?
            .iter()
            .any(|o| o["uuid"] == id.as_str());
        gone.then_some(())
    });

    // Bad bodies.
    for (body, want) in [
        (json!({"spec": vm("Bad", 1, 128)}), "name: contains"),
        (
            json!({"spec": vm("x", 1, 128), "placement": {"anti_affinity": "a b"}}),
            "placement group",
        ),
        (
            json!({"spec": vm("x", 1, 128), "nope": 1}),
            "unknown field `nope`",
        ),
    ] {
        let (status, v) = server.send("POST", "/v1/vms", &body);
        assert_eq!(status, 400, "{body}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(want), "{v}");
    }
    let (status, v) = server.send(
        "POST",
        &format!("/v1/vms/{}/snapshots", ids[4]),
        &json!({"name": "</x>"}),
    );
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["code"], "invalid_name");
    // Paging.
    let first = server.get("/v1/vms?limit=10");
    assert_eq!(first["vms"].as_array().unwrap().len(), 10);
    let next = first["next"].as_str().unwrap();
    let second = server.get(&format!("/v1/vms?limit=100&after={next}"));
    assert_eq!(second["vms"].as_array().unwrap().len(), 33 - 10);
}

#[test]
fn host_labels_from_the_agent_config_steer_required_labels() {
    let server = Server::start("heartbeat_interval = \"300ms\"");
    let dir = tempfile::tempdir().unwrap();
    let mut agents = Vec::new();
    for (name, labels) in [("plain", ""), ("gpu", "gpu = \"yes\"\nrack = \"r2\"")] {
        // The agent config's [vms] table, then its [labels] table.
        let vms = format!(
            "storage_path = \"{}\"\nconsole_log_dir = \"{}\"\n[labels]\n{labels}",
            dir.path().join(format!("pool-{name}")).display(),
            dir.path().display()
        );
        let mut a = Agent::on(name, &node(dir.path(), name, 8, 16), &vms);
        a.join(&server);
        a.start(&[]);
        server.wait_connected(&a.host_id, true);
        agents.push(a);
    }
    let gpu_host = agents[1].host_id.clone();
    let host = wait_for("the gpu host's labels", Duration::from_secs(20), || {
        let h = server.host(&gpu_host);
        (h["labels"]["gpu"] == "yes").then_some(h)
    });
    assert_eq!(host["labels"]["rack"], "r2");
    wait_for("capacity of both hosts", Duration::from_secs(20), || {
        agents
            .iter()
            .all(|a| {
                server.host(&a.host_id)["capacity"]["memory_mib"]
                    .as_u64()
                    .unwrap_or(0)
                    > 0
            })
            .then_some(())
    });
    for i in 0..3 {
        let (s, v) = server.send(
            "POST",
            "/v1/vms",
            &json!({"spec": vm(&format!("train-{i}"), 1, 256), "placement": {"required_labels": {"gpu": "yes"}}}),
        );
        assert_eq!(s, 201, "{v}");
        assert_eq!(v["host"], gpu_host.as_str(), "placed on the labelled host");
    }
    let (s, v) = server.send(
        "POST",
        "/v1/vms",
        &json!({"spec": vm("nowhere", 1, 256), "placement": {"required_labels": {"gpu": "no"}}}),
    );
    assert_eq!(s, 409, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("2 hosts missing required labels"), "{msg}");
}

#[test]
fn a_server_killed_right_after_a_create_keeps_the_vm_and_its_audit_entry_and_runs_it_once() {
    let mut server = Server::start("heartbeat_interval = \"300ms\"");
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::on("solo", &node(dir.path(), "solo", 4, 8), "");
    agent.join(&server);
    agent.start(&[]);
    server.wait_connected(&agent.host_id, true);
    wait_for("capacity", Duration::from_secs(20), || {
        (server.host(&agent.host_id)["capacity"]["memory_mib"].as_u64()? > 0).then_some(())
    });
    let (s, v) = server.send("POST", "/v1/vms", &json!({"spec": vm("survivor", 1, 256)}));
    assert_eq!(s, 201, "{v}");
    let id = v["vm"]["id"].as_str().unwrap().to_string();
    // Killed the moment the create was acknowledged.
    server.kill9();
    server.restart();
    server.wait_connected(&agent.host_id, true);
    let seen = wait_for(
        "the VM running after the restart",
        Duration::from_secs(30),
        || {
            let v = server.get(&format!("/v1/vms/{id}"));
            (v["observed"]["state"] == "running").then_some(v)
        },
    );
    assert_eq!(seen["host"], agent.host_id.as_str());
    let all = server.get("/v1/vms");
    assert_eq!(all["vms"].as_array().unwrap().len(), 1, "{all:#}");
    let inv = server.get(&format!("/v1/hosts/{}/vms", agent.host_id));
    let domains: Vec<&Value> = inv["observed"]["vms"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["name"] == "survivor")
        .collect();
    assert_eq!(domains.len(), 1, "one domain, not two: {inv:#}");
    let audit = server.get("/v1/audit");
    assert!(
        audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["path"] == "/v1/vms" && e["method"] == "POST" && e["status"] == 201),
        "the create's audit entry survived the kill: {audit:#}"
    );
}

#[test]
fn a_vm_asked_to_wait_is_pending_until_a_host_fits_then_runs() {
    let server = Server::start("heartbeat_interval = \"300ms\"");
    let dir = tempfile::tempdir().unwrap();
    let mut a = Agent::on("h1", &node(dir.path(), "h1", 2, 4), "");
    a.join(&server);
    a.start(&[]);
    server.wait_connected(&a.host_id, true);
    wait_for("the host's capacity", Duration::from_secs(20), || {
        (server.host(&a.host_id)["capacity"]["memory_mib"]
            .as_u64()
            .unwrap_or(0)
            > 0)
        .then_some(())
    });
    let (s, v) = server.send("POST", "/v1/vms", &json!({"spec": vm("big", 1, 3500)}));
    assert_eq!(s, 201, "{v}");
    let big = v["vm"]["id"].as_str().unwrap().to_string();
    let (s, v) = server.send(
        "POST",
        "/v1/vms",
        &json!({"spec": vm("later", 1, 2048), "placement": {"wait": true}}),
    );
    assert_eq!(s, 201, "{v}");
    let later = v["vm"]["id"].as_str().unwrap().to_string();
    let reason = v["placement"]["pending"]["reason"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(reason.starts_with("no host fits"), "the scheduler's reasons: {v}");
    novacron_e2e::assert_holds(
        "it waits while the host is full",
        Duration::from_secs(1),
        || match server.get(&format!("/v1/vms/{later}"))["placement"]["pending"].is_object() {
            true => Ok(()),
            false => Err("placed on a full host".into()),
        },
    );
    let (s, v) = server.send("DELETE", &format!("/v1/vms/{big}"), &json!({}));
    assert_eq!(s, 200, "{v}");
    wait_for(
        "the waiting VM placed and running",
        Duration::from_secs(30),
        || {
            let v = server.get(&format!("/v1/vms/{later}"));
            (v["placement"]["host"] == a.host_id.as_str() && v["observed"]["state"] == "running")
                .then_some(())
        },
    );
}
