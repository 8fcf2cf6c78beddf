//! The on-disk spool of metric batches the server has not acknowledged.
//!
//! The spool keeps opaque records — `(seq, bytes)`, the bytes an already
//! encoded batch — until the server acknowledges them, so they survive a lost
//! connection, a server restart and an agent restart, and are resent oldest
//! first. It is bounded in bytes: when full it drops the oldest batches and
//! counts them (the count is persisted and reported, never silent).
//!
//! Plain blocking `std::fs` code; the caller runs it on a blocking thread.
//!
//! Why one long file: about 950 lines are the spool and its crash-recovery
//! rules, which only make sense together; the rest are its tests (torn
//! tails, corruption, a model-based property test) beside what they check.
//!
//! # Layout of the directory
//!
//! - `seg-<first seq, 20 digits>.log`: segments, each a run of records with
//!   consecutive sequence numbers starting at the one in the name. A record is
//!   `[u32 LE payload length][u64 LE seq][u64 LE CRC-64/XZ of seq (LE) and
//!   payload][payload]`. A new segment starts once the active one would pass
//!   `max(max_bytes / 16, 64 KiB)`, so dropping the oldest frees a fraction.
//! - `meta`: a small text file with the epoch, the floor for the next sequence
//!   number, the acknowledged sequence number, the first sequence number still
//!   kept and the dropped count, with a checksum line. It is replaced
//!   atomically (temporary file, fsync, rename, fsync of the directory), and
//!   always written *before* segments are deleted, so a crash in between only
//!   leaves files that the next [`Spool::open`] deletes without counting them
//!   again.
//!
//! # Durability
//!
//! A record is written with one `write()` and no fsync: it survives a crash
//! of the agent, not a power loss. Append a batch *before* sending it, so a
//! record torn by a crash was never sent and its sequence number can be
//! used again. Acknowledgements and drops are fsynced (through `meta`), so the
//! next sequence number never falls to or below an acknowledged one.
//!
//! # Recovery
//!
//! [`Spool::open`] checks every record. A bad record ends its segment's
//! readable part and the segment is truncated there; the batches lost with the
//! rest of the segment (if any: a record torn at the tail by a crash was never
//! appended successfully) are added to the dropped count and logged. For the
//! last segment the lost sequence numbers are found by searching the rest of
//! the file for intact records, so they are never used again. (Batches lost
//! to a power loss without a bad record, a segment simply shorter than it
//! was, are not counted: the server sees the gap.)

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Bytes before a record's payload: length, sequence number, checksum.
const HEADER: u64 = 20;
/// The largest payload [`Spool::append`] accepts.
const MAX_PAYLOAD: u64 = 4 << 20;
/// The largest payload length a scan believes before giving up on a record.
const MAX_PAYLOAD_READ: u64 = MAX_PAYLOAD + (64 << 10);
/// The smallest size at which a segment is rolled.
const MIN_SEGMENT: u64 = 64 << 10;
/// Buffer size for reading segments.
const READ_BUF: usize = 64 << 10;
/// The meta file's first line.
const META_MAGIC: &str = "novacron-spool-meta 1";

/// A spool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// A file or directory could not be read or written.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// What was being done ("write", "read", ...).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The meta file is missing (while segments exist) or unreadable. The
    /// spool refuses to guess: a new epoch would make the server store the
    /// kept batches twice.
    #[error("spool meta file {} is unusable: {reason}", path.display())]
    Meta {
        /// The meta file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A record is larger than the spool allows.
    #[error("a metrics batch record of {size} bytes does not fit in the spool (at most {limit} bytes)")]
    RecordTooLarge {
        /// The record's size, header included.
        size: u64,
        /// The largest record the spool takes: its bound, at most 4 MiB plus the header.
        limit: u64,
    },
    /// An append did not use [`Spool::next_seq`].
    #[error("metrics batch appended with sequence number {got}, but the next one is {expected}")]
    WrongSeq {
        /// What [`Spool::next_seq`] says.
        expected: u64,
        /// What was given.
        got: u64,
    },
    /// A record checked at open no longer reads back (the file was changed
    /// behind the spool's back); reopening the spool recovers from it.
    #[error("spool segment {} is corrupt at offset {offset}: {reason}", path.display())]
    Corrupt {
        /// The segment.
        path: PathBuf,
        /// Where the bad record starts.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SpoolError + 'a {
    move |source| SpoolError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// A snapshot of the spool's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// The spool's epoch.
    pub epoch: u64,
    /// The sequence number the next append must use.
    pub next_seq: u64,
    /// Everything up to this sequence number was acknowledged (0: nothing).
    pub acked: u64,
    /// The oldest batch kept, if any.
    pub oldest: Option<u64>,
    /// Batches kept (neither acknowledged nor dropped).
    pub batches: u64,
    /// Bytes of the segment files on disk (acknowledged batches included
    /// until their whole segment is acknowledged); at most the bound.
    pub bytes: u64,
    /// Batches dropped so far in this epoch: by the bound, or lost to a
    /// corrupt segment.
    pub dropped: u64,
}

/// What the meta file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Meta {
    epoch: u64,
    /// `next_seq` is at least this (it survives when every segment is gone).
    next_seq_floor: u64,
    acked: u64,
    /// Every batch below this was acknowledged or dropped (> `acked`).
    kept_from: u64,
    dropped: u64,
}

/// The meta file's fields, in their order.
const META_KEYS: [&str; 5] = ["epoch", "next_seq_floor", "acked", "kept_from", "dropped"];

impl Meta {
    fn new() -> Meta {
        let mut epoch = 0;
        while epoch == 0 {
            epoch = rand::random::<u64>();
        }
        Meta {
            epoch,
            next_seq_floor: 1,
            acked: 0,
            kept_from: 1,
            dropped: 0,
        }
    }

    fn encode(&self) -> String {
        let values = [
            self.epoch,
            self.next_seq_floor,
            self.acked,
            self.kept_from,
            self.dropped,
        ];
        let mut text = format!("{META_MAGIC}\n");
        for (key, value) in META_KEYS.iter().zip(values) {
            text.push_str(&format!("{key} {value}\n"));
        }
        let sum = Crc64::of(text.as_bytes());
        text.push_str(&format!("crc64 {sum:016x}\n"));
        text
    }

