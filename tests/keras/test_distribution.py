"""Training under keras.distribution (JAX) and tf.distribute (TF), each in a
fresh process with two simulated CPU devices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from keras_helpers import BACKEND, launch, run_processes, weight_arrays

HERE = Path(__file__).parent


def run(mode, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent)]))
    out = subprocess.run(
        [sys.executable, str(HERE / "distributed_fit.py"), mode],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


jax_only = pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs on JAX")
tf_only = pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute needs TensorFlow")


@jax_only
def test_data_parallel_matches_keras_adamw(tmp_path):
    report = run("jax-data", tmp_path)
    assert report["devices"] == 2
    assert report["difference"] <= 1e-6


@jax_only
def test_model_parallel_slots_inherit_the_sharding(tmp_path):
    report = run("jax-model", tmp_path)
    assert report["difference"] <= 1e-6
    assert report["slots"] == 3  # momentum, velocity, velocity_hat
    assert report["slot_shardings"] == [report["kernel_sharding"]]
    assert "model" in report["kernel_sharding"]


@jax_only
def test_shard_state_holds_one_nth_of_the_state_per_device_and_trains_the_same(tmp_path):
    """DataParallel over 4 devices: each slot split 4 ways. A 2 x 2 mesh whose
    model axis splits the hidden kernel: its slots split over both axes (4
    ways), the others over the batch axis (2 ways). The out layer's (1,) bias
    cannot be split: its slots stay whole."""
    report = run("jax-sharded", tmp_path)
    assert report["devices"] == 4
    assert report["difference"] <= 1e-6
    assert report["difference_from_unsharded"] <= 1e-6
    assert report["model_parallel_difference"] <= 1e-6

    def ways(mesh, path, size):
        if size == 1:
            return 1
        return 4 if mesh == "data_parallel" or "hidden_kernel" in path else 2

    for mesh in ["data_parallel", "model_parallel"]:
        slots = report[mesh]
        assert len(slots) == 3 * 6  # m, v and v̂ of six variables
        for path, (size, largest_shard) in slots.items():
            assert largest_shard == size // ways(mesh, path, size), (mesh, path)
    assert report["hidden_kernel_slot_specs"] == ["P('batch', 'model')"]


@jax_only
def test_the_host_kernel_runs_on_each_devices_shards_like_the_ops_path(tmp_path):
    """implementation="host" under DataParallel and ModelParallel: the kernel
    on each device's local shards (shard_map), each slice of shard_state's
    state on its device, within 1e-6 of the ops path; "auto" takes it."""
    report = run("jax-host", tmp_path)
    for name in ["data", "model"]:
        for shard_state in [False, True]:
            assert report[f"{name}, shard_state={shard_state}, on host"]
            assert report[f"{name}, shard_state={shard_state}"] <= 1e-6
    assert report["auto on host"]


@jax_only
def test_offloaded_state_is_each_devices_block_in_host_memory_and_trains_like_ops(tmp_path):
    """offload_state under DataParallel over 4 devices and a 2 x 2 mesh: each
    device's kernel call updates its own block of host memory, 1/4 of the
    hidden kernel's state with shard_state. Within 1e-6 of the ops path. A
    saved file resumes exactly, and loaded without a distribution holds the
    ops path's state (as far as the runs' rounding apart lets m and v agree:
    a block out of place would be off by its whole size)."""
    report = run("jax-offloaded", tmp_path)
    kernel = 8 * 16
    blocks = {  # (mesh, shard_state): the hidden kernel's momentum per device
        ("data", False): [kernel] * 4,  # replicated: a copy per device
        ("data", True): [kernel // 4] * 4,
        ("model", False): [kernel // 2] * 4,  # split by the model axis
        ("model", True): [kernel // 4] * 4,
    }
    for (name, shard_state), expected in blocks.items():
        key = f"{name}, shard_state={shard_state}"
        assert report[key] <= 1e-6, key
        assert report[f"{key}, blocks"] == expected, key
        assert report[f"{key}, resumed"] == 0.0, key
        assert report[f"{key}, reloaded"] <= 1e-4, key
    # With gradient accumulation; and 8-bit state, split 4 ways, saved and
    # loaded unchanged.
    assert report["accumulation"] <= 1e-6
    assert report["int8 blocks"] == [kernel // 4] * 4
    assert report["int8 reloaded"] == 0.0
    # A bfloat16 model's float32 masters: offloaded in blocks (shard_state), as
    # the ops path's; every master moved from its initial value.
    assert report["bfloat16, master blocks"] == [kernel // 4] * 4
    assert report["bfloat16, masters"] <= 1e-6
    assert report["bfloat16, masters moved"] > 1e-3


@jax_only
def test_sharded_state_loaded_before_build_resumes_training(tmp_path):
    """Weights loaded into a freshly compiled model under DataParallel (4
    devices), with shard_state on ops, in the host kernel and offloaded."""
    report = run("jax-unbuilt", tmp_path)
    for name in ("ops", "host", "offloaded"):
        assert report[f"{name}, built before loading"] is False
        assert report[f"{name}, iterations"] == 50
        assert report[name] <= 1e-6, (name, report[name])


@jax_only
def test_every_option_trains_alike_with_sharded_and_offloaded_state(tmp_path):
    """test_parity.py's options, 100 steps on 4 devices: shard_state on the
    ops path, and offloaded sharded state in the host kernel, each within
    1e-6 of the unsharded ops path."""
    report = run("jax-cases", tmp_path)
    assert len(report["cases"]) >= 11
    for name in report["cases"]:
        assert report[f"{name}, sharded"] <= 1e-6, name
        assert report[f"{name}, offloaded"] <= 1e-6, name


@tf_only
def test_mirrored_strategy_matches_keras_adamw(tmp_path):
    report = run("tf-mirrored", tmp_path)
    assert report["replicas"] == 2
    assert report["on_host"], '"auto" runs the op on each replica'
    assert report["difference"] <= 1e-6
    assert report["difference_from_ops"] <= 1e-6


@tf_only
def test_multi_worker_mirrored_strategy_on_localhost_matches_one_worker(tmp_path):
    """Two TF workers over gRPC on localhost, each on half of every batch:
    "auto" takes the ops path there, and ends where one worker on the whole
    batches does."""
    one, two = (run_processes("multi_worker_fit.py", n, tmp_path) for n in (1, 2))
    assert not bool(two["on_host"]), "the host path runs under MirroredStrategy only"
    pairs = zip(weight_arrays(one), weight_arrays(two), strict=True)
    assert max(np.abs(a - b).max() for a, b in pairs) <= 1e-6


@jax_only
@pytest.mark.parametrize("offload", [False, True], ids=["slot variables", "offloaded"])
def test_two_processes_with_sharded_state_train_and_save_as_one_process_of_four_devices(
    tmp_path, offload
):
    """keras.distribution across 2 processes of 2 CPU devices (gloo over
    localhost), shard_state on: the same weights as 1 process of 4 devices.
    Offloaded, each process holds its 2 devices' blocks of the state only."""
    checkpoint = str(tmp_path / "after-epoch-1")
    offloaded = {"OFFLOAD": "1"} if offload else {}
    one = run_processes("multi_process_fit.py", 1, tmp_path, **offloaded)
    two = run_processes("multi_process_fit.py", 2, tmp_path, SAVE_AS=checkpoint, **offloaded)
    assert int(one["devices"]) == int(two["devices"]) == 4
    quarter = 8 * 16 // 4  # the hidden kernel's slots, split 4 ways
    assert list(one["slot_shards"]) == [quarter] * 4
    assert list(two["slot_shards"]) == [quarter] * 2  # process 0's devices
    pairs = zip(weight_arrays(one), weight_arrays(two), strict=True)
    assert max(np.abs(a - b).max() for a, b in pairs) <= 1e-6
    # Saved by both processes after epoch 1 (the sharded slots gathered), loaded
    # by one process of 4 devices for epoch 2: it ends where the 2 processes did.
    resumed = run_processes(
        "multi_process_fit.py", 1, tmp_path, RESUME=checkpoint + ".0.keras", **offloaded
    )
    pairs = zip(weight_arrays(resumed), weight_arrays(two), strict=True)
    assert max(np.abs(a - b).max() for a, b in pairs) <= 1e-6


