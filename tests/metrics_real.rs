//! Metrics from real QEMU (TCG) guests under a real libvirtd, scraped by a
//! real Prometheus. Needs root, libvirtd running (`testbed.sh start`), the
//! guest files (`testbed.sh guest`) and the Debian `prometheus` package;
//! `.ci/run` provides all of them. Fails loudly when any is missing.
//!
//! Two guests boot from the same kernel; one has `novacron.burn=1` on its
//! command line and spins a vCPU at 100 %, the other idles. The burning
//! guest's CPU series must show it, through NovaCron's API and through
//! Prometheus's own HTTP API after it scraped the server.

#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use novacron_e2e::{guest_dir, wait_for, wait_until_wall, Agent, Server};
use novacron_shared::clock::Clock;
use serde_json::{json, Value};
use virt::enumutil::Enum;
use virt::error::ErrorNumber;

/// A Prometheus server scraping one target every second.
struct Prometheus {
    child: Child,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// A Prometheus scraping the server at `target` over HTTPS, trusting
    /// only `ca_file` (the fleet CA), as the README's scrape config says.
    fn start(target: std::net::SocketAddr, ca_file: &std::path::Path) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: novacron\n    \
                 metrics_path: /metrics\n    scheme: https\n    tls_config:\n      ca_file: {ca}\n    \
                 static_configs:\n      - targets: ['{target}']\n",
                ca = ca_file.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start prometheus ({e}); install the Debian prometheus package (.ci/run does)")
            });
        Prometheus {
            child,
            addr,
            _dir: dir,
        }
    }

    /// An instant query through Prometheus's HTTP API; the result vector.
    fn query(&self, q: &str) -> Option<Vec<Value>> {
        let mut enc = String::new();
        for b in q.bytes() {
            if b.is_ascii_alphanumeric() || b"_-.~".contains(&b) {
                enc.push(b as char);
            } else {
                enc.push_str(&format!("%{b:02X}"));
            }
        }
        let mut s = std::net::TcpStream::connect(self.addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET /api/v1/query?query={enc} HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut out = String::new();
        std::io::Read::read_to_string(&mut s, &mut out).ok()?;
        let body = out.split_once("\r\n\r\n")?.1;
        let v: Value = serde_json::from_str(body).ok()?;
        (v["status"] == "success").then(|| v["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Mean of a VM's CPU rate (cores) over the last `secs` seconds, from the API.
fn cpu_rate(server: &Server, vm: &str, secs: u64) -> Option<f64> {
    let a = server.get(&format!("/v1/metrics?vm={vm}&series=vm.cpu&from={secs}s"));
    let pts = a["series"][0]["points"].as_array()?.clone();
    if pts.len() < 3 {
        return None;
    }
    Some(pts.iter().map(|p| p[1].as_f64().unwrap()).sum::<f64>() / pts.len() as f64)
}

#[test]
fn a_busy_guest_moves_its_cpu_series_in_the_api_and_in_prometheus() {
    let guest = guest_dir();
    let uri = "qemu:///system";
    virt::connect::Connect::open(Some(uri)).unwrap_or_else(|e| {
        panic!("cannot reach libvirtd at {uri} ({e}); run `packaging/dev/testbed.sh install && packaging/dev/testbed.sh start` as root")
    });
    let scratch = tempfile::Builder::new()
        .prefix("nc-metrics-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let console = scratch.path().join("console");
    std::fs::create_dir_all(&console).unwrap();
    for p in [scratch.path(), console.as_path()] {
        Command::new("chmod").arg("0755").arg(p).status().unwrap();
    }
    let tag = &novacron_shared::ids::VmId::random().to_string()[..8];
    let server = Server::start("heartbeat_interval = \"300ms\"");
    let vms = format!(
        "virt_type = \"qemu\"\nstorage_pool = \"nc-metrics-{tag}\"\nconsole_log_dir = \"{}\"\nstorage_path = \"{}\"",
        console.display(),
        scratch.path().join("pool").display()
    );
    let mut agent = Agent::on(&format!("metrics-{tag}"), uri, &vms);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&agent.config)
        .unwrap();
    writeln!(f, "\n[metrics]\ninterval = \"1s\"").unwrap();
    agent.join(&server);
    agent.start(&[]);
    server.wait_connected(&agent.host_id, true);
    // Placement needs the host's capacity, which comes with its inventory.
    wait_for("the host's capacity", Duration::from_secs(30), || {
        (server.host(&agent.host_id)["capacity"]["memory_mib"].as_u64()? > 0).then_some(())
    });

    let mut ids = Vec::new();
    for (name, burn) in [
        (format!("burn-{tag}"), " novacron.burn=1"),
        (format!("idle-{tag}"), ""),
    ] {
        let spec = json!({
            "name": name, "vcpus": 1, "memory_mib": 128,
            "boot": {"kernel": guest.join("vmlinuz"), "initrd": guest.join("initrd.img"),
                     "cmdline": format!("console=ttyS0 panic=-1{burn}")}
        });
        let (s, v) = server.send("POST", "/v1/vms", &json!({ "spec": spec }));
        assert_eq!(s, 201, "{v}");
        ids.push((name, v["vm"]["id"].as_str().unwrap().to_string()));
    }
    let cleanup = Cleanup {
        server: &server,
        ids: ids.iter().map(|(_, id)| id.clone()).collect(),
        pool: format!("nc-metrics-{tag}"),
    };
    for (name, _) in &ids {
        let log = console.join(format!("{name}.console.log"));
        wait_for(&format!("{name} to boot"), Duration::from_secs(120), || {
            std::fs::read_to_string(&log)
                .ok()?
                .contains("NOVACRON-GUEST-BOOTED")
                .then_some(())
        });
    }
    let burn_log = std::fs::read_to_string(console.join(format!("{}.console.log", ids[0].0))).unwrap();
    assert!(burn_log.contains("NOVACRON-GUEST-BURN 1"), "{burn_log}");
    let (burn_id, idle_id) = (ids[0].1.clone(), ids[1].1.clone());

    // The busy guest's vCPU time grows at about one core; the idle one's
    // barely moves. TCG on a loaded 2-core machine gets less than a full
    // core, so the bar is relative: well above the idle guest and clearly busy.
    // The 5 s window must hold only samples from after both boots.
    wait_until_wall(Clock::system().wall() + Duration::from_secs(5));
    let (busy, idle) = wait_for("CPU rates of both guests", Duration::from_secs(60), || {
        Some((cpu_rate(&server, &burn_id, 5)?, cpu_rate(&server, &idle_id, 5)?))
    });
    eprintln!("vm.cpu over 5 s: busy guest {busy:.2} cores, idle guest {idle:.2} cores");
    assert!(busy > 0.4, "busy guest uses only {busy:.2} cores");
    assert!(busy > 3.0 * idle, "busy {busy:.2} vs idle {idle:.2} cores");
    // The balloon reports the guest's memory.
    let mem = server.get(&format!("/v1/metrics?vm={burn_id}&series=vm.memory&from=30s"));
    let current = mem["series"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["label"] == "current" || s["label"] == "maximum")
        .map(|s| {
            s["points"].as_array().unwrap().last().unwrap()[1]
                .as_f64()
                .unwrap()
        });
    assert_eq!(current, Some(128.0 * 1024.0 * 1024.0), "{mem}");

    // Prometheus scrapes the server and has the VM's CPU counter, rising.
    let prom = Prometheus::start(server.api, &server.ca_file());
    let series = wait_for(
        "Prometheus to scrape the busy guest's CPU",
        Duration::from_secs(60),
        || {
            let r = prom.query(&format!("novacron_vm_cpu_seconds_total{{vm=\"{burn_id}\"}}"))?;
            (!r.is_empty()).then_some(r)
        },
    );
    assert_eq!(series[0]["metric"]["host"], agent.host_id.as_str());
    assert_eq!(series[0]["metric"]["job"], "novacron");
    // Once Prometheus holds ten seconds of samples, its own rate() sees
    // the busy vCPU too (polled: early windows hold only a sample or two).
    let mut last = 0.0;
    let rate = wait_for(
        "Prometheus's rate() to show the busy vCPU",
        Duration::from_secs(60),
        || {
            let r = prom.query(&format!(
                "rate(novacron_vm_cpu_seconds_total{{vm=\"{burn_id}\"}}[10s])"
            ))?;
            last = r.first()?["value"][1].as_str()?.parse().ok()?;
            (last > 0.4).then_some(last)
        },
    );
    eprintln!(
        "Prometheus rate(novacron_vm_cpu_seconds_total[10s]) of the busy guest: {rate:.2} (last {last:.2})"
    );
    let idle_rate = prom
        .query(&format!(
            "rate(novacron_vm_cpu_seconds_total{{vm=\"{idle_id}\"}}[10s])"
        ))
        .and_then(|r| r.first()?["value"][1].as_str()?.parse::<f64>().ok())
        .unwrap();
    assert!(
        rate > 3.0 * idle_rate,
        "Prometheus: busy {rate:.2} vs idle {idle_rate:.2} cores"
    );
    let up = prom.query("up{job=\"novacron\"}").unwrap();
    assert_eq!(up[0]["value"][1], "1");
    drop(cleanup);
}

/// Deletes the test's VMs through the API and waits until libvirt forgets them.
struct Cleanup<'a> {
    server: &'a Server,
    ids: Vec<String>,
    pool: String,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for id in &self.ids {
            let _ = self.server.send("DELETE", &format!("/v1/vms/{id}"), &json!({}));
        }
        // A drop may run while the test panics: report, never panic here.
        let conn = match virt::connect::Connect::open(Some("qemu:///system")) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("cleanup: cannot reach libvirtd ({e}); the test's VMs may be left behind");
                return;
            }
        };
        let gone = |id: &String| match conn.lookup_domain_by_uuid_string(id) {
            Ok(_) => Ok(false),
            Err(e) if matches!(e.code(), Enum::Known(ErrorNumber::NoDomain)) => Ok(true),
            Err(e) => Err(format!("{id}: {e}")),
        };
        let clock = Clock::system();
        let start = clock.now();
        loop {
            match self.ids.iter().map(gone).collect::<Result<Vec<bool>, _>>() {
                Ok(g) if g.iter().all(|&g| g) => break,
                Ok(_) if clock.since(start) < Duration::from_secs(60) => {
                    novacron_e2e::let_real_time_pass(Duration::from_millis(200));
                }
                Ok(_) => {
                    eprintln!("cleanup: the test's VMs are still defined after 60 s");
                    break;
                }
                Err(e) => {
                    eprintln!("cleanup: cannot look up a test VM: {e}");
                    break;
                }
            }
        }
        match conn.lookup_storage_pool_by_name(&self.pool) {
            Ok(p) => {
                let _ = p.destroy();
                let _ = p.undefine();
            }
            Err(e) if matches!(e.code(), Enum::Known(ErrorNumber::NoStoragePool)) => {}
            Err(e) => eprintln!("cleanup: cannot look up pool {}: {e}", self.pool),
        }
    }
}
