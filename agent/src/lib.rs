//! NovaCron agent: the libvirt driver (VMs, storage, snapshots, events),
//! the reconciler, the link to the server and the host's identity.
//! `main.rs` only parses the command line.

pub mod config;
pub mod converge;
pub mod domxml;
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
