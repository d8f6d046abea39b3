"""The optimizer step as each Keras backend's trainer runs it, and one fit epoch.

    python benchmarks/keras_step.py          # every installed backend, one process each
    python benchmarks/keras_step.py --backends torch --sizes 16M --reps 3

Per backend, in one process and interleaved step by step: the memory-bandwidth
ceiling (an in-place loop with the update's memory traffic),
keras.optimizers.AdamW, keras_adamw.AdamW on the ops path, on the host kernel
(torch: in place; JAX: an XLA custom call on the donated buffers; TensorFlow:
our op, writing new tensors the variables adopt; offloaded, tf.numpy_function),
with "auto", and with offloaded state. The step runs as the trainer runs it:
TensorFlow in a tf.function (without XLA, as jit_compile="auto" does on a
CPU-only machine), JAX by Keras's trainer (jitted, the state donated), torch
eagerly; and in each backend's other mode: TensorFlow under XLA, JAX in a
custom loop that jits without donating. A "who wins" table per backend shows
the fastest of Keras, ops and host per row and mode, and "auto" against it.
Then one epoch of `fit` of an embedding-heavy model. Median ms.

    python benchmarks/keras_step.py --plot keras_step.png   # also a chart of the step tables
    python benchmarks/keras_step.py --memory   # peak extra memory of a step instead
    python benchmarks/keras_step.py --dtypes   # 16-bit models and compact state instead

The peak resident memory of a few steps on one large variable (or, with
--memory-tensors K, the same parameters as K variables), above the memory
after `build`, each contender in a process of its own (Linux).

With --dtypes, the trainer's step of float32 and bfloat16 models
(keras.optimizers.AdamW, ours on ops and on the host path, with float32 and
bfloat16 state, masters for the bf16 model): x the float32 host path.
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


# Each backend's ways to run a step: the first is its trainer's. TF's trainer
# compiles without XLA on CPU (jit_compile="auto"); JAX's jits and donates the
# state, which a custom loop may not.
MODES = {"tensorflow": ["", ", XLA"], "jax": ["", ", not donated"], "torch": [""]}
OPTIMIZERS = {
    "keras.optimizers.AdamW": lambda keras, AdamW: keras.optimizers.AdamW(),
    "keras_adamw ops": lambda keras, AdamW: AdamW(implementation="ops"),
    "keras_adamw host": lambda keras, AdamW: AdamW(implementation="host"),
    "keras_adamw auto": lambda keras, AdamW: AdamW(),
    "keras_adamw host, offloaded": lambda keras, AdamW: AdamW(offload_state=True),
}
OFFLOADED = "keras_adamw host, offloaded"
# --dtypes: (the variables' dtype, the optimizer).
DTYPE_OPTIMIZERS = {
    "keras.optimizers.AdamW": ("float32", lambda keras, AdamW: keras.optimizers.AdamW()),
    "keras_adamw host": ("float32", lambda keras, AdamW: AdamW(implementation="host")),
    "keras_adamw ops, bf16 state": (
        "float32",
        lambda keras, AdamW: AdamW(implementation="ops", state_dtype="bfloat16"),
    ),
    "keras_adamw host, bf16 state": (
        "float32",
        lambda keras, AdamW: AdamW(implementation="host", state_dtype="bfloat16"),
    ),
    "keras_adamw host, int8 state": (
        "float32",
        lambda keras, AdamW: AdamW(implementation="host", state_dtype="int8"),
    ),
    "bf16 model, keras.optimizers.AdamW": (
        "bfloat16",
        lambda keras, AdamW: keras.optimizers.AdamW(),
    ),
    "bf16 model, keras_adamw ops": ("bfloat16", lambda keras, AdamW: AdamW(implementation="ops")),
    "bf16 model, keras_adamw host": (
        "bfloat16",
        lambda keras, AdamW: AdamW(implementation="host"),
    ),
    "bf16 model, keras_adamw host, bf16 state": (
        "bfloat16",
        lambda keras, AdamW: AdamW(implementation="host", state_dtype="bfloat16"),
    ),
    "bf16 model, keras_adamw host, int8 state": (
        "bfloat16",
        lambda keras, AdamW: AdamW(implementation="host", state_dtype="int8"),
    ),
}


def contender_names(backend):
    """Each optimizer in each mode, named "optimizer" + mode; the host path is
    refused under XLA, and offloading is measured as the trainer runs it."""
    return [
        name + mode
        for mode in MODES[backend]
        for name in OPTIMIZERS
        if not (mode and name == OFFLOADED) and not (mode == ", XLA" and "host" in name)
    ]


def split_name(name):
    """("optimizer", mode) of a contender's name."""
    modes = {mode for modes in MODES.values() for mode in modes}
    return next(
        (b, name[len(b) :]) for b in OPTIMIZERS if name[len(b) :] in modes and name.startswith(b)
    )


