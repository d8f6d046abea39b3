"""Trains a small Keras model with keras_adamw.AdamW under torch's
DistributedDataParallel; run by test_torch_ddp.py, one process per rank.

    python ddp_train.py RANK WORLD PORT,... OUT.npz

Each rank trains on its slice of every batch; DDP averages the gradients, and
the optimizer applies them in place (the host kernel, on CPU). Rank 0 saves
the final weights. With WORLD 1 it is the single-process run.
"""

import os
import sys

os.environ["KERAS_BACKEND"] = "torch"

import keras
import numpy as np
import torch
import torch.distributed as dist
from keras_helpers import make_data, make_model, weights

from keras_adamw import AdamW

STEPS, BATCH = 30, 16


def train(model, optimizer, batches, forward):
    optimizer.build(model.trainable_variables)
    for x, y in batches:
        loss = torch.mean((forward(torch.from_numpy(x)) - torch.from_numpy(y)) ** 2)
        model.zero_grad()
        loss.backward()  # DDP averages the gradients across ranks here
        grads = [v.value.grad for v in model.trainable_variables]
        optimizer.apply(grads, model.trainable_variables)


def batches(rank, world):
    """This rank's equal slice of each step's batch."""
    x, y = make_data(STEPS * BATCH)
    share = BATCH // world
    for step in range(STEPS):
        start = step * BATCH + rank * share
        yield x[start : start + share], y[start : start + share]


OPTIONS = dict(learning_rate=3e-3, weight_decay=0.05, amsgrad=True)

if __name__ == "__main__":
    rank, world, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[4]
    port = sys.argv[3].split(",")[0]
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    keras.utils.set_random_seed(0)
    model = make_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = AdamW(**OPTIONS)
    train(model, optimizer, batches(rank, world), ddp)
    if rank == 0:
        np.savez(out, *weights(model), on_host=optimizer._on_host)
    dist.destroy_process_group()