    fn decode(text: &str) -> Result<Meta, String> {
        let body_len = text.trim_end_matches('\n').rfind('\n').map_or(0, |i| i + 1);
        let (body, sum_line) = text.split_at(body_len);
        let sum = sum_line
            .strip_suffix('\n')
            .and_then(|l| l.strip_prefix("crc64 "))
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            .ok_or("no checksum line at the end")?;
        if Crc64::of(body.as_bytes()) != sum {
            return Err("checksum mismatch".into());
        }
        let mut lines = body.lines();
        if lines.next() != Some(META_MAGIC) {
            return Err(format!("does not start with {META_MAGIC:?}"));
        }
        let mut values = [0u64; 5];
        for (key, value) in META_KEYS.iter().zip(values.iter_mut()) {
            let line = lines.next().ok_or_else(|| format!("no {key} line"))?;
            *value = line
                .strip_prefix(key)
                .and_then(|v| v.strip_prefix(' '))
                .and_then(|v| v.parse::<u64>().ok())
                // Counters far from overflowing; the epoch is any u64.
                .filter(|v| *key == "epoch" || *v < 1 << 62)
                .ok_or_else(|| format!("bad line {line:?} where {key} was expected"))?;
        }
        if let Some(line) = lines.next() {
            return Err(format!("unexpected line {line:?}"));
        }
        let [epoch, next_seq_floor, acked, kept_from, dropped] = values;
        let meta = Meta {
            epoch,
            next_seq_floor,
            acked,
            kept_from,
            dropped,
        };
        if epoch == 0 || kept_from <= acked || next_seq_floor < kept_from {
            return Err(format!("inconsistent values {meta:?}"));
        }
        Ok(meta)
    }
}

/// One segment file, as far as it is readable.
#[derive(Debug, Clone, Copy)]
struct Segment {
    /// The first record's sequence number (the one in the file name).
    first: u64,
    /// Records; they have sequence numbers `first..first + count`.
    count: u64,
    /// The file's length.
    bytes: u64,
}

impl Segment {
    /// One past the last record's sequence number.
    fn end(&self) -> u64 {
        self.first + self.count
    }

    /// Records with a sequence number `>= from`.
    fn count_from(&self, from: u64) -> u64 {
        self.end().saturating_sub(self.first.max(from))
    }
}

fn segment_name(first: u64) -> String {
    format!("seg-{first:020}.log")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|first| *first > 0)
}

/// A bounded, crash-safe on-disk spool of sequenced records.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    /// A segment is rolled before it would pass this size.
    roll_at: u64,
    meta: Meta,
    next_seq: u64,
    /// Oldest first; sequence ranges increase.
    segments: VecDeque<Segment>,
    /// The sum of the segments' bytes.
    total_bytes: u64,
    /// Open for appending to the last segment; `None`: the next append
    /// starts a new segment.
    active: Option<File>,
}

