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

/// The kernel's clock tick rate (`USER_HZ`, the unit of `/proc/stat`),
/// if `sysconf` knows it.
pub fn clock_ticks_per_second() -> Option<u64> {
    // SAFETY: sysconf only reads a constant of the C library; it touches no
    // memory of ours.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).ok().filter(|hz| *hz > 0)
}

/// One typed parameter value of a domain stats record.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TypedValue<'a> {
    /// `VIR_TYPED_PARAM_INT` and `VIR_TYPED_PARAM_LLONG`.
    Int(i64),
    /// `VIR_TYPED_PARAM_UINT` and `VIR_TYPED_PARAM_ULLONG`.
    UInt(u64),
    /// `VIR_TYPED_PARAM_DOUBLE`.
    Double(f64),
    /// `VIR_TYPED_PARAM_BOOLEAN`.
    Bool(bool),
    /// `VIR_TYPED_PARAM_STRING`, borrowed from the record.
    Str(&'a str),
}

impl TypedValue<'_> {
    /// The value as an integer: integers as they are (unsigned ones above
    /// `i64::MAX` pinned there), booleans as 0 or 1; `None` for doubles and
    /// strings.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            TypedValue::Int(v) => Some(v),
            TypedValue::UInt(v) => Some(i64::try_from(v).unwrap_or(i64::MAX)),
            TypedValue::Bool(b) => Some(i64::from(b)),
            TypedValue::Double(_) | TypedValue::Str(_) => None,
        }
    }

    /// The string, for string parameters.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            TypedValue::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// The parameters of one domain stats record, as `(field, value)` pairs in
/// libvirt's order. Parameters whose field name or string value is not
/// UTF-8, and values of unknown types, are skipped. Nothing is copied: both borrow from the record list, which
/// lives for the duration of the [`all_domain_stats`] callback.
pub struct StatsParams<'a> {
    params: std::slice::Iter<'a, sys::virTypedParameter>,
}

impl std::fmt::Debug for StatsParams<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatsParams")
            .field("remaining", &self.params.len())
            .finish()
    }
}

impl<'a> Iterator for StatsParams<'a> {
    type Item = (&'a str, TypedValue<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        for p in self.params.by_ref() {
            // SAFETY: `field` is a plain array of `c_char` (same size and
            // alignment as `u8`), borrowed for 'a like `p`.
            let field: &'a [u8] =
                unsafe { std::slice::from_raw_parts(p.field.as_ptr().cast::<u8>(), p.field.len()) };
            let Some(field) = std::ffi::CStr::from_bytes_until_nul(field)
                .ok()
                .and_then(|c| c.to_str().ok())
            else {
                continue;
            };
            let Ok(kind) = u32::try_from(p.type_) else {
                continue;
            };
            // SAFETY: libvirt sets `type_` to say which member of the `value`
            // union it wrote; each arm reads only that member (plain data).
            let value = unsafe {
                match kind {
                    sys::VIR_TYPED_PARAM_INT => Raw::Int(i64::from(p.value.i)),
                    sys::VIR_TYPED_PARAM_UINT => Raw::UInt(u64::from(p.value.ui)),
                    sys::VIR_TYPED_PARAM_LLONG => Raw::Int(p.value.l),
                    sys::VIR_TYPED_PARAM_ULLONG => Raw::UInt(p.value.ul),
                    sys::VIR_TYPED_PARAM_DOUBLE => Raw::Double(p.value.d),
                    sys::VIR_TYPED_PARAM_BOOLEAN => Raw::Bool(p.value.b != 0),
                    sys::VIR_TYPED_PARAM_STRING => Raw::Str(p.value.s),
                    _ => continue,
                }
            };
            let value = match value {
                Raw::Int(v) => TypedValue::Int(v),
                Raw::UInt(v) => TypedValue::UInt(v),
                Raw::Double(v) => TypedValue::Double(v),
                Raw::Bool(v) => TypedValue::Bool(v),
                Raw::Str(s) if s.is_null() => continue,
                Raw::Str(s) => {
                    // SAFETY: a non-null string parameter is a NUL-terminated
                    // string owned by the record list, which outlives 'a.
                    match unsafe { std::ffi::CStr::from_ptr(s) }.to_str() {
                        Ok(s) => TypedValue::Str(s),
                        Err(_) => continue,
                    }
                }
            };
            return Some((field, value));
        }
        None
    }
}

