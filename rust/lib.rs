//! keras_adamw's host kernel: the AdamW update in place on host memory, in one
//! pass, with SIMD chosen at run time and many tensors in one parallel dispatch.
//!
//! In layers, each using only those above it:
//! - `lanes`: the `Lanes` and `Bits` traits, the vector everything is written
//!   over; a leaf;
//! - `math`: hyperparameters, step constants, and the element update, written
//!   once over `Lanes` (on `f32`, the scalar reference);
//! - `dtype`: the element types (float32, bfloat16, float16, 8-bit state),
//!   their conversions and stochastic rounding, written once over `Lanes`;
//! - `simd`: each instruction set's vector (`scalar`: one lane), the loop
//!   over slices, and the run-time choice between them;
//! - `parallel`: the thread pool and the split of a step's work across it;
//! - `in_flight`: the memory of the updates running now; overlapping calls wait;
//! - `bandwidth`: a plain in-place loop with the kernel's memory traffic, the
//!   ceiling the benchmark measures against;
//! - `xla_ffi`, `tensorflow_op`: the update as an XLA FFI handler and as a
//!   TensorFlow op, both through stable C APIs;
//! - `host_state`: offloaded state that the XLA handler updates by reference;
//! - `python` (feature `python`): the PyO3 bindings, `keras_adamw._core`, one
//!   file per concern (host update, host state, XLA, TensorFlow).

pub mod aliasing;
pub mod bandwidth;
pub mod dtype;
#[cfg(unix)]
pub mod fork;
pub mod host_state;
pub mod in_flight;
pub mod lanes;
pub mod math;
pub mod parallel;
#[cfg(feature = "python")]
mod python;
pub mod simd;
pub mod subnormals;
#[cfg(unix)]
pub mod tensorflow_op;
pub mod xla_ffi;

pub use dtype::stochastic::Rounding;
pub use dtype::{Bf16, DType, Elements, ElementsRef, F16};
pub use math::{DecayForm, DecayMode, EpsilonMode, Hyperparams, InvalidArgument, StepConstants};
pub use parallel::{adamw_step, adamw_step_from};
pub use simd::SimdLevel;

/// One tensor's parameters, gradient and optimizer state, all the same length.
#[derive(Debug)]
pub struct TensorSlices<'a> {
    pub params: Elements<'a>,
    pub grads: ElementsRef<'a>,
    /// The state, all of one dtype.
    pub exp_avg: Elements<'a>,
    pub exp_avg_sq: Elements<'a>,
    /// The running maximum of `exp_avg_sq`: present when AMSGrad is on.
    pub max_exp_avg_sq: Option<Elements<'a>>,
    /// Receives the new params rounded to its 16-bit dtype, in the same pass
    /// (the float32 params are then the master copy).
    pub param_copy: Option<Elements<'a>>,
    /// The tensor's position in the step, and the index of the first element
    /// here in it: the counter of stochastic rounding's random bits.
    pub tensor: u64,
    pub start: u64,
}

impl<'a> TensorSlices<'a> {
    /// Groups one float32 tensor's slices, checking that their lengths agree.
    pub fn new(
        params: &'a mut [f32],
        grads: &'a [f32],
        exp_avg: &'a mut [f32],
        exp_avg_sq: &'a mut [f32],
        max_exp_avg_sq: Option<&'a mut [f32]>,
    ) -> Result<Self, InvalidArgument> {
        Self::of_elements(
            Elements::F32(params),
            ElementsRef::F32(grads),
            Elements::F32(exp_avg),
            Elements::F32(exp_avg_sq),
            max_exp_avg_sq.map(Elements::F32),
        )
    }

    /// Groups one tensor's slices of any dtypes, checking that their lengths
    /// agree and that the state is of one dtype.
    pub fn of_elements(
        params: Elements<'a>,
        grads: ElementsRef<'a>,
        exp_avg: Elements<'a>,
        exp_avg_sq: Elements<'a>,
        max_exp_avg_sq: Option<Elements<'a>>,
    ) -> Result<Self, InvalidArgument> {
        let n = params.len();
        let lengths = [
            ("grads", grads.len()),
            ("exp_avgs", exp_avg.len()),
            ("exp_avg_sqs", exp_avg_sq.len()),
            (
                "amsgrad_max",
                max_exp_avg_sq.as_ref().map_or(n, Elements::len),
            ),
        ];
        for (name, len) in lengths {
            if len != n {
                return Err(InvalidArgument::new(
                    name,
                    format!("has {len} elements where params has {n}"),
                ));
            }
        }
        if params.dtype() == DType::Q8 {
            return Err(InvalidArgument::new(
                "params",
                "cannot be 8-bit block-wise (that is for state)",
            ));
        }
        let state_lists = [Some(&exp_avg), Some(&exp_avg_sq), max_exp_avg_sq.as_ref()];
        for (name, elements) in ["exp_avgs", "exp_avg_sqs", "amsgrad_max"]
            .into_iter()
            .zip(state_lists)
        {
            if let Some(Elements::Q8 { scales, .. }) = elements {
                let blocks = dtype::q8::blocks(n);
                if scales.len() != blocks {
                    return Err(InvalidArgument::new(
                        name,
                        format!(
                            "has {} block scales where {n} elements need {blocks}",
                            scales.len()
                        ),
                    ));
                }
            }
        }
        let state = exp_avg.dtype();
        let others = [
            ("exp_avg_sqs", Some(exp_avg_sq.dtype())),
            ("amsgrad_max", max_exp_avg_sq.as_ref().map(Elements::dtype)),
        ];
        for (name, dtype) in others {
            if let Some(dtype) = dtype.filter(|&dtype| dtype != state) {
                return Err(InvalidArgument::new(
                    name,
                    format!(
                        "has dtype {} where exp_avgs has {}: the state is of one dtype",
                        dtype.name(),
                        state.name()
                    ),
                ));
            }
        }
        Ok(Self {
            params,
            grads,
            exp_avg,
            exp_avg_sq,
            max_exp_avg_sq,
            param_copy: None,
            tensor: 0,
            start: 0,
        })
    }

