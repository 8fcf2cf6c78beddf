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
