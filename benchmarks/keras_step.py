"""The optimizer step as each Keras backend's trainer runs it, and one fit epoch.

    python benchmarks/keras_step.py          # every installed backend, one process each
    python benchmarks/keras_step.py --backends torch --sizes 16M --reps 3

Per backend, in one process and interleaved step by step: the memory-bandwidth
ceiling (an in-place loop with the update's memory traffic), keras.optimizers.AdamW,
keras_adamw.AdamW on the ops path, and on the host kernel (torch: in place;
JAX: an XLA custom call on the donated buffers; TensorFlow: our op, writing
new tensors the variables adopt; offloaded, tf.numpy_function), with and
without offloaded state. The step runs as the trainer
runs it: TensorFlow in a tf.function (without XLA, as jit_compile="auto" does
on a CPU-only machine; Keras's AdamW also with XLA), JAX jitted with the state
donated and returned in one structure, torch eagerly. Then one epoch of `fit`
of an embedding-heavy model. Median ms.

    python benchmarks/keras_step.py --plot keras_step.png   # also a chart of the step tables
    python benchmarks/keras_step.py --memory   # peak extra memory of a step instead

The peak resident memory of a few steps on one large variable, above the
memory after `build`, each contender in a process of its own (Linux).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

from _charts import bar_chart, cpu_name


def parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20}
    return (
        int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)
    )


def contenders(backend):
    import keras

    from keras_adamw import AdamW

    made = {"keras.optimizers.AdamW": lambda: keras.optimizers.AdamW()}
    if backend == "tensorflow":
        made[XLA] = lambda: keras.optimizers.AdamW()
    made["keras_adamw ops"] = lambda: AdamW(implementation="ops")
    made["keras_adamw host"] = lambda: AdamW(implementation="host")
    made["keras_adamw host, offloaded"] = lambda: AdamW(offload_state=True)
    return made


XLA = "keras.optimizers.AdamW, XLA"


def step_function(backend, optimizer, variables, grads, xla=False):
    """A no-argument callable running one step the way the backend's trainer does."""
    import keras

    optimizer.build(variables)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(lambda: optimizer.apply(grads, variables), jit_compile=xla)
    if backend == "jax":
        import jax

        def train_step(state, grads):  # as Keras's trainer: state in and out, donated
            params, optimizer_variables = state
            return optimizer.stateless_apply(optimizer_variables, grads, params)

        apply = jax.jit(train_step, donate_argnums=0)
        state = [[v.value for v in variables], [v.value for v in optimizer.variables]]

        def step():
            state[:] = apply(state, grads)
            jax.block_until_ready(state[0])

        return step

    import torch

    def step():
        with torch.no_grad():
            optimizer.apply(grads, variables)

    assert keras.backend.backend() == "torch"
    return step


CEILING = "ceiling (in-place loop)"


def ceiling_loop(sizes):
    """The memory-bandwidth ceiling: a plain in-place loop with the kernel's
    traffic (read p, g, m, v; write p, m, v), on the kernel's threads."""
    import numpy as np

    from keras_adamw import _core

    p, g, m, v = ([np.ones(n, np.float32) for n in sizes] for _ in range(4))
    run = lambda: _core.read_modify_write(p, g, m, v)  # noqa: E731
    run()
    return run


