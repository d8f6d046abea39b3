//! The random bits of stochastic rounding: a counter-based hash of (seed,
//! step, tensor, stream, element index), so an element's bits do not depend on
//! the SIMD level, the thread count or how the work is cut into chunks, and a
//! run can be repeated bit for bit.

use crate::lanes::Bits;

/// How results are rounded where they are stored in a 16-bit type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rounding {
    Nearest,
    /// Keyed by the run's seed and this step's count.
    Stochastic {
        seed: u64,
        step: u64,
    },
}

/// The streams of random bits. Rounding uses at most 16 bits, so the params
/// take the low half of one stream and the first moments its high half;
/// `exp_avg_sq` and its AMSGrad maximum share the other (equal values then
/// round alike, so the maximum stays >= the second moment it was taken of).
#[derive(Clone, Copy, Debug)]
pub enum Stream {
    ParamsAndExpAvg = 0,
    ExpAvgSq = 1,
}

/// splitmix64's finaliser: a bijection on u64 with full avalanche.
fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The key of one stream of one tensor at one step, for the elements whose
/// index has these upper 32 bits (the lanes hash the lower 32).
pub fn stream_key(seed: u64, step: u64, tensor: u64, stream: Stream, index_high: u64) -> u32 {
    let mut key = mix64(seed);
    for word in [step, tensor, stream as u64, index_high] {
        key = mix64(key ^ word);
    }
    key as u32
}

/// 32 random bits per lane for elements `index_low` (lane-wise) under `key`:
/// Wellons's lowbias32 hash, a bijection with low bias, in 32-bit lane
/// arithmetic every instruction set has.
#[inline(always)]
pub fn random_bits<B: Bits>(index_low: B, key: u32) -> B {
    let mut x = index_low.xor(B::splat(key));
    x = x.xor(x.shr(16)).mul(B::splat(0x7FEB_352D));
    x = x.xor(x.shr(15)).mul(B::splat(0x846C_A68B));
    x.xor(x.shr(16))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_uniform_and_keys_differ() {
        let key = stream_key(7, 3, 0, Stream::ParamsAndExpAvg, 0);
        assert_ne!(key, stream_key(7, 4, 0, Stream::ParamsAndExpAvg, 0));
        assert_ne!(key, stream_key(7, 3, 1, Stream::ParamsAndExpAvg, 0));
        assert_ne!(key, stream_key(7, 3, 0, Stream::ExpAvgSq, 0));
        assert_ne!(key, stream_key(7, 3, 0, Stream::ParamsAndExpAvg, 1));
        // Each of the 32 bits is set about half the time.
        let n = 1u32 << 16;
        for bit in 0..32 {
            let ones = (0..n)
                .filter(|&i| random_bits::<u32>(i, key) >> bit & 1 == 1)
                .count() as f64;
            assert!(
                (ones / f64::from(n) - 0.5).abs() < 0.01,
                "bit {bit}: {ones}"
            );
        }
    }
}
