//! NEON (aarch64): 4 lanes.

use super::{update_with, vector_arithmetic};
use crate::dtype::stochastic::Rounding;
use crate::lanes::{Bits, Lanes};
use crate::math::StepConstants;
use crate::TensorSlices;
use std::arch::aarch64::*;
use std::arch::asm;

/// # Safety
/// The CPU must support NEON (every aarch64 CPU Rust targets does).
#[target_feature(enable = "neon")]
pub unsafe fn update(t: TensorSlices<'_>, c: &StepConstants, rounding: Rounding) {
    update_with::<Neon>(t, c, rounding);
}

/// Made only inside `update`, so on a CPU with NEON.
#[derive(Clone, Copy)]
struct Neon(float32x4_t);

/// Made only inside `update`, like `Neon`.
#[derive(Clone, Copy)]
struct NeonBits(uint32x4_t);

vector_arithmetic!(Neon, vaddq_f32, vsubq_f32, vmulq_f32, vdivq_f32);

// SAFETY (every block below): a value of these types exists only inside `update`.
impl Lanes for Neon {
    const LANES: usize = 4;
    type Bits = NeonBits;

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

    #[inline(always)]
    fn to_bits(self) -> NeonBits {
        NeonBits(unsafe { vreinterpretq_u32_f32(self.0) })
    }

    #[inline(always)]
    fn from_bits(bits: NeonBits) -> Self {
        Self(unsafe { vreinterpretq_f32_u32(bits.0) })
    }

    #[inline(always)]
    fn if_nan(self, then: Self, otherwise: Self) -> Self {
        // A lane equals itself unless it is a NaN.
        Self(unsafe { vbslq_f32(vceqq_f32(self.0, self.0), otherwise.0, then.0) })
    }

    // Rust has no stable float16 vector type, so fcvtl/fcvtn are written out;
    // they round as FPCR says, to nearest even unless a caller changed it.
    #[inline(always)]
    unsafe fn load_f16(from: *const u16) -> Self {
        let halves = unsafe { vld1_u16(from) };
        let widened: float32x4_t;
        unsafe {
            asm!("fcvtl {0:v}.4s, {1:v}.4h", out(vreg) widened, in(vreg) halves,
                 options(pure, nomem, nostack))
        };
        Self(widened)
    }

    #[inline(always)]
    unsafe fn store_f16(self, to: *mut u16) {
        let narrowed: uint16x4_t;
        unsafe {
            asm!("fcvtn {0:v}.4h, {1:v}.4s", out(vreg) narrowed, in(vreg) self.0,
                 options(pure, nomem, nostack))
        };
        unsafe { vst1_u16(to, narrowed) }
    }
    #[inline(always)]
    unsafe fn store_bf16(self, to: *mut u16) {
        // SAFETY: the caller's contract.
        unsafe { crate::dtype::bf16::nearest_in_integers(self).store_u16(to) }
    }
}

impl Bits for NeonBits {
    #[inline(always)]
    fn splat(x: u32) -> Self {
        Self(unsafe { vdupq_n_u32(x) })
    }
    #[inline(always)]
    fn lane_indices() -> Self {
        const INDICES: [u32; 4] = [0, 1, 2, 3];
        Self(unsafe { vld1q_u32(INDICES.as_ptr()) })
    }
    #[inline(always)]
    fn add(self, other: Self) -> Self {
        Self(unsafe { vaddq_u32(self.0, other.0) })
    }
    #[inline(always)]
    fn mul(self, other: Self) -> Self {
        Self(unsafe { vmulq_u32(self.0, other.0) })
    }
    #[inline(always)]
    fn and(self, other: Self) -> Self {
        Self(unsafe { vandq_u32(self.0, other.0) })
    }
    #[inline(always)]
    fn and_not(self, other: Self) -> Self {
        Self(unsafe { vbicq_u32(self.0, other.0) }) // self & !other
    }
    #[inline(always)]
    fn or(self, other: Self) -> Self {
        Self(unsafe { vorrq_u32(self.0, other.0) })
    }
    #[inline(always)]
    fn xor(self, other: Self) -> Self {
        Self(unsafe { veorq_u32(self.0, other.0) })
    }
    #[inline(always)]
    fn shl(self, n: u32) -> Self {
        Self(unsafe { vshlq_u32(self.0, vdupq_n_s32(n as i32)) })
    }
    #[inline(always)]
    fn shr(self, n: u32) -> Self {
        Self(unsafe { vshlq_u32(self.0, vdupq_n_s32(-(n as i32))) }) // a negative count shifts right
    }
    #[inline(always)]
    unsafe fn load_u16(from: *const u16) -> Self {
        Self(unsafe { vmovl_u16(vld1_u16(from)) })
    }
    #[inline(always)]
    unsafe fn store_u16(self, to: *mut u16) {
        unsafe { vst1_u16(to, vmovn_u32(self.0)) }
    }
    #[inline(always)]
    unsafe fn load_u8(from: *const u8) -> Self {
        // Exactly four bytes are read (vld1_u8 would read eight).
        let word = unsafe { from.cast::<u32>().read_unaligned() };
        let bytes = unsafe { vcreate_u8(u64::from(word)) };
        Self(unsafe { vmovl_u16(vget_low_u16(vmovl_u8(bytes))) })
    }
    #[inline(always)]
    unsafe fn store_u8(self, to: *mut u8) {
        let halves = unsafe { vmovn_u32(self.0) };
        let bytes = unsafe { vmovn_u16(vcombine_u16(halves, halves)) };
        let word = unsafe { vget_lane_u32::<0>(vreinterpret_u32_u8(bytes)) };
        unsafe { to.cast::<u32>().write_unaligned(word) }
    }
    #[inline(always)]
    fn min(self, other: Self) -> Self {
        Self(unsafe { vminq_u32(self.0, other.0) })
    }
    #[inline(always)]
    fn max(self, other: Self) -> Self {
        Self(unsafe { vmaxq_u32(self.0, other.0) })
    }
    #[inline(always)]
    fn reduce_max(self) -> u32 {
        unsafe { vmaxvq_u32(self.0) }
    }
}
