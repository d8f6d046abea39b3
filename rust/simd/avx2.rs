//! AVX2 with FMA: 8 lanes; the same operations as `math::update_element`.

use crate::math::{update_scalar, StepConstants};
use crate::TensorSlices;
use std::arch::x86_64::*;

const LANES: usize = 8;

/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
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

    let grad_multiplier = _mm256_set1_ps(c.grad_multiplier);
    let one_minus_beta_1 = _mm256_set1_ps(c.one_minus_beta_1);
    let one_minus_beta_2 = _mm256_set1_ps(c.one_minus_beta_2);
    let decay_scale = _mm256_set1_ps(c.decay_scale);
    let decay_delta = _mm256_set1_ps(c.decay_delta);
    let neg_step_size = _mm256_set1_ps(c.neg_step_size);
    let epsilon = _mm256_set1_ps(c.epsilon);

    for i in (0..body).step_by(LANES) {
        // SAFETY: i + LANES <= body <= the length of every slice (checked equal by split_at).
        unsafe {
            let p = _mm256_loadu_ps(params.as_ptr().add(i));
            let g = _mm256_mul_ps(_mm256_loadu_ps(grads.as_ptr().add(i)), grad_multiplier);
            let m = _mm256_loadu_ps(exp_avg.as_ptr().add(i));
            let v = _mm256_loadu_ps(exp_avg_sq.as_ptr().add(i));
            let m = _mm256_fmadd_ps(_mm256_sub_ps(g, m), one_minus_beta_1, m);
            let v = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_mul_ps(g, g), v), one_minus_beta_2, v);
            let v_hat = match max_exp_avg_sq.as_deref_mut() {
                None => v,
                Some(max_v) => {
                    let v_hat = _mm256_max_ps(_mm256_loadu_ps(max_v.as_ptr().add(i)), v);
                    _mm256_storeu_ps(max_v.as_mut_ptr().add(i), v_hat);
                    v_hat
                }
            };
            let denominator = _mm256_add_ps(_mm256_sqrt_ps(v_hat), epsilon);
            let p = _mm256_fmadd_ps(p, decay_delta, _mm256_mul_ps(p, decay_scale));
            let p = _mm256_fmadd_ps(neg_step_size, _mm256_div_ps(m, denominator), p);
            _mm256_storeu_ps(params.as_mut_ptr().add(i), p);
            _mm256_storeu_ps(exp_avg.as_mut_ptr().add(i), m);
            _mm256_storeu_ps(exp_avg_sq.as_mut_ptr().add(i), v);
        }
    }
    update_scalar(tail, c);
}
