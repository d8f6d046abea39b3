"""Trains under a distribution strategy; run by test_distribution.py in a fresh
process (device counts must be set before the backend starts).

    python distributed_fit.py MODE

MODE: jax-data, jax-model, jax-sharded, jax-host, jax-offloaded, jax-cases,
jax-unbuilt or tf-mirrored.

Prints one JSON line: the largest weight difference from keras.optimizers.AdamW
under the same strategy, and what the slots' placement was.
"""

import json
import os
import sys

mode = sys.argv[1]
if mode.startswith("jax"):
    four = ("jax-sharded", "jax-host", "jax-offloaded", "jax-cases", "jax-unbuilt")
    devices = 4 if mode in four else 2
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    os.environ["KERAS_BACKEND"] = "jax"
else:
    os.environ["KERAS_BACKEND"] = "tensorflow"

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras_helpers import fit, make_data, make_model, max_difference, weights  # noqa: E402

from keras_adamw import AdamW  # noqa: E402


def train(optimizer):
    model = make_model()
    model.compile(optimizer=optimizer, loss="mse")
    x, y = make_data(400)
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    return model


def compare(make_ours, make_theirs):
    ours, theirs = train(make_ours()), train(make_theirs())
    difference = max(
        np.abs(a - b).max() for a, b in zip(weights(ours), weights(theirs), strict=True)
    )
    return ours, float(difference)


kwargs = dict(learning_rate=3e-3, weight_decay=0.05, amsgrad=True)
report = {}
if mode == "jax-data":
    devices = keras.distribution.list_devices()
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    ours, report["difference"] = compare(
        lambda: AdamW(**kwargs), lambda: keras.optimizers.AdamW(**kwargs)
    )
    report["devices"] = len(devices)
elif mode == "jax-model":
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((1, 2), ["batch", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*hidden/kernel"] = (None, "model")  # keys are full-matched
    keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=layout_map))
    ours, report["difference"] = compare(
        lambda: AdamW(**kwargs), lambda: keras.optimizers.AdamW(**kwargs)
    )
    kernel = ours.get_layer("hidden").kernel
    slots = [v for v in ours.optimizer.variables if "hidden_kernel" in v.path]
    report["kernel_sharding"] = str(kernel.value.sharding.spec)
    report["slot_shardings"] = sorted({str(v.value.sharding.spec) for v in slots})
    report["slots"] = len(slots)
elif mode == "jax-sharded":
    # shard_state under DataParallel over 4 devices, then under a 2 x 2 mesh
    # whose model axis shards the hidden kernel.
    def slot_shards(model):
        """Per slot: its size and the largest shard any device holds."""
        slots = [v for v in model.optimizer.variables if v.path.split("_")[-1] in SLOT_NAMES]
        return {
            v.path: [int(np.prod(v.shape)), max(s.data.size for s in v.value.addressable_shards)]
            for v in slots
        }

    SLOT_NAMES = ("momentum", "velocity", "hat")
    devices = keras.distribution.list_devices()
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    sharded, report["difference"] = compare(
        lambda: AdamW(shard_state=True, **kwargs), lambda: keras.optimizers.AdamW(**kwargs)
    )
    _, report["difference_from_unsharded"] = compare(
        lambda: AdamW(shard_state=True, **kwargs), lambda: AdamW(**kwargs)
    )
    report["devices"] = len(devices)
    report["data_parallel"] = slot_shards(sharded)
    mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*hidden/kernel"] = (None, "model")
    keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=layout_map))
    sharded, report["model_parallel_difference"] = compare(
        lambda: AdamW(shard_state=True, **kwargs), lambda: keras.optimizers.AdamW(**kwargs)
    )
    report["model_parallel"] = slot_shards(sharded)
    slots = [v for v in sharded.optimizer.variables if "hidden_kernel" in v.path]
    report["hidden_kernel_slot_specs"] = sorted({str(v.value.sharding.spec) for v in slots})
