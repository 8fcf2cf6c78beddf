//! The on-disk spool of metric batches the server has not acknowledged.
