//! Live migration, peer to peer: this host's libvirtd connects to the
//! target's and moves the running domain; on any failure libvirt rolls
//! back and the VM keeps running here.
//!
//! A migration blocks its libvirt call for seconds to minutes, so it runs
//! on a thread and connection of its own (never the driver thread), and a
//! second thread polls the job for progress and aborts it past the
//! deadline. The poller waits for its next poll on a channel that closes
//! when the migration call returns, so it stops at once; time comes from
//! the [`Clock`] the driver passes in, and the deadline rule
//! ([`past_deadline`]) takes `now`.
//!
//! Layering: above `vmops` (domain lookup and state) and `error`; below
//! `hypervisor`, which calls [`run`] and which this module never imports.

use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use novacron_shared::clock::Clock;
use novacron_shared::ids::VmId;
use novacron_shared::protocol::VmState;
use tokio::sync::{mpsc, oneshot};
use virt::connect::Connect;
use virt::domain::{Domain, MigrateParameters};
use virt::sys;

use crate::error::HvError;
use crate::{ffi, vmops};

/// How often the job is polled for progress.
const POLL_EVERY: Duration = Duration::from_millis(500);

/// One migration to run.
#[derive(Debug, Clone)]
pub struct MigrateRequest {
    /// The VM.
    pub vm: VmId,
    /// The target libvirt URI.
    pub dest_uri: String,
    /// Bandwidth cap in MiB/s (0: libvirt's default).
    pub bandwidth_mib_s: u64,
    /// Abort past this.
    pub timeout: Duration,
}

/// A progress report: percent and a line for people.
pub type Progress = (u8, String);

/// The flags of a NovaCron migration: live, peer to peer, the domain
/// defined on the target and undefined here in the same step (so it is
/// never defined on both), abort on I/O errors, auto-converge for busy
/// guests, and disks copied when they are local.
pub fn flags(copy_disks: bool) -> u32 {
    let mut f = sys::VIR_MIGRATE_LIVE
        | sys::VIR_MIGRATE_PEER2PEER
        | sys::VIR_MIGRATE_PERSIST_DEST
        | sys::VIR_MIGRATE_UNDEFINE_SOURCE
        | sys::VIR_MIGRATE_ABORT_ON_ERROR
        | sys::VIR_MIGRATE_AUTO_CONVERGE;
    if copy_disks {
        f |= sys::VIR_MIGRATE_NON_SHARED_DISK;
    }
    f
}

/// Whether the domain XML has writable disks (they must be copied).
pub fn has_writable_disks(xml: &str) -> bool {
    xml.split("<disk ").skip(1).any(|d| {
        let head = d.split("</disk>").next().unwrap_or("");
        (head.contains("device='disk'") || head.contains("device=\"disk\"")) && !head.contains("<readonly/>")
    })
}

/// Percent of a migration done, from libvirt's data counters (memory and
/// disks together); never 100 before the call returns.
pub fn percent(total: Option<u64>, remaining: Option<u64>) -> u8 {
    match (total, remaining) {
        (Some(t), Some(r)) if t > 0 => {
            let done = t.saturating_sub(r) as f64 / t as f64;
            (done * 100.0).floor().clamp(0.0, 99.0) as u8
        }
        _ => 0,
    }
}

/// Whether a migration that started at `started` is past its `timeout` at
/// `now`.
pub fn past_deadline(started: Instant, now: Instant, timeout: Duration) -> bool {
    now.saturating_duration_since(started) > timeout
}

fn mib(b: u64) -> u64 {
    b >> 20
}

/// Runs the migration on its own threads; progress goes to `progress`.
pub async fn run(
    clock: Clock,
    local_uri: String,
    req: MigrateRequest,
    progress: mpsc::UnboundedSender<Progress>,
) -> Result<(), HvError> {
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("migrate".into())
        .spawn(move || {
            let _ = tx.send(migrate_blocking(&clock, &local_uri, &req, &progress));
        })
        .map_err(|e| HvError::Invalid(format!("cannot start the migration thread: {e}")))?;
    rx.await.map_err(|_| HvError::Gone)?
}

fn open(uri: &str) -> Result<Connect, HvError> {
    Connect::open(Some(uri)).map_err(|e| HvError::Connect {
        uri: uri.to_string(),
        message: e.to_string(),
    })
}

