//! The API's guards and contract, against a real server process: roles,
//! API tokens, the audit log, per-token rate limits, the OpenAPI document
//! against the live router, and the server-sent event stream.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::time::Duration;

use novacron_e2e::{http, wait_for, Agent, Conn, Server};
use novacron_shared::clock::Clock;
use serde_json::{json, Value};

/// A raw call that also returns the response headers (lowercased names).
fn call_with_headers(
    server: &Server,
    method: &str,
    path: &str,
    token: &str,
) -> (u16, Vec<(String, String)>, Value) {
    let mut s = Conn::open(server.api);
    s.tcp().set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    // Connection: close ends the reply without a TLS close_notify.
    if let Err(e) = s.read_to_end(&mut raw) {
        assert!(
            e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty(),
            "{e}"
        );
    }
    let out = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn create_token(server: &Server, name: &str, role: &str) -> (String, String) {
    let (status, v) = server.send("POST", "/v1/api-tokens", &json!({"name": name, "role": role}));
    assert_eq!(status, 201, "{v}");
    (
        v["id"].as_str().unwrap().to_string(),
        v["token"].as_str().unwrap().to_string(),
    )
}

#[test]
fn roles_tokens_audit_and_rate_limits_guard_the_api() {
    let server = Server::start_with("", "rate_limit = 2.0\nrate_burst = 15", "");
    let (viewer_id, viewer) = create_token(&server, "watcher", "viewer");
    let (_, operator) = create_token(&server, "ops", "operator");
    let (_, hammer) = create_token(&server, "hammer", "viewer");

    // No token, a wrong token, a malformed header: 401, nothing else.
    let (s, v) = http(server.api, "GET", "/v1/hosts", None, None);
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("unauthenticated")),
        "{v}"
    );
    let (s, _) = http(server.api, "GET", "/v1/hosts", Some("nca_forged"), None);
    assert_eq!(s, 401);

    // A viewer reads but cannot mutate; the refusal names the role needed.
    let (s, v) = http(server.api, "GET", "/v1/hosts", Some(&viewer), None);
    assert_eq!(s, 200, "{v}");
    let body = json!({"spec": {"name": "nope", "vcpus": 1, "memory_mib": 64}}).to_string();
    let (s, v) = http(server.api, "POST", "/v1/vms", Some(&viewer), Some(&body));
    assert_eq!(s, 403, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("operator") && msg.contains("watcher"), "{msg}");
    let (s, _) = http(server.api, "GET", "/v1/audit", Some(&viewer), None);
    assert_eq!(s, 403, "the audit log is for admins");
    let (s, _) = http(server.api, "GET", "/v1/api-tokens", Some(&operator), None);
    assert_eq!(s, 403, "token management is for admins");
    // Nothing was created by the refused request.
    assert_eq!(server.get("/v1/vms")["vms"].as_array().unwrap().len(), 0);

    // An operator may mutate: a bad body is a 400 that names the field.
    let bad = json!({"spec": {"name": "x y", "vcpus": 0, "memory_mib": 64}}).to_string();
    let (s, v) = http(server.api, "POST", "/v1/vms", Some(&operator), Some(&bad));
    assert_eq!(s, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("vcpus"), "{v}");

    // Every mutating request is in the audit log: who, what, when, result.
    let audit = server.get("/v1/audit?limit=50");
    let entries = audit["entries"].as_array().unwrap();
    let find = |actor: &str, status: u64| {
        entries
            .iter()
            .find(|e| e["actor"].as_str().unwrap().starts_with(actor) && e["status"] == status)
            .unwrap_or_else(|| panic!("no audit entry by {actor} with {status}: {audit:#}"))
    };
    let refused = find("watcher", 403);
    assert_eq!(
        (refused["method"].as_str(), refused["path"].as_str()),
        (Some("POST"), Some("/v1/vms"))
    );
    assert!(refused["outcome"].as_str().unwrap().starts_with("forbidden"));
    assert!(refused["at_ms"].as_u64().unwrap() > 1_600_000_000_000);
    let invalid = find("ops", 400);
    assert!(
        invalid["outcome"].as_str().unwrap().contains("invalid_spec"),
        "{invalid}"
    );
    let created = find("admin", 201);
    assert_eq!(created["path"], "/v1/api-tokens");
    assert!(
        !entries.iter().any(|e| e["method"] == "GET"),
        "reads are not audited"
    );
    assert!(
        !audit.to_string().contains(&viewer),
        "the audit log never holds a secret"
    );

    // Tokens are listed without secrets; a deleted token stops working;
    // the last admin token cannot be deleted.
    let tokens = server.get("/v1/api-tokens");
    assert_eq!(tokens["tokens"].as_array().unwrap().len(), 4, "{tokens}");
    assert!(!tokens.to_string().contains("nca_"), "no secrets in the list");
    let (s, _) = server.send("DELETE", &format!("/v1/api-tokens/{viewer_id}"), &json!({}));
    assert_eq!(s, 200);
    let (s, _) = http(server.api, "GET", "/v1/hosts", Some(&viewer), None);
    assert_eq!(s, 401, "a deleted token is refused");
    let admin_id = tokens["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["role"] == "admin")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, v) = server.send("DELETE", &format!("/v1/api-tokens/{admin_id}"), &json!({}));
    assert_eq!((s, v["error"]["code"].as_str()), (409, Some("last_admin")), "{v}");

    // Rate limit: one token past its burst gets 429 with Retry-After,
    // other tokens are unaffected.
    let mut limited = None;
    for _ in 0..40 {
        let (s, h, v) = call_with_headers(&server, "GET", "/v1/hosts", &hammer);
        if s == 429 {
            limited = Some((h, v));
            break;
        }
        assert_eq!(s, 200);
    }
    let (headers, v) = limited.expect("the hammering token was never limited");
    assert_eq!(v["error"]["code"], "rate_limited", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("2 requests/s"),
        "{v}"
    );
    let retry: u64 = headers
        .iter()
        .find(|(k, _)| k == "retry-after")
        .expect("Retry-After header")
        .1
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    let (s, _) = http(server.api, "GET", "/v1/hosts", Some(&operator), None);
    assert_eq!(s, 200, "other tokens keep their own budget");
}

