//! Metric ingest: batches from agents' metric streams go into the in-memory
//! window (queryable at once) and, through one writer task, into the
//! metrics database; the agent gets its acknowledgement only after the
//! batch is committed.
//!
//! Per host, batches are handled one at a time in sequence order (a per-host
//! async lock), so "stored up to seq N" is always a prefix: a batch at or
//! below the stored high-water mark is a resend (counted, acknowledged, not
//! stored twice); a jump is a gap (counted; the agent reports the batches
//! its full spool dropped). Ingest runs on the metrics streams' own tasks
//! and its own database file, so it never blocks the control plane.

pub mod db;
pub mod query;
pub mod window;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use novacron_shared::codec;
use novacron_shared::ids::HostId;
use novacron_shared::metrics::{BatchError, Metric, MetricBatch, Scope};
use novacron_shared::protocol::{MetricsAck, ServerMessage};
use tokio::sync::{broadcast, mpsc};

use crate::telemetry::TELEMETRY;
use crate::warn_limited;
use db::{MetricsDb, SeqRecord, StoredBatch};
use novacron_shared::clock::Clock;
use window::{ClosedMinute, Owner, SeriesHandle, SeriesKey, Window};

/// Batches waiting for the writer before ingest waits (backpressure on the
/// metric streams only).
const WRITE_QUEUE: usize = 4096;
/// Most batches committed in one transaction.
const MAX_GROUP: usize = 2048;
/// Longest accepted label value.
pub const MAX_LABEL_LEN: usize = 64;
/// Most series one batch may carry (a host with 500 VMs of 8 disks and 8
/// NICs each stays well below): bounds what one agent can make the server
/// hold.
pub const MAX_SERIES_PER_BATCH: usize = 65_536;

/// Metrics settings (`[metrics]` in the server config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsConfig {
    /// How long every raw point stays in memory (and raw batches on disk).
    pub raw_window: Duration,
    /// How long 1-minute rollups are kept.
    pub retention: Duration,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            raw_window: Duration::from_secs(15 * 60),
            retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// A batch was refused.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The batch is malformed.
    #[error(transparent)]
    Batch(#[from] BatchError),
    /// A label value is too long or has characters outside `[A-Za-z0-9._:@-]`.
    #[error("label {0:?} is not a valid label value")]
    Label(String),
    /// The batch carries more series than any host has.
    #[error("batch has {0} series; at most {MAX_SERIES_PER_BATCH} are accepted")]
    TooManySeries(usize),
    /// Something other than a metric batch arrived on a metric stream.
    #[error("only metric batches may be sent on a metric stream")]
    NotABatch,
    /// The batch could not be re-encoded for storage (a bug).
    #[error("cannot encode the batch for storage")]
    Encode(#[from] codec::CodecError),
    /// The writer is gone (shutting down).
    #[error("the metrics writer stopped")]
    WriterGone,
}

/// One tick of one owner's values, for live streams.
#[derive(Debug, Clone)]
pub struct LiveUpdate {
    /// Reporting host.
    pub host: HostId,
    /// Tick time.
    pub ts_ms: u64,
    /// (series, value: level or rate).
    pub values: Vec<(SeriesKey, f64)>,
}

enum Job {
    Store {
        batch: StoredBatch,
        epoch: u64,
        dropped: u64,
        ack_to: mpsc::Sender<ServerMessage>,
        queued: Instant,
    },
    AckOnly {
        host: HostId,
        ack_to: mpsc::Sender<ServerMessage>,
    },
    Prune {
        raw_before_ms: u64,
        rollup_before_minute: u64,
    },
}

/// The metrics service.
#[derive(Debug)]
pub struct Metrics {
    cfg: MetricsConfig,
    window: Window,
    hosts: Mutex<HashMap<HostId, Arc<tokio::sync::Mutex<SeqRecord>>>>,
    db: Arc<MetricsDb>,
    jobs: mpsc::Sender<Job>,
    live: broadcast::Sender<Arc<LiveUpdate>>,
    limiter: crate::ratelimit::LogLimiter,
    clock: Clock,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Job")
    }
}

