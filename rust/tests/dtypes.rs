//! The kernel on bfloat16 and float16 data: every SIMD level bitwise equal to
//! the scalar reference for every dtype combination, with copy-out and with
//! stochastic rounding; results independent of threads and splits; and a
//! 16-bit step equal to the float32 step on the widened values, rounded.

use keras_adamw_core::dtype::q8;
use keras_adamw_core::parallel::{adamw_step, set_num_threads};
use keras_adamw_core::simd::{self, supported_levels, update_scalar};
use keras_adamw_core::{
    Bf16, DType, Elements, ElementsRef, Hyperparams, Rounding, StepConstants, TensorSlices, F16,
};

const DTYPES: [DType; 3] = [DType::F32, DType::Bf16, DType::F16];

/// One argument's values in its dtype.
#[derive(Clone, Debug, PartialEq)]
enum Column {
    F32(Vec<f32>),
    Bf16(Vec<Bf16>),
    F16(Vec<F16>),
    /// 8-bit state: codes, block scales, and whether they hold first moments.
    Q8(Vec<u8>, Vec<f32>, bool),
}

impl Column {
    /// `values` rounded to nearest in `dtype` (8-bit: as first moments).
    fn new(dtype: DType, values: &[f32]) -> Self {
        Self::of_role(dtype, values, true)
    }

    /// As `new`, with 8-bit values in the format of first moments or of second ones.
    fn of_role(dtype: DType, values: &[f32], first: bool) -> Self {
        match dtype {
            DType::F32 => Self::F32(values.to_vec()),
            DType::Bf16 => Self::Bf16(values.iter().map(|&x| Bf16::from_f32(x)).collect()),
            DType::F16 => Self::F16(values.iter().map(|&x| F16::from_f32(x)).collect()),
            DType::Q8 => {
                let mut codes = vec![0u8; values.len()];
                let mut scales = vec![0.0; q8::blocks(values.len())];
                q8::quantize(values, &mut codes, &mut scales, first);
                Self::Q8(codes, scales, first)
            }
        }
    }

    fn elements(&mut self) -> Elements<'_> {
        match self {
            Self::F32(x) => Elements::F32(x),
            Self::Bf16(x) => Elements::Bf16(x),
            Self::F16(x) => Elements::F16(x),
            Self::Q8(codes, scales, _) => Elements::Q8 { codes, scales },
        }
    }

    fn elements_ref(&self) -> ElementsRef<'_> {
        match self {
            Self::F32(x) => ElementsRef::F32(x),
            Self::Bf16(x) => ElementsRef::Bf16(x),
            Self::F16(x) => ElementsRef::F16(x),
            Self::Q8(..) => unreachable!("8-bit data is only ever state"),
        }
    }

    fn to_f32(&self) -> Vec<f32> {
        match self {
            Self::F32(x) => x.clone(),
            Self::Bf16(x) => x.iter().map(|x| x.to_f32()).collect(),
            Self::F16(x) => x.iter().map(|x| x.to_f32()).collect(),
            Self::Q8(codes, scales, first) => {
                let mut values = vec![0.0; codes.len()];
                q8::dequantize(codes, scales, *first, &mut values);
                values
            }
        }
    }

    /// The values' bits, every NaN as one (ISAs differ in the payload they propagate).
    fn canonical_bits(&self) -> Vec<u32> {
        let values = self.to_f32();
        let canonical = |x: &f32| if x.is_nan() { u32::MAX } else { x.to_bits() };
        values.iter().map(canonical).collect()
    }
}

/// One tensor: params, grads, state (and AMSGrad maxima, and a 16-bit copy).
#[derive(Clone, Debug, PartialEq)]
struct Tensor {
    p: Column,
    g: Column,
    m: Column,
    v: Column,
    max_v: Option<Column>,
    copy: Option<Column>,
}

fn uniform_values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

