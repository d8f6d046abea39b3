"""Trains under keras.distribution.DataParallel with shard_state=True across
processes (JAX, gloo collectives over localhost); run by test_distribution.py.

    python multi_process_fit.py PROCESS PROCESSES PORT,... OUT.npz

PROCESSES processes with 4 / PROCESSES simulated CPU devices each, so 4
devices in all; each process feeds its share of every global batch of 16.
With PROCESSES 1 it is the single-process run on 4 devices. Process 0 saves
the final weights. The coordinator is waited for at most INIT_TIMEOUT
seconds, and a silent peer declared dead after HEARTBEAT seconds
(environment; 60 and 100 by default). With DIE_AT_START set, process 1 exits
right after joining, as a worker that dies. Training is two `fit` epochs;
with SAVE_AS set, every process saves the model after the first, to
SAVE_AS.<process>.keras, and with RESUME set a run starts from that file and
trains the second epoch only. With OFFLOAD set, the state is offloaded:
host memory of each process, holding its own devices' blocks.
"""

import os
import sys

process, processes, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[4]
port = sys.argv[3].split(",")[0]  # the coordinator's
os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 // processes}"

import jax  # noqa: E402

if processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=processes,
        process_id=process,
        initialization_timeout=int(os.environ.get("INIT_TIMEOUT", "60")),
        heartbeat_timeout_seconds=int(os.environ.get("HEARTBEAT", "100")),
    )
    if process == 1 and os.environ.get("DIE_AT_START"):
        os._exit(0)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras_helpers import make_data, make_model, weights  # noqa: E402

from keras_adamw import AdamW  # noqa: E402

GLOBAL_BATCH, STEPS = 16, 25
distribution = keras.distribution.DataParallel(devices=keras.distribution.list_devices())
distribution.auto_shard_dataset = False  # each process passes its own share
keras.distribution.set_distribution(distribution)
keras.utils.set_random_seed(0)
if os.environ.get("RESUME"):
    model = keras.saving.load_model(os.environ["RESUME"])
else:
    model = make_model()
    optimizer = AdamW(
        learning_rate=3e-3,
        weight_decay=0.05,
        amsgrad=True,
        shard_state=True,
        offload_state=bool(os.environ.get("OFFLOAD")),
    )
    model.compile(optimizer=optimizer, loss="mse")
optimizer = model.optimizer
x, y = make_data(GLOBAL_BATCH * STEPS)
share = GLOBAL_BATCH // processes


def mine(data):
    """This process's share of every global batch."""
    batches = data.reshape(STEPS, GLOBAL_BATCH, -1)
    return batches[:, process * share : (process + 1) * share].reshape(-1, data.shape[1])


for epoch in (2,) if os.environ.get("RESUME") else (1, 2):
    model.fit(mine(x), mine(y), batch_size=share, epochs=1, shuffle=False, verbose=0)
    if epoch == 1 and os.environ.get("SAVE_AS"):
        model.save(f"{os.environ['SAVE_AS']}.{process}.keras")  # a collective: every process
if optimizer.offload_state:  # the hidden kernel's momentum: host blocks of this process's devices
    shards = [block.size for block in optimizer._momentums[0].blocks.values()]
else:
    slot = next(v for v in optimizer.variables if v.path.endswith("hidden_kernel_momentum"))
    shards = [shard.data.size for shard in slot.value.addressable_shards]
if process == 0:
    np.savez(out, *weights(model), devices=len(jax.devices()), slot_shards=shards)
