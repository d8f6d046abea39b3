//! The kernel against its scalar reference (bitwise) and against a plain
//! float64 AdamW written here (closely).

use keras_adamw_core::parallel::{adamw_step, adamw_step_from, set_num_threads};
use keras_adamw_core::simd::update_scalar;
use keras_adamw_core::simd::{self, supported_levels};
use keras_adamw_core::{
    DecayForm, DecayMode, ElementsRef, EpsilonMode, Hyperparams, Rounding, Sources, StepConstants,
    TensorSlices,
};
use proptest::prelude::*;

/// State of one tensor: p, g, m, v, and the AMSGrad maxima.
#[derive(Clone, Debug, PartialEq)]
struct State {
    p: Vec<f32>,
    g: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    max_v: Option<Vec<f32>>,
}

impl State {
    /// Deterministic pseudo-random state of `n` elements, with m and v as after some steps.
    fn random(n: usize, seed: u64, amsgrad: bool) -> Self {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut uniform = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let p = (0..n).map(|_| uniform()).collect();
        let g = (0..n).map(|_| uniform() * 0.1).collect();
        let m = (0..n).map(|_| uniform() * 0.01).collect();
        let v: Vec<f32> = (0..n).map(|_| uniform().abs() * 1e-4).collect();
        let max_v = amsgrad.then(|| v.iter().map(|x| x * 1.5).collect());
        Self { p, g, m, v, max_v }
    }

    fn slices(&mut self) -> TensorSlices<'_> {
        TensorSlices::new(
            &mut self.p,
            &self.g,
            &mut self.m,
            &mut self.v,
            self.max_v.as_deref_mut(),
        )
        .unwrap()
    }

    fn bits(&self) -> Vec<u32> {
        let all = [&self.p, &self.m, &self.v]
            .into_iter()
            .chain(self.max_v.as_ref());
        all.flat_map(|xs| xs.iter().map(|x| x.to_bits())).collect()
    }
}

fn hyperparams_strategy() -> impl Strategy<Value = Hyperparams> {
    (
        1u64..10_000,
        0.0f64..0.1,
        0.0f64..0.99,
        0.9f64..0.9999,
        1e-9f64..1e-3,
        0.0f64..0.5,
        any::<bool>(),
        any::<bool>(),
        prop::option::of(1.0f64..65536.0),
        any::<bool>(),
        prop::option::of(prop::sample::select(vec![
            DecayForm::Subtract,
            DecayForm::Multiply,
        ])),
    )
        .prop_map(
            |(
                step,
                learning_rate,
                beta_1,
                beta_2,
                epsilon,
                weight_decay,
                torch,
                maximize,
                grad_scale,
                decoupled,
                decay_form,
            )| {
                Hyperparams {
                    step,
                    learning_rate,
                    beta_1,
                    beta_2,
                    epsilon,
                    weight_decay,
                    epsilon_mode: if torch {
                        EpsilonMode::Torch
                    } else {
                        EpsilonMode::Keras
                    },
                    weight_decay_mode: if decoupled {
                        DecayMode::Decoupled
                    } else {
                        DecayMode::Coupled
                    },
                    decay_form,
                    maximize,
                    grad_scale,
                }
            },
        )
}

/// Bits, with every NaN as one (ISAs may differ in the payload they propagate).
fn canonical_bits(state: &State) -> Vec<u32> {
    let canonical = |bits: u32| {
        if f32::from_bits(bits).is_nan() {
            f32::NAN.to_bits()
        } else {
            bits
        }
    };
    state.bits().into_iter().map(canonical).collect()
}

