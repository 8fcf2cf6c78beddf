//! Tests of `client` (in a file of their own so the module reads as one piece).

use super::*;

#[tokio::test]
async fn https_without_a_ca_is_refused_before_connecting() {
    // Nothing listens on port 9 of loopback: a connection attempt would
    // be `Connect`; the refusal must come first.
    let c = ApiClient::new("https://127.0.0.1:9".parse().unwrap(), None);
    let e = c.get::<serde_json::Value>("/healthz").await.unwrap_err();
    assert!(matches!(e, ClientError::NoCa { .. }), "{e}");
    assert!(e.to_string().contains("--ca-file"), "{e}");
}

#[test]
fn a_ca_file_without_certificates_is_refused() {
    let e = TrustedCa::from_pem("hello", "ca.pem").unwrap_err();
    assert!(e.to_string().contains("ca.pem"), "{e}");
}

#[test]
fn urls_parse_with_defaults_and_refuse_what_we_cannot_speak() {
    let u: ApiUrl = "http://127.0.0.1:7080".parse().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(u.join("/v1/hosts"), "http://127.0.0.1:7080/v1/hosts");
    let u: ApiUrl = "http://fleet.example.com/novacron/"
        .parse()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(u.join("/v1/vms"), "http://fleet.example.com:80/novacron/v1/vms");
    let u: ApiUrl = "[::1]:7080".parse().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(u.to_string(), "https://[::1]:7080", "a bare address is HTTPS");
    assert!(u.is_https());
    let u: ApiUrl = "http://[::1]".parse().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(u.to_string(), "http://[::1]:80");
    let u: ApiUrl = "https://fleet.example.com"
        .parse()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(u.to_string(), "https://fleet.example.com:443");
    let a: SocketAddr = "127.0.0.1:7080".parse().unwrap();
    assert_eq!(ApiUrl::from(a).to_string(), "https://127.0.0.1:7080");
    assert_eq!(ApiUrl::plain(a).to_string(), "http://127.0.0.1:7080");
    for bad in [
        "ftp://x",
        "http://",
        "http://x:port",
        "http://u@x:1",
        "http://x:1/?q",
    ] {
        assert!(bad.parse::<ApiUrl>().is_err(), "{bad}");
    }
}

#[test]
fn retry_after_is_bounded() {
    let mut h = hyper::HeaderMap::new();
    assert_eq!(retry_after(&h), Duration::from_secs(1));
    for (v, want) in [
        ("2", 2000),
        ("0", 100),
        ("3600", 10_000),
        ("soon", 1000),
        ("-1", 1000),
    ] {
        h.insert(
            hyper::header::RETRY_AFTER,
            hyper::header::HeaderValue::from_static(v),
        );
        assert_eq!(retry_after(&h), Duration::from_millis(want), "{v}");
    }
}

#[test]
fn refusals_carry_the_api_code_and_message() {
    let e = refusal(
        StatusCode::FORBIDDEN,
        br#"{"error":{"code":"forbidden","message":"this needs an admin token"}}"#,
    );
    assert_eq!(e.to_string(), "403 forbidden: this needs an admin token");
    assert_eq!(e.code(), Some(ErrorCode::Forbidden));
    let e = refusal(
        StatusCode::CONFLICT,
        br#"{"error":{"code":"from_the_future","message":"m"}}"#,
    );
    assert_eq!(e.to_string(), "409 from_the_future: m");
    assert_eq!(e.code(), Some(ErrorCode::Unknown));
    let e = refusal(StatusCode::BAD_GATEWAY, b"<html>upstream down</html>");
    assert_eq!(e.to_string(), "502 bad_gateway: <html>upstream down</html>");
    assert!(!e.is_unreachable());
}

