//! Metrics on the agent: collectors (host from /proc, VMs from libvirt's bulk
//! domain stats), the sampler thread that ticks on wall-clock boundaries, and
//! the sender that streams the spool to the server.
//!
//! Flow: every tick the sampler pushes one value per series into a
//! [`BatchBuilder`]; about once a second (every tick at 1 s, every 10 ticks
//! at 100 ms, or at once when the set of series changes) it closes a batch,
//! stamps it with the spool's epoch and next sequence number, frames it and
//! appends the frame to the on-disk [`Spool`]. While a session is up, the
//! sender reads the spool from the oldest unacknowledged batch on and writes
//! the frames to a unidirectional QUIC stream; the server's `MetricsAck`s
//! (on the control stream) let the spool delete what is stored. After a
//! reconnect the sender starts again from the oldest unacknowledged batch, so
//! nothing is lost and the server drops what it already has.
//!
//! The sampler reads the time from the [`Clock`] it is started with; when
//! the next tick is and how many were missed are pure functions of `now`
//! ([`next_tick`], [`missed_ticks`]). It waits for the next tick on its stop
//! channel, so [`MetricsShared::stop`] ends it at once.

pub mod domains;
pub mod host;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use novacron_shared::clock::Clock;
use novacron_shared::framing::{self, MAX_FRAME_LEN};
use novacron_shared::metrics::{BatchBuilder, TickOutcome};
use novacron_shared::protocol::{AgentMessage, PROTOCOL_VERSION_MAX};
use serde::{Deserialize, Serialize};

use crate::hypervisor::Hypervisor;
use crate::spool::{Spool, SpoolError};
use domains::DomainCollector;
use host::HostCollector;

/// Shortest sampling interval.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Records the sender reads from the spool at a time.
const READ_CHUNK: usize = 32;

/// `[metrics]` in the agent config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// Sample host and VMs at all.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Time between samples (100ms to 60s), aligned to wall-clock multiples.
    #[serde(default = "default_interval", with = "novacron_shared::duration::serde_human")]
    pub interval: Duration,
    /// The spool's bound, MiB: past it the oldest unacknowledged batches are
    /// dropped (and counted).
    #[serde(default = "default_spool_mib")]
    pub spool_max_mib: u64,
}

fn default_true() -> bool {
    true
}
fn default_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_spool_mib() -> u64 {
    64
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings {
            enabled: true,
            interval: default_interval(),
            spool_max_mib: default_spool_mib(),
        }
    }
}

impl MetricsSettings {
    /// Checks ranges; the error names the key.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.interval < MIN_INTERVAL || self.interval > Duration::from_secs(60) {
            return Err(("metrics.interval", "must be between 100ms and 60s".into()));
        }
        if !self.interval.as_millis().is_multiple_of(100) {
            return Err(("metrics.interval", "must be a multiple of 100ms".into()));
        }
        if !(1..=65_536).contains(&self.spool_max_mib) {
            return Err(("metrics.spool_max_mib", "must be between 1 and 65536".into()));
        }
        Ok(())
    }
}

/// Counters of the sampler, for logs, tests and benchmarks.
#[derive(Debug, Default)]
pub struct SamplerStats {
    /// Ticks sampled.
    pub ticks: AtomicU64,
    /// Ticks skipped because sampling fell behind.
    pub missed: AtomicU64,
    /// Batches appended to the spool.
    pub batches: AtomicU64,
    /// Batches sent to the server (including resends).
    pub sent: AtomicU64,
    /// Time spent sampling, ns.
    pub busy_ns: AtomicU64,
}

/// What the sampler, the sender and the link share.
#[derive(Debug)]
pub struct MetricsShared {
    spool: Mutex<Spool>,
    appended: tokio::sync::Notify,
    /// Dropped to stop the sampler (it waits for ticks on the other end).
    stop: Mutex<Option<std_mpsc::Sender<()>>>,
    /// Counters.
    pub stats: SamplerStats,
}

impl MetricsShared {
    fn spool(&self) -> std::sync::MutexGuard<'_, Spool> {
        self.spool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The server stored everything up to `upto` of `epoch`.
    pub fn ack(&self, epoch: u64, upto: u64) {
        let mut s = self.spool();
        if epoch != s.epoch() {
            tracing::debug!(
                epoch,
                ours = s.epoch(),
                "acknowledgement for another spool epoch; ignored"
            );
            return;
        }
        if let Err(e) = s.ack(upto) {
            tracing::warn!(error = %e, "cannot trim the metrics spool; it will be retried with the next acknowledgement");
        }
    }

    /// The spool's counters.
    pub fn spool_stats(&self) -> crate::spool::Stats {
        self.spool().stats()
    }

