"""keras_adamw.AdamW in a torch DistributedDataParallel loop: 2 processes on
gloo over localhost train as 1 process on the whole batches does."""

import numpy as np
import pytest
from keras_helpers import BACKEND, run_processes, weight_arrays


@pytest.mark.skipif(BACKEND != "torch", reason="torch.distributed")
def test_two_ddp_processes_train_as_one_process_on_the_whole_batches(tmp_path):
    one, two = (run_processes("ddp_train.py", n, tmp_path) for n in (1, 2))
    assert bool(two["on_host"]), '"auto" runs the host kernel in each rank'
    pairs = zip(weight_arrays(one), weight_arrays(two), strict=True)
    assert max(np.abs(a - b).max() for a, b in pairs) <= 1e-6
