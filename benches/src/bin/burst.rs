//! Cloud-burst benchmark: a real server (in this process, the real web API
//! and burst broker) with `[burst]` against moto, the EC2 emulator, on
//! loopback. The fleet has no hosts, so every burstable VM bursts. N VMs
//! (default 50) are created one after another through `POST /v1/vms`, as
//! fast as the API answers; per VM it measures:
//!
//! - create → decided: the request's start (this process's wall clock) to
//!   the broker's burst decision (`cloud.decided_ms`, the server's wall
//!   clock: the same machine's, in ms);
//! - decided → RunInstances issued: the server's histogram
//!   `novacron_burst_decision_to_launch_seconds` (the first attempt of each
//!   launch; its buckets bound the median and p99, its sum gives the mean);
//! - create → running in the API, and decided → running in the API: until
//!   `GET /v1/vms` shows the VM's cloud state `running` with an instance id
//!   (its `cloud` is the stored record, as `GET /v1/vms/{id}` shows it;
//!   `GET /v1/burst` is published once per broker tick); polled every 5 ms;
//! - launches per second the broker sustained: VMs launched over the time
//!   from the first decision to the last VM seen running.
//!
//! Then it checks in moto that every VM has exactly one instance (by its
//! `novacron:vm-id` tag). With `--proxy-throttle K`, the harness's fault
//! proxy sits between the server and moto and answers about every K-th
//! RunInstances with `RequestLimitExceeded` (it queues a throttle for the
//! next RunInstances each time K - 1 more went through), and the figures
//! show what the broker's backoff and lookup-by-tag before each retry cost.
//!
//! moto shows instances `running` at once and answers in milliseconds: the
//! figures are the server's own cost (and moto's), not EC2's, whose
//! instances take tens of seconds to run.
//!
//! `make bench-burst` (or `cargo build --release -p novacron-bench --bin
//! burst && target/release/burst [--vms 50] [--proxy-throttle K]`); needs
//! PyPI access the first time (moto is installed into a venv).

// A benchmark times a real server and a real moto process by the OS clock
// and waits on them in real time: the clock rule does not apply.
#![allow(clippy::disallowed_methods)]

#[path = "../../../tests/harness/faultproxy.rs"]
#[allow(dead_code)]
mod faultproxy;
#[path = "../../../tests/harness/moto.rs"]
#[allow(dead_code)]
mod moto;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Parser;
use hyper::Method;
use novacron_bench::{machine_description, ms, Summary};
use novacron_server::config::{AwsConfig, BurstConfig, ConfigFile, Secret, ServerConfig};
use novacron_server::datadir::DataDir;
use serde_json::{json, Value};

#[derive(Parser, Debug)]
struct Args {
    /// Burstable VMs to create.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
    vms: u32,
    /// Put the fault proxy in front of moto and throttle about every K-th
    /// RunInstances (RequestLimitExceeded).
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u64).range(1..))]
    proxy_throttle: Option<u64>,
    /// The broker's `[burst] interval`.
    #[arg(long, default_value = "100ms")]
    interval: String,
}

/// The image key the VMs launch from.
const IMAGE_KEY: &str = "bench-image";

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `(count, sum)` and the cumulative buckets `(le, count)` of one histogram
/// in Prometheus text.
fn histogram(text: &str, name: &str) -> (u64, f64, Vec<(f64, u64)>) {
    let mut buckets = Vec::new();
    let (mut count, mut sum) = (0, 0.0);
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if let Some(rest) = key.strip_prefix(&format!("{name}_bucket{{le=\"")) {
            let le = rest.trim_end_matches("\"}");
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::NAN)
            };
            buckets.push((le, value.parse().unwrap_or(0)));
        } else if key == format!("{name}_count") {
            count = value.parse().unwrap_or(0);
        } else if key == format!("{name}_sum") {
            sum = value.parse().unwrap_or(0.0);
        }
    }
    (count, sum, buckets)
}

/// The upper bound of the bucket holding the `p`th percentile.
fn bucket_percentile(buckets: &[(f64, u64)], count: u64, p: f64) -> f64 {
    let rank = ((p / 100.0) * count as f64).ceil().max(1.0) as u64;
    buckets
        .iter()
        .find(|(_, c)| *c >= rank)
        .map_or(f64::INFINITY, |(le, _)| *le)
}

fn le(v: f64) -> String {
    if v.is_infinite() {
        "> 60 s".into()
    } else {
        format!("<= {}", ms(Duration::from_secs_f64(v)))
    }
}

