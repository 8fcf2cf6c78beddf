//! The hardware fence: before the VMs of an unresponsive host restart
//! elsewhere, the server powers the host off through a configured command
//! (the shape of `fence_ipmilan`: `{host}` and `{action}` in an argv
//! template, `on|off|status`) and confirms it off twice.
//!
//! # Rules
//!
//! Exit codes as fence agents: `off`/`on` 0 = done; `status` 0 = on, 2 =
//! off, anything else (or a timeout, which kills the command) = unknown.
//!
//! Per host, a pure [`FenceMachine`]: *idle* → *checking* (`status`; off
//! already counts: CloudStack's lesson) → *powering off* (`off`) →
//! *confirming* (`status` = off, twice in a row; an "already off" answer
//! is the first) → *off*. An unknown status, a failed `off`, or a host
//! still on after `off` (a lying BMC) ends the attempt; up to `retries`
//! more attempts follow at once, then the machine is *failed* (an alert)
//! and, when its policy says so, starts a new round every `retry` until
//! it succeeds or the host is heard again ([`FenceMachine::reset`]). Every step is a [`FenceEvent`]:
//! never silent, never stuck (the runner kills a command at its timeout).
//!
//! The machine only says which command to run; [`run`] runs one
//! (`tokio::process`, killed with its process group at the timeout, its
//! output captured up to [`MAX_OUTPUT`] bytes for the event). The HA
//! driver owns one machine per host it fences.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

/// At most this much of a command's output (stdout then stderr) is kept.
pub const MAX_OUTPUT: usize = 2048;

/// Confirmations of "off" needed in a row.
pub const CONFIRMATIONS: u8 = 2;

/// What a fence command is asked to do (`{action}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FenceAction {
    /// Power on.
    On,
    /// Power off (hard).
    Off,
    /// Report the power state.
    Status,
}

impl FenceAction {
    /// The word substituted for `{action}`.
    pub fn as_str(self) -> &'static str {
        match self {
            FenceAction::On => "on",
            FenceAction::Off => "off",
            FenceAction::Status => "status",
        }
    }

    /// Parses `on|off|status`.
    pub fn parse(s: &str) -> Option<FenceAction> {
        match s {
            "on" => Some(FenceAction::On),
            "off" => Some(FenceAction::Off),
            "status" => Some(FenceAction::Status),
            _ => None,
        }
    }
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// It ran past its timeout and was killed.
    TimedOut,
    /// It could not be started, or died by a signal.
    Error(String),
}

/// A command's result, as the runner reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ran {
    /// How it ended.
    pub exit: Exit,
    /// Its output, at most [`MAX_OUTPUT`] bytes, lossily UTF-8.
    pub output: String,
}

impl Ran {
    /// For events: the exit and the output's first line.
    pub fn describe(&self) -> String {
        let exit = match &self.exit {
            Exit::Code(c) => format!("exit {c}"),
            Exit::TimedOut => "timed out (killed)".into(),
            Exit::Error(e) => e.clone(),
        };
        match self.output.lines().map(str::trim).find(|l| !l.is_empty()) {
            Some(line) => format!("{exit}: {line}"),
            None => exit,
        }
    }
}

/// What `status` said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    /// Exit 0.
    On,
    /// Exit 2.
    Off,
    /// Anything else.
    Unknown,
}

impl Power {
    /// The power state a `status` run reports.
    pub fn of(r: &Ran) -> Power {
        match r.exit {
            Exit::Code(0) => Power::On,
            Exit::Code(2) => Power::Off,
            _ => Power::Unknown,
        }
    }
}

/// A fence's thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FencePolicy {
    /// Attempts after the first before the round fails.
    pub retries: u32,
    /// A failed round starts again after this; `None`: it stays failed
    /// (the caller falls back to another guard).
    pub retry: Option<Duration>,
}

/// Where one host's fence stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Not fencing.
    Idle,
    /// `status` is running (is it off already?).
    Checking,
    /// `off` is running.
    PoweringOff,
    /// `status` is running to confirm "off"; `done` confirmations so far.
    Confirming {
        /// Confirmations so far.
        done: u8,
    },
    /// Confirmed off.
    Off {
        /// When.
        at: Instant,
    },
    /// Every attempt failed; a new round starts at `retry_at` (if any).
    Failed {
        /// The last attempt's error.
        error: String,
        /// When the next round starts.
        retry_at: Option<Instant>,
    },
}

