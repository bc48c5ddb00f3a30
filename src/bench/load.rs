//! A single SQLite node under a large store: `rooms_for_endpoint_p99_ms_1m` (the p99 of
//! signed `members.rooms` calls for random users, the query behind every connection's
//! permissions) and `node_rss_mib` (the node process's resident memory at that load,
//! nats-server excluded).
//!
//! The memberships are written into the node's SQLite file before it starts
//! (`membership::sqlite::bulk_load`, one transaction): loading a million through the
//! control plane would take hours and measure the loader, not the query. The shape is
//! `memberships / 10` users and as many rooms, each user in ten rooms (owner of one), so
//! each answer carries ten members, like a busy user's.

use std::path::Path;
use std::time::{Duration, Instant};

use super::{Workload, client, value_workload};
use crate::localnet::{Node, Ports};
use crate::membership::{Member, MemberState, Role, Room, Snapshot, User};

/// Rooms per user.
const ROOMS_EACH: usize = 10;

/// The synthetic store: `memberships` rounded down to a multiple of ten.
pub fn synthetic(memberships: usize) -> Snapshot {
    let users_n = (memberships / ROOMS_EACH).max(ROOMS_EACH);
    let now = crate::membership::now_ms();
    let users: Vec<User> = (0..users_n)
        .map(|i| User {
            key: nkeys::KeyPair::new_user().public_key(),
            name: format!("u{i}"),
            admin: false,
            created_at: now,
            revoked_at: None,
            xkey: None,
        })
        .collect();
    let rooms: Vec<Room> = (0..users_n)
        .map(|i| Room {
            id: format!("r{i}"),
            name: format!("r{i}"),
            owner: users[i].key.clone(),
            encrypted: false,
            created_at: now,
        })
        .collect();
    let stride = users_n / ROOMS_EACH;
    let mut members = Vec::with_capacity(users_n * ROOMS_EACH);
    for (u, user) in users.iter().enumerate() {
        for j in 0..ROOMS_EACH {
            // Distinct for j < ROOMS_EACH because stride * ROOMS_EACH <= users_n.
            let room = (u + j * stride) % users_n;
            members.push(Member {
                room: rooms[room].id.clone(),
                endpoint: user.key.clone(),
                role: if j == 0 { Role::Owner } else { Role::Member },
                state: MemberState::Joined,
                added_by: rooms[room].owner.clone(),
                added_at: now,
                room_created_at: None,
            });
        }
    }
    Snapshot {
        users,
        rooms,
        members,
        keys: Vec::new(),
    }
}

/// Loads `memberships` into a fresh node's store, starts it, and measures. Returns both
/// workloads.
pub async fn rooms_for_endpoint(
    unibus: &Path,
    memberships: usize,
    queries: usize,
) -> Result<Vec<Workload>, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let data = dir.path().join("bench");
    let (unibus, d) = (unibus.to_path_buf(), data.clone());
    let (node, users, load_s) = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let snapshot = synthetic(memberships);
        std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
        crate::membership::sqlite::bulk_load(&d.join(crate::node::store::SQLITE_FILE), &snapshot)
            .map_err(|e| e.to_string())?;
        let load_s = started.elapsed().as_secs_f64();
        let node = Node::start_in(&unibus, "bench", &Ports::pick(), &[], &[], &d);
        node.wait_ready(Duration::from_secs(60));
        let users: Vec<String> = snapshot.users.into_iter().map(|u| u.key).collect();
        Ok::<_, String>((node, users, load_s))
    })
    .await
    .map_err(|e| e.to_string())??;
    eprintln!(
        "bench: loaded {} memberships in {load_s:.1}s",
        users.len() * ROOMS_EACH
    );
    let secrets = data.join(crate::auth::certs::DEV_SECRETS_DIR);
    let admin = client(
        &secrets,
        &[&node.ports.listen],
        &secrets.join(crate::auth::certs::ADMIN_SEED),
    )
    .await?;
    let mut latencies = Vec::with_capacity(queries);
    // xorshift64: random enough to spread the lookups, no dependency for it.
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ (Instant::now().elapsed().as_nanos() as u64 | 1);
    for _ in 0..queries {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let key = &users[(state % users.len() as u64) as usize];
        let started = Instant::now();
        let rooms = admin
            .memberships(Some(key))
            .await
            .map_err(|e| e.to_string())?;
        latencies.push(started.elapsed());
        if rooms.len() != ROOMS_EACH {
            return Err(format!(
                "members.rooms for {key} returned {} rooms, not {ROOMS_EACH}",
                rooms.len()
            ));
        }
    }
    latencies.sort();
    let p99 = percentile(&latencies, 0.99).as_secs_f64() * 1000.0;
    let rss = node
        .rss_mib()
        .ok_or("cannot read the node's resident memory")?;
    drop(node);
    let mut lookup = value_workload("rooms_for_endpoint_p99_ms_1m", p99, None, "ms");
    lookup.p50_ms = Some(percentile(&latencies, 0.5).as_secs_f64() * 1000.0);
    lookup.p99_ms = Some(p99);
    Ok(vec![
        lookup,
        value_workload("node_rss_mib", rss, None, "MiB"),
    ])
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn every_user_is_in_ten_distinct_rooms_and_owns_one() {
        let s = synthetic(200);
        assert_eq!(s.users.len(), 20);
        assert_eq!(s.members.len(), 200);
        for u in &s.users {
            let rooms: BTreeSet<&str> = s
                .members
                .iter()
                .filter(|m| m.endpoint == u.key)
                .map(|m| m.room.as_str())
                .collect();
            assert_eq!(rooms.len(), ROOMS_EACH);
        }
        for r in &s.rooms {
            assert!(
                s.members
                    .iter()
                    .any(|m| m.room == r.id && m.endpoint == r.owner && m.role == Role::Owner)
            );
        }
    }

    #[test]
    fn percentiles_pick_from_sorted_latencies() {
        let l: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&l, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }
}
