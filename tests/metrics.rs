//! Metrics end to end on a test-driver host (real /proc collectors, real
//! server and agent processes, real QUIC): the query API, the latest values,
//! the live stream, the Prometheus exposition checked by `promtool`, and no
//! batch lost or stored twice across a server `kill -9`, an agent `kill -9`
//! and a long outage.

#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use novacron_e2e::{let_real_time_pass, wait_for, Agent, Server};
use novacron_shared::clock::Clock;
use serde_json::{json, Value};

/// An agent on a private test-driver node sampling every `interval`.
fn agent(server: &Server, name: &str, interval: &str) -> Agent {
    let path = std::env::temp_dir().join(format!("novacron-metrics-{name}-{}.xml", std::process::id()));
    std::fs::write(
        &path,
        "<node><cpu><mhz>2000</mhz><model>x86_64</model><active>4</active><total>4</total>\
         <nodes>1</nodes><sockets>1</sockets><cores>4</cores><threads>1</threads></cpu>\
         <memory>8388608</memory></node>",
    )
    .unwrap();
    let mut a = Agent::on(name, &format!("test://{}", path.display()), "");
    let mut f = std::fs::OpenOptions::new().append(true).open(&a.config).unwrap();
    writeln!(f, "\n[metrics]\ninterval = \"{interval}\"").unwrap();
    a.join(server);
    a.start(&[]);
    server.wait_connected(&a.host_id, true);
    a
}

fn points(answer: &Value, name: &str, label: Option<&str>) -> Vec<(u64, f64)> {
    answer["series"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] == name && s["label"].as_str() == label)
        .flat_map(|s| s["points"].as_array().unwrap().clone())
        .map(|p| (p[0].as_f64().unwrap() as u64, p[1].as_f64().unwrap()))
        .collect()
}

/// The operator CLI against this server.
fn novacron(server: &Server, args: &[&str]) -> std::process::Output {
    Command::new(novacron_e2e::bin("novacron"))
        .env("NOVACRON_SERVER_CONFIG", "/nonexistent/server.toml")
        .env_remove("NOVACRON_TOKEN_FILE")
        .args(["--api", &server.api_url(), "--token", &server.token])
        .arg("--ca-file")
        .arg(server.ca_file())
        .args(args)
        .output()
        .unwrap()
}

fn promtool_check(text: &str) -> (i32, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("promtool is missing ({e}); install the Debian prometheus package (.ci/run does)")
        });
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn exposition(server: &Server) -> String {
    let (status, body) = novacron_e2e::http_text(server.api, "GET", "/metrics", None);
    // Chunked bodies are not expected here: the exposition is one buffer.
    assert_eq!(status, 200, "{body}");
    body
}

