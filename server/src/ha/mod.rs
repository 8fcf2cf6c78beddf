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
//! Owns: the per-host lease view ([`lease`]), the mass-failure guard
//! ([`guard`]) and the HA controller ([`controller`]), which decides which
//! VMs of fenced hosts restart elsewhere. All pure: no I/O, no clock reads
//! (`now` is passed in), no store, no sessions. Must not touch: the session
//! loop, the link or the store; the fleet feeds the lease view and carries
//! the controller's decisions out (the driver that connects them comes with
//! the fleet's wiring).

pub mod controller;
pub mod guard;
pub mod lease;
