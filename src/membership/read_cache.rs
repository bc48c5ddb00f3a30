//! An exact cache of the SQLite store's hot reads: users, rooms, a room's members and an
//! endpoint's memberships.
//!
//! Every control-plane request looks up its caller, most check a membership, and every
//! connection lists the user's rooms; on one node each was a SQLite read transaction
//! (file locks taken and released with `fcntl`, a statement step), the largest part of a
//! read's cost in the node once the rest was cut (BENCHMARKS.md, `ctl_read`).
//!
//! A cache can be *exact* here, never stale, because this process is the file's only
//! writer (the data dir is locked) and every write goes through the store's one write
//! path, which brackets it with [`ReadCache::begin_write`]:
//! - while any write is in flight the cache is bypassed: no hits, no fills;
//! - a write empties the cache when it begins, and moves `generation` on when it ends
//!   (committed or not);
//! - a read fills the cache only if it began with no write in flight and no write has
//!   begun since (same `generation`, none in flight), so it read what is committed now.
//!
//! Together: whatever the cache answers is what a read of the file would answer at that
//! moment. Writes are rare next to reads in a control plane, so emptying everything on
//! each one costs little and keeps the rule simple to check. Memory is bounded by
//! [`MAX_ITEMS`] (a user, a room, a member record count one each); when full, the cache
//! starts over, and a single answer larger than that is not kept at all.
//!
//! The KV store has no such cache: other nodes write its buckets.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Member, Result, Room, User};

/// Items (users, rooms, member records) kept at most: a few MiB.
pub const MAX_ITEMS: usize = 20_000;

/// What an entry counts against [`MAX_ITEMS`].
pub trait Weight {
    fn weight(&self) -> usize;
}

impl Weight for User {
    fn weight(&self) -> usize {
        1
    }
}

impl Weight for Room {
    fn weight(&self) -> usize {
        1
    }
}

impl Weight for Vec<Member> {
    fn weight(&self) -> usize {
        self.len() + 1
    }
}

/// The cached reads, one map per kind, by key.
#[derive(Default)]
pub struct Tables {
    pub users: HashMap<String, User>,
    pub rooms: HashMap<String, Room>,
    /// A room's members, by room id.
    pub members: HashMap<String, Vec<Member>>,
    /// An endpoint's memberships, by user key.
    pub rooms_of: HashMap<String, Vec<Member>>,
}

/// Picks one of the [`Tables`].
pub type Table<V> = fn(&mut Tables) -> &mut HashMap<String, V>;

#[derive(Default)]
struct State {
    generation: u64,
    writing: usize,
    /// The store was closed: reads must fail as they would on the file.
    closed: bool,
    items: usize,
    tables: Tables,
}

impl State {
    fn clear(&mut self) {
        self.items = 0;
        self.tables = Tables::default();
    }
}

#[derive(Default)]
pub struct ReadCache {
    state: Mutex<State>,
}

/// A write in flight; dropping it ends the write (see the module doc).
pub struct Writing {
    cache: Arc<ReadCache>,
}

impl Drop for Writing {
    fn drop(&mut self) {
        let mut state = self.cache.lock();
        state.writing -= 1;
        state.generation += 1;
    }
}

impl ReadCache {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding it leaves at worst a missing entry: keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Call before a write touches the file (before it takes the connection); hold the
    /// result until the write has committed or failed.
    pub fn begin_write(self: &Arc<Self>) -> Writing {
        let mut state = self.lock();
        state.writing += 1;
        state.clear();
        Writing {
            cache: Arc::clone(self),
        }
    }

