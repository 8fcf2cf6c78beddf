//! libvirt domain lifecycle events, pushed by libvirt as they happen.
//!
//! The `virt` crate does not wrap `virConnectDomainEventRegisterAny`, so this
//! module is the agent's one island of `unsafe`: the FFI registration, the
//! C callback and its free function. Everything it hands out is safe: a
//! callback id and a channel of plain Rust events.

#![allow(unsafe_code)]

use std::ffi::CStr;
use std::os::raw::{c_int, c_void};
use std::sync::OnceLock;

use novacron_shared::protocol::VmState;
use tokio::sync::mpsc::UnboundedSender;
use virt::connect::Connect;
use virt::sys;

/// One lifecycle event, as libvirt reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleEvent {
    /// The domain's name.
    pub name: String,
    /// The domain's UUID.
    pub uuid: String,
    /// libvirt's event (`virDomainEventType`).
    pub event: i32,
    /// libvirt's detail for that event.
    pub detail: i32,
}

impl LifecycleEvent {
    /// The event's name (`started`, `stopped`, ...).
    pub fn event_name(&self) -> &'static str {
        match self.event {
            0 => "defined",
            1 => "undefined",
            2 => "started",
            3 => "suspended",
            4 => "resumed",
            5 => "stopped",
            6 => "shutdown",
            7 => "pmsuspended",
            8 => "crashed",
            _ => "unknown",
        }
    }

    /// The detail's name, per event.
    pub fn detail_name(&self) -> &'static str {
        const STARTED: [&str; 5] = ["booted", "migrated", "restored", "from_snapshot", "wakeup"];
        const SUSPENDED: [&str; 9] = [
            "paused",
            "migrated",
            "ioerror",
            "watchdog",
            "restored",
            "from_snapshot",
            "api_error",
            "postcopy",
            "postcopy_failed",
        ];
        const RESUMED: [&str; 4] = ["unpaused", "migrated", "from_snapshot", "postcopy"];
        const STOPPED: [&str; 7] = [
            "shutdown",
            "destroyed",
            "crashed",
            "migrated",
            "saved",
            "failed",
            "from_snapshot",
        ];
        const DEFINED: [&str; 4] = ["added", "updated", "renamed", "from_snapshot"];
        const UNDEFINED: [&str; 2] = ["removed", "renamed"];
        const SHUTDOWN: [&str; 3] = ["finished", "guest", "host"];
        let table: &[&'static str] = match self.event {
            0 => &DEFINED,
            1 => &UNDEFINED,
            2 => &STARTED,
            3 => &SUSPENDED,
            4 => &RESUMED,
            5 => &STOPPED,
            6 => &SHUTDOWN,
            _ => &[],
        };
        usize::try_from(self.detail)
            .ok()
            .and_then(|i| table.get(i).copied())
            .unwrap_or("unknown")
    }

    /// The domain's state right after this event.
    pub fn state(&self) -> VmState {
        match self.event {
            2 | 4 => VmState::Running,
            3 => VmState::Paused,
            0 | 1 | 5 => VmState::Stopped,
            6 => VmState::ShuttingDown,
            7 => VmState::Suspended,
            8 => VmState::Crashed,
            _ => VmState::Unknown,
        }
    }
}

/// How long the event loop thread pauses after a failed iteration.
const EVENT_LOOP_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// Starts libvirt's default event loop on its own thread, once per
/// process. Must run before the first connection is opened, or that
/// connection gets no events and no keepalive.
pub fn start_event_loop() -> Result<(), String> {
    static STARTED: OnceLock<Result<(), String>> = OnceLock::new();
    STARTED
        .get_or_init(|| {
            // Every libvirt error reaches us as a Result; libvirt's default
            // handler would also print each one (even expected "not found"s).
            virt::error::clear_error_callback();
            virt::event::event_register_default_impl().map_err(|e| e.to_string())?;
            std::thread::Builder::new()
                .name("libvirt-events".into())
                .spawn(|| loop {
                    if let Err(e) = virt::event::event_run_default_impl() {
                        tracing::warn!(error = %e, "libvirt event loop iteration failed");
                        // A pause before retrying, so a broken loop does not
                        // spin. The loop lives as long as the process, so
                        // there is nothing to stop and no clock to consult.
                        std::thread::park_timeout(EVENT_LOOP_RETRY);
                    }
                })
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .clone()
}

type Sink = UnboundedSender<LifecycleEvent>;
type LifecycleCb =
    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void) -> c_int;
type GenericCb = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void);