def trainer_names(backend):
    """The contenders as the trainer runs them (and Keras's AdamW under XLA on
    TF): those `fit` and the memory measurement compare."""
    return [n for n in contender_names(backend) if not split_name(n)[1] or n == KERAS_XLA]


KERAS_XLA = "keras.optimizers.AdamW, XLA"


def make_optimizer(name):
    import keras

    from keras_adamw import AdamW

    return OPTIMIZERS[split_name(name)[0]](keras, AdamW)


def step_function(backend, name, variables, grads):
    """A no-argument callable running one step of contender `name` the way its
    mode runs it."""
    return optimizer_step(backend, make_optimizer(name), split_name(name)[1], variables, grads)


def optimizer_step(backend, optimizer, mode, variables, grads):
    """A no-argument callable running one step of `optimizer` in `mode`."""
    import keras

    if backend == "tensorflow":
        import tensorflow as tf

        optimizer.build(variables)
        step = lambda: optimizer.apply(grads, variables)  # noqa: E731
        return tf.function(step, jit_compile=mode == ", XLA")
    if backend == "jax":
        return (
            jax_trainer_step(optimizer, variables, grads)
            if not mode
            else jax_step(optimizer, variables, grads)
        )

    import torch

    optimizer.build(variables)

    def step():
        with torch.no_grad():
            optimizer.apply(grads, variables)

    assert keras.backend.backend() == "torch"
    return step


def jax_trainer_step(optimizer, variables, grads):
    """The optimizer's step run by Keras's JAX trainer itself (jitted, the
    state donated), with the gradients given instead of computed."""
    import jax
    import keras

    class OptimizerStep(keras.Model):
        def __init__(self):
            super().__init__()
            self.parameters = variables

        def train_step(self, state, grads):
            trainable, non_trainable, optimizer_variables, metrics = state
            trainable, optimizer_variables = self.optimizer.stateless_apply(
                optimizer_variables, grads, trainable
            )
            return {}, (trainable, non_trainable, optimizer_variables, metrics)

    model = OptimizerStep()
    model.compile(optimizer=optimizer)
    optimizer.build(model.trainable_variables)
    model.make_train_function()
    state = [
        model._get_jax_state(
            trainable_variables=True,
            non_trainable_variables=True,
            optimizer_variables=True,
            metrics_variables=True,
        )
    ]

    def step():
        _, state[0] = model.train_function(state[0], iter([grads]))
        jax.block_until_ready(state[0])

    return step


def jax_step(optimizer, variables, grads):
    """A custom loop's step: stateless_apply jitted without donation."""
    import jax

    optimizer.build(variables)

    def train_step(state, grads):
        params, optimizer_variables = state
        return optimizer.stateless_apply(optimizer_variables, grads, params)

    apply = jax.jit(train_step)
    state = [[v.value for v in variables], [v.value for v in optimizer.variables]]

    def step():
        state[:] = apply(state, grads)
        jax.block_until_ready(state[0])

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
    runners = {}
    for name in contender_names(backend):
        variables = [keras.Variable(rng.standard_normal(n, dtype=np.float32)) for n in sizes]
        grads = [
            keras.ops.convert_to_tensor(rng.standard_normal(n, dtype=np.float32)) for n in sizes
        ]
        runners[name] = step_function(backend, name, variables, grads)
        runners[name]()  # compile, first touch
    runners[CEILING] = ceiling_loop(sizes)
    return interleaved_medians(runners, reps)


def interleaved_medians(runners, reps):
    """Median seconds of each runner, the runners taking turns step by step."""
    rows = {name: [] for name in runners}
    for _ in range(reps):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            rows[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in rows.items()}


