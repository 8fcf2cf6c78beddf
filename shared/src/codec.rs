//! The one place that knows how values become bytes.
//!
//! Everything NovaCron encodes (wire messages, stored records) goes through
//! [`encode`] and [`decode`], so the encoding (bincode 2 today) can be swapped
//! without touching the protocol or store types. Decoding always runs with a
//! size limit, so a hostile length field cannot make us allocate gigabytes.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The largest value [`decode`] will materialise, in bytes.
pub const DECODE_LIMIT: usize = 16 * 1024 * 1024;

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_variable_int_encoding()
        .with_limit::<DECODE_LIMIT>()
}

/// A value could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Serialising a value failed (a bug: our types always encode).
    #[error("encoding failed")]
    Encode(#[source] bincode::error::EncodeError),
    /// The bytes are not a valid encoding of the expected type.
    #[error("malformed payload")]
    Decode(#[source] bincode::error::DecodeError),
    /// The bytes decoded but left data behind: a framing or version mix-up.
    #[error("{0} trailing bytes after the payload")]
    TrailingBytes(usize),
}

/// Encodes `value` into a fresh buffer.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, config()).map_err(CodecError::Encode)
}

/// Appends the encoding of `value` to `out`.
pub fn encode_into<T: Serialize>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    bincode::serde::encode_into_std_write(value, out, config())
        .map(|_| ())
        .map_err(CodecError::Encode)
}

/// Decodes exactly one `T` from `bytes`; trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, config()).map_err(CodecError::Decode)?;
    if used != bytes.len() {
        return Err(CodecError::TrailingBytes(bytes.len() - used));
    }
    Ok(value)
}
