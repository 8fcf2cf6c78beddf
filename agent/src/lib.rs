//! NovaCron agent: the libvirt driver (VMs, storage, snapshots, events),
//! the reconciler, the link to the server and the host's identity.
//! `main.rs` only parses the command line.
//!
//! Layers, bottom up (a module imports only modules of its own or a lower
//! layer; nothing imports upwards, so there are no circles):
//! 1. no libvirt: the pure `drift` (the definition hash), `domxml` (XML
//!    text) and `reconcile` (desired + observed in, actions out, on its own
//!    observation type), `lease` (the HA lease: heartbeat acks in,
//!    fencing out); and `seed` (builds the cloud-init ISO), `spool`
//!    (the on-disk metric spool), `identity` (key and certificate files);
//! 2. the libvirt driver: `error` (its one error type), `ffi` and `events`
//!    (unwrapped libvirt calls), `vmops` (operations on a connection; turns
//!    what it observes into the reconciler's type), `migrate` (on `vmops`),
//!    `hypervisor` (the driver thread, dispatching to `vmops` and `migrate`);
//! 3. `metrics` (collectors and sampler, on the driver) and `config`;
//! 4. the loops: `ha` (drives the lease on its own task and fences
//!    through `hypervisor`), `guard` (the fence guard process and the
//!    agent's client of it, on `ha`), `converge` (plans with `reconcile`, gated by
//!    `ha`, acts through `hypervisor`) and `link` (the server session, on
//!    `converge` and `ha`).
//!
//! Time: `main` makes one `Clock` and hands it to `hypervisor`, `converge`,
//! `metrics` and `link`; logic with deadlines or backoff takes `now`.

pub mod config;
pub mod converge;
pub mod domxml;
pub mod drift;
pub mod error;
pub mod events;
pub mod ffi;
pub mod guard;
pub mod ha;
pub mod hypervisor;
pub mod identity;
/// The HA lease (pure): heartbeat acks renew it, its deadline fences the HA VMs.
pub mod lease;
pub mod link;
pub mod metrics;
pub mod migrate;
pub mod reconcile;
pub mod seed;
pub mod spool;
pub mod vmops;
pub mod witness;

/// This agent's build version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
