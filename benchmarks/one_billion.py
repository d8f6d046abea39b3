"""One AdamW step of a 1e9-parameter float32 model, on a machine of 24 GiB.

    python benchmarks/one_billion.py               # both runs, each in its own process
    python benchmarks/one_billion.py --params 2e8  # smaller, to try it out

Parameters, gradients, m and v take 16 bytes a parameter (16 GB at 1e9), so
a step that needs another copy of any of them does not fit. Two runs:
`keras_adamw.host.HostAdamW` on NumPy arrays, and `keras_adamw.AdamW` on the
torch backend (the host path, in place on the variable's memory). Each prints
its step time and its peak resident memory beside the 16 bytes a parameter
that the state itself takes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def peak_resident_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))


def host_run(n: int) -> float:
    import numpy as np

    from keras_adamw import host

    params = np.full(n, 0.5, np.float32)
    grads = np.full(n, 1e-3, np.float32)
    optimizer = host.HostAdamW([params], learning_rate=1e-3)
    start = time.perf_counter()
    optimizer.step([grads])
    return time.perf_counter() - start


def keras_torch_run(n: int) -> float:
    import keras
    import torch

    from keras_adamw import AdamW

    assert keras.backend.backend() == "torch"
    variable = keras.Variable(torch.full((n,), 0.5), name="weights")
    grads = [torch.full((n,), 1e-3)]
    optimizer = AdamW(implementation="host")
    optimizer.build([variable])
    start = time.perf_counter()
    with torch.no_grad():
        optimizer.apply(grads, [variable])
    seconds = time.perf_counter() - start
    assert int(keras.ops.convert_to_numpy(optimizer.iterations)) == 1
    return seconds


RUNS = {
    "keras_adamw.host": ("numpy", host_run),
    "keras_adamw.AdamW, torch": ("torch", keras_torch_run),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=1e9)
    parser.add_argument("--run", choices=RUNS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    n = int(args.params)
    if args.run:
        seconds = RUNS[args.run][1](n)
        print(f"{seconds} {peak_resident_bytes()}")
        return
    print(f"One step at {n:.3g} float32 parameters (state: {16 * n / 1e9:.1f} GB)")
    for name in RUNS:
        env = dict(os.environ, KERAS_BACKEND="torch")
        child = [sys.executable, __file__, "--params", str(n), "--run", name]
        out = subprocess.run(child, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"  {name:<26} failed: {out.stderr.strip()[-500:]}")
            continue
        seconds, peak = out.stdout.split()[-2:]
        peak_gb = int(peak) / 1e9
        print(
            f"  {name:<26} step {float(seconds):6.2f} s   peak resident {peak_gb:5.1f} GB"
            f" ({int(peak) / (4 * n):4.2f}x the parameters)"
        )


if __name__ == "__main__":
    main()
