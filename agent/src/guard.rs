//! The fence guard: a tiny process of its own (`novacron-agent fence-guard`,
//! started by the agent when none answers on its socket) that holds the HA
//! lease's deadline across agent restarts. An agent killed with `kill -9`,
//! or stopped, leaves its QEMUs running and its lease driver gone; the
//! guard SIGKILLs those QEMUs itself when the deadline passes without a
//! renewal, before the server can restart them elsewhere. A restarted agent
//! connects to it and takes its deadline as its own no-lease deadline.
//!
//! - [`Guard`] is the pure state machine (`now` in, kills out): armed with a
//!   fire instant and the targets, re-armed by every renewal (and every
//!   peer-witness confirmation that moves the fence deadline), disarmed
//!   when the agent has fenced or while the isolation response is
//!   keep-running; it fires once at the fire instant.
//! - The agent arms it with `deadline + F/2` (half the fence time after the
//!   lease deadline): the agent's own fence (libvirt destroy) comes first,
//!   the guard is the backstop, and both land within `F` of the deadline,
//!   which is what the server's wait assumes.
//! - Targets are QEMU processes named by pid *and* process start time (from
//!   `/proc/<pid>/stat`), read by the agent from libvirt's pid files; the
//!   guard kills a pid only if its start time still matches, so a reused
//!   pid is never hit.
//! - [`serve`] is the guard's socket loop (a Unix socket in the agent's data
//!   directory, one JSON message per line; a newer connection replaces the
//!   older one); [`run_client`] is the agent's side. The guard exits when it
//!   has had nothing to guard and no agent for [`ALONE_EXIT`]; it logs to
//!   `fence-guard.log` beside its socket.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use novacron_shared::clock::Clock;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::ha::LeaseHandle;

/// The guard exits after this long with no agent and nothing armed.
pub const ALONE_EXIT: Duration = Duration::from_secs(10);
/// The longest message line either side accepts.
pub const MAX_LINE: usize = 64 * 1024;
/// How long the agent waits for a guard it started to answer.
pub const SPAWN_WAIT: Duration = Duration::from_secs(2);
/// Pause before the agent tries its guard again after losing it.
pub const RECONNECT: Duration = Duration::from_secs(1);

/// What the fence guard failed at.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// The socket could not be bound.
    #[error("cannot listen on {path}")]
    Bind {
        /// The socket path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Talking over the socket failed.
    #[error("fence guard socket")]
    Io(#[from] std::io::Error),
    /// A message could not be encoded or decoded.
    #[error("fence guard message")]
    Message(#[from] serde_json::Error),
    /// A line was too long.
    #[error("fence guard message longer than {MAX_LINE} bytes")]
    TooLong,
    /// The guard did not come up.
    #[error("the fence guard did not answer on {0}")]
    NoGuard(String),
}

/// A QEMU process to kill: named by pid and start time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// The domain's name (for logs).
    pub name: String,
    /// The QEMU process.
    pub pid: i32,
    /// Its start time, clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start_ticks: u64,
}

/// Agent → guard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToGuard {
    /// Kill `targets` in `fire_in_ms` unless re-armed or disarmed first.
    Arm {
        /// From now, ms.
        fire_in_ms: u64,
        /// What to kill.
        targets: Vec<Target>,
    },
    /// The agent fenced (or holds nothing to guard): stand down.
    Disarm,
}

/// Guard → agent, once per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FromGuard {
    /// When the guard fires, ms from now (0: it fired already); `None`:
    /// not armed.
    pub fire_in_ms: Option<u64>,
}

/// Where the guard stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardState {
    /// Nothing to guard.
    Idle,
    /// Kills `targets` at `fire_at`.
    Armed {
        /// When.
        fire_at: Instant,
        /// What.
        targets: Vec<Target>,
    },
    /// It fired at `at` (the previous agent's lease ended).
    Fired {
        /// When.
        at: Instant,
    },
}

/// What happened, as the guard's loop tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardEvent {
    /// Time passed.
    Tick,
    /// The agent armed (or re-armed) it.
    Arm {
        /// When to fire.
        fire_at: Instant,
        /// What to kill.
        targets: Vec<Target>,
    },
    /// The agent disarmed it.
    Disarm,
}

