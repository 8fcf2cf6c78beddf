//! moto, the real EC2 peer of the cloud-burst tests: [`Moto::start`]
//! installs it (`packaging/dev/moto.sh install`, a pinned version in a
//! venv), runs `moto_server` on a free loopback port with its log in a temp
//! dir, and kills it on drop. The helpers read EC2 back through the SDK
//! (what the tests check: type, image, tags, user data, network, state)
//! and act behind the server's back (orphans).
//!
//! moto runs with `MOTO_EC2_LOAD_DEFAULT_AMIS=false` and
//! `MOTO_ENABLE_AMI_VALIDATION=true` (an unknown AMI is
//! `InvalidAMIID.NotFound`, as on EC2): [`Moto::image`] registers the one
//! AMI the tests launch, so the images are the test's own. Measured on two
//! busy cores, spawn to first launch is 2.7–3.3 s either way through this
//! harness; a first DescribeImages of the 1,301 default AMIs costs about a
//! second more. moto ignores ClientToken, shows instances
//! `running` at once and never throttles (the fault proxy does that). Its
//! instance addresses are fake: never connect to them.

#![allow(clippy::unwrap_used)]
// moto is a real process keeping real time: waiting for it to listen needs
// the OS clock and real sleeps.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use novacron_ec2::aws_sdk_ec2::types::{self as ec2, Filter, ResourceType, TagSpecification};
use novacron_ec2::aws_sdk_ec2::Client;
use novacron_ec2::{CredentialSource, Credentials, Ec2, Settings};

use crate::faultproxy::Background;

/// The dummy access key id the harness gives moto.
pub const ACCESS_KEY_ID: &str = "AKIANOVACRONTEST0001";
/// The dummy secret the harness gives moto: tests grep logs for it.
pub const SECRET_ACCESS_KEY: &str = "novacron-test-secret-d41d8cd98f00b204e980";
/// The region moto is driven in.
pub const REGION: &str = "us-east-1";

/// `packaging/dev/moto.sh` of this checkout.
pub fn moto_sh() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/dev/moto.sh")
}

/// One instance as moto reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MotoInstance {
    /// The instance id.
    pub id: String,
    /// Its type (`t3.micro`).
    pub instance_type: String,
    /// Its AMI.
    pub image: String,
    /// Its state name (`running`, `stopped`, `terminated`, …).
    pub state: String,
    /// Its tags.
    pub tags: BTreeMap<String, String>,
    /// Its user data, decoded (DescribeInstanceAttribute userData).
    pub user_data: Option<String>,
    /// Its subnet.
    pub subnet: Option<String>,
    /// Its security group ids.
    pub security_groups: Vec<String>,
    /// Its key pair's name.
    pub key_name: Option<String>,
}

/// A VPC subnet and a security group in it, for launches that name them.
#[derive(Debug, Clone)]
pub struct Network {
    /// The subnet id.
    pub subnet: String,
    /// The security group id.
    pub security_group: String,
}

/// A running moto server; killed on drop.
pub struct Moto {
    addr: SocketAddr,
    child: Child,
    dir: tempfile::TempDir,
    image: OnceLock<String>,
    client: Client,
    // Last: the runtime stops after the client is gone.
    bg: Background,
}

