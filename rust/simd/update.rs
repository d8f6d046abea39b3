//! The loops over one tensor's slices, generic over the vector type and the
//! slices' element types: the dtypes are picked once per chunk, then one loop
//! runs for that combination (whole vectors, then the tail one lane at a time).

use crate::dtype::q8::{self, FirstMoments, SecondMoments, BLOCK};
use crate::dtype::stochastic::{self, Rounding, Stream};
use crate::dtype::{Bf16, DType, Element, Elements, ElementsRef, F16};
use crate::lanes::{Bits, Lanes};
use crate::math::{update_element, StepConstants};
use crate::TensorSlices;

const CHECKED: &str = "TensorSlices::of_elements checks the dtypes";

#[inline(always)]
pub(super) fn update_with<V: Lanes>(t: TensorSlices<'_>, c: &StepConstants, rounding: Rounding) {
    match t.params.dtype() {
        DType::F32 => with_params::<V, f32>(t, c, rounding),
        DType::Bf16 => with_params::<V, Bf16>(t, c, rounding),
        DType::F16 => with_params::<V, F16>(t, c, rounding),
        DType::Q8 => unreachable!("{CHECKED}"),
    }
}

#[inline(always)]
fn with_params<V: Lanes, P: Element>(t: TensorSlices<'_>, c: &StepConstants, rounding: Rounding) {
    match t.grads.dtype() {
        DType::F32 => with_grads::<V, P, f32>(t, c, rounding),
        DType::Bf16 => with_grads::<V, P, Bf16>(t, c, rounding),
        DType::F16 => with_grads::<V, P, F16>(t, c, rounding),
        DType::Q8 => unreachable!("{CHECKED}"),
    }
}

#[inline(always)]
fn with_grads<V: Lanes, P: Element, G: Element>(
    t: TensorSlices<'_>,
    c: &StepConstants,
    rounding: Rounding,
) {
    match t.exp_avg.dtype() {
        DType::F32 => update_typed::<V, P, G, f32>(t, c, rounding),
        DType::Bf16 => update_typed::<V, P, G, Bf16>(t, c, rounding),
        DType::F16 => update_typed::<V, P, G, F16>(t, c, rounding),
        DType::Q8 => update_quantized::<V, P, G>(t, c, rounding),
    }
}

/// Where the params and grads are, and the 16-bit copy of the params.
struct Weights<P, G> {
    params: *mut P,
    grads: *const G,
    copy: Option<CopyOut>,
}

#[derive(Clone, Copy)]
enum CopyOut {
    Bf16(*mut Bf16),
    F16(*mut F16),
}

impl<P: Element, G: Element> Weights<P, G> {
    fn new(params: Elements<'_>, grads: ElementsRef<'_>, copy: Option<Elements<'_>>) -> Self {
        Self {
            params: P::of(params).expect(CHECKED).as_mut_ptr(),
            grads: G::of_ref(grads).expect(CHECKED).as_ptr(),
            copy: copy.map(|copy| match copy {
                Elements::Bf16(x) => CopyOut::Bf16(x.as_mut_ptr()),
                Elements::F16(x) => CopyOut::F16(x.as_mut_ptr()),
                _ => unreachable!("TensorSlices::with_param_copy checks the dtype"),
            }),
        }
    }

    /// Stores new params at element `i`, rounded as asked, and their copy.
    ///
    /// # Safety
    /// `V::LANES` elements from `i` must be within the params (and the copy).
    #[inline(always)]
    unsafe fn store<V: Lanes>(&self, i: usize, p: V, random: Option<V::Bits>) {
        // SAFETY (the block): the caller's contract.
        unsafe {
            match random {
                None => P::store(p, self.params.add(i)),
                Some(random) => P::store_stochastic(p, random, self.params.add(i)),
            }
            match self.copy {
                None => {}
                Some(CopyOut::Bf16(x)) => Bf16::store(p, x.add(i)),
                Some(CopyOut::F16(x)) => F16::store(p, x.add(i)),
            }
        }
    }
}