/// The pure fence guard.
#[derive(Debug, Clone)]
pub struct Guard {
    state: GuardState,
}

impl Default for Guard {
    fn default() -> Self {
        Self {
            state: GuardState::Idle,
        }
    }
}

impl Guard {
    /// Where it stands.
    pub fn state(&self) -> &GuardState {
        &self.state
    }

    /// Applies time up to `now`, then `event`; returns the targets to kill
    /// now (at most once per arming).
    pub fn step(&mut self, now: Instant, event: GuardEvent) -> Vec<Target> {
        let mut kill = self.advance(now);
        match event {
            GuardEvent::Tick => {}
            GuardEvent::Arm { fire_at, targets } => {
                self.state = GuardState::Armed { fire_at, targets };
                // Armed for a moment already past: fire now.
                kill.extend(self.advance(now));
            }
            GuardEvent::Disarm => self.state = GuardState::Idle,
        }
        kill
    }

    fn advance(&mut self, now: Instant) -> Vec<Target> {
        match &mut self.state {
            GuardState::Armed { fire_at, targets } if now >= *fire_at => {
                let kill = std::mem::take(targets);
                self.state = GuardState::Fired { at: now };
                kill
            }
            _ => Vec::new(),
        }
    }

    /// When the loop must tick next.
    pub fn next_timer(&self) -> Option<Instant> {
        match self.state {
            GuardState::Armed { fire_at, .. } => Some(fire_at),
            GuardState::Idle | GuardState::Fired { .. } => None,
        }
    }

    /// What a connecting agent is told.
    pub fn hello(&self, now: Instant) -> FromGuard {
        let fire_in_ms = match self.state {
            GuardState::Idle => None,
            GuardState::Armed { fire_at, .. } => Some(ms(fire_at.saturating_duration_since(now))),
            GuardState::Fired { .. } => Some(0),
        };
        FromGuard { fire_in_ms }
    }

