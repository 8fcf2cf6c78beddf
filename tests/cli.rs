//! The `novacron` operator CLI, run as a real process against a real
//! server with agents on libvirt test-driver hosts. The routes whose
//! replies must be scripted (long-running operations, the event stream,
//! rate limits) are in `cli_stub.rs`.

#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::process::Stdio;
use std::time::Duration;

mod cli_common;
use cli_common::*;
use novacron_e2e::{wait_for, Agent, Server};
use serde_json::{json, Value};

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
    wait_for(
        "the CLI's JSON to match an API read taken right after it",
        Duration::from_secs(10),
        || {
            let out = ok(&run(&server, &["-o", "json", "hosts", "list"]));
            let cli: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
            let api = server.get("/v1/hosts");
            (strip(&cli) == strip(&api)).then_some(())
        },
    );
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

// --- Operations, tokens and events on the real server -----------------

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
