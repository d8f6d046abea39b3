"""Does 16-bit optimizer data still train like float32? One model, one data
order, one seed, trained with each storage of weights and state by
keras_adamw.host.HostAdamW; the loss curves side by side.

    python benchmarks/dtype_accuracy.py                  # prints the table
    python benchmarks/dtype_accuracy.py --plot curves.png --steps 3000

The model is a character-level language model in plain NumPy (an embedding
of the last 16 characters, a hidden layer of 512, a softmax over the bytes),
trained on the Python standard library's own source, which ships with every
Python (no download). The forward and backward passes run in float64 on the
weights as stored, so the only difference between the runs is how the
optimizer keeps its data:

- float32: weights and state in float32 (the reference);
- bf16 state: float32 weights, m and v in bfloat16;
- 8-bit state: float32 weights, m and v 8-bit block-wise (QuantizedState);
- bf16 weights + masters: bfloat16 weights, float32 master copies, bf16 state;
- bf16 weights, stochastic: bfloat16 weights and state, no masters,
  stochastic rounding;
- bf16 weights, nearest: the same rounded to nearest, which loses every step
  smaller than half a bfloat16 spacing: it stalls.

The final loss is the mean training loss over the last tenth of the steps.

Then the 8-bit format against bitsandbytes' dynamic map (its
create_dynamic_map, rebuilt here in NumPy from its definition, with the same
256-element blocks scaled by their largest magnitude): the error each leaves
in the float32 run's final m and v, and in the update m/(√v+ε) they give.
"""

from __future__ import annotations

import argparse
import os
import time

import ml_dtypes
import numpy as np

from keras_adamw import host

BF16 = np.dtype(ml_dtypes.bfloat16)
CONTEXT, EMBED, HIDDEN, VOCAB = 16, 16, 512, 128


def stdlib_text(limit: int) -> np.ndarray:
    """ASCII bytes of the standard library's .py files, in a fixed order."""
    root = os.path.dirname(os.__file__)
    chunks, size = [], 0
    for name in sorted(os.listdir(root)):
        if name.endswith(".py") and size < limit:
            with open(os.path.join(root, name), "rb") as file:
                data = np.frombuffer(file.read(), np.uint8)
            data = data[data < VOCAB]
            chunks.append(data)
            size += len(data)
    return np.concatenate(chunks)[:limit]


def init_params(rng: np.random.Generator) -> list[np.ndarray]:
    return [
        rng.standard_normal((VOCAB, EMBED)) * 0.5,
        rng.standard_normal((CONTEXT * EMBED, HIDDEN)) / np.sqrt(CONTEXT * EMBED),
        np.zeros(HIDDEN),
        rng.standard_normal((HIDDEN, VOCAB)) / np.sqrt(HIDDEN),
        np.zeros(VOCAB),
    ]


