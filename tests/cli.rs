//! The `novacron` operator CLI, run as a real process: against a real
//! server with agents on libvirt test-driver hosts, and (for the routes
//! whose replies must be scripted: long-running operations, the event
//! stream) against a small stub that answers as the API contract says.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use novacron_e2e::{bin, wait_for, Agent, Server};
use serde_json::{json, Value};

/// `novacron` with no NOVACRON_* settings from the environment.
fn cli() -> Command {
    let mut c = Command::new(bin("novacron"));
    for k in [
        "NOVACRON_API",
        "NOVACRON_TOKEN",
        "NOVACRON_TOKEN_FILE",
        "NOVACRON_SERVER_CONFIG",
        "NOVACRON_CA_FILE",
    ] {
        c.env_remove(k);
    }
    // No local server config: defaults must not come from this machine.
    c.env("NOVACRON_SERVER_CONFIG", "/nonexistent/server.toml");
    c
}

/// Runs `novacron --api <server> --token <admin> ARGS…` (HTTPS, trusting
/// that server's fleet CA).
fn run(server: &Server, args: &[&str]) -> Output {
    run_as(server, &server.token, args)
}

/// Runs `novacron --api <server> --ca-file <its CA> --token <token> ARGS…`.
fn run_as(server: &Server, token: &str, args: &[&str]) -> Output {
    cli()
        .args(["--api", &server.api_url(), "--token", token])
        .arg("--ca-file")
        .arg(server.ca_file())
        .args(args)
        .output()
        .unwrap()
}

fn run_with(api: &str, token: &str, args: &[&str]) -> Output {
    cli()
        .args(["--api", api, "--token", token])
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Asserts success and returns stdout.
fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "novacron failed ({:?}):\nstdout: {}\nstderr: {}",
        o.status.code(),
        stdout(o),
        stderr(o)
    );
    stdout(o)
}

/// A server with one connected agent on `test:///default`; returns them
/// and the host id.
fn fleet(host_name: &str) -> (Server, Agent, String) {
    let server = Server::start("heartbeat_interval = \"300ms\"");
    let mut agent = Agent::new(host_name);
    agent.join(&server);
    agent.start(&[]);
    let id = agent.host_id.clone();
    server.wait_connected(&id, true);
    wait_for("the host's capacity", Duration::from_secs(20), || {
        (server.host(&id)["capacity"]["memory_mib"].as_u64()? > 0).then_some(())
    });
    (server, agent, id)
}

/// The value of `key:` in `vms show`/`hosts show` output.
fn field(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_string())
}

