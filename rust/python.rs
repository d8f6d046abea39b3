//! `keras_adamw._core`: the PyO3 bindings. Every argument is checked before
//! the first element is written; the kernel then runs with the GIL released.

use crate::aliasing::{find_overlap, Region};
use crate::dtype::{q8, raw_slice_mut};
use crate::host_state::Held;
use crate::math::{DecayForm, DecayMode, EpsilonMode, Hyperparams, InvalidArgument, StepConstants};
use crate::xla_ffi::panic_message;
use crate::{bandwidth, host_state, in_flight, parallel, simd, xla_ffi, Sources, TensorSlices};
use crate::{DType, Elements, ElementsRef, Rounding};
use numpy::npyffi::objects::_PyArray_GET_ITEM_DATA;
use numpy::npyffi::types::NPY_TYPES::{self, NPY_FLOAT, NPY_HALF};
use numpy::npyffi::NPY_ARRAY_WRITEABLE;
use numpy::{
    PyArrayDescr, PyArrayDescrMethods, PyReadonlyArrayDyn, PyReadwriteArrayDyn, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyCapsule, PyDict, PyInt};
use std::ffi::c_void;
use std::panic::AssertUnwindSafe;
use std::ptr::NonNull;

impl From<InvalidArgument> for PyErr {
    fn from(e: InvalidArgument) -> Self {
        PyValueError::new_err(e.to_string())
    }
}

fn invalid(argument: String, problem: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(format!("{argument} {problem}"))
}

/// One argument list (`params`, `grads`, ...) as C-contiguous aligned arrays
/// of the dtypes it allows, writable where the update writes them.
struct ArrayList<'py> {
    name: &'static str,
    arrays: Vec<HostArray<'py>>,
}

/// One array and its dtype; for 8-bit state, the codes and their block scales.
struct HostArray<'py> {
    array: Bound<'py, PyUntypedArray>,
    dtype: DType,
    scales: Option<Bound<'py, PyUntypedArray>>,
}

const FLOAT32: &[DType] = &[DType::F32];
const FLOATS: &[DType] = &[DType::F32, DType::Bf16, DType::F16];
/// float16's range is too narrow for second moments (g² of 1e-4 underflows).
const STATE: &[DType] = &[DType::F32, DType::Bf16, DType::Q8];
const HALVES: &[DType] = &[DType::Bf16, DType::F16];

