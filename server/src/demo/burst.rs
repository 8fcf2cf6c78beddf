//! `novacron-server demo --burst`: cloud burst against a local EC2
//! emulator. The demo starts moto (`moto_server`, installed into a venv by
//! `packaging/dev/moto.sh install` when missing) on a free loopback port,
//! registers the demo's AMI in it, and configures `[burst]` with moto as
//! the endpoint and dummy static credentials (moto checks none; they are
//! not secrets). Once the demo hosts are filled — VMs are created until the
//! scheduler refuses one — a burstable VM is created: no host fits it, so
//! the broker launches it in "EC2", and the demo prints its instance id,
//! type and accrued cost as it grows. moto runs until the demo stops.
//!
//! moto's instances are records in a Python process: nothing boots, and
//! their addresses are fake.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use hyper::Method;
use novacron_api::client::{ApiClient, ClientError};
use novacron_ec2::aws_sdk_ec2::error::DisplayErrorContext;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::config::{AwsConfig, BurstConfig, Secret, ServerConfig};

/// The region the demo bursts to.
const REGION: &str = "us-east-1";
/// The image key of the demo's burst VM (its first disk's template).
const IMAGE_KEY: &str = "debian-12-genericcloud-amd64.qcow2";
/// The dummy access key id the demo gives moto (moto checks none).
const ACCESS_KEY_ID: &str = "AKIANOVACRONDEMO0001";
/// The dummy secret the demo gives moto.
const SECRET_ACCESS_KEY: &str = "novacron-demo-dummy-secret-for-moto";
/// The filler VMs' and the burst VM's size: the burst VM is no smaller in
/// any dimension than the filler the scheduler refused, so no host fits it.
const VCPUS: u32 = 2;
/// See [`VCPUS`].
const MEMORY_MIB: u64 = 4096;
/// Fillers created at most before the demo gives up on filling its hosts.
const MAX_FILLERS: u32 = 200;

/// A running moto server; killed on drop and by [`Moto::stop`].
pub(super) struct Moto {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// Its log (stdout and stderr).
    pub log: PathBuf,
}

impl Moto {
    /// Kills moto and waits for it.
    pub async fn stop(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// `packaging/dev/moto.sh`: under the working directory or one of its
/// parents, beside this binary or one of its parents (a build tree inside
/// the checkout), or in the checkout this binary was built from.
fn find_moto_sh() -> Option<PathBuf> {
    let rel = Path::new("packaging/dev/moto.sh");
    let mut starts: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        starts.push(cwd);
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        starts.push(dir);
    }
    starts.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    starts
        .iter()
        .flat_map(|s| s.ancestors())
        .map(|d| d.join(rel))
        .find(|p| p.is_file())
}

/// The `moto_server` to run: `--moto PATH`, else the one `moto.sh` installs
/// (installing it when missing, which needs PyPI).
async fn moto_server(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        if !p.is_file() {
            bail!("--moto {}: no such file", p.display());
        }
        return Ok(p.to_path_buf());
    }
    let Some(script) = find_moto_sh() else {
        bail!(
            "cannot find packaging/dev/moto.sh (run the demo from the NovaCron checkout, \
             or pass --moto PATH-TO-moto_server; moto is PyPI's moto[server,ec2])"
        );
    };
    let out = Command::new("bash").arg(&script).arg("path").output().await?;
    let server = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !out.status.success() || server.as_os_str().is_empty() {
        bail!(
            "{} path failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if !server.is_file() {
        println!(
            "burst: installing moto (the EC2 emulator) with {} install",
            script.display()
        );
    }
    // Idempotent and quiet when moto is there; its progress goes to stderr.
    let status = Command::new("bash")
        .arg(&script)
        .arg("install")
        .stdin(std::process::Stdio::null())
        .status()
        .await
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !status.success() || !server.is_file() {
        bail!(
            "{} install failed ({status}): moto is needed for --burst (it installs moto[server,ec2] from PyPI \
             into a venv; or pass --moto PATH-TO-moto_server)",
            script.display()
        );
    }
    Ok(server)
}

/// Whether an HTTP server answers on `addr`.
async fn answers(addr: SocketAddr) -> bool {
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .ok()?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await.ok()?;
        Some(head.starts_with(b"HTTP/1."))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), probe).await,
        Ok(Some(true))
    )
}

