//! The update as an XLA FFI handler, for JAX.

use crate::xla_ffi;
use pyo3::prelude::*;
use pyo3::types::PyCapsule;
use std::ffi::c_void;
use std::ptr::NonNull;

/// The update as an XLA FFI handler (a PyCapsule), for `jax.ffi.register_ffi_target`.
#[pyfunction]
pub(super) fn xla_ffi_handler(py: Python<'_>) -> PyResult<Bound<'_, PyCapsule>> {
    let handler: unsafe extern "C" fn(*mut xla_ffi::CallFrame) -> *mut xla_ffi::XlaError =
        xla_ffi::adamw_update;
    let pointer = NonNull::new(handler as *mut c_void).expect("a function pointer is not null");
    // SAFETY: a function pointer of the module, which outlives the capsule.
    unsafe { PyCapsule::new_with_pointer(py, pointer, c"keras_adamw._core.xla_ffi_handler") }
}
