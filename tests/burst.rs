//! Cloud burst end to end: a real server with `[burst]` against moto's
//! real EC2 server on loopback (and the fault proxy in front of it where a
//! fault moto cannot make is needed), one real agent on a libvirt
//! test-driver host that the tests fill, VMs through the API.
//!
//! - a full fleet sends a burstable VM to EC2 with the right type, AMI,
//!   tags and user data (read back from moto); a VM that only waits stays
//!   pending with the scheduler's reasons;
//! - the instance and $/h caps stop bursts with clear reasons; deleting a
//!   burst VM releases its share;
//! - kill -9 of the server after the launch id is stored, and after
//!   RunInstances answered: after the restart exactly one instance exists;
//! - throttles and 5xx are retried and shown, then succeed; a lost answer
//!   is found by tag; a permanent error ends the launch;
//! - a freed host brings the VM home: it runs there, the instance is
//!   terminated, cost stops accruing;
//! - an orphan instance is reported and terminated after its grace;
//! - a bad `[burst]` config is refused naming the key, and the credentials
//!   never appear in the logs or the API.

#![allow(clippy::unwrap_used)]
// The harness times real processes (see harness.rs).
#![allow(clippy::disallowed_methods)]

// Included here, not in the harness library: they link the EC2 SDK.
#[path = "cli_common.rs"]
mod cli_common;
#[allow(dead_code)]
#[path = "harness/faultproxy.rs"]
mod faultproxy;
#[allow(dead_code)]
#[path = "harness/moto.rs"]
mod moto;

use std::time::Duration;

use faultproxy::{Fault, FaultProxy};
use moto::{Moto, ACCESS_KEY_ID, SECRET_ACCESS_KEY};
use novacron_e2e::{assert_holds, wait_for, Agent, Server};
use serde_json::{json, Value};

const USER_DATA: &str = "#cloud-config\nhostname: web-1\n";
const WAIT: Duration = Duration::from_secs(30);

/// A test-driver host file: 2 CPUs, 4 GiB.
fn node(dir: &std::path::Path) -> String {
    let path = dir.join("host.xml");
    std::fs::write(
        &path,
        format!(
            "<node><cpu><mhz>2000</mhz><model>x86_64</model><active>2</active><total>2</total>\
             <nodes>1</nodes><sockets>1</sockets><cores>2</cores><threads>1</threads></cpu>\
             <memory>{}</memory></node>",
            4u64 << 20
        ),
    )
    .unwrap();
    format!("test://{}", path.display())
}

/// `[burst]` against `endpoint`, with `extra` keys of `[burst]`.
fn burst_toml(endpoint: &str, image: &str, extra: &str) -> String {
    format!(
        "[burst]\nenabled = true\ninterval = \"200ms\"\nretry_max = \"1s\"\n{extra}\n\
         [burst.aws]\nregion = \"us-east-1\"\nendpoint = \"{endpoint}\"\n\
         access_key_id = \"{ACCESS_KEY_ID}\"\nsecret_access_key = \"{SECRET_ACCESS_KEY}\"\n\
         call_timeout = \"5s\"\nimages = {{ \"debian\" = \"{image}\" }}\n"
    )
}

struct Bed {
    moto: Moto,
    server: Server,
    agent: Agent,
    _dir: tempfile::TempDir,
}

/// moto, a server bursting to `endpoint(moto)` with `extra`, and one agent
/// on a 2-CPU, 4-GiB host filled by a 3,500 MiB VM.
fn bed(extra: &str, endpoint: impl FnOnce(&Moto) -> String) -> Bed {
    let moto = Moto::start();
    let image = moto.image();
    let toml = burst_toml(&endpoint(&moto), &image, extra);
    let server = Server::start_with("heartbeat_interval = \"300ms\"", "", &toml);
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::on("h1", &node(dir.path()), "");
    agent.join(&server);
    agent.start(&[]);
    server.wait_connected(&agent.host_id, true);
    wait_for("the host's capacity", WAIT, || {
        let h = server.host(&agent.host_id);
        (h["capacity"]["memory_mib"].as_u64().unwrap_or(0) > 0).then_some(())
    });
    let (s, v) = server.send(
        "POST",
        "/v1/vms",
        &json!({"spec": {"name": "filler", "vcpus": 1, "memory_mib": 3500}}),
    );
    assert_eq!(s, 201, "{v}");
    Bed {
        moto,
        server,
        agent,
        _dir: dir,
    }
}

