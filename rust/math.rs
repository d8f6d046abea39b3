//! The AdamW update: hyperparameters, the per-step constants derived from them,
//! and the element update, written once over `lanes::Lanes`: on `f32` it is the
//! scalar reference that every SIMD level reproduces bit for bit.

use crate::lanes::Lanes;
use std::fmt;

/// Where epsilon enters the denominator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EpsilonMode {
    /// `keras.optimizers.AdamW`: `p -= lr·√(1-β₂ᵗ)/(1-β₁ᵗ) · m / (√v + ε)`.
    Keras,
    /// `torch.optim.AdamW`: `p -= lr/(1-β₁ᵗ) · m / (√v/√(1-β₂ᵗ) + ε)`.
    Torch,
}

impl EpsilonMode {
    pub fn parse(name: &str) -> Result<Self, InvalidArgument> {
        parse_choice(
            "epsilon_mode",
            name,
            &[("keras", Self::Keras), ("torch", Self::Torch)],
        )
    }
}

/// What the weight decay's per-step rate is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecayMode {
    /// `lr·wd`, as Keras and torch decay.
    Coupled,
    /// `wd` itself: the caller folds in any schedule (the paper's form).
    Decoupled,
}

/// How the decay `p·(1 − rate)` is rounded in float32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecayForm {
    /// `p − p·rate`, as Keras does on TensorFlow and JAX.
    Subtract,
    /// `p·(1 − rate)`, as torch (and Keras on its torch backend) does.
    Multiply,
}

fn parse_choice<T: Copy>(
    argument: &str,
    name: &str,
    choices: &[(&str, T)],
) -> Result<T, InvalidArgument> {
    match choices.iter().find(|(choice, _)| *choice == name) {
        Some(&(_, value)) => Ok(value),
        None => {
            let names: Vec<String> = choices
                .iter()
                .map(|(choice, _)| format!("{choice:?}"))
                .collect();
            Err(InvalidArgument::new(
                argument,
                format!("must be {}, got {name:?}", names.join(" or ")),
            ))
        }
    }
}

impl DecayMode {
    pub fn parse(name: &str) -> Result<Self, InvalidArgument> {
        parse_choice(
            "weight_decay_mode",
            name,
            &[("coupled", Self::Coupled), ("decoupled", Self::Decoupled)],
        )
    }
}

impl DecayForm {
    pub fn parse(name: &str) -> Result<Self, InvalidArgument> {
        parse_choice(
            "decay_form",
            name,
            &[("subtract", Self::Subtract), ("multiply", Self::Multiply)],
        )
    }
}

/// A bad argument, named, with what was wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidArgument {
    pub argument: String,
    pub problem: String,
}

impl InvalidArgument {
    pub fn new(argument: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            argument: argument.into(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for InvalidArgument {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.argument, self.problem)
    }
}

impl std::error::Error for InvalidArgument {}

/// The hyperparameters of one AdamW step, as the user gives them.
#[derive(Clone, Debug)]
pub struct Hyperparams {
    /// 1-based index of this update.
    pub step: u64,
    pub learning_rate: f64,
    pub beta_1: f64,
    pub beta_2: f64,
    pub epsilon: f64,
    pub weight_decay: f64,
    pub epsilon_mode: EpsilonMode,
    pub weight_decay_mode: DecayMode,
    /// How the decay is rounded; `None` follows `epsilon_mode`'s reference.
    pub decay_form: Option<DecayForm>,
    pub maximize: bool,
    /// Gradients are divided by this (a loss scale) in the same pass.
    pub grad_scale: Option<f64>,
}

impl Default for Hyperparams {
    /// Keras's defaults, at the first step.
    fn default() -> Self {
        Self {
            step: 1,
            learning_rate: 1e-3,
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-7,
            weight_decay: 0.004,
            epsilon_mode: EpsilonMode::Keras,
            weight_decay_mode: DecayMode::Coupled,
            decay_form: None,
            maximize: false,
            grad_scale: None,
        }
    }
}

/// The per-step scalars the element update needs, computed once per call in
/// float64 (never as a running product, which drifts) and rounded to float32;
/// `StepConstants<V>` holds them splatted into vectors `V`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepConstants<T = f32> {
    /// Gradients are multiplied by this: ±1/grad_scale (exactly ±1 without a scale).
    pub grad_multiplier: T,
    pub one_minus_beta_1: T,
    pub one_minus_beta_2: T,
    /// The decay before the Adam step is `p ← p·decay_scale + p·decay_delta`,
    /// which is `p·(1-rate)` rounded as `DecayForm` says: multiplying by the
    /// float32 factor (scale `1-rate`, delta 0), or subtracting `p·rate`
    /// (scale 1, delta `-rate`), which keeps the factor's rounding from
    /// biasing every step the same way.
    pub decay_scale: T,
    pub decay_delta: T,
    /// `lr·√(1-β₂ᵗ)/(1-β₁ᵗ)`, with the sign of a descent step folded in.
    pub neg_step_size: T,
    /// ε as it is added to √v (not √v̂): both epsilon modes share one kernel.
    pub epsilon: T,
}

