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
//! Two more guards (issue 13): a host's *hardware fence* confirmed it off
//! (then it is fenced at once), and libvirt's disk locks (a restarted VM's
//! start waits on the lock while an old copy may still run, in the
//! `keep-running` isolation response). The peer witness lets agents keep
//! their VMs through a server outage; the server's side of its argument
//! (`novacron_shared::witness`) is the lease view's lost-lease count and
//! the guard's memory of it.
//!
//! Owns: the per-host lease view ([`lease`](crate::ha::lease)), the mass-failure guard
//! ([`guard`](crate::ha::guard)), the HA controller ([`controller`](crate::ha::controller)), which decides which
//! VMs of fenced hosts restart elsewhere and which hosts to fence, the
//! hardware fence's state machine ([`fence`](crate::ha::fence)) and the
//! witness terms ([`witness`](crate::ha::witness)) — all pure: no I/O, no
//! clock reads (`now` is passed in), no store, no sessions; the fence's
//! command runner is the one piece of I/O here — and the
//! [`driver`](crate::ha::driver), the one task that runs them against the
//! live fleet (it ticks the fleet's lease view, which the session loop
//! feeds, reads the fleet view, runs the fence commands, and acts only
//! through the fleet's action channel). Must not touch: the session loop,
//! the link or the store directly.

pub mod controller;
pub mod driver;
pub mod fence;
pub mod guard;
pub mod lease;
pub mod witness;
