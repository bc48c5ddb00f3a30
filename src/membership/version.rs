//! The cluster's finalized version: what every node of a cluster is known to run.
//!
//! Some changes are safe only once *no* node runs code from before them. Three are built
//! so far; two on the write path:
//! - a write that arrives on its signer's own subject under `bus-auth=enforce` is not
//!   signature-checked, because the server vouches for the publisher (as it already does
//!   for connection-bound reads). A node from before own subjects grants its users
//!   `unibus.ctl.>`, so while one runs, skipping the check would let its users write as
//!   anyone;
//! - `rooms.create` writes the room, its owner's member record and index entry in one
//!   stage, undoing the last two if the id turns out to be taken. Until the undo lands,
//!   the loser's owner record sits under the winner's room id. Nodes of this version
//!   never count a creator's owner record (one its holder added for itself) that does not name the room's owner
//!   ([`super::Member::belongs_to`]); older nodes would, if its creation time matched.
//!
//! and one on the read path: a connection-bound read may leave out `ts`, `nonce` and `key`
//! (the key is in its reply inbox), which nodes before [`MINIMAL_READS`] refuse as
//! malformed, so clients send it only once a node says the cluster is finalized there.
//!
//! Polling the nodes cannot tell that no old node will run again: a node that is down
//! does not answer, and may come back on old code between two polls. So, as databases do,
//! the version is *finalized*: once every node runs this code, the operator runs `unibus
//! cluster finalize`, which checks every node of the cluster answers with this
//! [`PROTOCOL`] and then writes it to the store under the reserved key [`KEY`] (no id can
//! start with `_`). Nodes read it when they open the store and every couple of seconds
//! after, and turn on what needs it only once they read it there. A node of this code or
//! later whose version is older than the finalized one refuses to open the store (its
//! readiness says why). Binaries from before the record cannot know it: after finalizing,
//! the operator must never start one on the cluster again, which is the promise
//! `finalize` asks for. A cluster created by this code starts finalized: the node that
//! creates the `users` bucket writes the record (as does one that finds the bucket under a
//! minute old without it: an open that created it may have failed and been retried).
//!
//! The cost is one more step in an upgrade from a cluster created before this code, and
//! no way back to code older than the finalized version. A single SQLite node is the
//! whole cluster, and is always at its own version.

use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// The protocol version of this code. 0 stands for every version before the record
/// existed; 1 brought the unsigned own-subject writes and the one-stage `rooms.create`;
/// 2 the minimal read envelope.
pub const PROTOCOL: u32 = 2;

/// The version at which own-subject writes skip the signature check.
pub const OWN_SUBJECT_UNSIGNED: u32 = 1;

/// The version at which `rooms.create` writes in one stage.
pub const ONE_STAGE_CREATE: u32 = 1;

/// The version at which clients may send reads as minimal envelopes (`op` and `body`
/// only, the key taken from the reply inbox): every node's code takes them from then on.
pub const MINIMAL_READS: u32 = 2;

/// The reserved key the finalized version is stored under (in the `users` bucket).
pub const KEY: &str = "_version";

/// The stored record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub version: u32,
    /// Unix milliseconds.
    pub finalized_at: u64,
}

impl Record {
    /// This code's version, finalized now.
    pub fn now() -> Self {
        Record {
            version: PROTOCOL,
            finalized_at: super::now_ms(),
        }
    }
}

/// The finalized version as this node last read it, shared by the store's clones.
#[derive(Debug, Clone, Default)]
pub struct Finalized(Arc<AtomicU32>);

impl Finalized {
    pub fn get(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }

    /// True once the cluster is finalized at `version` or later.
    pub fn reached(&self, version: u32) -> bool {
        self.get() >= version
    }

    /// Records a version read from the store. It never goes down: a record is only ever
    /// raised, and a read that raced a finalize must not turn a feature off again.
    pub fn observe(&self, version: u32) {
        self.0.fetch_max(version, Ordering::Relaxed);
    }
}

/// Refuses a store finalized at a version this code does not speak.
pub fn check_supported(finalized: u32) -> Result<(), super::StoreError> {
    if finalized > PROTOCOL {
        return Err(super::StoreError::Invalid {
            field: "cluster version",
            reason: format!(
                "the cluster was finalized at version {finalized}, and this binary speaks \
                 version {PROTOCOL}; run a unibus binary at least as new as the rest of the \
                 cluster"
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_finalized_version_only_goes_up_and_a_newer_cluster_is_refused() {
        let f = Finalized::default();
        assert!(!f.reached(ONE_STAGE_CREATE));
        f.observe(PROTOCOL);
        assert!(f.reached(ONE_STAGE_CREATE) && f.reached(OWN_SUBJECT_UNSIGNED));
        f.observe(0);
        assert_eq!(f.get(), PROTOCOL, "a stale read must not turn features off");
        assert!(check_supported(PROTOCOL).is_ok());
        assert!(check_supported(0).is_ok());
        let err = check_supported(PROTOCOL + 1).unwrap_err().to_string();
        assert!(err.contains("at least as new"), "{err}");
    }
}