def loss_and_grads(params, x, y):
    """Cross-entropy of the next byte, and its gradients (float64)."""
    embed, w1, b1, w2, b2 = (np.asarray(p, np.float64) for p in params)
    e = embed[x].reshape(len(x), -1)
    hidden = np.tanh(e @ w1 + b1)
    logits = hidden @ w2 + b2
    logits -= logits.max(1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(1, keepdims=True)
    loss = -np.log(probs[np.arange(len(y)), y]).mean()
    d_logits = probs
    d_logits[np.arange(len(y)), y] -= 1
    d_logits /= len(y)
    d_hidden = (d_logits @ w2.T) * (1 - hidden**2)
    d_e = (d_hidden @ w1.T).reshape(len(x), CONTEXT, EMBED)
    d_embed = np.zeros_like(embed)
    np.add.at(d_embed, x, d_e)
    grads = [d_embed, e.T @ d_hidden, d_hidden.sum(0), hidden.T @ d_logits, d_logits.sum(0)]
    return loss, grads


CONFIGS = {
    "float32": dict(weights=np.float32),
    "bf16 state": dict(weights=np.float32, state_dtype="bfloat16"),
    "8-bit state": dict(weights=np.float32, state_dtype="int8"),
    "bf16 weights + masters": dict(weights=BF16, master_weights=True, state_dtype="bfloat16"),
    "bf16 weights, stochastic": dict(weights=BF16, state_dtype="bfloat16", rounding="stochastic"),
    "bf16 weights, nearest": dict(weights=BF16, state_dtype="bfloat16"),
}


def dynamic_map(signed: bool) -> np.ndarray:
    """bitsandbytes' dynamic quantization map (8 bits, 7 exponent bits at most):
    for each decimal exponent 10^-6 .. 10^0, a linear fraction between 0.1
    and 1 whose resolution doubles with each exponent, then 0 and 1."""
    values = []
    non_sign_bits = 7
    for i in range(7):
        items = 2 ** (i + non_sign_bits - 7) + 1 if signed else 2 ** (i + non_sign_bits - 6) + 1
        boundaries = np.linspace(0.1, 1, items)
        means = (boundaries[:-1] + boundaries[1:]) / 2
        values += list(10.0 ** (i - 6) * means)
        if signed:
            values += list(-(10.0 ** (i - 6)) * means)
    values += [0.0, 1.0]
    return np.sort(np.array(values + [0.0] * (256 - len(values))))


def dynamic_map_round_trip(x: np.ndarray, signed: bool) -> np.ndarray:
    """Block-wise (256) absmax scaling, then the nearest value of the map."""
    table = dynamic_map(signed)
    out = np.empty_like(x, dtype=np.float64)
    for start in range(0, len(x), 256):
        block = x[start : start + 256].astype(np.float64)
        absmax = np.abs(block).max()
        if absmax == 0:
            out[start : start + 256] = 0
            continue
        scaled = block / absmax
        index = np.clip(np.searchsorted(table, scaled), 1, len(table) - 1)
        nearer = np.where(
            np.abs(table[index - 1] - scaled) <= np.abs(table[index] - scaled), index - 1, index
        )
        out[start : start + 256] = table[nearer] * absmax
    return out


def quantization_errors(moments: dict[str, np.ndarray]) -> None:
    """Relative L2 and median relative errors of m, v and the update m/(√v+ε)
    they give, after an 8-bit round trip in each format."""
    m, v = moments["m"].astype(np.float64), moments["v"].astype(np.float64)
    ours = (
        host.QuantizedState.from_float(m, moment=1).to_float().astype(np.float64),
        host.QuantizedState.from_float(v, moment=2).to_float().astype(np.float64),
    )
    theirs = (dynamic_map_round_trip(m, True), dynamic_map_round_trip(v, False))

    def errors(exact: np.ndarray, approx: np.ndarray) -> str:
        nonzero = exact != 0
        l2 = np.linalg.norm(approx - exact) / np.linalg.norm(exact)
        median = np.median(np.abs(approx[nonzero] - exact[nonzero]) / np.abs(exact[nonzero]))
        return f"{l2:9.5f} {median:9.5f}"

    def update(m: np.ndarray, v: np.ndarray) -> np.ndarray:
        return m / (np.sqrt(v) + 1e-7)

    print(f"\n8-bit round trip of the float32 run's final state ({len(m)} elements),")
    print("relative L2 error and median relative error:")
    print(f"{'':<28} {'m':>19} {'v':>19} {'update m/(√v+ε)':>19}")
    for label, (mq, vq) in (
        ("keras_adamw (E3M4 / √v E3M5)", ours),
        ("bitsandbytes dynamic map", theirs),
    ):
        print(f"{label:<28} {errors(m, mq)} {errors(v, vq)} {errors(update(m, v), update(mq, vq))}")


def train(name: str, text: np.ndarray, steps: int, batch: int, peak: float) -> list[float]:
    options = dict(CONFIGS[name])
    weights = options.pop("weights")
    rng = np.random.default_rng(0)
    params = [p.astype(weights) for p in init_params(rng)]
    grad_dtype = np.float32 if weights == np.float32 else BF16

    def cosine(step: int) -> float:
        warmup = steps // 20
        if step < warmup:
            return peak * step / warmup
        return peak * 0.5 * (1 + np.cos(np.pi * (step - warmup) / (steps - warmup)))

    optimizer = host.HostAdamW(params, learning_rate=cosine, weight_decay=0.01, **options)
    data_rng = np.random.default_rng(1)  # the same batches for every run
    losses = []
    for _ in range(steps):
        starts = data_rng.integers(0, len(text) - CONTEXT - 1, batch)
        x = text[starts[:, None] + np.arange(CONTEXT)]
        y = text[starts + CONTEXT]
        loss, grads = loss_and_grads(optimizer.params, x, y)
        optimizer.step([g.astype(grad_dtype) for g in grads])
        losses.append(loss)
    if name == "float32":
        MOMENTS["m"] = np.concatenate([m.ravel() for m in optimizer.exp_avgs])
        MOMENTS["v"] = np.concatenate([v.ravel() for v in optimizer.exp_avg_sqs])
    return losses


MOMENTS: dict[str, np.ndarray] = {}


def training_arguments(description: str | None) -> argparse.ArgumentParser:
    """The options of a training run: steps, batch, peak learning rate, plot."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=4e-3, help="peak learning rate (cosine)")
    parser.add_argument("--plot", metavar="PNG", help="draw the loss curves")
    return parser


def main() -> None:
    args = training_arguments(__doc__).parse_args()
    text = stdlib_text(4_000_000)
    print(
        f"{len(text) / 1e6:.1f} MB of standard-library source; {args.steps} steps of {args.batch}"
    )
    curves = {}
    for name in CONFIGS:
        start = time.perf_counter()
        curves[name] = train(name, text, args.steps, args.batch, args.lr)
        print(f"  {name}: {time.perf_counter() - start:.0f} s")
    tail = max(1, args.steps // 10)
    reference = np.mean(curves["float32"][-tail:])
    print(f"\n{'storage':<26} {'final loss':>10} {'vs float32':>11}")
    for name, losses in curves.items():
        final = np.mean(losses[-tail:])
        print(f"{name:<26} {final:10.4f} {100 * (final / reference - 1):+10.2f}%")
    quantization_errors(MOMENTS)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        window = max(1, args.steps // 50)
        kernel = np.ones(window) / window
        for name, losses in curves.items():
            ax.plot(np.convolve(losses, kernel, mode="valid"), label=name, linewidth=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel(f"training loss (mean of {window} steps)")
        ax.set_title("A character-level LM on Python's source, by optimizer storage")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
