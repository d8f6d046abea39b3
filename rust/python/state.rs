//! Host arrays registered as state that the XLA handler and the TensorFlow op
//! update by reference.

use super::arrays::*;
use super::invalid;
use crate::aliasing::find_overlap;
use crate::host_state;
use crate::host_state::Held;
use numpy::{PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;

/// Registers host arrays as state that the XLA handler and the TensorFlow op
/// update by reference (`keras_adamw.host.HostState`); returns its id. The
/// state lists take float32, bfloat16 or 8-bit state; `masters` (float32)
/// makes the params each call is handed their 16-bit copies.
#[pyfunction]
#[pyo3(signature = (exp_avgs, exp_avg_sqs, amsgrad_max=None, masters=None))]
pub(super) fn register_host_state<'py>(
    exp_avgs: Objects<'py>,
    exp_avg_sqs: Objects<'py>,
    amsgrad_max: Option<Objects<'py>>,
    masters: Option<Objects<'py>>,
) -> PyResult<u64> {
    let mut lists = vec![
        ArrayList::new("exp_avgs", &exp_avgs, true, STATE)?,
        ArrayList::new("exp_avg_sqs", &exp_avg_sqs, true, STATE)?,
    ];
    if let Some(objects) = amsgrad_max {
        lists.push(ArrayList::new("amsgrad_max", &objects, true, STATE)?);
    }
    let masters = match masters {
        Some(objects) => Some(ArrayList::new("masters", &objects, true, FLOAT32)?),
        None => None,
    };
    for list in lists.iter().skip(1).chain(&masters) {
        list.check_matches(&lists[0])?;
    }
    let held = |list: &ArrayList<'py>| -> Vec<Held> {
        let buffers = list.arrays.iter().map(|a| Held {
            dtype: a.dtype,
            data: data(&a.array) as usize,
            scales: a.scales.as_ref().map_or(0, |s| data(s) as usize),
            len: a.array.len(),
        });
        buffers.collect()
    };
    let (held_lists, held_masters) = (
        lists.iter().map(held).collect::<Vec<_>>(),
        masters.as_ref().map(held),
    );
    let regions: Vec<_> = lists
        .iter()
        .chain(&masters)
        .zip(held_lists.iter().chain(&held_masters))
        .flat_map(|(list, buffers)| {
            buffers
                .iter()
                .enumerate()
                .flat_map(move |(i, b)| b.regions(list.label(i)))
        })
        .collect();
    if let Some((a, b)) = find_overlap(&regions) {
        return Err(invalid(b, format!("shares memory with {a}")));
    }
    let owner: Vec<Py<PyUntypedArray>> = lists
        .into_iter()
        .chain(masters)
        .flat_map(|list| list.arrays)
        .flat_map(|a| [Some(a.array), a.scales])
        .flatten()
        .map(Bound::unbind)
        .collect();
    Ok(host_state::register(
        held_lists,
        held_masters,
        Box::new(owner),
    ))
}

/// Unregisters a `register_host_state` id; a step running on it keeps its buffers until it ends.
#[pyfunction]
pub(super) fn unregister_host_state(id: u64) {
    drop(host_state::unregister(id));
}
