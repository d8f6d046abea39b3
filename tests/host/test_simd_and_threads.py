"""Every SIMD level the CPU has, every thread count, every split: bitwise equal."""

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from keras_adamw import host


@pytest.fixture
def restore_settings():
    level, threads = host.simd_level(), host.num_threads()
    yield
    host.set_simd_level(level)
    host.set_num_threads(threads)


def state(n, seed=0):
    rng = np.random.default_rng(seed)
    p, m = (rng.standard_normal(n).astype(np.float32) for _ in range(2))
    g = (rng.standard_normal(n) * 0.1).astype(np.float32)
    v = (rng.random(n) * 1e-3).astype(np.float32)
    return [p, g, m, v, v * 2]


def split(arrays, cuts):
    return [np.split(a, cuts) for a in arrays]


def run(arrays, cuts=(), **hyper):
    p, g, m, v, vmax = split(arrays, list(cuts))
    host.adamw_update(p, g, m, v, amsgrad_max=vmax, step=5, learning_rate=1e-2, **hyper)


def test_scalar_is_always_supported_and_the_widest_is_the_default():
    levels = host.supported_simd_levels()
    assert levels[0] == "scalar"
    assert set(levels) <= {"scalar", "neon", "avx2", "avx512", "avx512bf16"}


@pytest.mark.parametrize("hyper", [{}, dict(epsilon_mode="torch", maximize=True, grad_scale=3.0)])
def test_every_level_threads_and_split_is_bitwise_equal(restore_settings, hyper):
    n = 300_007  # odd, so every level has a tail, and large enough to run in parallel
    host.set_simd_level("scalar")
    host.set_num_threads(1)
    expected = state(n)
    run(expected, **hyper)
    cuts = [1, 2, 17, 1000, 65_536, 200_001]
    for level in host.supported_simd_levels():
        host.set_simd_level(level)
        assert host.simd_level() == level
        for threads in (1, 2, 3):
            host.set_num_threads(threads)
            for c in ([], cuts, range(997, n, 997)):
                arrays = state(n)
                run(arrays, c, **hyper)
                for a, b in zip(arrays, expected, strict=True):
                    assert a.tobytes() == b.tobytes(), (level, threads, len(c))


def test_a_level_the_cpu_lacks_is_refused(restore_settings):
    missing = {"scalar", "neon", "avx2", "avx512", "avx512bf16"} - set(host.supported_simd_levels())
    for level in [*missing, "sse9"]:
        with pytest.raises(ValueError, match="level must be one this CPU supports"):
            host.set_simd_level(level)
    with pytest.raises(ValueError, match="n must be >= 1"):
        host.set_num_threads(0)


def test_the_environment_variables_set_level_and_threads(tmp_path):
    # Run outside the checkout, so the installed package is imported, not the source tree.
    code = "from keras_adamw import host; print(host.simd_level(), host.num_threads())"
    env = dict(os.environ, KERAS_ADAMW_SIMD="scalar", KERAS_ADAMW_NUM_THREADS="3")
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert out.stdout.split() == ["scalar", "3"]
    env["KERAS_ADAMW_SIMD"] = "sse9"
    code = "import numpy as np; from keras_adamw import host; host.simd_level()"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 1 and "KERAS_ADAMW_SIMD must be one this CPU supports" in out.stderr


def test_the_gil_is_released_while_the_kernel_runs(restore_settings):
    host.set_num_threads(1)
    p, g, m, v, _ = state(8_000_000)
    host.set_simd_level("scalar")  # the slow level: a long window to observe
    done = threading.Event()
    ticks = 0

    def update():
        host.adamw_update(p, g, m, v, step=1, learning_rate=1e-3)
        done.set()

    worker = threading.Thread(target=update)
    started = time.perf_counter()
    worker.start()
    while not done.is_set():
        ticks += 1  # pure Python: runs only while the worker does not hold the GIL
    worker.join()
    elapsed = time.perf_counter() - started
    assert elapsed > 0.02, "the update was too quick to observe"
    assert ticks > 10_000, ticks


def test_the_host_module_does_not_import_keras(tmp_path):
    code = (
        "import sys\n"
        "import numpy as np, keras_adamw\n"
        "from keras_adamw import host\n"
        "p = np.ones(4, np.float32)\n"
        "host.adamw_update(p, p * 0.5, np.zeros(4, np.float32), np.zeros(4, np.float32),"
        " step=1, learning_rate=0.1)\n"
        "print('keras' in sys.modules, float(p[0]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    keras_imported, updated = out.stdout.split()
    # Adam's first step moves by lr (up to ε); the decay took lr·wd·p before it.
    assert keras_imported == "False" and abs(float(updated) - (1 - 0.1 * 0.004 - 0.1)) < 1e-6
