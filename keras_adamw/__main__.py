"""`python -m keras_adamw [--json]`: what keras_adamw does on this machine.

The versions of the package and of each installed backend, the SIMD level and
the thread count, a two-second self-check of the kernel against an in-place
loop with the same memory traffic (the ceiling), and the path that
`AdamW(implementation="auto")` takes for a float32 variable on each installed
backend. Each backend is probed in a process of its own, since Keras reads
KERAS_BACKEND at import.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from keras_adamw import __version__, _core, host

BACKENDS = ("tensorflow", "jax", "torch")
DISTRIBUTIONS = (
    "keras",
    "numpy",
    "ml_dtypes",
    "tensorflow",
    "tensorflow-cpu",
    "jax",
    "jaxlib",
    "torch",
)

# Run with KERAS_BACKEND set: builds the optimizer on one float32 variable on
# the backend's default device and says which path "auto" took, and why.
PROBE = """
import json, keras, numpy as np
from keras_adamw import AdamW
from keras_adamw.optimizer import _host_unsupported_reason
variable = keras.Variable(np.zeros((4, 4), "float32"))
optimizer = AdamW()
optimizer.build([variable])
report = {"path": "host" if optimizer._on_host else "ops"}
reason = _host_unsupported_reason([variable], False)
if reason:
    report["why not host"] = "the host kernel needs " + reason
if keras.backend.backend() == "tensorflow" and optimizer._on_host:
    from keras_adamw.backends.tensorflow import update_op
    report["runs as"] = "the TensorFlow op" if update_op() else "tf.numpy_function"
if keras.backend.backend() == "jax" and optimizer._on_host:
    report["runs as"] = (
        "an XLA custom call in Keras's trainer; the ops path in other jitted steps "
        '(implementation="host" if yours donates the state)'
    )
print(json.dumps(report))
"""


def versions() -> dict[str, str]:
    found = {"keras_adamw": __version__}
    for name in DISTRIBUTIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def self_check(seconds: float = 2.0, elements: int = 1 << 24) -> dict[str, float]:
    """The kernel's speed, and the in-place loop's, alternated for `seconds`."""
    rng = np.random.default_rng(0)
    p, g = (rng.standard_normal(elements, dtype=np.float32) for _ in range(2))
    m, v = np.zeros_like(p), np.zeros_like(p)
    steps = itertools.count(1)
    runs: dict[str, Callable[[], object]] = {
        "kernel": lambda: host.adamw_update(p, g, m, v, step=next(steps), learning_rate=1e-9),
        "ceiling": lambda: _core.read_modify_write([p], [g], [m], [v]),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times["kernel"]) < 3:
        for name, run in runs.items():
            begin = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - begin)
    # The first of each faults the memory in.
    kernel_rate, ceiling_rate = (elements / np.median(t[1:]) / 1e9 for t in times.values())
    return {
        "elements": elements,
        "kernel_gparams_per_s": round(kernel_rate, 3),
        "ceiling_gparams_per_s": round(ceiling_rate, 3),
        "percent_of_ceiling": round(100 * kernel_rate / ceiling_rate, 1),
    }


def auto_paths() -> dict[str, dict[str, str]]:
    paths = {}
    for backend in BACKENDS:
        if importlib.util.find_spec(backend) is None:
            continue
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        try:
            probe = subprocess.run(
                [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300
            )
        except subprocess.TimeoutExpired:
            paths[backend] = {"error": "the probe did not finish in 300 s"}
            continue
        lines = probe.stdout.strip().splitlines()
        if probe.returncode == 0 and lines:
            paths[backend] = json.loads(lines[-1])
        else:
            last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
            paths[backend] = {"error": last}
    return paths


def report() -> dict[str, Any]:
    return {
        "versions": versions(),
        "simd_level": host.simd_level(),
        "supported_simd_levels": host.supported_simd_levels(),
        "threads": host.num_threads(),
        "self_check": self_check(),
        "auto": auto_paths(),
    }


def show(found: dict[str, Any]) -> None:
    versions = found["versions"]
    print(f"keras_adamw {versions['keras_adamw']}")
    print("  " + ", ".join(f"{k} {v}" for k, v in versions.items() if k != "keras_adamw"))
    supported = ", ".join(found["supported_simd_levels"])
    print(f"SIMD: {found['simd_level']} (supported here: {supported}); threads: {found['threads']}")
    check = found["self_check"]
    print(
        f"self-check ({check['elements'] / 2**20:.0f}M float32 elements): kernel "
        f"{check['kernel_gparams_per_s']} Gparam/s, in-place loop with its memory traffic "
        f"{check['ceiling_gparams_per_s']} Gparam/s: {check['percent_of_ceiling']} % of the ceiling"
    )
    print('implementation="auto" for a float32 variable on the default device:')
    for backend, path in found["auto"].items():
        details = "; ".join(f"{k} {v}" for k, v in path.items() if k != "path")
        print(
            f"  {backend:<11} {path.get('path', 'unknown')}" + (f" ({details})" if details else "")
        )
    if not found["auto"]:
        print("  no Keras backend installed (extras: tensorflow, jax, torch)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m keras_adamw", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the same as JSON")
    args = parser.parse_args(argv)
    found = report()
    if args.json:
        print(json.dumps(found, indent=2))
    else:
        show(found)


if __name__ == "__main__":
    main()
