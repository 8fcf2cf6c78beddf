//! VM collector: libvirt bulk domain stats for all domains in one call.