elif mode == "jax-host":
    # The host kernel on each device's shards against the ops path: DataParallel
    # over 4 devices and a 2 x 2 mesh, each with and without shard_state.
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*hidden/kernel"] = (None, "model")
    distributions = {
        "data": keras.distribution.DataParallel(devices=devices),
        "model": keras.distribution.ModelParallel(layout_map=layout_map),
    }
    for name, distribution in distributions.items():
        keras.distribution.set_distribution(distribution)
        for shard_state in (False, True):
            host, difference = compare(
                lambda s=shard_state: AdamW(implementation="host", shard_state=s, **kwargs),
                lambda s=shard_state: AdamW(implementation="ops", shard_state=s, **kwargs),
            )
            report[f"{name}, shard_state={shard_state}"] = difference
            report[f"{name}, shard_state={shard_state}, on host"] = host.optimizer._on_host
    report["auto on host"] = AdamW()._resolve_implementation(host.trainable_variables)
elif mode == "jax-offloaded":
    # Offloaded state on each device's shards against the ops path, on the
    # meshes of jax-host. Per configuration: the elements of each device's
    # block of the hidden kernel's momentum; a .keras file of it resumed under
    # the same distribution against the run that goes on; and the state it
    # holds, loaded without a distribution, against the ops path's (relative
    # to each array's largest value).
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*hidden/kernel"] = (None, "model")
    distributions = {
        "data": keras.distribution.DataParallel(devices=devices),
        "model": keras.distribution.ModelParallel(layout_map=layout_map),
    }
    for name, distribution in distributions.items():
        keras.distribution.set_distribution(distribution)
        for shard_state in (False, True):
            offloaded = train(AdamW(offload_state=True, shard_state=shard_state, **kwargs))
            on_ops = train(AdamW(implementation="ops", shard_state=shard_state, **kwargs))
            key = f"{name}, shard_state={shard_state}"
            pairs = zip(weights(offloaded), weights(on_ops), strict=True)
            report[key] = max(float(np.abs(a - b).max()) for a, b in pairs)
            momentum = offloaded.optimizer._momentums[0]  # the hidden kernel's (8, 16)
            report[f"{key}, blocks"] = sorted(int(b.size) for b in momentum.blocks.values())
            path = f"{name}-{shard_state}.keras"
            offloaded.save(path)
            resumed = keras.saving.load_model(path)  # under the same distribution
            for model in (offloaded, resumed):
                model.fit(*make_data(64), batch_size=16, shuffle=False, verbose=0)
            pairs = zip(weights(offloaded), weights(resumed), strict=True)
            report[f"{key}, resumed"] = max(float(np.abs(a - b).max()) for a, b in pairs)
            keras.distribution.set_distribution(None)
            state = keras.saving.load_model(path).optimizer.get_weights()
            pairs = zip(state, on_ops.optimizer.get_weights(), strict=True)
            report[f"{key}, reloaded"] = max(
                float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)) for a, b in pairs
            )
            keras.distribution.set_distribution(distribution)
    # Gradient accumulation (the call under jax.lax.cond), and 8-bit state in
    # blocks of its own, loaded as it was saved (under the same distribution:
    # elsewhere its blocks of 256 would fall apart and it is quantised anew).
    keras.distribution.set_distribution(distributions["data"])
    accumulating = dict(gradient_accumulation_steps=2, shard_state=True, **kwargs)
    _, report["accumulation"] = compare(
        lambda: AdamW(offload_state=True, **accumulating),
        lambda: AdamW(implementation="ops", **accumulating),
    )
    eight_bit = train(AdamW(state_dtype="int8", shard_state=True, **kwargs))
    codes = eight_bit.optimizer._momentums[0].blocks.values()
    report["int8 blocks"] = sorted(int(block.codes.size) for block in codes)
    eight_bit.save("int8.keras")
    state = keras.saving.load_model("int8.keras").optimizer.get_weights()
    pairs = zip(state, eight_bit.optimizer.get_weights(), strict=True)
    report["int8 reloaded"] = max(float(np.abs(a - b).max()) for a, b in pairs)
    # A bfloat16 model: float32 masters offloaded in blocks beside the state.
    keras.distribution.set_distribution(distributions["data"])
    masters = {}
    for name, options in {"offloaded": dict(offload_state=True), "ops": {}}.items():
        model = make_model(dtype="bfloat16")
        model.compile(optimizer=AdamW(shard_state=True, **options, **kwargs), loss="mse")
        x, y = make_data(400)
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        masters[name] = [
            np.asarray(m if name == "ops" else m.to_array(), np.float32)
            for m in model.optimizer._masters
        ]
        if name == "offloaded":
            report["bfloat16, master blocks"] = sorted(
                int(b.size) for b in model.optimizer._masters[0].blocks.values()
            )
    pairs = zip(masters["offloaded"], masters["ops"], strict=True)
    report["bfloat16, masters"] = max(float(np.abs(a - b).max()) for a, b in pairs)
    initial = [np.asarray(w, np.float32) for w in make_model(dtype="bfloat16").get_weights()]
    pairs = zip(masters["offloaded"], initial, strict=True)
    report["bfloat16, masters moved"] = min(float(np.abs(a - b).max()) for a, b in pairs)
