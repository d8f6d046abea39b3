//! The update over slices, once for every instruction set, and the run-time
//! choice of the widest one the CPU has.
//!
//! `math::update_element` is written over `Lanes`, a float32 vector of one
//! instruction set; each ISA module only says what its vector is. Shipped
//! builds target the baseline CPU; the wider variants are compiled with
//! `#[target_feature]` and picked here after checking the running CPU.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;

use crate::dtype::stochastic::{self, Rounding, Stream};
use crate::dtype::{Bf16, DType, Element, Elements, Typed, F16};
use crate::math::{update_element, InvalidArgument, StepConstants};
use crate::TensorSlices;
use std::ops::{Add, Div, Mul, Sub};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// Environment variable that caps the SIMD level (read once, at first use).
pub const SIMD_ENV_VAR: &str = "KERAS_ADAMW_SIMD";

/// Instruction sets, narrowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum SimdLevel {
    Scalar = 0,
    Neon = 1,
    Avx2 = 2,
    Avx512 = 3,
}

impl SimdLevel {
    pub const ALL: [SimdLevel; 4] = [Self::Scalar, Self::Neon, Self::Avx2, Self::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            Self::Scalar => "scalar",
            Self::Neon => "neon",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|level| level.name() == name)
    }

    fn is_supported(self) -> bool {
        match self {
            Self::Scalar => true,
            #[cfg(target_arch = "aarch64")]
            Self::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => is_x86_feature_detected!("avx512f"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
}

/// The levels this CPU can run, narrowest first.
pub fn supported_levels() -> Vec<SimdLevel> {
    SimdLevel::ALL
        .into_iter()
        .filter(|level| level.is_supported())
        .collect()
}

fn widest_supported() -> SimdLevel {
    *supported_levels()
        .last()
        .expect("scalar is always supported")
}

const UNSET: u8 = u8::MAX;
static ACTIVE: AtomicU8 = AtomicU8::new(UNSET);
static ENV_CAP: OnceLock<Result<SimdLevel, InvalidArgument>> = OnceLock::new();

/// The cap from `KERAS_ADAMW_SIMD`, or the widest supported level when unset.
fn env_cap() -> Result<SimdLevel, InvalidArgument> {
    ENV_CAP
        .get_or_init(|| match std::env::var(SIMD_ENV_VAR) {
            Err(_) => Ok(widest_supported()),
            Ok(name) => parse_supported(name.trim())
                .map_err(|e| InvalidArgument::new(SIMD_ENV_VAR, e.problem)),
        })
        .clone()
}

fn parse_supported(name: &str) -> Result<SimdLevel, InvalidArgument> {
    let supported: Vec<&str> = supported_levels()
        .into_iter()
        .map(SimdLevel::name)
        .collect();
    match SimdLevel::parse(name) {
        Some(level) if level.is_supported() => Ok(level),
        _ => Err(InvalidArgument::new(
            "simd level",
            format!(
                "must be one this CPU supports ({}), got {name:?}",
                supported.join(", ")
            ),
        )),
    }
}

/// The level the kernel runs at: the widest supported one, unless lowered by
/// `KERAS_ADAMW_SIMD` or `set_active_level`.
pub fn active_level() -> Result<SimdLevel, InvalidArgument> {
    match ACTIVE.load(Ordering::Relaxed) {
        UNSET => {
            let level = env_cap()?;
            ACTIVE.store(level as u8, Ordering::Relaxed);
            Ok(level)
        }
        level => Ok(SimdLevel::ALL[level as usize]),
    }
}

/// Selects the level by name; it must be one this CPU supports.
pub fn set_active_level(name: &str) -> Result<SimdLevel, InvalidArgument> {
    let level = parse_supported(name)?;
    ACTIVE.store(level as u8, Ordering::Relaxed);
    Ok(level)
}

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
}

/// One lane: the scalar reference.
impl Lanes for f32 {
    const LANES: usize = 1;
    type Bits = u32;

    #[inline(always)]
    fn splat(x: f32) -> Self {
        x
    }

    #[inline(always)]
    unsafe fn load(from: *const f32) -> Self {
        // SAFETY: the caller's contract.
        unsafe { from.read() }
    }

    #[inline(always)]
    unsafe fn store(self, to: *mut f32) {
        // SAFETY: the caller's contract.
        unsafe { to.write(self) }
    }

    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        f32::mul_add(self, a, b)
    }

    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }

    #[inline(always)]
    fn greater_or(self, other: Self) -> Self {
        if self > other {
            self
        } else {
            other
        }
    }

    #[inline(always)]
    fn to_bits(self) -> u32 {
        f32::to_bits(self)
    }

    #[inline(always)]
    fn from_bits(bits: u32) -> Self {
        f32::from_bits(bits)
    }

    #[inline(always)]
    fn if_nan(self, then: Self, otherwise: Self) -> Self {
        if self.is_nan() {
            then
        } else {
            otherwise
        }
    }

    #[inline(always)]
    unsafe fn load_f16(from: *const u16) -> Self {
        // SAFETY: the caller's contract.
        F16(unsafe { from.read() }).to_f32()
    }

    #[inline(always)]
    unsafe fn store_f16(self, to: *mut u16) {
        // SAFETY: the caller's contract.
        unsafe { to.write(F16::from_f32(self).0) }
    }
}