#[test]
fn every_simd_level_treats_special_values_as_the_reference_does() {
    let specials = [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        0.0,
        -0.0,
        1e-40,
        -1e-40,
        f32::MAX,
        f32::MIN_POSITIVE,
    ];
    let hp = Hyperparams {
        step: 3,
        learning_rate: 1e-3,
        weight_decay: 0.01,
        ..Default::default()
    };
    let c = hp.constants().unwrap();
    for amsgrad in [false, true] {
        // 77 elements: each special value in p, g, m, v and v̂ inside the vector
        // body of every level, and in g in the scalar tail of the widest.
        let mut before = State::random(77, 7, amsgrad);
        for (i, &x) in specials.iter().enumerate() {
            before.g[i] = x;
            before.p[9 + i] = x;
            before.m[18 + i] = x;
            before.v[27 + i] = x;
            if let Some(max_v) = before.max_v.as_mut() {
                max_v[36 + i] = x;
                max_v[45 + i] = -x;
            }
            before.g[66 + i] = x;
        }
        let mut reference = before.clone();
        update_scalar(reference.slices(), &c, Rounding::Nearest);
        for level in supported_levels() {
            let mut state = before.clone();
            simd::update(level, state.slices(), &c, Rounding::Nearest);
            assert_eq!(
                canonical_bits(&state),
                canonical_bits(&reference),
                "level {level:?}, amsgrad {amsgrad}"
            );
        }
    }
}

proptest! {
    #[test]
    fn every_simd_level_matches_the_scalar_reference_bitwise(
        n in 0usize..200, seed in any::<u64>(), amsgrad in any::<bool>(), hp in hyperparams_strategy()
    ) {
        let c = hp.constants().unwrap();
        let mut reference = State::random(n, seed, amsgrad);
        update_scalar(reference.slices(), &c, Rounding::Nearest);
        for level in supported_levels() {
            let mut state = State::random(n, seed, amsgrad);
            simd::update(level, state.slices(), &c, Rounding::Nearest);
            prop_assert_eq!(state.bits(), reference.bits(), "level {:?}", level);
        }
    }

    #[test]
    fn the_kernel_follows_a_float64_adamw(n in 1usize..64, seed in any::<u64>(), amsgrad in any::<bool>(),
                                          hp in hyperparams_strategy()) {
        let c = hp.constants().unwrap();
        let before = State::random(n, seed, amsgrad);
        let mut state = before.clone();
        simd::update(
            simd::active_level().unwrap(),
            state.slices(),
            &c,
            Rounding::Nearest,
        );
        for i in 0..n {
            let [p, m, v, max_v] = float64_adamw(&before, i, &hp);
            // float32 rounds relative to the terms summed, not to the sum: m + (1-β₁)(g - m)
            // loses digits of a small result when g and m are large.
            let g = f64::from(before.g[i]) / hp.grad_scale.unwrap_or(1.0);
            let close = |a: f32, b: f64, terms: f64, what: &str| {
                let tolerance = 1e-6 * (b.abs() + terms).max(1e-6) + 1e-12;
                assert!((a as f64 - b).abs() <= tolerance + 2e-6 * hp.learning_rate, "{what}[{i}]: {a} vs {b}");
            };
            close(state.p[i], p, 0.0, "p");
            close(state.m[i], m, g.abs() + f64::from(before.m[i]).abs(), "m");
            close(state.v[i], v, g * g + f64::from(before.v[i]), "v");
            if let Some(max) = &state.max_v {
                close(max[i], max_v, 0.0, "max_v");
            }
        }
    }
}

/// AdamW for element `i`, in float64, written from the definitions.
fn float64_adamw(s: &State, i: usize, hp: &Hyperparams) -> [f64; 4] {
    let sign = if hp.maximize { -1.0 } else { 1.0 };
    let g = sign * s.g[i] as f64 / hp.grad_scale.unwrap_or(1.0);
    let m = hp.beta_1 * s.m[i] as f64 + (1.0 - hp.beta_1) * g;
    let v = hp.beta_2 * s.v[i] as f64 + (1.0 - hp.beta_2) * g * g;
    let v_hat = s.max_v.as_ref().map_or(v, |max| v.max(max[i] as f64));
    let t = hp.step as f64;
    let bias_correction_1 = 1.0 - hp.beta_1.powf(t);
    let bias_correction_2 = 1.0 - hp.beta_2.powf(t);
    let decay_rate = match hp.weight_decay_mode {
        DecayMode::Coupled => hp.learning_rate * hp.weight_decay,
        DecayMode::Decoupled => hp.weight_decay,
    };
    let p = s.p[i] as f64 * (1.0 - decay_rate);
    let update = match hp.epsilon_mode {
        EpsilonMode::Keras => {
            hp.learning_rate * bias_correction_2.sqrt() / bias_correction_1 * m
                / (v_hat.sqrt() + hp.epsilon)
        }
        EpsilonMode::Torch => {
            hp.learning_rate / bias_correction_1 * m
                / (v_hat.sqrt() / bias_correction_2.sqrt() + hp.epsilon)
        }
    };
    [p - update, m, v, v_hat]
}