elif mode == "jax-unbuilt":
    # Sharded state saved mid-run, loaded into a freshly compiled model whose
    # optimizer is not built yet: build assigns it, and the run goes on as an
    # uninterrupted one.
    devices = keras.distribution.list_devices()
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    x, y = make_data(400)
    layouts = {
        "ops": dict(implementation="ops", shard_state=True),
        "host": dict(implementation="host", shard_state=True),
        "offloaded": dict(offload_state=True, shard_state=True),
    }
    for name, options in layouts.items():

        def compiled(seed, options=options):
            model = make_model(seed=seed)
            model.compile(optimizer=AdamW(**kwargs, **options), loss="mse")
            return model

        straight, first = compiled(0), compiled(0)
        straight.fit(x, y, batch_size=8, shuffle=False, verbose=0)
        first.fit(x[:200], y[:200], batch_size=8, shuffle=False, verbose=0)
        first.save_weights(f"{name}.weights.h5")
        resumed = compiled(1)  # other initial weights: the file must set them all
        report[f"{name}, built before loading"] = resumed.optimizer.built
        resumed.load_weights(f"{name}.weights.h5")
        resumed.fit(x[200:], y[200:], batch_size=8, shuffle=False, verbose=0)
        report[f"{name}, iterations"] = int(
            keras.ops.convert_to_numpy(resumed.optimizer.iterations)
        )
        report[name] = float(max_difference(resumed, straight))
elif mode == "jax-cases":
    # Every option of test_parity.py, 100 steps under DataParallel over 4
    # devices: shard_state on the ops path, and offloaded with shard_state
    # (the host kernel on each device's block), against the unsharded ops path.
    from test_parity import CASES

    devices = keras.distribution.list_devices()
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    report["cases"] = list(CASES)
    for name, options in CASES.items():
        unsharded = fit(AdamW(implementation="ops", **options))
        sharded = fit(AdamW(implementation="ops", shard_state=True, **options))
        offloaded = fit(AdamW(offload_state=True, shard_state=True, **options))
        report[f"{name}, sharded"] = float(max_difference(sharded, unsharded))
        report[f"{name}, offloaded"] = float(max_difference(offloaded, unsharded))
elif mode == "tf-mirrored":
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

    with strategy.scope():
        ours, report["difference"] = compare(
            lambda: AdamW(**kwargs), lambda: keras.optimizers.AdamW(**kwargs)
        )
        _, report["difference_from_ops"] = compare(
            lambda: AdamW(**kwargs), lambda: AdamW(implementation="ops", **kwargs)
        )
    report["on_host"] = ours.optimizer._on_host
    report["replicas"] = strategy.num_replicas_in_sync
print(json.dumps(report))
