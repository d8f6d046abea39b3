"""Helpers for the Keras tests; the backend is whatever KERAS_BACKEND names."""

import numpy as np
import pytest

keras = pytest.importorskip("keras")

BACKEND = keras.backend.backend()


def make_model(seed=0, dtype=None):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu", name="hidden", dtype=dtype),
            keras.layers.LayerNormalization(name="norm", dtype=dtype),
            keras.layers.Dense(1, name="out", dtype=dtype),
        ]
    )


def make_data(n=800, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8)).astype("float32")
    y = (x[:, :1] * 0.5 - x[:, 1:2] + 0.1 * rng.standard_normal((n, 1))).astype("float32")
    return x, y


def weights(model):
    return [np.asarray(keras.ops.convert_to_numpy(w), dtype=np.float64) for w in model.weights]


def fit(optimizer, steps=100, batch_size=8, model=None, **compile_kwargs):
    """`steps` steps of `fit` on a small model; returns the model."""
    model = model or make_model()
    model.compile(optimizer=optimizer, loss="mse", **compile_kwargs)
    x, y = make_data(steps * batch_size)
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    return model


def max_difference(a, b):
    return max(np.abs(x - y).max() for x, y in zip(weights(a), weights(b), strict=True))
