//! Metrics on the agent: collectors (host from /proc, VMs from libvirt's bulk
//! domain stats), the sampler thread that ticks on wall-clock boundaries, and
//! the spool that keeps what the server has not acknowledged.

pub mod domains;
pub mod host;
