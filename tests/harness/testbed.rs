//! The libvirt test bed, as the end-to-end tests drive it: the shared
//! libvirtd and the guest, the namespaced hosts (`testbed.sh hosts-up`),
//! the HA bed (a server namespace, a shared pool, fault injection), and
//! reading libvirt (`virsh`) and the processes' logs. Split from the
//! process harness (`harness.rs`: servers, agents, HTTP, QUIC).

#![allow(clippy::unwrap_used)]
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

/// `packaging/dev/testbed.sh` of this checkout.
pub fn testbed() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/dev/testbed.sh")
}

/// `bash packaging/dev/testbed.sh` (add its arguments). The script starts
/// its daemons with no inherited descriptor but stdio (`bare` there), so
/// none keeps a lock or pipe of the test runner open.
pub fn testbed_command() -> Command {
    let mut c = Command::new("bash");
    c.arg(testbed());
    c
}

/// The guest kernel and initrd (built by `testbed.sh guest`); panics with
/// the command to run when they are missing.
pub fn guest_dir() -> PathBuf {
    let dir = std::env::var_os("NOVACRON_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/novacron-guest"));
    for f in ["vmlinuz", "initrd.img"] {
        assert!(
            dir.join(f).exists(),
            "{} is missing: run `packaging/dev/testbed.sh guest {}` (as .ci/run does)",
            dir.join(f).display(),
            dir.display()
        );
    }
    dir
}

/// One namespaced libvirt host of the test bed (`testbed.sh hosts-up`).
#[derive(Debug, Clone)]
pub struct NsHost {
    /// Also its network namespace's name (`ncb-hN`).
    pub name: String,
    /// Its address on the bridge.
    pub ip: String,
    /// The libvirt URI a process in the root namespace manages it by.
    pub local_uri: String,
    /// The libvirt URI other hosts reach it by (peer-to-peer migration).
    pub migration_uri: String,
}

impl NsHost {
    /// Its libvirt log directory as seen from here (`/var/log/libvirt`
    /// inside the host).
    pub fn libvirt_log_dir(&self) -> PathBuf {
        let sock = self
            .local_uri
            .split_once("socket=")
            .map(|(_, s)| PathBuf::from(s))
            .expect("a local URI with a socket path");
        sock.parent()
            .and_then(Path::parent)
            .expect("the host's state directory")
            .join("log")
    }
}

/// How [`HaBed::cut`] cuts a host off.
#[derive(Debug, Clone, Copy)]
pub enum Cut {
    /// Its veth set down (sends fail at once).
    LinkDown,
    /// An nft DROP of everything but loopback inside it (packets vanish).
    Drop,
}

/// The HA test bed (`testbed.sh hosts-up N --ha`): N namespaced libvirt
/// hosts, a namespace of its own for the server on the same bridge, and a
/// directory pool every host sees at the same path. Torn down on drop
/// (`hosts-down`).
pub struct HaBed {
    /// The hosts, in order.
    pub hosts: Vec<NsHost>,
    /// The server's network namespace.
    pub server_ns: String,
    /// The server's address on the bridge.
    pub server_ip: String,
    /// The shared pool directory (the same path on every host).
    pub shared: PathBuf,
}

/// Runs `testbed.sh ARGS…` and returns its stdout; fails the test with its
/// stderr when it fails.
pub fn testbed_run(args: &[&str]) -> String {
    let out = testbed_command().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "`testbed.sh {}` failed (needs root and `testbed.sh install`):\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl HaBed {
    /// Brings up `n` hosts with what HA needs.
    pub fn up(n: usize) -> HaBed {
        let out = testbed_run(&["hosts-up", &n.to_string(), "--ha"]);
        let mut bed = HaBed {
            hosts: Vec::new(),
            server_ns: String::new(),
            server_ip: String::new(),
            shared: PathBuf::new(),
        };
        for l in out.lines() {
            let f: Vec<&str> = l.split('\t').collect();
            match f.as_slice() {
                ["server-ns", ns, ip] => {
                    bed.server_ns = ns.to_string();
                    bed.server_ip = ip.to_string();
                }
                ["shared-pool", p] => bed.shared = PathBuf::from(p),
                [name, ip, local, mig] => bed.hosts.push(NsHost {
                    name: name.to_string(),
                    ip: ip.to_string(),
                    local_uri: local.to_string(),
                    migration_uri: mig.to_string(),
                }),
                _ => panic!("unexpected line from hosts-up --ha: {l:?}"),
            }
        }
        assert_eq!(bed.hosts.len(), n, "hosts-up printed: {out}");
        assert!(
            !bed.server_ns.is_empty() && bed.shared.is_absolute(),
            "hosts-up --ha printed no server namespace or shared pool: {out}"
        );
        bed
    }

    /// A fresh directory in the shared pool that QEMU (as libvirt-qemu)
    /// can use; removed with the bed.
    pub fn shared_dir(&self, prefix: &str) -> PathBuf {
        let d = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&self.shared)
            .unwrap()
            .keep();
        let st = Command::new("chown")
            .arg("libvirt-qemu:kvm")
            .arg(&d)
            .status()
            .unwrap();
        assert!(st.success(), "chown libvirt-qemu:kvm {}", d.display());
        Command::new("chmod").arg("0775").arg(&d).status().unwrap();
        d
    }

    /// SIGKILLs every process of `h` (libvirtd, virtlogd, QEMUs, an agent
    /// run there); returns once none is left.
    pub fn kill_host(&self, h: &NsHost) {
        testbed_run(&["host-kill", &h.name]);
    }

    /// Boots a killed host again (its libvirt definitions kept).
    pub fn revive_host(&self, h: &NsHost) {
        testbed_run(&["host-revive", &h.name]);
    }

    /// Cuts `h` off the bridge.
    pub fn cut(&self, h: &NsHost, how: Cut) {
        let how = match how {
            Cut::LinkDown => "down",
            Cut::Drop => "drop",
        };
        testbed_run(&["link-cut", &h.name, how]);
    }

    /// Undoes [`HaBed::cut`].
    pub fn restore(&self, h: &NsHost) {
        testbed_run(&["link-restore", &h.name]);
    }

    /// The live processes in `h`'s network namespace.
    pub fn pids(&self, h: &NsHost) -> Vec<u32> {
        let out = Command::new("ip")
            .args(["netns", "pids", &h.name])
            .output()
            .unwrap();
        assert!(out.status.success(), "ip netns pids {}", h.name);
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .ok()
                    .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')))
                    .unwrap_or(false)
            })
            .collect()
    }
}

