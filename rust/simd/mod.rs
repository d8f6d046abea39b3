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
            Self::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
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
}

/// One lane: the scalar reference.
impl Lanes for f32 {
    const LANES: usize = 1;

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

/// The update over slices in vectors of `V`, then the tail one lane at a time.
#[inline(always)]
fn update_with<V: Lanes>(t: TensorSlices<'_>, c: &StepConstants) {
    let body = t.len() - t.len() % V::LANES;
    let (head, tail) = t.split_at(body);
    update_whole_vectors::<V>(head, c);
    update_whole_vectors::<f32>(tail, c);
}

/// The update over slices whose length is a multiple of `V::LANES`.
#[inline(always)]
fn update_whole_vectors<V: Lanes>(t: TensorSlices<'_>, c: &StepConstants) {
    let TensorSlices {
        params,
        grads,
        exp_avg,
        exp_avg_sq,
        mut max_exp_avg_sq,
    } = t;
    let c = c.splat::<V>();
    for i in (0..params.len()).step_by(V::LANES) {
        // SAFETY: i + LANES <= the length of every slice (equal lengths, checked
        // by TensorSlices::new, and a multiple of LANES).
        unsafe {
            let v_max = max_exp_avg_sq
                .as_deref()
                .map(|x| V::load(x.as_ptr().add(i)));
            let [p, m, v, v_hat] = update_element(
                V::load(params.as_ptr().add(i)),
                V::load(grads.as_ptr().add(i)),
                V::load(exp_avg.as_ptr().add(i)),
                V::load(exp_avg_sq.as_ptr().add(i)),
                v_max,
                &c,
            );
            p.store(params.as_mut_ptr().add(i));
            m.store(exp_avg.as_mut_ptr().add(i));
            v.store(exp_avg_sq.as_mut_ptr().add(i));
            if let Some(x) = max_exp_avg_sq.as_deref_mut() {
                v_hat.store(x.as_mut_ptr().add(i));
            }
        }
    }
}

/// The scalar reference over whole slices.
pub fn update_scalar(t: TensorSlices<'_>, c: &StepConstants) {
    update_whole_vectors::<f32>(t, c);
}

/// Runs the update at `level`; falls back to scalar for a level the CPU lacks.
pub fn update(level: SimdLevel, t: TensorSlices<'_>, c: &StepConstants) {
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: is_supported() checked AVX-512F on this CPU.
        SimdLevel::Avx512 if level.is_supported() => unsafe { avx512::update(t, c) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: is_supported() checked AVX2 and FMA on this CPU.
        SimdLevel::Avx2 if level.is_supported() => unsafe { avx2::update(t, c) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: is_supported() checked NEON on this CPU.
        SimdLevel::Neon if level.is_supported() => unsafe { neon::update(t, c) },
        _ => update_scalar(t, c),
    }
}
