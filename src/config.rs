//! Node configuration (being written).
