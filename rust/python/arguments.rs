//! Python dicts of hyperparameters and scalars, checked as the kernel needs them.

use super::invalid;
use crate::math::{DecayForm, DecayMode, EpsilonMode, Hyperparams, StepConstants};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyInt};

/// `dict[name]`, or a `TypeError` saying it is missing.
pub(super) fn required<'py>(dict: &Bound<'py, PyDict>, name: &str) -> PyResult<Bound<'py, PyAny>> {
    dict.get_item(name)?
        .ok_or_else(|| PyTypeError::new_err(format!("missing hyperparameter {name}")))
}

/// `dict[name]` as a `T`, or a `TypeError` saying what `name` must be.
pub(super) fn dict_item<'py, T: for<'a> FromPyObject<'a, 'py>>(
    dict: &Bound<'py, PyDict>,
    name: &str,
    kind: &str,
) -> PyResult<T> {
    let value = required(dict, name)?;
    value.extract().map_err(|_| {
        let type_name = value
            .get_type()
            .name()
            .map_or_else(|_| "?".into(), |n| n.to_string());
        PyTypeError::new_err(format!("{name} must be {kind}, got {type_name}"))
    })
}

/// `dict[name]` as a bool: only True or False (a string such as "False" is not one).
pub(super) fn bool_item(dict: &Bound<'_, PyDict>, name: &str) -> PyResult<bool> {
    let value = required(dict, name)?;
    match value.cast::<PyBool>() {
        Ok(flag) => Ok(flag.is_true()),
        Err(_) => Err(PyTypeError::new_err(format!(
            "{name} must be True or False, got {}",
            value.repr()?
        ))),
    }
}

/// `dict["step"]`: an int in [1, 2**64), not a bool.
pub(super) fn step_item(dict: &Bound<'_, PyDict>) -> PyResult<u64> {
    let value = required(dict, "step")?;
    let is_int = !value.is_instance_of::<PyBool>()
        && (value.is_instance_of::<PyInt>() || value.hasattr("__index__")?);
    if !is_int {
        let type_name = value.get_type().name()?;
        return Err(PyTypeError::new_err(format!(
            "step must be an int (the 1-based count of this update), got {type_name}"
        )));
    }
    match value.extract::<u64>() {
        Ok(step) if step >= 1 => Ok(step),
        _ => Err(invalid(
            "step".into(),
            format!("must be an int in [1, 2**64), got {value}"),
        )),
    }
}

/// The hyperparameters of one step, passed from Python as a dict.
pub(super) struct HyperparamsArg {
    pub(super) step: u64,
    pub(super) learning_rate: f64,
    pub(super) beta_1: f64,
    pub(super) beta_2: f64,
    pub(super) epsilon: f64,
    pub(super) weight_decay: f64,
    pub(super) epsilon_mode: String,
    pub(super) weight_decay_mode: String,
    pub(super) decay_form: Option<String>,
    pub(super) maximize: bool,
    pub(super) grad_scale: Option<f64>,
}

impl<'py> FromPyObject<'_, 'py> for HyperparamsArg {
    type Error = PyErr;

    fn extract(dict: Borrowed<'_, 'py, PyAny>) -> PyResult<Self> {
        let dict = &dict.cast::<PyDict>()?.to_owned();
        Ok(Self {
            step: step_item(dict)?,
            learning_rate: dict_item(dict, "learning_rate", "a number")?,
            beta_1: dict_item(dict, "beta_1", "a number")?,
            beta_2: dict_item(dict, "beta_2", "a number")?,
            epsilon: dict_item(dict, "epsilon", "a number")?,
            weight_decay: dict_item(dict, "weight_decay", "a number")?,
            epsilon_mode: dict_item(dict, "epsilon_mode", "a string")?,
            weight_decay_mode: dict_item(dict, "weight_decay_mode", "a string")?,
            decay_form: dict_item(dict, "decay_form", "a string or None")?,
            maximize: bool_item(dict, "maximize")?,
            grad_scale: dict_item(dict, "grad_scale", "a number or None")?,
        })
    }
}

impl HyperparamsArg {
    pub(super) fn constants(&self) -> PyResult<StepConstants> {
        let hyperparams = Hyperparams {
            step: self.step,
            learning_rate: self.learning_rate,
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            epsilon: self.epsilon,
            weight_decay: self.weight_decay,
            epsilon_mode: EpsilonMode::parse(&self.epsilon_mode)?,
            weight_decay_mode: DecayMode::parse(&self.weight_decay_mode)?,
            decay_form: self
                .decay_form
                .as_deref()
                .map(DecayForm::parse)
                .transpose()?,
            maximize: self.maximize,
            grad_scale: self.grad_scale,
        };
        Ok(hyperparams.constants()?)
    }
}
