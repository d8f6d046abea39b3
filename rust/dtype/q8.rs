//! 8-bit block-wise quantised state: each block of `BLOCK` elements is stored
//! as 8-bit codes and one float32 scale. A code is a tiny float relative to
//! the scale, so small values keep their relative precision (as bitsandbytes'
//! dynamic map does) while encoding and decoding stay integer arithmetic that
//! every instruction set runs alike (no table, no search):
//!
//! - first moments (`Signed`): sign, 3 exponent bits, 4 mantissa bits, values
//!   ±2^-10 .. ±1.9375 (subnormals below 2^-6);
//! - second moments (`Unsigned`, never negative): 4 exponent bits, 4
//!   mantissa bits, values 2^-18 .. 1.9375 (subnormals below 2^-14).
//!
//! The block's scale is its largest magnitude / 1.9375, so the largest element
//! is stored (nearly) exactly and the rest round to nearest, relative error at
//! most 1/32 above the subnormals. A block holding a NaN or an infinity
//! decodes as NaN throughout. On the moments of a real training run the
//! update m/√v they give is closer to the exact one than bitsandbytes' dynamic
//! map gives (`benchmarks/dtype_accuracy.py`).

use crate::simd::{Bits, Lanes};

/// Elements per block (per scale).
pub const BLOCK: usize = 256;

/// The largest code's value: 2^0 · (1 + 15/16).
const LARGEST: f32 = 1.9375;

/// Mantissa bits of both formats: float32 has 19 more.
const DROPPED: u32 = 23 - 4;

/// Blocks needed for `n` elements.
pub fn blocks(n: usize) -> usize {
    n.div_ceil(BLOCK)
}

/// One of the two code formats.
pub trait Format {
    /// Bit 7 is the sign.
    const SIGNED: bool;
    /// Scales a value so the format's smallest normal is float32's, after
    /// which the format's grid is float32's with the low `DROPPED` bits
    /// dropped (normal and subnormal alike).
    const TO_FLOAT32_GRID: f32;
    /// The inverse scaling, exact.
    const FROM_FLOAT32_GRID: f32;
}

/// First moments: sign, 3 exponent bits (smallest normal 2^-6), 4 mantissa bits.
pub struct Signed;
/// Second moments: 4 exponent bits (smallest normal 2^-14), 4 mantissa bits.
pub struct Unsigned;

impl Format for Signed {
    const SIGNED: bool = true;
    const TO_FLOAT32_GRID: f32 = f32::from_bits((127 - 120) << 23); // 2^-120
    const FROM_FLOAT32_GRID: f32 = f32::from_bits((127 + 120) << 23); // 2^120
}

impl Format for Unsigned {
    const SIGNED: bool = false;
    const TO_FLOAT32_GRID: f32 = f32::from_bits((127 - 112) << 23); // 2^-112
    const FROM_FLOAT32_GRID: f32 = f32::from_bits((127 + 112) << 23); // 2^112
}

/// A block's scale from its largest magnitude (as float32 bits, so a NaN is
/// the largest of all): NaN for a block that is not finite.
pub fn scale_of(largest_magnitude_bits: u32) -> f32 {
    let largest = f32::from_bits(largest_magnitude_bits);
    if largest.is_finite() {
        largest / LARGEST
    } else {
        f32::NAN
    }
}

/// What values are multiplied by before encoding: 1/scale (0 for a zero or NaN
/// scale, whose codes are then all zero).
pub fn inverse_of(scale: f32) -> f32 {
    if scale > 0.0 && scale.is_finite() {
        1.0 / scale
    } else {
        0.0
    }
}

/// Magnitude bits for `abs_max`: the lanes' float32 bits without the sign.
#[inline(always)]
pub fn magnitude_bits<V: Lanes>(x: V) -> V::Bits {
    x.to_bits().and(V::Bits::splat(0x7FFF_FFFF))
}

/// `V::LANES` codes at `from`, decoded and scaled.
///
/// # Safety
/// `V::LANES` bytes must be readable at `from`.
#[inline(always)]
pub unsafe fn decode<V: Lanes, F: Format>(from: *const u8, scale: V) -> V {
    // SAFETY: the caller's contract.
    let codes = unsafe { V::Bits::load_u8(from) };
    let magnitude = if F::SIGNED {
        codes.and(V::Bits::splat(0x7F))
    } else {
        codes
    };
    let mut bits = magnitude.shl(DROPPED);
    if F::SIGNED {
        bits = bits.or(codes.and(V::Bits::splat(0x80)).shl(24));
    }
    V::from_bits(bits) * V::splat(F::FROM_FLOAT32_GRID) * scale
}

/// Encodes `x` (already multiplied by the block's inverse scale, so its
/// magnitude is at most about `LARGEST`) as codes, rounded to nearest even,
/// stored at `to`.
///
/// # Safety
/// `V::LANES` bytes must be writable at `to`.
#[inline(always)]
pub unsafe fn encode<V: Lanes, F: Format>(x: V, to: *mut u8) {
    let bits = (x * V::splat(F::TO_FLOAT32_GRID)).to_bits();
    let magnitude = bits.and(V::Bits::splat(0x7FFF_FFFF));
    let lowest_kept = magnitude.shr(DROPPED).and(V::Bits::splat(1));
    let rounded = magnitude
        .add(V::Bits::splat((1 << (DROPPED - 1)) - 1))
        .add(lowest_kept)
        .shr(DROPPED);
    let largest = V::Bits::splat(if F::SIGNED { 0x7F } else { 0xFF });
    // Rounding can carry just past the largest code (the inverse scale is rounded).
    let mut code = rounded.min(largest);
    if F::SIGNED {
        code = code.or(bits.shr(24).and(V::Bits::splat(0x80)));
    }
    // SAFETY: the caller's contract.
    unsafe { code.store_u8(to) }
}