impl Spool {
    /// Opens (creating, mode 0700) the spool directory `dir`, keeping at most
    /// `max_bytes` of segments. A new spool gets a random nonzero epoch.
    ///
    /// Recovers from a crash: a torn or corrupt record ends its segment's
    /// readable part and the segment is truncated there (logged; batches lost
    /// after it count as dropped). Leftovers of an interrupted acknowledgement
    /// or drop are deleted. A missing meta file is an error unless there are
    /// no segments either (a new spool); so is a meta file that does not parse.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Spool, SpoolError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err("create", dir))?;
        let meta_path = dir.join("meta");
        let tmp_path = dir.join("meta.tmp");
        match fs::remove_file(&tmp_path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err("remove", &tmp_path)(e)),
            _ => {}
        }

        let mut firsts = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
            let entry = entry.map_err(io_err("list", dir))?;
            let name = entry.file_name();
            match name.to_str().and_then(parse_segment_name) {
                Some(first) => firsts.push(first),
                None if name == "meta" => {}
                None => {
                    tracing::warn!(file = %entry.path().display(), "ignoring a stray file in the metrics spool")
                }
            }
        }
        firsts.sort_unstable();

        let mut meta = match fs::read(&meta_path) {
            Ok(raw) => {
                let text = String::from_utf8(raw).map_err(|_| SpoolError::Meta {
                    path: meta_path.clone(),
                    reason: "not UTF-8 text".into(),
                })?;
                Meta::decode(&text).map_err(|reason| SpoolError::Meta {
                    path: meta_path.clone(),
                    reason,
                })?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !firsts.is_empty() {
                    return Err(SpoolError::Meta {
                        path: meta_path,
                        reason: format!("missing, but the directory holds {} segment files", firsts.len()),
                    });
                }
                let meta = Meta::new();
                write_meta(dir, &meta)?;
                tracing::info!(dir = %dir.display(), epoch = meta.epoch, "new metrics spool");
                meta
            }
            Err(e) => return Err(io_err("read", &meta_path)(e)),
        };

        // Check every segment still (partly) kept; plan the repairs.
        let mut segments = VecDeque::new();
        let mut dead = Vec::new();
        let mut truncate = Vec::new();
        let mut lost = 0;
        let mut floor = meta.next_seq_floor;
        for (i, &first) in firsts.iter().enumerate() {
            let path = dir.join(segment_name(first));
            let next_first = firsts.get(i + 1).copied();
            if next_first.is_some_and(|next| next <= meta.kept_from) {
                dead.push(first);
                continue;
            }
            let scan = scan_segment(&path, first, next_first)?;
            let mut seg = Segment {
                first,
                count: scan.count,
                bytes: scan.file_len,
            };
            let mut bad_at = None;
            if let Some((offset, reason)) = scan.bad {
                let readable_end = seg.end();
                // The batches from the bad record on: up to the next segment,
                // or in the last one, up to the last intact record behind the
                // bad one or to what the meta file says was appended.
                let lost_end = match next_first {
                    Some(next) => next,
                    None => find_last_seq(&path, offset, scan.file_len, readable_end)?
                        .map_or(readable_end, |last| last + 1)
                        .max(meta.next_seq_floor),
                };
                floor = floor.max(lost_end);
                let lost_here = lost_end.saturating_sub(readable_end.max(meta.kept_from));
                lost += lost_here;
                tracing::warn!(
                    segment = %path.display(),
                    offset,
                    reason,
                    discarded_bytes = scan.file_len - offset,
                    lost_batches = lost_here,
                    "metrics spool segment is corrupt; truncating it after its last good record"
                );
                bad_at = Some(offset);
                seg.bytes = offset;
            }
            if seg.count == 0 || seg.end() <= meta.kept_from {
                dead.push(first);
            } else {
                if let Some(offset) = bad_at {
                    truncate.push((first, offset));
                }
                segments.push_back(seg);
            }
        }
        if lost > 0 || floor != meta.next_seq_floor {
            meta.dropped += lost;
            meta.next_seq_floor = floor;
            write_meta(dir, &meta)?;
        }
        for (first, len) in truncate {
            let path = dir.join(segment_name(first));
            let file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io_err("open", &path))?;
            file.set_len(len).map_err(io_err("truncate", &path))?;
        }
        for first in dead {
            remove_segment(&dir.join(segment_name(first)))?;
        }

        let last_end = segments.back().map_or(0, Segment::end);
        let next_seq = meta.next_seq_floor.max(meta.kept_from).max(last_end);
        let active = match segments.back() {
            Some(seg) if seg.end() == next_seq => {
                let path = dir.join(segment_name(seg.first));
                Some(
                    OpenOptions::new()
                        .append(true)
                        .open(&path)
                        .map_err(io_err("open", &path))?,
                )
            }
            _ => None,
        };
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            roll_at: (max_bytes / 16).max(MIN_SEGMENT),
            meta,
            next_seq,
            total_bytes: segments.iter().map(|s| s.bytes).sum(),
            segments,
            active,
        };
        // The bound may have shrunk since the last run.
        spool.make_room(0)?;
        Ok(spool)
    }

    /// The epoch: sequence numbers restart at 1 only with a new epoch (a new
    /// spool directory).
    pub fn epoch(&self) -> u64 {
        self.meta.epoch
    }

    /// The sequence number the next append must use: 1 in a new spool, and
    /// never one used before in this epoch (also after everything was
    /// acknowledged, and across reopening).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Appends a record; `seq` must be [`Spool::next_seq`]. Written with one
    /// `write()` and no fsync: it survives a crash of the process, not a
    /// power loss.
    ///
    /// First makes room: while the spool plus the record would pass the
    /// bound, the oldest segment is deleted and its unacknowledged batches
    /// are added to the dropped count (persisted, and logged). If the active
    /// segment alone is too big, a new one is started first so the oldest
    /// data can go. So the segments never take more than the bound, and an
    /// error always means that nothing was appended.
    pub fn append(&mut self, seq: u64, bytes: &[u8]) -> Result<(), SpoolError> {
        if seq != self.next_seq {
            return Err(SpoolError::WrongSeq {
                expected: self.next_seq,
                got: seq,
            });
        }
        let size = HEADER + bytes.len() as u64;
        let limit = self.max_bytes.min(HEADER + MAX_PAYLOAD);
        if size > limit {
            return Err(SpoolError::RecordTooLarge { size, limit });
        }
        let too_big = |seg: &Segment| seg.bytes + size > self.roll_at || seg.bytes + size > self.max_bytes;
        if self.active.is_some() && self.segments.back().is_some_and(too_big) {
            self.active = None;
        }
        self.make_room(size)?;
        let mut file = match self.active.take() {
            Some(file) => file,
            None => self.start_segment(seq)?,
        };

        let mut record = Vec::with_capacity(HEADER as usize + bytes.len());
        record.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        record.extend_from_slice(&seq.to_le_bytes());
        record.extend_from_slice(&record_checksum(seq, bytes).to_le_bytes());
        record.extend_from_slice(bytes);

        let Some(seg) = self.segments.back_mut() else {
            // start_segment always leaves one; never happens.
            return Err(io_err("append to", &self.dir)(io::Error::other(
                "no active segment",
            )));
        };
        let path = self.dir.join(segment_name(seg.first));
        if let Err(e) = file.write_all(&record) {
            // Never leave a torn record where the next one would follow it.
            if seg.count == 0 {
                drop(file);
                let _ = fs::remove_file(&path);
                self.segments.pop_back();
            } else if file.set_len(seg.bytes).is_ok() {
                self.active = Some(file);
            }
            return Err(io_err("write", &path)(e));
        }
        self.active = Some(file);
        seg.count += 1;
        seg.bytes += size;
        self.total_bytes += size;
        self.next_seq += 1;
        Ok(())
    }

    /// The server stored everything of this epoch up to `upto` (the caller
    /// checks the acknowledgement's epoch): persists that (one fsync), then
    /// deletes the segments holding only acknowledged batches (the active one
    /// too; the next sequence number is kept in the meta file).
    /// A stale (lower) `upto` is a no-op; one at or past
    /// [`Spool::next_seq`] counts as `next_seq() - 1`. An error deleting a
    /// segment is returned, but the acknowledgement itself is kept and the
    /// deletion is retried later.
    pub fn ack(&mut self, upto: u64) -> Result<(), SpoolError> {
        let upto = upto.min(self.next_seq - 1);
        if upto <= self.meta.acked {
            return Ok(());
        }
        let meta = Meta {
            acked: upto,
            kept_from: self.meta.kept_from.max(upto + 1),
            next_seq_floor: self.next_seq,
            ..self.meta
        };
        write_meta(&self.dir, &meta)?;
        self.meta = meta;
        self.remove_dead()
    }

    /// Up to `max` records with a sequence number `>= from`, oldest first,
    /// read from disk. Starts at the oldest record kept if `from` is older
    /// (acknowledged or dropped). Empty when there is nothing.
    pub fn read_from(&self, from: u64, max: usize) -> Result<Vec<(u64, Vec<u8>)>, SpoolError> {
        let from = from.max(self.meta.kept_from);
        let mut out = Vec::new();
        for seg in self.segments.iter().filter(|s| s.end() > from) {
            if out.len() >= max {
                break;
            }
            self.read_segment(seg, from, max, &mut out)?;
        }
        Ok(out)
    }

    /// The spool's counters.
    pub fn stats(&self) -> Stats {
        let kept_from = self.meta.kept_from;
        Stats {
            epoch: self.meta.epoch,
            next_seq: self.next_seq,
            acked: self.meta.acked,
            oldest: self
                .segments
                .iter()
                .find(|s| s.end() > kept_from)
                .map(|s| s.first.max(kept_from)),
            batches: self.segments.iter().map(|s| s.count_from(kept_from)).sum(),
            bytes: self.total_bytes,
            dropped: self.meta.dropped,
        }
    }

    /// Reads `seg`'s records `>= from` into `out` until it holds `max`.
    fn read_segment(
        &self,
        seg: &Segment,
        from: u64,
        max: usize,
        out: &mut Vec<(u64, Vec<u8>)>,
    ) -> Result<(), SpoolError> {
        let path = self.dir.join(segment_name(seg.first));
        let file = File::open(&path).map_err(io_err("open", &path))?;
        let mut reader = BufReader::with_capacity(READ_BUF, file);
        let mut offset = 0;
        for seq in seg.first..seg.end() {
            if out.len() >= max {
                break;
            }
            let corrupt = |reason: String| SpoolError::Corrupt {
                path: path.clone(),
                offset,
                reason,
            };
            let mut header = [0u8; HEADER as usize];
            match reader.read_exact(&mut header) {
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(corrupt("the file is shorter than it was".into()));
                }
                r => r.map_err(io_err("read", &path))?,
            }
            let (len, got_seq, sum) = parse_header(&header);
            if got_seq != seq || len > MAX_PAYLOAD_READ {
                return Err(corrupt(format!(
                    "record header changed (seq {got_seq}, length {len})"
                )));
            }
            if seq < from {
                reader.seek_relative(len as i64).map_err(io_err("read", &path))?;
            } else {
                let mut payload = vec![0u8; len as usize];
                reader.read_exact(&mut payload).map_err(io_err("read", &path))?;
                if record_checksum(seq, &payload) != sum {
                    return Err(corrupt("checksum mismatch".into()));
                }
                out.push((seq, payload));
            }
            offset += HEADER + len;
        }
        Ok(())
    }

    /// Starts a new, empty segment whose first record will be `first`, and
    /// returns it open for appending.
    fn start_segment(&mut self, first: u64) -> Result<File, SpoolError> {
        let path = self.dir.join(segment_name(first));
        let create = || {
            OpenOptions::new()
                .append(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
        };
        let file = match create() {
            // A leftover of a failed append that could not be removed then.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                fs::remove_file(&path).map_err(io_err("remove", &path))?;
                create()
            }
            r => r,
        }
        .map_err(io_err("create", &path))?;
        self.segments.push_back(Segment {
            first,
            count: 0,
            bytes: 0,
        });
        Ok(file)
    }

    /// Drops the oldest inactive segments until `need` more bytes fit in the
    /// bound (or only the active segment is left).
    fn make_room(&mut self, need: u64) -> Result<(), SpoolError> {
        let inactive = self.segments.len() - usize::from(self.active.is_some());
        let mut remaining = self.total_bytes;
        let mut n = 0;
        while n < inactive && remaining + need > self.max_bytes {
            remaining -= self.segments[n].bytes;
            n += 1;
        }
        if n == 0 {
            return Ok(());
        }
        let victims = self.segments.range(..n);
        let lost: u64 = victims.clone().map(|s| s.count_from(self.meta.kept_from)).sum();
        let kept_from = victims.map(Segment::end).fold(self.meta.kept_from, u64::max);
        let meta = Meta {
            dropped: self.meta.dropped + lost,
            kept_from,
            next_seq_floor: self.next_seq,
            ..self.meta
        };
        write_meta(&self.dir, &meta)?;
        let first_lost = self.meta.kept_from.max(self.segments[0].first);
        self.meta = meta;
        if lost > 0 {
            tracing::warn!(
                dir = %self.dir.display(),
                max_bytes = self.max_bytes,
                batches = lost,
                seqs = %format_args!("{first_lost}..{kept_from}"),
                dropped_total = meta.dropped,
                "metrics spool is full (the server has not acknowledged them); dropped the oldest batches"
            );
        }
        self.remove_dead()
    }

    /// Deletes the oldest segments holding nothing kept.
    fn remove_dead(&mut self) -> Result<(), SpoolError> {
        while let Some(seg) = self.segments.front().copied() {
            if seg.end() > self.meta.kept_from {
                break;
            }
            remove_segment(&self.dir.join(segment_name(seg.first)))?;
            self.segments.pop_front();
            self.total_bytes -= seg.bytes;
            if self.segments.is_empty() {
                self.active = None;
            }
        }
        Ok(())
    }
}

