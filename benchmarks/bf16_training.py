"""A Keras model under a "bfloat16" dtype policy, trained by each optimizer a
user could pick; the loss curves and the optimizer's memory side by side.

    KERAS_BACKEND=jax python benchmarks/bf16_training.py --plot bf16_jax.png
    KERAS_BACKEND=torch python benchmarks/bf16_training.py --steps 3000

The model is a character-level language model (an embedding of the last 16
characters, a tanh layer of 512, logits over the bytes; the loss in float32),
trained on the Python standard library's own source, which ships with every
Python (no download). Every run starts from the same weights (the float32
run's, rounded to bfloat16 for the others), sees the same batches, and has
the same schedule (warmup, cosine decay) and weight decay:

- float32 model, keras.optimizers.AdamW: the reference;
- float32 model, ours: the same optimizer, our arithmetic (the host kernel
  where "auto" picks it): how far two float32 runs drift apart;
- mixed_bfloat16 model, keras.optimizers.AdamW: Keras's mixed precision,
  float32 variables and bf16 compute (what Keras users pick today);
- bf16 model, keras.optimizers.AdamW: bf16 m and v, bf16 arithmetic, each
  step added to the bf16 weight;
- bf16 model, ours: float32 master weights (the default), float32 state;
- bf16 model, ours + bf16 state: masters, m and v in bfloat16;
- bf16 model, ours + int8 state: masters, m and v 8-bit block-wise (the host
  kernel's, in host memory);
- bf16 model, ours, stochastic: no masters, bf16 state, stochastic rounding;
- bf16 model, ours, nearest: no masters, float32 state, rounded to nearest;
- float32 model, ours + bf16 state.

The final loss is the mean training loss over the last tenth of the steps;
the bytes per parameter are counted from the model's and the optimizer's
variables (the iteration and other scalars left out).
"""

from __future__ import annotations

import argparse
import os
import time

import keras
import ml_dtypes
import numpy as np
from _charts import cpu_name
from dtype_accuracy import CONTEXT, EMBED, HIDDEN, VOCAB, stdlib_text, training_arguments

from keras_adamw import AdamW, host

CONFIGS = {
    "float32 model, keras AdamW": ("float32", lambda kw: keras.optimizers.AdamW(**kw)),
    "float32 model, ours": ("float32", lambda kw: AdamW(**kw)),
    "mixed_bfloat16 model, keras AdamW": (
        "mixed_bfloat16",
        lambda kw: keras.optimizers.AdamW(**kw),
    ),
    "bf16 model, keras AdamW": ("bfloat16", lambda kw: keras.optimizers.AdamW(**kw)),
    "bf16 model, ours (masters)": ("bfloat16", lambda kw: AdamW(**kw)),
    "bf16 model, ours + bf16 state": ("bfloat16", lambda kw: AdamW(state_dtype="bfloat16", **kw)),
    "bf16 model, ours + int8 state": ("bfloat16", lambda kw: AdamW(state_dtype="int8", **kw)),
    "bf16 model, ours, stochastic": (
        "bfloat16",
        lambda kw: AdamW(
            master_weights=False, state_dtype="bfloat16", stochastic_rounding=True, **kw
        ),
    ),
    "bf16 model, ours, nearest": ("bfloat16", lambda kw: AdamW(master_weights=False, **kw)),
    "float32 model, ours + bf16 state": (
        "float32",
        lambda kw: AdamW(state_dtype="bfloat16", **kw),
    ),
}


def make_model(dtype: str) -> keras.Model:
    inputs = keras.Input((CONTEXT,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, EMBED, dtype=dtype)(inputs)
    x = keras.layers.Flatten(dtype=dtype)(x)
    x = keras.layers.Dense(HIDDEN, activation="tanh", dtype=dtype)(x)
    x = keras.layers.Dense(VOCAB, dtype=dtype)(x)
    logits = keras.layers.Activation("linear", dtype="float32")(x)  # the loss in float32
    return keras.Model(inputs, logits)


def optimizer_arrays(optimizer: keras.optimizers.Optimizer) -> list:
    """The optimizer's variables, and the state (and masters) ours keeps in
    host memory instead (8-bit state: its codes and block scales)."""
    arrays = list(optimizer.variables)
    slot_lists = getattr(optimizer, "_slot_lists", list)()
    for slots in [*slot_lists, getattr(optimizer, "_masters", [])]:
        for slot in slots:
            if isinstance(slot, host.QuantizedState):
                arrays += [slot.codes, slot.scales]
            elif isinstance(slot, np.ndarray):
                arrays.append(slot)
    return arrays


def bytes_per_parameter(arrays: list, model: keras.Model) -> float:
    parameters = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    stored = 0
    for variable in arrays:
        if len(variable.shape) == 0 or "seed" in getattr(variable, "path", ""):
            continue
        dtype = str(variable.dtype)
        itemsize = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype).itemsize
        stored += int(np.prod(variable.shape)) * itemsize
    return stored / parameters


