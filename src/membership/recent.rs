//! Answers read lately from the KV store, kept for a moment so that a busy caller's writes
//! do not each pay a leader read for what the last one has just read.
//!
//! On the KV store, a leader read is a round trip to the stream's leader and about 0.1 ms
//! of the servers' CPU (more for a room: `STREAM.MSG.GET` goes through nats-server's
//! JetStream API); on a machine the write path keeps busy, that is throughput. Two answers
//! are kept, each trusted for [`FRESH`] (1 s) after the read that made it:
//!
//! - **callers**: gate 2's answer, "an active user, admin or not". On KV it was one leader
//!   read of `users` per request (two of a `rooms.create` + `members.invite` pair's four),
//!   and the invitee check of `members.invite` another. A user revoked through *another*
//!   node may still be served by this one for up to the window; the node that revokes
//!   forgets the key at once. DESIGN §3 gives a revocation 2 s to reach live connections
//!   cluster-wide, and live revocation closes the user's connections within milliseconds
//!   of the reply, after which nothing the user sends reaches any node (the callout
//!   refuses it). So the window stays inside the bound the design already sets, and holds
//!   it even when the live kick is lost.
//! - **rooms**: the room `members.invite`'s owner check reads, as created through this node
//!   or read by an earlier invite, used only when the caller owns it (so a copy can let the
//!   check pass, never fail). A room's owner and creation time never change, so the only
//!   thing a copy can miss is a delete through another node: an invite then is answered
//!   ok and writes a member record that grants nothing, because it carries the creation
//!   time of the room it was checked against and every reader requires that room. The
//!   reconciler removes it if the room is missing; under an id taken again, the next
//!   listing of the new room's members does (or an invite of that user replaces it).
//!   The same happens when the delete lands between the owner check's read and the
//!   member write; the copy widens that race from milliseconds to its window (1 s, plus
//!   the time the request then spends in its gates). It relies on every
//!   node comparing creation times, as nodes do since the seventh session: an older node
//!   would take such a record for a member of the new room. The node that deletes forgets
//!   the room at once. Only the invite's check uses the copy: deletes, key rotation and
//!   reads still read the leader.
//!
//! Only positive answers are kept: an unknown user or room is read every time, so one
//! created a moment ago is served at once. A key forgotten here stays marked for the
//! window, so a read that started before the forgetting and ends after it cannot put the
//! key back. Memory is bounded ([`MAX_ENTRIES`]); when full, stale entries go first, and
//! if that frees too little, every value read (a burst of new keys costs reads, never
//! freshness; marks of changes within the window stay, so only a burst of more changes
//! than that within one window grows the map past its bound). SQLite does not use this:
//! its store is local and keeps users and rooms exactly (one writer).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a read is trusted.
pub const FRESH: Duration = Duration::from_secs(1);
/// Most keys remembered at once.
pub const MAX_ENTRIES: usize = 10_000;

/// Active users read lately, by key, with their admin flag.
pub type Callers = Recent<bool>;
/// Rooms read (or created through this node) lately, by id.
pub type Rooms = Recent<super::Room>;

/// Values read lately, by key, each trusted for a window after its read.
pub struct Recent<V> {
    fresh: Duration,
    max_entries: usize,
    seen: Mutex<HashMap<String, Seen<V>>>,
}

#[derive(Clone, Debug)]
enum Seen<V> {
    /// Read by a read that started at `read_at`.
    Read { value: V, read_at: Instant },
    /// Changed through this node at `at` (a user revoked, a room deleted): reads started
    /// before then are not remembered.
    Forgotten { at: Instant },
}

impl<V> Seen<V> {
    fn since(&self) -> Instant {
        match self {
            Seen::Read { read_at, .. } => *read_at,
            Seen::Forgotten { at } => *at,
        }
    }
}

impl<V: Clone> Default for Recent<V> {
    fn default() -> Self {
        Recent::new(FRESH, MAX_ENTRIES)
    }
}

