//! Python arguments as the kernel's arrays: dtype, contiguity, alignment,
//! writability and aliasing, checked before anything is written.

use super::invalid;
use crate::aliasing::{find_overlap, Region};
use crate::dtype::{q8, raw_slice_mut};
use crate::math::StepConstants;
use crate::xla_ffi::panic_message;
use crate::{in_flight, parallel, simd, Sources, TensorSlices};
use crate::{DType, Elements, ElementsRef, Rounding};
use numpy::npyffi::objects::_PyArray_GET_ITEM_DATA;
use numpy::npyffi::types::NPY_TYPES::{self, NPY_FLOAT, NPY_HALF};
use numpy::npyffi::NPY_ARRAY_WRITEABLE;
use numpy::{PyArrayDescr, PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::prelude::*;
use std::panic::AssertUnwindSafe;

/// One argument list (`params`, `grads`, ...) as C-contiguous aligned arrays
/// of the dtypes it allows, writable where the update writes them.
pub(super) struct ArrayList<'py> {
    pub(super) name: &'static str,
    pub(super) arrays: Vec<HostArray<'py>>,
}

/// One array and its dtype; for 8-bit state, the codes and their block scales.
pub(super) struct HostArray<'py> {
    pub(super) array: Bound<'py, PyUntypedArray>,
    pub(super) dtype: DType,
    pub(super) scales: Option<Bound<'py, PyUntypedArray>>,
}

pub(super) const FLOAT32: &[DType] = &[DType::F32];
pub(super) const FLOATS: &[DType] = &[DType::F32, DType::Bf16, DType::F16];
/// float16's range is too narrow for second moments (g² of 1e-4 underflows).
pub(super) const STATE: &[DType] = &[DType::F32, DType::Bf16, DType::Q8];
pub(super) const HALVES: &[DType] = &[DType::Bf16, DType::F16];

impl<'py> ArrayList<'py> {
    pub(super) fn new(
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

    pub(super) fn label(&self, i: usize) -> String {
        format!("{}[{i}]", self.name)
    }

    /// The same number of arrays as `other`, of the same shapes.
    pub(super) fn check_matches(&self, other: &ArrayList<'py>) -> PyResult<()> {
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
    pub(super) fn check_dtypes(&self, allowed: &[DType], why: &str) -> PyResult<()> {
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
    pub(super) fn regions(
        &self,
        written: bool,
    ) -> impl Iterator<Item = Region<(&'static str, usize)>> + '_ {
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

    pub(super) fn elements(&self) -> Vec<ElementsRef<'_>> {
        self.arrays.iter().map(HostArray::elements).collect()
    }

    /// The float32 slices of a list checked to be float32.
    pub(super) fn f32_slices(&self) -> Vec<&[f32]> {
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

pub(super) fn dtype_names(dtypes: &[DType]) -> String {
    let names: Vec<&str> = dtypes.iter().map(|d| d.name()).collect();
    match names.as_slice() {
        [one] => one.to_string(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
        [] => String::new(),
    }
}

/// The dtype of a NumPy dtype the kernel knows (bfloat16 is ml_dtypes's).
pub(super) fn dtype_of(descr: &Bound<'_, PyArrayDescr>) -> PyResult<Option<DType>> {
    Ok(match descr.num() {
        num if num == NPY_FLOAT as i32 => Some(DType::F32),
        num if num == NPY_HALF as i32 => Some(DType::F16),
        _ if descr.itemsize() == 2 && descr.typeobj().name()? == "bfloat16" => Some(DType::Bf16),
        _ => None,
    })
}

pub(super) fn host_array<'py>(
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
pub(super) fn quantized_state<'py>(
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

pub(super) fn is_writeable(array: &Bound<'_, PyUntypedArray>) -> bool {
    // SAFETY: `array` is a live ndarray and we hold the GIL.
    let flags = unsafe { (*_PyArray_GET_ITEM_DATA(array.as_array_ptr())).flags };
    flags & NPY_ARRAY_WRITEABLE != 0
}

/// The address of an array's first element.
pub(super) fn data(array: &Bound<'_, PyUntypedArray>) -> *mut u8 {
    // SAFETY: `array` is a live ndarray and we hold the GIL.
    unsafe { (*array.as_array_ptr()).fields.data.cast() }
}

/// `len` elements of `T` at `data`, or none.
///
impl HostArray<'_> {
    /// The elements, as the checked dtype says (C-contiguous and aligned, checked).
    pub(super) fn elements(&self) -> ElementsRef<'_> {
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
pub(super) struct StepArrays<'py> {
    pub(super) params: ArrayList<'py>,
    pub(super) grads: ArrayList<'py>,
    pub(super) exp_avgs: ArrayList<'py>,
    pub(super) exp_avg_sqs: ArrayList<'py>,
    pub(super) amsgrad_max: Option<ArrayList<'py>>,
    /// 16-bit copies of float32 params, written in the same pass.
    pub(super) param_copies: Option<ArrayList<'py>>,
    /// Out of place: the current params, exp_avgs, exp_avg_sqs (and amsgrad_max) to read.
    pub(super) read_from: Vec<ArrayList<'py>>,
    /// Every array's address range, claimed while the kernel runs.
    pub(super) regions: Vec<Region<(&'static str, usize)>>,
}

pub(super) type Objects<'py> = Vec<Bound<'py, PyAny>>;

/// The argument lists of one step, as Python passed them.
pub(super) struct StepObjects<'py> {
    pub(super) params: Objects<'py>,
    pub(super) grads: Objects<'py>,
    pub(super) exp_avgs: Objects<'py>,
    pub(super) exp_avg_sqs: Objects<'py>,
    pub(super) amsgrad_max: Option<Objects<'py>>,
    pub(super) param_copies: Option<Objects<'py>>,
    pub(super) read_from: Option<Vec<Objects<'py>>>,
}

impl<'py> StepArrays<'py> {
    pub(super) fn new(objects: StepObjects<'py>) -> PyResult<Self> {
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
    pub(super) fn rounds_stochastically(&self) -> bool {
        let any = |list: &ArrayList<'_>, dtypes: &[DType]| {
            list.arrays.iter().any(|a| dtypes.contains(&a.dtype))
        };
        any(&self.params, HALVES) || any(&self.exp_avgs, &[DType::Bf16])
    }

    /// One AdamW step, in place or from `read_from`, with the GIL released.
    pub(super) fn step(
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
    pub(super) fn run<F>(mut self, py: Python<'_>, work: F) -> PyResult<()>
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