impl<'py> ArrayList<'py> {
    fn new(
        name: &'static str,
        objects: &[Bound<'py, PyAny>],
        written: bool,
        allowed: &[DType],
    ) -> PyResult<Self> {
        if objects.is_empty() {
            return Err(invalid(name.into(), "is empty: pass at least one array"));
        }
        let arrays = objects
            .iter()
            .enumerate()
            .map(|(i, object)| {
                let label = || format!("{name}[{i}]");
                if allowed.contains(&DType::Q8) && object.hasattr("codes")? {
                    let moment = if name == "exp_avgs" { 1 } else { 2 };
                    quantized_state(object, label, moment)
                } else {
                    host_array(object, label, written, allowed)
                }
            })
            .collect::<PyResult<_>>()?;
        Ok(Self { name, arrays })
    }

    fn label(&self, i: usize) -> String {
        format!("{}[{i}]", self.name)
    }

    /// The same number of arrays as `other`, of the same shapes.
    fn check_matches(&self, other: &ArrayList<'py>) -> PyResult<()> {
        if self.arrays.len() != other.arrays.len() {
            return Err(invalid(
                self.name.into(),
                format!(
                    "has {} arrays where {} has {}",
                    self.arrays.len(),
                    other.name,
                    other.arrays.len()
                ),
            ));
        }
        for (i, (a, b)) in self.arrays.iter().zip(&other.arrays).enumerate() {
            if a.array.shape() != b.array.shape() {
                return Err(invalid(
                    self.label(i),
                    format!(
                        "has shape {:?} where {} has shape {:?}",
                        a.array.shape(),
                        other.label(i),
                        b.array.shape()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Every array's dtype is in `allowed` (a narrower rule than the list's own).
    fn check_dtypes(&self, allowed: &[DType], why: &str) -> PyResult<()> {
        match self.arrays.iter().position(|a| !allowed.contains(&a.dtype)) {
            None => Ok(()),
            Some(i) => Err(PyTypeError::new_err(format!(
                "{} must be {} {why}, got {}",
                self.label(i),
                dtype_names(allowed),
                self.arrays[i].dtype.name()
            ))),
        }
    }

    /// Address ranges, labelled (list name, index) so no string is built unless one overlaps.
    fn regions(&self, written: bool) -> impl Iterator<Item = Region<(&'static str, usize)>> + '_ {
        self.arrays.iter().enumerate().flat_map(move |(i, a)| {
            let region = |array: &Bound<'_, PyUntypedArray>, size| Region {
                start: data(array) as usize,
                len_bytes: array.len() * size,
                written,
                label: (self.name, i),
            };
            let scales = a.scales.as_ref().map(|scales| region(scales, 4));
            [Some(region(&a.array, a.dtype.size())), scales]
                .into_iter()
                .flatten()
        })
    }

    fn elements(&self) -> Vec<ElementsRef<'_>> {
        self.arrays.iter().map(HostArray::elements).collect()
    }

    /// The float32 slices of a list checked to be float32.
    fn f32_slices(&self) -> Vec<&[f32]> {
        let f32_slice = |a| HostArray::elements(a).as_f32().expect("checked float32");
        self.arrays.iter().map(f32_slice).collect()
    }

    /// # Safety
    /// The arrays must be writable and share no memory with any other slice in use.
    unsafe fn elements_mut(&mut self) -> Vec<Elements<'_>> {
        // SAFETY: the caller's contract.
        self.arrays
            .iter_mut()
            .map(|a| unsafe { a.elements_mut() })
            .collect()
    }
}

fn dtype_names(dtypes: &[DType]) -> String {
    let names: Vec<&str> = dtypes.iter().map(|d| d.name()).collect();
    match names.as_slice() {
        [one] => one.to_string(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
        [] => String::new(),
    }
}

/// The dtype of a NumPy dtype the kernel knows (bfloat16 is ml_dtypes's).
fn dtype_of(descr: &Bound<'_, PyArrayDescr>) -> PyResult<Option<DType>> {
    Ok(match descr.num() {
        num if num == NPY_FLOAT as i32 => Some(DType::F32),
        num if num == NPY_HALF as i32 => Some(DType::F16),
        _ if descr.itemsize() == 2 && descr.typeobj().name()? == "bfloat16" => Some(DType::Bf16),
        _ => None,
    })
}

fn host_array<'py>(
    object: &Bound<'py, PyAny>,
    label: impl Fn() -> String,
    written: bool,
    allowed: &[DType],
) -> PyResult<HostArray<'py>> {
    let Ok(array) = object.cast::<PyUntypedArray>() else {
        return Err(PyTypeError::new_err(format!(
            "{} must be a NumPy array or torch CPU tensor of {}, got {}",
            label(),
            dtype_names(allowed),
            object.get_type().name()?
        )));
    };
    let descr = array.dtype();
    let dtype = match dtype_of(&descr)? {
        Some(dtype) if allowed.contains(&dtype) => dtype,
        _ => {
            return Err(PyTypeError::new_err(format!(
                "{} must have dtype {}, got {}",
                label(),
                dtype_names(allowed),
                descr
            )))
        }
    };
    if !array.is_c_contiguous() {
        return Err(invalid(
            label(),
            "is not C-contiguous: an in-place update of a copy would be lost",
        ));
    }
    if !array.is_aligned() {
        return Err(invalid(
            label(),
            format!("is not aligned to {} bytes", dtype.size()),
        ));
    }
    if written && !is_writeable(array) {
        return Err(invalid(label(), "is read-only"));
    }
    Ok(HostArray {
        array: array.clone(),
        dtype,
        scales: None,
    })
}

/// A `keras_adamw.host.QuantizedState`: its codes (uint8, the tensor's shape)
/// and block scales (float32), both C-contiguous and writable, in the format
/// of the moment (1 or 2) its list holds.
fn quantized_state<'py>(
    object: &Bound<'py, PyAny>,
    label: impl Fn() -> String,
    moment: u8,
) -> PyResult<HostArray<'py>> {
    let part = |name: &str, num: NPY_TYPES| -> PyResult<Bound<'py, PyUntypedArray>> {
        let value = object.getattr(name)?;
        let array = value.cast::<PyUntypedArray>().map_err(|_| {
            PyTypeError::new_err(format!("{}.{name} must be a NumPy array", label()))
        })?;
        if array.dtype().num() != num as i32 {
            return Err(PyTypeError::new_err(format!(
                "{}.{name} has dtype {}: a QuantizedState's arrays are made by keras_adamw",
                label(),
                array.dtype()
            )));
        }
        if !array.is_c_contiguous() || !array.is_aligned() || !is_writeable(array) {
            return Err(invalid(
                format!("{}.{name}", label()),
                "must be C-contiguous, aligned and writable",
            ));
        }
        Ok(array.clone())
    };
    let codes = part("codes", NPY_TYPES::NPY_UBYTE)?;
    let scales = part("scales", NPY_TYPES::NPY_FLOAT)?;
    let blocks = q8::blocks(codes.len());
    if scales.len() != blocks {
        return Err(invalid(
            label(),
            format!(
                "has {} block scales where {} elements in blocks of {} need {blocks}",
                scales.len(),
                codes.len(),
                q8::BLOCK
            ),
        ));
    }
    let holds: u8 = object.getattr("moment")?.extract()?;
    if holds != moment {
        return Err(invalid(
            label(),
            format!(
                "needs a QuantizedState of moment={moment} (the format of its moments), \
                 got moment={holds}"
            ),
        ));
    }
    Ok(HostArray {
        array: codes,
        dtype: DType::Q8,
        scales: Some(scales),
    })
}

