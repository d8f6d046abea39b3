//! The element types the kernel reads and writes, and how each converts to and
//! from the float32 the update computes in: one file per 16-bit type, written
//! once over `lanes::Lanes` (so the scalar reference and every SIMD level share
//! it), and the slices of each type that a step is handed.
//!
//! Conversions to a 16-bit type round to nearest even, or stochastically
//! (`stochastic`), never by truncation.

pub mod bf16;
pub mod f16;
pub mod q8;
pub mod stochastic;

use crate::lanes::{Bits, Lanes};
pub use bf16::Bf16;
pub use f16::F16;

/// The dtypes an argument may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    Bf16,
    F16,
    /// 8-bit block-wise quantised state (`q8`).
    Q8,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::Bf16 => "bfloat16",
            Self::F16 => "float16",
            Self::Q8 => "8-bit block-wise",
        }
    }

    /// Bytes per element (an 8-bit element's share of its block's scale aside).
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 | Self::F16 => 2,
            Self::Q8 => 1,
        }
    }
}

/// `Element::of` and `of_ref` for the type of `Elements::$variant`.
macro_rules! element_slices {
    ($variant:ident) => {
        fn of(elements: $crate::dtype::Elements<'_>) -> Option<&mut [Self]> {
            match elements {
                $crate::dtype::Elements::$variant(x) => Some(x),
                _ => None,
            }
        }

        fn of_ref(elements: $crate::dtype::ElementsRef<'_>) -> Option<&[Self]> {
            match elements {
                $crate::dtype::ElementsRef::$variant(x) => Some(x),
                _ => None,
            }
        }
    };
}
use element_slices;

