"""keras_adamw.AdamW in a torch DistributedDataParallel loop: 2 processes on
gloo over localhost train as 1 process on the whole batches does."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from keras_helpers import BACKEND

HERE = Path(__file__).parent


def train(world, tmp_path):
    """Runs ddp_train.py in `world` processes; returns rank 0's weights."""
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent)]))
    out = tmp_path / f"world{world}.npz"
    command = [sys.executable, str(HERE / "ddp_train.py")]
    workers = [
        subprocess.Popen(
            [*command, str(rank), str(world), port, str(out)],
            env=env,
            cwd=tmp_path,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]
    try:
        errors = [worker.communicate(timeout=300)[1] for worker in workers]
    finally:
        for worker in workers:  # never leave a rank waiting on a dead peer
            if worker.poll() is None:
                worker.kill()
    for worker, stderr in zip(workers, errors, strict=True):
        assert worker.returncode == 0, stderr[-3000:]
    return np.load(out)


@pytest.mark.skipif(BACKEND != "torch", reason="torch.distributed")
def test_two_ddp_processes_train_as_one_process_on_the_whole_batches(tmp_path):
    one, two = train(1, tmp_path), train(2, tmp_path)
    assert bool(two["on_host"]), '"auto" runs the host kernel in each rank'
    names = [name for name in one.files if name.startswith("arr_")]
    assert max(np.abs(one[n] - two[n]).max() for n in names) <= 1e-6
