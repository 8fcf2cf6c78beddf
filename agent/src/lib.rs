//! NovaCron agent: the libvirt driver (VMs, storage, snapshots, events),
//! the reconciler, the link to the server and the host's identity.
//! `main.rs` only parses the command line.
//!
//! Layers, bottom up (a module imports only modules below it):
//! - pure: `drift` (the definition hash), `domxml` (XML text), `reconcile`
//!   (desired + observed in, actions out; its own observation type);
//! - libvirt driver: `error` (its one error), `vmops` (operations on a
//!   connection), `migrate` (on `vmops`), `hypervisor` (the driver thread,
//!   dispatching to `vmops` and `migrate`);
//! - loops: `converge` (plans with `reconcile`, acts through `hypervisor`),
//!   `metrics` (sampler and spool), and `link` (the server session) on top.

pub mod config;
pub mod converge;
pub mod domxml;
pub mod drift;
pub mod error;
pub mod events;
pub mod ffi;
pub mod hypervisor;
pub mod identity;
pub mod link;
pub mod metrics;
pub mod migrate;
pub mod reconcile;
pub mod seed;
pub mod spool;
pub mod vmops;

/// This agent's build version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