/// The summary shown in the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceStatus {
    /// Not fencing.
    Idle,
    /// A round is under way.
    Fencing,
    /// Confirmed off.
    Off,
    /// The last round failed (retried).
    Failed,
}

/// What happened, for the event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceEvent {
    /// A round began (`attempt` 1 is the first of a round).
    Started {
        /// The round's attempt number.
        attempt: u32,
    },
    /// A step's command ran (`what` says what it found).
    Step {
        /// The action run.
        action: FenceAction,
        /// What it found.
        what: String,
    },
    /// Confirmed off.
    Off {
        /// It was off before the server powered it off.
        already: bool,
    },
    /// An attempt failed; another follows at once.
    AttemptFailed {
        /// Why.
        error: String,
    },
    /// Every attempt failed: an alert; retried at the policy's `retry`.
    Failed {
        /// Why the last attempt failed.
        error: String,
    },
}

/// The outcome of feeding the machine: a command to run next, and events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Next {
    /// Run this next (at most one command runs per host at a time).
    pub run: Option<FenceAction>,
    /// What happened.
    pub events: Vec<FenceEvent>,
}

/// One host's fence (pure: results and `now` in, commands out).
#[derive(Debug, Clone)]
pub struct FenceMachine {
    policy: FencePolicy,
    phase: Phase,
    /// Attempts in this round (1-based while fencing).
    attempt: u32,
    /// The round began with the host already off.
    already: bool,
    /// The last error (kept for the API after the host is off again).
    last_error: Option<String>,
}

impl FenceMachine {
    /// An idle fence.
    pub fn new(policy: FencePolicy) -> Self {
        Self {
            policy,
            phase: Phase::Idle,
            attempt: 0,
            already: false,
            last_error: None,
        }
    }

    /// Where it stands.
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// The summary for the API.
    pub fn status(&self) -> FenceStatus {
        match self.phase {
            Phase::Idle => FenceStatus::Idle,
            Phase::Checking | Phase::PoweringOff | Phase::Confirming { .. } => FenceStatus::Fencing,
            Phase::Off { .. } => FenceStatus::Off,
            Phase::Failed { .. } => FenceStatus::Failed,
        }
    }

    /// The last error of an attempt, if any in this fence.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// Whether a command of this machine is running.
    pub fn busy(&self) -> bool {
        self.status() == FenceStatus::Fencing
    }

    /// Starts a round if idle: runs `status` first.
    pub fn start(&mut self) -> Next {
        if self.phase != Phase::Idle {
            return Next::default();
        }
        self.round()
    }

    fn round(&mut self) -> Next {
        self.attempt = 0;
        self.attempt()
    }

    fn attempt(&mut self) -> Next {
        self.attempt += 1;
        self.already = false;
        self.phase = Phase::Checking;
        Next {
            run: Some(FenceAction::Status),
            events: vec![FenceEvent::Started {
                attempt: self.attempt,
            }],
        }
    }

    /// When time alone can change it (a failed round's retry).
    pub fn next_wakeup(&self) -> Option<Instant> {
        match self.phase {
            Phase::Failed { retry_at, .. } => retry_at,
            _ => None,
        }
    }

    /// A failed round's retry when due.
    pub fn poll(&mut self, now: Instant) -> Next {
        match self.phase {
            Phase::Failed {
                retry_at: Some(at), ..
            } if now >= at => self.round(),
            _ => Next::default(),
        }
    }

    /// The host was heard again (or left the fence's care): idle.
    pub fn reset(&mut self) {
        self.phase = Phase::Idle;
        self.attempt = 0;
    }

    /// The command the machine asked for ended at `now` with `ran`.
    /// A result for a command the machine did not ask for is ignored.
    pub fn done(&mut self, now: Instant, action: FenceAction, ran: &Ran) -> Next {
        let expected = match self.phase {
            Phase::Checking | Phase::Confirming { .. } => FenceAction::Status,
            Phase::PoweringOff => FenceAction::Off,
            _ => return Next::default(),
        };
        if action != expected {
            return Next::default();
        }
        let step = FenceEvent::Step {
            action,
            what: ran.describe(),
        };
        let mut next = match (&self.phase, action) {
            (Phase::Checking, _) => match Power::of(ran) {
                Power::Off => {
                    self.already = true;
                    self.confirmed(now, 1)
                }
                Power::On => {
                    self.phase = Phase::PoweringOff;
                    Next {
                        run: Some(FenceAction::Off),
                        events: Vec::new(),
                    }
                }
                Power::Unknown => self.fail(now, format!("status unknown ({})", ran.describe())),
            },
            (Phase::PoweringOff, _) => match ran.exit {
                Exit::Code(0) => self.confirmed(now, 0),
                _ => self.fail(now, format!("off failed ({})", ran.describe())),
            },
            (Phase::Confirming { done }, _) => match Power::of(ran) {
                Power::Off => {
                    let done = *done + 1;
                    self.confirmed(now, done)
                }
                Power::On => self.fail(now, "still on after off".into()),
                Power::Unknown => self.fail(
                    now,
                    format!("status unknown while confirming ({})", ran.describe()),
                ),
            },
            _ => Next::default(),
        };
        next.events.insert(0, step);
        next
    }

