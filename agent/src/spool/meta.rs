//! The spool's meta file: epoch, the floor for the next sequence number,
//! the acknowledged sequence number, the first one still kept and the
//! dropped count, as checksummed text, replaced atomically.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::crc64::Crc64;
use super::{io_err, SpoolError};

/// The meta file's first line.
pub(super) const META_MAGIC: &str = "novacron-spool-meta 1";

/// What the meta file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Meta {
    pub(super) epoch: u64,
    /// `next_seq` is at least this (it survives when every segment is gone).
    pub(super) next_seq_floor: u64,
    pub(super) acked: u64,
    /// Every batch below this was acknowledged or dropped (> `acked`).
    pub(super) kept_from: u64,
    pub(super) dropped: u64,
}

/// The meta file's fields, in their order.
const META_KEYS: [&str; 5] = ["epoch", "next_seq_floor", "acked", "kept_from", "dropped"];

impl Meta {
    pub(super) fn new() -> Meta {
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

    pub(super) fn encode(&self) -> String {
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

    pub(super) fn decode(text: &str) -> Result<Meta, String> {
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

/// Replaces the meta file atomically and durably.
pub(super) fn write_meta(dir: &Path, meta: &Meta) -> Result<(), SpoolError> {
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
