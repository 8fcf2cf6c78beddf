//! High availability, server side: which hosts must have fenced themselves,
//! so that their HA VMs may run elsewhere.
//!
//! The safety argument lives in `novacron_shared::lease` (shared/src/lease.rs):
//! an agent kills its HA VMs by its lease deadline, counted from when it
//! *sent* its last acknowledged heartbeat; the server waits
//! [`LeaseTiming::fenced_after`](novacron_shared::lease::LeaseTiming::fenced_after)
//! from when it *received* the last heartbeat, which is the later instant,
//! and that wait covers the clock-rate drift bound, the fence time and a
//! margin. This folder only ever declares a host fenced after that wait.
//!
//! Owns: the per-host lease view ([`lease`](crate::ha::lease)), the mass-failure guard
//! ([`guard`](crate::ha::guard)) and the HA controller ([`controller`](crate::ha::controller)), which decides which
//! VMs of fenced hosts restart elsewhere — all pure: no I/O, no clock reads
//! (`now` is passed in), no store, no sessions — and the [`driver`](crate::ha::driver), the
//! one task that runs them against the live fleet (it ticks the fleet's
//! lease view, which the session loop feeds, reads the fleet view, and acts
//! only through the fleet's action channel). Must not touch: the session
//! loop, the link or the store directly.

pub mod controller;
pub mod driver;
pub mod fence;
pub mod guard;
pub mod lease;
pub mod witness;
