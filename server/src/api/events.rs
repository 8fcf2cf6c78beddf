//! The fleet's event stream (`/v1/events`, server-sent events).

use super::http::{sse, sse_event, Resp};
use super::{convert, Api, ApiError, Call};
use crate::bus::FleetEvent;

/// Streams the fleet's events, filtered by `host` and `vm`.
pub(super) fn handle(api: &Api, call: &Call) -> Result<Resp, ApiError> {
    let host = call.query.id("host")?;
    let vm = call.query.id("vm")?;
    Ok(sse(api.fleet.bus.subscribe(), move |ev: &FleetEvent| {
        if !ev.matches(host, vm) {
            return None;
        }
        let out = convert::event(ev);
        sse_event(Some(out.seq), out.kind.as_str(), &out)
    }))
}