/// Starts moto on a free loopback port with its log in `root`, and waits
/// (60 s at most) until it answers.
pub(super) async fn start_moto(root: &Path, given: Option<&Path>) -> anyhow::Result<Moto> {
    let server = moto_server(given).await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let log = root.join("moto.log");
    let out = std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    let mut child = Command::new(&server)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        // The demo registers its own AMI; loading moto's 1,301 takes time.
        .env("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
        // An unknown AMI is refused, as on EC2.
        .env("MOTO_ENABLE_AMI_VALIDATION", "true")
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", server.display()))?;
    let mut waited = Duration::ZERO;
    let step = Duration::from_millis(100);
    while !answers(addr).await {
        if let Some(status) = child.try_wait()? {
            bail!("moto exited ({status}) before answering; see {}", log.display());
        }
        if waited > Duration::from_secs(60) {
            let _ = child.kill().await;
            bail!("moto did not answer on {addr} within 60 s; see {}", log.display());
        }
        tokio::time::sleep(step).await;
        waited += step;
    }
    Ok(Moto {
        child,
        endpoint: format!("http://{addr}"),
        log,
    })
}

/// Registers the demo's AMI in moto (RegisterImage) and returns its id.
pub(super) async fn register_image(endpoint: &str) -> anyhow::Result<String> {
    let ec2 = novacron_ec2::Ec2::with_credentials(
        novacron_ec2::Settings {
            name: "aws".into(),
            region: REGION.into(),
            endpoint: Some(endpoint.to_owned()),
            credentials: novacron_ec2::CredentialSource::Standard { profile: None },
            instance_types: novacron_cloud::InstanceTypes::shipped().in_region(REGION),
            call_timeout: Duration::from_secs(10),
        },
        novacron_ec2::Credentials {
            access_key_id: ACCESS_KEY_ID.into(),
            secret_access_key: SECRET_ACCESS_KEY.into(),
            session_token: None,
        },
    )?;
    let out = ec2
        .sdk_client()
        .register_image()
        .name("novacron-demo-debian-12")
        .description("the NovaCron demo's burst image (a record in moto)")
        .root_device_name("/dev/sda1")
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("RegisterImage in moto failed: {}", DisplayErrorContext(e)))?;
    Ok(out
        .image_id()
        .context("moto's RegisterImage named no image")?
        .to_owned())
}

/// `[burst]` for the demo: on, priced in us-east-1, moto as the endpoint,
/// the demo's image mapped to `ami`, a broker tick every second (so the
/// cost visibly grows), and small caps.
pub(super) fn configure(cfg: &mut ServerConfig, endpoint: &str, ami: &str) {
    cfg.burst = BurstConfig {
        enabled: true,
        interval: Duration::from_secs(1),
        max_instances: 4,
        max_usd_per_hour: 1.0,
        max_usd_per_month: 50.0,
        aws: Some(AwsConfig {
            endpoint: Some(endpoint.to_owned()),
            access_key_id: Some(ACCESS_KEY_ID.into()),
            secret_access_key: Some(Secret(SECRET_ACCESS_KEY.into())),
            call_timeout: Duration::from_secs(10),
            images: [(IMAGE_KEY.to_owned(), ami.to_owned())].into(),
            ..AwsConfig::new(REGION)
        }),
        ..BurstConfig::default()
    };
}

