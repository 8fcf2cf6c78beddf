//! Sizes, times, labels and URL pieces: parsing what people type and
//! formatting what they read.

const MIB_PER: [(&str, u64); 3] = [("m", 1), ("g", 1 << 10), ("t", 1 << 20)];

/// Parses a size into MiB: `512`, `512M`, `512MiB`, `2G`, `1.5GiB`, `1T`.
/// Units are binary whatever their spelling (`G` = `GB` = `GiB` = 1024 MiB);
/// the result must be a whole number of MiB.
pub fn parse_mib(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .unwrap_or(&unit);
    let per = if unit.is_empty() {
        1
    } else {
        MIB_PER
            .iter()
            .find(|(u, _)| *u == unit)
            .map(|(_, p)| *p)
            .ok_or_else(|| format!("{s:?}: unknown unit (use MiB, GiB or TiB)"))?
    };
    let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
    if whole.is_empty() && frac.is_empty() {
        return Err(format!("{s:?}: not a size (e.g. 512MiB, 2GiB)"));
    }
    let bad = || format!("{s:?}: not a size (e.g. 512MiB, 2GiB)");
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| bad())?
    };
    if frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let scale = 10u64.pow(u32::try_from(frac.len()).map_err(|_| bad())?);
    let frac_n: u64 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| bad())?
    };
    let big = || format!("{s:?}: too large");
    let frac_mib = frac_n.checked_mul(per).ok_or_else(big)?;
    if frac_mib % scale != 0 {
        return Err(format!("{s:?}: not a whole number of MiB"));
    }
    whole
        .checked_mul(per)
        .and_then(|w| w.checked_add(frac_mib / scale))
        .ok_or_else(big)
}

/// One `--disk` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskArg {
    /// The disk's name, when given.
    pub name: Option<String>,
    /// Its size, MiB.
    pub size_mib: u64,
}

/// Parses `SIZE` or `NAME=SIZE`.
pub fn parse_disk(s: &str) -> Result<DiskArg, String> {
    match s.split_once('=') {
        Some((name, size)) if !name.is_empty() => Ok(DiskArg {
            name: Some(name.to_string()),
            size_mib: parse_mib(size)?,
        }),
        Some(_) => Err(format!("{s:?}: the disk name before `=` is empty")),
        None => Ok(DiskArg {
            name: None,
            size_mib: parse_mib(s)?,
        }),
    }
}

/// Parses `key=value`.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?}: expected key=value")),
    }
}

/// A size in MiB for people: `512 MiB`, `2 GiB`, `1.5 TiB`.
pub fn human_mib(mib: u64) -> String {
    let (value, unit) = if mib >= 1 << 20 {
        (mib as f64 / f64::from(1u32 << 20), "TiB")
    } else if mib >= 1 << 10 {
        (mib as f64 / 1024.0, "GiB")
    } else {
        return format!("{mib} MiB");
    };
    let s = format!("{value:.1}");
    format!("{} {unit}", s.strip_suffix(".0").unwrap_or(&s))
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    novacron_shared::clock::Clock::system().unix_ms()
}

/// `ms` relative to `now`: `12s ago`, `5m ago`, `3h ago`, `2d ago`, `in 29d`.
pub fn ago(ms: u64, now: u64) -> String {
    if ms == 0 {
        return "never".into();
    }
    let (secs, future) = if ms > now {
        ((ms - now) / 1000, true)
    } else {
        ((now - ms) / 1000, false)
    };
    let span = match secs {
        0 if !future => return "just now".into(),
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    };
    if future {
        format!("in {span}")
    } else {
        format!("{span} ago")
    }
}

/// `ms` since the epoch as an ISO 8601 UTC time, to the second.
pub fn iso(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(i64::try_from(days).unwrap_or(i64::MAX / 2));
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Both: `2024-05-01T12:00:00Z (5m ago)`.
pub fn when(ms: u64, now: u64) -> String {
    if ms == 0 {
        return "never".into();
    }
    format!("{} ({})", iso(ms), ago(ms, now))
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, u32::try_from(m).unwrap_or(1), u32::try_from(d).unwrap_or(1))
}

/// Percent-encodes a path segment or query value (everything but
/// `A-Z a-z 0-9 - . _ ~`).
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A query string from the pairs that are present: `?a=1&b=x`, or empty.
pub fn query(pairs: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", enc(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_units() {
        for (s, mib) in [
            ("512", 512),
            ("512M", 512),
            ("512MiB", 512),
            ("512 mb", 512),
            ("1G", 1024),
            ("1GiB", 1024),
            ("1.5GiB", 1536),
            ("0.5g", 512),
            ("2T", 2 << 20),
            ("1.25TiB", 1_310_720),
        ] {
            assert_eq!(parse_mib(s), Ok(mib), "{s}");
        }
        for bad in [
            "",
            "G",
            "1.5",
            "1.0001G",
            "1K",
            "ten",
            "1..2G",
            "-1G",
            "99999999999999999T",
        ] {
            assert!(parse_mib(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_mib("1.5").unwrap_err(),
            "\"1.5\": not a whole number of MiB"
        );
    }

    #[test]
    fn disks_and_labels() {
        assert_eq!(
            parse_disk("data=10G"),
            Ok(DiskArg {
                name: Some("data".into()),
                size_mib: 10240
            })
        );
        assert_eq!(
            parse_disk("64"),
            Ok(DiskArg {
                name: None,
                size_mib: 64
            })
        );
        assert!(parse_disk("=1G").is_err());
        assert_eq!(parse_label("tier=web"), Ok(("tier".into(), "web".into())));
        assert_eq!(parse_label("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(parse_label("tier").is_err());
    }

    #[test]
    fn sizes_and_times_for_people() {
        assert_eq!(human_mib(64), "64 MiB");
        assert_eq!(human_mib(1024), "1 GiB");
        assert_eq!(human_mib(1536), "1.5 GiB");
        assert_eq!(human_mib(3 << 20), "3 TiB");
        let now = 1_700_000_000_000;
        assert_eq!(ago(now, now), "just now");
        assert_eq!(ago(now - 12_000, now), "12s ago");
        assert_eq!(ago(now - 300_000, now), "5m ago");
        assert_eq!(ago(now - 3 * 3_600_000, now), "3h ago");
        assert_eq!(ago(now + 29 * 86_400_000, now), "in 29d");
        assert_eq!(ago(0, now), "never");
        assert_eq!(iso(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(iso(1_700_000_000_123), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn urls_are_encoded() {
        assert_eq!(enc("web-1"), "web-1");
        assert_eq!(enc("a b&c"), "a%20b%26c");
        assert_eq!(
            query(&[
                ("host", None),
                ("name_prefix", Some("w".into())),
                ("limit", Some("5".into()))
            ]),
            "?name_prefix=w&limit=5"
        );
        assert_eq!(query(&[("host", None)]), "");
    }
}