/// Registers for lifecycle events of every domain on `conn`; returns the
/// callback id. The registration ends when the connection closes or on
/// [`deregister`].
pub fn register(conn: &Connect, sink: Sink) -> Result<i32, String> {
    let opaque = Box::into_raw(Box::new(sink)).cast::<c_void>();
    // SAFETY: the lifecycle callback has the signature libvirt calls for
    // VIR_DOMAIN_EVENT_ID_LIFECYCLE; the generic pointer type is how the C
    // API takes every event callback (VIR_DOMAIN_EVENT_CALLBACK casts it the
    // same way).
    let cb: sys::virConnectDomainEventGenericCallback =
        Some(unsafe { std::mem::transmute::<LifecycleCb, GenericCb>(lifecycle_cb as LifecycleCb) });
    // SAFETY: `conn` is a live connection; `opaque` is a leaked Box that
    // libvirt hands back to `lifecycle_cb` and finally to `free_sink`, which
    // reclaims it exactly once. On failure libvirt does not keep `opaque`,
    // so we reclaim it here.
    let id = unsafe {
        sys::virConnectDomainEventRegisterAny(
            conn.as_ptr(),
            std::ptr::null_mut(),
            sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int,
            cb,
            opaque,
            Some(free_sink),
        )
    };
    if id < 0 {
        // SAFETY: registration failed, so libvirt did not take ownership.
        drop(unsafe { Box::from_raw(opaque.cast::<Sink>()) });
        return Err(virt::error::Error::last_error().to_string());
    }
    Ok(id)
}

/// Ends a registration made by [`register`].
pub fn deregister(conn: &Connect, id: i32) {
    // SAFETY: `conn` is live; an unknown id only makes libvirt return -1.
    unsafe {
        sys::virConnectDomainEventDeregisterAny(conn.as_ptr(), id);
    }
}

unsafe extern "C" fn lifecycle_cb(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    // SAFETY: libvirt passes back the `opaque` given at registration (a
    // `Box<Sink>` that stays alive until `free_sink`), and a domain pointer
    // valid for the duration of the callback.
    let sink = unsafe { &*(opaque.cast::<Sink>()) };
    let name = unsafe { sys::virDomainGetName(dom) };
    let name = if name.is_null() {
        String::new()
    } else {
        // SAFETY: libvirt returns a NUL-terminated string owned by `dom`.
        unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned()
    };
    let mut buf = [0 as std::os::raw::c_char; 64];
    // SAFETY: the buffer is larger than VIR_UUID_STRING_BUFLEN (37).
    let uuid = if unsafe { sys::virDomainGetUUIDString(dom, buf.as_mut_ptr()) } == 0 {
        // SAFETY: on success libvirt wrote a NUL-terminated string.
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    } else {
        String::new()
    };
    let _ = sink.send(LifecycleEvent {
        name,
        uuid,
        event,
        detail,
    });
    0
}

unsafe extern "C" fn free_sink(opaque: *mut c_void) {
    if !opaque.is_null() {
        // SAFETY: `opaque` came from `Box::into_raw` in `register`; libvirt
        // calls this once, after the last callback.
        drop(unsafe { Box::from_raw(opaque.cast::<Sink>()) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_states() {
        let e = LifecycleEvent {
            name: "a".into(),
            uuid: "u".into(),
            event: 5,
            detail: 1,
        };
        assert_eq!(
            (e.event_name(), e.detail_name(), e.state()),
            ("stopped", "destroyed", VmState::Stopped)
        );
        let odd = LifecycleEvent {
            event: 99,
            detail: -1,
            ..e
        };
        assert_eq!((odd.event_name(), odd.detail_name()), ("unknown", "unknown"));
    }

    #[tokio::test]
    async fn the_test_driver_pushes_lifecycle_events() {
        start_event_loop().unwrap_or_else(|e| panic!("{e}"));
        let conn = Connect::open(Some("test:///default")).unwrap_or_else(|e| panic!("{e}"));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let id = register(&conn, tx).unwrap_or_else(|e| panic!("{e}"));
        let dom = conn
            .lookup_domain_by_name("test")
            .unwrap_or_else(|e| panic!("{e}"));
        dom.suspend().unwrap_or_else(|e| panic!("{e}"));
        dom.resume().unwrap_or_else(|e| panic!("{e}"));
        let mut got = Vec::new();
        // Events arrive from libvirt's event thread; give up after 5 s.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while got.len() < 2 {
                match rx.recv().await {
                    Some(e) => got.push((e.name.clone(), e.event_name(), e.detail_name())),
                    None => break,
                }
            }
        })
        .await;
        assert_eq!(
            got,
            [
                ("test".to_string(), "suspended", "paused"),
                ("test".to_string(), "resumed", "unpaused")
            ]
        );
        deregister(&conn, id);
    }
}
