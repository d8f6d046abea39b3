//! `keras_adamw._core`: the PyO3 bindings. Every argument is checked before
//! the first element is written; the kernel then runs with the GIL released.

mod arguments;
mod arrays;
mod state;
mod tensorflow;
mod update;
mod xla;

use crate::dtype::q8;
use crate::math::InvalidArgument;
use crate::{parallel, simd};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

impl From<InvalidArgument> for PyErr {
    fn from(e: InvalidArgument) -> Self {
        PyValueError::new_err(e.to_string())
    }
}

pub(super) fn invalid(argument: String, problem: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(format!("{argument} {problem}"))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    #[cfg(unix)]
    crate::fork::install();
    m.add_function(wrap_pyfunction!(update::adamw_update, m)?)?;
    m.add_function(wrap_pyfunction!(update::check_hyperparameters, m)?)?;
    m.add_function(wrap_pyfunction!(update::read_modify_write, m)?)?;
    m.add_function(wrap_pyfunction!(update::quantize, m)?)?;
    m.add_function(wrap_pyfunction!(update::dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(update::simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(xla::xla_ffi_handler, m)?)?;
    m.add_function(wrap_pyfunction!(state::register_host_state, m)?)?;
    m.add_function(wrap_pyfunction!(state::unregister_host_state, m)?)?;
    m.add_function(wrap_pyfunction!(update::supported_simd_levels, m)?)?;
    m.add_function(wrap_pyfunction!(update::set_simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(update::num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(update::set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(tensorflow::register_tensorflow_op, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("SIMD_ENV_VAR", simd::SIMD_ENV_VAR)?;
    m.add("THREADS_ENV_VAR", parallel::THREADS_ENV_VAR)?;
    m.add("QUANTIZATION_BLOCK", q8::BLOCK)?;
    Ok(())
}
