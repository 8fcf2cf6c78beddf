//! End-to-end tests of enrollment, the mutual-TLS link, revocation,
//! renewal, version negotiation, bad frames and server restarts, with real
//! server and agent processes on libvirt test-driver hosts.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use novacron_e2e::{
    assert_holds, close_code, hello, http, raw_connect, wait_for, wait_until_wall, Agent, Server,
};
use novacron_shared::clock::Clock;
use novacron_shared::ids::HostId;
use novacron_shared::pki::{self, Validity};
use novacron_shared::protocol::{ErrorCode, ServerMessage};
use novacron_shared::tls;
use rustls::pki_types::CertificateDer;

fn last_seen(server: &Server, id: &str) -> u64 {
    server.host(id)["last_seen_ms"].as_u64().unwrap()
}

/// Waits until the host's last-seen time moves: the session is alive.
fn assert_still_heartbeating(server: &Server, id: &str) {
    let before = last_seen(server, id);
    wait_for("heartbeats to keep arriving", Duration::from_secs(10), || {
        (last_seen(server, id) > before).then_some(())
    });
    assert_eq!(server.host(id)["connected"], true);
}

/// How a session attempt with a raw client ended.
#[derive(Debug)]
enum Attempt {
    /// The server answered the hello.
    Reply(ServerMessage),
    /// The connection was closed, in the handshake or right after it.
    Closed(quinn::ConnectionError),
    /// Neither: the hello failed without the connection closing (a timeout).
    Other(String),
}

/// Connects with `cert` and `key` and sends a hello: the server's first
/// reply, or how the connection ended.
async fn try_session(
    server: &Server,
    ca: &CertificateDer<'static>,
    cert: CertificateDer<'static>,
    key: &rcgen::KeyPair,
) -> Attempt {
    let key = pki::key_from_pem(&key.serialize_pem()).unwrap();
    let cfg = tls::client_config_mtls(ca.clone(), vec![cert], key, Duration::from_secs(5)).unwrap();
    match raw_connect(server.quic, cfg).await {
        Err(e) => Attempt::Closed(e),
        Ok((_ep, c)) => match hello(&c, (1, 1)).await {
            Ok((_, _, m)) => Attempt::Reply(m),
            Err(e) => match c.close_reason() {
                Some(reason) => Attempt::Closed(reason),
                None => Attempt::Other(e),
            },
        },
    }
}

/// Panics unless the server refused the client's certificate in the TLS
/// handshake with `alert`: a QUIC close carrying that TLS alert as a
/// crypto error, and a reason naming the certificate problem `why`.
fn assert_refused_with(attempt: &Attempt, alert: rustls::AlertDescription, why: &str) {
    let want = quinn::TransportErrorCode::crypto(u8::from(alert));
    match attempt {
        Attempt::Closed(quinn::ConnectionError::ConnectionClosed(close)) => {
            assert_eq!(
                close.error_code, want,
                "refused with the wrong TLS alert (want {alert:?}): {close:?}"
            );
            let reason = String::from_utf8_lossy(&close.reason);
            assert!(
                reason.contains(why),
                "the reason {reason:?} does not name {why:?}"
            );
        }
        Attempt::Closed(other) => {
            panic!("expected a TLS handshake refusal with {alert:?}, the connection ended with {other:?}")
        }
        Attempt::Reply(m) => {
            panic!("expected a TLS handshake refusal with {alert:?}, the server replied {m:?}")
        }
        Attempt::Other(e) => panic!("expected a TLS handshake refusal with {alert:?}, the hello failed: {e}"),
    }
}

#[test]
fn join_then_run_connects_heartbeats_and_reports_inventory() {
    let server = Server::start("");
    let mut agent = Agent::new("host-a");
    agent.join(&server);
    for f in ["identity.pem", "ca.pem", "enrollment.toml"] {
        let mode = std::fs::metadata(agent.data().join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f} must be private");
    }
    // The private key is in the identity file and nowhere on the server.
    let identity = std::fs::read_to_string(agent.data().join("identity.pem")).unwrap();
    assert!(identity.contains("PRIVATE KEY"));
    let key_line = identity
        .lines()
        .find(|l| !l.starts_with("-----") && identity.find(l) > identity.find("PRIVATE KEY"))
        .unwrap();
    for entry in std::fs::read_dir(server.dir.path().join("data")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "redb") {
            continue;
        }
        if p.is_dir() {
            continue;
        }
        let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
        assert!(
            !bytes.windows(key_line.len()).any(|w| w == key_line.as_bytes()),
            "the host key leaked into {}",
            p.display()
        );
    }
    let rec = server.host(&agent.host_id);
    assert_eq!(rec["state"], "enrolled");
    assert_eq!(rec["name"], "host-a");

    agent.start(&[]);
    let h = server.wait_connected(&agent.host_id, true);
    assert_eq!(h["state"], "online");
    assert_eq!(h["protocol_version"], 1);
    let h = wait_for("inventory", Duration::from_secs(10), || {
        let h = server.host(&agent.host_id);
        (h["vm_count"] == 1).then_some(h)
    });
    // test:///default is a 16-CPU node with one domain.
    assert_eq!(h["capacity"]["cpus"], 16);
    assert_still_heartbeating(&server, &agent.host_id);
    let list = server.get("/v1/hosts");
    assert_eq!(list["hosts"].as_array().unwrap().len(), 1);
}

