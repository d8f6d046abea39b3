//! bfloat16: the upper half of a float32 (8 exponent bits, 7 mantissa bits).
//! Widening is a shift; narrowing rounds the dropped 16 bits in integer
//! arithmetic, so every instruction set gets the same bits (no hardware
//! conversion: AVX-512 BF16's flushes subnormals).

use super::{element_slices, quiet_nan_or, Element};
use crate::lanes::{Bits, Lanes};

/// A bfloat16, as its bits (`ml_dtypes.bfloat16`, `torch.bfloat16`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct Bf16(pub u16);

impl Bf16 {
    pub fn from_f32(x: f32) -> Self {
        Self(nearest_in_integers::<f32>(x) as u16)
    }

    pub fn to_f32(self) -> f32 {
        f32::from_bits(u32::from(self.0) << 16)
    }
}

/// `x` rounded to nearest even, as bfloat16 bits in the low 16 bits of each
/// lane: the definition, and what `Lanes::store_bf16` stores unless an
/// instruction set has an instruction that gives the same bits.
#[inline(always)]
pub(crate) fn nearest_in_integers<V: Lanes>(x: V) -> V::Bits {
    let bits = x.to_bits();
    let upper = bits.shr(16);
    // Adding just under half, plus the kept LSB, carries exactly when rounding up (ties to even).
    let rounded = bits
        .add(V::Bits::splat(0x7FFF))
        .add(upper.and(V::Bits::splat(1)));
    // A NaN is kept, quieted, so that dropping its low bits cannot make it an infinity.
    let quiet_nan = upper.or(V::Bits::splat(0x40));
    let rounded = V::from_bits(rounded.shr(16));
    x.if_nan(V::from_bits(quiet_nan), rounded).to_bits()
}

/// `x` rounded stochastically: up (away from zero) with probability equal to
/// the dropped fraction, read against 16 of the `random` bits. Unbiased:
/// adding a uniform 16-bit number below the kept bits carries with exactly that
/// probability.
#[inline(always)]
pub(crate) fn stochastic<V: Lanes>(x: V, random: V::Bits) -> V::Bits {
    let noise = random.and(V::Bits::splat(0xFFFF));
    let carried = x.to_bits().add(noise).and(V::Bits::splat(0xFFFF_0000));
    quiet_nan_or(x, V::from_bits(carried)).to_bits().shr(16)
}

impl Element for Bf16 {
    element_slices!(Bf16);

    #[inline(always)]
    unsafe fn load<V: Lanes>(from: *const Self) -> V {
        // SAFETY: the caller's contract; Bf16 is a transparent u16.
        V::from_bits(unsafe { V::Bits::load_u16(from.cast()) }.shl(16))
    }

    #[inline(always)]
    unsafe fn store<V: Lanes>(value: V, to: *mut Self) {
        // SAFETY: the caller's contract; Bf16 is a transparent u16.
        unsafe { value.store_bf16(to.cast()) }
    }

    #[inline(always)]
    unsafe fn store_stochastic<V: Lanes>(value: V, random: V::Bits, to: *mut Self) {
        // SAFETY: as in `store`.
        unsafe { stochastic(value, random).store_u16(to.cast()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_to_nearest_even() {
        let cases = [
            (1.0f32, 0x3F80),
            (f32::from_bits(0x3F80_8000), 0x3F80), // a tie, to even (down)
            (f32::from_bits(0x3F81_8000), 0x3F82), // a tie, to even (up)
            (f32::from_bits(0x3F80_8001), 0x3F81),
            (f32::from_bits(0x7F7F_FFFF), 0x7F80), // the largest float32 rounds to infinity
            (f32::INFINITY, 0x7F80),
            (-0.0, 0x8000),
            (f32::from_bits(0x0000_8000), 0x0000), // subnormal tie, to even (zero)
            (f32::from_bits(0x0001_8000), 0x0002),
            (f32::from_bits(0x7F80_0001), 0x7FC0), // a signalling NaN stays a NaN (quieted)
            (f32::from_bits(0xFFFF_FFFF), 0xFFFF),
        ];
        for (x, bits) in cases {
            assert_eq!(Bf16::from_f32(x).0, bits, "{x:e} ({:#010x})", x.to_bits());
        }
    }

    #[test]
    fn stochastic_rounding_picks_a_neighbour_and_keeps_specials() {
        let x = f32::from_bits(0x3F80_4000); // a quarter of the way up from 1.0
        let ups = (0..=0xFFFFu32)
            .filter(|&r| stochastic::<f32>(x, r) == 0x3F81)
            .count();
        assert_eq!(ups, 0x4000, "up for exactly a quarter of the random values");
        for special in [
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::from_bits(0x7FFF_FFFF),
        ] {
            for random in [0, 0xFFFF, 0xFFFF_FFFF] {
                let nearest = nearest_in_integers::<f32>(special);
                assert_eq!(stochastic::<f32>(special, random), nearest);
            }
        }
    }
}