def train(name: str, data: tuple[np.ndarray, np.ndarray], args: argparse.Namespace):
    dtype, make_optimizer = CONFIGS[name]
    keras.utils.set_random_seed(0)
    initial = make_model("float32").get_weights()
    model = make_model(dtype)
    model.set_weights([w.astype(np.float32) for w in initial])  # rounded to bf16 by Keras
    warmup = args.steps // 20
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, args.steps - warmup, warmup_target=args.lr, warmup_steps=warmup
    )
    optimizer = make_optimizer(dict(learning_rate=schedule, weight_decay=0.01))
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = data
    losses, chunk = [], args.batch * args.log_every
    for start in range(0, len(x), chunk):  # one fit per chunk: its loss is the chunk's mean
        history = model.fit(
            x[start : start + chunk],
            y[start : start + chunk],
            batch_size=args.batch,
            shuffle=False,
            verbose=0,
        )
        losses.append(history.history["loss"][0])
    memory = (
        bytes_per_parameter(model.trainable_variables, model),
        bytes_per_parameter(optimizer_arrays(optimizer), model),
    )
    return losses, memory


def main() -> None:
    parser = training_arguments(__doc__)
    parser.add_argument("--log-every", type=int, default=50, help="steps per loss point")
    parser.add_argument("--only", nargs="*", choices=list(CONFIGS), help="runs to make")
    args = parser.parse_args()
    text = stdlib_text(4_000_000)
    rng = np.random.default_rng(1)  # the same batches for every run
    starts = rng.integers(0, len(text) - CONTEXT - 1, args.steps * args.batch)
    x = text[starts[:, None] + np.arange(CONTEXT)].astype(np.int32)
    y = text[starts + CONTEXT].astype(np.int32)
    backend = keras.backend.backend()
    print(
        f"{backend}, {cpu_name()}: {len(text) / 1e6:.1f} MB of standard-library source, "
        f"{args.steps} steps of {args.batch}, peak lr {args.lr}"
    )
    curves, memory = {}, {}
    for name in args.only or CONFIGS:
        start = time.perf_counter()
        try:
            curves[name], memory[name] = train(name, (x, y), args)
        except ValueError as error:  # a configuration this backend refuses
            print(f"  {name}: refused: {error}", flush=True)
            continue
        print(f"  {name}: {time.perf_counter() - start:.0f} s", flush=True)
    tail = max(1, len(next(iter(curves.values()))) // 10)
    finals = {name: float(np.mean(losses[-tail:])) for name, losses in curves.items()}
    first = next(iter(finals))
    ours = finals.get("float32 model, ours", finals[first])
    print(
        f"\n| {backend} | final loss | vs {first} | vs float32 model, ours "
        "| bytes/param: model + optimizer |"
    )
    print("|---|---|---|---|---|")
    for name, final in finals.items():
        model_bytes, optimizer_bytes = memory[name]
        print(
            f"| {name} | {final:.4f} | {100 * (final / finals[first] - 1):+.2f} % | "
            f"{100 * (final / ours - 1):+.2f} % | {model_bytes:.0f} + {optimizer_bytes:.0f} |"
        )
    if args.plot:
        plot(curves, args, backend)


def plot(curves: dict, args: argparse.Namespace, backend: str) -> None:
    """The loss curves (left), and each run's loss against the first run's,
    in percent (right; runs off the scale left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (full, relative) = plt.subplots(1, 2, figsize=(13, 4.8))
    reference = np.asarray(next(iter(curves.values())))
    for k, (name, losses) in enumerate(curves.items()):
        steps = np.arange(1, len(losses) + 1) * args.log_every
        full.plot(steps, losses, label=name, linewidth=1.2, color=f"C{k}")
        difference = 100 * (np.asarray(losses) / reference - 1)
        if np.abs(difference[len(difference) // 4 :]).max() < 5:
            relative.plot(steps, difference, label=name, linewidth=1.2, color=f"C{k}")
    full.set_ylabel(f"training loss (mean of {args.log_every} steps)")
    relative.set_ylabel(f"loss vs {next(iter(curves))} (%)")
    relative.axhline(0, color="black", linewidth=0.6)
    relative.set_xlim(left=args.steps // 4)
    relative.set_ylim(-2, 2)
    for ax in (full, relative):
        ax.set_xlabel("step")
    full.legend(fontsize=7)
    fig.suptitle(f"A bfloat16 character-level LM, Keras on {backend} ({cpu_name()})", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=100)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