#[test]
fn hosts_list_table_shows_the_connected_test_driver_host() {
    let (server, _agent, id) = fleet("cli-host");
    let out = ok(&run(&server, &["hosts", "list"]));
    let mut lines = out.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(&header[..3], ["ID", "NAME", "STATE"], "{out}");
    let row = lines
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("no row for {id}:\n{out}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[1], "cli-host", "{row}");
    assert_eq!(cells[2], "online", "{row}");
    assert!(row.ends_with("connected"), "{row}");
    // Columns line up: every row's NAME starts where the header's does.
    let name_col = out.lines().next().unwrap().find("NAME").unwrap();
    assert_eq!(row.find("cli-host"), Some(name_col), "{out}");
    // Memory in human units, not raw MiB.
    assert!(row.contains(" GiB") || row.contains(" MiB"), "{row}");
}

#[test]
fn json_output_parses_and_matches_the_api() {
    let (server, _agent, id) = fleet("cli-json");
    // Same hosts with the same fields (last-seen moves between the calls).
    let strip = |v: &Value| {
        let mut hosts = v["hosts"].as_array().unwrap().clone();
        for h in &mut hosts {
            h.as_object_mut().unwrap().remove("last_seen_ms");
        }
        hosts
    };
    // The record may still be settling (the session's address is added
    // after the join's): the CLI must match an API read taken right after.
    let mut last = None;
    let agreed = std::iter::repeat_with(|| {
        let out = ok(&run(&server, &["-o", "json", "hosts", "list"]));
        let cli: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        let api = server.get("/v1/hosts");
        let same = strip(&cli) == strip(&api);
        last = Some((cli, api));
        same
    })
    .take(20)
    .any(|same| same);
    assert!(agreed, "the CLI's JSON never matched the API's: {last:#?}");
    let out = ok(&run(&server, &["-o", "json", "hosts", "show", "cli-json"]));
    let one: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(one["id"], id.as_str());

    let made = ok(&run(
        &server,
        &[
            "-o", "json", "vms", "create", "--name", "j-1", "--vcpus", "1", "--memory", "128MiB",
        ],
    ));
    let made: Value = serde_json::from_str(&made).unwrap();
    let vm_id = made["vm"]["id"].as_str().unwrap();
    let shown: Value =
        serde_json::from_str(&ok(&run(&server, &["-o", "json", "vms", "show", "j-1"]))).unwrap();
    let api = server.get(&format!("/v1/vms/{vm_id}"));
    for k in ["vm", "host", "rules", "created_ms"] {
        assert_eq!(shown[k], api[k], "{k}");
    }
    assert_eq!(shown["vm"]["spec"]["memory_mib"], 128);
    let listed: Value =
        serde_json::from_str(&ok(&run(&server, &["-o", "json", "vms", "list", "--all"]))).unwrap();
    assert_eq!(listed["vms"][0]["vm"]["id"], vm_id);
    assert_eq!(listed["next"], Value::Null);
}

#[test]
fn vms_create_then_show_by_name_finds_it_placed_and_running_and_stop_converges() {
    let (server, _agent, host) = fleet("cli-vms");
    let out = ok(&run(
        &server,
        &[
            "vms", "create", "--name", "web-cli", "--vcpus", "1", "--memory", "128MiB", "--disk", "64MiB",
            "--label", "tier=web",
        ],
    ));
    assert!(out.starts_with("created VM web-cli ("), "{out}");
    assert!(out.contains(&format!("on host cli-vms ({host})")), "{out}");

    let shown = wait_for("web-cli running", Duration::from_secs(30), || {
        let out = ok(&run(&server, &["vms", "show", "web-cli"]));
        (field(&out, "state").as_deref() == Some("running")).then_some(out)
    });
    assert_eq!(
        field(&shown, "host"),
        Some(format!("cli-vms ({host})")),
        "{shown}"
    );
    assert_eq!(field(&shown, "memory").as_deref(), Some("128 MiB"));
    assert_eq!(field(&shown, "disks").as_deref(), Some("root 64 MiB"));
    assert_eq!(field(&shown, "labels").as_deref(), Some("tier=web"));
    let id = field(&shown, "id").unwrap();
    assert_eq!(
        server.get(&format!("/v1/vms/{id}"))["observed"]["state"],
        "running"
    );
    let listed = ok(&run(&server, &["vms", "list", "--host", "cli-vms"]));
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("web-cli") && l.contains("cli-vms")),
        "{listed}"
    );

    let out = ok(&run(&server, &["vms", "stop", "web-cli"]));
    assert!(out.contains("VM web-cli: power set to stopped"), "{out}");
    wait_for("web-cli stopped", Duration::from_secs(30), || {
        let out = ok(&run(&server, &["vms", "show", "web-cli"]));
        (field(&out, "state").as_deref() == Some("stopped")).then_some(())
    });
    assert_eq!(
        server.get(&format!("/v1/vms/{id}"))["observed"]["state"],
        "stopped"
    );
    // By id works as well as by name.
    let out = ok(&run(&server, &["vms", "show", &id]));
    assert_eq!(field(&out, "power").as_deref(), Some("stopped"));
}

