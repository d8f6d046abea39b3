//! NEON (aarch64): 4 lanes; the same operations as `math::update_element`.

use crate::math::{update_scalar, StepConstants};
use crate::TensorSlices;
use std::arch::aarch64::*;

const LANES: usize = 4;

/// # Safety
/// The CPU must support NEON (every aarch64 CPU Rust targets does).
#[target_feature(enable = "neon")]
pub unsafe fn update(t: TensorSlices<'_>, c: &StepConstants) {
    let n = t.params.len();
    let body = n - n % LANES;
    let (head, tail) = t.split_at(body);
    let TensorSlices {
        params,
        grads,
        exp_avg,
        exp_avg_sq,
        mut max_exp_avg_sq,
    } = head;

    let grad_multiplier = vdupq_n_f32(c.grad_multiplier);
    let one_minus_beta_1 = vdupq_n_f32(c.one_minus_beta_1);
    let one_minus_beta_2 = vdupq_n_f32(c.one_minus_beta_2);
    let decay_scale = vdupq_n_f32(c.decay_scale);
    let decay_delta = vdupq_n_f32(c.decay_delta);
    let neg_step_size = vdupq_n_f32(c.neg_step_size);
    let epsilon = vdupq_n_f32(c.epsilon);

    for i in (0..body).step_by(LANES) {
        // SAFETY: i + LANES <= body <= the length of every slice (checked equal by split_at).
        unsafe {
            let p = vld1q_f32(params.as_ptr().add(i));
            let g = vmulq_f32(vld1q_f32(grads.as_ptr().add(i)), grad_multiplier);
            let m = vld1q_f32(exp_avg.as_ptr().add(i));
            let v = vld1q_f32(exp_avg_sq.as_ptr().add(i));
            let m = vfmaq_f32(m, vsubq_f32(g, m), one_minus_beta_1);
            let v = vfmaq_f32(v, vsubq_f32(vmulq_f32(g, g), v), one_minus_beta_2);
            let v_hat = match max_exp_avg_sq.as_deref_mut() {
                None => v,
                Some(max_v) => {
                    let old = vld1q_f32(max_v.as_ptr().add(i));
                    // Select on `>` as the scalar reference does (vmaxq propagates NaN).
                    let v_hat = vbslq_f32(vcgtq_f32(old, v), old, v);
                    vst1q_f32(max_v.as_mut_ptr().add(i), v_hat);
                    v_hat
                }
            };
            let denominator = vaddq_f32(vsqrtq_f32(v_hat), epsilon);
            let p = vfmaq_f32(vmulq_f32(p, decay_scale), p, decay_delta);
            let p = vfmaq_f32(p, neg_step_size, vdivq_f32(m, denominator));
            vst1q_f32(params.as_mut_ptr().add(i), p);
            vst1q_f32(exp_avg.as_mut_ptr().add(i), m);
            vst1q_f32(exp_avg_sq.as_mut_ptr().add(i), v);
        }
    }
    update_scalar(tail, c);
}
