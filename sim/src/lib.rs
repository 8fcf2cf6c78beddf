//! The deterministic HA simulation: the real agent lease and epoch guard
//! (`novacron_agent::lease`), the real server host leases
//! (`novacron_server::ha::lease`), the real HA controller and mass-failure
//! guard (`novacron_server::ha::controller`, `guard`) and the real scheduler,
//! run over a simulated network of ordered per-session streams and per-node
//! clocks drifting within `MAX_DRIFT_PPM`, stepped one event at a time from
//! one seeded RNG: one seed reproduces one run exactly.
//!
//! Invariants checked after every step ([`world`]): never two copies of one
//! VM (a copy being killed counts until it is gone); a restart is decided
//! only when the old host can no longer run the VM (host down, or no copy
//! left and no live lease); epochs only increase; no restart while held;
//! within [`config::Profile::Benign`] nothing fences or restarts; within
//! [`config::Profile::HostLoss`] every HA VM of the lost host runs again
//! within [`config::Config::recovery_bound`].
//!
//! Each host also runs the agent's real fence guard
//! (`novacron_agent::guard::Guard`), which outlives the agent and kills its
//! HA QEMUs at the lease deadline plus `F/2`; a restarted agent takes its
//! deadline as its own. Random runs stop agents (QEMUs left running) for
//! shorter and longer than the lease, among any other faults; two scenarios
//! run without the guard and expect the checker to flag the double run the
//! lease alone allows there (`*-without-guard.toml`).
//!
//! Cost: `cargo test` runs 10,000 seeds (about 8.5 million steps); the
//! crate is built at `opt-level = 1` in the dev profile (root `Cargo.toml`),
//! which halves their time in debug builds.
//!
//! Named scenarios ([`scenario`], `sim/scenarios/*.toml`) script faults with
//! times and compare the HA event log with the one they expect.

pub mod config;
pub mod scenario;
pub mod world;

pub use config::{Bmc, Broken, Config, CrashPoint, Fault, Profile, Timed, Way};
pub use world::{report, run, Checks, Outcome, Stats};
