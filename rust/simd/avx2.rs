//! AVX2 with FMA: 8 lanes.

use super::{update_with, vector_arithmetic, Lanes};
use crate::math::StepConstants;
use crate::TensorSlices;
use std::arch::x86_64::*;

/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn update(t: TensorSlices<'_>, c: &StepConstants) {
    update_with::<Avx2>(t, c);
}

/// Made only inside `update`, so on a CPU with AVX2 and FMA.
#[derive(Clone, Copy)]
struct Avx2(__m256);

vector_arithmetic!(
    Avx2,
    _mm256_add_ps,
    _mm256_sub_ps,
    _mm256_mul_ps,
    _mm256_div_ps
);

// SAFETY (every block below): a value of this type exists only inside `update`.
impl Lanes for Avx2 {
    const LANES: usize = 8;

    #[inline(always)]
    fn splat(x: f32) -> Self {
        Self(unsafe { _mm256_set1_ps(x) })
    }

    #[inline(always)]
    unsafe fn load(from: *const f32) -> Self {
        Self(unsafe { _mm256_loadu_ps(from) })
    }

    #[inline(always)]
    unsafe fn store(self, to: *mut f32) {
        unsafe { _mm256_storeu_ps(to, self.0) }
    }

    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        Self(unsafe { _mm256_fmadd_ps(self.0, a.0, b.0) })
    }

    #[inline(always)]
    fn sqrt(self) -> Self {
        Self(unsafe { _mm256_sqrt_ps(self.0) })
    }

    #[inline(always)]
    fn greater_or(self, other: Self) -> Self {
        Self(unsafe { _mm256_max_ps(self.0, other.0) }) // `a > b ? a : b`, lane-wise
    }
}