/// The random-bit keys of a run of elements whose indices share their upper 32 bits.
#[derive(Clone, Copy)]
struct Keys {
    params_and_exp_avg: u32,
    exp_avg_sq: u32,
}

impl Keys {
    fn at(rounding: Rounding, tensor: u64, index: u64) -> Option<Self> {
        match rounding {
            Rounding::Nearest => None,
            Rounding::Stochastic { seed, step } => {
                let key = |stream| stochastic::stream_key(seed, step, tensor, stream, index >> 32);
                Some(Self {
                    params_and_exp_avg: key(Stream::ParamsAndExpAvg),
                    exp_avg_sq: key(Stream::ExpAvgSq),
                })
            }
        }
    }
}

/// The lanes' random bits for the element at `index` onwards under `key`.
#[inline(always)]
fn random_bits<V: Lanes>(index: u64, key: u32) -> V::Bits {
    let lanes = V::Bits::splat(index as u32).add(V::Bits::lane_indices());
    stochastic::random_bits(lanes, key)
}

/// Where the state is, for state of an element type `S`.
struct State<S> {
    exp_avg: *mut S,
    exp_avg_sq: *mut S,
    max_exp_avg_sq: Option<*mut S>,
}

#[inline(always)]
fn update_typed<V: Lanes, P: Element, G: Element, S: Element>(
    t: TensorSlices<'_>,
    c: &StepConstants,
    rounding: Rounding,
) {
    let n = t.len();
    let TensorSlices {
        params,
        grads,
        exp_avg,
        exp_avg_sq,
        max_exp_avg_sq,
        param_copy,
        tensor,
        start,
    } = t;
    let weights = Weights::<P, G>::new(params, grads, param_copy);
    let typed = |e| S::of(e).expect(CHECKED).as_mut_ptr();
    let state = State {
        exp_avg: typed(exp_avg),
        exp_avg_sq: typed(exp_avg_sq),
        max_exp_avg_sq: max_exp_avg_sq.map(typed),
    };
    // Runs of elements whose indices share their upper 32 bits (the random
    // bits hash the lower 32), each in whole vectors and then a scalar tail.
    let mut from = 0;
    while from < n {
        let index = start + from as u64;
        let to = n.min(from + ((1u64 << 32) - (index & 0xFFFF_FFFF)) as usize);
        let keys = Keys::at(rounding, tensor, index);
        let body = to - (to - from) % V::LANES;
        // SAFETY: from..to lies within the slices, all `n` long (checked by TensorSlices).
        unsafe {
            update_run::<V, P, G, S>(&weights, &state, from, body, start, keys, c);
            update_run::<f32, P, G, S>(&weights, &state, body, to, start, keys, c);
        }
        from = to;
    }
}

/// The update of elements `from..to` (a multiple of `V::LANES` of them) of
/// slices whose first element has index `start` in its tensor.
///
/// # Safety
/// Every pointer must be valid for elements `from..to`, and no two may overlap.
#[inline(always)]
unsafe fn update_run<V: Lanes, P: Element, G: Element, S: Element>(
    weights: &Weights<P, G>,
    state: &State<S>,
    from: usize,
    to: usize,
    start: u64,
    keys: Option<Keys>,
    c: &StepConstants,
) {
    let c = c.splat::<V>();
    for i in (from..to).step_by(V::LANES) {
        // SAFETY (the block): i + LANES <= to, within every slice (the caller's contract).
        unsafe {
            let v_max = state.max_exp_avg_sq.map(|x| S::load::<V>(x.add(i)));
            let [p, m, v, v_hat, _] = update_element(
                P::load::<V>(weights.params.add(i)),
                G::load::<V>(weights.grads.add(i)),
                S::load::<V>(state.exp_avg.add(i)),
                S::load::<V>(state.exp_avg_sq.add(i)),
                v_max,
                &c,
            );
            let element = start + i as u64;
            let shared = keys.map(|k| random_bits::<V>(element, k.params_and_exp_avg));
            weights.store(i, p, shared);
            match keys.zip(shared) {
                None => {
                    S::store(m, state.exp_avg.add(i));
                    S::store(v, state.exp_avg_sq.add(i));
                    if let Some(x) = state.max_exp_avg_sq {
                        S::store(v_hat, x.add(i));
                    }
                }
                Some((keys, shared)) => {
                    // The params took the low 16 bits.
                    S::store_stochastic(m, shared.shr(16), state.exp_avg.add(i));
                    let random_v = random_bits::<V>(element, keys.exp_avg_sq);
                    S::store_stochastic(v, random_v, state.exp_avg_sq.add(i));
                    if let Some(x) = state.max_exp_avg_sq {
                        S::store_stochastic(v_hat, random_v, x.add(i));
                    }
                }
            }
        }
    }
}