fn remove_segment(path: &Path) -> Result<(), SpoolError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("remove", path)(e)),
        _ => Ok(()),
    }
}

/// Replaces the meta file atomically and durably.
fn write_meta(dir: &Path, meta: &Meta) -> Result<(), SpoolError> {
    let tmp = dir.join("meta.tmp");
    let path = dir.join("meta");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    file.write_all(meta.encode().as_bytes())
        .map_err(io_err("write", &tmp))?;
    file.sync_all().map_err(io_err("sync", &tmp))?;
    drop(file);
    fs::rename(&tmp, &path).map_err(io_err("rename", &path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync", dir))
}

fn parse_header(header: &[u8; HEADER as usize]) -> (u64, u64, u64) {
    let [l0, l1, l2, l3, s0, s1, s2, s3, s4, s5, s6, s7, c0, c1, c2, c3, c4, c5, c6, c7] = *header;
    (
        u64::from(u32::from_le_bytes([l0, l1, l2, l3])),
        u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
        u64::from_le_bytes([c0, c1, c2, c3, c4, c5, c6, c7]),
    )
}

fn record_checksum(seq: u64, payload: &[u8]) -> u64 {
    let mut crc = Crc64::new();
    crc.update(&seq.to_le_bytes());
    crc.update(payload);
    crc.finish()
}

/// What a scan of a segment found.
struct Scan {
    /// Good records from the start.
    count: u64,
    file_len: u64,
    /// Where the first bad record starts, and what is wrong with it.
    bad: Option<(u64, String)>,
}

/// Checks a segment's records from the start: consecutive sequence numbers
/// from `first`, below `limit` (the next segment's first), intact.
fn scan_segment(path: &Path, first: u64, limit: Option<u64>) -> Result<Scan, SpoolError> {
    let file = File::open(path).map_err(io_err("open", path))?;
    let file_len = file.metadata().map_err(io_err("stat", path))?.len();
    let mut reader = BufReader::with_capacity(READ_BUF, file);
    let mut scan = Scan {
        count: 0,
        file_len,
        bad: None,
    };
    let mut offset = 0;
    while offset < file_len {
        let rest = file_len - offset;
        let bad = |reason: String| {
            Ok(Scan {
                bad: Some((offset, reason)),
                ..scan
            })
        };
        if rest < HEADER {
            return bad(format!("torn record header ({rest} bytes)"));
        }
        let mut header = [0u8; HEADER as usize];
        reader.read_exact(&mut header).map_err(io_err("read", path))?;
        let (len, seq, sum) = parse_header(&header);
        let expected = first + scan.count;
        if len > MAX_PAYLOAD_READ {
            return bad(format!("implausible record length {len}"));
        }
        if HEADER + len > rest {
            return bad(format!("torn record ({} of {} bytes)", rest, HEADER + len));
        }
        if seq != expected {
            return bad(format!("sequence number {seq} where {expected} was expected"));
        }
        if limit.is_some_and(|l| seq >= l) {
            return bad(format!("sequence number {seq} overlaps the next segment"));
        }
        let mut crc = Crc64::new();
        crc.update(&seq.to_le_bytes());
        let mut left = len;
        while left > 0 {
            let buf = reader.fill_buf().map_err(io_err("read", path))?;
            if buf.is_empty() {
                return Err(io_err("read", path)(io::ErrorKind::UnexpectedEof.into()));
            }
            let take = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            crc.update(&buf[..take]);
            reader.consume(take);
            left -= take as u64;
        }
        if crc.finish() != sum {
            return bad("checksum mismatch".into());
        }
        scan.count += 1;
        offset += HEADER + len;
    }
    Ok(scan)
}

/// Searches `path` from `from` to `file_len` for intact records with
/// sequence numbers after `after` (those that can fit) and returns the
/// highest: the batches behind a corrupt record.
fn find_last_seq(path: &Path, from: u64, file_len: u64, after: u64) -> Result<Option<u64>, SpoolError> {
    const CHUNK: u64 = 256 << 10;
    let file = File::open(path).map_err(io_err("open", path))?;
    let read_at = |buf: &mut [u8], at: u64| file.read_exact_at(buf, at).map_err(io_err("read", path));
    let max_seq = after + (file_len - from) / HEADER;
    let mut best = None;
    let mut buf = Vec::new();
    let mut buf_start = 0;
    let mut pos = from;
    while pos + HEADER <= file_len {
        if pos < buf_start || pos + HEADER > buf_start + buf.len() as u64 {
            buf_start = pos;
            buf.resize(CHUNK.min(file_len - pos) as usize, 0);
            read_at(&mut buf, pos)?;
        }
        let at = (pos - buf_start) as usize;
        let mut header = [0u8; HEADER as usize];
        header.copy_from_slice(&buf[at..at + HEADER as usize]);
        let (len, seq, sum) = parse_header(&header);
        if seq > after && seq <= max_seq && len <= MAX_PAYLOAD_READ && pos + HEADER + len <= file_len {
            let mut crc = Crc64::new();
            crc.update(&seq.to_le_bytes());
            let mut payload = vec![0u8; CHUNK.min(len) as usize];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(CHUNK) as usize;
                read_at(&mut payload[..n], pos + HEADER + done)?;
                crc.update(&payload[..n]);
                done += n as u64;
            }
            if crc.finish() == sum {
                best = best.max(Some(seq));
                pos += HEADER + len;
                continue;
            }
        }
        pos += 1;
    }
    Ok(best)
}

/// CRC-64/XZ (ECMA-182 polynomial, reflected), slicing by 8.
struct Crc64(u64);

const CRC64_TABLES: [[u64; 256]; 8] = crc64_tables();

const fn crc64_tables() -> [[u64; 256]; 8] {
    const POLY: u64 = 0xC96C_5795_D787_0F42;
    let mut t = [[0u64; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u64;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ POLY } else { crc >> 1 };
            bit += 1;
        }
        t[0][i] = crc;
        i += 1;
    }
    let mut k = 1;
    while k < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[k - 1][i];
            t[k][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            i += 1;
        }
        k += 1;
    }
    t
}

