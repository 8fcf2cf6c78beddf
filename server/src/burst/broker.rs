//! The burst broker's driver task (being written).
