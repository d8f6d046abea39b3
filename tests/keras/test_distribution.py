"""Training under keras.distribution (JAX) and tf.distribute (TF), each in a
fresh process with two simulated CPU devices."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from keras_helpers import BACKEND

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


@tf_only
def test_mirrored_strategy_matches_keras_adamw(tmp_path):
    report = run("tf-mirrored", tmp_path)
    assert report["replicas"] == 2
    assert report["on_host"], '"auto" runs the op on each replica'
    assert report["difference"] <= 1e-6
    assert report["difference_from_ops"] <= 1e-6


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def multi_worker(workers, tmp_path):
    """multi_worker_fit.py in `workers` processes; worker 0's weights."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent)]))
    ports = ",".join(free_port() for _ in range(workers))
    out = tmp_path / f"workers{workers}.npz"
    processes = [
        subprocess.Popen(
            [sys.executable, str(HERE / "multi_worker_fit.py"), str(i), ports, str(out)],
            env=env,
            cwd=tmp_path,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(workers)
    ]
    try:
        errors = [process.communicate(timeout=300)[1] for process in processes]
    finally:
        for process in processes:  # never leave a worker waiting on a dead peer
            if process.poll() is None:
                process.kill()
    for process, stderr in zip(processes, errors, strict=True):
        assert process.returncode == 0, stderr[-3000:]
    return np.load(out)


@tf_only
def test_multi_worker_mirrored_strategy_on_localhost_matches_one_worker(tmp_path):
    """Two TF workers over gRPC on localhost, each on half of every batch:
    "auto" takes the ops path there, and ends where one worker on the whole
    batches does."""
    one, two = multi_worker(1, tmp_path), multi_worker(2, tmp_path)
    assert not bool(two["on_host"]), "the host path runs under MirroredStrategy only"
    names = [name for name in one.files if name.startswith("arr_")]
    assert max(np.abs(one[n] - two[n]).max() for n in names) <= 1e-6