    /// Adds a 16-bit copy of float32 params, written in the same pass.
    pub fn with_param_copy(mut self, copy: Elements<'a>) -> Result<Self, InvalidArgument> {
        if self.params.dtype() != DType::F32 {
            return Err(InvalidArgument::new(
                "param_copies",
                format!(
                    "need float32 params (the master copy), got {}",
                    self.params.dtype().name()
                ),
            ));
        }
        if !matches!(copy.dtype(), DType::Bf16 | DType::F16) {
            return Err(InvalidArgument::new(
                "param_copies",
                format!("must be bfloat16 or float16, got {}", copy.dtype().name()),
            ));
        }
        if copy.len() != self.len() {
            return Err(InvalidArgument::new(
                "param_copies",
                format!(
                    "has {} elements where params has {}",
                    copy.len(),
                    self.len()
                ),
            ));
        }
        self.param_copy = Some(copy);
        Ok(self)
    }

    /// Numbers the tensor within its step (for stochastic rounding).
    pub fn at_tensor(mut self, index: usize) -> Self {
        self.tensor = index as u64;
        self
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// Splits every slice at `mid` (with 8-bit state, at the end of a block).
    pub fn split_at(self, mid: usize) -> (Self, Self) {
        let (p0, p1) = self.params.split_at(mid);
        let (g0, g1) = self.grads.split_at(mid);
        let (m0, m1) = self.exp_avg.split_at(mid);
        let (v0, v1) = self.exp_avg_sq.split_at(mid);
        let split = |x: Option<Elements<'a>>| match x {
            Some(x) => {
                let (x0, x1) = x.split_at(mid);
                (Some(x0), Some(x1))
            }
            None => (None, None),
        };
        let (x0, x1) = split(self.max_exp_avg_sq);
        let (c0, c1) = split(self.param_copy);
        (
            Self {
                params: p0,
                grads: g0,
                exp_avg: m0,
                exp_avg_sq: v0,
                max_exp_avg_sq: x0,
                param_copy: c0,
                tensor: self.tensor,
                start: self.start,
            },
            Self {
                params: p1,
                grads: g1,
                exp_avg: m1,
                exp_avg_sq: v1,
                max_exp_avg_sq: x1,
                param_copy: c1,
                tensor: self.tensor,
                start: self.start + mid as u64,
            },
        )
    }
}

/// The current values an out-of-place step reads: the written slices of the
/// `TensorSlices` it goes with start as copies of these, made chunk by chunk
/// in the same pass (so the copy costs no extra trip through memory). A state
/// list without a source (None) is updated in place. Each source has its
/// slice's dtype (8-bit state has no out-of-place step).
#[derive(Debug)]
pub struct Sources<'a> {
    pub params: ElementsRef<'a>,
    pub exp_avg: Option<ElementsRef<'a>>,
    pub exp_avg_sq: Option<ElementsRef<'a>>,
    pub max_exp_avg_sq: Option<ElementsRef<'a>>,
}

impl<'a> Sources<'a> {
    /// Copies the sources into the slices they stand for.
    pub fn copy_into(&self, t: &mut TensorSlices<'_>) {
        t.params.copy_from(&self.params);
        if let Some(from) = &self.exp_avg {
            t.exp_avg.copy_from(from);
        }
        if let Some(from) = &self.exp_avg_sq {
            t.exp_avg_sq.copy_from(from);
        }
        if let (Some(from), Some(to)) = (&self.max_exp_avg_sq, t.max_exp_avg_sq.as_mut()) {
            to.copy_from(from);
        }
    }

    pub fn split_at(self, mid: usize) -> (Self, Self) {
        let (p0, p1) = self.params.split_at(mid);
        let split = |x: Option<ElementsRef<'a>>| match x {
            Some(x) => {
                let (x0, x1) = x.split_at(mid);
                (Some(x0), Some(x1))
            }
            None => (None, None),
        };
        let (m0, m1) = split(self.exp_avg);
        let (v0, v1) = split(self.exp_avg_sq);
        let (x0, x1) = split(self.max_exp_avg_sq);
        (
            Self {
                params: p0,
                exp_avg: m0,
                exp_avg_sq: v0,
                max_exp_avg_sq: x0,
            },
            Self {
                params: p1,
                exp_avg: m1,
                exp_avg_sq: v1,
                max_exp_avg_sq: x1,
            },
        )
    }
}