impl Bits for u32 {
    #[inline(always)]
    fn splat(x: u32) -> Self {
        x
    }
    #[inline(always)]
    fn lane_indices() -> Self {
        0
    }
    #[inline(always)]
    fn add(self, other: Self) -> Self {
        self.wrapping_add(other)
    }
    #[inline(always)]
    fn mul(self, other: Self) -> Self {
        self.wrapping_mul(other)
    }
    #[inline(always)]
    fn and(self, other: Self) -> Self {
        self & other
    }
    #[inline(always)]
    fn and_not(self, other: Self) -> Self {
        self & !other
    }
    #[inline(always)]
    fn or(self, other: Self) -> Self {
        self | other
    }
    #[inline(always)]
    fn xor(self, other: Self) -> Self {
        self ^ other
    }
    #[inline(always)]
    fn shl(self, n: u32) -> Self {
        self << n
    }
    #[inline(always)]
    fn shr(self, n: u32) -> Self {
        self >> n
    }
    #[inline(always)]
    unsafe fn load_u16(from: *const u16) -> Self {
        // SAFETY: the caller's contract.
        u32::from(unsafe { from.read() })
    }
    #[inline(always)]
    unsafe fn store_u16(self, to: *mut u16) {
        // SAFETY: the caller's contract.
        unsafe { to.write(self as u16) }
    }
}

/// Implements `Add`, `Sub`, `Mul` and `Div` for an ISA's vector newtype with
/// its intrinsics. Each ISA module keeps its type private and makes values of
/// it only inside its `#[target_feature]` entry point, so the intrinsics run
/// only on a CPU that has them.
macro_rules! vector_arithmetic {
    ($vector:ident, $add:ident, $sub:ident, $mul:ident, $div:ident) => {
        impl std::ops::Add for $vector {
            type Output = Self;
            #[inline(always)]
            fn add(self, other: Self) -> Self {
                // SAFETY: see `vector_arithmetic`.
                Self(unsafe { $add(self.0, other.0) })
            }
        }
        impl std::ops::Sub for $vector {
            type Output = Self;
            #[inline(always)]
            fn sub(self, other: Self) -> Self {
                // SAFETY: see `vector_arithmetic`.
                Self(unsafe { $sub(self.0, other.0) })
            }
        }
        impl std::ops::Mul for $vector {
            type Output = Self;
            #[inline(always)]
            fn mul(self, other: Self) -> Self {
                // SAFETY: see `vector_arithmetic`.
                Self(unsafe { $mul(self.0, other.0) })
            }
        }
        impl std::ops::Div for $vector {
            type Output = Self;
            #[inline(always)]
            fn div(self, other: Self) -> Self {
                // SAFETY: see `vector_arithmetic`.
                Self(unsafe { $div(self.0, other.0) })
            }
        }
    };
}
#[allow(unused_imports)] // not every target has a vector ISA module
use vector_arithmetic;

