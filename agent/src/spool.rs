//! The on-disk spool of metric batches the server has not acknowledged.
//!
//! The spool keeps opaque records — `(seq, bytes)`, the bytes an already
//! encoded batch — until the server acknowledges them, so they survive a lost
//! connection, a server restart and an agent restart, and are resent oldest
//! first. It is bounded in bytes: when full it drops the oldest batches and
//! counts them (the count is persisted and reported, never silent).
//!
//! Plain blocking `std::fs` code; the caller runs it on a blocking thread.
//! The meta file lives in `meta`, the checksum in `crc64`, the tests in
//! `spool/tests.rs`.
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

mod crc64;
mod meta;

use crc64::Crc64;
#[cfg(test)]
use crc64::CRC64_TABLES;
use meta::{write_meta, Meta};

#[cfg(test)]
mod tests;
