"""Offloading from a GPU on the torch backend: device memory, bytes crossing, step time.

    KERAS_BACKEND=torch python benchmarks/offload_memory.py              # 8 x 4096^2: 134M
    KERAS_BACKEND=torch python benchmarks/offload_memory.py --width 256  # a quick run

Trains the same MLP, in float32 and in bfloat16, with each optimizer:

- ``keras.optimizers.AdamW`` (m and v in the variables' dtype, on the device);
- ours on the ops path (on the device; bfloat16 variables get float32 masters there);
- ours with ``offload_state=True`` (masters, m and v in host memory, the update
  in the host kernel; gradients go to the host and parameters come back, in
  chunks whose copies overlap the update of the next chunk);
- the same without the overlap (one chunk, copies that block), the reference
  the pipelined run must equal bit for bit.

Reports each one's peak device memory above what was in use before its model
existed, the bytes crossing per parameter per step (counted by the staging
layer), the median step time of steps run interleaved, and how far its
weights end from our ops path's. Through the loss the runs' rounding
differences grow, so the update alone is compared too: on a linear model
with a linear loss, whose gradients are the same at every step. Without
CUDA it runs on the CPU (staging nothing) and reports no memory figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
import numpy as np
import torch

from keras_adamw import AdamW
from keras_adamw.backends import torch as torch_backend


def make_model(dtype, args):
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((args.width,))]
        + [
            keras.layers.Dense(args.width, activation="relu", dtype=dtype)
            for _ in range(args.layers - 1)
        ]
        + [keras.layers.Dense(args.width, dtype=dtype)]
    )


class Unpipelined:
    """Staging without CUDA streams (every copy blocks) and in one chunk."""

    def __enter__(self):
        self.saved = torch_backend.CHUNK_ELEMENTS, torch_backend.StagingBuffers.begin
        torch_backend.CHUNK_ELEMENTS = 1 << 62
        torch_backend.StagingBuffers.begin = lambda staging, tensors: None

    def __exit__(self, *exc):
        torch_backend.CHUNK_ELEMENTS, torch_backend.StagingBuffers.begin = self.saved


class Run:
    def __init__(self, name, optimizer, dtype, args, cuda, unpipelined=False):
        self.name, self.dtype, self.unpipelined, self.cuda = name, dtype, unpipelined, cuda
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((args.batch, args.width)).astype("float32")
        self.y = rng.standard_normal((args.batch, args.width)).astype("float32")
        before = torch.cuda.memory_allocated() if cuda else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        self.model = make_model(dtype, args)
        self.model.compile(optimizer=optimizer, loss="mse")
        self.times = []
        self.step()  # builds the optimizer
        self.step()
        self.peak = torch.cuda.max_memory_allocated() - before if cuda else None
        staging = getattr(self.model.optimizer, "_host_path", None)
        self.staging = getattr(staging, "staging", None)
        self.crossed = self.bytes_crossed()
        self.times.clear()

    def step(self):
        start = time.perf_counter()
        if self.unpipelined:
            with Unpipelined():
                self.model.train_on_batch(self.x, self.y)
        else:
            self.model.train_on_batch(self.x, self.y)
        if self.cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - start)

    def bytes_crossed(self):
        if self.staging is None:
            return 0
        return self.staging.bytes_to_host + self.staging.bytes_to_device

    def weights(self):
        return [keras.ops.convert_to_numpy(w).astype("float32") for w in self.model.weights]


def update_check(dtype, args, steps=10):
    """The largest difference between ours on the ops path and offloaded, in
    the weights and (16-bit models) in the float32 masters, after ``steps``
    steps of the same gradients: one Dense layer, loss mean(y_pred * y)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((args.batch, args.width)).astype("float32")
    y = rng.standard_normal((args.batch, args.width)).astype("float32")
    results = []
    for optimizer in [AdamW(implementation="ops"), AdamW(offload_state=True)]:
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((args.width,)), keras.layers.Dense(args.width, dtype=dtype)]
        )
        model.compile(optimizer=optimizer, loss=lambda y, y_pred: keras.ops.mean(y_pred * y))
        for _ in range(steps):
            model.train_on_batch(x, y)
        masters = [m for m in optimizer._masters if m is not None]
        results.append(
            (
                [keras.ops.convert_to_numpy(w).astype("float32") for w in model.weights],
                [np.asarray(keras.ops.convert_to_numpy(m)) for m in masters],
            )
        )
    (weights, masters), (offloaded_weights, offloaded_masters) = results
    return (
        max(float(np.abs(a - b).max()) for a, b in zip(weights, offloaded_weights, strict=True)),
        max(
            (float(np.abs(a - b).max()) for a, b in zip(masters, offloaded_masters, strict=True)),
            default=None,
        ),
    )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    assert keras.backend.backend() == "torch", "run with KERAS_BACKEND=torch"
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "CPU (no CUDA: nothing staged)"
    print(f"device: {device}; host: {os.cpu_count()} CPUs; torch {torch.__version__}")
    for dtype in ["float32", "bfloat16"]:
        runs = [
            Run("keras.optimizers.AdamW", keras.optimizers.AdamW(), dtype, args, cuda),
            Run("ours, ops", AdamW(implementation="ops"), dtype, args, cuda),
            Run("ours, offload_state", AdamW(offload_state=True), dtype, args, cuda),
            Run("  unpipelined", AdamW(offload_state=True), dtype, args, cuda, unpipelined=True),
        ]
        for run in runs:
            run.crossed = run.bytes_crossed()
        for _ in range(args.steps):  # interleaved: each round steps every run once
            for run in runs:
                run.step()
        params = runs[0].model.count_params()
        steps = args.steps
        print(f"\n{dtype} model, {params / 1e6:.1f}M parameters, batch {args.batch}")
        print(
            f"{'optimizer':<24} {'peak MiB':>9} {'B/param':>8} {'step ms':>8}"
            "  max |w - w(ours, ops)|"
        )
        reference = runs[1].weights()
        for run in runs:
            peak = f"{run.peak / 2**20:9.1f}" if cuda else f"{'-':>9}"
            crossed = (run.bytes_crossed() - run.crossed) / (steps * params)
            distance = max(
                float(np.abs(a - b).max()) for a, b in zip(run.weights(), reference, strict=True)
            )
            print(
                f"{run.name:<24} {peak} {crossed:8.1f} {statistics.median(run.times) * 1e3:8.2f}"
                f"  {distance:.2e}"
            )
        pipelined, unpipelined = runs[2].weights(), runs[3].weights()
        same = all(np.array_equal(a, b) for a, b in zip(pipelined, unpipelined, strict=True))
        print(f"pipelined weights equal the unpipelined run's bit for bit: {same}")
        weights, masters = update_check(dtype, args)
        print(
            f"the same gradients for 10 steps: max |w(offloaded) - w(ours, ops)| {weights:.2e}"
            + ("" if masters is None else f", of their float32 masters {masters:.2e}")
        )
        del runs
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
