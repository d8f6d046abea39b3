//! The update over slices, once for every instruction set, and the run-time
//! choice of the widest one the CPU has.
//!
//! `math::update_element` is written over `lanes::Lanes`, a float32 vector of
//! one instruction set; each ISA module (`scalar` among them) only says what
//! its vector is. Shipped
//! builds target the baseline CPU; the wider variants are compiled with
//! `#[target_feature]` and picked here after checking the running CPU.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;

mod scalar;
mod update;

use crate::dtype::stochastic::Rounding;
use crate::math::{InvalidArgument, StepConstants};
use crate::TensorSlices;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;
use update::update_with;

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
    /// AVX-512F with AVX-512 BF16's conversion instruction.
    Avx512Bf16 = 4,
}

impl SimdLevel {
    pub const ALL: [SimdLevel; 5] = [
        Self::Scalar,
        Self::Neon,
        Self::Avx2,
        Self::Avx512,
        Self::Avx512Bf16,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Scalar => "scalar",
            Self::Neon => "neon",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
            Self::Avx512Bf16 => "avx512bf16",
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
            #[cfg(target_arch = "x86_64")]
            Self::Avx512Bf16 => {
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
            }
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

/// Implements `Add`, `Sub`, `Mul` and `Div` for an ISA's vector newtype with
/// its intrinsics. Each ISA module keeps its type private and makes values of
/// it only inside its `#[target_feature]` entry point, so the intrinsics run
/// only on a CPU that has them.
macro_rules! vector_arithmetic {
    ($vector:ident $(<const $flag:ident: bool>)?, $add:ident, $sub:ident, $mul:ident, $div:ident) => {
        impl$(<const $flag: bool>)? std::ops::Add for $vector$(<$flag>)? {
            type Output = Self;
            #[inline(always)]
            fn add(self, other: Self) -> Self {
                // SAFETY: see `vector_arithmetic`.
                Self(unsafe { $add(self.0, other.0) })
            }
        }
        impl$(<const $flag: bool>)? std::ops::Sub for $vector$(<$flag>)? {
            type Output = Self;
            #[inline(always)]
            fn sub(self, other: Self) -> Self {
                // SAFETY: see `vector_arithmetic`.
                Self(unsafe { $sub(self.0, other.0) })
            }
        }
        impl$(<const $flag: bool>)? std::ops::Mul for $vector$(<$flag>)? {
            type Output = Self;
            #[inline(always)]
            fn mul(self, other: Self) -> Self {
                // SAFETY: see `vector_arithmetic`.
                Self(unsafe { $mul(self.0, other.0) })
            }
        }
        impl$(<const $flag: bool>)? std::ops::Div for $vector$(<$flag>)? {
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

/// The scalar reference over whole slices.
pub fn update_scalar(t: TensorSlices<'_>, c: &StepConstants, rounding: Rounding) {
    update_with::<f32>(t, c, rounding);
}

/// Runs the update at `level`; falls back to scalar for a level the CPU lacks.
pub fn update(level: SimdLevel, t: TensorSlices<'_>, c: &StepConstants, rounding: Rounding) {
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: is_supported() checked AVX-512F and AVX-512 BF16 on this CPU.
        SimdLevel::Avx512Bf16 if level.is_supported() => unsafe {
            avx512::update_with_bf16_instructions(t, c, rounding)
        },
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
