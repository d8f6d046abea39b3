//! AVX-512F: 16 lanes; with AVX-512 BF16, its conversion to bfloat16.

use super::{update_with, vector_arithmetic};
use crate::dtype::stochastic::Rounding;
use crate::lanes::{Bits, Lanes};
use crate::math::StepConstants;
use crate::TensorSlices;
use std::arch::x86_64::*;

/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn update(t: TensorSlices<'_>, c: &StepConstants, rounding: Rounding) {
    update_with::<Avx512<false>>(t, c, rounding);
}

/// # Safety
/// The CPU must support AVX-512F and AVX-512 BF16.
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn update_with_bf16_instructions(
    t: TensorSlices<'_>,
    c: &StepConstants,
    rounding: Rounding,
) {
    update_with::<Avx512<true>>(t, c, rounding);
}

/// Made only inside `update` (and, with `BF16`, only inside
/// `update_with_bf16_instructions`), so on a CPU with those features.
#[derive(Clone, Copy)]
struct Avx512<const BF16: bool>(__m512);

/// Made only inside `update`, like `Avx512`.
#[derive(Clone, Copy)]
struct Avx512Bits(__m512i);

vector_arithmetic!(
    Avx512<const BF16: bool>,
    _mm512_add_ps,
    _mm512_sub_ps,
    _mm512_mul_ps,
    _mm512_div_ps
);

// Round to nearest even whatever MXCSR says.
const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT;

// SAFETY (every block below): a value of these types exists only inside `update`.
impl<const BF16: bool> Lanes for Avx512<BF16> {
    const LANES: usize = 16;
    type Bits = Avx512Bits;

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

    #[inline(always)]
    fn to_bits(self) -> Avx512Bits {
        Avx512Bits(unsafe { _mm512_castps_si512(self.0) })
    }

    #[inline(always)]
    fn from_bits(bits: Avx512Bits) -> Self {
        Self(unsafe { _mm512_castsi512_ps(bits.0) })
    }

    #[inline(always)]
    fn if_nan(self, then: Self, otherwise: Self) -> Self {
        let nan = unsafe { _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(self.0, self.0) };
        Self(unsafe { _mm512_mask_blend_ps(nan, otherwise.0, then.0) })
    }

    #[inline(always)]
    unsafe fn load_f16(from: *const u16) -> Self {
        Self(unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(from.cast())) })
    }

    #[inline(always)]
    unsafe fn store_f16(self, to: *mut u16) {
        unsafe { _mm256_storeu_si256(to.cast(), _mm512_cvtps_ph::<NEAREST>(self.0)) }
    }

    #[inline(always)]
    unsafe fn store_bf16(self, to: *mut u16) {
        let in_integers = crate::dtype::bf16::nearest_in_integers::<Self>;
        if !BF16 {
            return unsafe { in_integers(self).store_u16(to) };
        }
        // vcvtneps2bf16 rounds to nearest even and quiets NaNs as the integer
        // definition does, but reads subnormals as zero: a vector holding one
        // takes the definition instead (rare: below 2^-126).
        let magnitude = self.to_bits().and(Avx512Bits::splat(0x7FFF_FFFF)).0;
        let subnormal = unsafe {
            _mm512_cmplt_epu32_mask(magnitude, _mm512_set1_epi32(0x0080_0000))
                & _mm512_cmpneq_epu32_mask(magnitude, _mm512_setzero_si512())
        };
        if subnormal != 0 {
            return unsafe { in_integers(self).store_u16(to) };
        }
        let halves: __m256bh = unsafe { _mm512_cvtneps_pbh(self.0) };
        // SAFETY (transmute): both are 256 bits of lanes, bfloat16 ones as integers.
        let halves = unsafe { std::mem::transmute::<__m256bh, __m256i>(halves) };
        unsafe { _mm256_storeu_si256(to.cast(), halves) }
    }
}

impl Bits for Avx512Bits {
    #[inline(always)]
    fn splat(x: u32) -> Self {
        Self(unsafe { _mm512_set1_epi32(x as i32) })
    }
    #[inline(always)]
    fn lane_indices() -> Self {
        Self(unsafe { _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15) })
    }
    #[inline(always)]
    fn add(self, other: Self) -> Self {
        Self(unsafe { _mm512_add_epi32(self.0, other.0) })
    }
    #[inline(always)]
    fn mul(self, other: Self) -> Self {
        Self(unsafe { _mm512_mullo_epi32(self.0, other.0) })
    }
    #[inline(always)]
    fn and(self, other: Self) -> Self {
        Self(unsafe { _mm512_and_si512(self.0, other.0) })
    }
    #[inline(always)]
    fn and_not(self, other: Self) -> Self {
        Self(unsafe { _mm512_andnot_si512(other.0, self.0) }) // !other & self
    }
    #[inline(always)]
    fn or(self, other: Self) -> Self {
        Self(unsafe { _mm512_or_si512(self.0, other.0) })
    }
    #[inline(always)]
    fn xor(self, other: Self) -> Self {
        Self(unsafe { _mm512_xor_si512(self.0, other.0) })
    }
    #[inline(always)]
    fn shl(self, n: u32) -> Self {
        Self(unsafe { _mm512_sll_epi32(self.0, _mm_cvtsi32_si128(n as i32)) })
    }
    #[inline(always)]
    fn shr(self, n: u32) -> Self {
        Self(unsafe { _mm512_srl_epi32(self.0, _mm_cvtsi32_si128(n as i32)) })
    }
    #[inline(always)]
    unsafe fn load_u16(from: *const u16) -> Self {
        Self(unsafe { _mm512_cvtepu16_epi32(_mm256_loadu_si256(from.cast())) })
    }
    #[inline(always)]
    unsafe fn store_u16(self, to: *mut u16) {
        unsafe { _mm256_storeu_si256(to.cast(), _mm512_cvtepi32_epi16(self.0)) }
    }
    #[inline(always)]
    unsafe fn load_u8(from: *const u8) -> Self {
        Self(unsafe { _mm512_cvtepu8_epi32(_mm_loadu_si128(from.cast())) })
    }
    #[inline(always)]
    unsafe fn store_u8(self, to: *mut u8) {
        unsafe { _mm_storeu_si128(to.cast(), _mm512_cvtepi32_epi8(self.0)) }
    }
    #[inline(always)]
    fn min(self, other: Self) -> Self {
        Self(unsafe { _mm512_min_epu32(self.0, other.0) })
    }
    #[inline(always)]
    fn max(self, other: Self) -> Self {
        Self(unsafe { _mm512_max_epu32(self.0, other.0) })
    }
    #[inline(always)]
    fn reduce_max(self) -> u32 {
        unsafe { _mm512_reduce_max_epu32(self.0) }
    }
}
