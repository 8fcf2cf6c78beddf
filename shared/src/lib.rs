//! NovaCron's shared vocabulary: ids, VM specs, the wire protocol (messages, framing,
//! versioning), PKI helpers and the QUIC/TLS configuration builders.
//!
//! This crate has no async runtime and no libvirt: the agent and the server
//! both build on it, and everything in it can be tested without I/O. The
//! QUIC/TLS, PKI and framing modules are behind the default feature `quic`;
//! without it (the API types, the CLI) the crate pulls in no QUIC or TLS.

pub mod backoff;
pub mod clock;
pub mod codec;
pub mod config;
pub mod duration;
pub mod files;
#[cfg(feature = "quic")]
pub mod framing;
pub mod ids;
pub mod lease;
pub mod metrics;
pub mod notify;
#[cfg(feature = "quic")]
pub mod pki;
pub mod placement;
pub mod protocol;
pub mod spec;
#[cfg(feature = "quic")]
pub mod tls;
pub mod witness;

/// The ALPN protocol name both ends of a NovaCron QUIC connection must offer.
pub const ALPN: &[u8] = b"novacron/1";