/// 8-bit state: codes and the scales of their blocks.
struct Quantized {
    codes: *mut u8,
    scales: *mut f32,
}

impl Quantized {
    fn of(elements: Elements<'_>) -> Self {
        match elements {
            Elements::Q8 { codes, scales } => Self {
                codes: codes.as_mut_ptr(),
                scales: scales.as_mut_ptr(),
            },
            _ => unreachable!("{CHECKED}"),
        }
    }

    /// Encodes block `block`'s new stored values and writes its new scale.
    ///
    /// # Safety
    /// `block` must be a block of these slices, holding `values.len()` elements,
    /// that nothing else uses meanwhile.
    #[inline(always)]
    unsafe fn encode<V: Lanes, F: q8::Format>(&self, values: &[f32], block: usize, largest: u32) {
        // SAFETY: the caller's contract.
        unsafe {
            let codes = std::slice::from_raw_parts_mut(self.codes.add(block * BLOCK), values.len());
            let scale = q8::encode_block::<V, F>(values, codes, largest);
            self.scales.add(block).write(scale);
        }
    }
}

/// One block's new stored values (m, √v, √v̂), before they are encoded.
struct BlockBuffers {
    exp_avg: [f32; BLOCK],
    exp_avg_sq: [f32; BLOCK],
    max_exp_avg_sq: [f32; BLOCK],
}

/// The update with 8-bit state, a block at a time: decode the block's
/// moments, update (writing the params), take the new moments' largest
/// magnitudes as the new scales, encode. The state is rounded to nearest.
#[inline(always)]
fn update_quantized<V: Lanes, P: Element, G: Element>(
    t: TensorSlices<'_>,
    c: &StepConstants,
    rounding: Rounding,
) {
    let n = t.len();
    let TensorSlices {
        params,
        grads,
        exp_avg,
        exp_avg_sq,
        max_exp_avg_sq,
        param_copy,
        tensor,
        start,
    } = t;
    let weights = Weights::<P, G>::new(params, grads, param_copy);
    let exp_avg = Quantized::of(exp_avg);
    let exp_avg_sq = Quantized::of(exp_avg_sq);
    let max_exp_avg_sq = max_exp_avg_sq.map(Quantized::of);
    let mut buffers = BlockBuffers {
        exp_avg: [0.0; BLOCK],
        exp_avg_sq: [0.0; BLOCK],
        max_exp_avg_sq: [0.0; BLOCK],
    };
    for (block, from) in (0..n).step_by(BLOCK).enumerate() {
        let to = n.min(from + BLOCK);
        let body = to - (to - from) % V::LANES;
        // Blocks start at multiples of BLOCK in their tensor, so never straddle 2^32.
        let keys = Keys::at(rounding, tensor, start + from as u64);
        // SAFETY: `block` and from..to lie within the slices (checked by TensorSlices).
        unsafe {
            let current = |q: &Quantized| (q.codes, q.scales.add(block).read());
            let decoded = Decoded {
                exp_avg: current(&exp_avg),
                exp_avg_sq: current(&exp_avg_sq),
                max_exp_avg_sq: max_exp_avg_sq.as_ref().map(current),
            };
            let buffers = &mut buffers;
            let [body_largest, tail_largest] = [
                quantized_run::<V, P, G>(&weights, &decoded, from, body, start, keys, c, buffers),
                quantized_run::<f32, P, G>(&weights, &decoded, body, to, start, keys, c, buffers),
            ];
            let largest = |k: usize| Ord::max(body_largest[k], tail_largest[k]);
            let len = to - from;
            exp_avg.encode::<V, FirstMoments>(&buffers.exp_avg[..len], block, largest(0));
            let second = &buffers.exp_avg_sq[..len];
            exp_avg_sq.encode::<V, SecondMoments>(second, block, largest(1));
            if let Some(q) = &max_exp_avg_sq {
                q.encode::<V, SecondMoments>(&buffers.max_exp_avg_sq[..len], block, largest(2));
            }
        }
    }
}