#[test]
fn bad_join_attempts_are_refused_with_clear_errors_and_create_nothing() {
    let server = Server::start("");
    let agent = Agent::new("host-b");
    let token = server.join_token("10m");

    let wrong_fp = "ab".repeat(32);
    let out = agent.try_join(&server, &token, &wrong_fp);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pinned fingerprint"), "wrong fingerprint: {err}");

    let out = agent.try_join(&server, "ncj_nonsense", &server.fingerprint);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("unknown join token"),
        "unknown token: {err}"
    );

    // The token survived the failed attempts and works once.
    let out = agent.try_join(&server, &token, &server.fingerprint);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = agent.try_join(&server, &token, &server.fingerprint);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("already used"),
        "reused token: {err}"
    );

    let short = server.join_token("1s");
    // The server keeps token expiry by the wall clock.
    wait_until_wall(Clock::system().wall() + Duration::from_millis(1500));
    let out = agent.try_join(&server, &short, &server.fingerprint);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("expired"),
        "expired token: {err}"
    );

    // Exactly one host came out of all that.
    assert_eq!(server.get("/v1/hosts")["hosts"].as_array().unwrap().len(), 1);
    assert!(server.logs().contains("TokenUsed"), "refusals are logged");
}

/// A join whose CSR is garbage is refused as `BadCsr`, creates no host,
/// and leaves the token usable.
#[tokio::test(flavor = "multi_thread")]
async fn a_bad_csr_is_refused_and_leaves_the_token_unused() {
    let server = Server::start("");
    let token = server.join_token("10m");
    let fp = pki::parse_fingerprint(&server.fingerprint).unwrap();
    let cfg = tls::client_config_pinned(&fp, Duration::from_secs(5)).unwrap();
    let (_ep, conn) = raw_connect(server.quic, cfg).await.unwrap();
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let mut recv = novacron_shared::framing::FramedRecv::new(recv, novacron_shared::framing::MAX_FRAME_LEN);
    let join = novacron_shared::protocol::AgentMessage::Join(novacron_shared::protocol::JoinRequest {
        min_version: 1,
        max_version: 1,
        token: token.clone(),
        csr_der: b"not a certificate request".to_vec(),
        hostname: "bad-csr".into(),
        agent_version: "test".into(),
    });
    let mut buf = Vec::new();
    novacron_shared::framing::write_frame(&mut send, 1, &join, &mut buf)
        .await
        .unwrap();
    let reply = recv.next::<ServerMessage>().await.unwrap();
    match reply {
        Some((_, ServerMessage::Error(e))) => assert_eq!(e.code, ErrorCode::BadCsr, "{e}"),
        other => panic!("expected a BadCsr error, got {other:?}"),
    }
    assert!(server.get("/v1/hosts")["hosts"].as_array().unwrap().is_empty());
    let agent = Agent::new("after-bad-csr");
    let out = agent.try_join(&server, &token, &server.fingerprint);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(server.get("/v1/hosts")["hosts"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn unauthenticated_foreign_expired_and_revoked_clients_are_refused_others_keep_serving() {
    let server = Server::start("");
    let mut good = Agent::new("good");
    good.join(&server);
    good.start(&[]);
    server.wait_connected(&good.host_id, true);
    let ca_der = CertificateDer::from(good.identity().ca_der.clone());

    // No client certificate: only a join is allowed.
    let cfg = tls::client_config_pinned(&server.fingerprint.replace("sha256:", ""), Duration::from_secs(5))
        .unwrap();
    let (_ep, conn) = raw_connect(server.quic, cfg).await.unwrap();
    match hello(&conn, (1, 1)).await {
        Ok((_, _, ServerMessage::Error(e))) => assert_eq!(e.code, ErrorCode::Unauthenticated),
        other => panic!("no-certificate client got {:?}", other.map(|x| x.2)),
    }

    // A certificate from another CA: the handshake fails.
    let now = Clock::system().wall();
    let (other_ca, _) = pki::FleetCa::generate("other CA", now, Duration::from_secs(3600)).unwrap();
    let (key, csr) = pki::make_csr("intruder").unwrap();
    let foreign = other_ca
        .sign_host_csr(
            &csr,
            good.identity().host_id,
            Validity::for_ttl(now, Duration::from_secs(3600)),
        )
        .unwrap();
    let r = try_session(&server, &ca_der, foreign, &key).await;
    assert_refused_with(
        &r,
        rustls::AlertDescription::UnknownCA,
        "invalid peer certificate: UnknownIssuer",
    );

    // An expired certificate from the right CA: refused too.
    let (key, csr) = pki::make_csr("stale").unwrap();
    let past = now - Duration::from_secs(7200);
    let expired = server
        .ca()
        .sign_host_csr(
            &csr,
            good.identity().host_id,
            Validity {
                not_before: past,
                not_after: past + Duration::from_secs(60),
            },
        )
        .unwrap();
    let r = try_session(&server, &ca_der, expired, &key).await;
    assert_refused_with(
        &r,
        rustls::AlertDescription::CertificateExpired,
        "invalid peer certificate: certificate expired",
    );

    // A revoked host: its live session is closed and it cannot come back.
    let mut bad = Agent::new("bad");
    bad.join(&server);
    bad.start(&[]);
    server.wait_connected(&bad.host_id, true);
    let bad_identity = bad.identity();
    let out = server.cli(&["host", "revoke", &bad.host_id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let h = server.wait_connected(&bad.host_id, false);
    assert_eq!(h["state"], "revoked");
    wait_for("the agent to log the revocation", Duration::from_secs(10), || {
        bad.log().contains("Revoked").then_some(())
    });
    let cfg = bad_identity.client_config(Duration::from_secs(5)).unwrap();
    let (_ep, c) = raw_connect(server.quic, cfg).await.unwrap();
    let r = hello(&c, (1, 1)).await.map(|x| x.2);
    assert!(r.is_err(), "a revoked certificate got a session: {r:?}");
    assert_eq!(close_code(&c).await, Some(ErrorCode::Revoked));
    // Still revoked through the agent's own reconnect attempts.
    assert_holds("the revoked host disconnected", Duration::from_secs(1), || {
        let h = server.host(&bad.host_id);
        (h["connected"] == false && h["state"] == "revoked")
            .then_some(())
            .ok_or(format!("{h}"))
    });

    // Through all of it the good agent kept its session.
    assert_still_heartbeating(&server, &good.host_id);
    assert!(server.is_running_check());
}

trait Alive {
    fn is_running_check(&self) -> bool;
}
impl Alive for Server {
    fn is_running_check(&self) -> bool {
        http(self.api, "GET", "/healthz", None, None).0 == 200
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn protocol_version_mismatch_is_a_clear_error_on_both_sides() {
    let server = Server::start("");
    let mut agent = Agent::new("future");
    agent.join(&server);
    agent.start(&["--protocol-versions", "7-9"]);
    wait_for(
        "the agent to report the mismatch",
        Duration::from_secs(15),
        || agent.log().contains("protocol version mismatch").then_some(()),
    );
    assert!(agent.log().contains("UnsupportedVersion"), "{}", agent.log());
    wait_for("the server to log the mismatch", Duration::from_secs(5), || {
        server.logs().contains("no common protocol version").then_some(())
    });
    assert_eq!(server.host(&agent.host_id)["connected"], false);

    // A raw client sees the typed error frame too.
    let cfg = agent.identity().client_config(Duration::from_secs(5)).unwrap();
    agent.kill9();
    let (_ep, c) = raw_connect(server.quic, cfg).await.unwrap();
    match hello(&c, (2, 3)).await {
        Ok((_, _, ServerMessage::Error(e))) => {
            assert_eq!(e.code, ErrorCode::UnsupportedVersion);
            assert!(e.message.contains("1..=1"), "{}", e.message);
        }
        other => panic!(
            "expected an UnsupportedVersion error, got {:?}",
            other.map(|x| x.2)
        ),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_and_garbage_frames_close_only_that_connection() {
    let server = Server::start("");
    let mut good = Agent::new("good");
    good.join(&server);
    good.start(&[]);
    server.wait_connected(&good.host_id, true);
    let mut victim = Agent::new("raw");
    victim.join(&server);
    let cfg = victim.identity().client_config(Duration::from_secs(5)).unwrap();

    // Oversized: a header announcing 64 MiB.
    let (_ep, c) = raw_connect(server.quic, cfg.clone()).await.unwrap();
    let (mut send, _recv, m) = hello(&c, (1, 1)).await.unwrap();
    assert!(matches!(m, ServerMessage::Welcome(_)), "{m:?}");
    let mut frame = (64u32 << 20).to_be_bytes().to_vec();
    frame.extend_from_slice(&1u16.to_be_bytes());
    frame.extend_from_slice(&[0u8; 1024]);
    send.write_all(&frame).await.unwrap();
    assert_eq!(close_code(&c).await, Some(ErrorCode::FrameTooLarge));

    // Garbage: a valid header, then bytes that are no message.
    let (_ep2, c) = raw_connect(server.quic, cfg.clone()).await.unwrap();
    let (mut send, _recv, _) = hello(&c, (1, 1)).await.unwrap();
    let mut frame = 10u32.to_be_bytes().to_vec();
    frame.extend_from_slice(&1u16.to_be_bytes());
    frame.extend_from_slice(&[0xff; 8]);
    send.write_all(&frame).await.unwrap();
    assert_eq!(close_code(&c).await, Some(ErrorCode::MalformedFrame));

    // Garbage as the very first frame, before any hello.
    let (_ep3, c) = raw_connect(server.quic, cfg).await.unwrap();
    let (mut send, _recv) = c.open_bi().await.unwrap();
    send.write_all(&[0, 0, 0, 7, 0, 1, 0xde, 0xad, 0xbe, 0xef, 0x00])
        .await
        .unwrap();
    assert_eq!(close_code(&c).await, Some(ErrorCode::MalformedFrame));

    assert!(server.is_running_check(), "the server survived");
    assert_still_heartbeating(&server, &good.host_id);
    assert!(server.logs().contains("MalformedFrame"), "bad frames are logged");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_connection_for_the_same_host_replaces_the_first() {
    let server = Server::start("");
    let mut agent = Agent::new("twice");
    agent.join(&server);
    agent.start(&[]);
    server.wait_connected(&agent.host_id, true);
    let cfg = agent.identity().client_config(Duration::from_secs(5)).unwrap();
    let (_ep, c) = raw_connect(server.quic, cfg).await.unwrap();
    let (_send, _recv, m) = hello(&c, (1, 1)).await.unwrap();
    match m {
        ServerMessage::Welcome(w) => assert_eq!(w.host_id, agent.host_id.parse::<HostId>().unwrap()),
        other => panic!("expected a welcome, got {other:?}"),
    }
    wait_for(
        "the agent's session to be replaced",
        Duration::from_secs(10),
        || agent.log().contains("Replaced").then_some(()),
    );
    // The agent reconnects by itself and, in turn, replaces the raw session.
    assert_eq!(close_code(&c).await, Some(ErrorCode::Replaced));
    server.wait_connected(&agent.host_id, true);
    assert_eq!(server.get("/v1/hosts")["hosts"].as_array().unwrap().len(), 1);
    assert_still_heartbeating(&server, &agent.host_id);
}

#[test]
fn agents_reconnect_after_the_server_is_killed_and_records_survive() {
    let mut server = Server::start("");
    let mut a = Agent::new("a");
    let mut b = Agent::new("b");
    a.join(&server);
    b.join(&server);
    a.start(&[]);
    b.start(&[]);
    let before_a = server.wait_connected(&a.host_id, true);
    let before_b = server.wait_connected(&b.host_id, true);
    // Let the host writer persist the online state before the crash.
    wait_for("hosts persisted online", Duration::from_secs(10), || {
        let l = server.get("/v1/hosts");
        l["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["capacity"]["cpus"] == 16)
            .then_some(())
    });
    server.kill9();
    server.restart();
    for (agent, before) in [(&a, before_a), (&b, before_b)] {
        let after = server.wait_connected(&agent.host_id, true);
        for key in ["id", "name", "first_seen_ms", "cert_serial"] {
            assert_eq!(after[key], before[key], "{key} changed across the restart");
        }
    }
    assert!(a.log().contains("reconnecting"), "{}", a.log());
    assert_still_heartbeating(&server, &a.host_id);
    assert_still_heartbeating(&server, &b.host_id);
}

#[test]
fn agents_renew_certificates_before_expiry_and_use_them_after_restart() {
    let server = Server::start("cert_ttl = \"15s\"");
    let mut agent = Agent::new("renewer");
    agent.join(&server);
    let first = agent.cert_serial();
    let first_expiry = agent.identity().validity.not_after;
    agent.start(&[]);
    server.wait_connected(&agent.host_id, true);
    let renewed = wait_for("the certificate to be renewed", Duration::from_secs(30), || {
        let s = agent.cert_serial();
        (s != first).then_some(s)
    });
    assert!(
        Clock::system().wall() < first_expiry,
        "renewal must happen before expiry"
    );
    wait_for(
        "the server to record the new serial",
        Duration::from_secs(10),
        || (server.host(&agent.host_id)["cert_serial"] == renewed.as_str()).then_some(()),
    );
    // Restart once the first certificate has expired: the agent must come
    // back with the renewed one.
    agent.kill9();
    wait_until_wall(first_expiry + Duration::from_secs(1));
    agent.start(&[]);
    server.wait_connected(&agent.host_id, true);
    assert_still_heartbeating(&server, &agent.host_id);
}

/// An inventory's migration URI (handed to other hosts' libvirtd) and host
/// labels (placement input) come from the network: bad ones are dropped,
/// good ones kept, and the session goes on.
#[tokio::test(flavor = "multi_thread")]
async fn an_inventory_with_a_hostile_migration_uri_and_labels_is_sanitised() {
    use novacron_shared::protocol::{AgentMessage, Capacity, Inventory};
    let server = Server::start("");
    let mut raw = Agent::new("raw-inv");
    raw.join(&server);
    let host = raw.identity().host_id.to_string();
    let cfg = raw.identity().client_config(Duration::from_secs(5)).unwrap();
    let (_ep, c) = raw_connect(server.quic, cfg).await.unwrap();
    let (mut send, _recv, m) = hello(&c, (1, 1)).await.unwrap();
    assert!(matches!(m, ServerMessage::Welcome(_)), "{m:?}");
    let send_inv = |uri: &str, labels: Vec<(String, String)>, shared: Option<&str>| {
        AgentMessage::Inventory(Inventory {
            capacity: Capacity {
                cpus: 4,
                memory_mib: 4096,
                ..Capacity::default()
            },
            hypervisor: "test:///default".into(),
            vms: vec![],
            migration_uri: Some(uri.into()),
            labels: labels.into_iter().collect(),
            shared_storage: shared.map(str::to_string),
            disk_locks: None,
            witness: None,
        })
    };
    let mut buf = Vec::new();
    let bad = send_inv(
        "qemu+tcp://evil/system\n--inject",
        vec![
            ("rack".into(), "r1".into()),
            ("Bad Key".into(), "x".into()),
            ("ctl".into(), "a\u{7}b".into()),
        ],
        Some("/srv/pool\n--inject"),
    );
    novacron_shared::framing::write_frame(&mut send, 1, &bad, &mut buf)
        .await
        .unwrap();
    let h = wait_for("the inventory", Duration::from_secs(10), || {
        let h = server.host(&host);
        (h["capacity"]["cpus"] == 4).then_some(h)
    });
    assert!(
        h["shared_storage"].is_null(),
        "the bad shared storage is dropped: {h}"
    );
    let labels = h["labels"].as_object().unwrap();
    assert_eq!(labels.len(), 1, "only the valid label is kept: {h}");
    assert_eq!(labels["rack"], "r1");
    let inv = server.get(&format!("/v1/hosts/{host}/vms"));
    assert!(
        inv["observed"]["migration_uri"].is_null(),
        "the bad URI is dropped: {inv}"
    );
    // Too many labels: none are trusted. A good URI is kept.
    let many = (0..100).map(|i| (format!("k{i}"), "v".to_string())).collect();
    let msg = send_inv("qemu+tls://hv-9.example/system", many, Some("/srv/pool"));
    novacron_shared::framing::write_frame(&mut send, 1, &msg, &mut buf)
        .await
        .unwrap();
    let inv = wait_for("the second inventory", Duration::from_secs(10), || {
        let inv = server.get(&format!("/v1/hosts/{host}/vms"));
        (inv["observed"]["migration_uri"] == "qemu+tls://hv-9.example/system").then_some(inv)
    });
    assert!(inv["observed"]["labels"].as_object().unwrap().is_empty(), "{inv}");
    assert_eq!(
        server.host(&host)["shared_storage"],
        "/srv/pool",
        "a good path is kept"
    );
    assert!(
        server.host(&host)["connected"].as_bool().unwrap(),
        "the session goes on"
    );
}
