//! keras_adamw's host kernel: the AdamW update in place on host memory, in one
//! pass, with SIMD chosen at run time and many tensors in one parallel dispatch.
//!
//! - `math`: hyperparameters, step constants, and the element update, written
//!   once over `simd::Lanes` (on `f32`, the scalar reference);
//! - `simd`: the `Lanes` trait, each instruction set's vector, the loop over
//!   slices, and the run-time choice between them;
//! - `parallel`: the thread pool and the split of a step's work across it;
//! - `in_flight`: the memory of the updates running now; overlapping calls wait;
//! - `bandwidth`: a plain in-place loop with the kernel's memory traffic, the
//!   ceiling the benchmark measures against;
//! - `xla_ffi`, `tensorflow_op`: the update as an XLA FFI handler and as a
//!   TensorFlow op, both through stable C APIs;
//! - `host_state`: offloaded state that the XLA handler updates by reference;
//! - `python` (feature `python`): the PyO3 bindings, `keras_adamw._core`.

pub mod aliasing;
pub mod bandwidth;
pub mod host_state;
pub mod in_flight;
pub mod math;
pub mod parallel;
#[cfg(feature = "python")]
mod python;
pub mod simd;
#[cfg(unix)]
pub mod tensorflow_op;
pub mod xla_ffi;

pub use math::{DecayForm, DecayMode, EpsilonMode, Hyperparams, InvalidArgument, StepConstants};
pub use parallel::{adamw_step, adamw_step_from};
pub use simd::SimdLevel;

/// One tensor's parameters, gradient and optimizer state, all the same length.
#[derive(Debug)]
pub struct TensorSlices<'a> {
    pub params: &'a mut [f32],
    pub grads: &'a [f32],
    pub exp_avg: &'a mut [f32],
    pub exp_avg_sq: &'a mut [f32],
    /// The running maximum of `exp_avg_sq`: present when AMSGrad is on.
    pub max_exp_avg_sq: Option<&'a mut [f32]>,
}

impl<'a> TensorSlices<'a> {
    /// Groups one tensor's slices, checking that their lengths agree.
    pub fn new(
        params: &'a mut [f32],
        grads: &'a [f32],
        exp_avg: &'a mut [f32],
        exp_avg_sq: &'a mut [f32],
        max_exp_avg_sq: Option<&'a mut [f32]>,
    ) -> Result<Self, InvalidArgument> {
        let n = params.len();
        let lengths = [
            ("grads", grads.len()),
            ("exp_avgs", exp_avg.len()),
            ("exp_avg_sqs", exp_avg_sq.len()),
            (
                "amsgrad_max",
                max_exp_avg_sq.as_ref().map_or(n, |s| s.len()),
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
        Ok(Self {
            params,
            grads,
            exp_avg,
            exp_avg_sq,
            max_exp_avg_sq,
        })
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// Splits every slice at `mid`.
    pub fn split_at(self, mid: usize) -> (Self, Self) {
        let (p0, p1) = self.params.split_at_mut(mid);
        let (g0, g1) = self.grads.split_at(mid);
        let (m0, m1) = self.exp_avg.split_at_mut(mid);
        let (v0, v1) = self.exp_avg_sq.split_at_mut(mid);
        let (x0, x1) = match self.max_exp_avg_sq {
            Some(x) => {
                let (x0, x1) = x.split_at_mut(mid);
                (Some(x0), Some(x1))
            }
            None => (None, None),
        };
        (
            Self {
                params: p0,
                grads: g0,
                exp_avg: m0,
                exp_avg_sq: v0,
                max_exp_avg_sq: x0,
            },
            Self {
                params: p1,
                grads: g1,
                exp_avg: m1,
                exp_avg_sq: v1,
                max_exp_avg_sq: x1,
            },
        )
    }
}

/// The current values an out-of-place step reads: the written slices of the
/// `TensorSlices` it goes with start as copies of these, made chunk by chunk
/// in the same pass (so the copy costs no extra trip through memory). A state
/// list without a source (None) is updated in place.
#[derive(Debug)]
pub struct Sources<'a> {
    pub params: &'a [f32],
    pub exp_avg: Option<&'a [f32]>,
    pub exp_avg_sq: Option<&'a [f32]>,
    pub max_exp_avg_sq: Option<&'a [f32]>,
}

impl<'a> Sources<'a> {
    /// Copies the sources into the slices they stand for.
    pub fn copy_into(&self, t: &mut TensorSlices<'_>) {
        t.params.copy_from_slice(self.params);
        if let Some(from) = self.exp_avg {
            t.exp_avg.copy_from_slice(from);
        }
        if let Some(from) = self.exp_avg_sq {
            t.exp_avg_sq.copy_from_slice(from);
        }
        if let (Some(from), Some(to)) = (self.max_exp_avg_sq, t.max_exp_avg_sq.as_deref_mut()) {
            to.copy_from_slice(from);
        }
    }

    pub fn split_at(self, mid: usize) -> (Self, Self) {
        let (p0, p1) = self.params.split_at(mid);
        let split = |x: Option<&'a [f32]>| match x {
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