fn is_writeable(array: &Bound<'_, PyUntypedArray>) -> bool {
    // SAFETY: `array` is a live ndarray and we hold the GIL.
    let flags = unsafe { (*_PyArray_GET_ITEM_DATA(array.as_array_ptr())).flags };
    flags & NPY_ARRAY_WRITEABLE != 0
}

/// The address of an array's first element.
fn data(array: &Bound<'_, PyUntypedArray>) -> *mut u8 {
    // SAFETY: `array` is a live ndarray and we hold the GIL.
    unsafe { (*array.as_array_ptr()).fields.data.cast() }
}

/// `len` elements of `T` at `data`, or none.
///
impl HostArray<'_> {
    /// The elements, as the checked dtype says (C-contiguous and aligned, checked).
    fn elements(&self) -> ElementsRef<'_> {
        let (data, len) = (data(&self.array), self.array.len());
        // SAFETY: a live, checked array of `len` elements of its dtype, borrowed with `self`.
        unsafe { ElementsRef::from_raw(self.dtype, data, len) }
    }

    /// # Safety
    /// The array must be writable and share no memory with any other slice in use.
    unsafe fn elements_mut(&mut self) -> Elements<'_> {
        let (data, len) = (data(&self.array), self.array.len());
        // SAFETY: as in `elements`; exclusive by the caller's contract.
        unsafe {
            match (self.dtype, &self.scales) {
                (DType::Q8, Some(scales)) => Elements::Q8 {
                    codes: raw_slice_mut(data, len),
                    scales: raw_slice_mut(self::data(scales), scales.len()),
                },
                _ => Elements::from_raw(self.dtype, data, len),
            }
        }
    }
}

/// The arrays of one call, checked against each other: shapes, and no memory
/// shared with a written array (rust-numpy's borrow tracking misses views of one
/// buffer made by different owners, such as two torch tensors over one storage).
struct StepArrays<'py> {
    params: ArrayList<'py>,
    grads: ArrayList<'py>,
    exp_avgs: ArrayList<'py>,
    exp_avg_sqs: ArrayList<'py>,
    amsgrad_max: Option<ArrayList<'py>>,
    /// 16-bit copies of float32 params, written in the same pass.
    param_copies: Option<ArrayList<'py>>,
    /// Out of place: the current params, exp_avgs, exp_avg_sqs (and amsgrad_max) to read.
    read_from: Vec<ArrayList<'py>>,
    /// Every array's address range, claimed while the kernel runs.
    regions: Vec<Region<(&'static str, usize)>>,
}

type Objects<'py> = Vec<Bound<'py, PyAny>>;

