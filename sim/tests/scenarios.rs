//! The named scenarios in `sim/scenarios/`: each runs through the same
//! harness as the random seeds and must produce its expected event log
//! (or, for a case the design does not cover, the violation it names).

use std::path::PathBuf;

use novacron_sim::scenario::Scenario;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scenarios")
}

fn check(file: &str) {
    let path = dir().join(file);
    let sc = Scenario::load(&path).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
    if let Err(e) = sc.check() {
        panic!("{}: {e}", path.display());
    }
}

#[test]
fn host_dies() {
    check("host-dies.toml");
}

#[test]
fn link_cut_and_restored() {
    check("link-cut-and-restored.toml");
}

#[test]
fn server_kill_short() {
    check("server-kill-short.toml");
}

#[test]
fn server_kill_long() {
    check("server-kill-long.toml");
}

#[test]
fn server_crash_after_a_restart_is_stored() {
    check("server-crash-after-restart.toml");
}

#[test]
fn agent_kill_short() {
    check("agent-kill-short.toml");
}

#[test]
fn mass_failure_held_then_released() {
    check("mass-failure-held-then-released.toml");
}

#[test]
fn mass_failure_released_when_hosts_return() {
    check("mass-failure-released-by-return.toml");
}

#[test]
fn server_unreachable_from_every_host() {
    check("server-unreachable.toml");
}

#[test]
fn flapping_link() {
    check("flapping-link.toml");
}

#[test]
fn an_agent_stopped_then_cut_off_is_covered_by_its_fence_guard() {
    check("agent-stop-then-partition.toml");
}

#[test]
fn an_agent_stopped_then_cut_off_without_the_fence_guard_runs_a_vm_twice() {
    check("agent-stop-then-partition-without-guard.toml");
}

#[test]
fn an_agent_stopped_longer_than_the_wait_is_covered_by_its_fence_guard() {
    check("agent-stop-long.toml");
}

#[test]
fn an_agent_stopped_longer_than_the_wait_without_the_fence_guard_runs_a_vm_twice() {
    check("agent-stop-long-without-guard.toml");
}

#[test]
fn server_down_60_s_with_three_hosts_kills_nothing() {
    check("server-down-60s-3-hosts.toml");
}

#[test]
fn server_down_60_s_with_ten_hosts_kills_nothing() {
    check("server-down-60s-10-hosts.toml");
}

#[test]
fn server_cut_from_20_percent_fails_over() {
    check("split-20-percent.toml");
}

#[test]
fn server_cut_from_40_percent_fences_and_holds() {
    check("split-40-percent.toml");
}

#[test]
fn server_cut_from_60_percent_kills_nothing() {
    check("split-60-percent.toml");
}

#[test]
fn server_cut_one_way_from_60_percent_kills_nothing() {
    check("split-60-percent-one-way.toml");
}

#[test]
fn a_host_cut_from_server_and_peers_fences_and_fails_over() {
    check("host-cut-from-server-and-peers.toml");
}

#[test]
fn keep_running_waits_on_the_disk_lock() {
    check("keep-running-link-cut.toml");
}

#[test]
fn server_cut_one_way_from_60_percent_by_lost_acks_kills_nothing() {
    check("split-60-percent-acks-lost.toml");
}

#[test]
fn a_hardware_fence_finding_the_host_off_counts() {
    check("fence-already-off.toml");
}

#[test]
fn a_slow_hardware_fence_powers_off_then_restarts() {
    check("fence-slow.toml");
}

#[test]
fn a_lying_hardware_fence_is_caught_and_nothing_restarts() {
    check("fence-lying.toml");
}

#[test]
fn a_hanging_hardware_fence_falls_back_to_the_lease_wait() {
    check("fence-timeout.toml");
}

#[test]
fn every_scenario_file_is_tested_and_valid() {
    let mut files: Vec<String> = std::fs::read_dir(dir())
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".toml"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    assert_eq!(files.len(), 27, "scenario files: {files:?}");
    let me = include_str!("scenarios.rs");
    for f in &files {
        assert!(me.contains(&format!("check(\"{f}\")")), "{f} has no test");
        check(f);
    }
}

#[test]
fn a_changed_expectation_fails_the_scenario() {
    // The comparison can fail: the same scenario with one line of its
    // expected log dropped is reported as a different log.
    let path = dir().join("host-dies.toml");
    let mut sc = Scenario::load(&path).unwrap_or_else(|e| panic!("{e:?}"));
    assert!(sc.log.len() > 2);
    sc.log.remove(1);
    assert!(sc.check().is_err());
}
