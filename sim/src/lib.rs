//! The deterministic HA simulation: the real agent lease and epoch guard
//! (`novacron_agent::lease`), the real server host leases and lost-lease
//! counting (`novacron_server::ha::lease`), the real HA controller,
//! mass-failure guard and hardware fence machine
//! (`novacron_server::ha::{controller, guard, fence}`), the real peer
//! witness core (`novacron_shared::witness::Witness`, one per agent) and
//! the real scheduler, run over a simulated network of ordered per-session
//! streams, peer links of their own and per-node clocks drifting within
//! `MAX_DRIFT_PPM`, stepped one event at a time from one seeded RNG: one
//! seed reproduces one run exactly.
//!
//! The world around them: a disk-lock service per host (virtlockd, one
//! lock space; it dies with its host; a start of a locked disk fails and
//! the agent retries with backoff), a BMC per host for the hardware fence
//! (good, slow, lying, hanging, unreachable), peers that answer witness
//! queries over links cut, lossy, slow and reordered independently of the
//! server's, and the server killed, unreachable, or cut off from a share
//! of the fleet both ways or one way.
//!
//! Invariants checked after every step ([`world`]): never two copies of one
//! VM (a copy being killed counts until it is gone), and with disk locks
//! every copy holds its disk's lock; a restart is decided only when the
//! old host can no longer run the VM (host down, or no copy left and no
//! live lease — in keep-running with disk locks the lock stands for
//! that); epochs only increase; no restart while held; in keep-running
//! nothing is killed by a lease expiry; within [`config::Profile::Benign`]
//! nothing fences or restarts; within [`config::Profile::Outage`] (a server
//! outage of any length with the witness on, in either isolation mode)
//! nothing fences, is killed or restarts; within
//! [`config::Profile::HostLoss`] every HA VM of the lost host runs again
//! within [`config::Config::recovery_bound`].
//!
//! Each host also runs the agent's real fence guard
//! (`novacron_agent::guard::Guard`), armed from the lease's guard duty,
//! which outlives the agent; a restarted agent takes its deadline as its
//! own. Scenarios and tests run variants broken on purpose
//! ([`config::Broken`]: a witness ignoring the loss skew, a quorum of one,
//! a guard without its memory, a fence trusted after one confirmation,
//! keep-running with locks assumed but absent, no fence guard) and expect
//! the checker to fail them.
//!
//! One stand-in is the simulation's own: the *witness grace*
//! ([`config::Config::witness_grace`]). Leases end up to a heartbeat
//! apart, so in a server outage the first host to lose its lease finds no
//! peer lost yet; the agent's core (as merged) fences it at once. The
//! simulation's driver hands the lease a provisional confirmation of its
//! lease end plus the grace while the witness is armed, then kills within
//! the rest of `F`; with a zero grace the outage profile fails (a test
//! shows it).
//!
//! Cost: `cargo test` runs 10,000 seeds (about 17 million steps); the
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