/// The argument lists of one step, as Python passed them.
struct StepObjects<'py> {
    params: Objects<'py>,
    grads: Objects<'py>,
    exp_avgs: Objects<'py>,
    exp_avg_sqs: Objects<'py>,
    amsgrad_max: Option<Objects<'py>>,
    param_copies: Option<Objects<'py>>,
    read_from: Option<Vec<Objects<'py>>>,
}

impl<'py> StepArrays<'py> {
    fn new(objects: StepObjects<'py>) -> PyResult<Self> {
        let read_from = objects.read_from.unwrap_or_default();
        let expected = if objects.amsgrad_max.is_some() { 4 } else { 3 };
        if !read_from.is_empty() && read_from.len() != expected {
            return Err(invalid(
                "read_from".into(),
                format!(
                    "must hold {expected} lists (params, exp_avgs, exp_avg_sqs{}), got {}",
                    if expected == 4 { ", amsgrad_max" } else { "" },
                    read_from.len()
                ),
            ));
        }
        const SOURCE_NAMES: [&str; 4] = [
            "read_from params",
            "read_from exp_avgs",
            "read_from exp_avg_sqs",
            "read_from amsgrad_max",
        ];
        let mut arrays = Self {
            params: ArrayList::new("params", &objects.params, true, FLOATS)?,
            grads: ArrayList::new("grads", &objects.grads, false, FLOATS)?,
            exp_avgs: ArrayList::new("exp_avgs", &objects.exp_avgs, true, STATE)?,
            exp_avg_sqs: ArrayList::new("exp_avg_sqs", &objects.exp_avg_sqs, true, STATE)?,
            amsgrad_max: objects
                .amsgrad_max
                .map(|list| ArrayList::new("amsgrad_max", &list, true, STATE))
                .transpose()?,
            param_copies: objects
                .param_copies
                .map(|list| ArrayList::new("param_copies", &list, true, HALVES))
                .transpose()?,
            read_from: read_from
                .iter()
                .zip(SOURCE_NAMES)
                .map(|(list, name)| ArrayList::new(name, list, false, FLOAT32))
                .collect::<PyResult<_>>()?,
            regions: Vec::new(),
        };
        let mut written = vec![&arrays.params, &arrays.exp_avgs, &arrays.exp_avg_sqs];
        written.extend(arrays.amsgrad_max.as_ref());
        if !arrays.read_from.is_empty() {
            for list in &written {
                list.check_dtypes(FLOAT32, "out of place (with read_from)")?;
            }
        }
        if arrays.param_copies.is_some() {
            arrays
                .params
                .check_dtypes(FLOAT32, "with param_copies (the master copy)")?;
        }
        written.extend(arrays.param_copies.as_ref());
        let read = [&arrays.grads].into_iter().chain(&arrays.read_from);
        for list in written[1..].iter().copied().chain(read.clone()) {
            list.check_matches(&arrays.params)?;
        }
        let state = [&arrays.exp_avg_sqs].into_iter().chain(&arrays.amsgrad_max);
        for list in state {
            for (i, (a, m)) in list.arrays.iter().zip(&arrays.exp_avgs.arrays).enumerate() {
                if a.dtype != m.dtype {
                    return Err(PyTypeError::new_err(format!(
                        "{} has dtype {} where exp_avgs[{i}] has {}: a tensor's state is of one dtype",
                        list.label(i),
                        a.dtype.name(),
                        m.dtype.name()
                    )));
                }
            }
        }
        let regions: Vec<Region<_>> = written
            .iter()
            .flat_map(|list| list.regions(true))
            .chain(read.flat_map(|list| list.regions(false)))
            .collect();
        if let Some(((name_1, i_1), (name_2, i_2))) = find_overlap(&regions) {
            return Err(invalid(
                format!("{name_2}[{i_2}]"),
                format!("shares memory with {name_1}[{i_1}]"),
            ));
        }
        arrays.regions = regions;
        Ok(arrays)
    }

