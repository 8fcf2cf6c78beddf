//! Cost, as the provider bills it: per second of a billed state, with a
//! minimum of one minute per run (EC2's rule for Linux on-demand
//! instances), in calendar months of UTC.

use novacron_cloud::MicroUsd;

/// The shortest run billed.
pub const MINIMUM_RUN_MS: u64 = 60_000;

/// The month (`yyyymm`, UTC) of a Unix time in ms.
pub fn month_of(unix_ms: u64) -> u32 {
    let days = i64::try_from(unix_ms / 86_400_000).unwrap_or(i64::MAX / 2);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    u32::try_from(y * 100 + m).unwrap_or(u32::MAX)
}

/// `yyyymm` as `yyyy-mm`.
pub fn month_name(month: u32) -> String {
    format!("{:04}-{:02}", month / 100, month % 100)
}

/// What to bill when accounting a billed run from `billed_until_ms` to
/// `now_ms` (nothing when the clock went back).
pub fn accrue(per_hour: MicroUsd, billed_until_ms: u64, now_ms: u64) -> MicroUsd {
    per_hour.for_ms(now_ms.saturating_sub(billed_until_ms))
}

/// What is still owed when a run that began at `run_started_ms` ends at
/// `now_ms`, with everything up to `billed_until_ms` already billed: the
/// rest of the run, and up to the one-minute minimum.
pub fn close_run(per_hour: MicroUsd, run_started_ms: u64, billed_until_ms: u64, now_ms: u64) -> MicroUsd {
    let end = now_ms.max(run_started_ms.saturating_add(MINIMUM_RUN_MS));
    per_hour.for_ms(end.saturating_sub(billed_until_ms.max(run_started_ms)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_are_calendar_months_in_utc() {
        assert_eq!(month_of(0), 197001);
        // 2026-12-01T00:00:00Z and one ms before it.
        let dec = 1_796_083_200_000;
        assert_eq!(month_of(dec), 202612);
        assert_eq!(month_of(dec - 1), 202611);
        // 2024-02-29 (a leap day) and 2024-03-01.
        assert_eq!(month_of(1_709_164_800_000), 202402);
        assert_eq!(month_of(1_709_251_200_000), 202403);
        assert_eq!(month_name(202612), "2026-12");
    }

    #[test]
    fn a_run_is_billed_per_second_with_a_minute_at_least() {
        let p = MicroUsd(3_600_000); // $0.001 per second
        assert_eq!(accrue(p, 1000, 11_000), MicroUsd(10_000));
        assert_eq!(
            accrue(p, 11_000, 1000),
            MicroUsd(0),
            "a clock going back bills nothing"
        );
        // A 10 s run is billed a minute; 40 s of it were billed already.
        assert_eq!(close_run(p, 0, 10_000, 10_000), MicroUsd(50_000));
        // A 2 min run owes only what was not billed yet.
        assert_eq!(close_run(p, 0, 100_000, 120_000), MicroUsd(20_000));
        assert_eq!(close_run(p, 0, 120_000, 120_000), MicroUsd(0));
    }
}