def measure_steps(backend, total, tensors, reps):
    import keras
    import numpy as np

    rng = np.random.default_rng(0)
    sizes = [total // tensors + (i < total % tensors) for i in range(tensors)]
    rows = {}
    runners = {}
    for name, make in contenders(backend).items():
        variables = [keras.Variable(rng.standard_normal(n, dtype=np.float32)) for n in sizes]
        grads = [
            keras.ops.convert_to_tensor(rng.standard_normal(n, dtype=np.float32)) for n in sizes
        ]
        runners[name] = step_function(backend, make(), variables, grads, xla=name == XLA)
        runners[name]()  # compile, first touch
        rows[name] = []
    runners[CEILING] = ceiling_loop(sizes)
    rows[CEILING] = []
    for _ in range(reps):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            rows[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in rows.items()}


def measure_fit(backend, steps, reps):
    """Median seconds of one `fit` epoch per contender, the epochs interleaved."""
    import keras
    import numpy as np

    vocabulary, width = 100_000, 128  # 12.8M embedding parameters
    rng = np.random.default_rng(0)
    x = rng.integers(0, vocabulary, (steps * 64, 8))
    y = rng.standard_normal((steps * 64, 1)).astype("float32")
    models = {}
    for name, make in contenders(backend).items():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((8,), dtype="int32"),
                keras.layers.Embedding(vocabulary, width),
                keras.layers.GlobalAveragePooling1D(),
                keras.layers.Dense(1),
            ]
        )
        model.compile(optimizer=make(), loss="mse", jit_compile=name == XLA or "auto")
        model.fit(x[:64], y[:64], batch_size=64, epochs=1, verbose=0)  # compile
        models[name] = model
    times = {name: [] for name in models}
    for _ in range(reps):
        for name, model in models.items():
            start = time.perf_counter()
            model.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def resident_bytes(field):
    """VmRSS or VmHWM (the peak) of this process, from /proc (Linux)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))


def measure_memory(backend, name, total, steps):
    """Peak resident memory of `name` on one variable of `total` parameters, in
    units of the parameter size: over the first `steps` steps above the memory
    right after `build`, then over `steps` more above the memory before them
    (the steady state). One contender per process, so no other's freed memory
    hides its own."""
    import gc

    import keras
    import numpy as np

    variables = [keras.Variable(np.ones(total, np.float32))]
    grads = [keras.ops.convert_to_tensor(np.full(total, 1e-3, np.float32))]
    step = step_function(backend, contenders(backend)[name](), variables, grads, xla=name == XLA)
    peaks = []
    for _ in range(2):
        gc.collect()
        before = resident_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # the peak (VmHWM) starts again from the memory now
        for _ in range(steps):
            step()
        peaks.append((resident_bytes("VmHWM") - before) / (4 * total))
    return peaks


def run_backend(args):
    import keras

    backend = keras.backend.backend()
    if args.memory_of:
        total = parse_size(args.memory_size)
        print(json.dumps(measure_memory(backend, args.memory_of, total, args.memory_steps)))
        return
    report = {"backend": backend, "steps": [], "fit": None}
    for size in args.sizes.split(","):
        for tensors in map(int, args.tensors.split(",")):
            times = measure_steps(backend, parse_size(size), tensors, args.reps)
            report["steps"].append({"size": size, "tensors": tensors, "times": times})
    fit_times = measure_fit(backend, args.fit_steps, args.fit_reps)
    report["fit"] = {"steps": args.fit_steps, "times": fit_times}
    print(json.dumps(report))


def print_report(report):
    backend = report["backend"]
    print(f"\n== {backend}")
    print(
        f"{'params':>7} {'vars':>4}  {'implementation':<28} {'ms':>9} "
        f"{'Gparam/s':>9} {'x keras':>8}"
    )
    for row in report["steps"]:
        total = parse_size(row["size"])
        keras_ms = row["times"]["keras.optimizers.AdamW"]
        for name, seconds in row["times"].items():
            print(
                f"{row['size']:>7} {row['tensors']:>4}  {name:<28} {seconds * 1e3:9.2f} "
                f"{total / seconds / 1e9:9.3f} {keras_ms / seconds:8.2f}"
            )
    fit = report["fit"]
    keras_s = fit["times"]["keras.optimizers.AdamW"]
    print(f"  fit, embedding model (12.8M params), {fit['steps']} steps of batch 64, median epoch:")
    for name, seconds in fit["times"].items():
        print(f"    {name:<28} {seconds:7.2f} s   x keras {keras_s / seconds:5.2f}")


def plot_reports(reports, path):
    """One chart per backend: Gparam/s of each contender per row."""

    def rate(row, name):
        return parse_size(row["size"]) / row["times"][name] / 1e9

    panels = []
    for report in reports:
        rows = report["steps"]
        names = [n for n in rows[0]["times"] if n != CEILING]
        panels.append(
            (
                report["backend"],
                [f"{row['size']} x {row['tensors']}" for row in rows],
                {name: [rate(row, name) for row in rows] for name in names},
                [rate(row, CEILING) for row in rows],
            )
        )
    bar_chart(panels, path, "One AdamW step as the trainer runs it", "params x variables")


def report_memory(args):
    """Processes per backend and contender, interleaved; prints the median peaks."""
    print(
        f"Peak extra resident memory of one {args.memory_size}-parameter float32 variable,"
        " x the parameter size, median of"
        f" {args.memory_reps} processes: over the first {args.memory_steps} steps (above the"
        f" memory after build), and over {args.memory_steps} steps after those:"
    )
    runs = {
        (backend, name): []
        for backend in installed(args.backends.split(","))
        for name in contender_names(backend)
    }
    for _ in range(args.memory_reps):
        for (backend, name), results in runs.items():
            child = [sys.executable, __file__, "--child", "--memory-of", name, *sys.argv[1:]]
            out = subprocess.run(child, env=backend_env(backend), capture_output=True, text=True)
            if out.returncode == 0:
                results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            else:
                print(f"  {backend} {name} failed: {out.stderr.strip()[-300:]}")
    for (backend, name), results in runs.items():
        if results:
            first, steady = (statistics.median(r[k] for r in results) for k in range(2))
            print(f"  {backend:<11} {name:<28} first {first:+6.2f}x   steady {steady:+6.2f}x")


def contender_names(backend):
    """The names `contenders` gives, without importing Keras (the parent process)."""
    xla = [XLA] if backend == "tensorflow" else []
    ours = ["keras_adamw ops", "keras_adamw host", "keras_adamw host, offloaded"]
    return ["keras.optimizers.AdamW", *xla, *ours]


def installed(backends):
    modules = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
    for backend in backends:
        if importlib.util.find_spec(modules[backend]) is None:
            print(f"\n== {backend}: not installed, skipped")
        else:
            yield backend


def backend_env(backend):
    return dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--sizes", default="16M,64M")
    parser.add_argument("--tensors", default="1,64")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--fit-steps", type=int, default=50)
    parser.add_argument("--fit-reps", type=int, default=3)
    parser.add_argument(
        "--memory", action="store_true", help="peak extra memory of a step instead of time"
    )
    parser.add_argument("--memory-size", default="128M")
    parser.add_argument("--memory-steps", type=int, default=5)
    parser.add_argument("--memory-reps", type=int, default=3)
    parser.add_argument("--plot", metavar="PNG", help="also draw the step tables as a PNG chart")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_backend(args)
    if args.memory:
        return report_memory(args)

    print(f"CPU: {cpu_name()}")
    reports = []
    for backend in installed(args.backends.split(",")):
        child = [sys.executable, __file__, "--child", *sys.argv[1:]]
        out = subprocess.run(child, env=backend_env(backend), capture_output=True, text=True)
        if out.returncode != 0:
            print(f"\n== {backend}: failed\n{out.stderr[-3000:]}")
            continue
        reports.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print_report(reports[-1])
    if args.plot and reports:
        plot_reports(reports, args.plot)


if __name__ == "__main__":
    main()