impl Tensor {
    fn random(n: usize, seed: u64, dtypes: [DType; 3], amsgrad: bool, copy: Option<DType>) -> Self {
        let [p, g, state] = dtypes;
        let v: Vec<f32> = uniform_values(n, seed + 3, 1e-4)
            .iter()
            .map(|x| x.abs())
            .collect();
        let max_v: Vec<f32> = v.iter().map(|x| x * 1.5).collect();
        Self {
            p: Column::new(p, &uniform_values(n, seed, 1.0)),
            g: Column::new(g, &uniform_values(n, seed + 1, 0.1)),
            m: Column::of_role(state, &uniform_values(n, seed + 2, 0.01), true),
            v: Column::of_role(state, &v, false),
            max_v: amsgrad.then(|| Column::of_role(state, &max_v, false)),
            copy: copy.map(|dtype| Column::new(dtype, &vec![0.0; n])),
        }
    }

    fn slices(&mut self) -> TensorSlices<'_> {
        let t = TensorSlices::of_elements(
            self.p.elements(),
            self.g.elements_ref(),
            self.m.elements(),
            self.v.elements(),
            self.max_v.as_mut().map(Column::elements),
        )
        .unwrap();
        match self.copy.as_mut() {
            Some(copy) => t.with_param_copy(copy.elements()).unwrap(),
            None => t,
        }
    }

    fn canonical_bits(&self) -> Vec<u32> {
        [&self.p, &self.m, &self.v]
            .into_iter()
            .chain(self.max_v.as_ref())
            .chain(self.copy.as_ref())
            .flat_map(Column::canonical_bits)
            .collect()
    }
}

/// Equal bit patterns, or a panic naming the first difference (not the whole vectors).
fn assert_same(actual: &[u32], expected: &[u32], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}");
    if let Some(i) = (0..actual.len()).find(|&i| actual[i] != expected[i]) {
        panic!(
            "{what}: element {i} is {:#010x}, expected {:#010x}",
            actual[i], expected[i]
        );
    }
}

fn constants(step: u64) -> StepConstants {
    Hyperparams {
        step,
        learning_rate: 0.01,
        weight_decay: 0.1,
        ..Default::default()
    }
    .constants()
    .unwrap()
}

/// Every combination of params, grads and state dtypes, with and without a
/// copy-out (of float32 params) and AMSGrad.
fn combinations() -> Vec<([DType; 3], Option<DType>, bool)> {
    let mut all = Vec::new();
    for p in DTYPES {
        for g in DTYPES {
            for state in DTYPES.into_iter().chain([DType::Q8]) {
                let copies: &[Option<DType>] = if p == DType::F32 {
                    &[None, Some(DType::Bf16), Some(DType::F16)]
                } else {
                    &[None]
                };
                for &copy in copies {
                    for amsgrad in [false, true] {
                        all.push(([p, g, state], copy, amsgrad));
                    }
                }
            }
        }
    }
    all
}

const ROUNDINGS: [Rounding; 2] = [Rounding::Nearest, Rounding::Stochastic { seed: 5, step: 7 }];

#[test]
fn every_level_matches_the_scalar_reference_for_every_dtype_combination() {
    // 1001 elements: whole vectors at every level, a scalar tail, 8-bit blocks
    // and a short last one.
    for (dtypes, copy, amsgrad) in combinations() {
        for rounding in ROUNDINGS {
            let before = Tensor::random(1001, 11, dtypes, amsgrad, copy);
            let mut reference = before.clone();
            update_scalar(reference.slices(), &constants(7), rounding);
            assert_ne!(reference, before);
            for level in supported_levels() {
                let mut t = before.clone();
                simd::update(level, t.slices(), &constants(7), rounding);
                let what =
                    format!("{level:?} {dtypes:?} copy {copy:?} amsgrad {amsgrad} {rounding:?}");
                assert_same(&t.canonical_bits(), &reference.canonical_bits(), &what);
            }
        }
    }
}

