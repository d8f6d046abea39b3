//! AVX2 with FMA and F16C: 8 lanes.

use super::{update_with, vector_arithmetic};
use crate::dtype::stochastic::Rounding;
use crate::lanes::{Bits, Lanes};
use crate::math::StepConstants;
use crate::TensorSlices;
use std::arch::x86_64::*;

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn update(t: TensorSlices<'_>, c: &StepConstants, rounding: Rounding) {
    update_with::<Avx2>(t, c, rounding);
}

/// Made only inside `update`, so on a CPU with AVX2, FMA and F16C.
#[derive(Clone, Copy)]
struct Avx2(__m256);

/// Made only inside `update`, like `Avx2`.
#[derive(Clone, Copy)]
struct Avx2Bits(__m256i);

vector_arithmetic!(
    Avx2,
    _mm256_add_ps,
    _mm256_sub_ps,
    _mm256_mul_ps,
    _mm256_div_ps
);

// Round to nearest even whatever MXCSR says.
const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT;

// SAFETY (every block below): a value of these types exists only inside `update`.
impl Lanes for Avx2 {
    const LANES: usize = 8;
    type Bits = Avx2Bits;

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

    #[inline(always)]
    fn to_bits(self) -> Avx2Bits {
        Avx2Bits(unsafe { _mm256_castps_si256(self.0) })
    }

    #[inline(always)]
    fn from_bits(bits: Avx2Bits) -> Self {
        Self(unsafe { _mm256_castsi256_ps(bits.0) })
    }

    #[inline(always)]
    fn if_nan(self, then: Self, otherwise: Self) -> Self {
        let nan = unsafe { _mm256_cmp_ps::<_CMP_UNORD_Q>(self.0, self.0) };
        Self(unsafe { _mm256_blendv_ps(otherwise.0, then.0, nan) })
    }

    #[inline(always)]
    unsafe fn load_f16(from: *const u16) -> Self {
        Self(unsafe { _mm256_cvtph_ps(_mm_loadu_si128(from.cast())) })
    }

    #[inline(always)]
    unsafe fn store_f16(self, to: *mut u16) {
        unsafe { _mm_storeu_si128(to.cast(), _mm256_cvtps_ph::<NEAREST>(self.0)) }
    }
    #[inline(always)]
    unsafe fn store_bf16(self, to: *mut u16) {
        // SAFETY: the caller's contract.
        unsafe { crate::dtype::bf16::nearest_in_integers(self).store_u16(to) }
    }
}

impl Bits for Avx2Bits {
    #[inline(always)]
    fn splat(x: u32) -> Self {
        Self(unsafe { _mm256_set1_epi32(x as i32) })
    }
    #[inline(always)]
    fn lane_indices() -> Self {
        Self(unsafe { _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7) })
    }
    #[inline(always)]
    fn add(self, other: Self) -> Self {
        Self(unsafe { _mm256_add_epi32(self.0, other.0) })
    }
    #[inline(always)]
    fn mul(self, other: Self) -> Self {
        Self(unsafe { _mm256_mullo_epi32(self.0, other.0) })
    }
    #[inline(always)]
    fn and(self, other: Self) -> Self {
        Self(unsafe { _mm256_and_si256(self.0, other.0) })
    }
    #[inline(always)]
    fn and_not(self, other: Self) -> Self {
        Self(unsafe { _mm256_andnot_si256(other.0, self.0) }) // !other & self
    }
    #[inline(always)]
    fn or(self, other: Self) -> Self {
        Self(unsafe { _mm256_or_si256(self.0, other.0) })
    }
    #[inline(always)]
    fn xor(self, other: Self) -> Self {
        Self(unsafe { _mm256_xor_si256(self.0, other.0) })
    }
    #[inline(always)]
    fn shl(self, n: u32) -> Self {
        Self(unsafe { _mm256_sll_epi32(self.0, _mm_cvtsi32_si128(n as i32)) })
    }
    #[inline(always)]
    fn shr(self, n: u32) -> Self {
        Self(unsafe { _mm256_srl_epi32(self.0, _mm_cvtsi32_si128(n as i32)) })
    }
    #[inline(always)]
    unsafe fn load_u16(from: *const u16) -> Self {
        Self(unsafe { _mm256_cvtepu16_epi32(_mm_loadu_si128(from.cast())) })
    }
    #[inline(always)]
    unsafe fn store_u16(self, to: *mut u16) {
        // Each 128-bit half packs its four lanes twice; the permute gathers one copy of each.
        let packed = unsafe { _mm256_packus_epi32(self.0, self.0) };
        let ordered = unsafe { _mm256_permute4x64_epi64::<0b1000>(packed) };
        unsafe { _mm_storeu_si128(to.cast(), _mm256_castsi256_si128(ordered)) }
    }
    #[inline(always)]
    unsafe fn load_u8(from: *const u8) -> Self {
        Self(unsafe { _mm256_cvtepu8_epi32(_mm_loadl_epi64(from.cast())) })
    }
    #[inline(always)]
    unsafe fn store_u8(self, to: *mut u8) {
        // Packed to 16 then 8 bits within each 128-bit half: four bytes per half.
        let words = unsafe { _mm256_packus_epi32(self.0, self.0) };
        let bytes = unsafe { _mm256_packus_epi16(words, words) };
        let low = unsafe { _mm256_castsi256_si128(bytes) };
        let high = unsafe { _mm256_extracti128_si256::<1>(bytes) };
        unsafe { _mm_storel_epi64(to.cast(), _mm_unpacklo_epi32(low, high)) }
    }
    #[inline(always)]
    fn min(self, other: Self) -> Self {
        Self(unsafe { _mm256_min_epu32(self.0, other.0) })
    }
    #[inline(always)]
    fn max(self, other: Self) -> Self {
        Self(unsafe { _mm256_max_epu32(self.0, other.0) })
    }
    #[inline(always)]
    fn reduce_max(self) -> u32 {
        let halves = unsafe {
            _mm_max_epu32(
                _mm256_castsi256_si128(self.0),
                _mm256_extracti128_si256::<1>(self.0),
            )
        };
        let pairs = unsafe { _mm_max_epu32(halves, _mm_shuffle_epi32::<0b01_00_11_10>(halves)) };
        let one = unsafe { _mm_max_epu32(pairs, _mm_shuffle_epi32::<0b10_11_00_01>(pairs)) };
        unsafe { _mm_cvtsi128_si32(one) as u32 }
    }
}
