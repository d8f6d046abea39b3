//! The memory of the updates running now. The kernel runs on raw pointers
//! with the GIL released, outside rust-numpy's borrow tracking, so without
//! this two threads could update overlapping arrays at once and interleave
//! their writes. A call whose memory overlaps that of a call in flight (where
//! either writes it) waits until that call has finished: overlapping calls run
//! one after the other, in some order; disjoint calls run side by side.

use crate::aliasing::{find_overlap, Region};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

struct Registry {
    /// The process the claims were made in: a forked child inherits the
    /// parent's claims, but not the threads that would release them.
    pid: u32,
    next_id: u64,
    claims: Vec<(u64, Vec<Region<()>>)>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    pid: 0,
    next_id: 0,
    claims: Vec::new(),
});
static RELEASED: Condvar = Condvar::new();

/// The registry's lock, held across a fork (`crate::fork`).
#[cfg(unix)]
pub(crate) fn lock() -> MutexGuard<'static, impl Sized> {
    REGISTRY.lock().unwrap_or_else(PoisonError::into_inner)
}

fn registry() -> MutexGuard<'static, Registry> {
    let mut registry = REGISTRY.lock().unwrap_or_else(PoisonError::into_inner);
    let pid = std::process::id();
    if registry.pid != pid {
        registry.pid = pid;
        registry.claims.clear();
    }
    registry
}

/// The memory one call uses, held until dropped.
#[must_use = "the memory is released when the claim is dropped"]
pub struct Claim {
    id: u64,
}

impl Drop for Claim {
    fn drop(&mut self) {
        registry().claims.retain(|(id, _)| *id != self.id);
        RELEASED.notify_all();
    }
}

/// Waits until no call in flight writes memory in `regions`, or reads memory
/// that `regions` writes, then claims `regions` until the claim is dropped.
///
/// `regions` must be free of overlaps among themselves where one is written
/// (the calls check this first), as every claim in flight then is too: so any
/// overlap in the union lies between the new call and one in flight.
pub fn claim<L>(regions: &[Region<L>]) -> Claim {
    let regions: Vec<Region<()>> = regions
        .iter()
        .filter(|r| r.len_bytes > 0)
        .map(|r| Region {
            start: r.start,
            len_bytes: r.len_bytes,
            written: r.written,
            label: (),
        })
        .collect();
    let mut registry = registry();
    while conflicts(&registry, &regions) {
        registry = RELEASED
            .wait(registry)
            .unwrap_or_else(PoisonError::into_inner);
    }
    let id = registry.next_id;
    registry.next_id += 1;
    registry.claims.push((id, regions));
    Claim { id }
}

fn conflicts(registry: &Registry, regions: &[Region<()>]) -> bool {
    if registry.claims.is_empty() {
        return false;
    }
    let all: Vec<Region<()>> = registry
        .claims
        .iter()
        .flat_map(|(_, claimed)| claimed.iter().cloned())
        .chain(regions.iter().cloned())
        .collect();
    find_overlap(&all).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    fn region(start: usize, len_bytes: usize, written: bool) -> Region<()> {
        Region {
            start,
            len_bytes,
            written,
            label: (),
        }
    }

    #[test]
    fn an_overlapping_reader_waits_and_disjoint_or_read_only_claims_do_not() {
        // Addresses no real buffer has, so other tests' claims never meet these.
        let base = usize::MAX / 2;
        let first = claim(&[region(base, 64, true)]);
        let _disjoint = claim(&[region(base + 64, 64, true)]);
        let _read = claim(&[region(base + 4096, 64, false)]);
        let _read_again = claim(&[region(base + 4096, 64, false)]);
        let done = AtomicBool::new(false);
        let mut went_ahead = true;
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let _second = claim(&[region(base + 16, 32, false)]);
                done.store(true, Ordering::SeqCst);
            });
            std::thread::sleep(Duration::from_millis(50));
            went_ahead = done.load(Ordering::SeqCst);
            drop(first); // lets the waiting claim in, pass or fail
        });
        assert!(!went_ahead, "the overlapping call did not wait");
        assert!(done.load(Ordering::SeqCst));
    }
}