#[test]
fn bad_arguments_exit_2_with_a_clear_error() {
    // Refused before anything is sent: the API address is never dialled.
    let api = "http://127.0.0.1:9";
    for (args, want) in [
        (
            &["vms", "create", "--name", "x", "--vcpus", "1", "--memory", "12XB"][..],
            "invalid value '12XB' for '--memory <MEMORY>'",
        ),
        (&["vms", "create", "--name", "x"][..], "--vcpus <VCPUS>"),
        (&["-o", "yaml", "hosts", "list"][..], "invalid value 'yaml'"),
        (&["vms", "frobnicate"][..], "unrecognized subcommand 'frobnicate'"),
        (
            &["tokens", "create", "--name", "t", "--role", "root"][..],
            "invalid value 'root' for '--role <ROLE>'",
        ),
    ] {
        let o = run_with(api, "t", args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
        assert!(o.stdout.is_empty(), "{args:?}");
    }
    let o = run_with("ftp://127.0.0.1:9", "t", &["hosts", "list"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).starts_with("novacron: error: invalid API URL"),
        "{}",
        stderr(&o)
    );
    // HTTPS with no CA to verify the server with: refused before dialling,
    // saying what to pass.
    let o = run_with("https://127.0.0.1:9", "t", &["hosts", "list"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--ca-file"), "{}", stderr(&o));
    let o = cli()
        .args([
            "--api",
            api,
            "--token-file",
            "/nonexistent/token",
            "hosts",
            "list",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).starts_with("novacron: error: cannot read the token file /nonexistent/token"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn api_refusals_exit_1_with_the_api_code_and_message() {
    let server = Server::start("");
    let o = run(
        &server,
        &[
            "vms", "create", "--name", "Bad", "--vcpus", "1", "--memory", "128",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.starts_with("novacron: error: 400 invalid_spec: "), "{err}");
    assert!(err.contains("name: contains"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");

    let o = run(&server, &["vms", "show", "nope"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o), "novacron: error: no VM with id or name \"nope\"\n");
    let o = run(&server, &["hosts", "cordon", "nowhere"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "novacron: error: no host with id or name \"nowhere\"\n"
    );

    let o = run_as(&server, "nca_wrong", &["hosts", "list"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "novacron: error: 401 unauthenticated: unknown API token\n"
    );
}

#[test]
fn unreachable_server_exits_3() {
    // A port that was just free: nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let api = format!("http://127.0.0.1:{port}");
    for args in [
        &["hosts", "list"][..],
        &["vms", "show", "web-1"][..],
        &["events"][..],
    ] {
        let o = run_with(&api, "t", args);
        assert_eq!(o.status.code(), Some(3), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(
            err.starts_with(&format!(
                "novacron: error: cannot reach the NovaCron API at {api}"
            )),
            "{err}"
        );
        assert!(err.contains("Connection refused"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

#[test]
fn defaults_come_from_the_local_server_config() {
    let server = Server::start("");
    // No --api, no --token: the config names the API address and the data
    // directory whose admin.token is used.
    let o = cli()
        .env("NOVACRON_SERVER_CONFIG", &server.config)
        .args(["-o", "json", "hosts", "list"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_str(&ok(&o)).unwrap();
    assert_eq!(v, json!({"hosts": []}));
    // NOVACRON_API and NOVACRON_TOKEN are read too.
    let o = cli()
        .env("NOVACRON_API", server.api_url())
        .env("NOVACRON_TOKEN", &server.token)
        .env("NOVACRON_CA_FILE", server.ca_file())
        .args(["hosts", "list"])
        .output()
        .unwrap();
    assert!(ok(&o).starts_with("ID "));
    // Without a readable default token the CLI says what to do.
    let o = cli()
        .args(["--api", &server.api_url(), "hosts", "list"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).starts_with("novacron: error: no API token: pass --token"),
        "{}",
        stderr(&o)
    );
}

// --- Against a stub of the API contract -------------------------------

/// What the stub answers: status, content type, and body pieces written
/// one after the other (with a pause, so a stream arrives in parts); the
/// connection is closed after the last.
struct Reply {
    status: u16,
    content_type: &'static str,
    /// Extra header lines, each ending in `\r\n`.
    headers: &'static str,
    chunks: Vec<String>,
}

fn reply(status: u16, v: Value) -> Reply {
    Reply {
        status,
        content_type: "application/json",
        headers: "",
        chunks: vec![v.to_string()],
    }
}

type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

/// Serves HTTP/1.1 with `handler(method, path)`; records every request
/// (method, path with query, body).
fn stub(handler: impl Fn(&str, &str) -> Reply + Send + Sync + 'static) -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let handler = Arc::new(handler);
    let log = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let (handler, log) = (handler.clone(), log.clone());
            std::thread::spawn(move || serve(conn, &*handler, &log));
        }
    });
    (addr, seen)
}

fn serve(mut conn: TcpStream, handler: &dyn Fn(&str, &str) -> Reply, log: &Seen) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte).unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let mut first = head.lines().next().unwrap_or_default().split(' ');
    let (method, path) = (
        first.next().unwrap_or_default().to_string(),
        first.next().unwrap_or_default().to_string(),
    );
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_string())
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body).unwrap();
    log.lock().unwrap().push((
        method.clone(),
        path.clone(),
        String::from_utf8_lossy(&body).to_string(),
    ));
    let r = handler(&method, &path);
    let _ = write!(
        conn,
        "HTTP/1.1 {} X\r\nContent-Type: {}\r\n{}Connection: close\r\n\r\n",
        r.status, r.content_type, r.headers
    );
    for c in r.chunks {
        let _ = conn.write_all(c.as_bytes());
        let _ = conn.flush();
        // Chunks arrive apart, as from a live stream, to the real CLI.
        novacron_e2e::let_real_time_pass(Duration::from_millis(30));
    }
}

const HOST1: &str = "00000000-0000-0000-0000-0000000000a1";
const HOST2: &str = "00000000-0000-0000-0000-0000000000a2";
const VM: &str = "00000000-0000-0000-0000-0000000000b1";
const OP: &str = "00000000-0000-0000-0000-0000000000c1";

/// A host as the API shows it.
fn host(id: &str, name: &str) -> Value {
    json!({"id": id, "name": name, "addresses": [],
           "capacity": {"cpus": 4, "memory_mib": 4096, "storage_mib": 0, "storage_free_mib": 0},
           "agent_version": "0.1.0", "first_seen_ms": 1, "last_seen_ms": 1, "state": "online",
           "cert_serial": "ab", "cert_not_after": 1_800_000_000, "connected": true,
           "protocol_version": 1, "vm_count": 1, "cordoned": false, "labels": {}})
}

/// The VM web-1 on HOST1 as the API shows it.
fn vm() -> Value {
    json!({"vm": {"id": VM, "op_id": OP, "spec": {"name": "web-1", "vcpus": 1, "memory_mib": 128},
                  "power": "running"},
           "placement": {"host": HOST1}, "host": HOST1, "rules": {}, "created_ms": 1, "observed": null})
}

/// The parts of the API every stub needs: two hosts and one VM.
fn fleet_routes(method: &str, path: &str) -> Option<Reply> {
    match (method, path) {
        ("GET", "/v1/hosts") => Some(reply(
            200,
            json!({"hosts": [host(HOST1, "hv-1"), host(HOST2, "hv-2")]}),
        )),
        ("GET", p) if p == format!("/v1/vms/{VM}") => Some(reply(200, vm())),
        ("GET", p) if p.starts_with("/v1/vms?name_prefix=web-1") => {
            Some(reply(200, json!({"vms": [vm()], "next": null})))
        }
        _ => None,
    }
}

fn op(state: &str, percent: u64, message: &str, error: Option<&str>) -> Value {
    json!({"id": OP, "kind": "migrate", "vm": VM, "host": HOST1, "target": HOST2, "state": state,
           "progress": {"percent": percent, "message": message}, "error": error, "actor": "admin",
           "created_ms": 1_700_000_000_000u64, "updated_ms": 1_700_000_001_000u64})
}

#[test]
fn migrate_wait_sends_the_target_and_follows_the_operation_to_success() {
    let polls = AtomicUsize::new(0);
    let (addr, seen) = stub(move |method, path| {
        if let Some(r) = fleet_routes(method, path) {
            return r;
        }
        match (method, path) {
            ("POST", p) if p == format!("/v1/vms/{VM}/migrate") => {
                reply(202, json!({"operation": op("pending", 0, "", None)}))
            }
            ("GET", p) if p == format!("/v1/operations/{OP}") => match polls.fetch_add(1, Ordering::SeqCst) {
                0 => reply(200, op("running", 40, "copying memory", None)),
                1 => reply(200, op("running", 90, "switching over", None)),
                _ => reply(200, op("succeeded", 100, "done", None)),
            },
            _ => reply(404, json!({"error": {"code": "not_found", "message": path}})),
        }
    });
    let o = run_with(
        &format!("http://{addr}"),
        "t",
        &["migrate", "web-1", "--to", "hv-2", "--wait"],
    );
    let out = ok(&o);
    assert_eq!(
        out,
        format!("operation {OP} (VM web-1 from hv-1 to hv-2) succeeded\n")
    );
    let err = stderr(&o);
    for want in [
        "migrating VM web-1 to host hv-2",
        "40%  copying memory",
        "90%  switching over",
        "succeeded 100%",
    ] {
        assert!(err.contains(want), "{want:?} in {err}");
    }
    let seen = seen.lock().unwrap();
    let post = seen.iter().find(|(m, _, _)| m == "POST").unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&post.2).unwrap(),
        json!({"host": HOST2})
    );
}

#[test]
fn operations_wait_shows_progress_and_exits_1_when_the_operation_fails() {
    let polls = AtomicUsize::new(0);
    let (addr, _) = stub(move |method, path| {
        if let Some(r) = fleet_routes(method, path) {
            return r;
        }
        match polls.fetch_add(1, Ordering::SeqCst) {
            0 => reply(200, op("running", 40, "copying memory", None)),
            _ => reply(
                200,
                op("failed", 40, "copying memory", Some("target host went away")),
            ),
        }
    });
    let api = format!("http://{addr}");
    let o = run_with(&api, "t", &["operations", "wait", OP]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(o.stdout.is_empty());
    let err = stderr(&o);
    assert!(err.contains("migrate running  40%  copying memory"), "{err}");
    assert!(
        err.ends_with(&format!(
            "novacron: error: operation {OP} failed: target host went away\n"
        )),
        "{err}"
    );
    // In JSON mode the final operation is printed, and it still exits 1.
    let o = run_with(&api, "t", &["-o", "json", "operations", "wait", OP]);
    assert_eq!(o.status.code(), Some(1));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["state"], "failed");
}

#[test]
fn events_print_one_line_per_event_until_the_server_closes_the_stream() {
    let events = vec![
        ": keep-alive\n\n".to_string(),
        format!(
            "id: 1\nevent: vm\ndata: {}\n\n",
            json!({"seq": 1, "type": "vm", "at_ms": 1_700_000_000_000u64, "vm": VM, "host": HOST1, "message": "web-1 stopped"})
        ),
        format!(
            "id: 2\nevent: host\ndata: {}\n\n",
            json!({"seq": 2, "type": "host", "at_ms": 1_700_000_001_000u64, "host": HOST2, "message": "hv-2 disconnected"})
        ),
        format!(
            "id: 3\nevent: operation\ndata: {}\n\n",
            json!({"seq": 3, "type": "operation", "at_ms": 1_700_000_002_000u64, "operation": op("succeeded", 100, "done", None),
                   "message": "migrate of web-1 succeeded"})
        ),
        "event: lagged\ndata: {\"missed\":3}\n\n".to_string(),
    ];
    let (addr, seen) = stub(move |method, path| {
        if let Some(r) = fleet_routes(method, path) {
            return r;
        }
        Reply {
            status: 200,
            content_type: "text/event-stream",
            headers: "",
            chunks: events.clone(),
        }
    });
    let api = format!("http://{addr}");
    let o = run_with(&api, "t", &["events", "--vm", "web-1"]);
    let out = ok(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(lines[0].starts_with("2023-11-14T22:13:20Z  vm "), "{out}");
    assert!(
        lines[0].contains("vm web-1") && lines[0].ends_with("web-1 stopped"),
        "{out}"
    );
    assert!(
        lines[1].contains("host hv-2") && lines[1].ends_with("hv-2 disconnected"),
        "{out}"
    );
    assert!(
        lines[2].contains("migrate web-1")
            && lines[2].ends_with("succeeded 100%: migrate of web-1 succeeded"),
        "{out}"
    );
    assert!(
        lines[3].contains("lagged")
            && lines[3].ends_with("missed 3 events (this client fell behind the stream)"),
        "{out}"
    );
    assert!(stderr(&o).contains("the server closed the event stream"));
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .any(|(_, p, _)| *p == format!("/v1/events?vm={VM}")),
        "the VM filter is sent by id"
    );

    // JSON mode: each line is the event's data.
    let out = ok(&run_with(&api, "t", &["-o", "json", "events"]));
    let data: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(data.len(), 4);
    assert_eq!(data[0]["type"], "vm");
    assert_eq!(data[2]["operation"]["id"], OP);
    assert_eq!(data[3], json!({"missed": 3}));
}

#[test]
fn rate_limited_reads_are_retried_and_changes_are_not() {
    let calls = AtomicUsize::new(0);
    let (addr, seen) = stub(move |method, path| {
        let limited = Reply {
            status: 429,
            content_type: "application/json",
            headers: "Retry-After: 1\r\n",
            chunks: vec![json!({"error": {"code": "rate_limited", "message": "slow down"}}).to_string()],
        };
        match (method, calls.fetch_add(1, Ordering::SeqCst)) {
            ("GET", 0) => limited,
            ("POST", _) => limited,
            _ => fleet_routes(method, path).unwrap_or_else(|| reply(404, json!({}))),
        }
    });
    let api = format!("http://{addr}");
    let clock = novacron_shared::clock::Clock::system();
    let started = clock.now();
    let out = ok(&run_with(&api, "t", &["hosts", "list"]));
    assert!(out.contains("hv-1"), "{out}");
    assert!(
        clock.since(started) >= Duration::from_millis(900),
        "waited as asked"
    );
    let o = run_with(&api, "t", &["hosts", "cordon", "hv-1"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o), "novacron: error: 429 rate_limited: slow down\n");
    let posts = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(m, _, _)| m == "POST")
        .count();
    assert_eq!(posts, 1, "a change is sent once");
}

// --- Operations, tokens and events on the real server -----------------

/// Reads `novacron events` lines from a running child.
fn lines_of(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

/// Creates a VM pinned to `host` and waits until it runs.
fn running_vm(server: &Server, name: &str, host: &str) {
    ok(&run(
        server,
        &[
            "vms", "create", "--name", name, "--vcpus", "1", "--memory", "128", "--host", host,
        ],
    ));
    wait_for(&format!("{name} running"), Duration::from_secs(30), || {
        let out = ok(&run(server, &["vms", "show", name]));
        (field(&out, "state").as_deref() == Some("running")).then_some(())
    });
}

#[test]
fn a_viewer_token_reads_but_gets_403_on_changes() {
    let server = Server::start("");
    let o = run(&server, &["tokens", "create", "--name", "ro", "--role", "viewer"]);
    let secret = ok(&o).trim().to_string();
    assert!(
        !secret.is_empty() && !secret.contains(char::is_whitespace),
        "only the secret on stdout: {secret:?}"
    );
    assert!(stderr(&o).contains("shown only this once"), "{}", stderr(&o));
    let listed = ok(&run(&server, &["tokens", "list"]));
    let row = listed
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("ro"))
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(row.split_whitespace().nth(2), Some("viewer"), "{row}");
    let token_id = row.split_whitespace().next().unwrap().to_string();

    assert!(ok(&run_as(&server, &secret, &["hosts", "list"])).starts_with("ID "));
    let o = run_as(
        &server,
        &secret,
        &["vms", "create", "--name", "x", "--vcpus", "1", "--memory", "128"],
    );
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.starts_with("novacron: error: 403 forbidden: "), "{err}");
    assert!(err.contains("needs the operator role"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    let out = ok(&run(&server, &["tokens", "delete", &token_id]));
    assert!(out.starts_with("deleted viewer token \"ro\""), "{out}");
    let o = run_as(&server, &secret, &["hosts", "list"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).starts_with("novacron: error: 401 unauthenticated"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn audit_lists_who_changed_what() {
    let server = Server::start("");
    ok(&run(
        &server,
        &["tokens", "create", "--name", "ci", "--role", "operator"],
    ));
    let out = ok(&run(&server, &["audit"]));
    let mut lines = out.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["AT", "ACTOR", "ROLE", "METHOD", "PATH", "STATUS"],
        "{out}"
    );
    let row = lines
        .find(|l| l.contains("/v1/api-tokens"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains("admin (created by init)  admin  POST"), "{row}");
    assert!(row.ends_with(" 201"), "{row}");
}

#[test]
fn migrate_refusals_and_failed_migrations_exit_1_with_the_reason() {
    // mig-1 takes no migrations; mig-2 does, but the test driver cannot
    // carry one out (no p2p migration), so the operation fails: `--wait`
    // shows its progress and ends with its error.
    let (server, _a1, h1) = fleet("mig-1");
    let mut a2 = Agent::on("mig-2", "test:///default", "migration_uri = \"test:///default\"");
    a2.join(&server);
    a2.start(&[]);
    server.wait_connected(&a2.host_id, true);
    running_vm(&server, "on-1", "mig-1");
    running_vm(&server, "on-2", "mig-2");

    let o = run(&server, &["migrate", "on-2", "--to", "mig-1"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.starts_with("novacron: error: 409 "), "{err}");
    assert!(err.contains("takes no live migrations"), "{err}");

    let o = run(&server, &["migrate", "on-1", "--wait"]);
    let err = stderr(&o);
    assert!(
        err.contains("migrating VM on-1 to host mig-2: operation "),
        "{err}"
    );
    let op_id = err
        .split("operation ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .to_string();
    let op = server.get(&format!("/v1/operations/{op_id}"));
    assert_eq!(op["state"], "failed", "{op}");
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(o.stdout.is_empty());
    // The status line (the migration may fail before the first poll sees
    // it running, so only the last status is certain).
    assert!(err.contains("\nmigrate failed "), "status on stderr: {err}");
    assert_eq!(
        err.lines().last().unwrap(),
        format!(
            "novacron: error: operation {op_id} failed: {}",
            op["error"].as_str().unwrap()
        )
    );
    let shown = ok(&run(&server, &["vms", "show", "on-1"]));
    assert_eq!(
        field(&shown, "host"),
        Some(format!("mig-1 ({h1})")),
        "it stays: {shown}"
    );
    // The operation is listed and shown with names.
    let listed = ok(&run(&server, &["operations", "list"]));
    let row = listed
        .lines()
        .find(|l| l.starts_with(&op_id))
        .unwrap_or_else(|| panic!("{listed}"));
    assert!(row.contains("VM on-1 from mig-1 to mig-2"), "{row}");
    let shown = ok(&run(&server, &["operations", "show", &op_id]));
    assert_eq!(field(&shown, "kind").as_deref(), Some("migrate"));
    assert_eq!(
        field(&shown, "vm"),
        op["vm"].as_str().map(|id| format!("on-1 ({id})"))
    );
}

#[test]
fn drain_cordons_the_host_and_waits_for_the_operation() {
    let (server, _agent, host) = fleet("drain-1");
    let out = ok(&run(&server, &["drain", "drain-1", "--wait"]));
    assert!(
        out.starts_with("operation ") && out.ends_with("(host drain-1) succeeded\n"),
        "{out}"
    );
    // Cordoned: nothing new lands there.
    let o = run(
        &server,
        &[
            "vms", "create", "--name", "late", "--vcpus", "1", "--memory", "128",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).starts_with("novacron: error: 409 no_capacity: "),
        "{}",
        stderr(&o)
    );
    let out = ok(&run(&server, &["hosts", "uncordon", &host]));
    assert_eq!(
        out,
        format!("uncordoned host drain-1 ({host}): new VMs may be placed on it again\n")
    );
    ok(&run(
        &server,
        &[
            "vms", "create", "--name", "late", "--vcpus", "1", "--memory", "128",
        ],
    ));
}

#[test]
fn events_show_a_vm_being_stopped() {
    let (server, _agent, _host) = fleet("ev-host");
    running_vm(&server, "ev-1", "ev-host");
    let mut child = cli()
        .args(["--api", &server.api_url(), "--token", &server.token])
        .arg("--ca-file")
        .arg(server.ca_file())
        .args(["events", "--vm", "ev-1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut child);
    // The stream is open once the CLI has resolved the name and connected;
    // stop the VM until an event about it arrives (a stop before the
    // subscription would be missed, so retry rather than sleep).
    let mut seen = Vec::new();
    let mut found = None;
    for _ in 0..20 {
        ok(&run(&server, &["vms", "stop", "ev-1"]));
        while let Ok(l) = rx.recv_timeout(Duration::from_millis(1500)) {
            if l.contains("  vm ") && l.contains("vm ev-1") {
                found = Some(l);
                break;
            }
            seen.push(l);
        }
        if found.is_some() {
            break;
        }
        ok(&run(&server, &["vms", "start", "ev-1"]));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let line = found.unwrap_or_else(|| panic!("no event line about ev-1; saw {seen:?}"));
    assert!(line.starts_with("20"), "an ISO time first: {line}");
    assert!(line.contains("stopped"), "{line}");
}