/// What one metrics stream remembers between batches: the layout of the
/// last batch and its series handles, so a steady stream resolves no series.
#[derive(Debug, Default)]
pub struct StreamCache {
    vms: Vec<novacron_shared::ids::VmId>,
    labels: Vec<String>,
    series: Vec<novacron_shared::metrics::SeriesRef>,
    handles: Vec<SeriesHandle>,
    values: Vec<i64>,
}

fn valid_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= MAX_LABEL_LEN
        && l.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b))
}

impl Metrics {
    /// Opens the database, rebuilds the window from the stored raw batches
    /// and starts the writer and the janitor.
    pub fn open(path: &Path, cfg: MetricsConfig, clock: Clock) -> Result<Arc<Metrics>, db::DbError> {
        let started = clock.now();
        let db = Arc::new(MetricsDb::open(path)?);
        let seqs = db.seqs()?;
        let window = Window::default();
        let window_ms = cfg.raw_window.as_millis() as u64;
        let mut scratch = StreamCache::default();
        let mut closed = Vec::new();
        let replayed = db.raw_batches(|host, batch| {
            // Rollups of replayed minutes were stored with the batches that
            // closed them: replay fills the window and the open minutes only.
            let filled = batch.validate().map_err(IngestError::from).and_then(|ticks| {
                fill(
                    &window,
                    host,
                    &batch,
                    &ticks,
                    window_ms,
                    false,
                    &mut scratch,
                    &mut closed,
                )
            });
            if let Err(e) = filled {
                tracing::warn!(host = %host, seq = batch.seq, error = %e, "stored batch skipped");
            }
        })?;
        let (series, points) = window.size();
        tracing::info!(batches = replayed, series, points, took = ?clock.since(started), "metrics window rebuilt from the database");
        let (jobs, rx) = mpsc::channel(WRITE_QUEUE);
        let (live, _) = broadcast::channel(1024);
        let hosts = seqs
            .iter()
            .map(|(h, r)| (*h, Arc::new(tokio::sync::Mutex::new(*r))))
            .collect();
        tokio::spawn(writer(db.clone(), seqs, rx, clock.clone()));
        let m = Arc::new(Metrics {
            cfg,
            window,
            hosts: Mutex::new(hosts),
            db,
            jobs,
            live,
            limiter: crate::ratelimit::LogLimiter::with_clock(20, Duration::from_secs(60), clock.clone()),
            clock,
        });
        tokio::spawn(janitor(Arc::downgrade(&m)));
        Ok(m)
    }

    /// The settings.
    pub fn config(&self) -> MetricsConfig {
        self.cfg
    }

    /// The in-memory window.
    pub fn window(&self) -> &Window {
        &self.window
    }

    /// The database.
    pub fn db(&self) -> &MetricsDb {
        &self.db
    }

