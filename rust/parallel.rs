//! One parallel dispatch for a whole step: every tensor is cut into chunks and
//! the chunks of all tensors share one pass of the thread pool, so a thousand
//! small tensors cost about what one large tensor of the same size does.

use crate::dtype::stochastic::Rounding;
use crate::math::{InvalidArgument, StepConstants};
use crate::simd::{self, SimdLevel};
use crate::subnormals::KeepSubnormals;
use crate::{Sources, TensorSlices};
use rayon::prelude::*;
use rayon::{ThreadPool, ThreadPoolBuildError, ThreadPoolBuilder};
use std::sync::{Arc, Mutex};

/// Environment variable giving the default thread count.
pub const THREADS_ENV_VAR: &str = "KERAS_ADAMW_NUM_THREADS";

/// Elements per chunk: 32 Ki floats, 128 KiB of each of the 4-5 streams, small
/// enough to balance two to a few dozen threads, large enough that scheduling is
/// noise. A multiple of every SIMD width, so only a tensor's end has a tail.
const CHUNK: usize = 32 * 1024;

/// Below this many elements in a step the calling thread does it all.
const MIN_PARALLEL: usize = 4 * CHUNK;

/// The pool and the process it was started in: a forked child inherits the
/// parent's pool without its threads, so the child starts its own.
struct Pool {
    pid: u32,
    threads: Arc<ThreadPool>,
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);

fn default_threads() -> usize {
    std::env::var(THREADS_ENV_VAR)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn build_pool(threads: usize) -> Result<Arc<ThreadPool>, ThreadPoolBuildError> {
    let pool = ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("keras-adamw-{i}"))
        .build()?;
    Ok(Arc::new(pool))
}

/// The pool's lock, held across a fork (`crate::fork`).
#[cfg(unix)]
pub(crate) fn lock() -> std::sync::MutexGuard<'static, impl Sized> {
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The shared pool, started on first use and again in a forked child (with
/// the parent's thread count); an error when its threads cannot start.
pub fn pool() -> Result<Arc<ThreadPool>, ThreadPoolBuildError> {
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let pid = std::process::id();
    let threads = match guard.take() {
        Some(pool) if pool.pid == pid => {
            let threads = pool.threads.clone();
            *guard = Some(pool);
            return Ok(threads);
        }
        Some(inherited) => {
            let count = inherited.threads.current_num_threads();
            // Its threads live only in the parent: dropping it here would
            // signal threads that do not exist, so it is left alone.
            std::mem::forget(inherited);
            count
        }
        None => default_threads(),
    };
    let threads = build_pool(threads)?;
    *guard = Some(Pool {
        pid,
        threads: threads.clone(),
    });
    Ok(threads)
}

/// The pool's thread count (1 when threads cannot start: steps then run on the caller).
pub fn num_threads() -> usize {
    pool().map_or(1, |pool| pool.current_num_threads())
}

/// Replaces the pool with one of `threads` threads (steps under way finish on the old one).
pub fn set_num_threads(threads: usize) -> Result<(), InvalidArgument> {
    if threads == 0 {
        return Err(InvalidArgument::new("n", "must be >= 1 threads, got 0"));
    }
    let threads_pool = build_pool(threads).map_err(|e| {
        InvalidArgument::new(
            "n",
            format!("= {threads}: the threads could not start ({e})"),
        )
    })?;
    *POOL.lock().unwrap_or_else(|e| e.into_inner()) = Some(Pool {
        pid: std::process::id(),
        threads: threads_pool,
    });
    Ok(())
}

/// One AdamW step over all `tensors`, in place, at SIMD `level`.
///
/// Each element's result is independent of the thread count and of how the
/// data is split into tensors: chunk edges only move where the scalar tail runs,
/// and the tail computes exactly what the vector body does; and of the
/// threads' floating-point mode (`KeepSubnormals`).
pub fn adamw_step(
    tensors: Vec<TensorSlices<'_>>,
    c: &StepConstants,
    rounding: Rounding,
    level: SimdLevel,
) {
    for_each_chunk(tensors, |t| {
        let _ieee = KeepSubnormals::enter();
        simd::update(level, t, c, rounding)
    });
}

/// The same step out of place: each chunk of `sources` is copied into its
/// tensors' chunk, then updated there while it is still in cache.
pub fn adamw_step_from(
    pairs: Vec<(Sources<'_>, TensorSlices<'_>)>,
    c: &StepConstants,
    rounding: Rounding,
    level: SimdLevel,
) {
    for_each_chunk(pairs, |(sources, mut t)| {
        let _ieee = KeepSubnormals::enter();
        sources.copy_into(&mut t);
        simd::update(level, t, c, rounding)
    });
}

/// Work that can be cut into chunks.
pub trait Chunk: Sized + Send {
    fn elements(&self) -> usize;
    fn split_at(self, mid: usize) -> (Self, Self);
}

impl Chunk for TensorSlices<'_> {
    fn elements(&self) -> usize {
        self.len()
    }

    fn split_at(self, mid: usize) -> (Self, Self) {
        TensorSlices::split_at(self, mid)
    }
}

impl Chunk for (Sources<'_>, TensorSlices<'_>) {
    fn elements(&self) -> usize {
        self.1.len()
    }

    fn split_at(self, mid: usize) -> (Self, Self) {
        let ((s0, s1), (t0, t1)) = (self.0.split_at(mid), self.1.split_at(mid));
        ((s0, t0), (s1, t1))
    }
}

/// Calls `f` on chunks that together cover `tensors`, in parallel when there is
/// enough work.
pub fn for_each_chunk<T: Chunk, F>(tensors: Vec<T>, f: F)
where
    F: Fn(T) + Sync,
{
    let total: usize = tensors.iter().map(Chunk::elements).sum();
    if total < MIN_PARALLEL {
        tensors.into_iter().for_each(f);
        return;
    }
    let mut chunks = Vec::with_capacity(total / CHUNK + tensors.len());
    for mut rest in tensors {
        while rest.elements() > CHUNK {
            let (chunk, tail) = rest.split_at(CHUNK);
            chunks.push(chunk);
            rest = tail;
        }
        chunks.push(rest);
    }
    match pool() {
        Ok(pool) => pool.install(|| chunks.into_par_iter().for_each(&f)),
        // No threads to be had (a process or memory limit): the caller does it all.
        Err(_) => chunks.into_iter().for_each(f),
    }
}
