//! The TensorFlow op's registration.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

/// Registers the TensorFlow op (rust/tensorflow_op.rs) with the TensorFlow
/// whose framework library is loaded from `framework_library`.
#[pyfunction]
pub(super) fn register_tensorflow_op(framework_library: &str) -> PyResult<&'static str> {
    #[cfg(unix)]
    {
        crate::tensorflow_op::register(framework_library).map_err(PyRuntimeError::new_err)?;
        Ok(crate::tensorflow_op::OP_NAME)
    }
    #[cfg(not(unix))]
    {
        let _ = framework_library;
        Err(PyRuntimeError::new_err(
            "the TensorFlow op is built for Linux and macOS only",
        ))
    }
}
