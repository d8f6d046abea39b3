//! 8-bit block-wise quantised state: each block of `BLOCK` elements is stored
//! as 8-bit codes and one float32 scale. A code is a tiny float relative to
//! the scale, so small values keep their relative precision (as bitsandbytes'
//! dynamic map does) while encoding and decoding stay integer arithmetic that
//! every instruction set runs alike (no table, no search):
//!
//! - first moments (`FirstMoments`): sign, 3 exponent bits, 4 mantissa bits,
//!   values ±2^-10 .. ±1.9375 of the scale (subnormals below 2^-6);
//! - second moments (`SecondMoments`) as their square roots, which is what
//!   the update divides by: 3 exponent bits, 5 mantissa bits, values 2^-11 ..
//!   1.96875 of the scale, and a nonzero value never rounds to zero (a zero
//!   second moment would make the step m/ε).
//!
//! The block's scale is its largest (stored) magnitude over the largest code,
//! so the largest element is stored (nearly) exactly and the rest round to
//! nearest: relative error at most 1/32 (m) and 1/64 (√v) above the
//! subnormals. A block holding a NaN or an infinity decodes as NaN throughout.
//! On the moments of a real training run the update m/(√v+ε) they give is
//! closer to the exact one than bitsandbytes' dynamic map gives
//! (`benchmarks/dtype_accuracy.py`).

use crate::lanes::{Bits, Lanes};

/// Elements per block (per scale).
pub const BLOCK: usize = 256;

/// Blocks needed for `n` elements.
pub fn blocks(n: usize) -> usize {
    n.div_ceil(BLOCK)
}

/// One of the two code formats. Both have their smallest normal at 2^-6, so
/// scaled by 2^-120 the format's grid is float32's with the low
/// `23 - MANTISSA_BITS` bits dropped (normal and subnormal alike).
pub trait Format {
    /// Bit 7 is the sign.
    const SIGNED: bool;
    const MANTISSA_BITS: u32;
    /// The largest code's value.
    const LARGEST: f32;
    /// Stores square roots (and so never rounds a nonzero value to zero).
    const SQUARE_ROOTS: bool;
}

/// First moments: sign, 3 exponent bits, 4 mantissa bits.
pub struct FirstMoments;
/// Second moments, as square roots: 3 exponent bits, 5 mantissa bits.
pub struct SecondMoments;

impl Format for FirstMoments {
    const SIGNED: bool = true;
    const MANTISSA_BITS: u32 = 4;
    const LARGEST: f32 = 1.9375; // 2^0 · (1 + 15/16)
    const SQUARE_ROOTS: bool = false;
}

impl Format for SecondMoments {
    const SIGNED: bool = false;
    const MANTISSA_BITS: u32 = 5;
    const LARGEST: f32 = 1.96875; // 2^0 · (1 + 31/32)
    const SQUARE_ROOTS: bool = true;
}

const TO_FLOAT32_GRID: f32 = f32::from_bits((127 - 120) << 23); // 2^-120
const FROM_FLOAT32_GRID: f32 = f32::from_bits((127 + 120) << 23); // 2^120

/// What the format stores of a moment `x`: `x`, or its square root.
#[inline(always)]
pub fn stored<V: Lanes, F: Format>(x: V) -> V {
    if F::SQUARE_ROOTS {
        x.sqrt()
    } else {
        x
    }
}

/// The moment a stored value stands for.
#[inline(always)]
pub fn moment<V: Lanes, F: Format>(stored: V) -> V {
    if F::SQUARE_ROOTS {
        stored * stored
    } else {
        stored
    }
}

