//! Optimizer state in host memory that the XLA custom call and the TensorFlow
//! op update by reference.
//!
//! With offloaded state, a host callback would copy the parameters and
//! gradients in and the new parameters out on every step. So the state's
//! buffers are registered here once, and the compiled step names them by an
//! id: the handler looks them up and updates them in place. An id no longer
//! registered is an error, never a dangling pointer.

use crate::aliasing::Region;
use crate::dtype::{q8, raw_slice_mut, DType, Elements};
use std::any::Any;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

/// One registered buffer: `len` elements of `dtype` at `data` (for 8-bit
/// state the codes, their block scales at `scales`).
#[derive(Clone, Copy, Debug)]
pub struct Held {
    pub dtype: DType,
    pub data: usize,
    pub scales: usize,
    pub len: usize,
}

impl Held {
    /// The memory the buffer spans (two regions for 8-bit state), labelled.
    pub fn regions<L: Clone>(&self, label: L) -> Vec<Region<L>> {
        let region = |start: usize, len_bytes: usize| Region {
            start,
            len_bytes,
            written: true,
            label: label.clone(),
        };
        let mut regions = vec![region(self.data, self.len * self.dtype.size())];
        if self.dtype == DType::Q8 {
            regions.push(region(self.scales, q8::blocks(self.len) * 4));
        }
        regions
    }

    /// The elements, to update in place.
    ///
    /// # Safety
    /// The state must be registered (its owner alive) for `'a`, and nothing
    /// else may use the buffer meanwhile (the caller has claimed its regions).
    pub unsafe fn elements<'a>(&self) -> Elements<'a> {
        let data = self.data as *mut u8;
        // SAFETY: the caller's contract; registered buffers are aligned and of `len` elements.
        unsafe {
            match self.dtype {
                DType::Q8 => Elements::Q8 {
                    codes: raw_slice_mut(data, self.len),
                    scales: raw_slice_mut(self.scales as *mut u8, q8::blocks(self.len)),
                },
                dtype => Elements::from_raw(dtype, data, self.len),
            }
        }
    }
}

/// One registered state: its lists of buffers, one per tensor.
pub struct HostState {
    /// exp_avgs, exp_avg_sqs and, with AMSGrad, amsgrad_max.
    pub lists: Vec<Vec<Held>>,
    /// float32 masters: the update runs on them, and the params it is handed
    /// (16-bit) receive their rounded copies.
    pub masters: Option<Vec<Held>>,
    /// Keeps the buffers alive while the state is registered or in use.
    _owner: Box<dyn Any + Send + Sync>,
}

impl HostState {
    /// Each list with its name, masters first; `state_names` name the state
    /// lists as the caller's messages do.
    pub fn named_lists<'a>(
        &'a self,
        state_names: &'a [&'a str],
    ) -> impl Iterator<Item = (&'a str, &'a [Held])> {
        let masters = self.masters.iter().map(|m| ("masters", m.as_slice()));
        masters.chain(
            state_names
                .iter()
                .copied()
                .zip(self.lists.iter().map(Vec::as_slice)),
        )
    }
}

struct Registry {
    next_id: u64,
    states: BTreeMap<u64, Arc<HostState>>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    next_id: 1,
    states: BTreeMap::new(),
});

/// The registry's lock, held across a fork (`crate::fork`).
#[cfg(unix)]
pub(crate) fn lock() -> std::sync::MutexGuard<'static, impl Sized> {
    registry()
}

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    // A panic cannot leave the map half-written: each change is one call.
    REGISTRY.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Registers `lists` and `masters` (their buffers owned by `owner`); returns the new id.
pub fn register(
    lists: Vec<Vec<Held>>,
    masters: Option<Vec<Held>>,
    owner: Box<dyn Any + Send + Sync>,
) -> u64 {
    let mut registry = registry();
    let id = registry.next_id;
    registry.next_id += 1;
    let state = HostState {
        lists,
        masters,
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
