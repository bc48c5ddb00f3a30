//! The membership store (being written).
