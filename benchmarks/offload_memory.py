"""Device memory saved by offload_state=True on the torch backend (a GPU check).

    KERAS_BACKEND=torch python benchmarks/offload_memory.py              # 4 x 4096^2 (67M params)
    KERAS_BACKEND=torch python benchmarks/offload_memory.py --width 256  # a quick run anywhere

Trains the same MLP for a few steps with keras_adamw.AdamW on the ops path
(m and v as Keras variables on the device) and with offload_state=True (m and
v in host memory, the update in the host kernel). Reports the peak device
memory of each (torch.cuda.max_memory_allocated), the optimizer variables left
on the device, the median step time, and how far the two runs' weights end
apart. Without CUDA it runs on the CPU and reports no memory figures.
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


def make_model(width, layers):
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((width,))]
        + [keras.layers.Dense(width, activation="relu") for _ in range(layers - 1)]
        + [keras.layers.Dense(width)]
    )


def run(optimizer, args, cuda):
    model = make_model(args.width, args.layers)
    model.compile(optimizer=optimizer, loss="mse")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.width)).astype("float32")
    y = rng.standard_normal((args.batch, args.width)).astype("float32")
    model.train_on_batch(x, y)  # builds the optimizer
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    on_device = [
        v.path for v in model.optimizer.variables if v.value.device.type != "cpu" and v.size > 1
    ]
    return {
        "peak": torch.cuda.max_memory_allocated() if cuda else None,
        "on_device": on_device,
        "ms": statistics.median(times) * 1e3,
        "weights": [keras.ops.convert_to_numpy(w) for w in model.weights],
        "params": model.count_params(),
    }


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    assert keras.backend.backend() == "torch", "run with KERAS_BACKEND=torch"
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "CPU (no CUDA: no device memory figures)"
    results = {
        "ops": run(AdamW(implementation="ops"), args, cuda),
        "offload_state=True": run(AdamW(offload_state=True), args, cuda),
    }
    params = results["ops"]["params"]
    print(f"device: {device}; {params / 1e6:.1f}M parameters, batch {args.batch}")
    print(f"{'implementation':<20} {'peak MiB':>10} {'step ms':>9}  slot variables on the device")
    for name, r in results.items():
        peak = f"{r['peak'] / 2**20:10.1f}" if cuda else f"{'-':>10}"
        print(f"{name:<20} {peak} {r['ms']:9.2f}  {len(r['on_device'])}")
    if cuda:
        saved = results["ops"]["peak"] - results["offload_state=True"]["peak"]
        print(
            f"saved: {saved / 2**20:.1f} MiB "
            f"(m and v of {params / 1e6:.1f}M float32 parameters: {8 * params / 2**20:.1f} MiB)"
        )
    difference = max(
        np.abs(a - b).max()
        for a, b in zip(
            results["ops"]["weights"], results["offload_state=True"]["weights"], strict=True
        )
    )
    print(f"max |weights(ops) - weights(offloaded)| after {args.steps + 1} steps: {difference:.2e}")


if __name__ == "__main__":
    main()
