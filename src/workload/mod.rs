//! A workload to run against a cluster while it is being changed — migrated, grown from R1
//! to R3, restarted node by node, partitioned — and a checker for what it saw.
//!
//! The deploy demos (`scripts/cluster upgrade-demo`, `partition-demo`) need evidence, not
//! impressions: `run` records every control-plane write and every new connection as a JSON
//! line ([`history`]); `check` reads the history back and asks the cluster whether every
//! acknowledged write is still there ([`check`]). Keeping the two apart means a history can
//! be checked after the cluster has been restarted, or by a different node, and a failed
//! demo leaves a file to look at.
//!
//! Room messages are not part of the workload yet: there is no `unibus send/listen` to
//! drive, and raw core-NATS pub/sub would only measure NATS's at-most-once delivery.

pub mod check;
pub mod history;
pub mod run;

pub use check::{Isolation, Report};
pub use run::{RunOptions, RunSummary, Target};

/// Why a workload command could not do its job (not: what it found — that is a [`Report`]).
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// Bad input (a seed that is not one, a history that is not one): exit 2.
    #[error("{0}")]
    Usage(String),
    /// The cluster could not be reached or refused to start the run: exit 1.
    #[error("{0}")]
    Remote(String),
    #[error("{0}")]
    Io(String),
}

impl WorkloadError {
    pub fn exit_code(&self) -> u8 {
        match self {
            WorkloadError::Usage(_) => 2,
            _ => 1,
        }
    }
}
