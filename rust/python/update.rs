//! The host update and its settings: `adamw_update`, 8-bit (de)quantisation,
//! the bandwidth ceiling, SIMD level and threads.

use super::arguments::*;
use super::arrays::*;
use super::invalid;
use crate::dtype::q8;
use crate::Rounding;
use crate::{bandwidth, parallel, simd};
use numpy::{PyReadonlyArrayDyn, PyReadwriteArrayDyn};
use pyo3::prelude::*;

/// Raises `ValueError` naming the first bad hyperparameter, as `adamw_update` would.
#[pyfunction]
pub(super) fn check_hyperparameters(hyperparameters: HyperparamsArg) -> PyResult<()> {
    hyperparameters.constants().map(drop)
}

/// One AdamW step in place; see `keras_adamw.host.adamw_update`.
#[pyfunction]
#[allow(clippy::too_many_arguments)] // the Python signature
pub(super) fn adamw_update<'py>(
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
pub(super) fn quantize(
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
pub(super) fn dequantize(
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
pub(super) fn contiguous<A, B, C>(
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
pub(super) fn read_modify_write<'py>(
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

/// The SIMD level the kernel runs at now.
#[pyfunction]
pub(super) fn simd_level() -> PyResult<&'static str> {
    Ok(simd::active_level()?.name())
}

/// The SIMD levels this CPU supports, narrowest first.
#[pyfunction]
pub(super) fn supported_simd_levels() -> Vec<&'static str> {
    simd::supported_levels()
        .into_iter()
        .map(simd::SimdLevel::name)
        .collect()
}

#[pyfunction]
pub(super) fn set_simd_level(level: &str) -> PyResult<()> {
    simd::set_active_level(level).map_err(|e| invalid("level".into(), e.problem))?;
    Ok(())
}

#[pyfunction]
pub(super) fn num_threads() -> usize {
    parallel::num_threads()
}

#[pyfunction]
pub(super) fn set_num_threads(n: i64) -> PyResult<()> {
    let n = usize::try_from(n)
        .map_err(|_| invalid("n".into(), format!("must be >= 1 threads, got {n}")))?;
    Ok(parallel::set_num_threads(n)?)
}
