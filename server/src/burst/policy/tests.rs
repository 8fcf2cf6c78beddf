use novacron_cloud::InstanceTypes;

use super::*;

fn types() -> Vec<InstanceType> {
    InstanceTypes::shipped().in_region("us-east-1")
}

fn caps(instances: u32, per_hour: u64, per_month: u64) -> Caps {
    Caps {
        instances,
        per_hour: MicroUsd(per_hour),
        per_month: MicroUsd(per_month),
    }
}

/// Caps nothing in these tests reaches, no wait before a burst.
fn roomy(t: &[InstanceType]) -> Settings<'_> {
    Settings {
        caps: caps(10, 5_000_000, 1_000_000_000),
        burst_after_ms: 0,
        types: t,
    }
}

fn cand(id: u128, since_ms: u64) -> Candidate {
    Candidate {
        vm: VmId(id),
        vcpus: 2,
        memory_mib: 3000,
        rule: Some(BurstRule {
            repatriate: true,
            ..BurstRule::default()
        }),
        image: Ok("ami-1".into()),
        since_ms,
        no_fit: "no host fits: h1: 2 GiB free".into(),
        held_until_ms: None,
        held_why: None,
    }
}

fn launched(d: &[Decision]) -> Vec<(VmId, String)> {
    d.iter()
        .filter_map(|d| match d {
            Decision::Launch {
                vm, instance_type, ..
            } => Some((*vm, instance_type.name.clone())),
            Decision::Wait { .. } => None,
        })
        .collect()
}

fn reason(d: &[Decision], id: u128) -> String {
    d.iter()
        .find_map(|d| match d {
            Decision::Wait { vm, reason } if *vm == VmId(id) => Some(reason.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("VM {id} does not wait: {d:?}"))
}

#[test]
fn a_burstable_vm_launches_as_the_smallest_type_with_the_schedulers_reasons() {
    let t = types();
    let s = roomy(&t);
    let d = decide(&s, 1000, Budget::default(), &[cand(1, 0)]);
    assert_eq!(launched(&d), vec![(VmId(1), "t3.medium".into())]);
    let Decision::Launch { reasons, image, .. } = &d[0] else {
        unreachable!()
    };
    assert!(reasons.contains("h1: 2 GiB free"));
    assert_eq!(image, "ami-1");
}

#[test]
fn a_vm_without_a_burst_rule_waits_with_the_schedulers_reasons() {
    let t = types();
    let s = roomy(&t);
    let mut c = cand(1, 0);
    c.rule = None;
    let d = decide(&s, 1000, Budget::default(), &[c]);
    assert_eq!(reason(&d, 1), "no host fits: h1: 2 GiB free");
}

#[test]
fn the_instance_cap_stops_a_burst_with_a_clear_reason() {
    let t = types();
    let s = Settings {
        caps: caps(1, 5_000_000, 1_000_000_000),
        burst_after_ms: 0,
        types: &t,
    };
    // Two wait; the older one takes the last instance.
    let d = decide(&s, 1000, Budget::default(), &[cand(2, 500), cand(1, 100)]);
    assert_eq!(launched(&d), vec![(VmId(1), "t3.medium".into())]);
    assert!(
        reason(&d, 2).contains("instance cap is reached (1 of 1"),
        "{}",
        reason(&d, 2)
    );
    // A deleted burst VM no longer counts: the budget is what is counted.
    let d = decide(&s, 1000, Budget::default(), &[cand(2, 500)]);
    assert_eq!(launched(&d).len(), 1);
}

#[test]
fn the_hourly_and_monthly_caps_stop_a_burst_with_a_clear_reason() {
    let t = types();
    // t3.medium is $0.0416/h.
    let s = Settings {
        caps: caps(10, 50_000, 1_000_000_000),
        burst_after_ms: 0,
        types: &t,
    };
    let used = Budget {
        instances: 1,
        per_hour: MicroUsd(10_000),
        month_spent: MicroUsd(0),
    };
    let d = decide(&s, 1000, used, &[cand(1, 0)]);
    assert!(reason(&d, 1).contains("hourly cap"), "{}", reason(&d, 1));
    assert!(decide(&s, 1000, Budget::default(), &[cand(1, 0)])[0] != d[0]);
    let s = Settings {
        caps: caps(10, 5_000_000, 100_000),
        ..s
    };
    let spent = Budget {
        month_spent: MicroUsd(70_000),
        ..Budget::default()
    };
    let d = decide(&s, 1000, spent, &[cand(1, 0)]);
    assert!(reason(&d, 1).contains("monthly budget"), "{}", reason(&d, 1));
}

#[test]
fn a_vm_waits_its_burst_after_and_a_held_vm_waits_until_then() {
    let t = types();
    let s = Settings {
        caps: caps(10, 5_000_000, 1_000_000_000),
        burst_after_ms: 60_000,
        types: &t,
    };
    let d = decide(&s, 30_000, Budget::default(), &[cand(1, 0)]);
    assert!(reason(&d, 1).contains("bursts in 30s"), "{}", reason(&d, 1));
    assert_eq!(
        launched(&decide(&s, 60_000, Budget::default(), &[cand(1, 0)])).len(),
        1
    );
    let mut own = cand(2, 0);
    if let Some(r) = own.rule.as_mut() {
        r.after_ms = Some(0);
    }
    assert_eq!(
        launched(&decide(&s, 1, Budget::default(), &[own])).len(),
        1,
        "the VM's own wait wins"
    );
    let mut held = cand(3, 0);
    held.held_until_ms = Some(200_000);
    held.held_why = Some("InvalidAMIID.NotFound: no such image".into());
    let d = decide(&s, 100_000, Budget::default(), &[held.clone()]);
    assert!(
        reason(&d, 3).contains("InvalidAMIID.NotFound"),
        "{}",
        reason(&d, 3)
    );
    assert_eq!(
        launched(&decide(&s, 200_000, Budget::default(), &[held])).len(),
        1
    );
}

#[test]
fn type_limits_and_missing_images_are_reasons_not_launches() {
    let t = types();
    let s = roomy(&t);
    let mut c = cand(1, 0);
    if let Some(r) = c.rule.as_mut() {
        r.instance_types = vec!["t3.micro".into()];
    }
    let d = decide(&s, 1, Budget::default(), &[c]);
    assert!(reason(&d, 1).contains("among t3.micro"), "{}", reason(&d, 1));
    let mut c = cand(2, 0);
    if let Some(r) = c.rule.as_mut() {
        r.instance_types = vec!["m5.large".into()];
    }
    assert_eq!(
        launched(&decide(&s, 1, Budget::default(), &[c])),
        vec![(VmId(2), "m5.large".into())]
    );
    let mut c = cand(3, 0);
    c.image = Err("no AMI is mapped for image \"x\"".into());
    let d = decide(&s, 1, Budget::default(), &[c]);
    assert!(reason(&d, 3).contains("no AMI"), "{}", reason(&d, 3));
}

#[test]
fn budget_levels_rise_at_80_and_100_percent() {
    assert_eq!(level(MicroUsd(79), MicroUsd(100)), Level::Below);
    assert_eq!(level(MicroUsd(80), MicroUsd(100)), Level::Warning);
    assert_eq!(level(MicroUsd(100), MicroUsd(100)), Level::Reached);
    assert_eq!(level(MicroUsd(0), MicroUsd(0)), Level::Reached);
    assert_eq!(rose(Level::Below, Level::Warning), Some(Level::Warning));
    assert_eq!(rose(Level::Warning, Level::Warning), None);
    assert_eq!(rose(Level::Reached, Level::Below), None);
}
