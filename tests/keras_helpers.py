"""Helpers for the Keras tests; the backend is whatever KERAS_BACKEND names."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

BACKEND = keras.backend.backend()


def make_model(seed=0, dtype=None):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu", name="hidden", dtype=dtype),
            keras.layers.LayerNormalization(name="norm", dtype=dtype),
            keras.layers.Dense(1, name="out", dtype=dtype),
        ]
    )


def make_data(n=800, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8)).astype("float32")
    y = (x[:, :1] * 0.5 - x[:, 1:2] + 0.1 * rng.standard_normal((n, 1))).astype("float32")
    return x, y


def weights(model):
    return [np.asarray(keras.ops.convert_to_numpy(w), dtype=np.float64) for w in model.weights]


def fit(optimizer, steps=100, batch_size=8, model=None, **compile_kwargs):
    """`steps` steps of `fit` on a small model; returns the model."""
    model = model or make_model()
    model.compile(optimizer=optimizer, loss="mse", **compile_kwargs)
    x, y = make_data(steps * batch_size)
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    return model


def max_difference(a, b):
    return max(np.abs(x - y).max() for x, y in zip(weights(a), weights(b), strict=True))


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def launch(script, count, tmp_path, **environment):
    """Runs tests/keras/`script` in `count` processes, each given its index,
    `count`, `count` free ports on 127.0.0.1 (comma-separated) and an output
    file (process 0 writes it), with `environment` added. Returns each
    process's (return code, stderr) and the output file. A process that
    outlives 300 s fails the test; none is left waiting on a dead peer."""
    here = Path(__file__).parent / "keras"
    ports = [free_port() for _ in range(count)]
    pythonpath = os.pathsep.join([str(here), str(here.parent)])
    env = dict(os.environ, PYTHONPATH=pythonpath, **environment)
    out = tmp_path / f"{Path(script).stem}-{count}.npz"
    arguments = [str(count), ",".join(ports), str(out)]
    started = [
        subprocess.Popen(
            [sys.executable, str(here / script), str(i), *arguments],
            env=env,
            cwd=tmp_path,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(count)
    ]
    try:
        errors = [process.communicate(timeout=300)[1] for process in started]
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
    return [(p.returncode, e) for p, e in zip(started, errors, strict=True)], out


def run_processes(script, count, tmp_path, **environment):
    """`launch`, every process succeeding; the output file's arrays."""
    results, out = launch(script, count, tmp_path, **environment)
    for returncode, stderr in results:
        assert returncode == 0, stderr[-3000:]
    return np.load(out)


def weight_arrays(saved):
    """The weights a process saved with np.savez(out, *weights, ...)."""
    return [saved[name] for name in saved.files if name.startswith("arr_")]
