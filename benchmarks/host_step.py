"""One AdamW step on host memory: keras_adamw.host against what users would pick instead.

    python benchmarks/host_step.py     # 1M/16M/64M params, 1/100/1000 tensors, 1/2 threads
    python benchmarks/host_step.py --sizes 16M --tensors 1 --threads 2 --reps 3
    python benchmarks/host_step.py --dtypes --sizes 64M --threads 2   # 16-bit data

Every row measures, in the same run and interleaved step by step so that the
machine's noise hits all alike: a plain in-place loop with the kernel's memory
traffic (read p, g, m, v; write p, m, v = 28 bytes per parameter; the ceiling),
keras_adamw.host, torch.optim.AdamW (for-loop, foreach, fused), NumPy in-place
ufuncs, and DeepSpeedCPUAdam when it imports. Figures are median ms per step.

With --dtypes, the rows are the kernel's dtype combinations instead (16-bit
grads, state, params, copy-out), each with its bytes per parameter and its
bound (those bytes at the bandwidth the in-place loop measured in the same
run), against the float32 kernel and against what a torch user runs for the
same result: torch's fused AdamW (float32 only) plus the conversion passes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
from _charts import bar_chart, cpu_name

from keras_adamw import _core, host

BYTES_PER_PARAM = 28
HYPER = dict(learning_rate=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-8, weight_decay=0.01)


def split_sizes(total: int, tensors: int) -> list[int]:
    base, extra = divmod(total, tensors)
    return [base + (i < extra) for i in range(tensors)]


def random_arrays(sizes: list[int], rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.standard_normal(n, dtype=np.float32) for n in sizes]


class Contender:
    """A named step function with its own state."""

    def __init__(self, name: str, step: Callable[[], None]):
        self.name, self.step, self.times = name, step, []

    def timed_step(self) -> None:
        start = time.perf_counter()
        self.step()
        self.times.append(time.perf_counter() - start)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def ceiling(sizes, rng) -> Contender:
    p, g, m, v = (random_arrays(sizes, rng) for _ in range(4))
    return Contender("in-place loop (ceiling)", lambda: _core.read_modify_write(p, g, m, v))


def ours(sizes, rng) -> Contender:
    p, g = random_arrays(sizes, rng), random_arrays(sizes, rng)
    m, v = [np.zeros(n, np.float32) for n in sizes], [np.zeros(n, np.float32) for n in sizes]
    count = [0]

    def step():
        count[0] += 1
        host.adamw_update(p, g, m, v, step=count[0], epsilon_mode="torch", **HYPER)

    return Contender("keras_adamw.host", step)


def torch_adamw(sizes, rng, variant: str) -> Contender:
    import torch

    params = [torch.from_numpy(a) for a in random_arrays(sizes, rng)]
    for p, g in zip(params, random_arrays(sizes, rng), strict=True):
        p.grad = torch.from_numpy(g)
    flags = {
        "for-loop": dict(foreach=False),
        "foreach": dict(foreach=True),
        "fused": dict(fused=True),
    }
    optimizer = torch.optim.AdamW(
        params,
        lr=HYPER["learning_rate"],
        betas=(HYPER["beta_1"], HYPER["beta_2"]),
        eps=HYPER["epsilon"],
        weight_decay=HYPER["weight_decay"],
        **flags[variant],
    )
    return Contender(f"torch AdamW {variant}", optimizer.step)


#: Not installed, or its CPU Adam op did not build (it JIT-builds with ninja on PATH).
DEEPSPEED_UNAVAILABLE = (ImportError, RuntimeError)


def deepspeed_adam(sizes, rng) -> Contender:
    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    params = [torch.nn.Parameter(torch.from_numpy(a)) for a in random_arrays(sizes, rng)]
    for p, g in zip(params, random_arrays(sizes, rng), strict=True):
        p.grad = torch.from_numpy(g)
    optimizer = DeepSpeedCPUAdam(
        params, lr=HYPER["learning_rate"], weight_decay=HYPER["weight_decay"]
    )
    return Contender("DeepSpeedCPUAdam", optimizer.step)


def numpy_inplace(sizes, rng) -> Contender:
    p, g = random_arrays(sizes, rng), random_arrays(sizes, rng)
    m, v = [np.zeros(n, np.float32) for n in sizes], [np.zeros(n, np.float32) for n in sizes]
    scratch = [np.empty(n, np.float32) for n in sizes]
    count = [0]
    lr, b1, b2, eps, wd = (
        HYPER[k] for k in ("learning_rate", "beta_1", "beta_2", "epsilon", "weight_decay")
    )

    def step():
        count[0] += 1
        t = count[0]
        step_size = lr / (1 - b1**t)
        sqrt_bc2 = np.sqrt(1 - b2**t)
        for pi, gi, mi, vi, s in zip(p, g, m, v, scratch, strict=True):
            pi *= 1 - lr * wd
            mi *= b1
            np.multiply(gi, 1 - b1, out=s)
            mi += s
            vi *= b2
            np.multiply(gi, gi, out=s)
            s *= 1 - b2
            vi += s
            np.sqrt(vi, out=s)
            s /= sqrt_bc2
            s += eps
            np.divide(mi, s, out=s)
            s *= -step_size
            pi += s

    return Contender("NumPy in-place", step)


def arrays_of(sizes: list[int], rng: np.random.Generator, dtype: str) -> list[np.ndarray]:
    import ml_dtypes

    np_dtype = {"bf16": ml_dtypes.bfloat16, "f16": np.float16, "f32": np.float32}[dtype]
    return [a.astype(np_dtype) for a in random_arrays(sizes, rng)]


#: (name, params, grads, state, copy-out, rounding, bytes per parameter):
#: params are read and written (4 or 2 bytes each way), grads read, m and v
#: read and written, a copy written.
DTYPE_ROWS = [
    ("float32 (all)", "f32", "f32", "f32", None, "nearest", 28),
    ("bf16 grads + bf16 state", "f32", "bf16", "bf16", None, "nearest", 18),
    ("bf16 grads+state, bf16 copy", "f32", "bf16", "bf16", "bf16", "nearest", 20),
    ("f16 grads, f16 copy", "f32", "f16", "f32", "f16", "nearest", 26),
    ("bf16 params, stochastic", "bf16", "bf16", "bf16", None, "stochastic", 14),
    # 8-bit m and v: a byte each way per moment, and a scale per 256.
    ("bf16 grads + 8-bit state", "f32", "bf16", "int8", None, "nearest", 14),
    ("bf16 grads, 8-bit, bf16 copy", "f32", "bf16", "int8", "bf16", "nearest", 16),
]


def ours_with_dtypes(sizes, rng, row) -> Contender:
    name, p_dtype, g_dtype, state_dtype, copy_dtype, rounding, _ = row
    p, g = arrays_of(sizes, rng, p_dtype), arrays_of(sizes, rng, g_dtype)
    if state_dtype == "int8":
        m = [host.QuantizedState(n, moment=1) for n in sizes]
        v = [host.QuantizedState(n, moment=2) for n in sizes]
    else:
        m, v = ([a * 0 for a in arrays_of(sizes, rng, state_dtype)] for _ in range(2))
    copies = None if copy_dtype is None else arrays_of(sizes, rng, copy_dtype)
    count = [0]

    def step():
        count[0] += 1
        host.adamw_update(
            p,
            g,
            m,
            v,
            step=count[0],
            param_copies=copies,
            rounding=rounding,
            epsilon_mode="torch",
            **HYPER,
        )

    return Contender(name, step)


def torch_with_conversions(sizes, rng) -> Contender:
    """What a torch user runs for bf16 grads, float32 master weights and a bf16
    copy: widen the grads, the fused step (float32 state), narrow the weights."""
    import torch

    params = [torch.from_numpy(a) for a in random_arrays(sizes, rng)]
    grads16 = [torch.from_numpy(a).to(torch.bfloat16) for a in random_arrays(sizes, rng)]
    copies = [torch.empty(n, dtype=torch.bfloat16) for n in sizes]
    for p in params:
        p.grad = torch.empty_like(p)
    optimizer = torch.optim.AdamW(
        params,
        lr=HYPER["learning_rate"],
        betas=(HYPER["beta_1"], HYPER["beta_2"]),
        eps=HYPER["epsilon"],
        weight_decay=HYPER["weight_decay"],
        fused=True,
    )

    def step():
        torch._foreach_copy_([p.grad for p in params], grads16)
        optimizer.step()
        torch._foreach_copy_(copies, params)

    return Contender("torch fused + conversions", step)


def deepspeed_bf16(sizes, rng) -> Contender:
    """DeepSpeedCPUAdam on bf16 params and grads, with its float32 state."""
    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    params = [
        torch.nn.Parameter(torch.from_numpy(a).to(torch.bfloat16))
        for a in random_arrays(sizes, rng)
    ]
    for p, g in zip(params, random_arrays(sizes, rng), strict=True):
        p.grad = torch.from_numpy(g).to(torch.bfloat16)
    optimizer = DeepSpeedCPUAdam(
        params, lr=HYPER["learning_rate"], weight_decay=HYPER["weight_decay"]
    )
    return Contender("DeepSpeedCPUAdam bf16", optimizer.step)


def run_dtype_rows(total: int, tensors: int, threads: int, reps: int) -> None:
    import torch

    host.set_num_threads(threads)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    sizes = split_sizes(total, tensors)
    contenders = [ceiling(sizes, rng)]
    contenders += [ours_with_dtypes(sizes, rng, row) for row in DTYPE_ROWS]
    contenders.append(torch_with_conversions(sizes, rng))
    try:
        contenders.append(deepspeed_bf16(sizes, rng))
    except DEEPSPEED_UNAVAILABLE as e:
        print(f"    (DeepSpeedCPUAdam unavailable, {e}: its bf16 row is not run)")
    for contender in contenders:
        contender.step()
    for _ in range(reps):
        for contender in contenders:
            contender.timed_step()
    bandwidth = BYTES_PER_PARAM * total / contenders[0].median
    by_name = {c.name: c.median for c in contenders}
    float32 = by_name["float32 (all)"]
    torch_ms = by_name["torch fused + conversions"]
    bytes_of = {row[0]: row[-1] for row in DTYPE_ROWS}
    header = (
        f"{'implementation':<27} {'B/param':>7} {'ms':>8} {'Gparam/s':>9} {'% bound':>8} "
        f"{'x f32':>6} {'x torch':>8}"
    )
    print(f"{total / 2**20:.0f}M params x {tensors} tensors, {threads} threads")
    print(header)
    print("-" * len(header))
    for c in contenders[1:]:
        nbytes = bytes_of.get(c.name)
        bound = "" if nbytes is None else f"{100 * nbytes * total / bandwidth / c.median:7.1f}%"
        print(
            f"{c.name:<27} {nbytes or '':>7} {c.median * 1e3:8.2f} {total / c.median / 1e9:9.3f} "
            f"{bound:>8} {float32 / c.median:6.2f} {torch_ms / c.median:8.2f}"
        )
    print(f"in-place loop: {bandwidth / 1e9:.1f} GB/s (the bound of each row: its bytes at this)\n")


def parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return (
        int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)
    )


def run_row(total: int, tensors: int, threads: int, reps: int, skip_slow: bool) -> list[Contender]:
    import torch

    host.set_num_threads(threads)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    sizes = split_sizes(total, tensors)
    makers = [
        ("ceiling", lambda: ceiling(sizes, rng)),
        ("ours", lambda: ours(sizes, rng)),
        ("fused", lambda: torch_adamw(sizes, rng, "fused")),
        ("foreach", lambda: torch_adamw(sizes, rng, "foreach")),
        ("for-loop", lambda: torch_adamw(sizes, rng, "for-loop")),
        ("numpy", lambda: numpy_inplace(sizes, rng)),
        ("deepspeed", lambda: deepspeed_adam(sizes, rng)),
    ]
    if skip_slow:
        makers = [(k, f) for k, f in makers if k not in ("for-loop", "numpy")]
    contenders = []
    for key, make in makers:
        try:
            contenders.append(make())
        except DEEPSPEED_UNAVAILABLE as e:
            if key == "deepspeed":
                print(f"    (DeepSpeedCPUAdam unavailable, {e}: skipped at {total} params)")
            else:
                raise
    for contender in contenders:  # warm up: first-touch page faults, thread pools, JIT
        contender.step()
    for _ in range(reps):  # interleaved, so noise falls on every contender alike
        for contender in contenders:
            contender.timed_step()
    return contenders


def plot_rows(rows: list[tuple[int, str, dict[str, float]]], path: str) -> None:
    """One chart per thread count; a contender missing from a row (DeepSpeed
    not importable, slow ones skipped) has no bar there."""
    ceiling = "in-place loop (ceiling)"
    panels = []
    for threads in dict.fromkeys(t for t, _, _ in rows):
        mine = [(label, rates) for t, label, rates in rows if t == threads]
        names = dict.fromkeys(n for _, rates in mine for n in rates if n != ceiling)
        panels.append(
            (
                f"{threads} thread{'s' if threads > 1 else ''}",
                [label for label, _ in mine],
                {n: [rates.get(n, float("nan")) for _, rates in mine] for n in names},
                [rates[ceiling] for _, rates in mine],
            )
        )
    bar_chart(panels, path, "One AdamW step on host memory", "params x tensors")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1M,16M,64M")
    parser.add_argument("--tensors", default="1,100,1000")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument(
        "--skip-slow", action="store_true", help="leave out torch for-loop and NumPy"
    )
    parser.add_argument("--plot", metavar="PNG", help="also draw the table as a PNG chart")
    parser.add_argument(
        "--dtypes", action="store_true", help="rows per dtype combination (16-bit data)"
    )
    args = parser.parse_args()

    import torch

    print(f"CPU: {cpu_name()}; {host.simd_level()} kernel")
    print(
        f"torch {torch.__version__}; keras_adamw {_core.__version__}; {args.reps} steps per cell\n"
    )
    if args.dtypes:
        for size_text in args.sizes.split(","):
            for threads in map(int, args.threads.split(",")):
                for tensors in map(int, args.tensors.split(",")):
                    run_dtype_rows(parse_size(size_text), tensors, threads, args.reps)
        return
    ours_rate: dict[tuple[int, int], float] = {}
    rows: list[tuple[int, str, dict[str, float]]] = []  # (threads, label, Gparam/s by name)
    header = (
        f"{'params':>7} {'tensors':>7} {'thr':>3}  {'implementation':<24} {'ms':>8} "
        f"{'Gparam/s':>9} {'% bound':>8} {'ours x':>7}"
    )
    print(header)
    print("-" * len(header))
    for size_text in args.sizes.split(","):
        total = parse_size(size_text)
        for threads in map(int, args.threads.split(",")):
            for tensors in map(int, args.tensors.split(",")):
                contenders = run_row(total, tensors, threads, args.reps, args.skip_slow)
                bound = contenders[0].median
                ours_ms = next(c.median for c in contenders if c.name == "keras_adamw.host")
                ours_rate[(total, threads, tensors)] = total / ours_ms
                for c in contenders:
                    rate = total / c.median / 1e9
                    print(
                        f"{size_text:>7} {tensors:>7} {threads:>3}  {c.name:<24} "
                        f"{c.median * 1e3:8.2f} "
                        f"{rate:9.3f} {100 * bound / c.median:7.1f}% {c.median / ours_ms:7.2f}"
                    )
                rates = {c.name: total / c.median / 1e9 for c in contenders}
                rows.append((threads, f"{size_text} x {tensors}", rates))
                gbps = BYTES_PER_PARAM * total / bound / 1e9
                print(f"{'':>20}  ceiling bandwidth {gbps:.1f} GB/s in place\n")
    if args.plot:
        plot_rows(rows, args.plot)
    print("keras_adamw.host, rate with many tensors as % of the 1-tensor rate:")
    for (total, threads, tensors), rate in ours_rate.items():
        one = ours_rate.get((total, threads, 1))
        if tensors != 1 and one:
            print(
                f"  {total / 2**20:.0f}M params, {threads} threads, {tensors} tensors: "
                f"{100 * rate / one:.1f}% of the 1-tensor rate"
            )


if __name__ == "__main__":
    main()
