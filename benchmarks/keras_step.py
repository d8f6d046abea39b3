"""The optimizer step as each Keras backend's trainer runs it, and one fit epoch.

    python benchmarks/keras_step.py          # every installed backend, one process each
    python benchmarks/keras_step.py --backends torch --sizes 16M --reps 3

Per backend, in one process and interleaved step by step: the memory-bandwidth
ceiling (an in-place loop with the update's memory traffic), keras.optimizers.AdamW,
keras_adamw.AdamW on the ops path, and on the host kernel (torch: in place;
JAX: an XLA custom call on the donated buffers; TensorFlow: tf.numpy_function
on copies), with and without offloaded state. The step runs as the trainer
runs it: TensorFlow in a tf.function (without XLA, as jit_compile="auto" does
on a CPU-only machine; Keras's AdamW also with XLA), JAX jitted with the state
donated and returned in one structure, torch eagerly. Then one epoch of `fit`
of an embedding-heavy model. Median ms.
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


def run_backend(args):
    import keras

    backend = keras.backend.backend()
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
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_backend(args)

    modules = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
    for backend in args.backends.split(","):
        if importlib.util.find_spec(modules[backend]) is None:
            print(f"\n== {backend}: not installed, skipped")
            continue
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        child = [sys.executable, __file__, "--child", *sys.argv[1:]]
        out = subprocess.run(child, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"\n== {backend}: failed\n{out.stderr[-3000:]}")
            continue
        print_report(json.loads(out.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    main()