    /// Subscribes to live updates.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<LiveUpdate>> {
        self.live.subscribe()
    }

    fn slot(&self, host: HostId) -> Arc<tokio::sync::Mutex<SeqRecord>> {
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        hosts.entry(host).or_default().clone()
    }

    /// Every host's stream state, as ingested (may be ahead of what is committed by a few ms).
    pub async fn stream_states(&self) -> Vec<(HostId, SeqRecord)> {
        let slots: Vec<_> = {
            let hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
            hosts.iter().map(|(h, s)| (*h, s.clone())).collect()
        };
        let mut out = Vec::with_capacity(slots.len());
        for (h, s) in slots {
            out.push((h, *s.lock().await));
        }
        out
    }

    /// Every host's stream state without waiting on a busy host (one being
    /// ingested right now is skipped), for the exposition.
    pub fn stream_states_now(&self) -> Vec<(HostId, SeqRecord)> {
        let hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = hosts
            .iter()
            .filter_map(|(h, s)| s.try_lock().ok().map(|r| (*h, *r)))
            .collect();
        v.sort_by_key(|(h, _)| *h);
        v
    }

    /// One host's stream state.
    pub async fn stream_state(&self, host: HostId) -> Option<SeqRecord> {
        let slot = {
            let hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
            hosts.get(&host).cloned()
        }?;
        let r = *slot.lock().await;
        Some(r)
    }

    /// Ingests one batch from `host`; the acknowledgement goes to `ack_to`
    /// once the batch is durable.
    pub async fn ingest(
        &self,
        host: HostId,
        batch: MetricBatch,
        cache: &mut StreamCache,
        ack_to: &mpsc::Sender<ServerMessage>,
    ) -> Result<(), IngestError> {
        let ticks = match batch.validate() {
            Ok(t) => t,
            Err(e) => {
                TELEMETRY.metrics_refused.inc();
                return Err(e.into());
            }
        };
        if batch.series.len() > MAX_SERIES_PER_BATCH {
            TELEMETRY.metrics_refused.inc();
            return Err(IngestError::TooManySeries(batch.series.len()));
        }
        if let Some(bad) = batch.labels.iter().find(|l| !valid_label(l)) {
            TELEMETRY.metrics_refused.inc();
            return Err(IngestError::Label(bad.chars().take(80).collect()));
        }
        let slot = self.slot(host);
        let mut st = slot.lock().await;
        if batch.epoch != st.epoch {
            if st.epoch != 0 {
                tracing::info!(host = %host, old = st.epoch, new = batch.epoch, "agent metrics spool has a new epoch; sequence numbers restart");
            }
            st.epoch = batch.epoch;
            st.high = 0;
        }
        if batch.seq <= st.high {
            st.duplicates += 1;
            TELEMETRY.metrics_duplicates.inc();
            drop(st);
            return self
                .jobs
                .send(Job::AckOnly {
                    host,
                    ack_to: ack_to.clone(),
                })
                .await
                .map_err(|_| IngestError::WriterGone);
        }
        if batch.seq > st.high + 1 {
            let missing = batch.seq - st.high - 1;
            st.gaps += missing;
            TELEMETRY.metrics_gaps.inc_by(missing);
            warn_limited!(self.limiter, host = %host, after = st.high, seq = batch.seq, missing, agent_dropped = batch.dropped, "metric batches missing from an agent's stream");
        }
        let window_ms = self.cfg.raw_window.as_millis() as u64;
        let mut closed = Vec::new();
        fill(
            &self.window,
            host,
            &batch,
            &ticks,
            window_ms,
            true,
            cache,
            &mut closed,
        )?;
        let now = self.clock.unix_ms();
        if let Some(last) = ticks.last() {
            TELEMETRY
                .metrics_ingest_delay
                .observe(now.saturating_sub(*last) as f64 / 1000.0);
        }
        TELEMETRY.metrics_batches.inc();
        TELEMETRY.metrics_samples.inc_by(batch.samples() as u64);
        if self.live.receiver_count() > 0 {
            self.publish(host, &ticks, cache);
        }
        st.high = batch.seq;
        st.batches += 1;
        st.agent_dropped = batch.dropped;
        st.last_ms = now;
        let bytes = codec::encode(&batch)?;
        let job = Job::Store {
            batch: StoredBatch {
                host,
                first_ts: ticks.first().copied().unwrap_or(0),
                seq: batch.seq,
                bytes,
                closed,
            },
            epoch: batch.epoch,
            dropped: batch.dropped,
            ack_to: ack_to.clone(),
            queued: self.clock.now(),
        };
        // Still holding the host's slot: this host's jobs queue in order.
        self.jobs.send(job).await.map_err(|_| IngestError::WriterGone)?;
        TELEMETRY
            .metrics_write_queue
            .set((WRITE_QUEUE - self.jobs.capacity()) as i64);
        Ok(())
    }

    fn publish(&self, host: HostId, ticks: &[u64], cache: &StreamCache) {
        let Some(ts) = ticks.last().copied() else { return };
        let mut values = Vec::with_capacity(cache.handles.len());
        for h in &cache.handles {
            let s = window::lock(h);
            if let Some((t, v)) = s.latest() {
                if t == ts {
                    values.push((s.key().clone(), v));
                }
            }
        }
        let _ = self.live.send(Arc::new(LiveUpdate {
            host,
            ts_ms: ts,
            values,
        }));
    }

    /// The measured load of a host for the scheduler, 0..=1: the largest of
    /// its CPU busy share over the last minute, its memory in use and its
    /// CPU pressure (some, avg10). `None` without recent metrics.
    pub fn host_load(&self, host: HostId) -> Option<f64> {
        let now = self.clock.unix_ms();
        let since = now.saturating_sub(60_000);
        let mut busy = 0.0;
        let mut total = 0.0;
        let mut mem_total = None;
        let mut mem_avail = None;
        let mut psi = None;
        for h in self.window.series_of(Owner::Host(host)) {
            let s = window::lock(&h);
            if s.newest_ms().is_none_or(|t| t < since) {
                continue;
            }
            let label = s.key().label.as_deref().unwrap_or("");
            match s.key().metric {
                Metric::HostCpu => {
                    if let Some(r) = s.mean_since(since) {
                        total += r;
                        if label != "idle" && label != "iowait" {
                            busy += r;
                        }
                    }
                }
                Metric::HostMemory if label == "total" => mem_total = s.latest().map(|x| x.1),
                Metric::HostMemory if label == "available" => mem_avail = s.latest().map(|x| x.1),
                Metric::HostPressure if label == "cpu_some" => psi = s.latest().map(|x| x.1),
                _ => {}
            }
        }
        let mut load: Option<f64> = None;
        let mut take = |v: f64| load = Some(load.map_or(v, |l: f64| l.max(v)));
        if total > 0.0 {
            take(busy / total);
        }
        if let (Some(t), Some(a)) = (mem_total, mem_avail) {
            if t > 0.0 {
                take(1.0 - a / t);
            }
        }
        if let Some(p) = psi {
            take(p);
        }
        load.map(|l| l.clamp(0.0, 1.0))
    }

    /// Logs a refused batch (rate-limited: the peer controls how often).
    pub fn refused(&self, host: HostId, e: &IngestError) {
        warn_limited!(self.limiter, host = %host, error = %e, "metric batch refused");
    }
}