@jax_only
def test_a_coordinator_that_never_answers_is_an_error_in_bounded_time(tmp_path):
    """Process 1 of 2 alone: jax.distributed gives up after its
    initialization_timeout (5 s here) with an error, never a hang."""
    import time

    env = dict(
        os.environ,
        INIT_TIMEOUT="5",
        PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent)]),
    )
    command = [sys.executable, str(HERE / "multi_process_fit.py"), "1", "2", "1", "out.npz"]
    start = time.monotonic()
    out = subprocess.run(
        command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0
    assert time.monotonic() - start < 90
    assert "DEADLINE_EXCEEDED" in out.stderr or "timed out" in out.stderr.lower(), out.stderr[
        -2000:
    ]


@jax_only
def test_a_worker_that_dies_is_an_error_in_bounded_time(tmp_path):
    """Process 1 of 2 exits right after joining: process 0's first collective
    fails (gloo: the connection reset), and the distributed service ends it
    within its heartbeat timeout (5 s here), never a hang."""
    import time

    start = time.monotonic()
    results, _ = launch("multi_process_fit.py", 2, tmp_path, DIE_AT_START="1", HEARTBEAT="5")
    returncode, stderr = results[0]
    assert returncode != 0
    assert time.monotonic() - start < 120
    assert "Connection reset" in stderr or "heartbeat" in stderr, stderr[-2000:]