/// The update of one tensor's slices in vectors of `V`: the slices' dtypes
/// picked once here, then a loop for that combination.
#[inline(always)]
fn update_with<V: Lanes>(t: TensorSlices<'_>, c: &StepConstants, rounding: Rounding) {
    match t.params.dtype() {
        DType::F32 => with_params::<V, f32>(t, c, rounding),
        DType::Bf16 => with_params::<V, Bf16>(t, c, rounding),
        DType::F16 => with_params::<V, F16>(t, c, rounding),
    }
}

#[inline(always)]
fn with_params<V: Lanes, P: Typed>(t: TensorSlices<'_>, c: &StepConstants, rounding: Rounding) {
    match t.grads.dtype() {
        DType::F32 => with_grads::<V, P, f32>(t, c, rounding),
        DType::Bf16 => with_grads::<V, P, Bf16>(t, c, rounding),
        DType::F16 => with_grads::<V, P, F16>(t, c, rounding),
    }
}

#[inline(always)]
fn with_grads<V: Lanes, P: Typed, G: Typed>(
    t: TensorSlices<'_>,
    c: &StepConstants,
    rounding: Rounding,
) {
    match t.exp_avg.dtype() {
        DType::F32 => update_typed::<V, P, G, f32>(t, c, rounding),
        DType::Bf16 => update_typed::<V, P, G, Bf16>(t, c, rounding),
        DType::F16 => update_typed::<V, P, G, F16>(t, c, rounding),
    }
}

/// Where a step writes its results, as pointers of the slices' element types.
struct Destinations<P, G, S> {
    params: *mut P,
    grads: *const G,
    exp_avg: *mut S,
    exp_avg_sq: *mut S,
    max_exp_avg_sq: Option<*mut S>,
    param_copy: Option<CopyOut>,
}

#[derive(Clone, Copy)]
enum CopyOut {
    Bf16(*mut Bf16),
    F16(*mut F16),
}

/// The random-bit keys of a run of elements whose indices share their upper 32 bits.
#[derive(Clone, Copy)]
struct Keys {
    params: u32,
    exp_avg: u32,
    exp_avg_sq: u32,
}

#[inline(always)]
fn update_typed<V: Lanes, P: Typed, G: Typed, S: Typed>(
    t: TensorSlices<'_>,
    c: &StepConstants,
    rounding: Rounding,
) {
    let n = t.len();
    let (tensor, start) = (t.tensor, t.start);
    let state_mismatch = "TensorSlices::from_elements checks the dtypes";
    let typed = |e| S::of(e).expect(state_mismatch);
    let at = Destinations {
        params: P::of(t.params).expect(state_mismatch).as_mut_ptr(),
        grads: G::of_ref(t.grads).expect(state_mismatch).as_ptr(),
        exp_avg: typed(t.exp_avg).as_mut_ptr(),
        exp_avg_sq: typed(t.exp_avg_sq).as_mut_ptr(),
        max_exp_avg_sq: t.max_exp_avg_sq.map(|x| typed(x).as_mut_ptr()),
        param_copy: t.param_copy.map(|copy| match copy {
            Elements::Bf16(x) => CopyOut::Bf16(x.as_mut_ptr()),
            Elements::F16(x) => CopyOut::F16(x.as_mut_ptr()),
            Elements::F32(_) => unreachable!("TensorSlices::with_param_copy checks the dtype"),
        }),
    };
    // Runs of elements whose indices share their upper 32 bits (the random
    // bits hash the lower 32), each in whole vectors and then a scalar tail.
    let mut from = 0;
    while from < n {
        let index = start + from as u64;
        let to = n.min(from + ((1u64 << 32) - (index & 0xFFFF_FFFF)) as usize);
        let keys = match rounding {
            Rounding::Nearest => None,
            Rounding::Stochastic { seed, step } => {
                let key = |stream| stochastic::stream_key(seed, step, tensor, stream, index >> 32);
                Some(Keys {
                    params: key(Stream::Params),
                    exp_avg: key(Stream::ExpAvg),
                    exp_avg_sq: key(Stream::ExpAvgSq),
                })
            }
        };
        let body = to - (to - from) % V::LANES;
        // SAFETY: from..to lies within the slices, all `n` long (checked by TensorSlices).
        unsafe {
            update_run::<V, P, G, S>(&at, from, body, index, keys, c);
            update_run::<f32, P, G, S>(&at, body, to, index + (body - from) as u64, keys, c);
        }
        from = to;
    }
}

