//! The metrics database: its own redb file (`metrics.redb` in the data
//! directory), so metric writes never wait on, or hold up, the control
//! plane's transactions.
//!
//! Tables:
//! - `raw`: (first tick ms, host, seq) → the batch as received (codec bytes),
//!   kept for the raw window; it is what the in-memory window is rebuilt
//!   from after a restart.
//! - `seqs`: host → [`SeqRecord`]: the epoch and highest sequence number
//!   stored, and the counters behind "no gap, no duplicate".
//! - `rollups_<day>`: one table per UTC day, (series key, minute) → (avg,
//!   min, max, count). Retention drops whole days.

use std::collections::HashMap;
use std::path::Path;

use novacron_shared::codec;
use novacron_shared::ids::HostId;
use novacron_shared::metrics::MetricBatch;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle};
use serde::{Deserialize, Serialize};

use super::window::{ClosedMinute, Rollup};

const RAW: TableDefinition<(u64, u128, u64), &[u8]> = TableDefinition::new("raw");
const SEQS: TableDefinition<u128, &[u8]> = TableDefinition::new("seqs");
const ROLLUP_PREFIX: &str = "rollups_";

/// What the server knows about one host's metric stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqRecord {
    /// The agent spool's epoch.
    pub epoch: u64,
    /// The highest sequence number stored in this epoch.
    pub high: u64,
    /// Batches stored (all epochs).
    pub batches: u64,
    /// Batches received again after they were stored (resends), not stored twice.
    pub duplicates: u64,
    /// Sequence numbers skipped (never received).
    pub gaps: u64,
    /// Batches the agent reports its spool dropped (this epoch).
    pub agent_dropped: u64,
    /// When the last batch was stored, ms since the epoch.
    pub last_ms: u64,
}

/// A batch to store.
#[derive(Debug)]
pub struct StoredBatch {
    /// From.
    pub host: HostId,
    /// The first tick's time.
    pub first_ts: u64,
    /// Its sequence number.
    pub seq: u64,
    /// The batch as codec bytes.
    pub bytes: Vec<u8>,
    /// Minutes that closed with it.
    pub closed: Vec<ClosedMinute>,
}