def measure_dtype_steps(backend, total, tensors, reps):
    """Median seconds of the trainer's step per --dtypes contender (None where
    the optimizer refuses the configuration), interleaved."""
    import keras
    import numpy as np

    from keras_adamw import AdamW

    rng = np.random.default_rng(0)
    sizes = [total // tensors + (i < total % tensors) for i in range(tensors)]
    runners = {}
    for name, (dtype, make) in DTYPE_OPTIMIZERS.items():
        values = [rng.standard_normal(n, dtype=np.float32) for n in sizes]
        variables = [keras.Variable(x, dtype=dtype) for x in values]
        grads = [keras.ops.convert_to_tensor(x * 1e-3, dtype=dtype) for x in values]
        try:
            runners[name] = optimizer_step(backend, make(keras, AdamW), "", variables, grads)
            runners[name]()  # compile, first touch
        except ValueError as error:  # for example the host path's dtypes on this backend
            print(f"{name}: {error}", file=sys.stderr)
            runners.pop(name, None)
    medians = interleaved_medians(runners, reps)
    return {name: medians.get(name) for name in DTYPE_OPTIMIZERS}


def print_dtype_report(backend, rows):
    print(f"\n== {backend}: x ours on the host path with float32 state")
    print(
        f"{'params':>7} {'vars':>4}  {'optimizer':<42} {'ms':>9} {'x host f32':>10} {'x keras':>8}"
    )
    for row in rows:
        times = row["times"]
        for name, seconds in times.items():
            if seconds is None:
                print(f"{row['size']:>7} {row['tensors']:>4}  {name:<42} {'refused':>9}")
                continue
            model = "bf16 model, " if name.startswith("bf16") else ""
            keras_s = times[model + "keras.optimizers.AdamW"]
            host_s = times["keras_adamw host"]
            ratio = f"{host_s / seconds:10.2f}" if host_s else f"{'-':>10}"
            print(
                f"{row['size']:>7} {row['tensors']:>4}  {name:<42} {seconds * 1e3:9.2f} "
                f"{ratio} {keras_s / seconds:8.2f}"
            )


def measure_fit(backend, steps, reps):
    """Median seconds of one `fit` epoch per contender, the epochs interleaved."""
    import keras
    import numpy as np

    vocabulary, width = 100_000, 128  # 12.8M embedding parameters
    rng = np.random.default_rng(0)
    x = rng.integers(0, vocabulary, (steps * 64, 8))
    y = rng.standard_normal((steps * 64, 1)).astype("float32")
    models = {}
    for name in trainer_names(backend):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((8,), dtype="int32"),
                keras.layers.Embedding(vocabulary, width),
                keras.layers.GlobalAveragePooling1D(),
                keras.layers.Dense(1),
            ]
        )
        model.compile(
            optimizer=make_optimizer(name), loss="mse", jit_compile=name == KERAS_XLA or "auto"
        )
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


def measure_memory(backend, name, total, steps, tensors=1):
    """Peak resident memory of `name` on `tensors` variables of `total` parameters, in
    units of the parameter size: over the first `steps` steps above the memory
    right after `build`, then over `steps` more above the memory before them
    (the steady state). One contender per process, so no other's freed memory
    hides its own."""
    import gc

    import keras
    import numpy as np

    size = total // tensors
    variables = [keras.Variable(np.ones(size, np.float32)) for _ in range(tensors)]
    grads = [keras.ops.convert_to_tensor(np.full(size, 1e-3, np.float32)) for _ in variables]
    step = step_function(backend, name, variables, grads)
    peaks = []
    for _ in range(2):
        gc.collect()
        before = resident_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # the peak (VmHWM) starts again from the memory now
        for _ in range(steps):
            step()
        peaks.append((resident_bytes("VmHWM") - before) / (4 * size * tensors))
    return peaks


def run_backend(args):
    import keras

    backend = keras.backend.backend()
    if args.memory_of:
        total = parse_size(args.memory_size)
        peak = measure_memory(
            backend, args.memory_of, total, args.memory_steps, args.memory_tensors
        )
        print(json.dumps(peak))
        return
    if args.steps_of:
        size, tensors = args.steps_of.split("x")
        measure = measure_dtype_steps if args.dtypes else measure_steps
        times = measure(backend, parse_size(size), int(tensors), args.reps)
        print(json.dumps({"size": size, "tensors": int(tensors), "times": times}))
    else:
        print(
            json.dumps(
                {
                    "steps": args.fit_steps,
                    "times": measure_fit(backend, args.fit_steps, args.fit_reps),
                }
            )
        )