/// Every path and method in /v1/openapi.json reaches a route of the live
/// server (an error from the handler is fine; "no route" is not).
#[test]
fn the_served_openapi_document_matches_the_live_router() {
    let server = Server::start("");
    let (s, doc) = http(server.api, "GET", "/v1/openapi.json", None, None);
    assert_eq!(s, 200);
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 20, "{} paths", paths.len());
    let dummy = "00000000-0000-0000-0000-0000000000aa";
    let mut checked = 0;
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            let concrete = path
                .replace("{host}", dummy)
                .replace("{vm}", dummy)
                .replace("{op}", dummy)
                .replace("{token}", "00aa00aa00aa00aa")
                .replace("{name}", "snap1");
            if path == "/v1/events" {
                continue; // a stream: covered below
            }
            let (s, v) = http(
                server.api,
                &method.to_uppercase(),
                &concrete,
                Some(&server.token),
                Some("{}"),
            );
            let no_route = s == 405
                || (s == 404
                    && v["error"]["message"]
                        .as_str()
                        .unwrap_or("")
                        .starts_with("no route"));
            assert!(
                !no_route,
                "{method} {path} ({}) is documented but not routed: {s} {v}",
                op["operationId"]
            );
            checked += 1;
        }
    }
    assert!(checked >= 30, "{checked}");
    // And an undocumented path is not routed.
    let (s, v) = http(server.api, "GET", "/v1/nothing-here", Some(&server.token), None);
    assert_eq!((s, v["error"]["code"].as_str()), (404, Some("not_found")));
    let (s, v) = http(server.api, "PATCH", "/v1/vms", Some(&server.token), None);
    assert_eq!(s, 405, "{v}");
}

/// Reads SSE events until `done` says stop; returns them as JSON.
fn read_events(stream: Conn, deadline: Duration, mut done: impl FnMut(&[Value]) -> bool) -> Vec<Value> {
    stream
        .tcp()
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut r = BufReader::new(stream);
    let mut events = Vec::new();
    let clock = Clock::system();
    let start = clock.now();
    let mut line = String::new();
    while clock.since(start) < deadline && !done(&events) {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {
                if let Some(data) = line.strip_prefix("data: ") {
                    events.push(serde_json::from_str(data.trim()).unwrap());
                }
            }
            Err(_) => {} // read timeout: keep waiting
        }
    }
    events
}

#[test]
fn the_event_stream_shows_a_vm_created_placed_and_running() {
    let server = Server::start("heartbeat_interval = \"300ms\"");
    let (_, viewer) = create_token(&server, "screen", "viewer");
    let dir = tempfile::tempdir().unwrap();
    let node = dir.path().join("node.xml");
    std::fs::write(
        &node,
        "<node><cpu><mhz>2000</mhz><model>x86_64</model><active>4</active><total>4</total>\
         <nodes>1</nodes><sockets>1</sockets><cores>4</cores><threads>1</threads></cpu>\
         <memory>8388608</memory></node>",
    )
    .unwrap();
    let mut agent = Agent::on("ev1", &format!("test://{}", node.display()), "");
    agent.join(&server);
    agent.start(&[]);
    server.wait_connected(&agent.host_id, true);
    wait_for("capacity", Duration::from_secs(20), || {
        (server.host(&agent.host_id)["capacity"]["memory_mib"].as_u64()? > 0).then_some(())
    });

    let mut s = Conn::open(server.api);
    write!(
        s,
        "GET /v1/events HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {viewer}\r\n\r\n"
    )
    .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");

    let (status, v) = server.send(
        "POST",
        "/v1/vms",
        &json!({"spec": {"name": "ev-vm", "vcpus": 1, "memory_mib": 128}}),
    );
    assert_eq!(status, 201, "{v}");
    let id = v["vm"]["id"].as_str().unwrap().to_string();
    let events = read_events(s, Duration::from_secs(30), |evs| {
        evs.iter()
            .any(|e| e["vm"] == id.as_str() && e["state"] == "running")
    });
    let mine: Vec<&Value> = events.iter().filter(|e| e["vm"] == id.as_str()).collect();
    assert!(
        mine.iter()
            .any(|e| e["type"] == "vm" && e["message"].as_str().unwrap().contains("created")),
        "{events:#?}"
    );
    assert!(
        mine.iter()
            .any(|e| e["state"] == "running" && e["host"] == agent.host_id.as_str()),
        "the agent's libvirt event came through: {events:#?}"
    );
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "numbered in order: {seqs:?}"
    );
}
