//! float16 (IEEE binary16: 5 exponent bits, 10 mantissa bits). The vector
//! levels convert with the CPU's instructions (F16C, AVX-512F, NEON's
//! fcvtl/fcvtn), which round to nearest even; the scalar reference here does
//! the same in integer arithmetic, and the kernel tests hold them bitwise equal.

use super::{element_slices, quiet_nan_or, Element};
use crate::lanes::{Bits, Lanes};

/// A float16, as its bits (`numpy.float16`, `torch.float16`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct F16(pub u16);

impl F16 {
    /// Rounded to nearest even; a NaN stays a NaN (quieted, top payload kept).
    pub fn from_f32(x: f32) -> Self {
        let bits = x.to_bits();
        let sign = (bits >> 16) as u16 & 0x8000;
        let magnitude = bits & 0x7FFF_FFFF;
        let rest = match magnitude {
            0x7F80_0001.. => 0x7E00 | (magnitude >> 13) as u16 & 0x3FF,
            0x4780_0000.. => 0x7C00, // >= 2^16: infinity
            0x3880_0000.. => {
                // A normal float16 (or 65520..65536, which carries into infinity).
                let rebiased = magnitude - (112 << 23);
                let rounded = rebiased + 0xFFF + ((rebiased >> 13) & 1);
                (rounded >> 13) as u16
            }
            ..0x3300_0000 => 0, // below 2^-25, or a tie at it: zero
            _ => {
                // A subnormal float16: the significand in units of 2^-24.
                let shift = 126 - (magnitude >> 23);
                let significand = (magnitude & 0x7F_FFFF) | 0x80_0000;
                let kept = significand >> shift;
                let dropped = significand & ((1 << shift) - 1);
                let half = 1 << (shift - 1);
                let up = dropped > half || (dropped == half && kept & 1 == 1);
                (kept + u32::from(up)) as u16
            }
        };
        Self(sign | rest)
    }

    /// Exact; a signalling NaN comes back quieted, as the CPUs do it.
    pub fn to_f32(self) -> f32 {
        let sign = u32::from(self.0 & 0x8000) << 16;
        let exponent = u32::from(self.0 >> 10) & 0x1F;
        let mantissa = u32::from(self.0 & 0x3FF);
        let magnitude = match (exponent, mantissa) {
            (0x1F, 0) => 0x7F80_0000,
            (0x1F, _) => 0x7FC0_0000 | (mantissa << 13),
            // Subnormal: mantissa · 2^-24, exact in float32.
            (0, _) => (mantissa as f32 * f32::from_bits(0x3380_0000)).to_bits(),
            _ => ((exponent + 112) << 23) | (mantissa << 13),
        };
        f32::from_bits(sign | magnitude)
    }
}

/// `x` rounded stochastically to a float16 value (returned as float32).
///
/// Scaled by 2^-112, float16's grid is float32's with the low 13 bits
/// dropped, for normal and subnormal values alike (2^-14·2^-112 is float32's
/// smallest normal), so one integer carry, as for bfloat16, rounds up with
/// probability equal to the dropped fraction. The scalings are exact, except
/// that scaled float16 subnormals keep 13 fewer bits: a bias below 2^-13 of a
/// float16 step.
#[inline(always)]
pub(crate) fn stochastic<V: Lanes>(x: V, random: V::Bits) -> V {
    let dropped = V::Bits::splat(0x1FFF);
    let scaled = (x * V::splat(f32::from_bits(0x0780_0000))).to_bits(); // 2^-112
    let carried = scaled.add(random.and(dropped)).and_not(dropped);
    let rounded = V::from_bits(carried) * V::splat(f32::from_bits(0x7780_0000)); // 2^112
    quiet_nan_or(x, rounded)
}

impl Element for F16 {
    element_slices!(F16);

    #[inline(always)]
    unsafe fn load<V: Lanes>(from: *const Self) -> V {
        // SAFETY: the caller's contract; F16 is a transparent u16.
        unsafe { V::load_f16(from.cast()) }
    }

    #[inline(always)]
    unsafe fn store<V: Lanes>(value: V, to: *mut Self) {
        // SAFETY: the caller's contract; F16 is a transparent u16.
        unsafe { value.store_f16(to.cast()) }
    }

    #[inline(always)]
    unsafe fn store_stochastic<V: Lanes>(value: V, random: V::Bits, to: *mut Self) {
        // SAFETY: as in `store`; the rounded value is a float16, so storing it is exact.
        unsafe { stochastic(value, random).store_f16(to.cast()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_float16_widens_exactly_and_narrows_back() {
        for bits in 0..=u16::MAX {
            let x = F16(bits).to_f32();
            let is_nan = bits & 0x7C00 == 0x7C00 && bits & 0x3FF != 0;
            let back = F16::from_f32(x).0;
            if is_nan {
                assert_eq!(back, bits | 0x0200, "{bits:#06x}");
            } else {
                assert_eq!(back, bits, "{bits:#06x}");
                // The value itself, in float64: sign, exponent and mantissa.
                let exponent = i32::from((bits >> 10) & 0x1F);
                let mantissa = f64::from(bits & 0x3FF);
                let magnitude = match exponent {
                    0 => mantissa * 2f64.powi(-24),
                    0x1F => f64::INFINITY,
                    _ => (1.0 + mantissa / 1024.0) * 2f64.powi(exponent - 15),
                };
                let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
                assert_eq!(f64::from(x), sign * magnitude, "{bits:#06x}");
            }
        }
    }

    #[test]
    fn narrowing_rounds_to_nearest_even() {
        // Midpoints between neighbours go to the even one; just past them, up.
        for bits in (0..0x7C00u16).step_by(7) {
            let (low, high) = (F16(bits).to_f32(), F16(bits + 1).to_f32());
            let middle = ((f64::from(low) + f64::from(high)) / 2.0) as f32;
            let even = if bits & 1 == 0 { bits } else { bits + 1 };
            assert_eq!(F16::from_f32(middle).0, even, "{bits:#06x}");
            let past = f32::from_bits(middle.to_bits() + 1);
            assert_eq!(F16::from_f32(past).0, bits + 1, "{bits:#06x}");
        }
        assert_eq!(F16::from_f32(65519.99).0, 0x7BFF);
        assert_eq!(F16::from_f32(65520.0).0, 0x7C00);
        assert_eq!(F16::from_f32(f32::from_bits(0x3300_0001)).0, 1);
        assert_eq!(F16::from_f32(-1e-30).0, 0x8000);
    }

    #[test]
    fn stochastic_rounding_is_the_dropped_fraction() {
        // A quarter of the way between two normals, and between two subnormals.
        for (low, high) in [(0x3C00u16, 0x3C01u16), (0x0010, 0x0011)] {
            let (a, b) = (F16(low).to_f32(), F16(high).to_f32());
            let x = a + (b - a) / 4.0;
            let ups = (0..0x2000u32)
                .filter(|&r| stochastic::<f32>(x, r) == b)
                .count();
            assert_eq!(ups, 0x800, "{low:#06x}");
        }
        assert_eq!(stochastic::<f32>(1.0, 0x1FFF), 1.0);
        assert!(stochastic::<f32>(f32::NAN, 0x1FFF).is_nan());
        assert_eq!(stochastic::<f32>(f32::INFINITY, 0x1FFF), f32::INFINITY);
    }
}
