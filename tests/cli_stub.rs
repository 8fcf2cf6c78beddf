//! The `novacron` CLI against a small stub that answers as the API
//! contract says, for what test-driver hosts cannot do on demand: a
//! migration's progress to success, a failing operation, event streams
//! that end or lag, rate-limited reads.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod cli_common;
use cli_common::*;
use serde_json::{json, Value};

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
           "protocol_version": 1, "vm_count": 1, "cordoned": false, "labels": {},
           "lease": "online"})
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
