//! The ceiling for the benchmark: a plain in-place loop with exactly the
//! kernel's memory traffic (read p, g, m, v; write p, m, v) and next to no
//! arithmetic, run on the same threads and chunks as the kernel.

use crate::parallel::for_each_chunk;
use crate::{Elements, ElementsRef, TensorSlices};

#[inline(always)]
fn plain_loop(t: TensorSlices<'_>) {
    let (
        Elements::F32(params),
        ElementsRef::F32(grads),
        Elements::F32(exp_avg),
        Elements::F32(exp_avg_sq),
    ) = (t.params, t.grads, t.exp_avg, t.exp_avg_sq)
    else {
        unreachable!("the plain loop is float32 (checked by its caller)")
    };
    for (((p, &g), m), v) in params.iter_mut().zip(grads).zip(exp_avg).zip(exp_avg_sq) {
        *p += g;
        *m += g;
        *v += g;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn plain_loop_avx512(t: TensorSlices<'_>) {
    plain_loop(t)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn plain_loop_avx2(t: TensorSlices<'_>) {
    plain_loop(t)
}

/// Adds `grads` to `params`, `exp_avg` and `exp_avg_sq` in place, with the
/// widest vectors the CPU has (the compiler vectorizes the plain loop).
pub fn read_modify_write(tensors: Vec<TensorSlices<'_>>) {
    for_each_chunk(tensors, |t| {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                // SAFETY: AVX-512F was detected on this CPU.
                return unsafe { plain_loop_avx512(t) };
            }
            if is_x86_feature_detected!("avx2") {
                // SAFETY: AVX2 was detected on this CPU.
                return unsafe { plain_loop_avx2(t) };
            }
        }
        plain_loop(t)
    });
}