/// A burstable VM of 2 vCPUs and 2 GiB (a t3.small), booted from the
/// `debian` image, with cloud-init user data.
fn burstable(server: &Server, name: &str) -> String {
    create(
        server,
        json!({
            "spec": {"name": name, "vcpus": 2, "memory_mib": 2048,
                     "disks": [{"name": "root", "size_mib": 64}],
                     "cloud_init": {"user_data": USER_DATA}},
            "placement": {"burst": {"image": "debian"}}
        }),
    )
}

fn create(server: &Server, body: Value) -> String {
    let (s, v) = server.send("POST", "/v1/vms", &body);
    assert_eq!(s, 201, "{v}");
    v["vm"]["id"].as_str().unwrap().to_string()
}

fn vm(server: &Server, id: &str) -> Value {
    server.get(&format!("/v1/vms/{id}"))
}

/// Waits until the VM's instance runs; returns the VM.
fn wait_running_in_cloud(server: &Server, id: &str) -> Value {
    wait_for("the VM running in the cloud", WAIT, || {
        let v = vm(server, id);
        (v["cloud"]["state"] == "running" && v["placement"]["cloud"].is_object()).then_some(v)
    })
}

fn pending_reason(server: &Server, id: &str) -> Option<String> {
    vm(server, id)["placement"]["pending"]["reason"]
        .as_str()
        .map(str::to_string)
}

/// Instances of `vm` in moto that are not terminated.
fn live_instances(moto: &Moto, vm: &str) -> Vec<moto::MotoInstance> {
    moto.instances_tagged(novacron_cloud::TAG_VM, vm)
        .into_iter()
        .filter(|i| i.state != "terminated" && i.state != "shutting-down")
        .collect()
}

/// Neither the server's logs nor its API show the secret.
fn assert_no_secret(server: &Server, id: &str) {
    let logs = server.logs();
    assert!(
        !logs.contains(SECRET_ACCESS_KEY),
        "the secret is in the server's log"
    );
    for path in ["/v1/burst".to_string(), format!("/v1/vms/{id}"), "/v1/vms".into()] {
        let text = server.get(&path).to_string();
        assert!(!text.contains(SECRET_ACCESS_KEY), "the secret is in {path}");
    }
}

