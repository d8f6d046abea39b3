"""Threads, fork and failed thread starts: never a race, a hang or a panic."""

import multiprocessing
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from keras_adamw import host

N = 1_000_000  # several chunks: the parallel path, and calls long enough to overlap


def arrays(n=N, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(np.float32)
    g = (rng.standard_normal(n) * 0.1).astype(np.float32)
    return p, g, np.zeros(n, np.float32), np.zeros(n, np.float32)


def steps(p, g, m, v, count):
    for _ in range(count):
        host.adamw_update(p, g, m, v, step=1, learning_rate=1e-2)


def run_in_threads(*targets):
    barrier = threading.Barrier(len(targets))

    def start(target):
        barrier.wait()
        target()

    threads = [threading.Thread(target=start, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "an update hung"


def test_threads_updating_the_same_arrays_take_turns():
    """Two threads, five identical steps each, on one set of arrays: every
    serial order gives the same ten steps, so any interleaving shows."""
    expected = arrays()
    steps(*expected, 10)
    shared = arrays()
    run_in_threads(lambda: steps(*shared, 5), lambda: steps(*shared, 5))
    for got, want in zip(shared, expected, strict=True):
        assert np.array_equal(got, want)


def test_overlapping_views_from_two_threads_take_turns():
    """One thread updates the first 60 % of a buffer, another the last 60 %."""
    p, g, m, v = arrays()
    cut_a, cut_b = int(N * 0.6), int(N * 0.4)
    first = [x[:cut_a] for x in (p, g, m, v)]
    second = [x[cut_b:] for x in (p, g, m, v)]
    run_in_threads(lambda: steps(*first, 3), lambda: steps(*second, 3))
    # Outside the overlap each part had three steps; inside it, six, in some order.
    expected = arrays()
    steps(*[x[:cut_b] for x in expected], 3)
    steps(*[x[cut_b:cut_a] for x in expected], 6)
    steps(*[x[cut_a:] for x in expected], 3)
    for got, want in zip((p, m, v), (expected[0], expected[2], expected[3]), strict=True):
        assert np.array_equal(got, want)


def test_threads_on_disjoint_arrays_sharing_a_gradient_are_correct():
    a, b = arrays(seed=1), arrays(seed=1)
    shared_grad = a[1]
    b = (b[0], shared_grad, b[2], b[3])  # the gradient is only read: both may use it at once
    run_in_threads(lambda: steps(*a, 4), lambda: steps(*b, 4))
    expected = arrays(seed=1)
    steps(*expected, 4)
    for x in (a, b):
        assert all(np.array_equal(got, want) for got, want in zip(x, expected, strict=True))


def _child_step(queue):
    p, g, m, v = arrays()
    steps(p, g, m, v, 1)
    queue.put(p[:1000].tobytes())


def test_a_forked_child_runs_large_updates(tmp_path):
    """The parent's thread pool has no threads in a forked child: the child starts its own."""
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    p, g, m, v = arrays()
    steps(p, g, m, v, 1)  # the parent's pool is running now
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_step, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the update in the forked child hung")
    assert child.exitcode == 0
    assert queue.get(timeout=5) == p[:1000].tobytes()


def test_when_threads_cannot_start_the_caller_runs_the_step(tmp_path):
    """Under an address-space limit no thread stack fits: steps still run, on the
    calling thread, and set_num_threads says why it cannot."""
    code = """
import resource, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from reference import ReferenceAdamW
from keras_adamw import host

n = 300_000
rng = np.random.default_rng(0)
p = rng.standard_normal(n).astype(np.float32)
g = (rng.standard_normal(n) * 0.1).astype(np.float32)
m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
reference = ReferenceAdamW([p.copy()], learning_rate=1e-2)
with open("/proc/self/status") as status:
    vm_kib = next(int(line.split()[1]) for line in status if line.startswith("VmSize"))
limit = (vm_kib + 1024) * 1024  # 1 MiB more: no room for a thread's stack
resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
host.adamw_update(p, g, m, v, step=1, learning_rate=1e-2)
try:
    host.set_num_threads(4)
except ValueError as error:
    print("refused:", error)
resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
reference.step([g])
print("max error:", float(np.abs(p - reference.params[0]).max()))
"""
    tests = os.path.dirname(os.path.dirname(__file__))
    out = subprocess.run(
        [sys.executable, "-c", code, tests],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=dict(os.environ, KERAS_ADAMW_NUM_THREADS="2"),
    )
    assert out.returncode == 0, out.stderr
    assert "refused: n = 4: the threads could not start" in out.stdout, out.stdout
    error = float(out.stdout.split("max error:")[1])
    assert error < 1e-6