impl Moto {
    /// Installs moto when missing and starts it; panics (with the log)
    /// when it cannot.
    pub fn start() -> Moto {
        let out = Command::new("bash")
            .arg(moto_sh())
            .arg("install")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "packaging/dev/moto.sh install failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let path = Command::new("bash").arg(moto_sh()).arg("path").output().unwrap();
        let server = PathBuf::from(String::from_utf8(path.stdout).unwrap().trim());
        assert!(
            server.exists(),
            "moto.sh path gave {}, which does not exist",
            server.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("moto.log");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut child = Command::new(&server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
            .env("MOTO_ENABLE_AMI_VALIDATION", "true")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.path().join("moto.stderr")).unwrap())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while !answers(addr) {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "moto_server exited ({status}) before answering: {}",
                    read_logs(dir.path())
                );
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                panic!(
                    "moto_server did not answer on {addr} within 60 s: {}",
                    read_logs(dir.path())
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let bg = Background::start("moto-client");
        let client = bg.run(async move {
            Ec2::new(driver_settings(&format!("http://{addr}")))
                .unwrap()
                .sdk_client()
                .clone()
        });
        Moto {
            addr,
            child,
            dir,
            image: OnceLock::new(),
            client,
            bg,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// moto's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// [`driver_settings`] for `endpoint` (moto's, or a fault proxy's in
    /// front of it).
    pub fn settings(&self, endpoint: &str) -> Settings {
        driver_settings(endpoint)
    }

    /// moto's log (stdout and stderr) so far.
    pub fn log(&self) -> String {
        read_logs(self.dir.path())
    }

    /// The SDK client the helpers use (for calls they do not wrap).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Runs `f` with the helpers' client on the helpers' runtime.
    pub fn call<T, F>(&self, f: impl FnOnce(Client) -> F) -> T
    where
        T: Send + 'static,
        F: std::future::Future<Output = T> + Send + 'static,
    {
        self.bg.run(f(self.client.clone()))
    }

    /// The AMI the tests launch (registered once per server).
    pub fn image(&self) -> String {
        self.image
            .get_or_init(|| {
                self.call(|c| async move {
                    let out = c
                        .register_image()
                        .name("novacron-test-image")
                        .root_device_name("/dev/sda1")
                        .send()
                        .await
                        .unwrap();
                    out.image_id().unwrap().to_owned()
                })
            })
            .clone()
    }

    /// Makes a VPC with a subnet and a security group.
    pub fn network(&self) -> Network {
        self.call(|c| async move {
            let vpc = c.create_vpc().cidr_block("10.20.0.0/16").send().await.unwrap();
            let vpc = vpc.vpc().and_then(|v| v.vpc_id()).unwrap().to_owned();
            let subnet = c
                .create_subnet()
                .vpc_id(&vpc)
                .cidr_block("10.20.1.0/24")
                .send()
                .await
                .unwrap();
            let subnet = subnet.subnet().and_then(|s| s.subnet_id()).unwrap().to_owned();
            let sg = c
                .create_security_group()
                .group_name(format!("novacron-{subnet}"))
                .description("novacron burst tests")
                .vpc_id(&vpc)
                .send()
                .await
                .unwrap();
            Network {
                subnet,
                security_group: sg.group_id().unwrap().to_owned(),
            }
        })
    }

    /// Every instance moto has (any state), with user data.
    pub fn instances(&self) -> Vec<MotoInstance> {
        self.read(None)
    }

    /// One instance, if moto has it.
    pub fn instance(&self, id: &str) -> Option<MotoInstance> {
        let f = Filter::builder().name("instance-id").values(id).build();
        self.read(Some(f)).into_iter().next()
    }

    /// The instances whose tag `key` is `value`.
    pub fn instances_tagged(&self, key: &str, value: &str) -> Vec<MotoInstance> {
        self.read(Some(
            Filter::builder().name(format!("tag:{key}")).values(value).build(),
        ))
    }

    fn read(&self, filter: Option<Filter>) -> Vec<MotoInstance> {
        self.call(|c| async move {
            let mut out = Vec::new();
            let mut token = None;
            loop {
                let page = c
                    .describe_instances()
                    .set_filters(filter.clone().map(|f| vec![f]))
                    .set_next_token(token)
                    .send()
                    .await
                    .unwrap();
                for i in page.reservations().iter().flat_map(|r| r.instances()) {
                    out.push(read_one(&c, i).await);
                }
                token = page.next_token().map(str::to_owned);
                if token.is_none() {
                    return out;
                }
            }
        })
    }

    /// Launches a `t3.micro` of [`Moto::image`] with `tags` directly (behind
    /// the server's back, as an orphan would appear); returns its id.
    pub fn create_instance(&self, tags: &[(&str, &str)]) -> String {
        let image = self.image();
        let tags: Vec<ec2::Tag> = tags
            .iter()
            .map(|(k, v)| ec2::Tag::builder().key(*k).value(*v).build())
            .collect();
        self.call(|c| async move {
            let spec = TagSpecification::builder()
                .resource_type(ResourceType::Instance)
                .set_tags(Some(tags))
                .build();
            let out = c
                .run_instances()
                .min_count(1)
                .max_count(1)
                .image_id(image)
                .instance_type(ec2::InstanceType::T3Micro)
                .tag_specifications(spec)
                .send()
                .await
                .unwrap();
            out.instances()[0].instance_id().unwrap().to_owned()
        })
    }

    /// Terminates an instance directly (as if someone did it in the console).
    pub fn terminate_behind_the_back(&self, id: &str) {
        let id = id.to_owned();
        self.call(|c| async move { c.terminate_instances().instance_ids(id).send().await.unwrap() });
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Driver settings for `endpoint` with the harness's static keys, this
/// region's shipped instance types and a 10 s call timeout.
pub fn driver_settings(endpoint: &str) -> Settings {
    Settings {
        name: "aws".into(),
        region: REGION.into(),
        endpoint: Some(endpoint.to_owned()),
        credentials: CredentialSource::Static(Credentials {
            access_key_id: ACCESS_KEY_ID.into(),
            secret_access_key: SECRET_ACCESS_KEY.into(),
            session_token: None,
        }),
        instance_types: novacron_cloud::InstanceTypes::shipped().in_region(REGION),
        call_timeout: Duration::from_secs(10),
    }
}

/// Reads an instance back from the SDK's own types, not through
/// `novacron_ec2::convert`: the EC2 tests check that conversion against
/// this independent reading.
async fn read_one(c: &Client, i: &ec2::Instance) -> MotoInstance {
    let id = i.instance_id().unwrap().to_owned();
    let attr = c
        .describe_instance_attribute()
        .instance_id(&id)
        .attribute(ec2::InstanceAttributeName::UserData)
        .send()
        .await
        .unwrap();
    let user_data = attr
        .user_data()
        .and_then(|u| u.value())
        .map(|b64| String::from_utf8(unbase64(b64)).unwrap());
    MotoInstance {
        id,
        instance_type: i
            .instance_type()
            .map(|t| t.as_str().to_owned())
            .unwrap_or_default(),
        image: i.image_id().unwrap_or_default().to_owned(),
        state: i
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_owned())
            .unwrap_or_default(),
        tags: i
            .tags()
            .iter()
            .map(|t| {
                (
                    t.key().unwrap_or_default().to_owned(),
                    t.value().unwrap_or_default().to_owned(),
                )
            })
            .collect(),
        user_data,
        subnet: i.subnet_id().map(str::to_owned),
        security_groups: i
            .security_groups()
            .iter()
            .filter_map(|g| g.group_id().map(str::to_owned))
            .collect(),
        key_name: i.key_name().map(str::to_owned),
    }
}

/// Standard base64 decoding (padding optional); panics on a bad character,
/// which in a test means moto gave back something else than was sent.
fn unbase64(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {s:?}"),
        }
    };
    let digits: Vec<u32> = s
        .bytes()
        .filter(|c| *c != b'=' && !c.is_ascii_whitespace())
        .map(val)
        .collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, d)| n | d << (18 - 6 * i));
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    out
}

/// Whether something on `addr` answers HTTP.
fn answers(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.")
}

fn read_logs(dir: &Path) -> String {
    let read = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap_or_default();
    format!("{}{}", read("moto.log"), read("moto.stderr"))
}

#[cfg(test)]
mod tests {
    use super::unbase64;

    #[test]
    fn unbase64_reverses_rfc_4648_vectors() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(unbase64(coded), plain.as_bytes(), "{coded:?}");
        }
    }
}