fn migrate_blocking(
    clock: &Clock,
    local_uri: &str,
    req: &MigrateRequest,
    progress: &mpsc::UnboundedSender<Progress>,
) -> Result<(), HvError> {
    let conn = open(local_uri)?;
    let dom = vmops::lookup(&conn, req.vm)?
        .ok_or_else(|| HvError::Invalid(format!("no VM with id {} on this host", req.vm)))?;
    let state = vmops::state(&dom)?;
    if state != VmState::Running && state != VmState::Paused {
        return Err(HvError::Invalid(format!(
            "VM {} is {state:?}; only a running or paused VM can be live-migrated",
            req.vm
        )));
    }
    let xml = dom.xml_desc(0).map_err(|e| HvError::Call {
        op: "domain XML",
        message: e.to_string(),
    })?;
    let copy_disks = has_writable_disks(&xml);
    let _ = progress.send((
        0,
        format!(
            "migrating to {}{}",
            req.dest_uri,
            if copy_disks { " (copying disks)" } else { "" }
        ),
    ));
    // Dropped when the migration call returns: the poller stops at once.
    let (running, done) = std_mpsc::channel::<()>();
    let poller = {
        let clock = clock.clone();
        let local_uri = local_uri.to_string();
        let req = req.clone();
        let progress = progress.clone();
        std::thread::Builder::new()
            .name("migrate-poll".into())
            .spawn(move || poll(&clock, &local_uri, &req, &done, &progress))
            .map_err(|e| HvError::Invalid(format!("cannot start the migration poller: {e}")))?
    };
    let params = MigrateParameters {
        bandwidth: (req.bandwidth_mib_s > 0).then_some(req.bandwidth_mib_s),
        ..MigrateParameters::default()
    };
    let started = clock.now();
    let r = dom.migrate_to_uri3(Some(&req.dest_uri), params, flags(copy_disks));
    drop(running);
    let aborted = poller.join().unwrap_or(false);
    match r {
        Ok(()) => {
            let secs = clock.since(started).as_secs_f64();
            tracing::info!(vm = %req.vm, dest = %req.dest_uri, secs, "live migration done");
            let _ = progress.send((100, format!("migrated in {secs:.1} s")));
            Ok(())
        }
        Err(e) => {
            let message = if aborted {
                format!(
                    "aborted after {}: {e}",
                    novacron_shared::duration::format(req.timeout)
                )
            } else {
                e.to_string()
            };
            tracing::warn!(vm = %req.vm, dest = %req.dest_uri, error = %message, "live migration failed; the VM stays here");
            Err(HvError::Call {
                op: "live migration",
                message,
            })
        }
    }
}

/// Polls the job every [`POLL_EVERY`] until `done` closes; aborts it past
/// the deadline. Returns whether it aborted.
fn poll(
    clock: &Clock,
    local_uri: &str,
    req: &MigrateRequest,
    done: &std_mpsc::Receiver<()>,
    progress: &mpsc::UnboundedSender<Progress>,
) -> bool {
    let start = clock.now();
    let mut dom: Option<Domain> = None;
    let mut _conn: Option<Connect> = None;
    let mut last = None;
    // Nothing is ever sent: the channel times out (poll now) or closes
    // (the migration call returned).
    while let Err(std_mpsc::RecvTimeoutError::Timeout) = done.recv_timeout(POLL_EVERY) {
        if dom.is_none() {
            if let Ok(c) = open(local_uri) {
                dom = vmops::lookup(&c, req.vm).ok().flatten();
                _conn = Some(c);
            }
        }
        let Some(d) = &dom else { continue };
        if past_deadline(start, clock.now(), req.timeout) {
            let r = ffi::abort_job(d);
            tracing::warn!(vm = %req.vm, result = ?r, "migration past its deadline; aborting");
            let _ = progress.send((0, "past the deadline; aborting".into()));
            return true;
        }
        if let Ok(j) = d.job_info() {
            let pct = percent(j.data_total, j.data_remaining);
            let line = format!(
                "{pct} %: {} of {} MiB sent, {} MiB remaining",
                mib(j.data_processed.unwrap_or(0)),
                mib(j.data_total.unwrap_or(0)),
                mib(j.data_remaining.unwrap_or(0)),
            );
            if last.as_ref() != Some(&line) {
                let _ = progress.send((pct, line.clone()));
                last = Some(line);
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writable_disks_are_told_apart_from_read_only_media() {
        let diskless = "<domain><devices><console/></devices></domain>";
        assert!(!has_writable_disks(diskless));
        let seed_only = "<domain><devices><disk type='file' device='cdrom'><source file='/s.iso'/><readonly/></disk></devices></domain>";
        assert!(!has_writable_disks(seed_only));
        let ro_disk = "<disk type='file' device='disk'><readonly/></disk>";
        assert!(!has_writable_disks(ro_disk));
        let disk = "<disk type='file' device='disk'><source file='/v.qcow2'/></disk><disk type='file' device='cdrom'><readonly/></disk>";
        assert!(has_writable_disks(disk));
        assert_ne!(flags(true) & sys::VIR_MIGRATE_NON_SHARED_DISK, 0);
        assert_eq!(flags(false) & sys::VIR_MIGRATE_NON_SHARED_DISK, 0);
        assert_ne!(flags(false) & sys::VIR_MIGRATE_UNDEFINE_SOURCE, 0);
    }

    #[test]
    fn the_deadline_passes_only_after_the_timeout() {
        let (clock, time) = Clock::manual();
        let started = clock.now();
        let timeout = Duration::from_secs(60);
        time.advance(timeout);
        assert!(!past_deadline(started, clock.now(), timeout));
        time.advance(Duration::from_millis(1));
        assert!(past_deadline(started, clock.now(), timeout));
        assert!(!past_deadline(started, started, timeout));
    }

    #[test]
    fn percent_never_reaches_100_before_the_end() {
        assert_eq!(percent(None, None), 0);
        assert_eq!(percent(Some(0), Some(0)), 0);
        assert_eq!(percent(Some(100), Some(100)), 0);
        assert_eq!(percent(Some(100), Some(40)), 60);
        assert_eq!(percent(Some(100), Some(0)), 99);
        assert_eq!(percent(Some(100), Some(200)), 0);
    }
}