/// Puts a batch's points (at `ticks`, from its validation) into the window.
#[allow(clippy::too_many_arguments)]
fn fill(
    window: &Window,
    host: HostId,
    batch: &MetricBatch,
    ticks: &[u64],
    window_ms: u64,
    emit: bool,
    cache: &mut StreamCache,
    closed: &mut Vec<ClosedMinute>,
) -> Result<(), IngestError> {
    let same = cache.series == batch.series && cache.vms == batch.vms && cache.labels == batch.labels;
    if !same {
        cache.handles.clear();
        for s in &batch.series {
            let Some(metric) = Metric::from_id(s.metric) else {
                return Err(BatchError::Series {
                    index: 0,
                    why: "unknown metric",
                }
                .into());
            };
            let owner = match batch.scope(s) {
                Scope::Host => Owner::Host(host),
                Scope::Vm(v) => Owner::Vm(v),
            };
            let key = SeriesKey {
                owner,
                metric,
                label: batch.label(s).map(Arc::from),
            };
            cache.handles.push(window.handle(&key, host));
        }
        cache.series.clone_from(&batch.series);
        cache.vms.clone_from(&batch.vms);
        cache.labels.clone_from(&batch.labels);
    }
    let mut values = std::mem::take(&mut cache.values);
    for (i, h) in cache.handles.iter().enumerate() {
        batch.series_values(i, &mut values)?;
        let mut s = window::lock(h);
        s.host = host;
        for (t, v) in ticks.iter().zip(values.iter()) {
            s.push(*t, *v, window_ms, emit, closed);
        }
    }
    cache.values = values;
    Ok(())
}