/// The metrics database failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// Opening failed.
    #[error("cannot open the metrics database at {path}")]
    Open {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: redb::DatabaseError,
    },
    /// redb failed.
    #[error("metrics database operation failed")]
    Db(#[from] redb::Error),
    /// A stored record does not decode.
    #[error("stored metrics record is corrupt")]
    Corrupt(#[from] codec::CodecError),
}

macro_rules! from_redb {
    ($($t:ty),*) => { $(impl From<$t> for DbError { fn from(e: $t) -> Self { DbError::Db(e.into()) } })* };
}
from_redb!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// The metrics database.
#[derive(Debug)]
pub struct MetricsDb {
    db: Database,
}

fn day_table(day: u64) -> String {
    format!("{ROLLUP_PREFIX}{day:08}")
}

/// The rollup key: series key then the minute, big-endian.
pub fn rollup_key(series: &[u8], minute: u64, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(series);
    out.extend_from_slice(&(minute as u32).to_be_bytes());
}

impl MetricsDb {
    /// Opens or creates the database.
    pub fn open(path: &Path) -> Result<MetricsDb, DbError> {
        let db = Database::create(path).map_err(|source| DbError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let tx = db.begin_write()?;
        tx.open_table(RAW)?;
        tx.open_table(SEQS)?;
        tx.commit()?;
        Ok(MetricsDb { db })
    }

    /// Every host's stream state.
    pub fn seqs(&self) -> Result<HashMap<HostId, SeqRecord>, DbError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SEQS)?;
        let mut out = HashMap::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.insert(HostId(k.value()), codec::decode(v.value())?);
        }
        Ok(out)
    }

    /// Every stored raw batch, oldest first tick first. Undecodable rows
    /// are skipped with a warning.
    pub fn raw_batches(&self, mut f: impl FnMut(HostId, MetricBatch)) -> Result<usize, DbError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(RAW)?;
        let mut n = 0;
        for row in t.iter()? {
            let (k, v) = row?;
            let (_, host, seq) = k.value();
            match codec::decode::<MetricBatch>(v.value()) {
                Ok(b) => {
                    n += 1;
                    f(HostId(host), b)
                }
                Err(e) => {
                    tracing::warn!(host = %HostId(host), seq, error = %e, "stored metric batch does not decode; skipped")
                }
            }
        }
        Ok(n)
    }

    /// Stores batches, their closed minutes and the hosts' new stream
    /// states in one durable transaction.
    pub fn store(&self, batches: &[StoredBatch], seqs: &HashMap<HostId, SeqRecord>) -> Result<(), DbError> {
        let tx = self.db.begin_write()?;
        {
            let mut raw = tx.open_table(RAW)?;
            let mut by_day: HashMap<u64, Vec<&ClosedMinute>> = HashMap::new();
            for b in batches {
                raw.insert((b.first_ts, b.host.0, b.seq), b.bytes.as_slice())?;
                for c in &b.closed {
                    by_day.entry(c.minute / 1440).or_default().push(c);
                }
            }
            let mut key = Vec::new();
            let mut series = Vec::new();
            for (day, closed) in by_day {
                let name = day_table(day);
                let def: TableDefinition<&[u8], (f64, f64, f64, u32)> = TableDefinition::new(&name);
                let mut t = tx.open_table(def)?;
                for c in closed {
                    series.clear();
                    c.key.storage_key(&mut series);
                    rollup_key(&series, c.minute, &mut key);
                    let r = c.rollup;
                    t.insert(key.as_slice(), (r.avg, r.min, r.max, r.count))?;
                }
            }
            let mut t = tx.open_table(SEQS)?;
            for (host, rec) in seqs {
                let bytes = codec::encode(rec)?;
                t.insert(host.0, bytes.as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The stored rollups of one series (its storage key) between two
    /// minutes, inclusive.
    pub fn rollups(
        &self,
        series: &[u8],
        from_minute: u64,
        to_minute: u64,
    ) -> Result<Vec<(u64, Rollup)>, DbError> {
        let tx = self.db.begin_read()?;
        let mut out = Vec::new();
        let (mut lo, mut hi) = (Vec::new(), Vec::new());
        for day in from_minute / 1440..=to_minute / 1440 {
            let name = day_table(day);
            let def: TableDefinition<&[u8], (f64, f64, f64, u32)> = TableDefinition::new(&name);
            let t = match tx.open_table(def) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            rollup_key(series, from_minute.max(day * 1440), &mut lo);
            rollup_key(series, to_minute.min(day * 1440 + 1439), &mut hi);
            for row in t.range(lo.as_slice()..=hi.as_slice())? {
                let (k, v) = row?;
                let k = k.value();
                let Some(m) = k
                    .get(k.len().saturating_sub(4)..)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                else {
                    continue;
                };
                let (avg, min, max, count) = v.value();
                out.push((u64::from(u32::from_be_bytes(m)), Rollup { avg, min, max, count }));
            }
        }
        Ok(out)
    }

    /// Every stored rollup of one owner's series between two minutes,
    /// inclusive: (series storage key, minute, rollup).
    pub fn owner_rollups(
        &self,
        owner: super::window::Owner,
        from_minute: u64,
        to_minute: u64,
    ) -> Result<Vec<(Vec<u8>, u64, Rollup)>, DbError> {
        let (tag, id) = match owner {
            super::window::Owner::Host(h) => (b'h', h.0),
            super::window::Owner::Vm(v) => (b'v', v.0),
        };
        let mut lo = vec![tag];
        lo.extend_from_slice(&id.to_be_bytes());
        let mut hi = lo.clone();
        hi.extend_from_slice(&[0xff; 8]);
        let tx = self.db.begin_read()?;
        let mut out = Vec::new();
        // A range of at most the retention; more days than that hold nothing.
        let first_day = from_minute / 1440;
        let last_day = (to_minute / 1440).min(first_day + 3660);
        for day in first_day..=last_day {
            let name = day_table(day);
            let def: TableDefinition<&[u8], (f64, f64, f64, u32)> = TableDefinition::new(&name);
            let t = match tx.open_table(def) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            for row in t.range(lo.as_slice()..hi.as_slice())? {
                let (k, v) = row?;
                let k = k.value();
                let Some((series, m)) = k.split_last_chunk::<4>() else {
                    continue;
                };
                let minute = u64::from(u32::from_be_bytes(*m));
                if minute < from_minute || minute > to_minute {
                    continue;
                }
                let (avg, min, max, count) = v.value();
                out.push((series.to_vec(), minute, Rollup { avg, min, max, count }));
            }
        }
        Ok(out)
    }

    /// Deletes raw batches whose first tick is before `raw_before_ms` and
    /// rollup days entirely before `rollup_before_minute`. Returns (raw rows,
    /// days) deleted.
    pub fn prune(&self, raw_before_ms: u64, rollup_before_minute: u64) -> Result<(u64, u64), DbError> {
        let tx = self.db.begin_write()?;
        let mut raw_deleted = 0u64;
        {
            let mut raw = tx.open_table(RAW)?;
            raw.retain_in(..(raw_before_ms, 0u128, 0u64), |_, _| {
                raw_deleted += 1;
                false
            })?;
        }
        let cutoff_day = rollup_before_minute / 1440;
        let mut days = 0;
        let names: Vec<String> = tx
            .list_tables()?
            .map(|h| h.name().to_string())
            .filter(|n| n.starts_with(ROLLUP_PREFIX))
            .collect();
        for name in names {
            let day: Option<u64> = name[ROLLUP_PREFIX.len()..].parse().ok();
            if day.is_some_and(|d| d < cutoff_day) {
                let def: TableDefinition<&[u8], (f64, f64, f64, u32)> = TableDefinition::new(&name);
                tx.delete_table(def)?;
                days += 1;
            }
        }
        tx.commit()?;
        Ok((raw_deleted, days))
    }

    /// Raw rows stored (for tests and status).
    pub fn raw_count(&self) -> Result<u64, DbError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(RAW)?.len()?)
    }

    /// The stored (host, seq) pairs of one host, in seq order (tests).
    pub fn raw_seqs(&self, host: HostId) -> Result<Vec<u64>, DbError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(RAW)?;
        let mut v = Vec::new();
        for row in t.iter()? {
            let (k, _) = row?;
            let (_, h, seq) = k.value();
            if h == host.0 {
                v.push(seq);
            }
        }
        v.sort_unstable();
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use novacron_shared::metrics::Metric;

    use super::super::window::{Owner, SeriesKey};
    use super::*;

    fn closed(minute: u64, avg: f64) -> ClosedMinute {
        ClosedMinute {
            key: SeriesKey {
                owner: Owner::Host(HostId(7)),
                metric: Metric::HostCpu,
                label: Some(Arc::from("user")),
            },
            minute,
            rollup: Rollup {
                avg,
                min: avg,
                max: avg,
                count: 60,
            },
        }
    }

    #[test]
    fn batches_rollups_and_seqs_round_trip_and_prune_by_day() {
        let dir = tempfile::tempdir().expect("tmp");
        let db = MetricsDb::open(&dir.path().join("m.redb")).expect("open");
        let host = HostId(7);
        let day = 20_000u64 * 1440;
        let batches: Vec<StoredBatch> = (1..=3)
            .map(|seq| StoredBatch {
                host,
                first_ts: seq * 1000,
                seq,
                bytes: vec![seq as u8],
                closed: vec![
                    closed(day + seq, seq as f64),
                    closed(day + 1440 + seq, 10.0 + seq as f64),
                ],
            })
            .collect();
        let mut seqs = HashMap::new();
        seqs.insert(
            host,
            SeqRecord {
                epoch: 5,
                high: 3,
                batches: 3,
                ..SeqRecord::default()
            },
        );
        db.store(&batches, &seqs).expect("store");
        assert_eq!(db.seqs().expect("seqs")[&host].high, 3);
        assert_eq!(db.raw_seqs(host).expect("raw"), vec![1, 2, 3]);
        let mut series = Vec::new();
        closed(0, 0.0).key.storage_key(&mut series);
        let r = db.rollups(&series, day, day + 1440 + 2).expect("rollups");
        let got: Vec<(u64, f64)> = r.iter().map(|(m, r)| (*m, r.avg)).collect();
        assert_eq!(
            got,
            vec![
                (day + 1, 1.0),
                (day + 2, 2.0),
                (day + 3, 3.0),
                (day + 1441, 11.0),
                (day + 1442, 12.0)
            ]
        );
        // Another series' key sorts apart.
        let mut other = Vec::new();
        SeriesKey {
            owner: Owner::Host(HostId(7)),
            metric: Metric::HostCpu,
            label: Some(Arc::from("use")),
        }
        .storage_key(&mut other);
        assert!(db.rollups(&other, day, day + 3000).expect("none").is_empty());
        // Pruning: raw before 2.5 s, and the first day.
        assert_eq!(db.prune(2_500, day + 1440).expect("prune"), (2, 1));
        assert_eq!(db.raw_seqs(host).expect("raw"), vec![3]);
        let r = db.rollups(&series, day, day + 3000).expect("rollups");
        assert_eq!(r.len(), 3);
        assert!(r.iter().all(|(m, _)| *m >= day + 1440));
    }
}
