//! What the `novacron` CLI tests share: the CLI with a clean
//! environment, runs against a real server, output helpers, a one-host
//! fleet.

// Each CLI test target uses its own part of these helpers.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Output};
use std::time::Duration;

use novacron_e2e::{bin, wait_for, Agent, Server};

/// `novacron` with no NOVACRON_* settings from the environment.
pub fn cli() -> Command {
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
pub fn run(server: &Server, args: &[&str]) -> Output {
    run_as(server, &server.token, args)
}

/// Runs `novacron --api <server> --ca-file <its CA> --token <token> ARGS…`.
pub fn run_as(server: &Server, token: &str, args: &[&str]) -> Output {
    cli()
        .args(["--api", &server.api_url(), "--token", token])
        .arg("--ca-file")
        .arg(server.ca_file())
        .args(args)
        .output()
        .unwrap()
}

pub fn run_with(api: &str, token: &str, args: &[&str]) -> Output {
    cli()
        .args(["--api", api, "--token", token])
        .args(args)
        .output()
        .unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Asserts success and returns stdout.
pub fn ok(o: &Output) -> String {
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
pub fn fleet(host_name: &str) -> (Server, Agent, String) {
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
pub fn field(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_string())
}

/// Reads `novacron events` lines from a running child.
pub fn lines_of(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
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
pub fn running_vm(server: &Server, name: &str, host: &str) {
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
