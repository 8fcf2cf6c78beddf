//! NovaCron agent: the libvirt driver, the link to the server and the
//! host's identity. `main.rs` only parses the command line.

pub mod config;
pub mod hypervisor;
pub mod identity;
pub mod link;

/// This agent's build version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