/// Quantises `values` into `codes` and one scale per block (as the kernel
/// stores moments: `signed` for first moments). Lengths must match.
pub fn quantize(values: &[f32], codes: &mut [u8], scales: &mut [f32], signed: bool) {
    assert!(codes.len() == values.len() && scales.len() == blocks(values.len()));
    for ((values, codes), scale) in values
        .chunks(BLOCK)
        .zip(codes.chunks_mut(BLOCK))
        .zip(scales.iter_mut())
    {
        let largest = values.iter().map(|x| x.to_bits() & 0x7FFF_FFFF).max();
        *scale = scale_of(largest.unwrap_or(0));
        let inverse = inverse_of(*scale);
        for (&x, code) in values.iter().zip(codes) {
            // SAFETY: one lane, one byte.
            unsafe {
                if signed {
                    encode::<f32, Signed>(x * inverse, code)
                } else {
                    encode::<f32, Unsigned>(x * inverse, code)
                }
            }
        }
    }
}

/// The values that `codes` and `scales` stand for. Lengths must match.
pub fn dequantize(codes: &[u8], scales: &[f32], signed: bool, values: &mut [f32]) {
    assert!(codes.len() == values.len() && scales.len() == blocks(values.len()));
    for (i, (code, value)) in codes.iter().zip(values).enumerate() {
        let scale = scales[i / BLOCK];
        // SAFETY: one lane, one byte.
        *value = unsafe {
            if signed {
                decode::<f32, Signed>(code, scale)
            } else {
                decode::<f32, Unsigned>(code, scale)
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<F: Format>(x: f32, scale: f32) -> f32 {
        let mut code = 0u8;
        // SAFETY: one lane, one byte.
        unsafe {
            encode::<f32, F>(x * inverse_of(scale), &mut code);
            decode::<f32, F>(&code, scale)
        }
    }

    #[test]
    fn the_largest_value_survives_and_the_rest_round_within_a_32nd() {
        for largest in [1.0f32, 3.0e-5, 7.5e12] {
            let scale = scale_of(largest.to_bits());
            assert!((round_trip::<Signed>(largest, scale) - largest).abs() <= largest * 1e-6);
            assert!((round_trip::<Signed>(-largest, scale) + largest).abs() <= largest * 1e-6);
            assert!((round_trip::<Unsigned>(largest, scale) - largest).abs() <= largest * 1e-6);
            for i in 1..1000 {
                let x = largest * (i as f32 / 1000.0).powi(3);
                for (decoded, smallest_normal) in [
                    (round_trip::<Signed>(x, scale), 2f32.powi(-6)),
                    (round_trip::<Unsigned>(x, scale), 2f32.powi(-14)),
                ] {
                    let relative_to_scale = x / scale;
                    let tolerance = if relative_to_scale >= smallest_normal {
                        x / 32.0
                    } else {
                        smallest_normal / 32.0 * scale // subnormal: absolute steps
                    };
                    assert!(
                        (decoded - x).abs() <= tolerance * 1.0001,
                        "{x} -> {decoded}"
                    );
                }
            }
        }
    }

    #[test]
    fn codes_are_the_format_s_floats() {
        // Every signed code decodes to ±2^(e-7)·(1 + f/16), or a subnormal, and encodes back.
        for code in 0..=255u8 {
            let decoded = unsafe { decode::<f32, Signed>(&code, 1.0) };
            let (sign, e, f) = (code >> 7, i32::from((code >> 4) & 7), f32::from(code & 15));
            let magnitude = if e == 0 {
                f / 16.0 * 2f32.powi(-6)
            } else {
                (1.0 + f / 16.0) * 2f32.powi(e - 7)
            };
            assert_eq!(decoded, if sign == 1 { -magnitude } else { magnitude });
            let mut back = 0u8;
            unsafe { encode::<f32, Signed>(decoded, &mut back) };
            assert_eq!(back, code, "{code:#04x}");
        }
        for code in 0..=255u8 {
            let decoded = unsafe { decode::<f32, Unsigned>(&code, 1.0) };
            let (e, f) = (i32::from(code >> 4), f32::from(code & 15));
            let magnitude = if e == 0 {
                f / 16.0 * 2f32.powi(-14)
            } else {
                (1.0 + f / 16.0) * 2f32.powi(e - 15)
            };
            assert_eq!(decoded, magnitude);
            let mut back = 0u8;
            unsafe { encode::<f32, Unsigned>(decoded, &mut back) };
            assert_eq!(back, code);
        }
    }

    #[test]
    fn blocks_that_are_not_finite_or_are_zero() {
        assert!(scale_of(f32::NAN.to_bits()).is_nan());
        assert!(scale_of(f32::INFINITY.to_bits()).is_nan());
        assert_eq!(inverse_of(f32::NAN), 0.0);
        assert_eq!(inverse_of(0.0), 0.0);
        assert_eq!(round_trip::<Signed>(0.0, 0.0), 0.0);
        assert!(round_trip::<Unsigned>(1.0, f32::NAN).is_nan());
    }
}
