//! Host collectors: /proc parsers with reused buffers.