#[test]
fn sse_events_survive_any_split_and_skip_comments() {
    let text = ": keep-alive\n\nid: 1\nevent: vm\ndata: {\"a\":1}\n\n:ping\r\nid: 2\r\nevent: host\r\ndata: x\r\ndata: y\r\n\r\ndata: plain\n\n";
    for split in 1..text.len() {
        let mut p = SseParser::default();
        let mut got = Vec::new();
        for chunk in text.as_bytes().chunks(split) {
            p.push(chunk);
            while let Some(e) = p.next_event() {
                got.push(e);
            }
        }
        assert_eq!(
            got,
            vec![
                SseEvent {
                    id: Some("1".into()),
                    event: "vm".into(),
                    data: "{\"a\":1}".into()
                },
                SseEvent {
                    id: Some("2".into()),
                    event: "host".into(),
                    data: "x\ny".into()
                },
                SseEvent {
                    id: None,
                    event: "message".into(),
                    data: "plain".into()
                },
            ],
            "split {split}"
        );
    }
}

#[test]
fn sse_lines_are_bounded() {
    let mut p = SseParser::default();
    p.push(b"data: ");
    p.push(&vec![b'x'; MAX_SSE_LINE + 10]);
    assert!(p.buf.len() <= MAX_SSE_LINE);
}

#[test]
fn an_event_past_its_size_cap_is_dropped_whole_and_the_stream_goes_on() {
    let mut p = SseParser::default();
    let line = format!("data: {}\n", "y".repeat(MAX_SSE_LINE / 2));
    // Many lines of one event: more than the cap in all.
    for _ in 0..(2 * MAX_SSE_EVENT / (MAX_SSE_LINE / 2) + 2) {
        p.push(line.as_bytes());
        assert!(p.pending.data.len() <= MAX_SSE_EVENT, "{}", p.pending.data.len());
    }
    p.push(b"\nevent: op\ndata: small\n\n");
    let ev = p.next_event().expect("the next event arrives");
    assert_eq!((ev.event.as_str(), ev.data.as_str()), ("op", "small"));
    assert!(p.next_event().is_none(), "the oversized event is not delivered");
}

/// Answers one HTTP request on loopback with `status` and `body`; returns
/// the address and the request line it got.
async fn answer_once(status: &'static str, body: String) -> (SocketAddr, tokio::task::JoinHandle<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "the client closed before its request ended");
            got.extend_from_slice(&buf[..n]);
        }
        let reply = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(reply.as_bytes()).await.unwrap();
        let text = String::from_utf8_lossy(&got).into_owned();
        text.lines().next().unwrap_or_default().to_string()
    });
    (addr, task)
}

#[tokio::test]
async fn burst_gets_v1_burst_into_its_type_and_passes_refusals_on() {
    let body = serde_json::json!({
        "enabled": true, "provider": "aws", "region": "us-east-1", "fleet": "nc-1",
        "budget": {"max_instances": 4, "instances": 1, "max_usd_per_hour": 2.0, "usd_per_hour": 0.0104,
                   "max_usd_per_month": 500.0, "month_usd": 1.25, "month": "2026-12"},
        "instances": [], "pending": [], "orphans": [], "total_usd": 3.5
    });
    let (addr, seen) = answer_once("200 OK", body.to_string()).await;
    let c = ApiClient::new(ApiUrl::plain(addr), Some("t".into()));
    let v = c.burst().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(seen.await.unwrap(), "GET /v1/burst HTTP/1.1");
    assert!(v.enabled);
    assert_eq!(v.budget.month, "2026-12");
    assert_eq!(v.budget.instances, 1);
    assert_eq!(v.total_usd, 3.5);

    // A reply that is not a burst status is an error, not an empty one.
    let (addr, _seen) = answer_once("200 OK", "{\"enabled\": true}".into()).await;
    let e = ApiClient::new(ApiUrl::plain(addr), None)
        .burst()
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Json { status: 200, .. }), "{e}");

    let refusal = r#"{"error":{"code":"unauthenticated","message":"no token"}}"#;
    let (addr, _seen) = answer_once("401 Unauthorized", refusal.into()).await;
    let e = ApiClient::new(ApiUrl::plain(addr), None)
        .burst()
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unauthenticated), "{e}");
}
