//! The node runtime (being written).