impl StepConstants {
    /// The constants in every lane of `V`.
    #[inline(always)]
    pub fn splat<V: Lanes>(&self) -> StepConstants<V> {
        StepConstants {
            grad_multiplier: V::splat(self.grad_multiplier),
            one_minus_beta_1: V::splat(self.one_minus_beta_1),
            one_minus_beta_2: V::splat(self.one_minus_beta_2),
            decay_scale: V::splat(self.decay_scale),
            decay_delta: V::splat(self.decay_delta),
            neg_step_size: V::splat(self.neg_step_size),
            epsilon: V::splat(self.epsilon),
        }
    }
}

fn check(
    ok: bool,
    argument: &str,
    problem: impl FnOnce() -> String,
) -> Result<(), InvalidArgument> {
    if ok {
        Ok(())
    } else {
        Err(InvalidArgument::new(argument, problem()))
    }
}

impl Hyperparams {
    /// Validates the hyperparameters and derives the step constants.
    pub fn constants(&self) -> Result<StepConstants, InvalidArgument> {
        let finite_at_least = |value: f64, name: &str, low: f64| {
            check(value.is_finite() && value >= low, name, || {
                format!("must be a finite number >= {low}, got {value}")
            })
        };
        check(self.step >= 1, "step", || {
            format!(
                "must be >= 1 (the 1-based count of this update), got {}",
                self.step
            )
        })?;
        finite_at_least(self.learning_rate, "learning_rate", 0.0)?;
        finite_at_least(self.weight_decay, "weight_decay", 0.0)?;
        for (beta, name) in [(self.beta_1, "beta_1"), (self.beta_2, "beta_2")] {
            check((0.0..1.0).contains(&beta), name, || {
                format!("must be in [0, 1), got {beta}")
            })?;
        }
        check(
            self.epsilon.is_finite() && self.epsilon > 0.0,
            "epsilon",
            || format!("must be a finite number > 0, got {}", self.epsilon),
        )?;
        if let Some(scale) = self.grad_scale {
            check(scale.is_finite() && scale > 0.0, "grad_scale", || {
                format!("must be a finite number > 0, got {scale}")
            })?;
        }

        // powf, not powi: `step` may exceed i32.
        let t = self.step as f64;
        let bias_correction_1 = 1.0 - self.beta_1.powf(t);
        let sqrt_bias_correction_2 = (1.0 - self.beta_2.powf(t)).sqrt();
        let step_size = self.learning_rate * sqrt_bias_correction_2 / bias_correction_1;
        let epsilon = match self.epsilon_mode {
            EpsilonMode::Keras => self.epsilon,
            // √v/√bc₂ + ε = (√v + ε·√bc₂)/√bc₂, and the 1/√bc₂ is in step_size.
            EpsilonMode::Torch => self.epsilon * sqrt_bias_correction_2,
        };
        let decay = match self.weight_decay_mode {
            DecayMode::Coupled => self.learning_rate * self.weight_decay,
            DecayMode::Decoupled => self.weight_decay,
        };
        let decay_form = self.decay_form.unwrap_or(match self.epsilon_mode {
            EpsilonMode::Keras => DecayForm::Subtract,
            EpsilonMode::Torch => DecayForm::Multiply,
        });
        let (decay_scale, decay_delta) = match decay_form {
            DecayForm::Subtract => (1.0, -decay),
            DecayForm::Multiply => (1.0 - decay, 0.0),
        };
        let sign = if self.maximize { -1.0 } else { 1.0 };
        let grad_multiplier = sign / self.grad_scale.unwrap_or(1.0);

        // The kernel computes in float32: a constant that overflows it would
        // write infinities (or, for ε, freeze the weights while m and v move).
        let overflows = |x: f64| !(x as f32).is_finite();
        check(!overflows(step_size), "learning_rate", || {
            format!(
                "= {:e} gives a step size {step_size:e} at step {} that overflows float32",
                self.learning_rate, self.step
            )
        })?;
        check(
            !overflows(decay_scale) && !overflows(decay),
            "weight_decay",
            || {
                format!(
                    "= {:e} gives a decay rate {decay:e} per step that overflows float32",
                    self.weight_decay
                )
            },
        )?;
        check(!overflows(epsilon), "epsilon", || {
            format!("= {:e} overflows float32", self.epsilon)
        })?;
        check((epsilon as f32) > 0.0, "epsilon", || {
            format!("underflows float32 at step {} ({epsilon})", self.step)
        })?;
        check((grad_multiplier as f32).is_normal(), "grad_scale", || {
            let scale = self.grad_scale.unwrap_or(1.0);
            format!("= {scale:e} has no normal float32 reciprocal")
        })?;
        Ok(StepConstants {
            grad_multiplier: grad_multiplier as f32,
            one_minus_beta_1: (1.0 - self.beta_1) as f32,
            one_minus_beta_2: (1.0 - self.beta_2) as f32,
            decay_scale: decay_scale as f32,
            decay_delta: decay_delta as f32,
            neg_step_size: -step_size as f32,
            epsilon: epsilon as f32,
        })
    }
}