impl<V: Clone> Recent<V> {
    pub fn new(fresh: Duration, max_entries: usize) -> Self {
        Recent {
            fresh,
            max_entries,
            seen: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Seen<V>>> {
        // A panic elsewhere cannot leave the map half-written (every change is one call).
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The value read for `key` within the freshness window, if any.
    pub fn get(&self, key: &str) -> Option<V> {
        self.get_at(key, Instant::now())
    }

    fn get_at(&self, key: &str, now: Instant) -> Option<V> {
        match self.lock().get(key)? {
            Seen::Read { value, read_at }
                if now.saturating_duration_since(*read_at) < self.fresh =>
            {
                Some(value.clone())
            }
            _ => None,
        }
    }

    /// Records that `key` was just read as `value`. Call it with the time the read
    /// *started*, so the window never outlasts what the read could have seen.
    pub fn remember(&self, key: &str, value: V, read_at: Instant) {
        let mut seen = self.lock();
        if let Some(Seen::Forgotten { at }) = seen.get(key)
            && read_at <= *at
        {
            return; // the read may have seen the value before it changed
        }
        self.make_room(&mut seen, key, read_at);
        seen.insert(key.to_string(), Seen::Read { value, read_at });
    }

    /// Forgets `key`: it was just changed through this node.
    pub fn forget(&self, key: &str) {
        let at = Instant::now();
        let mut seen = self.lock();
        self.make_room(&mut seen, key, at);
        seen.insert(key.to_string(), Seen::Forgotten { at });
    }

    /// Keeps the map under `max_entries` before `key` goes in: stale entries go, and if
    /// that leaves it more than three quarters full, all of them (so a map full of fresh
    /// entries is not scanned again for every newcomer).
    fn make_room(&self, seen: &mut HashMap<String, Seen<V>>, key: &str, now: Instant) {
        if seen.len() < self.max_entries || seen.contains_key(key) {
            return;
        }
        let fresh = self.fresh;
        seen.retain(|_, entry| now.saturating_duration_since(entry.since()) < fresh);
        if seen.len() > self.max_entries * 3 / 4 {
            // Fresh marks of a change stay: dropping one would let a read from before the
            // change put the old value back.
            seen.retain(|_, entry| matches!(entry, Seen::Forgotten { .. }));
        }
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
        assert_eq!(callers.get_at("UA", t0), None);
        callers.remember("UA", true, t0);
        assert_eq!(callers.get_at("UA", t0), Some(true));
        assert_eq!(
            callers.get_at("UA", t0 + Duration::from_millis(999)),
            Some(true)
        );
        assert_eq!(callers.get_at("UA", t0 + Duration::from_secs(1)), None);
        callers.remember("UA", false, t0 + Duration::from_secs(2));
        assert_eq!(
            callers.get_at("UA", t0 + Duration::from_secs(2)),
            Some(false),
            "a later read replaces the earlier one"
        );
    }

    #[test]
    fn a_forgotten_key_is_read_again_and_a_read_from_before_cannot_bring_it_back() {
        let callers = Callers::default();
        let before = Instant::now();
        callers.remember("UA", false, before);
        callers.forget("UA");
        assert_eq!(callers.get("UA"), None);
        // A read that started before the change and ended after it.
        callers.remember("UA", false, before);
        assert_eq!(callers.get("UA"), None);
        // A read that started after it is news.
        callers.remember("UA", true, Instant::now());
        assert_eq!(callers.get("UA"), Some(true));
    }

    #[test]
    fn memory_stays_bounded_and_stale_entries_go_first() {
        let callers = Callers::new(Duration::from_secs(1), 4);
        let t0 = Instant::now();
        callers.remember("old", false, t0);
        let t1 = t0 + Duration::from_secs(5);
        for key in ["a", "b", "c"] {
            callers.remember(key, false, t1);
        }
        // Full: the stale entry makes room.
        callers.remember("d", false, t1);
        assert_eq!(callers.len(), 4);
        assert_eq!(callers.get_at("old", t1), None);
        for key in ["a", "b", "c", "d"] {
            assert_eq!(callers.get_at(key, t1), Some(false), "{key}");
        }
        // Refreshing a present key never evicts.
        callers.remember("d", true, t1);
        assert_eq!(callers.len(), 4);
        // Full of fresh entries: all go, the newcomer stays; nothing is ever kept longer.
        callers.remember("e", true, t1);
        assert_eq!(callers.len(), 1);
        assert_eq!(callers.get_at("e", t1), Some(true));
        // A forgotten key is an entry too...
        callers.forget("f");
        assert_eq!(callers.len(), 2);
        assert_eq!(callers.get_at("f", t1), None);
        // ...and one that outlives a clearing: a read from before it still cannot bring
        // the key back.
        let before = Instant::now();
        callers.forget("g");
        for key in ["h", "i"] {
            callers.remember(key, true, Instant::now());
        }
        assert_eq!(
            callers.len(),
            3,
            "cleared but for the two marks and the newcomer"
        );
        callers.remember("g", true, before);
        assert_eq!(callers.get("g"), None);
    }
}
