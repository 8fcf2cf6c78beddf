//! Cloud providers for the burst broker.
//!
//! - [`provider`]: the interface the server's burst broker drives (launch,
//!   describe, start, stop, terminate, list by tag, the instance types and
//!   prices of its region), its request and instance types, and its errors,
//!   classified into throttled, transient and permanent so the broker knows
//!   what to retry.
//! - [`types`]: the instance-type table (type, vCPUs, MiB, $/h per region)
//!   shipped as `instance-types.toml` and editable by operators, and the
//!   choice of the smallest type that fits a VM.
//! - [`money`]: dollars as integer micro-dollars, and cost from a price and
//!   a running time.
//!
//! A driver (the EC2 one is `novacron-ec2`) implements [`provider::Provider`];
//! only the server links a driver, so the SDK's build cost stays there.
//! This crate has no I/O and no runtime.

pub mod money;
pub mod provider;
pub mod types;

pub use money::MicroUsd;
pub use provider::{Instance, InstanceState, LaunchSpec, Provider, ProviderError, ProviderFuture};
pub use types::{InstanceType, InstanceTypes, TypesError};

/// The tag that names the VM an instance runs (`novacron:vm-id`).
pub const TAG_VM: &str = "novacron:vm-id";
/// The tag that names the fleet an instance belongs to (`novacron:fleet`).
pub const TAG_FLEET: &str = "novacron:fleet";
/// The tag that names the launch decision an instance came from
/// (`novacron:launch-id`); searched before any retry of a launch.
pub const TAG_LAUNCH: &str = "novacron:launch-id";