fn constants() -> StepConstants {
    Hyperparams {
        step: 7,
        learning_rate: 0.01,
        weight_decay: 0.1,
        ..Default::default()
    }
    .constants()
    .unwrap()
}

/// Runs `adamw_step` over `state` cut at `cuts`.
fn step_split(state: &mut State, cuts: &[usize]) {
    let mut tensors = Vec::new();
    let mut rest = state.slices();
    let mut done = 0;
    for &cut in cuts {
        let (head, tail) = rest.split_at(cut - done);
        tensors.push(head);
        rest = tail;
        done = cut;
    }
    tensors.push(rest);
    adamw_step(
        tensors,
        &constants(),
        Rounding::Nearest,
        simd::active_level().unwrap(),
    );
}

#[test]
fn results_do_not_depend_on_threads_or_on_the_split_into_tensors() {
    // Large enough for the parallel path, with odd sizes so tails fall mid-chunk.
    let n = 1_000_003;
    let mut reference = State::random(n, 42, true);
    update_scalar(reference.slices(), &constants(), Rounding::Nearest);
    let many_cuts: Vec<usize> = (1..1000).map(|i| i * 997 + i % 13).collect();
    for threads in [1, 2, 3] {
        set_num_threads(threads).unwrap();
        for cuts in [
            vec![],
            vec![1],
            vec![17, 500_000, 999_999],
            many_cuts.clone(),
        ] {
            let mut state = State::random(n, 42, true);
            step_split(&mut state, &cuts);
            assert!(state == reference, "threads {threads}, {} cuts", cuts.len());
        }
    }
}

#[test]
fn an_out_of_place_step_matches_the_in_place_one_and_leaves_its_sources() {
    let n = 300_007; // several chunks, and a tail
    for amsgrad in [false, true] {
        let sources = State::random(n, 7, amsgrad);
        let mut in_place = sources.clone();
        adamw_step(
            vec![in_place.slices()],
            &constants(),
            Rounding::Nearest,
            simd::active_level().unwrap(),
        );

        let mut out = State::random(n, 8, amsgrad); // garbage the step must overwrite
        out.g.clone_from(&sources.g);
        let from = Sources {
            params: ElementsRef::F32(&sources.p),
            exp_avg: Some(ElementsRef::F32(&sources.m)),
            exp_avg_sq: Some(ElementsRef::F32(&sources.v)),
            max_exp_avg_sq: sources.max_v.as_deref().map(ElementsRef::F32),
        };
        let (head, tail) = out.slices().split_at(1000);
        let (from_head, from_tail) = from.split_at(1000);
        let pairs = vec![(from_head, head), (from_tail, tail)];
        adamw_step_from(
            pairs,
            &constants(),
            Rounding::Nearest,
            simd::active_level().unwrap(),
        );
        assert!(out == in_place, "amsgrad {amsgrad}");
        assert!(sources == State::random(n, 7, amsgrad));
    }
}

#[test]
fn mismatched_lengths_are_refused() {
    let (mut p, g, mut m, mut v) = (
        vec![0.0f32; 4],
        vec![0.0f32; 3],
        vec![0.0f32; 4],
        vec![0.0f32; 4],
    );
    let error = TensorSlices::new(&mut p, &g, &mut m, &mut v, None).unwrap_err();
    assert_eq!(error.argument, "grads");
    assert!(set_num_threads(0).is_err());
}

/// The bitwise test above covers a vector level only where it runs: on the
/// targets CI runs (x86-64 natively, aarch64 under QEMU) it must.
#[test]
fn the_target_s_vector_level_is_among_those_tested() {
    let levels = supported_levels();
    #[cfg(target_arch = "aarch64")]
    assert!(levels.contains(&simd::SimdLevel::Neon), "{levels:?}");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        assert!(levels.contains(&simd::SimdLevel::Avx2), "{levels:?}");
    }
    assert_eq!(levels[0], simd::SimdLevel::Scalar);
}
