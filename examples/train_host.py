"""A short training demo of the host kernel: softmax regression with a hidden
layer, in plain NumPy, optimized by keras_adamw.host.HostAdamW.

    python examples/train_host.py

The data are ten Gaussian classes in 64 dimensions, made here (no download).
"""

import time

import numpy as np

from keras_adamw import host


def make_data(rng, n, centers):
    labels = rng.integers(0, len(centers), n)
    return (centers[labels] + rng.standard_normal((n, centers.shape[1]))).astype(np.float32), labels


def forward(params, x):
    w1, b1, w2, b2 = params
    hidden = np.maximum(x @ w1 + b1, 0.0)
    logits = hidden @ w2 + b2
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    return hidden, probs


def gradients(params, x, y):
    _, _, w2, _ = params
    hidden, probs = forward(params, x)
    loss = -np.log(probs[np.arange(len(y)), y] + 1e-12).mean()
    d_logits = probs
    d_logits[np.arange(len(y)), y] -= 1.0
    d_logits /= len(y)
    d_hidden = (d_logits @ w2.T) * (hidden > 0)
    grads = [x.T @ d_hidden, d_hidden.sum(0), hidden.T @ d_logits, d_logits.sum(0)]
    return loss, [g.astype(np.float32) for g in grads]


def main():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((10, 64)) * 0.3
    x_train, y_train = make_data(rng, 8000, centers)
    x_test, y_test = make_data(rng, 2000, centers)
    params = [
        (rng.standard_normal((64, 256)) * 0.1).astype(np.float32),
        np.zeros(256, np.float32),
        (rng.standard_normal((256, 10)) * 0.1).astype(np.float32),
        np.zeros(10, np.float32),
    ]
    total_steps = 5 * len(x_train) // 128

    def cosine(step):
        return 3e-3 * 0.5 * (1 + np.cos(np.pi * min(step, total_steps) / total_steps))

    optimizer = host.HostAdamW(params, learning_rate=cosine, weight_decay=0.01)
    print(f"keras_adamw.host: {host.simd_level()} kernel, {host.num_threads()} threads")
    start = time.perf_counter()
    for epoch in range(5):
        order = rng.permutation(len(x_train))
        losses = []
        for batch in np.array_split(order, len(order) // 128):
            loss, grads = gradients(params, x_train[batch], y_train[batch])
            optimizer.step(grads)
            losses.append(loss)
        print(f"epoch {epoch + 1}: loss {np.mean(losses):.4f}")
    accuracy = (forward(params, x_test)[1].argmax(1) == y_test).mean()
    print(
        f"test accuracy {accuracy:.3f} after {optimizer.iterations} steps "
        f"({time.perf_counter() - start:.1f} s)"
    )


if __name__ == "__main__":
    main()
