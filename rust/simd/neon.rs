//! NEON (aarch64): 4 lanes.

use super::{update_with, vector_arithmetic, Lanes};
use crate::math::StepConstants;
use crate::TensorSlices;
use std::arch::aarch64::*;

/// # Safety
/// The CPU must support NEON (every aarch64 CPU Rust targets does).
#[target_feature(enable = "neon")]
pub unsafe fn update(t: TensorSlices<'_>, c: &StepConstants) {
    update_with::<Neon>(t, c);
}

/// Made only inside `update`, so on a CPU with NEON.
#[derive(Clone, Copy)]
struct Neon(float32x4_t);

vector_arithmetic!(Neon, vaddq_f32, vsubq_f32, vmulq_f32, vdivq_f32);

// SAFETY (every block below): a value of this type exists only inside `update`.
impl Lanes for Neon {
    const LANES: usize = 4;

    #[inline(always)]
    fn splat(x: f32) -> Self {
        Self(unsafe { vdupq_n_f32(x) })
    }

    #[inline(always)]
    unsafe fn load(from: *const f32) -> Self {
        Self(unsafe { vld1q_f32(from) })
    }

    #[inline(always)]
    unsafe fn store(self, to: *mut f32) {
        unsafe { vst1q_f32(to, self.0) }
    }

    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        Self(unsafe { vfmaq_f32(b.0, self.0, a.0) }) // b + self·a
    }

    #[inline(always)]
    fn sqrt(self) -> Self {
        Self(unsafe { vsqrtq_f32(self.0) })
    }

    #[inline(always)]
    fn greater_or(self, other: Self) -> Self {
        // Select on `>`: vmaxq would propagate a NaN instead.
        Self(unsafe { vbslq_f32(vcgtq_f32(self.0, other.0), self.0, other.0) })
    }
}
