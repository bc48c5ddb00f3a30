//! Callers seen lately: gate 2's answer ("an active user, admin or not"), kept for a moment
//! so that a busy caller's writes do not each pay a leader read of its user record.
//!
//! On the KV store, gate 2 was one leader read of `users` per request (two of a
//! `rooms.create` + `members.invite` pair's four), and the invitee check of
//! `members.invite` another. A leader read is a round trip to the stream's leader and about
//! 0.1 ms of servers' CPU; on a machine the write path keeps busy, that is throughput.
//!
//! **What it costs in freshness.** An entry is trusted for [`FRESH`] (1 s) after the read
//! that made it, so a user revoked through *another* node may still be served by this one
//! for up to that long; the node that revokes forgets the key at once. DESIGN §3 gives a
//! revocation 2 s to reach live connections cluster-wide, and live revocation closes the
//! user's connections within milliseconds of the reply, after which nothing the user sends
//! reaches any node (the callout refuses it). So the cache stays inside the bound the
//! design already sets, and holds it even when the live kick is lost.
//!
//! Only positive answers are kept: an unknown or revoked key is read every time, so a user
//! added a moment ago is served at once. Memory is bounded ([`MAX_ENTRIES`]); when full,
//! stale entries go first, then everything (a burst of new callers costs reads, never
//! freshness). SQLite does not use this: its store already keeps users exactly (one
//! writer).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a read of a caller's user record is trusted.
pub const FRESH: Duration = Duration::from_secs(1);
/// Most callers remembered at once.
pub const MAX_ENTRIES: usize = 10_000;

/// Active users read lately, by key, with their admin flag.
pub struct Callers {
    fresh: Duration,
    max_entries: usize,
    seen: Mutex<HashMap<String, (bool, Instant)>>,
}

impl Default for Callers {
    fn default() -> Self {
        Callers::new(FRESH, MAX_ENTRIES)
    }
}

impl Callers {
    pub fn new(fresh: Duration, max_entries: usize) -> Self {
        Callers {
            fresh,
            max_entries,
            seen: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (bool, Instant)>> {
        // A panic elsewhere cannot leave the map half-written (every change is one call).
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `Some(admin)` if `key` was read as an active user within the freshness window.
    pub fn active(&self, key: &str) -> Option<bool> {
        self.active_at(key, Instant::now())
    }

    fn active_at(&self, key: &str, now: Instant) -> Option<bool> {
        let seen = self.lock();
        let (admin, read_at) = seen.get(key)?;
        (now.saturating_duration_since(*read_at) < self.fresh).then_some(*admin)
    }

    /// Records that `key` was just read as an active user. Call it with the time the read
    /// *started*, so the window never outlasts what the read could have seen.
    pub fn remember(&self, key: &str, admin: bool, read_at: Instant) {
        let mut seen = self.lock();
        if seen.len() >= self.max_entries && !seen.contains_key(key) {
            let fresh = self.fresh;
            seen.retain(|_, (_, at)| read_at.saturating_duration_since(*at) < fresh);
            if seen.len() >= self.max_entries {
                seen.clear();
            }
        }
        seen.insert(key.to_string(), (admin, read_at));
    }

    /// Forgets `key` (it was just revoked through this node).
    pub fn forget(&self, key: &str) {
        self.lock().remove(key);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_serves_within_its_window_and_not_after() {
        let callers = Callers::new(Duration::from_secs(1), 10);
        let t0 = Instant::now();
        assert_eq!(callers.active_at("UA", t0), None);
        callers.remember("UA", true, t0);
        assert_eq!(callers.active_at("UA", t0), Some(true));
        assert_eq!(
            callers.active_at("UA", t0 + Duration::from_millis(999)),
            Some(true)
        );
        assert_eq!(callers.active_at("UA", t0 + Duration::from_secs(1)), None);
        callers.remember("UA", false, t0 + Duration::from_secs(2));
        assert_eq!(
            callers.active_at("UA", t0 + Duration::from_secs(2)),
            Some(false),
            "a later read replaces the earlier one"
        );
    }

    #[test]
    fn a_forgotten_key_is_read_again() {
        let callers = Callers::default();
        callers.remember("UA", false, Instant::now());
        callers.forget("UA");
        assert_eq!(callers.active("UA"), None);
    }

    #[test]
    fn memory_stays_bounded_and_stale_entries_go_first() {
        let callers = Callers::new(Duration::from_secs(1), 3);
        let t0 = Instant::now();
        callers.remember("old", false, t0);
        let t1 = t0 + Duration::from_secs(5);
        callers.remember("a", false, t1);
        callers.remember("b", false, t1);
        // Full: the stale entry makes room.
        callers.remember("c", false, t1);
        assert_eq!(callers.len(), 3);
        assert_eq!(callers.active_at("old", t1), None);
        for key in ["a", "b", "c"] {
            assert_eq!(callers.active_at(key, t1), Some(false), "{key}");
        }
        // Full of fresh entries: all go, the newcomer stays; nothing is ever kept longer.
        callers.remember("d", true, t1);
        assert_eq!(callers.len(), 1);
        assert_eq!(callers.active_at("d", t1), Some(true));
        // Refreshing a present key never evicts.
        callers.remember("d", false, t1);
        assert_eq!(callers.len(), 1);
    }
}