async fn writer(
    db: Arc<MetricsDb>,
    mut committed: HashMap<HostId, SeqRecord>,
    mut rx: mpsc::Receiver<Job>,
    clock: Clock,
) {
    let mut jobs = Vec::new();
    loop {
        jobs.clear();
        if rx.recv_many(&mut jobs, MAX_GROUP).await == 0 {
            return;
        }
        let mut batches = Vec::new();
        let mut acks: HashMap<HostId, mpsc::Sender<ServerMessage>> = HashMap::new();
        let mut touched: HashMap<HostId, SeqRecord> = HashMap::new();
        let mut prune = None;
        let mut oldest_queued = None::<Instant>;
        for job in jobs.drain(..) {
            match job {
                Job::Store {
                    batch,
                    epoch,
                    dropped,
                    ack_to,
                    queued,
                } => {
                    let rec = committed.entry(batch.host).or_default();
                    if rec.epoch != epoch {
                        rec.epoch = epoch;
                        rec.high = 0;
                    }
                    if batch.seq > rec.high + 1 {
                        rec.gaps += batch.seq - rec.high - 1;
                    }
                    rec.high = rec.high.max(batch.seq);
                    rec.batches += 1;
                    rec.agent_dropped = dropped;
                    rec.last_ms = clock.unix_ms();
                    touched.insert(batch.host, *rec);
                    acks.insert(batch.host, ack_to);
                    oldest_queued = Some(oldest_queued.map_or(queued, |o: Instant| o.min(queued)));
                    batches.push(batch);
                }
                Job::AckOnly { host, ack_to } => {
                    if let Some(rec) = committed.get_mut(&host) {
                        rec.duplicates += 1;
                        touched.insert(host, *rec);
                    }
                    acks.insert(host, ack_to);
                }
                Job::Prune {
                    raw_before_ms,
                    rollup_before_minute,
                } => prune = Some((raw_before_ms, rollup_before_minute)),
            }
        }
        let started = clock.now();
        let db2 = db.clone();
        let result = tokio::task::spawn_blocking(move || {
            let r = if batches.is_empty() && touched.is_empty() {
                Ok(())
            } else {
                db2.store(&batches, &touched)
            };
            let p = prune.map(|(raw, roll)| db2.prune(raw, roll));
            (r, p)
        })
        .await;
        let (stored, pruned) = match result {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(error = %e, "metrics writer task failed; batches not acknowledged");
                continue;
            }
        };
        TELEMETRY
            .metrics_commit_duration
            .observe(clock.since(started).as_secs_f64());
        if let Some(q) = oldest_queued {
            TELEMETRY.metrics_ack_delay.observe(clock.since(q).as_secs_f64());
        }
        match pruned {
            Some(Ok((raw, days))) if raw > 0 || days > 0 => {
                tracing::debug!(raw_batches = raw, rollup_days = days, "metrics pruned")
            }
            Some(Err(e)) => tracing::warn!(error = %e, "pruning the metrics database failed"),
            _ => {}
        }
        if let Err(e) = stored {
            // Not acknowledged: the agents keep the batches and resend them
            // after their next reconnect.
            tracing::error!(error = %e, "storing metric batches failed; not acknowledged");
            continue;
        }
        for (host, ack_to) in acks {
            if let Some(rec) = committed.get(&host) {
                let ack = ServerMessage::MetricsAck(MetricsAck {
                    epoch: rec.epoch,
                    upto_seq: rec.high,
                });
                // Acknowledgements are cumulative: a full outbox loses
                // nothing that the next one does not repeat.
                let _ = ack_to.try_send(ack);
            }
        }
    }
}

/// What the janitor forgets and prunes at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PrunePlan {
    /// Series with no point since then leave the window.
    idle_before_ms: u64,
    /// Raw batches before then are deleted.
    raw_before_ms: u64,
    /// Rollups of minutes before this one are deleted.
    rollup_before_minute: u64,
}

impl PrunePlan {
    /// The plan at wall time `now_ms`: raw batches outlive the window by a
    /// minute, so a restart can rebuild the open minute of every series.
    fn at(now_ms: u64, cfg: &MetricsConfig) -> Self {
        let window_ms = cfg.raw_window.as_millis() as u64;
        Self {
            idle_before_ms: now_ms.saturating_sub(window_ms),
            raw_before_ms: now_ms.saturating_sub(window_ms + 60_000),
            rollup_before_minute: now_ms.saturating_sub(cfg.retention.as_millis() as u64) / 60_000,
        }
    }
}