impl Drop for HaBed {
    fn drop(&mut self) {
        let _ = testbed_command().arg("hosts-down").output();
    }
}

/// How a `virsh` command failed.
#[derive(Debug)]
pub struct VirshFailed {
    /// The command line, for messages.
    pub command: String,
    /// Its exit status.
    pub status: std::process::ExitStatus,
    /// Its non-empty stderr lines.
    pub errors: Vec<String>,
}

/// Runs `virsh -c URI ARGS…`: its stdout when it succeeds (a failure to run
/// it at all fails the test).
pub fn virsh(uri: &str, args: &[&str]) -> Result<String, VirshFailed> {
    let out = Command::new("virsh")
        .arg("-c")
        .arg(uri)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run virsh: {e}"));
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    Err(VirshFailed {
        command: format!("virsh -c {uri} {}", args.join(" ")),
        status: out.status,
        errors: String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect(),
    })
}

/// The domain's state on the libvirtd at `uri` (`Some("running")`, ...),
/// or `None` when that libvirtd answers that it has no such domain. Any
/// other failure (libvirtd unreachable) fails the test: "gone" must be
/// libvirt's word, not a silence.
pub fn domstate(uri: &str, dom: &str) -> Option<String> {
    match virsh(uri, &["domstate", dom]) {
        Ok(out) => Some(out.trim().to_string()),
        Err(f) if f.errors == [format!("error: failed to get domain '{dom}'")] => None,
        Err(f) => panic!(
            "cannot read the state of domain {dom}: `{}` exited with {}: {}",
            f.command,
            f.status,
            f.errors.join(" / ")
        ),
    }
}

/// Every domain (any state) the libvirtd at `uri` knows, by UUID.
pub fn all_domains(uri: &str) -> Vec<String> {
    let out = virsh(uri, &["list", "--all", "--uuid"])
        .unwrap_or_else(|f| panic!("`{}` failed: {}", f.command, f.errors.join(" / ")));
    out.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// How many times the guest's boot marker is in the console log at `path`
/// (0 when the file does not exist yet).
pub fn boot_count(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.matches("NOVACRON-GUEST-BOOTED").count())
        .unwrap_or(0)
}

/// The time at the start of a log line: the RFC 3339 UTC timestamp the
/// server's and the agent's logs begin with (`2026-12-01T22:34:27.123456Z`),
/// or libvirt's (`2026-12-01 22:34:27.123+0000: ...`).
pub fn log_time(line: &str) -> Option<SystemTime> {
    let line = line.trim_start();
    let b = line.as_bytes();
    if b.len() < 19 || !matches!(b[10], b'T' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u64> { line.get(r)?.parse().ok() };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, s) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' || !(1..=12).contains(&mo) {
        return None;
    }
    let mut nanos = 0u64;
    if b.get(19) == Some(&b'.') {
        let digits: String = line[20..].chars().take_while(char::is_ascii_digit).collect();
        let frac: String = digits.chars().chain(std::iter::repeat('0')).take(9).collect();
        nanos = frac.parse().ok()?;
    }
    // Days from the civil date (Howard Hinnant's algorithm), UTC.
    let (y, m) = if mo <= 2 { (y - 1, mo + 9) } else { (y, mo - 3) };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + s;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_nanos(nanos))
}

/// The time of the first line of `log` that contains every one of `words`.
pub fn first_log_time(log: &str, words: &[&str]) -> Option<SystemTime> {
    log.lines()
        .find(|l| words.iter().all(|w| l.contains(w)))
        .and_then(log_time)
}

#[cfg(test)]
mod log_time_tests {
    use super::*;

    #[test]
    fn log_time_reads_both_formats() {
        let t = log_time("2026-12-01T22:34:27.123456Z  INFO novacron_server: x").unwrap();
        let want = SystemTime::UNIX_EPOCH + Duration::from_micros(1_796_164_467_123_456);
        assert_eq!(t, want);
        let t = log_time("2026-12-01 22:34:27.123+0000: shutting down, reason=destroyed").unwrap();
        assert_eq!(
            t,
            SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_164_467_123)
        );
        assert_eq!(log_time("1970-01-01T00:00:00Z"), Some(SystemTime::UNIX_EPOCH));
        assert_eq!(
            log_time("2000-03-01T00:00:00Z"),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(951_868_800))
        );
        assert_eq!(log_time("not a time"), None);
        assert_eq!(log_time("2026-13-01T00:00:00Z"), None);
    }
}