/// A parameter value as read from the union, before a string is borrowed.
enum Raw {
    Int(i64),
    UInt(u64),
    Double(f64),
    Bool(bool),
    Str(*const std::os::raw::c_char),
}

/// Owns the array `virConnectGetAllDomainStats` returned and frees it (the
/// records, their parameters and their domain references) when dropped,
/// also when the callback returns early or panics.
struct RecordList {
    ptr: *mut sys::virDomainStatsRecordPtr,
    len: usize,
}

impl RecordList {
    /// The records, borrowed from the list.
    fn records(&self) -> impl Iterator<Item = &sys::virDomainStatsRecord> {
        let ptrs: &[sys::virDomainStatsRecordPtr] = if self.ptr.is_null() {
            &[]
        } else {
            // SAFETY: `ptr` points to `len` record pointers (followed by a
            // NULL), valid until `self` is dropped.
            unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
        };
        ptrs.iter().filter_map(|&rec| {
            // SAFETY: a record of the list is null or valid while the list
            // lives, which the returned borrow of `self` guarantees.
            unsafe { rec.as_ref() }
        })
    }
}

impl Drop for RecordList {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: the pointer came from a successful
            // virConnectGetAllDomainStats and is freed exactly once, here.
            unsafe { sys::virDomainStatsRecordListFree(self.ptr) };
        }
    }
}

/// Bulk statistics of many domains in one call: runs
/// `virConnectGetAllDomainStats(conn, stats, .., flags)` (`stats` and
/// `flags` as libvirt takes them: `VIR_DOMAIN_STATS_*` and
/// `VIR_CONNECT_GET_ALL_DOMAINS_STATS_*`; 0 and 0 mean every supported
/// group for every domain), then calls `f` once per record with the
/// domain's UUID and its parameters, in libvirt's order. Records whose UUID
/// cannot be read are skipped. Nothing is allocated per parameter; the
/// records are freed before this returns.
pub fn all_domain_stats(
    conn: &virt::connect::Connect,
    stats: u32,
    flags: u32,
    mut f: impl FnMut([u8; 16], &mut StatsParams<'_>),
) -> Result<(), String> {
    let mut records: *mut sys::virDomainStatsRecordPtr = std::ptr::null_mut();
    // SAFETY: `conn` is a live connection for the duration of the call;
    // `records` is a valid out-pointer that libvirt fills with a
    // NULL-terminated array it allocated (or leaves alone on failure).
    let n = unsafe { sys::virConnectGetAllDomainStats(conn.as_ptr(), stats, &mut records, flags) };
    if n < 0 {
        return Err(virt::error::Error::last_error().to_string());
    }
    let list = RecordList {
        ptr: records,
        len: usize::try_from(n).unwrap_or(0),
    };
    for rec in list.records() {
        let mut uuid = [0u8; 16];
        // SAFETY: `rec.dom` is the record's domain reference (alive with the
        // list) and `uuid` has VIR_UUID_BUFLEN (16) bytes for libvirt to fill.
        if unsafe { sys::virDomainGetUUID(rec.dom, uuid.as_mut_ptr()) } != 0 {
            continue;
        }
        let params: &[sys::virTypedParameter] = match usize::try_from(rec.nparams) {
            Ok(np) if np > 0 && !rec.params.is_null() => {
                // SAFETY: libvirt says `params` holds `nparams` parameters,
                // alive as long as the record (borrowed from `list`).
                unsafe { std::slice::from_raw_parts(rec.params, np) }
            }
            _ => &[],
        };
        f(
            uuid,
            &mut StatsParams {
                params: params.iter(),
            },
        );
    }
    Ok(())
}
