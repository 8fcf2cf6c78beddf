//! Tests of `spool` (in a file of their own so the module reads as one piece).

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