#[test]
fn a_full_fleet_bursts_a_burstable_vm_and_a_waiting_vm_stays_pending() {
    let b = bed("", Moto::endpoint);
    let web = burstable(&b.server, "web");
    let v = wait_running_in_cloud(&b.server, &web);
    let cloud = &v["cloud"];
    assert_eq!(cloud["instance_type"], "t3.small", "{v}");
    assert!(
        cloud["reasons"].as_str().unwrap().contains("no host fits"),
        "the decision records the scheduler's reasons: {v}"
    );
    let id = cloud["instance"].as_str().unwrap();
    assert_eq!(v["placement"]["cloud"]["instance"], id);
    let i = b.moto.instance(id).expect("the instance in moto");
    assert_eq!(i.instance_type, "t3.small");
    assert_eq!(i.image, b.moto.image());
    assert_eq!(i.user_data.as_deref(), Some(USER_DATA));
    let fleet = b.server.get("/v1/burst")["fleet"].as_str().unwrap().to_string();
    assert!(fleet.starts_with("nc-"), "{fleet}");
    assert_eq!(i.tags.get("novacron:vm-id"), Some(&web));
    assert_eq!(i.tags.get("novacron:fleet"), Some(&fleet));
    assert_eq!(
        i.tags.get("novacron:launch-id").map(String::as_str),
        cloud["launch_id"].as_str()
    );
    assert_eq!(i.tags.get("Name").map(String::as_str), Some("web"));
    assert_eq!(live_instances(&b.moto, &web).len(), 1);

    // Not burstable, asked to wait: pending with the scheduler's reasons,
    // and no instance.
    let plain = create(
        &b.server,
        json!({"spec": {"name": "plain", "vcpus": 1, "memory_mib": 2048}, "placement": {"wait": true}}),
    );
    assert_holds(
        "a waiting VM stays pending, in no cloud",
        Duration::from_secs(2),
        || {
            let r = pending_reason(&b.server, &plain).ok_or("not pending")?;
            if !r.contains("no host fits") {
                return Err(format!("reason {r:?}"));
            }
            if b.moto.instances_tagged("novacron:vm-id", &plain).is_empty() {
                Ok(())
            } else {
                Err("an instance was launched".into())
            }
        },
    );
    // Neither: refused with the reasons, as before.
    let (s, v) = b.server.send(
        "POST",
        "/v1/vms",
        &json!({"spec": {"name": "refused", "vcpus": 1, "memory_mib": 2048}}),
    );
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("no_capacity")),
        "{v}"
    );
    let status = b.server.get("/v1/burst");
    assert_eq!(status["budget"]["instances"], 1, "{status}");
    // The operator's view: `novacron burst` and `vms show`.
    let out = cli_common::run(&b.server, &["burst"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in ["web", id, "t3.small", "plain", "no host fits"] {
        assert!(text.contains(want), "`novacron burst` lacks {want:?}:\n{text}");
    }
    let out = cli_common::run(&b.server, &["vms", "show", "web"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(id) && text.contains("t3.small"),
        "{text}"
    );
    assert!(status["pending"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["vm"] == plain.as_str()));
    assert_no_secret(&b.server, &web);
}

#[test]
fn caps_stop_bursts_with_clear_reasons_and_a_deleted_vm_releases_its_share() {
    // t3.small is $0.0208/h, t3.micro $0.0104/h.
    let b = bed("max_instances = 2\nmax_usd_per_hour = 0.035\n", Moto::endpoint);
    let web1 = burstable(&b.server, "web1");
    wait_running_in_cloud(&b.server, &web1);
    let web2 = burstable(&b.server, "web2");
    let reason = wait_for("the hourly cap's reason", WAIT, || {
        pending_reason(&b.server, &web2).filter(|r| r.contains("hourly cap"))
    });
    assert!(reason.contains("max_usd_per_hour"), "{reason}");
    assert!(live_instances(&b.moto, &web2).is_empty());
    // Deleting web1 releases its share: web2 bursts.
    let (s, v) = b.server.send("DELETE", &format!("/v1/vms/{web1}"), &json!({}));
    assert_eq!(s, 200, "{v}");
    wait_running_in_cloud(&b.server, &web2);
    wait_for("web1's instance terminated", WAIT, || {
        live_instances(&b.moto, &web1).is_empty().then_some(())
    });
    // Two small VMs (1 GiB: the host cannot take them either), limited to
    // t3.micro ($0.0104/h): the second hits the instance cap.
    let small = |name: &str| {
        create(
            &b.server,
            json!({"spec": {"name": name, "vcpus": 1, "memory_mib": 1024},
                   "placement": {"burst": {"image": "debian", "instance_types": ["t3.micro"]}}}),
        )
    };
    let n1 = small("nano1");
    wait_running_in_cloud(&b.server, &n1);
    let n2 = small("nano2");
    let reason = wait_for("the instance cap's reason", WAIT, || {
        pending_reason(&b.server, &n2).filter(|r| r.contains("instance cap"))
    });
    assert!(reason.contains("2 of 2"), "{reason}");
    assert!(live_instances(&b.moto, &n2).is_empty());
    let nano = live_instances(&b.moto, &n1);
    assert_eq!(nano.len(), 1);
    assert_eq!(nano[0].instance_type, "t3.micro", "the VM's type limit");
}

/// Kills the server at `point` while it bursts a VM, restarts it, and
/// checks that exactly one instance exists for the VM.
fn crash_at(point: &str, instances_at_crash: usize) {
    let mut b = bed("", Moto::endpoint);
    b.server.kill9();
    b.server.restart_with_env(&[("NOVACRON_CRASH_AT", point)]);
    let web = burstable(&b.server, "web");
    wait_for("the crash point", WAIT, || {
        b.server.logs().contains("crash point reached").then_some(())
    });
    assert_eq!(vm(&b.server, &web)["cloud"]["state"], "launching");
    b.server.kill9();
    assert_eq!(
        live_instances(&b.moto, &web).len(),
        instances_at_crash,
        "instances when the server died at {point}"
    );
    b.server.restart_with_env(&[]);
    b.server.wait_connected(&b.agent.host_id, true);
    wait_running_in_cloud(&b.server, &web);
    assert_holds(
        "exactly one instance for the VM",
        Duration::from_secs(2),
        || match live_instances(&b.moto, &web).len() {
            1 => Ok(()),
            n => Err(format!("{n} instances")),
        },
    );
    let logs = b.server.logs();
    assert!(!logs.contains(SECRET_ACCESS_KEY));
}

#[test]
fn a_server_killed_after_storing_the_launch_id_launches_once_after_restart() {
    crash_at("burst-launch-stored", 0);
}

#[test]
fn a_server_killed_after_run_instances_answered_adopts_the_instance_after_restart() {
    crash_at("burst-launch-answered", 1);
}

#[test]
fn throttles_and_server_errors_are_retried_and_shown_then_succeed() {
    let proxy = std::cell::OnceCell::new();
    let b = bed("", |m| {
        let p = FaultProxy::start(m.addr());
        let e = p.endpoint();
        proxy.set(p).ok();
        e
    });
    let proxy = proxy.get().unwrap();
    proxy.push("RunInstances", Fault::Throttle, 2);
    proxy.push("RunInstances", Fault::ServerError, 1);
    let web = burstable(&b.server, "web");
    let shown = wait_for("the throttle shown on the VM", WAIT, || {
        let v = vm(&b.server, &web);
        v["cloud"]["last_error"]
            .as_str()
            .filter(|e| e.contains("RequestLimitExceeded"))
            .map(|e| (e.to_string(), v["cloud"]["attempts"].as_u64().unwrap_or(0)))
    });
    assert!(shown.1 >= 1, "{shown:?}");
    let v = wait_running_in_cloud(&b.server, &web);
    assert!(
        v["cloud"]["last_error"].is_null(),
        "cleared once it succeeds: {v}"
    );
    assert_eq!(
        proxy.seen("RunInstances"),
        4,
        "two throttles, a 500, then the launch"
    );
    assert_eq!(live_instances(&b.moto, &web).len(), 1);

    // The call goes through but its answer is lost: found by tag, not
    // launched twice.
    proxy.push("RunInstances", Fault::ForwardThenFail, 1);
    let lost = burstable(&b.server, "lost");
    wait_running_in_cloud(&b.server, &lost);
    assert_eq!(
        live_instances(&b.moto, &lost).len(),
        1,
        "one instance despite the lost answer"
    );

    // A permanent error ends the launch: pending with the error, nothing runs.
    proxy.push(
        "RunInstances",
        Fault::Permanent("InvalidAMIID.NotFound".into()),
        1,
    );
    let bad = burstable(&b.server, "bad");
    let reason = wait_for("the permanent error's reason", WAIT, || {
        pending_reason(&b.server, &bad).filter(|r| r.contains("InvalidAMIID.NotFound"))
    });
    assert!(reason.contains("burst"), "{reason}");
    assert!(vm(&b.server, &bad)["cloud"].is_null(), "the launch ended");
    assert!(live_instances(&b.moto, &bad).is_empty());
    assert_eq!(
        b.server.get("/v1/burst")["budget"]["instances"],
        2,
        "its budget is released"
    );
}

#[test]
fn a_freed_host_brings_the_vm_home_and_its_instance_is_terminated() {
    let b = bed("", Moto::endpoint);
    let web = burstable(&b.server, "web");
    let v = wait_running_in_cloud(&b.server, &web);
    let instance = v["cloud"]["instance"].as_str().unwrap().to_string();
    // Free the host.
    let filler = b.server.get("/v1/vms?name_prefix=filler")["vms"][0]["vm"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, v) = b.server.send("DELETE", &format!("/v1/vms/{filler}"), &json!({}));
    assert_eq!(s, 200, "{v}");
    let home = wait_for("the VM home, its instance terminated", WAIT, || {
        let v = vm(&b.server, &web);
        let on_host = v["placement"]["host"] == b.agent.host_id.as_str();
        let running = v["observed"]["state"] == "running";
        let gone = b
            .moto
            .instance(&instance)
            .is_some_and(|i| i.state == "terminated");
        // Never neither: the instance runs until the host's copy does.
        assert!(running || !gone, "neither copy runs: {v}");
        (on_host && running && gone && v["cloud"].is_null()).then_some(v)
    });
    assert_eq!(home["host"], b.agent.host_id.as_str());
    let spent = b.server.get("/v1/burst")["total_usd"].as_f64().unwrap();
    assert!(spent > 0.0, "the burst cost something: {spent}");
    assert_holds("no cost accrues once it is home", Duration::from_secs(2), || {
        let now = b.server.get("/v1/burst");
        if now["total_usd"].as_f64() != Some(spent) {
            return Err(format!("spend moved: {now}"));
        }
        if now["budget"]["instances"] != 0 {
            return Err(format!("still counted: {now}"));
        }
        Ok(())
    });
}

#[test]
fn an_orphan_instance_is_reported_and_terminated_after_its_grace() {
    let b = bed("orphan_terminate_after = \"3s\"\n", Moto::endpoint);
    let fleet = b.server.get("/v1/burst")["fleet"].as_str().unwrap().to_string();
    let stray = b.moto.create_instance(&[("novacron:fleet", &fleet)]);
    let other = b.moto.create_instance(&[("novacron:fleet", "nc-someone-else")]);
    let orphan = wait_for("the orphan reported", WAIT, || {
        let s = b.server.get("/v1/burst");
        s["orphans"]
            .as_array()?
            .iter()
            .find(|o| o["instance"] == stray.as_str())
            .cloned()
    });
    assert!(orphan["terminate_at_ms"].as_u64().is_some(), "{orphan}");
    wait_for("the orphan terminated", WAIT, || {
        b.moto
            .instance(&stray)
            .is_some_and(|i| i.state == "terminated")
            .then_some(())
    });
    wait_for("the orphan no longer listed", WAIT, || {
        b.server.get("/v1/burst")["orphans"]
            .as_array()?
            .is_empty()
            .then_some(())
    });
    assert_eq!(
        b.moto.instance(&other).map(|i| i.state),
        Some("running".into()),
        "another fleet's instance is left alone"
    );
}

#[test]
fn a_bad_burst_config_is_refused_naming_the_key() {
    let server = Server::start("");
    let check = |burst: &str| -> String {
        let text = std::fs::read_to_string(&server.config).unwrap();
        let path = server.dir.path().join("bad.toml");
        std::fs::write(&path, format!("{text}\n{burst}")).unwrap();
        let out = std::process::Command::new(novacron_e2e::bin("novacron-server"))
            .arg("-c")
            .arg(&path)
            .arg("validate")
            .output()
            .unwrap();
        assert!(!out.status.success(), "accepted: {burst}");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!err.contains(SECRET_ACCESS_KEY), "the secret in an error: {err}");
        err
    };
    let ok = burst_toml("http://127.0.0.1:1", "ami-12345678", "");
    let e = check(&ok.replace("us-east-1", "mars-north-1"));
    assert!(e.contains("burst.aws.region"), "{e}");
    let e = check(&ok.replace("images = { \"debian\" = \"ami-12345678\" }", ""));
    assert!(e.contains("burst.aws.images"), "{e}");
    let e = check(&ok.replace("retry_max", "max_usd_per_month = -10.0\nretry_max"));
    assert!(e.contains("burst.max_usd_per_month"), "{e}");
}