#[test]
fn special_values_convert_alike_at_every_level() {
    // Through a copy-out: float32 params of many bit patterns (with lr = 0 and
    // no decay they stay as they are) narrowed to each 16-bit type.
    let mut patterns: Vec<u32> = (0..1u32 << 18)
        .map(|i| i.wrapping_mul(0x9E37_79B9) ^ (i >> 3))
        .collect();
    for edge in [
        0x3300_0000u32,
        0x3380_0000,
        0x3880_0000,
        0x477F_E000,
        0x477F_F000,
        0x4780_0000,
    ] {
        for delta in 0..64 {
            patterns.extend([edge + delta, edge - delta, (edge + delta) | 0x8000_0000]);
        }
    }
    patterns.extend([
        0x7F80_0000,
        0xFF80_0000,
        0x7F80_0001,
        0x7FC0_0000,
        0x0000_8000,
        0x0001_8000,
    ]);
    let n = patterns.len();
    let frozen = Hyperparams {
        learning_rate: 0.0,
        weight_decay: 0.0,
        ..Default::default()
    }
    .constants()
    .unwrap();
    for copy in [DType::Bf16, DType::F16] {
        for rounding in ROUNDINGS {
            let mut before = Tensor::random(n, 3, [DType::F32; 3], false, Some(copy));
            before.p = Column::F32(patterns.iter().map(|&b| f32::from_bits(b)).collect());
            let mut reference = before.clone();
            update_scalar(reference.slices(), &frozen, rounding);
            assert_same(
                &reference.copy.as_ref().unwrap().canonical_bits(),
                &Column::new(copy, &reference.p.to_f32()).canonical_bits(),
                &format!("{copy:?}: the copy is the params rounded to nearest"),
            );
            for level in supported_levels() {
                let mut t = before.clone();
                simd::update(level, t.slices(), &frozen, rounding);
                let what = format!("{level:?} {copy:?}");
                assert_same(&t.canonical_bits(), &reference.canonical_bits(), &what);
            }
        }
    }
    // Every 16-bit pattern as a gradient, widened, at every level.
    for dtype in [DType::Bf16, DType::F16] {
        let n = 1 << 16;
        let mut before = Tensor::random(n, 4, [DType::F32, dtype, DType::F32], false, None);
        before.g = match dtype {
            DType::Bf16 => Column::Bf16((0..=u16::MAX).map(Bf16).collect()),
            _ => Column::F16((0..=u16::MAX).map(F16).collect()),
        };
        let mut reference = before.clone();
        update_scalar(reference.slices(), &constants(2), Rounding::Nearest);
        for level in supported_levels() {
            let mut t = before.clone();
            simd::update(level, t.slices(), &constants(2), Rounding::Nearest);
            assert_eq!(
                t.canonical_bits(),
                reference.canonical_bits(),
                "{level:?} {dtype:?}"
            );
        }
    }
}

#[test]
fn a_16_bit_step_is_the_float32_step_on_the_widened_values_rounded() {
    for (dtypes, copy, amsgrad) in combinations() {
        let before = Tensor::random(999, 17, dtypes, amsgrad, copy);
        let widened = |c: &Column| Column::F32(c.to_f32());
        let mut wide = Tensor {
            p: widened(&before.p),
            g: widened(&before.g),
            m: widened(&before.m),
            v: widened(&before.v),
            max_v: before.max_v.as_ref().map(widened),
            copy: None,
        };
        update_scalar(wide.slices(), &constants(3), Rounding::Nearest);
        let mut t = before.clone();
        let level = simd::active_level().unwrap();
        simd::update(level, t.slices(), &constants(3), Rounding::Nearest);
        let [p, _, state] = dtypes;
        let rounded =
            |dtype, c: &Column, first| Column::of_role(dtype, &c.to_f32(), first).canonical_bits();
        let what = format!("{dtypes:?} copy {copy:?} amsgrad {amsgrad}");
        assert_same(&t.p.canonical_bits(), &rounded(p, &wide.p, true), &what);
        assert_same(&t.m.canonical_bits(), &rounded(state, &wide.m, true), &what);
        assert_same(
            &t.v.canonical_bits(),
            &rounded(state, &wide.v, false),
            &what,
        );
        if let (Some(max_v), Some(wide_max_v)) = (&t.max_v, &wide.max_v) {
            assert_same(
                &max_v.canonical_bits(),
                &rounded(state, wide_max_v, false),
                &what,
            );
        }
        if let (Some(copy), Some(dtype)) = (&t.copy, copy) {
            assert_same(
                &copy.canonical_bits(),
                &rounded(dtype, &wide.p, true),
                &what,
            );
        }
    }
}