/// The update of elements `from..to` (a multiple of `V::LANES` of them), the
/// first of which has index `index` in its tensor.
///
/// # Safety
/// Every pointer of `at` must be valid for elements `from..to`, and no two may overlap.
#[inline(always)]
unsafe fn update_run<V: Lanes, P: Typed, G: Typed, S: Typed>(
    at: &Destinations<P, G, S>,
    from: usize,
    to: usize,
    index: u64,
    keys: Option<Keys>,
    c: &StepConstants,
) {
    let c = c.splat::<V>();
    for i in (from..to).step_by(V::LANES) {
        // SAFETY (the block): i + LANES <= to, within every slice (the caller's contract).
        unsafe {
            let v_max = at.max_exp_avg_sq.map(|x| S::load::<V>(x.add(i)));
            let [p, m, v, v_hat] = update_element(
                P::load::<V>(at.params.add(i)),
                G::load::<V>(at.grads.add(i)),
                S::load::<V>(at.exp_avg.add(i)),
                S::load::<V>(at.exp_avg_sq.add(i)),
                v_max,
                &c,
            );
            match keys {
                None => {
                    P::store(p, at.params.add(i));
                    S::store(m, at.exp_avg.add(i));
                    S::store(v, at.exp_avg_sq.add(i));
                    if let Some(x) = at.max_exp_avg_sq {
                        S::store(v_hat, x.add(i));
                    }
                }
                Some(keys) => {
                    let low = (index + (i - from) as u64) as u32;
                    let lanes = V::Bits::splat(low).add(V::Bits::lane_indices());
                    let random = |key| stochastic::random_bits(lanes, key);
                    P::store_stochastic(p, random(keys.params), at.params.add(i));
                    S::store_stochastic(m, random(keys.exp_avg), at.exp_avg.add(i));
                    let random_v = random(keys.exp_avg_sq);
                    S::store_stochastic(v, random_v, at.exp_avg_sq.add(i));
                    if let Some(x) = at.max_exp_avg_sq {
                        S::store_stochastic(v_hat, random_v, x.add(i));
                    }
                }
            }
            match at.param_copy {
                None => {}
                Some(CopyOut::Bf16(x)) => Bf16::store(p, x.add(i)),
                Some(CopyOut::F16(x)) => F16::store(p, x.add(i)),
            }
        }
    }
}

/// The scalar reference over whole slices.
pub fn update_scalar(t: TensorSlices<'_>, c: &StepConstants, rounding: Rounding) {
    update_with::<f32>(t, c, rounding);
}

/// Runs the update at `level`; falls back to scalar for a level the CPU lacks.
pub fn update(level: SimdLevel, t: TensorSlices<'_>, c: &StepConstants, rounding: Rounding) {
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: is_supported() checked AVX-512F on this CPU.
        SimdLevel::Avx512 if level.is_supported() => unsafe { avx512::update(t, c, rounding) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: is_supported() checked AVX2, FMA and F16C on this CPU.
        SimdLevel::Avx2 if level.is_supported() => unsafe { avx2::update(t, c, rounding) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: is_supported() checked NEON on this CPU.
        SimdLevel::Neon if level.is_supported() => unsafe { neon::update(t, c, rounding) },
        _ => update_scalar(t, c, rounding),
    }
}