    fn confirmed(&mut self, now: Instant, done: u8) -> Next {
        if done >= CONFIRMATIONS {
            self.phase = Phase::Off { at: now };
            return Next {
                run: None,
                events: vec![FenceEvent::Off {
                    already: self.already,
                }],
            };
        }
        self.phase = Phase::Confirming { done };
        Next {
            run: Some(FenceAction::Status),
            events: Vec::new(),
        }
    }

    fn fail(&mut self, now: Instant, error: String) -> Next {
        self.last_error = Some(error.clone());
        if self.attempt <= self.policy.retries {
            let mut next = self.attempt();
            next.events.insert(0, FenceEvent::AttemptFailed { error });
            return next;
        }
        self.phase = Phase::Failed {
            error: error.clone(),
            retry_at: self.policy.retry.map(|r| now.checked_add(r).unwrap_or(now)),
        };
        Next {
            run: None,
            events: vec![FenceEvent::Failed { error }],
        }
    }
}

/// The configured fence command: an argv template, with per-host
/// overrides by host name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceCommand {
    /// `{host}` and `{action}` are substituted in every argument.
    pub argv: Vec<String>,
    /// Per host name, a template used instead.
    pub hosts: BTreeMap<String, Vec<String>>,
    /// A command running longer is killed (its result: unknown).
    pub timeout: Duration,
}

impl FenceCommand {
    /// The argv to run `action` on host `name`.
    pub fn argv_for(&self, name: &str, action: FenceAction) -> Vec<String> {
        let template = self.hosts.get(name).unwrap_or(&self.argv);
        template
            .iter()
            .map(|a| a.replace("{host}", name).replace("{action}", action.as_str()))
            .collect()
    }
}

/// Runs `argv` (no shell), killing it and its process group after
/// `timeout`; its output is kept up to [`MAX_OUTPUT`] bytes.
pub async fn run(argv: &[String], timeout: Duration) -> Ran {
    let Some((prog, args)) = argv.split_first() else {
        return Ran {
            exit: Exit::Error("empty fence command".into()),
            output: String::new(),
        };
    };
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Ran {
                exit: Exit::Error(format!("cannot start {prog}: {e}")),
                output: String::new(),
            }
        }
    };
    let out = Arc::new(Mutex::new(Vec::new()));
    let mut readers = Vec::new();
    if let Some(s) = child.stdout.take() {
        readers.push(tokio::spawn(collect(s, out.clone())));
    }
    if let Some(s) = child.stderr.take() {
        readers.push(tokio::spawn(collect(s, out.clone())));
    }
    let exit = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => match status.code() {
            Some(c) => Exit::Code(c),
            None => Exit::Error(format!("killed by a signal ({status})")),
        },
        Ok(Err(e)) => Exit::Error(format!("cannot wait for {prog}: {e}")),
        Err(_) => {
            // Not reaped yet, so its group id is still its own.
            kill_group(&child);
            let _ = child.kill().await;
            Exit::TimedOut
        }
    };
    if exit != Exit::TimedOut {
        // Something it left behind may hold the pipes: a bounded wait.
        for r in &mut readers {
            if tokio::time::timeout(Duration::from_millis(200), r).await.is_err() {
                break;
            }
        }
    }
    for r in &readers {
        r.abort();
    }
    let bytes = std::mem::take(&mut *out.lock().unwrap_or_else(|e| e.into_inner()));
    Ran {
        exit,
        output: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

fn kill_group(child: &tokio::process::Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        // The group was made for this command (process_group(0)).
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
}

async fn collect(mut r: impl tokio::io::AsyncRead + Unpin, out: Arc<Mutex<Vec<u8>>>) {
    let mut buf = [0u8; 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
                let room = MAX_OUTPUT.saturating_sub(o.len());
                o.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

#[cfg(test)]
mod tests;