    /// Stops the sampler thread.
    pub fn stop(&self) {
        self.stop.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// Where the sampler gets VM stats.
enum DomainSource {
    /// Its own libvirt connection (real libvirtd: stats never wait on VM work).
    Own {
        uri: String,
        conn: Option<virt::connect::Connect>,
        retry_at: Instant,
    },
    /// The hypervisor's thread and connection: the test driver keeps its
    /// state per connection, so only that one sees the agent's domains.
    Hypervisor(Hypervisor, tokio::runtime::Handle),
}

struct State {
    host: HostCollector,
    domains: DomainCollector,
    builder: BatchBuilder,
}

/// Metrics could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The spool did not open.
    #[error("cannot open the metrics spool")]
    Spool(#[from] SpoolError),
    /// The sampler thread did not start.
    #[error("cannot start the metrics thread")]
    Thread(#[source] std::io::Error),
}

/// Opens the spool and starts the sampler thread.
pub fn start(
    settings: &MetricsSettings,
    spool_dir: &Path,
    hv: &Hypervisor,
    runtime: tokio::runtime::Handle,
    clock: Clock,
) -> Result<Arc<MetricsShared>, StartError> {
    let spool = Spool::open(spool_dir, settings.spool_max_mib * 1024 * 1024)?;
    let st = spool.stats();
    tracing::info!(dir = %spool_dir.display(), epoch = st.epoch, unacknowledged = st.batches, bytes = st.bytes, dropped = st.dropped, "metrics spool open");
    let (stop_tx, stop_rx) = std_mpsc::channel();
    let shared = Arc::new(MetricsShared {
        spool: Mutex::new(spool),
        appended: tokio::sync::Notify::new(),
        stop: Mutex::new(Some(stop_tx)),
        stats: SamplerStats::default(),
    });
    let uri = hv.uri().to_string();
    let source = if uri.starts_with("test:") {
        DomainSource::Hypervisor(hv.clone(), runtime)
    } else {
        DomainSource::Own {
            uri,
            conn: None,
            retry_at: clock.now(),
        }
    };
    let interval = settings.interval;
    let s2 = shared.clone();
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            sampler(
                s2,
                &clock,
                &stop_rx,
                interval,
                source,
                PathBuf::from("/proc"),
                PathBuf::from("/sys/block"),
            )
        })
        .map_err(StartError::Thread)?;
    Ok(shared)
}

/// The next tick after wall time `now_ms`: the next multiple of `step_ms`.
pub fn next_tick(now_ms: u64, step_ms: u64) -> u64 {
    let step = step_ms.max(1);
    (now_ms / step + 1) * step
}

/// Ticks skipped between the previous tick `last` (0: none yet) and `next`.
pub fn missed_ticks(last: u64, next: u64, step_ms: u64) -> u64 {
    let step = step_ms.max(1);
    if last == 0 || next <= last + step {
        0
    } else {
        (next - last) / step - 1
    }
}

/// How long after a failed connect the sampler tries libvirt again.
const RECONNECT_EVERY: Duration = Duration::from_secs(5);

fn sampler(
    shared: Arc<MetricsShared>,
    clock: &Clock,
    stop: &std_mpsc::Receiver<()>,
    interval: Duration,
    mut source: DomainSource,
    proc_root: PathBuf,
    sys_block: PathBuf,
) {
    let step = interval.as_millis() as u64;
    let flush_every = (1000 / step).max(1) as usize;
    let state = Arc::new(Mutex::new(State {
        host: HostCollector::new(proc_root, sys_block),
        domains: DomainCollector::new(),
        builder: BatchBuilder::new(step as u32),
    }));
    let mut last_tick = 0u64;
    let mut warned = false;
    loop {
        // Wait for the next multiple of the interval on the wall clock, or
        // for the stop (the sender is dropped).
        let now = clock.unix_ms();
        let next = next_tick(now, step);
        match stop.recv_timeout(Duration::from_millis(next - now)) {
            Err(std_mpsc::RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
        }
        shared
            .stats
            .missed
            .fetch_add(missed_ticks(last_tick, next, step), Ordering::Relaxed);
        last_tick = next;
        let started = clock.now();
        let outcome = match &mut source {
            DomainSource::Own { uri, conn, retry_at } => {
                let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                let st = &mut *st;
                st.builder.start_tick(next);
                st.host.collect(&mut st.builder);
                if conn.is_none() && clock.now() >= *retry_at {
                    match virt::connect::Connect::open(Some(uri)) {
                        Ok(c) => *conn = Some(c),
                        Err(e) => {
                            *retry_at = clock.now() + RECONNECT_EVERY;
                            if !warned {
                                warned = true;
                                tracing::warn!(uri = %uri, error = %e, retry_every = ?RECONNECT_EVERY, "metrics: cannot connect to libvirt; VM metrics wait");
                            }
                        }
                    }
                }
                if let Some(c) = conn.as_ref() {
                    if let Err(e) = st.domains.collect(c, &mut st.builder) {
                        tracing::warn!(error = %e, "metrics: domain stats failed; reconnecting");
                        *conn = None;
                    } else {
                        warned = false;
                    }
                }
                Some(st.builder.end_tick())
            }
            DomainSource::Hypervisor(hv, rt) => {
                let st = state.clone();
                let r = rt.block_on(hv.call(move |d| {
                    let mut st = st.lock().unwrap_or_else(|p| p.into_inner());
                    let st = &mut *st;
                    st.builder.start_tick(next);
                    st.host.collect(&mut st.builder);
                    if let Ok(c) = d.conn() {
                        if let Err(e) = st.domains.collect(c, &mut st.builder) {
                            tracing::debug!(error = %e, "metrics: domain stats failed");
                        }
                    }
                    Ok(st.builder.end_tick())
                }));
                match r {
                    Ok(o) => Some(o),
                    Err(e) => {
                        tracing::debug!(error = %e, "metrics: the libvirt thread did not sample this tick");
                        None
                    }
                }
            }
        };
        let Some(outcome) = outcome else { continue };
        shared.stats.ticks.fetch_add(1, Ordering::Relaxed);
        let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
        if outcome == TickOutcome::LayoutChanged || st.builder.pending_ticks() >= flush_every {
            while let Some(batch) = st.builder.take() {
                spool_batch(&shared, batch);
            }
        }
        drop(st);
        shared
            .stats
            .busy_ns
            .fetch_add(clock.since(started).as_nanos() as u64, Ordering::Relaxed);
    }
}

fn spool_batch(shared: &MetricsShared, mut batch: novacron_shared::metrics::MetricBatch) {
    let mut spool = shared.spool();
    let st = spool.stats();
    batch.epoch = st.epoch;
    batch.seq = st.next_seq;
    batch.dropped = st.dropped;
    let mut frame = Vec::new();
    if let Err(e) = framing::encode_frame(
        PROTOCOL_VERSION_MAX,
        &AgentMessage::Metrics(batch),
        MAX_FRAME_LEN,
        &mut frame,
    ) {
        tracing::error!(error = %e, "metrics: cannot frame a batch; dropped");
        return;
    }
    match spool.append(st.next_seq, &frame) {
        Ok(()) => {
            shared.stats.batches.fetch_add(1, Ordering::Relaxed);
            drop(spool);
            shared.appended.notify_one();
        }
        Err(e) => tracing::error!(error = %e, "metrics: cannot append to the spool; batch lost"),
    }
}

/// Streams the spool to the server on a unidirectional stream of `conn`,
/// oldest unacknowledged batch first, until the connection ends.
pub async fn send(shared: Arc<MetricsShared>, conn: quinn::Connection, version: u16) -> Result<(), String> {
    let mut stream = conn.open_uni().await.map_err(|e| e.to_string())?;
    let mut next = {
        let s = shared.spool_stats();
        s.acked + 1
    };
    let mut resent = true;
    loop {
        let notified = shared.appended.notified();
        let sh = shared.clone();
        let from = next;
        let records = tokio::task::spawn_blocking(move || sh.spool().read_from(from, READ_CHUNK))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if records.is_empty() {
            if resent {
                resent = false;
                tracing::debug!(upto = next.saturating_sub(1), "metrics: spool caught up");
            }
            notified.await;
            continue;
        }
        for (seq, frame) in records {
            write_frame(&mut stream, version, &frame).await?;
            shared.stats.sent.fetch_add(1, Ordering::Relaxed);
            next = seq + 1;
        }
    }
}

async fn write_frame(stream: &mut quinn::SendStream, version: u16, frame: &[u8]) -> Result<(), String> {
    let stored = frame.get(4..6).map(|v| u16::from_be_bytes([v[0], v[1]]));
    if stored == Some(version) {
        return stream.write_all(frame).await.map_err(|e| e.to_string());
    }
    // Spooled under another protocol version (an upgrade in between):
    // re-frame it for this session.
    let mut dec = framing::FrameDecoder::new(MAX_FRAME_LEN);
    dec.push(frame);
    let msg = match dec.next_frame::<AgentMessage>() {
        Ok(Some((_, m))) => m,
        _ => return Ok(()),
    };
    let mut buf = Vec::new();
    framing::write_frame(stream, version, &msg, &mut buf)
        .await
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_fall_on_wall_clock_multiples_of_the_interval() {
        assert_eq!(next_tick(0, 1000), 1000);
        assert_eq!(next_tick(999, 1000), 1000);
        assert_eq!(next_tick(1000, 1000), 2000, "a tick at now is already past");
        assert_eq!(next_tick(1_234_567, 100), 1_234_600);
    }

    #[test]
    fn missed_ticks_count_the_gap_only() {
        assert_eq!(missed_ticks(0, 5000, 1000), 0, "no tick before the first");
        assert_eq!(missed_ticks(4000, 5000, 1000), 0);
        assert_eq!(missed_ticks(4000, 8000, 1000), 3);
        // The wall clock stepped back: nothing was missed.
        assert_eq!(missed_ticks(8000, 5000, 1000), 0);
    }
}