/// A block's scale from its largest magnitude (as float32 bits, so a NaN is
/// the largest of all): NaN for a block that is not finite.
pub fn scale_of<F: Format>(largest_magnitude_bits: u32) -> f32 {
    let largest = f32::from_bits(largest_magnitude_bits);
    if largest.is_finite() {
        largest / F::LARGEST
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

/// `V::LANES` codes at `from`, decoded and scaled: stored values (see `moment`).
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
    let mut bits = magnitude.shl(23 - F::MANTISSA_BITS);
    if F::SIGNED {
        bits = bits.or(codes.and(V::Bits::splat(0x80)).shl(24));
    }
    V::from_bits(bits) * V::splat(FROM_FLOAT32_GRID) * scale
}

/// Encodes stored values `x` (already multiplied by the block's inverse scale,
/// so of magnitude at most about `F::LARGEST`) as codes, rounded to nearest
/// even (for square roots, a nonzero value to at least the smallest code),
/// written at `to`.
///
/// # Safety
/// `V::LANES` bytes must be writable at `to`.
#[inline(always)]
pub unsafe fn encode<V: Lanes, F: Format>(x: V, to: *mut u8) {
    let dropped = 23 - F::MANTISSA_BITS;
    let bits = (x * V::splat(TO_FLOAT32_GRID)).to_bits();
    let magnitude = bits.and(V::Bits::splat(0x7FFF_FFFF));
    let lowest_kept = magnitude.shr(dropped).and(V::Bits::splat(1));
    let rounded = magnitude
        .add(V::Bits::splat((1 << (dropped - 1)) - 1))
        .add(lowest_kept)
        .shr(dropped);
    let largest = V::Bits::splat(if F::SIGNED { 0x7F } else { 0xFF });
    // Rounding can carry just past the largest code (the inverse scale is rounded).
    let mut code = rounded.min(largest);
    if F::SIGNED {
        code = code.or(bits.shr(24).and(V::Bits::splat(0x80)));
    }
    if F::SQUARE_ROOTS {
        let nonzero = x
            .to_bits()
            .and(V::Bits::splat(0x7FFF_FFFF))
            .min(V::Bits::splat(1));
        code = code.max(nonzero);
    }
    // SAFETY: the caller's contract.
    unsafe { code.store_u8(to) }
}

/// Quantises moments `values` into `codes` and one scale per block, as the
/// kernel stores them: `first` moments or second ones. Lengths must match.
pub fn quantize(values: &[f32], codes: &mut [u8], scales: &mut [f32], first: bool) {
    if first {
        quantize_as::<FirstMoments>(values, codes, scales)
    } else {
        quantize_as::<SecondMoments>(values, codes, scales)
    }
}

fn quantize_as<F: Format>(values: &[f32], codes: &mut [u8], scales: &mut [f32]) {
    assert!(codes.len() == values.len() && scales.len() == blocks(values.len()));
    let mut stored_values = [0.0f32; BLOCK];
    for ((values, codes), scale) in values
        .chunks(BLOCK)
        .zip(codes.chunks_mut(BLOCK))
        .zip(scales.iter_mut())
    {
        let block = &mut stored_values[..values.len()];
        for (to, &x) in block.iter_mut().zip(values) {
            *to = stored::<f32, F>(x);
        }
        let largest = block.iter().map(|&x| magnitude_bits(x)).max();
        *scale = encode_block::<f32, F>(block, codes, largest.unwrap_or(0));
    }
}

/// Encodes one block's stored `values` into `codes` under the scale that
/// their largest magnitude (`largest`, as float32 bits) gives, in vectors of
/// `V` and then a lane at a time; returns the scale.
#[inline(always)]
pub fn encode_block<V: Lanes, F: Format>(values: &[f32], codes: &mut [u8], largest: u32) -> f32 {
    assert_eq!(values.len(), codes.len());
    let scale = scale_of::<F>(largest);
    let inverse = inverse_of(scale);
    let body = values.len() - values.len() % V::LANES;
    for i in (0..body).step_by(V::LANES) {
        // SAFETY: i + LANES <= body <= the length of both slices.
        unsafe {
            let x = V::load(values.as_ptr().add(i)) * V::splat(inverse);
            encode::<V, F>(x, codes.as_mut_ptr().add(i));
        }
    }
    for (&x, code) in values[body..].iter().zip(&mut codes[body..]) {
        // SAFETY: one lane, one byte.
        unsafe { encode::<f32, F>(x * inverse, code) }
    }
    scale
}

/// The moments that `codes` and `scales` stand for. Lengths must match.
pub fn dequantize(codes: &[u8], scales: &[f32], first: bool, values: &mut [f32]) {
    assert!(codes.len() == values.len() && scales.len() == blocks(values.len()));
    for (i, (code, value)) in codes.iter().zip(values).enumerate() {
        let scale = scales[i / BLOCK];
        // SAFETY: one lane, one byte.
        *value = unsafe {
            if first {
                decode::<f32, FirstMoments>(code, scale)
            } else {
                moment::<f32, SecondMoments>(decode::<f32, SecondMoments>(code, scale))
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

    fn check_rounding<F: Format>(largest: f32) {
        let scale = scale_of::<F>(largest.to_bits());
        assert!((round_trip::<F>(largest, scale) - largest).abs() <= largest * 1e-6);
        let spacing = 2f32.powi(-(F::MANTISSA_BITS as i32)); // relative, above the subnormals
        for i in 1..1000 {
            let x = largest * (i as f32 / 1000.0).powi(3);
            let decoded = round_trip::<F>(x, scale);
            let smallest = 2f32.powi(-6) * spacing * scale;
            if F::SQUARE_ROOTS && x < smallest / 2.0 {
                assert_eq!(decoded, smallest, "{x}: to the smallest code, not to zero");
                continue;
            }
            let tolerance = if x / scale >= 2f32.powi(-6) {
                x * spacing / 2.0
            } else {
                2f32.powi(-6) * spacing / 2.0 * scale // subnormal: absolute steps
            };
            assert!(
                (decoded - x).abs() <= tolerance * 1.0001,
                "{x} -> {decoded}"
            );
        }
    }

    #[test]
    fn the_largest_value_survives_and_the_rest_round_to_nearest() {
        for largest in [1.0f32, 3.0e-5, 7.5e12] {
            check_rounding::<FirstMoments>(largest);
            check_rounding::<SecondMoments>(largest);
            assert_eq!(
                round_trip::<FirstMoments>(-largest, scale_of::<FirstMoments>(largest.to_bits())),
                -round_trip::<FirstMoments>(largest, scale_of::<FirstMoments>(largest.to_bits()))
            );
        }
    }

    #[test]
    fn codes_are_the_format_s_floats() {
        // Each code decodes to ±2^(e-7)·(1 + f/2^M), or a subnormal, and encodes back.
        fn check<F: Format>() {
            let mantissa_codes = 1u32 << F::MANTISSA_BITS;
            for code in 0..=255u8 {
                let decoded = unsafe { decode::<f32, F>(&code, 1.0) };
                let magnitude_code = u32::from(if F::SIGNED { code & 0x7F } else { code });
                let e = (magnitude_code / mantissa_codes) as i32;
                let f = (magnitude_code % mantissa_codes) as f32 / mantissa_codes as f32;
                let magnitude = if e == 0 {
                    f * 2f32.powi(-6)
                } else {
                    (1.0 + f) * 2f32.powi(e - 7)
                };
                let negative = F::SIGNED && code >= 128;
                assert_eq!(decoded, if negative { -magnitude } else { magnitude });
                let mut back = 0u8;
                unsafe { encode::<f32, F>(decoded, &mut back) };
                // Square roots never round to zero, so 0 and 1 both come back as... themselves.
                assert_eq!(back, code, "{code:#04x}");
            }
        }
        check::<FirstMoments>();
        check::<SecondMoments>();
    }

    #[test]
    fn square_roots_never_round_to_zero() {
        let mut code = 0u8;
        unsafe { encode::<f32, SecondMoments>(1e-30, &mut code) };
        assert_eq!(code, 1);
        unsafe { encode::<f32, FirstMoments>(1e-30, &mut code) };
        assert_eq!(code, 0);
        unsafe { encode::<f32, SecondMoments>(0.0, &mut code) };
        assert_eq!(code, 0);
    }

    #[test]
    fn blocks_that_are_not_finite_or_are_zero() {
        assert!(scale_of::<FirstMoments>(f32::NAN.to_bits()).is_nan());
        assert!(scale_of::<SecondMoments>(f32::INFINITY.to_bits()).is_nan());
        assert_eq!(inverse_of(f32::NAN), 0.0);
        assert_eq!(inverse_of(0.0), 0.0);
        assert_eq!(round_trip::<FirstMoments>(0.0, 0.0), 0.0);
        assert!(round_trip::<SecondMoments>(1.0, f32::NAN).is_nan());
    }

    #[test]
    fn quantize_and_dequantize_store_second_moments_as_square_roots() {
        let values = [4.0f32, 1.0, 0.25, 0.0];
        let (mut codes, mut scales, mut back) = ([0u8; 4], [0.0f32; 1], [0.0f32; 4]);
        quantize(&values, &mut codes, &mut scales, false);
        assert_eq!(scales[0], 2.0 / 1.96875);
        dequantize(&codes, &scales, false, &mut back);
        for (x, y) in values.iter().zip(back) {
            assert!((x - y).abs() <= x / 16.0, "{x} -> {y}");
        }
    }
}