    /// Whether there is something to guard.
    pub fn armed(&self) -> bool {
        matches!(self.state, GuardState::Armed { .. })
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The start time (field 22) in the text of `/proc/<pid>/stat`; the
/// command name in parentheses may hold anything, so fields are counted
/// after its last `)`.
pub fn parse_start_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // Field 3 (state) is the first after the name; field 22 the 20th.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The start time of process `pid`, if it runs.
pub fn start_ticks(pid: i32) -> Option<u64> {
    parse_start_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The QEMU of domain `name`, from libvirt's pid file in `pid_dir`: only a
/// process whose command line names that guest (`-name guest=NAME,...`).
pub fn target_of(pid_dir: &Path, name: &str) -> Option<Target> {
    let pid: i32 = std::fs::read_to_string(pid_dir.join(format!("{name}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if !names_guest(&cmdline, name) {
        return None;
    }
    Some(Target {
        name: name.to_string(),
        pid,
        start_ticks: start_ticks(pid)?,
    })
}

/// Whether a NUL-separated command line has an argument naming guest
/// `name` (libvirt's `guest=NAME` or `guest=NAME,debug-threads=on`).
pub fn names_guest(cmdline: &[u8], name: &str) -> bool {
    let want = format!("guest={name}");
    cmdline.split(|&b| b == 0).any(|arg| {
        arg.strip_prefix(want.as_bytes())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(b","))
    })
}

/// SIGKILLs a target if the process with its pid is still the one named
/// (same start time); whether it sent the signal.
pub fn kill(t: &Target) -> bool {
    if t.pid <= 1 || start_ticks(t.pid) != Some(t.start_ticks) {
        return false;
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(t.pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .is_ok()
}

fn line<T: Serialize>(m: &T) -> Result<Vec<u8>, GuardError> {
    let mut v = serde_json::to_vec(m)?;
    v.push(b'\n');
    Ok(v)
}

async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> Result<Option<String>, GuardError> {
    let mut buf = String::new();
    let n = (&mut *r).take(MAX_LINE as u64 + 1).read_line(&mut buf).await?;
    if n == 0 {
        return Ok(None);
    }
    if buf.len() > MAX_LINE || !buf.ends_with('\n') {
        return Err(GuardError::TooLong);
    }
    Ok(Some(buf))
}

fn bind(socket: &Path) -> Result<UnixListener, GuardError> {
    let err = |source| GuardError::Bind {
        path: socket.display().to_string(),
        source,
    };
    // A socket file nobody answers on is stale (a guard that died).
    if socket.exists() && std::os::unix::net::UnixStream::connect(socket).is_err() {
        let _ = std::fs::remove_file(socket);
    }
    let l = UnixListener::bind(socket).map_err(err)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(l)
}

type Client = (
    BufReader<tokio::net::unix::OwnedReadHalf>,
    tokio::net::unix::OwnedWriteHalf,
);

/// The guard process's loop: serves agents on `socket` and fires at the
/// deadline; returns once it has been alone with nothing armed for
/// [`ALONE_EXIT`].
pub async fn serve(socket: &Path, clock: Clock) -> Result<(), GuardError> {
    let listener = bind(socket)?;
    tracing::info!(socket = %socket.display(), "fence guard listening");
    let mut guard = Guard::default();
    let mut client: Option<Client> = None;
    let mut alone_since = Some(clock.now());
    loop {
        let now = clock.now();
        if client.is_some() || guard.armed() {
            alone_since = None;
        } else {
            let since = *alone_since.get_or_insert(now);
            if now.saturating_duration_since(since) >= ALONE_EXIT {
                break;
            }
        }
        let wake = match (guard.next_timer(), alone_since) {
            (Some(t), _) => Some(t),
            (None, Some(s)) => Some(s + ALONE_EXIT),
            (None, None) => None,
        };
        let timer = async {
            match wake {
                Some(t) => tokio::time::sleep(t.saturating_duration_since(now)).await,
                None => std::future::pending().await,
            }
        };
        let incoming = async {
            match client.as_mut() {
                Some((r, _)) => read_line(r).await,
                None => std::future::pending().await,
            }
        };
        let mut event = GuardEvent::Tick;
        tokio::select! {
            a = listener.accept() => {
                let (stream, _) = a?;
                let (r, mut w) = stream.into_split();
                let hello = line(&guard.hello(clock.now()))?;
                if w.write_all(&hello).await.is_ok() {
                    // A newer agent replaces the older connection.
                    client = Some((BufReader::new(r), w));
                    tracing::info!("fence guard: an agent connected");
                }
            }
            l = incoming => match l {
                Ok(Some(text)) => match serde_json::from_str::<ToGuard>(&text) {
                    Ok(ToGuard::Arm { fire_in_ms, targets }) => {
                        event = GuardEvent::Arm {
                            fire_at: clock.now() + Duration::from_millis(fire_in_ms),
                            targets,
                        };
                    }
                    Ok(ToGuard::Disarm) => event = GuardEvent::Disarm,
                    Err(e) => tracing::warn!(error = %e, "fence guard: unreadable message ignored"),
                },
                Ok(None) | Err(_) => {
                    // The agent is gone: what it armed stays armed.
                    tracing::warn!(at_ms = clock.unix_ms(), armed = guard.armed(), "fence guard: the agent disconnected");
                    client = None;
                }
            },
            _ = timer => {}
        }
        for t in guard.step(clock.now(), event) {
            let killed = kill(&t);
            tracing::warn!(at_ms = clock.unix_ms(), vm = %t.name, pid = t.pid, killed, "fence guard: lease deadline passed; HA QEMU killed");
        }
    }
    let _ = std::fs::remove_file(socket);
    tracing::info!("fence guard: nothing to guard; exiting");
    Ok(())
}

/// How the agent finds and starts its guard.
#[derive(Debug, Clone)]
pub struct GuardConfig {
    /// The guard's socket.
    pub socket: PathBuf,
    /// The program to start (`fence-guard --socket S` is appended); `None`:
    /// connect only.
    pub program: Option<PathBuf>,
    /// libvirt's QEMU pid files; `None` (a libvirt that runs no QEMU, such
    /// as the test driver): the guard is armed with no targets.
    pub pid_dir: Option<PathBuf>,
}

async fn connect_or_start(cfg: &GuardConfig, clock: &Clock) -> Result<UnixStream, GuardError> {
    if let Ok(s) = UnixStream::connect(&cfg.socket).await {
        return Ok(s);
    }
    let Some(program) = &cfg.program else {
        return Err(GuardError::NoGuard(cfg.socket.display().to_string()));
    };
    // Its log goes to a file beside the socket, not to the agent's stderr:
    // the guard outlives the agent, and must not hold its output open.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(cfg.socket.with_extension("log"))?;
    let mut cmd = std::process::Command::new(program);
    cmd.arg("fence-guard")
        .arg("--socket")
        .arg(&cfg.socket)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        // Its own process group: a signal to the agent's group (a
        // terminal's Ctrl-C) does not take it down with the agent.
        .process_group(0);
    use std::os::unix::process::CommandExt;
    let child = cmd.spawn()?;
    tracing::info!(pid = child.id(), socket = %cfg.socket.display(), "started the fence guard");
    let start = clock.now();
    while clock.since(start) < SPAWN_WAIT {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if let Ok(s) = UnixStream::connect(&cfg.socket).await {
            return Ok(s);
        }
    }
    Err(GuardError::NoGuard(cfg.socket.display().to_string()))
}

/// The agent's side: connects to the guard (starting it if none answers),
/// takes its deadline as the lease's no-lease deadline, then keeps it armed
/// with every new deadline (`deadline + F/2`; the lease's fence deadline,
/// which a peer witness confirmation extends) and the running HA QEMUs,
/// and disarms it once the agent has fenced or while keep-running is in
/// force (re-armed when the terms switch back). Reconnects when the guard
/// goes.
pub async fn run_client(
    cfg: GuardConfig,
    lease: LeaseHandle,
    clock: Clock,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut first = true;
    loop {
        let r = session(&cfg, &lease, &clock, first, &mut shutdown).await;
        if *shutdown.borrow() {
            return;
        }
        if let Err(e) = r {
            tracing::warn!(error = %crate::link::error_chain(&e), "fence guard unavailable; retrying");
        }
        first = false;
        tokio::select! {
            _ = tokio::time::sleep(RECONNECT) => {}
            _ = shutdown.changed() => {}
        }
    }
}

async fn session(
    cfg: &GuardConfig,
    lease: &LeaseHandle,
    clock: &Clock,
    first: bool,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), GuardError> {
    let stream = connect_or_start(cfg, clock).await?;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let hello = read_line(&mut r)
        .await?
        .ok_or_else(|| GuardError::NoGuard(cfg.socket.display().to_string()))?;
    let hello: FromGuard = serde_json::from_str(&hello)?;
    if let (true, Some(fire_in)) = (first, hello.fire_in_ms) {
        // A previous run's lease: it ended half a fence time before the
        // guard fires.
        let half = lease.timing().fence_time / 2;
        let at = clock.now() + Duration::from_millis(fire_in).saturating_sub(half);
        lease.limit_no_lease(at);
        tracing::info!(
            fire_in_ms = fire_in,
            "fence guard holds a previous run's deadline"
        );
    }
    let mut changes = lease.watch_guard();
    loop {
        let (deadline, names, stand_down) = changes.borrow_and_update().clone();
        let msg = match (deadline, names) {
            // Until the VM loop has looked, the running HA QEMUs are not
            // known: the guard keeps what the previous run told it.
            (Some(_), None) => None,
            (Some(d), Some(names)) => {
                let half = lease.timing().fence_time / 2;
                let fire_in = d.saturating_duration_since(clock.now()) + half;
                let targets = match &cfg.pid_dir {
                    Some(dir) => names.iter().filter_map(|n| target_of(dir, n)).collect(),
                    None => Vec::new(),
                };
                Some(ToGuard::Arm {
                    fire_in_ms: ms(fire_in),
                    targets,
                })
            }
            // Fenced, or keep-running: no deadline to hold.
            (None, _) if stand_down => Some(ToGuard::Disarm),
            // Fencing: the guard keeps the last deadline as the backstop.
            (None, _) => None,
        };
        if let Some(m) = msg {
            w.write_all(&line(&m)?).await?;
        }
        tokio::select! {
            r = changes.changed() => {
                if r.is_err() {
                    return Ok(());
                }
            }
            l = read_line(&mut r) => {
                l?;
                return Err(GuardError::NoGuard(cfg.socket.display().to_string()));
            }
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    // The guard stays armed: VMs keep running, and the
                    // deadline still holds for them.
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
