//! AVX-512F: 16 lanes.

use super::{update_with, vector_arithmetic, Lanes};
use crate::math::StepConstants;
use crate::TensorSlices;
use std::arch::x86_64::*;

/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn update(t: TensorSlices<'_>, c: &StepConstants) {
    update_with::<Avx512>(t, c);
}

/// Made only inside `update`, so on a CPU with AVX-512F.
#[derive(Clone, Copy)]
struct Avx512(__m512);

vector_arithmetic!(
    Avx512,
    _mm512_add_ps,
    _mm512_sub_ps,
    _mm512_mul_ps,
    _mm512_div_ps
);

// SAFETY (every block below): a value of this type exists only inside `update`.
impl Lanes for Avx512 {
    const LANES: usize = 16;

    #[inline(always)]
    fn splat(x: f32) -> Self {
        Self(unsafe { _mm512_set1_ps(x) })
    }

    #[inline(always)]
    unsafe fn load(from: *const f32) -> Self {
        Self(unsafe { _mm512_loadu_ps(from) })
    }

    #[inline(always)]
    unsafe fn store(self, to: *mut f32) {
        unsafe { _mm512_storeu_ps(to, self.0) }
    }

    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        Self(unsafe { _mm512_fmadd_ps(self.0, a.0, b.0) })
    }

    #[inline(always)]
    fn sqrt(self) -> Self {
        Self(unsafe { _mm512_sqrt_ps(self.0) })
    }

    #[inline(always)]
    fn greater_or(self, other: Self) -> Self {
        Self(unsafe { _mm512_max_ps(self.0, other.0) }) // `a > b ? a : b`, lane-wise
    }
}
