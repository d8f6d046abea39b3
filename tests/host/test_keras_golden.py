"""Keras's published golden values for AdamW (keras/src/optimizers/adamw_test.py)."""

import numpy as np
import pytest
from reference import KERAS_GOLDEN_FIVE_STEPS

from keras_adamw import host


def test_single_step_golden():
    p = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    g = np.array([1.0, 6.0, 7.0, 2.0], np.float32)
    host.adamw_update(
        p, g, np.zeros(4, np.float32), np.zeros(4, np.float32), step=1, learning_rate=0.5
    )
    np.testing.assert_allclose(p, [0.4980, 1.4960, 2.494, 3.492], rtol=1e-4, atol=1e-4)


def test_decay_only_golden():
    p = np.array([2.0], np.float32)
    # Keras's test steps this variable with three fresh optimizers, so it decays three times.
    for _ in range(3):
        zeros = np.zeros(1, np.float32)
        host.adamw_update(
            p, zeros, zeros.copy(), zeros.copy(), step=1, learning_rate=1.0, weight_decay=0.004
        )
    assert p[0] == pytest.approx(1.9760959, abs=1e-6)


def test_five_steps_golden():
    optimizer = host.HostAdamW(
        [np.ones(10, np.float32)], learning_rate=1.0, weight_decay=0.5, epsilon=2.0
    )
    optimizer.step([np.full(10, 0.01, np.float32)])
    grads = np.arange(0.1, 1.1, 0.1).astype(np.float32)
    for expected in KERAS_GOLDEN_FIVE_STEPS:
        np.testing.assert_allclose(optimizer.params[0], expected, rtol=5e-4, atol=5e-4)
        optimizer.step([grads])
