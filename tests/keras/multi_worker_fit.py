"""Trains under tf.distribute.MultiWorkerMirroredStrategy, one process per
worker on localhost; run by test_distribution.py.

    python multi_worker_fit.py INDEX WORKERS PORT,PORT,... OUT.npz

A custom loop (`strategy.run` of a GradientTape step; Keras 3.15's `fit` under
this strategy fails in its symbolic build, `keras.optimizers.AdamW` alike):
each worker takes its half of every global batch, and the optimizer sums the
gradients across workers. Worker 0 saves the final weights. With one worker it
trains alone, without a strategy.
"""

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "tensorflow"
index, ports, out = int(sys.argv[1]), sys.argv[3].split(","), sys.argv[4]
if len(ports) > 1:
    cluster = {"worker": [f"localhost:{port}" for port in ports]}
    task = {"type": "worker", "index": index}
    os.environ["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": task})

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras_helpers import make_data, make_model, weights  # noqa: E402

from keras_adamw import AdamW  # noqa: E402

# Before any op runs: collectives are configured when TF's context starts.
strategy = tf.distribute.MultiWorkerMirroredStrategy() if len(ports) > 1 else None
GLOBAL_BATCH = 16
x, y = make_data(320)
dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
options = tf.data.Options()
options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
dataset = dataset.with_options(options)


def train(run=lambda step, args: step(*args), distribute=lambda data: data):
    keras.utils.set_random_seed(0)
    model = make_model()
    optimizer = AdamW(learning_rate=3e-3, weight_decay=0.05)

    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(model(x) - y)) / GLOBAL_BATCH
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))

    compiled = tf.function(lambda x, y: run(step, (x, y)))
    for _ in range(2):
        for batch in distribute(dataset):
            compiled(*batch)
    return model, optimizer


if strategy is not None:
    with strategy.scope():
        model, optimizer = train(strategy.run, strategy.experimental_distribute_dataset)
else:
    model, optimizer = train()
if index == 0:
    np.savez(out, *weights(model), on_host=optimizer._on_host)