/// A block's codes and its current scale, per moment.
struct Decoded {
    exp_avg: (*mut u8, f32),
    exp_avg_sq: (*mut u8, f32),
    max_exp_avg_sq: Option<(*mut u8, f32)>,
}

/// Updates elements `from..to` of one block (a multiple of `V::LANES`),
/// leaving the new moments in `buffers`; returns their largest magnitudes (as
/// float32 bits) for m, v and v̂.
///
/// # Safety
/// As for `update_run`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn quantized_run<V: Lanes, P: Element, G: Element>(
    weights: &Weights<P, G>,
    decoded: &Decoded,
    from: usize,
    to: usize,
    start: u64,
    keys: Option<Keys>,
    c: &StepConstants,
    buffers: &mut BlockBuffers,
) -> [u32; 3] {
    let c = c.splat::<V>();
    let block_start = from - from % BLOCK;
    let mut largest = [V::Bits::splat(0); 3];
    for i in (from..to).step_by(V::LANES) {
        let within = i - block_start;
        // SAFETY (the block): i + LANES <= to, within every slice and within the
        // block's buffers (the caller's contract).
        unsafe {
            let (m_codes, m_scale) = decoded.exp_avg;
            let (v_codes, v_scale) = decoded.exp_avg_sq;
            let second_moment = |codes: *mut u8, scale: f32| {
                let root = q8::decode::<V, SecondMoments>(codes.add(i), V::splat(scale));
                q8::moment::<V, SecondMoments>(root)
            };
            let [p, m, v, _, root_v_hat] = update_element(
                P::load::<V>(weights.params.add(i)),
                G::load::<V>(weights.grads.add(i)),
                q8::decode::<V, FirstMoments>(m_codes.add(i), V::splat(m_scale)),
                second_moment(v_codes, v_scale),
                decoded
                    .max_exp_avg_sq
                    .map(|(codes, scale)| second_moment(codes, scale)),
                &c,
            );
            let element = start + i as u64;
            weights.store(
                i,
                p,
                keys.map(|k| random_bits::<V>(element, k.params_and_exp_avg)),
            );
            // The stored values: m, and the square roots of v and v̂ (the
            // step took √v̂, which is √v without AMSGrad).
            let (v, v_hat) = match decoded.max_exp_avg_sq {
                None => (root_v_hat, root_v_hat),
                Some(_) => (q8::stored::<V, SecondMoments>(v), root_v_hat),
            };
            m.store(buffers.exp_avg.as_mut_ptr().add(within));
            v.store(buffers.exp_avg_sq.as_mut_ptr().add(within));
            largest[0] = largest[0].max(q8::magnitude_bits(m));
            largest[1] = largest[1].max(q8::magnitude_bits(v));
            if decoded.max_exp_avg_sq.is_some() {
                v_hat.store(buffers.max_exp_avg_sq.as_mut_ptr().add(within));
                largest[2] = largest[2].max(q8::magnitude_bits(v_hat));
            }
        }
    }
    largest.map(Bits::reduce_max)
}
