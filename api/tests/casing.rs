//! One casing for every enum in JSON (lowercase/snake_case), and the
//! renames that give it leave the agent link's bincode untouched.

#![allow(clippy::unwrap_used)] // a test: a panic is the failure report

use novacron_api::hosts::HostState;
use novacron_api::operations::{OperationKind, OperationState};
use novacron_api::tokens::Role;
use novacron_shared::codec;
use novacron_shared::protocol::{CommandOutcome, ErrorCode, VmState};
use novacron_shared::spec::Power;
use serde::Serialize;

fn json<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap()
}

#[test]
fn enums_are_snake_case_in_json() {
    assert_eq!(json(&VmState::Running), "running");
    assert_eq!(json(&VmState::ShuttingDown), "shutting_down");
    assert_eq!(json(&Power::Paused), "paused");
    assert_eq!(json(&CommandOutcome::Done), "done");
    assert_eq!(
        json(&CommandOutcome::Failed { message: "m".into() }),
        serde_json::json!({"failed": {"message": "m"}})
    );
    assert_eq!(json(&ErrorCode::UnsupportedVersion), "unsupported_version");
    assert_eq!(json(&HostState::Online), "online");
    assert_eq!(json(&OperationKind::Drain), "drain");
    assert_eq!(json(&OperationState::Succeeded), "succeeded");
    assert_eq!(json(&Role::Operator), "operator");
    let back: VmState = serde_json::from_str("\"shutting_down\"").unwrap();
    assert_eq!(back, VmState::ShuttingDown);
    assert!(
        serde_json::from_str::<VmState>("\"Running\"").is_err(),
        "one casing only"
    );
}

/// bincode writes a variant's index, never its name: the JSON renames do
/// not change a byte on the wire.
#[test]
fn bincode_encodes_variants_by_index_not_name() {
    let cases: [(Vec<u8>, u32); 4] = [
        (codec::encode(&VmState::Stopped).unwrap(), 0),
        (codec::encode(&VmState::ShuttingDown).unwrap(), 3),
        (codec::encode(&VmState::Unknown).unwrap(), 6),
        (codec::encode(&CommandOutcome::Done).unwrap(), 0),
    ];
    for (bytes, index) in cases {
        assert_eq!(bytes, codec::encode(&index).unwrap());
    }
    let failed = codec::encode(&CommandOutcome::Failed { message: "m".into() }).unwrap();
    let mut expected = codec::encode(&1u32).unwrap();
    expected.extend(codec::encode(&"m").unwrap());
    assert_eq!(failed, expected);
    let round: VmState = codec::decode(&codec::encode(&VmState::Crashed).unwrap()).unwrap();
    assert_eq!(round, VmState::Crashed);
}
