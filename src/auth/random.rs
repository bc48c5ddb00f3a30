//! Random bytes for nonces: from the kernel's generator, drawn in batches per thread.
//!
//! Every control-plane request carries a fresh nonce and every encrypted message seals
//! under one. One `getrandom(2)` each cost more than what it protected: more than sealing
//! a 1 KiB body (~0.5 µs here), and about one system call in three of a client's read
//! (BENCHMARKS.md). So nonces come from a per-thread buffer of [`POOL_BYTES`] drawn at
//! once. A nonce is public and need only never repeat; bytes are handed out once and
//! wiped as they go. The only way a buffer could be used twice is a fork (the child
//! inherits it), so a forked child throws its inherited buffer away: a `pthread_atfork`
//! hook bumps a generation the buffer checks.
//!
//! Long-lived secrets (keys, seeds) do not come from here: they take
//! [`super::fill_random`] directly.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::{RandomError, fill_random};

/// Bytes drawn per `getrandom(2)` call.
pub const POOL_BYTES: usize = 768;

/// Bumped in the child after every `fork()`: buffered bytes from before it are the
/// parent's too, so they must not be used.
static FORKS: AtomicU64 = AtomicU64::new(0);
/// Set once the fork hook is registered; until then (or if registration failed) nothing
/// is buffered and every nonce comes straight from the kernel.
static FORK_SAFE: AtomicBool = AtomicBool::new(false);

extern "C" fn forked_child() {
    FORKS.fetch_add(1, Ordering::Relaxed);
}

/// Unused random bytes, per thread (no lock on the hot paths).
struct Pool {
    bytes: [u8; POOL_BYTES],
    /// Bytes already handed out; the pool is empty at `POOL_BYTES`.
    used: usize,
    /// [`FORKS`] when the bytes were drawn.
    forks: u64,
}

thread_local! {
    static POOL: RefCell<Pool> = const {
        RefCell::new(Pool { bytes: [0; POOL_BYTES], used: POOL_BYTES, forks: 0 })
    };
}

/// Fills `out` with fresh random bytes for a nonce (at most [`POOL_BYTES`] at a time;
/// longer requests go straight to the kernel).
pub fn fill_nonce(out: &mut [u8]) -> Result<(), RandomError> {
    if out.len() > POOL_BYTES {
        return fill_random(out);
    }
    static AT_FORK: std::sync::Once = std::sync::Once::new();
    AT_FORK.call_once(|| {
        // SAFETY: registers a handler that only touches an atomic, which is
        // async-signal-safe as a fork handler must be. If registration fails, forks would
        // go unnoticed, so the buffer is not used at all.
        let rc = unsafe { libc::pthread_atfork(None, None, Some(forked_child)) };
        if rc == 0 {
            FORK_SAFE.store(true, Ordering::Release);
        } else {
            tracing::warn!("pthread_atfork failed ({rc}); nonces are not buffered");
        }
    });
    if !FORK_SAFE.load(Ordering::Acquire) {
        return fill_random(out);
    }
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let forks = FORKS.load(Ordering::Relaxed);
        if POOL_BYTES - pool.used < out.len() || pool.forks != forks {
            fill_random(&mut pool.bytes)?;
            pool.used = 0;
            pool.forks = forks;
        }
        let at = pool.used;
        let taken = &mut pool.bytes[at..at + out.len()];
        out.copy_from_slice(taken);
        // Never handed out twice, and not kept once handed out.
        taken.fill(0);
        pool.used = at + out.len();
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nonce() -> [u8; 16] {
        let mut n = [0u8; 16];
        fill_nonce(&mut n).unwrap();
        n
    }

    #[test]
    fn nonces_do_not_repeat_across_draws_threads_or_a_fork() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..(POOL_BYTES / 16) * 3 + 1 {
            assert!(seen.insert(nonce()), "a nonce repeated");
        }
        let other: Vec<_> = std::thread::spawn(|| (0..POOL_BYTES / 16).map(|_| nonce()).collect())
            .join()
            .unwrap();
        assert!(other.into_iter().all(|n| seen.insert(n)));
        // What a fork does to this process's view: the buffer is redrawn, not reused.
        let (bytes, used) = POOL.with(|p| (p.borrow().bytes, p.borrow().used));
        assert!(used < POOL_BYTES, "this test leaves the buffer part used");
        forked_child();
        let next = nonce();
        assert_ne!(&bytes[used..used + 16], &next[..]);
        assert!(seen.insert(next));
    }

    #[test]
    fn sizes_that_do_not_divide_the_pool_and_oversized_requests_are_served() {
        let mut odd = [0u8; 12];
        for _ in 0..POOL_BYTES {
            fill_nonce(&mut odd).unwrap();
        }
        let mut big = vec![0u8; POOL_BYTES + 1];
        fill_nonce(&mut big).unwrap();
        assert!(big.iter().any(|&b| b != 0));
    }
}
