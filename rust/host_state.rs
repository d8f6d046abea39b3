//! Optimizer state in host memory that the XLA custom call updates by reference.
//!
//! With offloaded state on JAX's CPU backend, a host callback copies the
//! parameters and gradients in and the new parameters out on every step. So
//! the state's buffers are registered here once, and the compiled step names
//! them by an id: the handler looks them up and updates them in place. An id
//! no longer registered is an error, never a dangling pointer.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

/// One registered state: its written lists (exp_avgs, exp_avg_sqs and, with
/// AMSGrad, amsgrad_max), each buffer as (address, length in floats).
pub struct HostState {
    pub lists: Vec<Vec<(usize, usize)>>,
    /// Keeps the buffers alive while the state is registered or in use.
    _owner: Box<dyn Any + Send + Sync>,
}

struct Registry {
    next_id: u64,
    states: BTreeMap<u64, Arc<HostState>>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    next_id: 1,
    states: BTreeMap::new(),
});

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    // A panic cannot leave the map half-written: each change is one call.
    REGISTRY.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Registers `lists` (their buffers owned by `owner`); returns the new id.
pub fn register(lists: Vec<Vec<(usize, usize)>>, owner: Box<dyn Any + Send + Sync>) -> u64 {
    let mut registry = registry();
    let id = registry.next_id;
    registry.next_id += 1;
    let state = HostState {
        lists,
        _owner: owner,
    };
    registry.states.insert(id, Arc::new(state));
    id
}

/// Removes `id`; a step running on it keeps its buffers until it ends.
/// Returns the state, for the caller to drop where dropping its owner is safe.
pub fn unregister(id: u64) -> Option<Arc<HostState>> {
    registry().states.remove(&id)
}

/// The state registered as `id`, if any.
pub fn lookup(id: u64) -> Option<Arc<HostState>> {
    registry().states.get(&id).cloned()
}