    /// Empties the cache for good: the store is closing.
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.clear();
    }

    /// The entry for `key` in `table`, or `load`'s answer, kept when it is safe to (see
    /// the module doc). Errors are not kept.
    pub fn through<V: Clone + Weight>(
        &self,
        table: Table<V>,
        key: &str,
        load: impl FnOnce() -> Result<V>,
    ) -> Result<V> {
        let began = {
            let mut state = self.lock();
            if state.writing > 0 || state.closed {
                None
            } else if let Some(hit) = table(&mut state.tables).get(key) {
                return Ok(hit.clone());
            } else {
                Some(state.generation)
            }
        };
        let value = load()?;
        let mut state = self.lock();
        let weight = value.weight();
        // `closed` too: a read that began before `close` must not refill the cache.
        if began == Some(state.generation)
            && state.writing == 0
            && !state.closed
            && weight <= MAX_ITEMS
        {
            if state.items + weight > MAX_ITEMS {
                state.clear();
            }
            state.items += weight;
            if let Some(old) = table(&mut state.tables).insert(key.to_string(), value.clone()) {
                state.items -= old.weight();
            }
        }
        Ok(value)
    }

    /// Entries held (for tests).
    #[cfg(test)]
    pub fn items(&self) -> usize {
        self.lock().items
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::StoreError;

    fn room(id: &str, name: &str) -> Room {
        Room {
            id: id.into(),
            name: name.into(),
            owner: "U".into(),
            encrypted: false,
            created_at: 1,
        }
    }

    fn rooms(t: &mut Tables) -> &mut HashMap<String, Room> {
        &mut t.rooms
    }

    #[test]
    fn a_second_read_is_a_hit_until_a_write_begins() {
        let cache = Arc::new(ReadCache::default());
        let loads = std::cell::Cell::new(0);
        let load = |name: &'static str| {
            loads.set(loads.get() + 1);
            Ok(room("r", name))
        };
        assert_eq!(cache.through(rooms, "r", || load("a")).unwrap().name, "a");
        assert_eq!(cache.through(rooms, "r", || load("b")).unwrap().name, "a");
        assert_eq!(loads.get(), 1);
        drop(cache.begin_write());
        assert_eq!(cache.through(rooms, "r", || load("b")).unwrap().name, "b");
        assert_eq!(loads.get(), 2);
    }

    /// The room `r` through the cache, as `load_name` if the cache asks the file.
    fn room_name(cache: &ReadCache, load_name: &str) -> String {
        cache
            .through(rooms, "r", || Ok(room("r", load_name)))
            .unwrap()
            .name
    }

    #[test]
    fn nothing_is_kept_or_served_while_a_write_is_in_flight() {
        let cache = Arc::new(ReadCache::default());
        room_name(&cache, "old");
        let writing = cache.begin_write();
        // The write may or may not have committed yet: every read goes to the file.
        assert_eq!(room_name(&cache, "new"), "new");
        assert_eq!(cache.items(), 0);
        drop(writing);
        assert_eq!(room_name(&cache, "newer"), "newer");
        assert_eq!(cache.items(), 1);
    }

    #[test]
    fn a_read_that_a_write_overlapped_is_not_kept() {
        let cache = Arc::new(ReadCache::default());
        // The read began before the write and read the old row; the write began and ended
        // while it ran.
        let value = cache
            .through(rooms, "r", || {
                drop(cache.begin_write());
                Ok(room("r", "old"))
            })
            .unwrap();
        assert_eq!(value.name, "old");
        assert_eq!(cache.items(), 0);
        assert_eq!(room_name(&cache, "new"), "new");
    }

    #[test]
    fn errors_are_not_kept() {
        let cache = ReadCache::default();
        let missing = cache.through(rooms, "r", || Err(StoreError::not_found("room r")));
        assert!(matches!(missing, Err(StoreError::NotFound { .. })));
        assert_eq!(cache.items(), 0);
    }

    #[test]
    fn nothing_is_kept_after_close_or_beyond_the_bound() {
        let cache = ReadCache::default();
        // A read that began before the close and ended after it.
        cache
            .through(rooms, "r", || {
                cache.close();
                Ok(room("r", "x"))
            })
            .unwrap();
        assert_eq!(cache.items(), 0);
        let open = ReadCache::default();
        let huge: Vec<Member> = (0..MAX_ITEMS)
            .map(|i| Member {
                room: "r".into(),
                endpoint: format!("U{i}"),
                role: crate::membership::Role::Member,
                state: crate::membership::MemberState::Joined,
                added_by: "U".into(),
                added_at: 1,
                room_created_at: None,
            })
            .collect();
        open.through(|t| &mut t.members, "r", || Ok(huge.clone()))
            .unwrap();
        assert_eq!(open.items(), 0);
    }

    #[test]
    fn a_full_cache_starts_over() {
        let cache = ReadCache::default();
        for i in 0..MAX_ITEMS {
            let id = format!("r{i}");
            cache.through(rooms, &id, || Ok(room(&id, "x"))).unwrap();
        }
        assert_eq!(cache.items(), MAX_ITEMS);
        cache
            .through(rooms, "one-more", || Ok(room("one-more", "x")))
            .unwrap();
        assert_eq!(cache.items(), 1);
    }
}
