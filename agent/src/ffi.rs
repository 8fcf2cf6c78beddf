//! libvirt calls the `virt` crate does not wrap (besides the event
//! registration in `events`). Each is one call on a handle the caller owns.

#![allow(unsafe_code)]

use virt::domain::Domain;
use virt::sys;

/// Aborts the domain's current job (a running migration); libvirt then
/// rolls the migration back and the domain keeps running here.
pub fn abort_job(dom: &Domain) -> Result<(), String> {
    // SAFETY: `dom` is a live domain handle for the duration of the call
    // (we borrow it); virDomainAbortJob only reads it and is thread-safe.
    let rc = unsafe { sys::virDomainAbortJob(dom.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(virt::error::Error::last_error().to_string())
    }
}