#[test]
fn host_and_vm_metrics_reach_the_api_the_live_stream_and_a_clean_exposition() {
    let server = Server::start("heartbeat_interval = \"300ms\"");
    let a = agent(&server, "m1", "200ms");
    let host = a.host_id.clone();
    let (status, v) = server.send(
        "POST",
        "/v1/vms",
        &json!({"spec": {"name": "web", "vcpus": 1, "memory_mib": 256, "disks": [{"name": "root", "size_mib": 64}]}}),
    );
    assert_eq!(status, 201, "{v}");
    let vm = v["vm"]["id"].as_str().unwrap().to_string();

    // Host series from /proc: CPU by mode as a rate, memory as a level.
    let answer = wait_for("host CPU and memory samples", Duration::from_secs(20), || {
        let a = server.get(&format!("/v1/metrics?host={host}&from=1m"));
        let user = points(&a, "host.cpu", Some("user"));
        let total = points(&a, "host.memory", Some("total"));
        (user.len() >= 5 && !total.is_empty()).then_some(a)
    });
    assert_eq!(answer["resolution"], "raw");
    let user = points(&answer, "host.cpu", Some("user"));
    assert!(user.windows(2).all(|w| w[1].0 > w[0].0), "timestamps increase");
    // Wall-clock aligned ticks, 200 ms apart.
    assert!(user.iter().all(|(t, _)| t % 200 == 0), "{user:?}");
    assert!(user.iter().all(|(_, v)| *v >= 0.0), "rates are not negative");
    let mem = points(&answer, "host.memory", Some("total"))[0].1;
    assert!(mem > 64.0 * 1024.0 * 1024.0, "memory total {mem} bytes");
    let cpu_unit = answer["series"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "host.cpu")
        .unwrap()["unit"]
        .clone();
    assert_eq!(cpu_unit, "seconds/s");
    // A series filter; an unknown series is a clear 400.
    let only = server.get(&format!("/v1/metrics?host={host}&series=host.load&from=1m"));
    assert!(only["series"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["name"] == "host.load"));
    assert!(!points(&only, "host.load", Some("1m")).is_empty());
    let (status, e) = novacron_e2e::http(
        server.api,
        "GET",
        &format!("/v1/metrics?host={host}&series=host.nope"),
        Some(&server.token),
        None,
    );
    assert_eq!(status, 400, "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("unknown series"),
        "{e}"
    );
    let (status, _) = novacron_e2e::http(
        server.api,
        "GET",
        "/v1/metrics?from=1m",
        Some(&server.token),
        None,
    );
    assert_eq!(status, 400);

    // The VM's series (the test driver reports its state): 1 = running.
    let vm_answer = wait_for("VM state samples", Duration::from_secs(30), || {
        let a = server.get(&format!("/v1/metrics?vm={vm}&from=1m"));
        let s = points(&a, "vm.state", None);
        (s.last().is_some_and(|p| p.1 == 1.0)).then_some(a)
    });
    assert_eq!(vm_answer["owner"], "vm");

    // Latest values for `top`.
    let latest = server.get("/v1/metrics/latest?owner=host");
    let me = latest["owners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["id"] == host.as_str())
        .unwrap()
        .clone();
    assert!(me["values"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["name"] == "host.cpu"));

    // 1-minute resolution answers with the open minute at least.
    let rolled = server.get(&format!("/v1/metrics?host={host}&series=host.memory&from=2h"));
    assert_eq!(rolled["resolution"], "1m");
    let p = &rolled["series"][0]["points"][0];
    assert_eq!(p.as_array().unwrap().len(), 4, "{rolled}");

    // The CLI: `top` shows the host and the VM by name; `metrics` the series.
    let out = novacron(&server, &["top", "--once"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let host_row = text
        .lines()
        .find(|l| l.starts_with("m1 "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(host_row.contains("/s"), "{host_row}");
    assert!(
        text.lines().any(|l| l.starts_with("web ") && l.contains("m1")),
        "{text}"
    );
    let out = novacron(
        &server,
        &[
            "metrics",
            "--host",
            "m1",
            "--series",
            "host.cpu,host.memory",
            "--since",
            "1m",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("raw resolution"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("host.cpu") && l.contains("user") && l.ends_with("seconds/s")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("host.memory") && l.contains("total")),
        "{text}"
    );
    let out = novacron(&server, &["metrics", "--since", "1m"]);
    assert_eq!(out.status.code(), Some(2), "--host or --vm is required");

    // The live stream: metrics events for the VM.
    let mut stream = novacron_e2e::sse(server.api, &server.token, &format!("/v1/metrics/stream?vm={vm}"));
    let ev = stream
        .next_event(Duration::from_secs(10))
        .expect("a metrics event");
    assert_eq!(ev.0, "metrics");
    let data: Value = serde_json::from_str(&ev.1).unwrap();
    assert_eq!(data["id"], vm.as_str());
    assert_eq!(data["host"], host.as_str());
    assert!(data["values"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["name"] == "vm.state"));

    // The exposition: the server's health and the fleet's values, clean
    // for promtool (exit 0: no parse error, no lint problem).
    let text = exposition(&server);
    for want in [
        format!("novacron_host_cpu_seconds_total{{host=\"{host}\",mode=\"user\"}}"),
        format!("novacron_vm_state{{vm=\"{vm}\",host=\"{host}\"}} 1"),
        "novacron_metrics_samples_total".into(),
        "novacron_agent_sessions 1".into(),
        "novacron_api_request_duration_seconds_bucket{operation=\"queryMetrics\",status=\"2xx\"".into(),
        "novacron_scheduler_decisions_total{outcome=\"placed\"} 1".into(),
        format!("novacron_agent_spool_dropped_batches_total{{host=\"{host}\"}} 0"),
    ] {
        assert!(text.contains(&want), "missing {want} in:\n{text}");
    }
    let (code, out) = promtool_check(&text);
    assert_eq!(code, 0, "promtool: {out}");
    // And promtool does catch a broken exposition: the check is real.
    let (code, _) = promtool_check("novacron_broken{ 1\n");
    assert_ne!(code, 0);
}

/// The wall clock the server and agent stamp samples with, in ms.
fn now_ms() -> u64 {
    Clock::system().unix_ms()
}

fn streams(server: &Server, host: &str) -> Value {
    server.get("/v1/metrics/streams")["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["host"] == host)
        .cloned()
        .unwrap_or(Value::Null)
}

#[test]
fn no_batch_is_lost_or_stored_twice_across_server_and_agent_kills() {
    let mut server = Server::start("heartbeat_interval = \"300ms\"");
    let mut a = agent(&server, "m2", "100ms");
    let host = a.host_id.clone();
    wait_for("a few batches stored", Duration::from_secs(20), || {
        (streams(&server, &host)["stored_upto_seq"].as_u64()? >= 3).then_some(())
    });

    // The server dies without warning and stays away for a while; the
    // agent keeps sampling into its spool.
    server.kill9();
    let server_down = now_ms();
    let_real_time_pass(Duration::from_secs(4));
    let server_up = now_ms();
    server.restart();
    server.wait_connected(&host, true);
    let before = wait_for("the spool resent", Duration::from_secs(30), || {
        let s = streams(&server, &host);
        (s["stored_upto_seq"].as_u64()? >= 8).then_some(s)
    });

    // The agent dies too, and comes back with its spool from disk.
    a.kill9();
    let agent_down = now_ms();
    let_real_time_pass(Duration::from_secs(2));
    let agent_up = now_ms();
    a.start(&[]);
    server.wait_connected(&host, true);
    let up = before["stored_upto_seq"].as_u64().unwrap();
    let s = wait_for(
        "new batches after the agent restart",
        Duration::from_secs(30),
        || {
            let s = streams(&server, &host);
            (s["stored_upto_seq"].as_u64()? >= up + 4).then_some(s)
        },
    );

    // Every sequence number from 1 is stored exactly once, in one epoch.
    assert_eq!(
        s["epoch"], before["epoch"],
        "the spool kept its epoch across the restart"
    );
    assert_eq!(s["missing"], 0, "{s}");
    assert_eq!(s["agent_dropped"], 0, "{s}");
    assert_eq!(
        s["batches"], s["stored_upto_seq"],
        "one stored batch per sequence number: {s}"
    );

    // And the samples say the same: one point per 100 ms tick, no
    // timestamp twice, and no hole bigger than a stalled tick or two except
    // while the agent itself was dead (nobody sampled then). The server's
    // outage is covered from the spool.
    let answer = server.get(&format!(
        "/v1/metrics?host={host}&series=host.cpus&from=10m&resolution=raw"
    ));
    let pts = points(&answer, "host.cpus", None);
    assert!(pts.len() > 60, "{} points", pts.len());
    assert!(pts[0].0 < server_down && pts.last().unwrap().0 > agent_up);
    for w in pts.windows(2) {
        let (a, b) = (w[0].0, w[1].0);
        assert!(b > a, "timestamp {b} twice or out of order");
        if b - a > 500 {
            // Only the agent's own downtime (plus its start-up) may leave a hole.
            assert!(
                a + 1_500 >= agent_down && b <= agent_up + 5_000,
                "a hole of {} ms at {a}..{b} (server down {server_down}..{server_up}, agent down {agent_down}..{agent_up})",
                b - a
            );
        }
    }
    let during_outage = pts
        .iter()
        .filter(|(t, _)| (server_down..server_up).contains(t))
        .count();
    assert!(
        during_outage >= 30,
        "{during_outage} samples from the 4 s server outage"
    );
    let resent = s["duplicates"].as_u64().unwrap();
    eprintln!(
        "stored {} batches, {} points, {resent} resends dropped as duplicates",
        s["batches"],
        pts.len()
    );
}
