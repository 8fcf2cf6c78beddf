//! The burst policy, pure: which waiting VMs burst now, as which instance
//! type and image, and why the others wait.
//!
//! A VM bursts when it is burstable, no host fits it (the scheduler's
//! reasons are recorded with the decision), it has waited at least its
//! `burst_after`, and the caps allow one more instance of its type:
//! instances at once, the fleet's summed $/h, and the month's spend plus an
//! hour of every counted instance (the new one included) within the
//! monthly budget. The oldest waiting VM goes first; the budget each launch
//! takes is counted before the next is decided.

use novacron_cloud::types::smallest_fit;
use novacron_cloud::{InstanceType, MicroUsd};
use novacron_shared::ids::VmId;
use novacron_shared::placement::BurstRule;

use crate::config::Caps;

/// A VM no host fits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The VM.
    pub vm: VmId,
    /// Its vCPUs.
    pub vcpus: u32,
    /// Its memory, MiB.
    pub memory_mib: u64,
    /// Its burst rule (none: it waits for a host only).
    pub rule: Option<BurstRule>,
    /// The AMI it would launch from, or why there is none.
    pub image: Result<String, String>,
    /// Waiting since, Unix ms.
    pub since_ms: u64,
    /// Why no host fits (the scheduler's reasons).
    pub no_fit: String,
    /// A failed launch holds it until then (Unix ms).
    pub held_until_ms: Option<u64>,
    /// Why it is held.
    pub held_why: Option<String>,
}

/// What the counted instances use of the caps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Budget {
    /// Instances counted (launching, running, stopped; not terminating).
    pub instances: u32,
    /// Their summed hourly price.
    pub per_hour: MicroUsd,
    /// This month's spend.
    pub month_spent: MicroUsd,
}

/// The policy's settings.
#[derive(Debug, Clone, Copy)]
pub struct Settings<'a> {
    /// The caps.
    pub caps: Caps,
    /// The default wait before a burst, ms.
    pub burst_after_ms: u64,
    /// The provider's instance types with this region's prices.
    pub types: &'a [InstanceType],
}

/// What to do with one candidate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Launch it now.
    Launch {
        /// The VM.
        vm: VmId,
        /// The type chosen.
        instance_type: InstanceType,
        /// The AMI.
        image: String,
        /// Why (the scheduler's reasons).
        reasons: String,
    },
    /// It waits; `reason` is shown on it.
    Wait {
        /// The VM.
        vm: VmId,
        /// Why.
        reason: String,
    },
}

/// Decides for every candidate, oldest first.
pub fn decide(s: &Settings<'_>, now_ms: u64, mut budget: Budget, candidates: &[Candidate]) -> Vec<Decision> {
    let mut order: Vec<&Candidate> = candidates.iter().collect();
    order.sort_by_key(|c| (c.since_ms, c.vm));
    let mut out = Vec::with_capacity(order.len());
    for c in order {
        let wait = |reason: String| Decision::Wait { vm: c.vm, reason };
        let Some(rule) = &c.rule else {
            out.push(wait(c.no_fit.clone()));
            continue;
        };
        if let Some(until) = c.held_until_ms.filter(|u| now_ms < *u) {
            let why = c.held_why.as_deref().unwrap_or("a launch failed");
            out.push(wait(format!(
                "{}; burst held for {} after: {why}",
                c.no_fit,
                novacron_shared::duration::format(std::time::Duration::from_millis(until - now_ms))
            )));
            continue;
        }
        let after = rule.after_ms.unwrap_or(s.burst_after_ms);
        let waited = now_ms.saturating_sub(c.since_ms);
        if waited < after {
            out.push(wait(format!(
                "{}; bursts in {} (waits {} for a host first)",
                c.no_fit,
                novacron_shared::duration::format(std::time::Duration::from_millis(after - waited)),
                novacron_shared::duration::format(std::time::Duration::from_millis(after)),
            )));
            continue;
        }
        let image = match &c.image {
            Ok(i) => i.clone(),
            Err(why) => {
                out.push(wait(format!("{}; cannot burst: {why}", c.no_fit)));
                continue;
            }
        };
        let Some(t) = smallest_fit(s.types, c.vcpus, c.memory_mib, &rule.instance_types) else {
            let allowed = if rule.instance_types.is_empty() {
                String::new()
            } else {
                format!(" among {}", rule.instance_types.join(", "))
            };
            out.push(wait(format!(
                "{}; cannot burst: no instance type{allowed} has {} vCPUs and {} MiB",
                c.no_fit, c.vcpus, c.memory_mib
            )));
            continue;
        };
        if let Some(cap) = over_cap(&s.caps, &budget, t) {
            out.push(wait(format!("{}; burst held: {cap}", c.no_fit)));
            continue;
        }
        budget.instances += 1;
        budget.per_hour = budget.per_hour.plus(t.per_hour);
        out.push(Decision::Launch {
            vm: c.vm,
            instance_type: t.clone(),
            image,
            reasons: c.no_fit.clone(),
        });
    }
    out
}

/// The cap one more instance of `t` would pass, in words.
fn over_cap(caps: &Caps, b: &Budget, t: &InstanceType) -> Option<String> {
    if b.instances >= caps.instances {
        return Some(format!(
            "the instance cap is reached ({} of {} in the cloud; [burst] max_instances)",
            b.instances, caps.instances
        ));
    }
    let hourly = b.per_hour.plus(t.per_hour);
    if hourly > caps.per_hour {
        return Some(format!(
            "the hourly cap would be passed ({}/h running + {}/h for {} > {}/h; [burst] max_usd_per_hour)",
            b.per_hour, t.per_hour, t.name, caps.per_hour
        ));
    }
    let month = b.month_spent.plus(hourly);
    if month > caps.per_month {
        return Some(format!(
            "the monthly budget would be passed within the hour ({} spent this month + {} for an hour > {}; [burst] max_usd_per_month)",
            b.month_spent, hourly, caps.per_month
        ));
    }
    None
}

/// How much of a budget is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Under 80 %.
    Below,
    /// 80 % or more.
    Warning,
    /// 100 % or more.
    Reached,
}

/// The level of `used` against `cap` (a zero cap is reached at once).
pub fn level(used: MicroUsd, cap: MicroUsd) -> Level {
    let (u, c) = (u128::from(used.0), u128::from(cap.0));
    if u >= c {
        Level::Reached
    } else if u * 10 >= c * 8 {
        Level::Warning
    } else {
        Level::Below
    }
}

/// The level reached when going from `before` to `now`, if it rose.
pub fn rose(before: Level, now: Level) -> Option<Level> {
    (now > before).then_some(now)
}

#[cfg(test)]
mod tests;
