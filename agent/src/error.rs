//! The agent's libvirt error, at the bottom of the driver layers: `vmops`
//! (operations on a connection), `migrate` (above `vmops`) and
//! `hypervisor` (the driver thread, on top) all report this one type, so
//! none of them imports another just for its error.

use std::time::Duration;

/// A libvirt call failed.
#[derive(Debug, thiserror::Error)]
pub enum HvError {
    /// libvirt could not be reached.
    #[error("cannot connect to libvirt at {uri}: {message}")]
    Connect {
        /// The URI.
        uri: String,
        /// libvirt's message.
        message: String,
    },
    /// A libvirt call failed.
    #[error("libvirt {op} failed: {message}")]
    Call {
        /// Which call.
        op: &'static str,
        /// libvirt's message.
        message: String,
    },
    /// The request cannot be carried out as asked.
    #[error("{0}")]
    Invalid(String),
    /// The call did not finish in time (libvirtd slow or hung).
    #[error("libvirt did not answer within {0:?}")]
    Timeout(Duration),
    /// The driver thread is gone.
    #[error("the libvirt driver thread stopped")]
    Gone,
    /// A disk of the domain is locked by another QEMU (libvirt's lock
    /// manager, or QEMU's own image lock): another copy runs, or its host
    /// has not released the lock yet. An expected wait, never forced.
    #[error("a disk is locked by another host: {0}")]
    DiskLocked(String),
}