#[test]
fn stochastic_results_do_not_depend_on_threads_or_splits() {
    results_do_not_depend_on_threads_or_splits([DType::Bf16, DType::Bf16, DType::Bf16], 1);
}

#[test]
fn eight_bit_results_do_not_depend_on_threads_or_splits() {
    // Cuts at block boundaries: 8-bit state splits there (as the chunks do).
    results_do_not_depend_on_threads_or_splits([DType::Bf16, DType::F32, DType::Q8], q8::BLOCK);
}

fn results_do_not_depend_on_threads_or_splits(dtypes: [DType; 3], align: usize) {
    let n = 1_000_003;
    let rounding = Rounding::Stochastic { seed: 9, step: 4 };
    let before = Tensor::random(n, 42, dtypes, true, None);
    let mut reference = before.clone();
    update_scalar(reference.slices(), &constants(4), rounding);
    let nearest = {
        let mut t = before.clone();
        update_scalar(t.slices(), &constants(4), Rounding::Nearest);
        t
    };
    assert_ne!(
        reference.p, nearest.p,
        "stochastic rounding differs from nearest"
    );
    for threads in [1, 2, 3] {
        set_num_threads(threads).unwrap();
        let cut_lists: [Vec<usize>; 3] = [
            vec![],
            vec![17, 500_000],
            (1..300).map(|i| i * 3331 + i % 7).collect(),
        ];
        for cuts in cut_lists {
            let cuts: Vec<usize> = cuts.iter().map(|cut| cut - cut % align).collect();
            let mut t = before.clone();
            let mut tensors = Vec::new();
            let mut rest = t.slices();
            let mut done = 0;
            for &cut in &cuts {
                let (head, tail) = rest.split_at(cut - done);
                tensors.push(head);
                rest = tail;
                done = cut;
            }
            tensors.push(rest);
            adamw_step(
                tensors,
                &constants(4),
                rounding,
                simd::active_level().unwrap(),
            );
            assert!(t == reference, "threads {threads}, {} cuts", cuts.len());
        }
    }
}

#[test]
fn mixed_state_dtypes_and_bad_copies_are_refused() {
    let mut t = Tensor::random(8, 1, [DType::F32; 3], true, None);
    t.v = Column::new(DType::Bf16, &t.v.to_f32());
    let error = TensorSlices::of_elements(
        t.p.elements(),
        t.g.elements_ref(),
        t.m.elements(),
        t.v.elements(),
        None,
    )
    .unwrap_err();
    assert_eq!(error.argument, "exp_avg_sqs");
    let mut t = Tensor::random(8, 1, [DType::Bf16, DType::F32, DType::F32], false, None);
    let mut copy = Column::new(DType::Bf16, &[0.0; 8]);
    let error = t.slices().with_param_copy(copy.elements()).unwrap_err();
    assert_eq!(error.argument, "param_copies");
    let mut t = Tensor::random(8, 1, [DType::F32; 3], false, None);
    let mut short = Column::new(DType::F16, &[0.0; 7]);
    let error = t.slices().with_param_copy(short.elements()).unwrap_err();
    assert_eq!(error.argument, "param_copies");
}
