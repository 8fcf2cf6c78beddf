//! The API is HTTPS by default, with the server certificate the fleet CA
//! issued: a client that does not trust the fleet CA is refused at the TLS
//! handshake, one that does gets through, the CLI on the server host needs
//! no flags, and plain HTTP is served only when configured on loopback.

use std::process::Command;

use novacron_e2e::{bin, http, Server};

/// `curl` against the live server; returns (exit code, stdout, stderr).
fn curl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run curl ({e}); packaging/dev/deps.sh installs it"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn curl_needs_the_fleet_ca_and_gets_through_with_it() {
    let server = Server::start("");
    let url = format!("{}/v1/hosts", server.api_url());
    assert!(url.starts_with("https://"), "HTTPS is the default: {url}");
    let auth = format!("Authorization: Bearer {}", server.token);

    // Without --cacert, curl's own trust store does not know the fleet CA:
    // exit 60 is "peer certificate cannot be authenticated".
    let (code, _, err) = curl(&["-H", &auth, &url]);
    assert_eq!(
        code, 60,
        "curl without the fleet CA must fail verification: {err}"
    );

    // With the fleet CA it works, and the token is checked as ever.
    let ca = server.ca_file();
    let ca = ca.to_str().unwrap();
    let (code, out, err) = curl(&["--cacert", ca, "-H", &auth, &url]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v, serde_json::json!({"hosts": []}));
    let (code, out, _) = curl(&[
        "--cacert",
        ca,
        "-H",
        "Authorization: Bearer nca_wrong",
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        &url,
    ]);
    assert_eq!((code, out.as_str()), (0, "401"));

    // Prometheus' scrape path is HTTPS too, and needs no token.
    let (code, out, err) = curl(&["--cacert", ca, &format!("{}/metrics", server.api_url())]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("novacron_agent_sessions"), "{out}");

    // Plain HTTP to the HTTPS port gets no API answer.
    let (code, out, _) = curl(&["-H", &auth, &format!("http://{}/v1/hosts", server.api)]);
    assert_ne!(code, 0, "plain HTTP must not be served on the HTTPS port: {out}");
    assert!(!out.contains("\"hosts\""), "{out}");

    // A certificate from another CA (the wrong fleet) is refused as well.
    let other = Server::start("");
    let (code, _, err) = curl(&["--cacert", other.ca_file().to_str().unwrap(), "-H", &auth, &url]);
    assert_eq!(code, 60, "a foreign CA must not verify this server: {err}");
}

#[test]
fn the_cli_on_the_server_host_needs_no_flags() {
    let server = Server::start("");
    let out = Command::new(bin("novacron"))
        .env_remove("NOVACRON_API")
        .env_remove("NOVACRON_TOKEN")
        .env_remove("NOVACRON_TOKEN_FILE")
        .env_remove("NOVACRON_CA_FILE")
        .env("NOVACRON_SERVER_CONFIG", &server.config)
        .args(["-o", "json", "hosts", "list"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The admin subcommands of the server binary go over HTTPS as well.
    let out = server.cli(&["host", "list"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Given the wrong CA, the CLI refuses to talk (a verification error,
    // exit 3: the API could not be reached safely).
    let other = Server::start("");
    let out = Command::new(bin("novacron"))
        .env("NOVACRON_SERVER_CONFIG", "/nonexistent/server.toml")
        .env_remove("NOVACRON_TOKEN_FILE")
        .args(["--api", &server.api_url(), "--token", &server.token, "--ca-file"])
        .arg(other.ca_file())
        .args(["hosts", "list"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("certificate") || err.contains("UnknownIssuer"),
        "{err}"
    );
    // And without any CA it says what to pass.
    let out = Command::new(bin("novacron"))
        .env("NOVACRON_SERVER_CONFIG", "/nonexistent/server.toml")
        .env_remove("NOVACRON_TOKEN_FILE")
        .env_remove("NOVACRON_CA_FILE")
        .args([
            "--api",
            &server.api_url(),
            "--token",
            &server.token,
            "hosts",
            "list",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--ca-file"), "{err}");
}

#[test]
fn plain_http_only_when_configured_on_loopback() {
    let server = Server::start_with("", "plaintext = true", "");
    assert!(server.api_url().starts_with("http://"), "{}", server.api_url());
    let (status, v) = http(server.api, "GET", "/v1/hosts", Some(&server.token), None);
    assert_eq!(status, 200, "{v}");
    assert!(
        server.logs().contains("plain HTTP"),
        "the server warns that tokens cross in clear text"
    );

    // On a non-loopback address it refuses to start, naming the option.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("server.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = \"{}\"\n[api]\nlisten = \"0.0.0.0:0\"\nplaintext = true\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let out = Command::new(bin("novacron-server"))
        .arg("-c")
        .arg(&cfg)
        .arg("validate")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("api.plaintext") && err.contains("plaintext_on_network"),
        "{err}"
    );
}
