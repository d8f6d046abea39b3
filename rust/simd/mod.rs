//! Run-time choice of the widest instruction set the CPU has.
//!
//! Shipped builds target the baseline CPU; the wider variants are compiled
//! with `#[target_feature]` and picked here after checking the running CPU.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;

use crate::math::{update_scalar, InvalidArgument, StepConstants};
use crate::TensorSlices;
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