/// Fills the demo hosts (VMs of [`VCPUS`] and [`MEMORY_MIB`] until the
/// scheduler refuses one), creates the burstable VM `burst-1` and prints
/// its launch, instance and cost as it grows for `watch`.
pub(super) async fn show(api: &ApiClient, moto: &Moto, watch: Duration) -> anyhow::Result<()> {
    println!();
    println!(
        "Cloud burst (EC2 emulated by moto at {}, region {REGION}):",
        moto.endpoint
    );
    let mut n = 0;
    let refusal = loop {
        if n == MAX_FILLERS {
            bail!("the demo hosts still take VMs after {MAX_FILLERS} fillers");
        }
        n += 1;
        let body = json!({
            "spec": {"name": format!("fill-{n}"), "vcpus": VCPUS, "memory_mib": MEMORY_MIB, "labels": {"demo": "true"}},
            "power": "running"
        });
        match api.call(Method::POST, "/v1/vms", Some(body)).await {
            Ok(_) => {}
            Err(ClientError::Refused { code, message, .. }) if code == "no_capacity" => break message,
            Err(e) => return Err(e).context(format!("cannot create filler VM fill-{n}")),
        }
    };
    println!(
        "  filled the hosts: fill-1..fill-{} placed, fill-{n} refused by the scheduler ({refusal})",
        n - 1
    );
    let body = json!({
        "spec": {
            "name": "burst-1",
            "vcpus": VCPUS,
            "memory_mib": MEMORY_MIB,
            "labels": {"demo": "true"},
            "disks": [{"name": "root", "template": IMAGE_KEY, "size_mib": 8192}],
            "cloud_init": {"user_data": "#cloud-config\nhostname: burst-1\n"}
        },
        "power": "running",
        "placement": {"burst": {}}
    });
    let clock = novacron_shared::clock::Clock::system();
    let t0 = clock.now();
    let vm = api.call(Method::POST, "/v1/vms", Some(body)).await?;
    let id = vm["vm"]["id"]
        .as_str()
        .context("POST /v1/vms gave no VM id")?
        .to_owned();
    println!(
        "  burst-1 ({VCPUS} vCPU, {MEMORY_MIB} MiB, placement.burst; image key {IMAGE_KEY}): {}",
        match vm["placement"]["pending"]["reason"].as_str() {
            Some(r) => format!("pending: {r}"),
            None => format!("placement {}", vm["placement"]),
        }
    );
    let mut state = String::new();
    let cloud = loop {
        let v = api.call(Method::GET, &format!("/v1/vms/{id}"), None).await?;
        let c = &v["cloud"];
        let now = c["state"].as_str().unwrap_or("none").to_owned();
        if now != state {
            let mut line = format!("  {:>5.2}s cloud state {now}", clock.since(t0).as_secs_f64());
            if let Some(e) = c["last_error"].as_str() {
                line.push_str(&format!(" (last error: {e})"));
            }
            println!("{line}");
            state = now;
        }
        if state == "running" && c["instance"].is_string() {
            break c.clone();
        }
        if clock.since(t0) > Duration::from_secs(60) {
            bail!(
                "burst-1 is not running in moto within 60 s (placement {}, cloud {c}); see the server log and {}",
                v["placement"],
                moto.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "  burst-1 runs in EC2: instance {}, type {} (${:.4}/h), image {}, private ip {}",
        cloud["instance"].as_str().unwrap_or("?"),
        cloud["instance_type"].as_str().unwrap_or("?"),
        cloud["usd_per_hour"].as_f64().unwrap_or(0.0),
        cloud["image"].as_str().unwrap_or("?"),
        cloud["private_ip"].as_str().unwrap_or("-"),
    );
    println!("  why it burst: {}", cloud["reasons"].as_str().unwrap_or("?"));
    let watch_start = clock.now();
    while clock.since(watch_start) < watch {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let v = api.call(Method::GET, &format!("/v1/vms/{id}"), None).await?;
        println!(
            "  {:>5.1}s accrued ${:.6} (per second of running; a run is billed a minute at least)",
            clock.since(t0).as_secs_f64(),
            v["cloud"]["accrued_usd"].as_f64().unwrap_or(0.0)
        );
    }
    let b = api.call(Method::GET, "/v1/burst", None).await?;
    let budget = &b["budget"];
    println!(
        "  GET /v1/burst: fleet tag {}, {} of {} instances, ${:.4} of ${:.2} per hour, {} spend ${:.6} of ${:.2}",
        b["fleet"].as_str().unwrap_or("?"),
        budget["instances"],
        budget["max_instances"],
        budget["usd_per_hour"].as_f64().unwrap_or(0.0),
        budget["max_usd_per_hour"].as_f64().unwrap_or(0.0),
        budget["month"].as_str().unwrap_or("?"),
        budget["month_usd"].as_f64().unwrap_or(0.0),
        budget["max_usd_per_month"].as_f64().unwrap_or(0.0),
    );
    println!("  moto's log: {}", moto.log.display());
    Ok(())
}

/// One line per burst VM for the live output: its instance and cost.
pub(super) async fn live_line(api: &ApiClient) -> Option<String> {
    let b: Value = api.call(Method::GET, "/v1/burst", None).await.ok()?;
    let parts: Vec<String> = b["instances"]
        .as_array()?
        .iter()
        .map(|c| {
            format!(
                "{} {} {} {} ${:.6}",
                c["name"].as_str().unwrap_or("(deleted)"),
                c["instance"].as_str().unwrap_or("-"),
                c["instance_type"].as_str().unwrap_or("?"),
                c["state"].as_str().unwrap_or("?"),
                c["accrued_usd"].as_f64().unwrap_or(0.0)
            )
        })
        .collect();
    (!parts.is_empty()).then(|| {
        format!(
            "burst: {} (fleet ${:.6})",
            parts.join(" | "),
            b["total_usd"].as_f64().unwrap_or(0.0)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigFile;

    #[test]
    fn the_demo_burst_config_validates_and_survives_its_toml_file() {
        let mut cfg = ServerConfig::default();
        configure(&mut cfg, "http://127.0.0.1:5000", "ami-0123456789abcdef0");
        cfg.validate().unwrap_or_else(|e| panic!("{e}"));
        // The demo writes its config to server.toml: the file must load.
        let text = toml::to_string(&cfg).unwrap_or_else(|e| panic!("{e}"));
        let back = ServerConfig::parse(&text, "server.toml").unwrap_or_else(|e| panic!("{e}"));
        assert!(back.burst.enabled);
        assert_eq!(back.burst.interval, Duration::from_secs(1));
        let aws = back
            .burst
            .aws
            .unwrap_or_else(|| panic!("no [burst.aws] in {text}"));
        assert_eq!(aws.endpoint.as_deref(), Some("http://127.0.0.1:5000"));
        assert_eq!(aws.region, REGION);
        assert_eq!(
            aws.images.get(IMAGE_KEY).map(String::as_str),
            Some("ami-0123456789abcdef0")
        );
        assert_eq!(aws.secret_access_key, Some(Secret(SECRET_ACCESS_KEY.into())));
    }

    #[test]
    fn moto_sh_is_found_from_inside_the_checkout() {
        let found = find_moto_sh().unwrap_or_else(|| panic!("packaging/dev/moto.sh not found"));
        assert!(found.ends_with("packaging/dev/moto.sh"), "{}", found.display());
        assert!(found.is_file());
    }
}
