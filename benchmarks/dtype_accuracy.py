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
- bf16 weights + masters: bfloat16 weights, float32 master copies, bf16 state;
- bf16 weights, stochastic: bfloat16 weights and state, no masters,
  stochastic rounding;
- bf16 weights, nearest: the same rounded to nearest, which loses every step
  smaller than half a bfloat16 spacing: it stalls.

The final loss is the mean training loss over the last tenth of the steps.
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
    "bf16 weights + masters": dict(weights=BF16, master_weights=True, state_dtype="bfloat16"),
    "bf16 weights, stochastic": dict(weights=BF16, state_dtype="bfloat16", rounding="stochastic"),
    "bf16 weights, nearest": dict(weights=BF16, state_dtype="bfloat16"),
}


def train(name: str, text: np.ndarray, steps: int, batch: int) -> list[float]:
    options = dict(CONFIGS[name])
    weights = options.pop("weights")
    rng = np.random.default_rng(0)
    params = [p.astype(weights) for p in init_params(rng)]
    grad_dtype = np.float32 if weights == np.float32 else BF16

    def cosine(step: int) -> float:
        warmup = steps // 20
        if step < warmup:
            return 2e-3 * step / warmup
        return 2e-3 * 0.5 * (1 + np.cos(np.pi * (step - warmup) / (steps - warmup)))

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
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--plot", metavar="PNG", help="draw the loss curves")
    args = parser.parse_args()
    text = stdlib_text(4_000_000)
    print(
        f"{len(text) / 1e6:.1f} MB of standard-library source; {args.steps} steps of {args.batch}"
    )
    curves = {}
    for name in CONFIGS:
        start = time.perf_counter()
        curves[name] = train(name, text, args.steps, args.batch)
        print(f"  {name}: {time.perf_counter() - start:.0f} s")
    tail = max(1, args.steps // 10)
    reference = np.mean(curves["float32"][-tail:])
    print(f"\n{'storage':<26} {'final loss':>10} {'vs float32':>11}")
    for name, losses in curves.items():
        final = np.mean(losses[-tail:])
        print(f"{name:<26} {final:10.4f} {100 * (final / reference - 1):+10.2f}%")
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