async fn janitor(m: std::sync::Weak<Metrics>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(m) = m.upgrade() else { return };
        let plan = PrunePlan::at(m.clock.unix_ms(), &m.cfg);
        let gone = m.window.forget_idle(plan.idle_before_ms);
        if gone > 0 {
            tracing::debug!(series = gone, "idle series left the window");
        }
        let (series, points) = m.window.size();
        TELEMETRY.metrics_series.set(series as i64);
        TELEMETRY.metrics_points.set(points as i64);
        let _ = m
            .jobs
            .send(Job::Prune {
                raw_before_ms: plan.raw_before_ms,
                rollup_before_minute: plan.rollup_before_minute,
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use novacron_shared::metrics::{BatchBuilder, Metric, Scope};

    use super::*;

    fn batch(seq: u64, ts: u64, label: &str) -> MetricBatch {
        let mut b = BatchBuilder::new(1000);
        b.start_tick(ts);
        b.push(Scope::Host, Metric::HostCpu, Some(label), (ts * 1_000_000) as i64);
        b.push(Scope::Host, Metric::HostCpus, None, 2);
        b.end_tick();
        let mut batch = b.take().expect("batch");
        batch.epoch = 9;
        batch.seq = seq;
        batch
    }

    #[tokio::test]
    async fn batches_are_stored_once_in_order_and_acknowledged_after_commit() {
        let dir = tempfile::tempdir().expect("tmp");
        let (clock, _) = Clock::manual();
        let m = Metrics::open(
            &dir.path().join("m.redb"),
            MetricsConfig::default(),
            clock.clone(),
        )
        .expect("open");
        let host = HostId(5);
        let (tx, mut rx) = mpsc::channel(16);
        let mut cache = StreamCache::default();
        let now = clock.unix_ms() / 1000 * 1000;
        for seq in [1, 2, 2, 1, 3] {
            m.ingest(
                host,
                batch(seq, now - 10_000 + seq * 1000, "user"),
                &mut cache,
                &tx,
            )
            .await
            .expect("ingest");
        }
        // Seq 5 after 3: one missing.
        m.ingest(host, batch(5, now - 4_000, "user"), &mut cache, &tx)
            .await
            .expect("ingest");
        let mut last = 0;
        while last < 5 {
            match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
                Ok(Some(ServerMessage::MetricsAck(a))) => {
                    assert_eq!(a.epoch, 9);
                    assert!(a.upto_seq >= last, "acks never go back");
                    last = a.upto_seq;
                }
                other => panic!("no ack: {other:?}"),
            }
        }
        let st = m.stream_state(host).await.expect("state");
        assert_eq!((st.high, st.batches, st.duplicates, st.gaps), (5, 4, 2, 1));
        assert_eq!(m.db().raw_seqs(host).expect("seqs"), vec![1, 2, 3, 5]);
        // Hostile batches change nothing.
        let mut bad = batch(6, now - 3_000, "us er");
        assert!(matches!(
            m.ingest(host, bad.clone(), &mut cache, &tx).await,
            Err(IngestError::Label(_))
        ));
        bad.labels[0] = "user".into();
        bad.values.pop();
        assert!(matches!(
            m.ingest(host, bad, &mut cache, &tx).await,
            Err(IngestError::Batch(_))
        ));
        assert_eq!(m.stream_state(host).await.expect("state").high, 5);
        // Reopened: the stream state and the window come back from disk.
        drop(m);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let m = Metrics::open(&dir.path().join("m.redb"), MetricsConfig::default(), clock).expect("reopen");
        assert_eq!(m.stream_state(host).await.expect("state").high, 5);
        assert_eq!(m.window().series_of(Owner::Host(host)).len(), 2);
    }

    #[test]
    fn the_janitor_keeps_a_minute_of_raw_batches_past_the_window() {
        let cfg = MetricsConfig::default();
        let (clock, manual) = Clock::manual();
        let now = clock.unix_ms();
        let window = cfg.raw_window.as_millis() as u64;
        let p = PrunePlan::at(now, &cfg);
        assert_eq!(p.idle_before_ms, now - window);
        assert_eq!(p.raw_before_ms, now - window - 60_000);
        assert_eq!(
            p.rollup_before_minute,
            (now - cfg.retention.as_millis() as u64) / 60_000
        );
        // A wall clock set back moves the plan back with it (nothing newer
        // is pruned), and before the epoch nothing is.
        manual.jump_wall(Duration::from_secs(3600), false);
        assert_eq!(
            PrunePlan::at(clock.unix_ms(), &cfg).raw_before_ms,
            p.raw_before_ms - 3_600_000
        );
        assert_eq!(PrunePlan::at(0, &cfg).raw_before_ms, 0);
    }
}