def measure_backend(backend, args):
    """A process per row of the step table (a row's contenders hold several GB,
    and each row starts from a fresh allocator), then one for `fit`."""

    def child(*extra):
        command = [sys.executable, __file__, "--child", *sys.argv[1:], *extra]
        out = subprocess.run(command, env=backend_env(backend), capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{backend} {' '.join(extra)} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    rows = [
        child("--steps-of", f"{size}x{tensors}")
        for size in args.sizes.split(",")
        for tensors in args.tensors.split(",")
    ]
    return {"backend": backend, "steps": rows, "fit": None if args.dtypes else child()}


def print_report(report):
    backend = report["backend"]
    print(f"\n== {backend}")
    print(
        f"{'params':>7} {'vars':>4}  {'implementation':<40} {'ms':>9} "
        f"{'Gparam/s':>9} {'x keras':>8}"
    )
    for row in report["steps"]:
        total = parse_size(row["size"])
        for name, seconds in row["times"].items():
            keras_ms = row["times"]["keras.optimizers.AdamW" + mode_of(name)]
            print(
                f"{row['size']:>7} {row['tensors']:>4}  {name:<40} {seconds * 1e3:9.2f} "
                f"{total / seconds / 1e9:9.3f} {keras_ms / seconds:8.2f}"
            )
    print_who_wins(report)
    fit = report["fit"]
    keras_s = fit["times"]["keras.optimizers.AdamW"]
    print(f"  fit, embedding model (12.8M params), {fit['steps']} steps of batch 64, median epoch:")
    for name, seconds in fit["times"].items():
        print(f"    {name:<28} {seconds:7.2f} s   x keras {keras_s / seconds:5.2f}")


def mode_of(name):
    return "" if name == CEILING else split_name(name)[1]


def print_who_wins(report):
    """Per row and mode: each candidate's time as x Keras's AdamW in that mode,
    the fastest of Keras, ops and host, and auto against it."""
    short = {
        "keras.optimizers.AdamW": "keras",
        "keras_adamw ops": "ops",
        "keras_adamw host": "host",
    }
    candidates = list(short)
    mode_names = {"": "trainer", ", XLA": "XLA", ", not donated": "not donated"}
    print(f"\n  who wins ({report['backend']}), x Keras's AdamW in the same mode:")
    print(
        f"  {'params x vars':<14} {'mode':<12} {'keras':>6} {'ops':>6} {'host':>6} {'auto':>6}"
        "  best  auto/best"
    )
    for row in report["steps"]:
        for mode in MODES[report["backend"]]:
            times = {c: row["times"].get(c + mode) for c in [*candidates, "keras_adamw auto"]}
            keras_s = times["keras.optimizers.AdamW"]
            measured = {c: t for c, t in times.items() if t is not None and c in candidates}
            best = min(measured, key=measured.get)
            cells = [f"{keras_s / t:6.2f}" if t else f"{'-':>6}" for t in times.values()]
            print(
                f"  {row['size'] + ' x ' + str(row['tensors']):<14} {mode_names[mode]:<12} "
                f"{' '.join(cells)}  {short[best]:<5} "
                f"{measured[best] / times['keras_adamw auto']:6.2f}"
            )


def plot_reports(reports, path):
    """One chart per backend: Gparam/s of each contender per row."""

    def rate(row, name):
        return parse_size(row["size"]) / row["times"][name] / 1e9

    panels = []
    for report in reports:
        rows = report["steps"]
        names = trainer_names(report["backend"])  # the other modes are in the tables
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
        f"Peak extra resident memory of {args.memory_size} float32 parameters as"
        f" {args.memory_tensors} variable(s),"
        " x the parameter size, median of"
        f" {args.memory_reps} processes: over the first {args.memory_steps} steps (above the"
        f" memory after build), and over {args.memory_steps} steps after those:"
    )
    runs = {
        (backend, name): []
        for backend in installed(args.backends.split(","))
        for name in trainer_names(backend)
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
    parser.add_argument("--memory-tensors", type=int, default=1)
    parser.add_argument("--memory-steps", type=int, default=5)
    parser.add_argument("--memory-reps", type=int, default=3)
    parser.add_argument("--plot", metavar="PNG", help="also draw the step tables as a PNG chart")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    parser.add_argument("--steps-of", help=argparse.SUPPRESS)
    parser.add_argument("--dtypes", action="store_true", help="16-bit models, compact state")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_backend(args)
    if args.memory:
        return report_memory(args)

    print(f"CPU: {cpu_name()}")
    reports = []
    for backend in installed(args.backends.split(",")):
        try:
            reports.append(measure_backend(backend, args))
        except RuntimeError as error:
            print(f"\n== {error}")
            continue
        if args.dtypes:
            print_dtype_report(backend, reports[-1]["steps"])
        else:
            print_report(reports[-1])
    if args.plot and reports and not args.dtypes:
        plot_reports(reports, args.plot)


if __name__ == "__main__":
    main()