/// The update of one lane of `V` per element: the only statement of the
/// arithmetic. With `V = f32` it is the scalar reference; every SIMD level
/// runs these operations in this order (fused multiply-adds where written),
/// so its results are bitwise those of the reference.
/// Returns `[p, m, v, v̂, √v̂]`; `v̂` is `v` when AMSGrad is off (√v̂ is the
/// square root the step took, for 8-bit state, which stores it).
#[inline(always)]
pub fn update_element<V: Lanes>(
    p: V,
    g: V,
    m: V,
    v: V,
    v_max: Option<V>,
    c: &StepConstants<V>,
) -> [V; 5] {
    let g = g * c.grad_multiplier;
    let m = (g - m).mul_add(c.one_minus_beta_1, m);
    let v = (g * g - v).mul_add(c.one_minus_beta_2, v);
    let v_hat = match v_max {
        Some(v_max) => v_max.greater_or(v),
        None => v,
    };
    let root = v_hat.sqrt();
    let denominator = root + c.epsilon;
    let p = p.mul_add(c.decay_delta, p * c.decay_scale);
    let p = c.neg_step_size.mul_add(m / denominator, p);
    [p, m, v, v_hat, root]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_follow_keras_and_torch() {
        let hp = Hyperparams {
            step: 3,
            learning_rate: 0.01,
            weight_decay: 0.1,
            ..Default::default()
        };
        let keras = hp.constants().unwrap();
        let bc1 = 1.0 - 0.9f64.powi(3);
        let bc2 = 1.0 - 0.999f64.powi(3);
        assert_eq!(keras.neg_step_size, (-0.01 * bc2.sqrt() / bc1) as f32);
        assert_eq!(keras.epsilon, 1e-7);
        assert_eq!((keras.decay_scale, keras.decay_delta), (1.0, -0.001f32));
        let torch = Hyperparams {
            epsilon_mode: EpsilonMode::Torch,
            ..hp
        }
        .constants()
        .unwrap();
        assert_eq!(torch.epsilon, (1e-7 * bc2.sqrt()) as f32);
        assert_eq!(
            (torch.decay_scale, torch.decay_delta),
            ((1.0 - 0.001f64) as f32, 0.0)
        );
    }

    #[test]
    fn bad_hyperparameters_name_the_argument() {
        let bad = [
            (
                Hyperparams {
                    step: 0,
                    ..Default::default()
                },
                "step",
            ),
            (
                Hyperparams {
                    learning_rate: -1.0,
                    ..Default::default()
                },
                "learning_rate",
            ),
            (
                Hyperparams {
                    learning_rate: f64::NAN,
                    ..Default::default()
                },
                "learning_rate",
            ),
            (
                Hyperparams {
                    beta_1: 1.0,
                    ..Default::default()
                },
                "beta_1",
            ),
            (
                Hyperparams {
                    beta_2: -0.1,
                    ..Default::default()
                },
                "beta_2",
            ),
            (
                Hyperparams {
                    epsilon: 0.0,
                    ..Default::default()
                },
                "epsilon",
            ),
            (
                Hyperparams {
                    weight_decay: f64::INFINITY,
                    ..Default::default()
                },
                "weight_decay",
            ),
            (
                Hyperparams {
                    grad_scale: Some(0.0),
                    ..Default::default()
                },
                "grad_scale",
            ),
        ];
        let overflowing = [
            (
                Hyperparams {
                    learning_rate: 2e39,
                    ..Default::default()
                },
                "learning_rate",
            ),
            (
                Hyperparams {
                    weight_decay: 1e39,
                    weight_decay_mode: DecayMode::Decoupled,
                    ..Default::default()
                },
                "weight_decay",
            ),
            (
                Hyperparams {
                    weight_decay: 1e39,
                    epsilon_mode: EpsilonMode::Torch,
                    weight_decay_mode: DecayMode::Decoupled,
                    ..Default::default()
                },
                "weight_decay",
            ),
            (
                Hyperparams {
                    epsilon: 1e39,
                    ..Default::default()
                },
                "epsilon",
            ),
        ];
        for (hp, name) in bad.into_iter().chain(overflowing) {
            assert_eq!(hp.constants().unwrap_err().argument, name, "{hp:?}");
        }
        assert_eq!(
            EpsilonMode::parse("tf").unwrap_err().argument,
            "epsilon_mode"
        );
    }

    #[test]
    fn decoupled_decay_ignores_the_learning_rate_and_the_form_can_be_chosen() {
        let hp = Hyperparams {
            learning_rate: 0.5,
            weight_decay: 0.01,
            ..Default::default()
        };
        let decoupled = Hyperparams {
            weight_decay_mode: DecayMode::Decoupled,
            ..hp.clone()
        };
        assert_eq!(decoupled.constants().unwrap().decay_delta, -0.01f32);
        let multiply = Hyperparams {
            decay_form: Some(DecayForm::Multiply),
            ..hp
        };
        let c = multiply.constants().unwrap();
        assert_eq!(
            (c.decay_scale, c.decay_delta),
            ((1.0 - 0.005f64) as f32, 0.0)
        );
    }

    #[test]
    fn huge_step_counts_are_fine() {
        let hp = Hyperparams {
            step: u64::MAX,
            ..Default::default()
        };
        let c = hp.constants().unwrap();
        assert_eq!(c.neg_step_size, -1e-3);
    }
}