/// A stored element type: loaded into float32 lanes exactly, stored rounded.
pub trait Element: Copy + Send + Sync + 'static {
    /// The slice of this type in `elements`, if that is its dtype.
    fn of(elements: Elements<'_>) -> Option<&mut [Self]>;
    fn of_ref(elements: ElementsRef<'_>) -> Option<&[Self]>;

    /// `V::LANES` elements at `from`, as float32 (exact).
    ///
    /// # Safety
    /// `V::LANES` elements must be readable at `from`.
    unsafe fn load<V: Lanes>(from: *const Self) -> V;

    /// Stores `value` rounded to nearest even.
    ///
    /// # Safety
    /// `V::LANES` elements must be writable at `to`.
    unsafe fn store<V: Lanes>(value: V, to: *mut Self);

    /// Stores `value` rounded stochastically with the lanes' `random` bits
    /// (exactly, for float32).
    ///
    /// # Safety
    /// As for `store`.
    unsafe fn store_stochastic<V: Lanes>(value: V, random: V::Bits, to: *mut Self);
}

impl Element for f32 {
    element_slices!(F32);

    #[inline(always)]
    unsafe fn load<V: Lanes>(from: *const Self) -> V {
        // SAFETY: the caller's contract.
        unsafe { V::load(from) }
    }

    #[inline(always)]
    unsafe fn store<V: Lanes>(value: V, to: *mut Self) {
        // SAFETY: the caller's contract.
        unsafe { value.store(to) }
    }

    #[inline(always)]
    unsafe fn store_stochastic<V: Lanes>(value: V, _: V::Bits, to: *mut Self) {
        // SAFETY: the caller's contract.
        unsafe { value.store(to) }
    }
}

/// Mutable slices of one dtype; 8-bit state as its codes and block scales.
#[derive(Debug)]
pub enum Elements<'a> {
    F32(&'a mut [f32]),
    Bf16(&'a mut [Bf16]),
    F16(&'a mut [F16]),
    Q8 {
        codes: &'a mut [u8],
        /// One per `q8::BLOCK` codes (the last block may be short).
        scales: &'a mut [f32],
    },
}

/// Shared slices of one dtype.
#[derive(Debug)]
pub enum ElementsRef<'a> {
    F32(&'a [f32]),
    Bf16(&'a [Bf16]),
    F16(&'a [F16]),
}

impl<'a> Elements<'a> {
    /// The `len` elements of `dtype` at `data`, which may dangle when `len` is 0.
    ///
    /// # Safety
    /// `len` aligned elements of `dtype` must live at `data` for `'a`, and
    /// nothing else may use them meanwhile. Not for 8-bit state (its scales
    /// live apart).
    pub unsafe fn from_raw(dtype: DType, data: *mut u8, len: usize) -> Self {
        // SAFETY: the caller's contract.
        unsafe {
            match dtype {
                DType::F32 => Self::F32(raw_slice_mut(data, len)),
                DType::Bf16 => Self::Bf16(raw_slice_mut(data, len)),
                DType::F16 => Self::F16(raw_slice_mut(data, len)),
                DType::Q8 => unreachable!("8-bit state is made from its codes and scales"),
            }
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            Self::F32(_) => DType::F32,
            Self::Bf16(_) => DType::Bf16,
            Self::F16(_) => DType::F16,
            Self::Q8 { .. } => DType::Q8,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Self::F32(x) => x.len(),
            Self::Bf16(x) => x.len(),
            Self::F16(x) => x.len(),
            Self::Q8 { codes, .. } => codes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Splits at `mid`; for 8-bit state `mid` must end a block (or the slice).
    pub fn split_at(self, mid: usize) -> (Self, Self) {
        match self {
            Self::F32(x) => {
                let (a, b) = x.split_at_mut(mid);
                (Self::F32(a), Self::F32(b))
            }
            Self::Bf16(x) => {
                let (a, b) = x.split_at_mut(mid);
                (Self::Bf16(a), Self::Bf16(b))
            }
            Self::F16(x) => {
                let (a, b) = x.split_at_mut(mid);
                (Self::F16(a), Self::F16(b))
            }
            Self::Q8 { codes, scales } => {
                assert!(
                    mid.is_multiple_of(q8::BLOCK) || mid == codes.len(),
                    "8-bit state splits between blocks"
                );
                let (c0, c1) = codes.split_at_mut(mid);
                let (s0, s1) = scales.split_at_mut(q8::blocks(mid));
                (
                    Self::Q8 {
                        codes: c0,
                        scales: s0,
                    },
                    Self::Q8 {
                        codes: c1,
                        scales: s1,
                    },
                )
            }
        }
    }

    /// Copies `from`, of the same dtype and length.
    pub fn copy_from(&mut self, from: &ElementsRef<'_>) {
        match (self, from) {
            (Self::F32(to), ElementsRef::F32(from)) => to.copy_from_slice(from),
            (Self::Bf16(to), ElementsRef::Bf16(from)) => to.copy_from_slice(from),
            (Self::F16(to), ElementsRef::F16(from)) => to.copy_from_slice(from),
            (to, from) => panic!(
                "a {} slice cannot take a copy of a {} one",
                to.dtype().name(),
                from.dtype().name()
            ),
        }
    }

    /// The float32 slice, if that is the dtype.
    pub fn as_f32(&mut self) -> Option<&mut [f32]> {
        match self {
            Self::F32(x) => Some(x),
            _ => None,
        }
    }
}

impl<'a> ElementsRef<'a> {
    /// As `Elements::from_raw`, shared.
    ///
    /// # Safety
    /// `len` aligned elements of `dtype` must live at `data` for `'a`, and
    /// nothing may write them meanwhile. Not for 8-bit state.
    pub unsafe fn from_raw(dtype: DType, data: *const u8, len: usize) -> Self {
        // SAFETY: the caller's contract.
        unsafe {
            match dtype {
                DType::F32 => Self::F32(raw_slice(data, len)),
                DType::Bf16 => Self::Bf16(raw_slice(data, len)),
                DType::F16 => Self::F16(raw_slice(data, len)),
                DType::Q8 => unreachable!("8-bit state is never read-only"),
            }
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            Self::F32(_) => DType::F32,
            Self::Bf16(_) => DType::Bf16,
            Self::F16(_) => DType::F16,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Self::F32(x) => x.len(),
            Self::Bf16(x) => x.len(),
            Self::F16(x) => x.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn split_at(self, mid: usize) -> (Self, Self) {
        match self {
            Self::F32(x) => {
                let (a, b) = x.split_at(mid);
                (Self::F32(a), Self::F32(b))
            }
            Self::Bf16(x) => {
                let (a, b) = x.split_at(mid);
                (Self::Bf16(a), Self::Bf16(b))
            }
            Self::F16(x) => {
                let (a, b) = x.split_at(mid);
                (Self::F16(a), Self::F16(b))
            }
        }
    }

    pub fn as_f32(&self) -> Option<&'a [f32]> {
        match self {
            Self::F32(x) => Some(x),
            _ => None,
        }
    }
}

/// # Safety
/// `len` aligned elements of `T` must live at `data` for `'a` (which may
/// dangle when `len` is 0), and nothing may write them meanwhile.
pub unsafe fn raw_slice<'a, T>(data: *const u8, len: usize) -> &'a [T] {
    if len == 0 {
        return &[];
    }
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts(data.cast(), len) }
}

/// # Safety
/// As for `raw_slice`, and nothing else may use the elements during `'a`.
pub unsafe fn raw_slice_mut<'a, T>(data: *mut u8, len: usize) -> &'a mut [T] {
    if len == 0 {
        return &mut [];
    }
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts_mut(data.cast(), len) }
}

/// Keeps a NaN (quieted, so that narrowing cannot turn it into an infinity)
/// where `x` is one, and `rounded` elsewhere.
#[inline(always)]
fn quiet_nan_or<V: Lanes>(x: V, rounded: V) -> V {
    let quiet = V::from_bits(x.to_bits().or(V::Bits::splat(0x0040_0000)));
    x.if_nan(quiet, rounded)
}
