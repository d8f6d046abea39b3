"""Optimizer state per device, replicated against `shard_state=True`, under
keras.distribution.DataParallel on N simulated CPU devices (JAX).

    python benchmarks/sharded_state.py                  # N = 1, 2, 4
    python benchmarks/sharded_state.py --devices 4 --steps 20

Per N, in a fresh process (the device count is fixed when JAX starts): the
bytes of m, v the most loaded device holds, and the median time of a `fit`
step of an MLP, for keras.optimizers.AdamW and ours (on keras.ops, in the
host kernel on each device's shards, and with the state offloaded: each
device's block in host memory), replicated and sharded, the steps
interleaved. The simulated devices share this machine's cores, so
the times say what sharding costs in XLA's collectives, not what N real
devices would gain.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _charts import cpu_name

# Ours on keras.ops, in the host kernel (run on each device's shards), offloaded.
CONTENDERS = {
    "ops": {"implementation": "ops"},
    "host": {"implementation": "host"},
    "offloaded": {"offload_state": True},
}


def measure(devices: int, width: int, steps: int) -> dict:
    import keras
    import numpy as np

    from keras_adamw import AdamW

    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=keras.distribution.list_devices())
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64 * steps, width)).astype("float32")
    y = rng.standard_normal((64 * steps, 1)).astype("float32")
    contenders = {"keras.optimizers.AdamW": lambda: keras.optimizers.AdamW()}
    for label, options in CONTENDERS.items():
        contenders[f"ours {label}, replicated"] = lambda o=options: AdamW(**o)
        contenders[f"ours {label}, shard_state"] = lambda o=options: AdamW(**o, shard_state=True)
    models = {}
    for name, make in contenders.items():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((width,)),
                keras.layers.Dense(width, activation="relu"),
                keras.layers.Dense(width, activation="relu"),
                keras.layers.Dense(1),
            ]
        )
        model.compile(optimizer=make(), loss="mse")
        model.train_on_batch(x[:64], y[:64])  # build and compile
        models[name] = model
    times = {name: [] for name in models}
    for i in range(steps):
        batch = slice(64 * i, 64 * (i + 1))
        for name, model in models.items():
            start = time.perf_counter()
            model.train_on_batch(x[batch], y[batch])
            times[name].append(time.perf_counter() - start)
    report = {"devices": devices, "params": int(models["ours ops, replicated"].count_params())}
    for name, model in models.items():
        report[name] = {
            "state_bytes_per_device": max(state_bytes_per_device(model.optimizer).values()),
            "step_ms": statistics.median(times[name][2:]) * 1e3,
        }
    return report


def state_bytes_per_device(optimizer) -> dict[str, int]:
    """The bytes of m and v each device holds: its shards of the slot
    variables, or its blocks of offloaded state in host memory."""
    from keras_adamw.sharding import HostShards

    per_device: dict[str, int] = {}

    def add(device, nbytes):
        per_device[str(device)] = per_device.get(str(device), 0) + nbytes

    if getattr(optimizer, "offload_state", False):
        for slot in optimizer._momentums + optimizer._velocities:
            if isinstance(slot, HostShards):
                for device, block in slot.blocks.items():
                    add(device, block.nbytes)
            else:
                add("host", slot.nbytes)
        return per_device
    for variable in optimizer.variables:
        if variable.path.split("_")[-1] in ("momentum", "velocity"):
            for shard in variable.value.addressable_shards:
                add(shard.device, shard.data.nbytes)
    return per_device


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", default="1,2,4")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.width, args.steps)))
        return

    print(f"CPU: {cpu_name()}")
    reports = []
    for devices in map(int, args.devices.split(",")):
        env = dict(
            os.environ,
            KERAS_BACKEND="jax",
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        )
        command = [sys.executable, __file__, "--child", str(devices), *sys.argv[1:]]
        out = subprocess.run(command, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"N = {devices} failed:\n{out.stderr[-2000:]}")
            continue
        reports.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if not reports:
        return
    replicated = reports[0]["ours ops, replicated"]["state_bytes_per_device"]
    print(f"MLP of {reports[0]['params'] / 1e6:.1f}M parameters; m and v on the fullest device:")
    print(f"{'N':>3}  {'optimizer':<28} {'state MB':>9} {'x replicated':>13} {'step ms':>8}")
    for report in reports:
        for name in report:
            if name in ("devices", "params"):
                continue
            row = report[name]
            state = row["state_bytes_per_device"]
            print(
                f"{report['devices']:>3}  {name:<28} {state / 1e6:9.2f} {state / replicated:13.3f}"
                f" {row['step_ms']:8.2f}"
            )


if __name__ == "__main__":
    main()