/// Per-VM timestamps: the create's start (monotonic and Unix ms), the
/// decision (server's Unix ms) and the first poll that saw it running.
struct Timing {
    created: Instant,
    created_ms: u64,
    decided_ms: Option<u64>,
    running: Option<(Instant, u64)>,
    attempts: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let interval = novacron_shared::duration::parse(&args.interval)?;
    println!("machine: {}", machine_description());
    println!(
        "cores: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // The moto helpers block on a runtime of their own: call them off this one.
    let moto = Arc::new(tokio::task::spawn_blocking(moto::Moto::start).await?);
    let image = tokio::task::spawn_blocking({
        let m = moto.clone();
        move || m.image()
    })
    .await?;
    let proxy = args
        .proxy_throttle
        .map(|_| Arc::new(faultproxy::FaultProxy::start(moto.endpoint())));
    let endpoint = proxy.as_ref().map_or_else(|| moto.endpoint(), |p| p.endpoint());

    let dir = tempfile::tempdir()?;
    let mut cfg = ServerConfig {
        data_dir: dir.path().join("server"),
        ..ServerConfig::default()
    };
    cfg.quic.listen = "127.0.0.1:0".parse()?;
    cfg.api.listen = "127.0.0.1:0".parse()?;
    cfg.api.rate_limit = 0.0;
    let max_instances = args.vms.saturating_mul(2);
    cfg.burst = BurstConfig {
        enabled: true,
        interval,
        max_instances,
        max_usd_per_hour: 1_000_000.0,
        max_usd_per_month: 1_000_000_000.0,
        aws: Some(AwsConfig {
            endpoint: Some(endpoint),
            access_key_id: Some(moto::ACCESS_KEY_ID.into()),
            secret_access_key: Some(Secret(moto::SECRET_ACCESS_KEY.into())),
            call_timeout: Duration::from_secs(10),
            images: [(IMAGE_KEY.to_owned(), image)].into(),
            ..AwsConfig::new(moto::REGION)
        }),
        ..BurstConfig::default()
    };
    cfg.validate()?;
    let report = DataDir::new(&cfg.data_dir).init(&cfg, SystemTime::now())?;
    let running = novacron_server::start(&cfg).await?;
    let api = running.api_client(&report.admin_token)?;
    println!(
        "server: {} (no hosts), [burst] interval {}, max_instances {max_instances}; EC2: moto {}{}",
        running.api_url,
        novacron_shared::duration::format(interval),
        moto.endpoint(),
        match (&proxy, args.proxy_throttle) {
            (Some(p), Some(k)) => format!(
                " behind the fault proxy {} throttling about every {k}th RunInstances",
                p.endpoint()
            ),
            _ => String::new(),
        }
    );

    // The throttler: each time K - 1 more RunInstances went through, a
    // throttle is queued for the next one (the throttled call counts as
    // seen too, hence the step of K).
    let stop = Arc::new(AtomicBool::new(false));
    let queued = Arc::new(AtomicU64::new(0));
    let throttler = match (&proxy, args.proxy_throttle) {
        (Some(p), Some(k)) => {
            let (p, stop, queued) = (p.clone(), stop.clone(), queued.clone());
            Some(std::thread::spawn(move || {
                let mut next = k - 1;
                while !stop.load(Ordering::Relaxed) {
                    if p.seen("RunInstances") as u64 >= next {
                        p.push("RunInstances", faultproxy::Fault::Throttle, 1);
                        queued.fetch_add(1, Ordering::Relaxed);
                        next += k;
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
            }))
        }
        _ => None,
    };

    let total = args.vms as usize;
    let mut vms: HashMap<String, Timing> = HashMap::new();
    let t_start = Instant::now();
    for i in 0..total {
        let name = format!("burst-{i:04}");
        let created = Instant::now();
        let created_ms = unix_ms(SystemTime::now());
        let body = json!({
            "spec": {"name": name, "vcpus": 1 + i % 2, "memory_mib": 1024,
                     "cloud_init": {"user_data": format!("#cloud-config\nhostname: {name}\n")}},
            "power": "running",
            "placement": {"burst": {"image": IMAGE_KEY, "repatriate": false}}
        });
        let v = api.call(Method::POST, "/v1/vms", Some(body)).await?;
        let id = v["vm"]["id"]
            .as_str()
            .context("POST /v1/vms gave no id")?
            .to_owned();
        vms.insert(
            id,
            Timing {
                created,
                created_ms,
                decided_ms: None,
                running: None,
                attempts: 0,
            },
        );
    }
    let created_all = t_start.elapsed();
    let result = async {
        loop {
            let list: Value = api.call(Method::GET, "/v1/vms?limit=1000", None).await?;
            let now = Instant::now();
            let wall = unix_ms(SystemTime::now());
            for v in list["vms"].as_array().into_iter().flatten() {
                let c = &v["cloud"];
                let Some(t) = v["vm"]["id"].as_str().and_then(|id| vms.get_mut(id)) else {
                    continue;
                };
                t.decided_ms = t.decided_ms.or(c["decided_ms"].as_u64());
                t.attempts = t.attempts.max(c["attempts"].as_u64().unwrap_or(0));
                if t.running.is_none() && c["state"] == "running" && c["instance"].is_string() {
                    t.running = Some((now, wall));
                }
            }
            let done = vms.values().filter(|t| t.running.is_some()).count();
            if done == total {
                return Ok(());
            }
            if t_start.elapsed() > Duration::from_secs(300) {
                bail!("only {done} of {total} VMs running in the API after 300 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    if let Some(t) = throttler {
        let _ = t.join();
    }
    result?;
    println!(
        "created {total} VMs one after another in {} ({} per create); all running in the API {} after the first create",
        ms(created_all),
        ms(created_all / u32::try_from(total).unwrap_or(1)),
        ms(t_start.elapsed())
    );

    let mut create_decided = Vec::new();
    let mut create_running = Vec::new();
    let mut decided_running = Vec::new();
    for t in vms.values() {
        let Some((t_run, w_run)) = t.running else { continue };
        create_running.push(t_run.duration_since(t.created));
        if let Some(d) = t.decided_ms {
            create_decided.push(Duration::from_millis(d.saturating_sub(t.created_ms)));
            decided_running.push(Duration::from_millis(w_run.saturating_sub(d)));
        }
    }
    let first_decided = vms.values().filter_map(|t| t.decided_ms).min().unwrap_or(0);
    let last_running = vms
        .values()
        .filter_map(|t| t.running.map(|r| r.1))
        .max()
        .unwrap_or(0);
    let span = Duration::from_millis(last_running.saturating_sub(first_decided));
    let s = |v: Vec<Duration>| Summary::of(v).map_or_else(|| "no values".into(), |s| s.to_string());
    println!(
        "create -> decided (cloud.decided_ms, ms resolution): {}",
        s(create_decided)
    );
    match api.text("/metrics").await {
        Ok(text) => {
            let (count, sum, buckets) = histogram(&text, "novacron_burst_decision_to_launch_seconds");
            if count == 0 {
                println!("decided -> RunInstances issued: the histogram has no samples");
            } else {
                println!(
                    "decided -> RunInstances issued (histogram, first attempts, n={count}): mean {}, median {}, p99 {}",
                    ms(Duration::from_secs_f64(sum / count as f64)),
                    le(bucket_percentile(&buckets, count, 50.0)),
                    le(bucket_percentile(&buckets, count, 99.0)),
                );
            }
        }
        Err(e) => println!("decided -> RunInstances issued: cannot read /metrics: {e}"),
    }
    println!(
        "decided -> running in the API (server's ms clock to the poll's): {}",
        s(decided_running)
    );
    println!(
        "create -> running in the API (polled every 5 ms): {}",
        s(create_running)
    );
    println!(
        "launches per second the broker sustained: {:.1} ({total} from the first decision to the last VM running in {})",
        total as f64 / span.as_secs_f64().max(0.001),
        ms(span)
    );
    if let (Some(p), Some(k)) = (&proxy, args.proxy_throttle) {
        println!(
            "fault proxy: RunInstances seen {} (throttles queued {}, about every {k}th), DescribeInstances seen {}; VMs seen retrying: {}",
            p.seen("RunInstances"),
            queued.load(Ordering::Relaxed),
            p.seen("DescribeInstances"),
            vms.values().filter(|t| t.attempts > 0).count(),
        );
    }
    let ids: Vec<String> = vms.keys().cloned().collect();
    let m = moto.clone();
    let (instances, wrong) = tokio::task::spawn_blocking(move || {
        let all = m.instances();
        let mut per_vm: HashMap<String, usize> = HashMap::new();
        for i in &all {
            if let Some(v) = i.tags.get(novacron_cloud::TAG_VM) {
                *per_vm.entry(v.clone()).or_default() += 1;
            }
        }
        let wrong: Vec<(String, usize)> = ids
            .into_iter()
            .map(|id| {
                let n = per_vm.get(&id).copied().unwrap_or(0);
                (id, n)
            })
            .filter(|(_, n)| *n != 1)
            .collect();
        (all.len(), wrong)
    })
    .await?;
    running.shutdown().await;
    if !wrong.is_empty() {
        bail!(
            "{} VMs do not have exactly one instance in moto (VM, instances): {wrong:?}",
            wrong.len()
        );
    }
    println!("moto: {instances} instances, exactly one per VM");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP novacron_burst_decision_to_launch_seconds From a VM's burst decision to its RunInstances call.
# TYPE novacron_burst_decision_to_launch_seconds histogram
novacron_burst_decision_to_launch_seconds_bucket{le=\"0.1\"} 2
novacron_burst_decision_to_launch_seconds_bucket{le=\"0.5\"} 9
novacron_burst_decision_to_launch_seconds_bucket{le=\"1\"} 10
novacron_burst_decision_to_launch_seconds_bucket{le=\"+Inf\"} 10
novacron_burst_decision_to_launch_seconds_sum 2.5
novacron_burst_decision_to_launch_seconds_count 10
novacron_burst_orphans 0
";

    #[test]
    fn the_histogram_is_read_from_the_exposition_and_bounds_its_percentiles() {
        let (count, sum, buckets) = histogram(TEXT, "novacron_burst_decision_to_launch_seconds");
        assert_eq!((count, sum), (10, 2.5));
        assert_eq!(buckets, vec![(0.1, 2), (0.5, 9), (1.0, 10), (f64::INFINITY, 10)]);
        assert_eq!(bucket_percentile(&buckets, count, 50.0), 0.5);
        assert_eq!(bucket_percentile(&buckets, count, 10.0), 0.1);
        assert_eq!(bucket_percentile(&buckets, count, 99.0), 1.0);
        assert_eq!(histogram(TEXT, "novacron_other").0, 0);
    }
}