impl Crc64 {
    fn new() -> Crc64 {
        Crc64(!0)
    }

    fn of(data: &[u8]) -> u64 {
        let mut crc = Crc64::new();
        crc.update(data);
        crc.finish()
    }

    fn update(&mut self, data: &[u8]) {
        let t = &CRC64_TABLES;
        let mut crc = self.0;
        let mut chunks = data.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            let v = crc ^ u64::from_le_bytes(word);
            crc = t[7][(v & 0xff) as usize]
                ^ t[6][((v >> 8) & 0xff) as usize]
                ^ t[5][((v >> 16) & 0xff) as usize]
                ^ t[4][((v >> 24) & 0xff) as usize]
                ^ t[3][((v >> 32) & 0xff) as usize]
                ^ t[2][((v >> 40) & 0xff) as usize]
                ^ t[1][((v >> 48) & 0xff) as usize]
                ^ t[0][(v >> 56) as usize];
        }
        for &b in chunks.remainder() {
            crc = t[0][((crc ^ u64::from(b)) & 0xff) as usize] ^ (crc >> 8);
        }
        self.0 = crc;
    }

    fn finish(&self) -> u64 {
        !self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!(
                "novacron-spool-{name}-{}-{:016x}",
                std::process::id(),
                rand::random::<u64>()
            ));
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// Deterministic bytes for `seq`, `len` long.
    fn payload(seq: u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (seq.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8)
            .collect()
    }

    fn append_n(spool: &mut Spool, n: u64, len: usize) {
        for _ in 0..n {
            let seq = spool.next_seq();
            spool.append(seq, &payload(seq, len)).expect("append");
        }
    }

    fn read_all(spool: &Spool) -> Vec<(u64, Vec<u8>)> {
        spool.read_from(1, usize::MAX).expect("read")
    }

    fn seqs(records: &[(u64, Vec<u8>)]) -> Vec<u64> {
        records.iter().map(|r| r.0).collect()
    }

    /// The segment files, oldest first.
    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(parse_segment_name)
                    .is_some()
            })
            .collect();
        files.sort();
        files
    }

    fn disk_bytes(dir: &Path) -> u64 {
        segment_files(dir)
            .iter()
            .map(|f| fs::metadata(f).expect("stat").len())
            .sum()
    }

    fn first_of(path: &Path) -> u64 {
        parse_segment_name(path.file_name().and_then(|n| n.to_str()).expect("name")).expect("segment name")
    }

    /// Checks the records are `range` with the bytes `payload` made.
    fn assert_records(records: &[(u64, Vec<u8>)], range: std::ops::RangeInclusive<u64>, len: usize) {
        assert_eq!(seqs(records), range.collect::<Vec<_>>());
        for (seq, bytes) in records {
            assert_eq!(bytes, &payload(*seq, len), "bytes of {seq}");
        }
    }

    fn flip_byte(path: &Path, at: u64) {
        let mut data = fs::read(path).expect("read segment");
        data[at as usize] ^= 0x40;
        fs::write(path, data).expect("write segment");
    }

    fn truncate_file(path: &Path, len: u64) {
        OpenOptions::new()
            .write(true)
            .open(path)
            .expect("open")
            .set_len(len)
            .expect("truncate");
    }

    #[test]
    fn crc64_matches_the_xz_check_value() {
        assert_eq!(Crc64::of(b"123456789"), 0x995D_C9BB_DF19_39FA);
        assert_eq!(Crc64::of(b""), 0);
        // Slicing by 8 agrees with the byte-at-a-time table, in pieces too.
        let data = payload(7, 1000);
        let mut bytewise = !0u64;
        for &b in &data {
            bytewise = CRC64_TABLES[0][((bytewise ^ u64::from(b)) & 0xff) as usize] ^ (bytewise >> 8);
        }
        assert_eq!(Crc64::of(&data), !bytewise);
        let mut pieces = Crc64::new();
        for piece in data.chunks(13) {
            pieces.update(piece);
        }
        assert_eq!(pieces.finish(), !bytewise);
    }

    #[test]
    fn meta_round_trips_and_rejects_damage() {
        let meta = Meta {
            epoch: 42,
            next_seq_floor: 9,
            acked: 5,
            kept_from: 7,
            dropped: 1,
        };
        let text = meta.encode();
        assert_eq!(Meta::decode(&text), Ok(meta));
        assert!(Meta::decode(&text.replace("dropped 1", "dropped 2"))
            .expect_err("digit")
            .contains("checksum"));
        assert!(Meta::decode("").is_err());
        assert!(Meta::decode(&text[..text.len() - 5]).is_err());
        let bad = Meta { kept_from: 5, ..meta }.encode();
        assert!(Meta::decode(&bad)
            .expect_err("kept_from <= acked")
            .contains("inconsistent"));
    }

    #[test]
    fn appends_read_back_in_order_and_in_pages() {
        let tmp = TempDir::new("order");
        // 16 MiB: segments of 1 MiB, so 600 records of 5 KiB span three.
        let mut spool = Spool::open(&tmp.0, 16 << 20).expect("open");
        assert_eq!(spool.next_seq(), 1);
        assert!(spool.read_from(1, 10).expect("read").is_empty());
        append_n(&mut spool, 600, 5000);
        assert_eq!(spool.next_seq(), 601);
        assert!(segment_files(&tmp.0).len() >= 3, "several segments");
        assert_records(&read_all(&spool), 1..=600, 5000);

        let mut paged = Vec::new();
        let mut from = 1;
        loop {
            let page = spool.read_from(from, 7).expect("page");
            if page.is_empty() {
                break;
            }
            assert!(page.len() <= 7);
            from = page[page.len() - 1].0 + 1;
            paged.extend(page);
        }
        assert_records(&paged, 1..=600, 5000);

        // Pages that start at, and cross, a segment boundary.
        let second = first_of(&segment_files(&tmp.0)[1]);
        assert_records(
            &spool.read_from(second, 5).expect("read"),
            second..=second + 4,
            5000,
        );
        assert_records(
            &spool.read_from(second - 2, 5).expect("read"),
            second - 2..=second + 2,
            5000,
        );
        assert_records(&spool.read_from(598, 10).expect("read"), 598..=600, 5000);
        assert_records(&spool.read_from(0, 2).expect("read"), 1..=2, 5000);
        assert!(spool.read_from(601, 10).expect("read").is_empty());
        assert!(spool.read_from(1, 0).expect("read").is_empty());

        let stats = spool.stats();
        assert_eq!(
            (stats.oldest, stats.batches, stats.dropped, stats.acked),
            (Some(1), 600, 0, 0)
        );
        assert_eq!(stats.bytes, 600 * (HEADER + 5000));
        drop(spool);
        let spool = Spool::open(&tmp.0, 16 << 20).expect("reopen");
        assert_eq!(spool.stats(), stats);
        assert_records(&read_all(&spool), 1..=600, 5000);
    }

    #[test]
    fn ack_deletes_segments_and_next_seq_survives_reopen() {
        let tmp = TempDir::new("ack");
        let mut spool = Spool::open(&tmp.0, 16 << 20).expect("open");
        let epoch = spool.epoch();
        append_n(&mut spool, 600, 5000);
        let files = segment_files(&tmp.0);
        let second = first_of(&files[1]);
        let third = first_of(&files[2]);
        assert!(
            second < 300 && third > 300,
            "three segments around 300: {files:?}"
        );

        spool.ack(300).expect("ack");
        let left = segment_files(&tmp.0);
        assert_eq!(
            left.len(),
            files.len() - 1,
            "only the fully acknowledged segment goes"
        );
        assert_eq!(first_of(&left[0]), second);
        assert_records(&read_all(&spool), 301..=600, 5000);
        let stats = spool.stats();
        assert_eq!((stats.acked, stats.oldest, stats.batches), (300, Some(301), 300));

        spool.ack(100).expect("stale ack");
        assert_eq!(spool.stats(), stats);

        drop(spool);
        let mut spool = Spool::open(&tmp.0, 16 << 20).expect("reopen");
        assert_eq!(spool.epoch(), epoch);
        assert_eq!(spool.stats(), stats);
        assert_records(&read_all(&spool), 301..=600, 5000);

        // Everything, with an upto past next_seq.
        spool.ack(10_000).expect("ack all");
        assert!(segment_files(&tmp.0).is_empty());
        let stats = spool.stats();
        assert_eq!(
            (
                stats.acked,
                stats.next_seq,
                stats.oldest,
                stats.batches,
                stats.bytes
            ),
            (600, 601, None, 0, 0)
        );
        drop(spool);
        let mut spool = Spool::open(&tmp.0, 16 << 20).expect("reopen empty");
        assert_eq!(spool.epoch(), epoch);
        assert_eq!(spool.stats(), stats);
        assert!(read_all(&spool).is_empty());
        assert!(matches!(
            spool.append(1, b"x"),
            Err(SpoolError::WrongSeq {
                expected: 601,
                got: 1
            })
        ));
        append_n(&mut spool, 3, 10);
        drop(spool);
        let spool = Spool::open(&tmp.0, 16 << 20).expect("reopen");
        assert_eq!(spool.next_seq(), 604);
        assert_records(&read_all(&spool), 601..=603, 10);
    }

    #[test]
    fn a_full_spool_drops_the_oldest_and_counts_them() {
        let tmp = TempDir::new("bound");
        let max = 1 << 20; // segments of 64 KiB
        let mut spool = Spool::open(&tmp.0, max).expect("open");
        for round in 1..=20 {
            append_n(&mut spool, 50, 3000);
            let stats = spool.stats();
            assert!(stats.bytes <= max, "{} bytes", stats.bytes);
            let kept = read_all(&spool);
            let first = kept[0].0;
            assert_records(&kept, first..=round * 50, 3000);
            assert_eq!(stats.dropped, first - 1, "every record not readable was counted");
            assert_eq!(
                (stats.oldest, stats.batches),
                (Some(first), round * 50 - first + 1)
            );
            if stats.dropped > 0 {
                // Dropping is by segment, not everything at once.
                assert!(stats.bytes > max - 2 * MIN_SEGMENT, "{} bytes kept", stats.bytes);
            }
        }
        let stats = spool.stats();
        assert!(stats.dropped > 600);

        drop(spool);
        let mut spool = Spool::open(&tmp.0, max).expect("reopen");
        assert_eq!(spool.stats(), stats);
        let first = stats.oldest.expect("oldest");
        assert_records(&read_all(&spool), first..=1000, 3000);
        assert_eq!(spool.read_from(1, 1).expect("read")[0].0, first);

        // Acknowledged batches are not counted when they are dropped later.
        spool.ack(first + 99).expect("ack");
        append_n(&mut spool, 400, 3000);
        let after = spool.stats();
        let kept_first = after.oldest.expect("oldest");
        assert_records(&read_all(&spool), kept_first..=1400, 3000);
        assert_eq!(after.dropped, stats.dropped + (kept_first - (first + 100)));
    }

    #[test]
    fn a_bound_smaller_than_a_segment_keeps_the_newest() {
        let tmp = TempDir::new("tiny");
        let mut spool = Spool::open(&tmp.0, 4096).expect("open");
        for n in 1..=40 {
            append_n(&mut spool, 1, 1000);
            let stats = spool.stats();
            assert!(stats.bytes <= 4096, "{} bytes", stats.bytes);
            let kept = read_all(&spool);
            assert_eq!(kept.last().map(|r| r.0), Some(n), "the newest is kept");
            assert_records(&kept, kept[0].0..=n, 1000);
            assert_eq!(stats.dropped, kept[0].0 - 1);
        }
        assert!(spool.stats().dropped > 30);
    }

    #[test]
    fn a_torn_or_damaged_last_record_is_truncated_away() {
        /// Damages the last 100-byte record, given its offset.
        type Damage = fn(&Path, u64);
        let damage: [(&str, Damage); 8] = [
            ("torn header", |p, at| truncate_file(p, at + 7)),
            ("header only", |p, at| truncate_file(p, at + HEADER)),
            ("torn payload", |p, at| truncate_file(p, at + HEADER + 50)),
            ("one byte short", |p, at| truncate_file(p, at + HEADER + 99)),
            ("flipped payload", |p, at| flip_byte(p, at + HEADER + 42)),
            ("flipped seq", |p, at| flip_byte(p, at + 4)),
            ("flipped length", |p, at| flip_byte(p, at + 1)),
            ("zeroed tail", |p, at| {
                truncate_file(p, at);
                truncate_file(p, at + 4096);
            }),
        ];
        for (what, damage) in damage {
            let tmp = TempDir::new("torn");
            let mut spool = Spool::open(&tmp.0, 1 << 20).expect("open");
            append_n(&mut spool, 50, 100);
            drop(spool);
            let files = segment_files(&tmp.0);
            assert_eq!(files.len(), 1);
            damage(&files[0], 49 * (HEADER + 100));

            let mut spool = Spool::open(&tmp.0, 1 << 20).expect("reopen");
            assert_records(&read_all(&spool), 1..=49, 100);
            assert_eq!(spool.next_seq(), 50, "{what}");
            assert_eq!(spool.stats().dropped, 0, "{what}");
            assert_eq!(
                fs::metadata(&files[0]).expect("stat").len(),
                49 * (HEADER + 100),
                "{what}"
            );
            spool
                .append(50, &payload(50, 100))
                .expect("append after recovery");
            append_n(&mut spool, 1, 100);
            drop(spool);
            let spool = Spool::open(&tmp.0, 1 << 20).expect("reopen again");
            assert_records(&read_all(&spool), 1..=51, 100);
            assert_eq!(spool.stats().dropped, 0, "{what}");
        }
    }

    #[test]
    fn a_torn_first_record_leaves_an_empty_spool() {
        let tmp = TempDir::new("torn-first");
        let mut spool = Spool::open(&tmp.0, 1 << 20).expect("open");
        append_n(&mut spool, 1, 100);
        drop(spool);
        let files = segment_files(&tmp.0);
        truncate_file(&files[0], 10);
        let mut spool = Spool::open(&tmp.0, 1 << 20).expect("reopen");
        assert!(segment_files(&tmp.0).is_empty());
        assert_eq!((spool.next_seq(), spool.stats().bytes), (1, 0));
        append_n(&mut spool, 2, 100);
        drop(spool);
        assert_records(
            &read_all(&Spool::open(&tmp.0, 1 << 20).expect("reopen")),
            1..=2,
            100,
        );
    }

    #[test]
    fn corruption_inside_the_last_segment_never_reuses_the_lost_seqs() {
        let tmp = TempDir::new("mid-last");
        let mut spool = Spool::open(&tmp.0, 1 << 20).expect("open");
        append_n(&mut spool, 50, 100);
        drop(spool);
        let files = segment_files(&tmp.0);
        flip_byte(&files[0], 19 * (HEADER + 100) + HEADER + 3); // record 20's payload

        let mut spool = Spool::open(&tmp.0, 1 << 20).expect("reopen");
        assert_records(&read_all(&spool), 1..=19, 100);
        let stats = spool.stats();
        assert_eq!((stats.next_seq, stats.dropped, stats.batches), (51, 31, 19));
        append_n(&mut spool, 2, 100);
        drop(spool);
        let spool = Spool::open(&tmp.0, 1 << 20).expect("reopen again");
        let records = read_all(&spool);
        assert_eq!(seqs(&records), (1..=19).chain(51..=52).collect::<Vec<_>>());
        assert_eq!(records[20].1, payload(52, 100));
        assert_eq!(spool.stats().dropped, 31, "counted once");
    }

    #[test]
    fn corruption_in_an_older_segment_ends_its_readable_part() {
        let tmp = TempDir::new("mid-old");
        let mut spool = Spool::open(&tmp.0, 16 << 20).expect("open");
        append_n(&mut spool, 600, 5000);
        drop(spool);
        let files = segment_files(&tmp.0);
        let second = first_of(&files[1]);
        flip_byte(&files[0], 9 * (HEADER + 5000) + HEADER + 100); // record 10

        let mut spool = Spool::open(&tmp.0, 16 << 20).expect("reopen");
        let records = read_all(&spool);
        assert_eq!(seqs(&records), (1..=9).chain(second..=600).collect::<Vec<_>>());
        assert_eq!(records[9].1, payload(second, 5000));
        let stats = spool.stats();
        assert_eq!((stats.next_seq, stats.dropped), (601, second - 10));
        assert_eq!(stats.bytes, disk_bytes(&tmp.0));
        append_n(&mut spool, 1, 5000);
        drop(spool);
        let spool = Spool::open(&tmp.0, 16 << 20).expect("reopen again");
        assert_eq!(spool.stats().dropped, second - 10, "counted once");
        assert_eq!(read_all(&spool).len(), 9 + (601 - second + 1) as usize);
    }

    #[test]
    fn leftovers_of_an_interrupted_ack_or_drop_are_removed_not_recounted() {
        let tmp = TempDir::new("leftover");
        let max = 1 << 20;
        let mut spool = Spool::open(&tmp.0, max).expect("open");
        append_n(&mut spool, 300, 3000); // ~900 KB: nothing dropped yet
        assert_eq!(spool.stats().dropped, 0);
        let files = segment_files(&tmp.0);
        let saved: Vec<(PathBuf, Vec<u8>)> = files
            .iter()
            .take(2)
            .map(|f| (f.clone(), fs::read(f).expect("read")))
            .collect();
        let second = first_of(&files[1]);

        // The first segment fully acknowledged; its file comes back as if
        // the agent had crashed before deleting it.
        spool.ack(second - 1).expect("ack");
        // Then the second is dropped.
        append_n(&mut spool, 100, 3000);
        let stats = spool.stats();
        assert!(stats.dropped > 0 && stats.oldest > Some(second), "{stats:?}");
        let kept = read_all(&spool);
        drop(spool);
        for (path, data) in &saved {
            fs::write(path, data).expect("restore");
        }
        let spool = Spool::open(&tmp.0, max).expect("reopen");
        assert_eq!(spool.stats(), stats);
        assert_eq!(read_all(&spool), kept);
        for (path, _) in &saved {
            assert!(!path.exists(), "{} removed", path.display());
        }
    }

    #[test]
    fn misuse_and_damage_are_clear_errors() {
        let tmp = TempDir::new("errors");
        let mut spool = Spool::open(&tmp.0, 64 << 10).expect("open");
        append_n(&mut spool, 2, 10);
        for wrong in [0, 1, 2, 4, u64::MAX] {
            let err = spool.append(wrong, b"x").expect_err("wrong seq");
            assert!(
                matches!(err, SpoolError::WrongSeq { expected: 3, got } if got == wrong),
                "{err}"
            );
        }
        let err = spool
            .append(3, &vec![0; 64 << 10])
            .expect_err("larger than the bound");
        assert!(err.to_string().contains("does not fit"), "{err}");
        assert_eq!(spool.next_seq(), 3, "nothing appended");
        drop(spool);
        let big_tmp = TempDir::new("errors-big");
        let mut big = Spool::open(&big_tmp.0, 1 << 30).expect("open");
        let err = big
            .append(1, &vec![0; (MAX_PAYLOAD + 1) as usize])
            .expect_err("over 4 MiB");
        assert!(matches!(err, SpoolError::RecordTooLarge { limit, .. } if limit == HEADER + MAX_PAYLOAD));
        big.append(1, &vec![1; MAX_PAYLOAD as usize]).expect("4 MiB fits");
        drop(big);
        let big = Spool::open(&big_tmp.0, 1 << 30).expect("reopen");
        assert_eq!(
            big.read_from(1, 1).expect("read")[0].1.len(),
            MAX_PAYLOAD as usize
        );

        let meta = tmp.0.join("meta");
        let good = fs::read(&meta).expect("meta");
        fs::write(&meta, "garbage\n").expect("write");
        let err = Spool::open(&tmp.0, 64 << 10).expect_err("garbage meta");
        assert!(matches!(err, SpoolError::Meta { .. }));
        assert!(err.to_string().contains(&meta.display().to_string()), "{err}");
        fs::write(
            &meta,
            String::from_utf8(good.clone())
                .expect("utf8")
                .replace("acked 0", "acked 1"),
        )
        .expect("write");
        assert!(
            matches!(Spool::open(&tmp.0, 64 << 10), Err(SpoolError::Meta { .. })),
            "checksum"
        );
        fs::remove_file(&meta).expect("remove");
        let err = Spool::open(&tmp.0, 64 << 10).expect_err("missing meta with segments");
        assert!(err.to_string().contains("missing"), "{err}");
        fs::write(&meta, &good).expect("restore");
        assert_eq!(Spool::open(&tmp.0, 64 << 10).expect("reopen").next_seq(), 3);

        let file = tmp.0.join("meta");
        let err = Spool::open(&file.join("spool"), 1 << 20).expect_err("under a file");
        assert!(
            err.to_string()
                .starts_with(&format!("cannot create {}", file.join("spool").display())),
            "{err}"
        );
    }

    #[test]
    fn new_spools_get_different_epochs() {
        let a = TempDir::new("epoch-a");
        let b = TempDir::new("epoch-b");
        let one = Spool::open(&a.0.join("nested"), 1 << 20).expect("open a");
        let two = Spool::open(&b.0, 1 << 20).expect("open b");
        assert_ne!(one.epoch(), 0);
        assert_ne!(two.epoch(), 0);
        assert_ne!(one.epoch(), two.epoch());
        assert_eq!((one.next_seq(), two.next_seq()), (1, 1));
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(a.0.join("nested"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        // Reopening keeps it; wiping the directory starts a new epoch.
        let epoch = one.epoch();
        drop(one);
        assert_eq!(
            Spool::open(&a.0.join("nested"), 1 << 20).expect("reopen").epoch(),
            epoch
        );
        fs::remove_dir_all(&a.0).expect("wipe");
        assert_ne!(
            Spool::open(&a.0.join("nested"), 1 << 20).expect("new").epoch(),
            epoch
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(usize),
        Ack(u64),
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0usize..6000).prop_map(Op::Append),
            1 => (0u64..40).prop_map(Op::Ack),
            1 => Just(Op::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// Against a model: what is kept is exactly what was appended and
        /// neither acknowledged nor counted as dropped, the bound holds, the
        /// newest batch is never dropped, and reopening changes nothing.
        #[test]
        fn prop_model(max in prop_oneof![Just(8u64 << 10), Just(200 << 10), Just(2 << 20)],
                      ops in proptest::collection::vec(op(), 1..80)) {
            let tmp = TempDir::new("model");
            let mut spool = Spool::open(&tmp.0, max).expect("open");
            let mut model: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
            for op in ops {
                let before = spool.stats();
                match op {
                    Op::Append(len) => {
                        let seq = spool.next_seq();
                        let bytes = payload(seq, len);
                        spool.append(seq, &bytes).expect("append");
                        model.push_back((seq, bytes));
                        let after = spool.stats();
                        let mut gone = 0;
                        while model.front().is_some_and(|r| Some(r.0) < after.oldest) {
                            model.pop_front();
                            gone += 1;
                        }
                        prop_assert_eq!(model.back().map(|r| r.0), Some(seq), "the newest is kept");
                        prop_assert_eq!(after.dropped, before.dropped + gone);
                    }
                    Op::Ack(back) => {
                        let upto = before.next_seq.saturating_sub(back);
                        spool.ack(upto).expect("ack");
                        while model.front().is_some_and(|r| r.0 <= upto) {
                            model.pop_front();
                        }
                        prop_assert_eq!(spool.stats().dropped, before.dropped);
                    }
                    Op::Reopen => {
                        drop(spool);
                        spool = Spool::open(&tmp.0, max).expect("reopen");
                        prop_assert_eq!(spool.stats(), before);
                    }
                }
                let stats = spool.stats();
                prop_assert!(stats.bytes <= max);
                prop_assert_eq!(stats.bytes, disk_bytes(&tmp.0));
                prop_assert_eq!(stats.batches, model.len() as u64);
                prop_assert_eq!(stats.oldest, model.front().map(|r| r.0));
                prop_assert!(read_all(&spool).iter().eq(model.iter()), "kept records differ from the model");
            }
        }
    }
}