    /// Whether the step stores anything that can be rounded stochastically:
    /// 16-bit params or bfloat16 state.
    fn rounds_stochastically(&self) -> bool {
        let any = |list: &ArrayList<'_>, dtypes: &[DType]| {
            list.arrays.iter().any(|a| dtypes.contains(&a.dtype))
        };
        any(&self.params, HALVES) || any(&self.exp_avgs, &[DType::Bf16])
    }

    /// One AdamW step, in place or from `read_from`, with the GIL released.
    fn step(
        self,
        py: Python<'_>,
        constants: &StepConstants,
        rounding: Rounding,
        level: simd::SimdLevel,
    ) -> PyResult<()> {
        self.run(py, |tensors, sources| match sources {
            None => parallel::adamw_step(tensors, constants, rounding, level),
            Some(sources) => parallel::adamw_step_from(
                sources.into_iter().zip(tensors).collect(),
                constants,
                rounding,
                level,
            ),
        })
    }

    /// Runs `work` on the tensors' slices with the GIL released.
    fn run<F>(mut self, py: Python<'_>, work: F) -> PyResult<()>
    where
        F: for<'a> FnOnce(Vec<TensorSlices<'a>>, Option<Vec<Sources<'a>>>) + Send,
    {
        // SAFETY: `new` checked that the written lists are writable and that no
        // written array shares memory with any other array of the call.
        let (params, exp_avgs, exp_avg_sqs, amsgrad_max, param_copies) = unsafe {
            (
                self.params.elements_mut(),
                self.exp_avgs.elements_mut(),
                self.exp_avg_sqs.elements_mut(),
                self.amsgrad_max.as_mut().map(|list| list.elements_mut()),
                self.param_copies.as_mut().map(|list| list.elements_mut()),
            )
        };
        let mut amsgrad_max = amsgrad_max.map(Vec::into_iter);
        let mut param_copies = param_copies.map(Vec::into_iter);
        let tensors = params
            .into_iter()
            .zip(self.grads.elements())
            .zip(exp_avgs)
            .zip(exp_avg_sqs)
            .enumerate()
            .map(|(i, (((p, g), m), v))| {
                let max_v = amsgrad_max.as_mut().and_then(Iterator::next);
                let t = TensorSlices::of_elements(p, g, m, v, max_v)?.at_tensor(i);
                match param_copies.as_mut().and_then(Iterator::next) {
                    Some(copy) => t.with_param_copy(copy),
                    None => Ok(t),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let lists: Vec<Vec<&[f32]>> = self.read_from.iter().map(ArrayList::f32_slices).collect();
        let sources = (!lists.is_empty()).then(|| {
            (0..tensors.len())
                .map(|i| Sources {
                    params: ElementsRef::F32(lists[0][i]),
                    exp_avg: Some(ElementsRef::F32(lists[1][i])),
                    exp_avg_sq: Some(ElementsRef::F32(lists[2][i])),
                    max_exp_avg_sq: lists.get(3).map(|list| ElementsRef::F32(list[i])),
                })
                .collect()
        });
        let regions = std::mem::take(&mut self.regions);
        py.detach(|| {
            // Waits for calls in flight on overlapping memory (GIL released, so they can finish).
            let _claim = in_flight::claim(&regions);
            std::panic::catch_unwind(AssertUnwindSafe(|| work(tensors, sources)))
        })
        .map_err(|panic| {
            PyRuntimeError::new_err(format!(
                "keras_adamw: the update failed: {}",
                panic_message(&*panic)
            ))
        })
    }
}

/// `dict[name]`, or a `TypeError` saying it is missing.
fn required<'py>(dict: &Bound<'py, PyDict>, name: &str) -> PyResult<Bound<'py, PyAny>> {
    dict.get_item(name)?
        .ok_or_else(|| PyTypeError::new_err(format!("missing hyperparameter {name}")))
}

/// `dict[name]` as a `T`, or a `TypeError` saying what `name` must be.
fn dict_item<'py, T: for<'a> FromPyObject<'a, 'py>>(
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
fn bool_item(dict: &Bound<'_, PyDict>, name: &str) -> PyResult<bool> {
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
fn step_item(dict: &Bound<'_, PyDict>) -> PyResult<u64> {
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
struct HyperparamsArg {
    step: u64,
    learning_rate: f64,
    beta_1: f64,
    beta_2: f64,
    epsilon: f64,
    weight_decay: f64,
    epsilon_mode: String,
    weight_decay_mode: String,
    decay_form: Option<String>,
    maximize: bool,
    grad_scale: Option<f64>,
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
    fn constants(&self) -> PyResult<StepConstants> {
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

/// Raises `ValueError` naming the first bad hyperparameter, as `adamw_update` would.
#[pyfunction]
fn check_hyperparameters(hyperparameters: HyperparamsArg) -> PyResult<()> {
    hyperparameters.constants().map(drop)
}

/// One AdamW step in place; see `keras_adamw.host.adamw_update`.
#[pyfunction]
#[allow(clippy::too_many_arguments)] // the Python signature
fn adamw_update<'py>(
    py: Python<'py>,
    params: Objects<'py>,
    grads: Objects<'py>,
    exp_avgs: Objects<'py>,
    exp_avg_sqs: Objects<'py>,
    amsgrad_max: Option<Objects<'py>>,
    hyperparameters: HyperparamsArg,
    read_from: Option<Vec<Objects<'py>>>,
    param_copies: Option<Objects<'py>>,
    rounding: &str,
    seed: u64,
) -> PyResult<()> {
    let constants = hyperparameters.constants()?;
    let level = simd::active_level()?;
    let arrays = StepArrays::new(StepObjects {
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        amsgrad_max,
        param_copies,
        read_from,
    })?;
    let rounding = match rounding {
        "nearest" => Rounding::Nearest,
        "stochastic" if arrays.rounds_stochastically() => Rounding::Stochastic {
            seed,
            step: hyperparameters.step,
        },
        "stochastic" => {
            return Err(invalid(
                "rounding".into(),
                "= 'stochastic' needs something to round: bfloat16 or float16 params, \
                 or bfloat16 state (param_copies and 8-bit state round to nearest)",
            ))
        }
        other => {
            return Err(invalid(
                "rounding".into(),
                format!("must be 'nearest' or 'stochastic', got {other:?}"),
            ))
        }
    };
    arrays.step(py, &constants, rounding, level)
}

/// Quantises float32 `values` into 8-bit `codes` and block `scales` (see
/// `keras_adamw.host.QuantizedState`).
#[pyfunction]
fn quantize(
    values: PyReadonlyArrayDyn<'_, f32>,
    mut codes: PyReadwriteArrayDyn<'_, u8>,
    mut scales: PyReadwriteArrayDyn<'_, f32>,
    moment: u8,
) -> PyResult<()> {
    let (values, codes, scales) = contiguous(
        values.as_slice(),
        codes.as_slice_mut(),
        scales.as_slice_mut(),
    )?;
    q8::quantize(values, codes, scales, moment == 1);
    Ok(())
}

/// The float32 values of 8-bit `codes` and block `scales`, written into `values`.
#[pyfunction]
fn dequantize(
    codes: PyReadonlyArrayDyn<'_, u8>,
    scales: PyReadonlyArrayDyn<'_, f32>,
    moment: u8,
    mut values: PyReadwriteArrayDyn<'_, f32>,
) -> PyResult<()> {
    let (values, codes, scales) =
        contiguous(values.as_slice_mut(), codes.as_slice(), scales.as_slice())?;
    q8::dequantize(codes, scales, moment == 1, values);
    Ok(())
}

/// Contiguous slices of matching lengths (one scale per block), or a `ValueError`.
fn contiguous<A, B, C>(
    values: Result<A, numpy::AsSliceError>,
    codes: Result<B, numpy::AsSliceError>,
    scales: Result<C, numpy::AsSliceError>,
) -> PyResult<(A, B, C)>
where
    A: AsRef<[f32]>,
    B: AsRef<[u8]>,
    C: AsRef<[f32]>,
{
    let not_contiguous = |_| invalid("arrays".into(), "must be C-contiguous");
    let (values, codes, scales) = (
        values.map_err(not_contiguous)?,
        codes.map_err(not_contiguous)?,
        scales.map_err(not_contiguous)?,
    );
    let n = values.as_ref().len();
    if codes.as_ref().len() != n || scales.as_ref().len() != q8::blocks(n) {
        return Err(invalid(
            "codes".into(),
            format!(
                "and scales must hold {n} codes and {} scales",
                q8::blocks(n)
            ),
        ));
    }
    Ok((values, codes, scales))
}

/// The benchmark's ceiling: `p += g; m += g; v += g` in place, same threads and chunks.
#[pyfunction]
fn read_modify_write<'py>(
    py: Python<'py>,
    params: Objects<'py>,
    grads: Objects<'py>,
    exp_avgs: Objects<'py>,
    exp_avg_sqs: Objects<'py>,
) -> PyResult<()> {
    let arrays = StepArrays::new(StepObjects {
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        amsgrad_max: None,
        param_copies: None,
        read_from: None,
    })?;
    for list in [
        &arrays.params,
        &arrays.grads,
        &arrays.exp_avgs,
        &arrays.exp_avg_sqs,
    ] {
        list.check_dtypes(FLOAT32, "for the plain loop")?;
    }
    arrays.run(py, |tensors, _| bandwidth::read_modify_write(tensors))
}

/// The update as an XLA FFI handler (a PyCapsule), for `jax.ffi.register_ffi_target`.
#[pyfunction]
fn xla_ffi_handler(py: Python<'_>) -> PyResult<Bound<'_, PyCapsule>> {
    let handler: unsafe extern "C" fn(*mut xla_ffi::CallFrame) -> *mut xla_ffi::XlaError =
        xla_ffi::adamw_update;
    let pointer = NonNull::new(handler as *mut c_void).expect("a function pointer is not null");
    // SAFETY: a function pointer of the module, which outlives the capsule.
    unsafe { PyCapsule::new_with_pointer(py, pointer, c"keras_adamw._core.xla_ffi_handler") }
}

/// Registers host arrays as state that the XLA handler and the TensorFlow op
/// update by reference (`keras_adamw.host.HostState`); returns its id. The
/// state lists take float32, bfloat16 or 8-bit state; `masters` (float32)
/// makes the params each call is handed their 16-bit copies.
#[pyfunction]
#[pyo3(signature = (exp_avgs, exp_avg_sqs, amsgrad_max=None, masters=None))]
fn register_host_state<'py>(
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
fn unregister_host_state(id: u64) {
    drop(host_state::unregister(id));
}

/// The SIMD level the kernel runs at now.
#[pyfunction]
fn simd_level() -> PyResult<&'static str> {
    Ok(simd::active_level()?.name())
}

/// The SIMD levels this CPU supports, narrowest first.
#[pyfunction]
fn supported_simd_levels() -> Vec<&'static str> {
    simd::supported_levels()
        .into_iter()
        .map(simd::SimdLevel::name)
        .collect()
}

#[pyfunction]
fn set_simd_level(level: &str) -> PyResult<()> {
    simd::set_active_level(level).map_err(|e| invalid("level".into(), e.problem))?;
    Ok(())
}

#[pyfunction]
fn num_threads() -> usize {
    parallel::num_threads()
}

#[pyfunction]
fn set_num_threads(n: i64) -> PyResult<()> {
    let n = usize::try_from(n)
        .map_err(|_| invalid("n".into(), format!("must be >= 1 threads, got {n}")))?;
    Ok(parallel::set_num_threads(n)?)
}

/// Registers the TensorFlow op (rust/tensorflow_op.rs) with the TensorFlow
/// whose framework library is loaded from `framework_library`.
#[pyfunction]
fn register_tensorflow_op(framework_library: &str) -> PyResult<&'static str> {
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

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    #[cfg(unix)]
    crate::fork::install();
    m.add_function(wrap_pyfunction!(adamw_update, m)?)?;
    m.add_function(wrap_pyfunction!(check_hyperparameters, m)?)?;
    m.add_function(wrap_pyfunction!(read_modify_write, m)?)?;
    m.add_function(wrap_pyfunction!(quantize, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(xla_ffi_handler, m)?)?;
    m.add_function(wrap_pyfunction!(register_host_state, m)?)?;
    m.add_function(wrap_pyfunction!(unregister_host_state, m)?)?;
    m.add_function(wrap_pyfunction!(supported_simd_levels, m)?)?;
    m.add_function(wrap_pyfunction!(set_simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(register_tensorflow_op, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("SIMD_ENV_VAR", simd::SIMD_ENV_VAR)?;
    m.add("THREADS_ENV_VAR", parallel::THREADS_ENV_VAR)?;
    m.add("QUANTIZATION_BLOCK", q8::BLOCK)?;
    Ok(())
}
