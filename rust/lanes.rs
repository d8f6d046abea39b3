//! The vector abstraction everything else is written over: `Lanes`, a vector
//! of float32 values, and `Bits`, its 32-bit integer lanes. A leaf: it
//! depends on nothing of the crate. The scalar reference (`math`) and each
//! dtype's arithmetic (`dtype`) are generic over it; each instruction set's
//! module under `simd` implements it (`simd::scalar` for one lane).

use std::ops::{Add, Div, Mul, Sub};

/// A vector of `LANES` float32 values and what the update does with it.
pub trait Lanes:
    Copy + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> + Div<Output = Self>
{
    const LANES: usize;
    /// The lanes' bit patterns, as 32-bit integers.
    type Bits: Bits;
    fn splat(x: f32) -> Self;
    /// # Safety
    /// `LANES` floats must be readable at `from`.
    unsafe fn load(from: *const f32) -> Self;
    /// # Safety
    /// `LANES` floats must be writable at `to`.
    unsafe fn store(self, to: *mut f32);
    /// `self·a + b`, rounded once.
    fn mul_add(self, a: Self, b: Self) -> Self;
    fn sqrt(self) -> Self;
    /// `self` where `self > other`, else `other` (so a NaN picks `other`), as
    /// x86's max instructions do; not IEEE's maximum.
    fn greater_or(self, other: Self) -> Self;
    fn to_bits(self) -> Self::Bits;
    fn from_bits(bits: Self::Bits) -> Self;
    /// `then` in the lanes where `self` is a NaN, `otherwise` elsewhere.
    fn if_nan(self, then: Self, otherwise: Self) -> Self;
    /// `LANES` float16s at `from`, widened exactly (a signalling NaN quieted).
    ///
    /// # Safety
    /// `LANES` u16s must be readable at `from`.
    unsafe fn load_f16(from: *const u16) -> Self;
    /// The lanes rounded to nearest-even float16s, stored at `to`.
    ///
    /// # Safety
    /// `LANES` u16s must be writable at `to`.
    unsafe fn store_f16(self, to: *mut u16);
    /// The lanes rounded to nearest-even bfloat16s, stored at `to` (in
    /// integer arithmetic, `dtype::bf16::nearest_in_integers`, unless the ISA
    /// has an instruction that rounds alike).
    ///
    /// # Safety
    /// `LANES` u16s must be writable at `to`.
    unsafe fn store_bf16(self, to: *mut u16);
}

/// 32-bit integer lanes, for the conversions and the random bits of
/// stochastic rounding; arithmetic wraps.
pub trait Bits: Copy {
    fn splat(x: u32) -> Self;
    /// 0, 1, ..., LANES - 1.
    fn lane_indices() -> Self;
    fn add(self, other: Self) -> Self;
    fn mul(self, other: Self) -> Self;
    fn and(self, other: Self) -> Self;
    /// `self & !other`.
    fn and_not(self, other: Self) -> Self;
    fn or(self, other: Self) -> Self;
    fn xor(self, other: Self) -> Self;
    fn shl(self, n: u32) -> Self;
    fn shr(self, n: u32) -> Self;
    /// `LANES` u16s at `from`, zero-extended.
    ///
    /// # Safety
    /// `LANES` u16s must be readable at `from`.
    unsafe fn load_u16(from: *const u16) -> Self;
    /// Each lane (which must be below 2^16) stored as a u16 at `to`.
    ///
    /// # Safety
    /// `LANES` u16s must be writable at `to`.
    unsafe fn store_u16(self, to: *mut u16);
    /// `LANES` bytes at `from`, zero-extended.
    ///
    /// # Safety
    /// `LANES` bytes must be readable at `from`.
    unsafe fn load_u8(from: *const u8) -> Self;
    /// Each lane (which must be below 2^8) stored as a byte at `to`.
    ///
    /// # Safety
    /// `LANES` bytes must be writable at `to`.
    unsafe fn store_u8(self, to: *mut u8);
    /// Lane-wise unsigned minimum and maximum.
    fn min(self, other: Self) -> Self;
    fn max(self, other: Self) -> Self;
    /// The largest lane.
    fn reduce_max(self) -> u32;
}
