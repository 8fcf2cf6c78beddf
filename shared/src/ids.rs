//! Identifiers: hosts, VMs and operations.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The JSON form of every id, as a regular expression (what the OpenAPI
/// document states; parsing also accepts upper case).
pub const ID_PATTERN: &str = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$";

/// A 128-bit identifier rendered as a lowercase, hyphenated UUID-style string.
macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub u128);

        // Text formats (JSON, TOML) get the hyphenated string; binary
        // formats (the wire, the store) get the 16-byte integer.
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.collect_str(self)
                } else {
                    self.0.serialize(s)
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                if d.is_human_readable() {
                    let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                    s.parse().map_err(serde::de::Error::custom)
                } else {
                    u128::deserialize(d).map(Self)
                }
            }
        }

        #[cfg(feature = "schema")]
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::schema::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .pattern(Some(ID_PATTERN))
                    .description(Some(concat!("A ", stringify!($name), ": 128-bit hex, hyphenated like a UUID")))
                    .into()
            }
        }

        #[cfg(feature = "schema")]
        impl utoipa::ToSchema for $name {}

        impl $name {
            /// A fresh random id.
            pub fn random() -> Self {
                Self(rand::random())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let b = self.0.to_be_bytes();
                for (i, byte) in b.iter().enumerate() {
                    if matches!(i, 4 | 6 | 8 | 10) {
                        f.write_str("-")?;
                    }
                    write!(f, "{byte:02x}")?;
                }
                Ok(())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_hex128(s).map(Self)
            }
        }
    };
}

id_type!(
    /// A host's identity, fixed at enrollment and written into its certificate.
    HostId
);
id_type!(
    /// An operation id: every command carries one so that retries are idempotent.
    OpId
);
id_type!(
    /// A VM's identity, fixed when the VM is created and used as its libvirt
    /// domain UUID on whichever host runs it.
    VmId
);

/// A string that is not a hyphenated 128-bit hex id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an id (expected 32 hex digits, optionally hyphenated like 0a1b2c3d-...): {0:?}")]
pub struct ParseIdError(pub String);

fn parse_hex128(s: &str) -> Result<u128, ParseIdError> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ParseIdError(s.chars().take(64).collect()));
    }
    u128::from_str_radix(&hex, 16).map_err(|_| ParseIdError(s.chars().take(64).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_parse_round_trip() {
        let id = HostId(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        let s = id.to_string();
        assert_eq!(s, "01234567-89ab-cdef-0011-223344556677");
        assert_eq!(s.parse::<HostId>(), Ok(id));
        assert_eq!("0123456789abcdef0011223344556677".parse::<HostId>(), Ok(id));
    }

    #[test]
    fn rejects_garbage() {
        assert!("nope".parse::<HostId>().is_err());
        assert!("g123456789abcdef0011223344556677".parse::<HostId>().is_err());
        assert!("+123456789abcdef0011223344556677".parse::<HostId>().is_err());
    }
}
