//! The API client lives in the `novacron-api` crate; re-exported here for
//! the admin subcommands, the benchmarks and the end-to-end tests.

pub use novacron_api::client::*;
