"""Keras's published golden values for AdamW (keras/src/optimizers/adamw_test.py)."""

import numpy as np
import pytest

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
    golden = np.array(
        [
            [0.4998] * 10,
            [0.2486, 0.2475, 0.2463, 0.2451, 0.244, 0.2428, 0.2417, 0.2405, 0.2394, 0.2382],
            [0.1223, 0.1198, 0.1174, 0.1149, 0.1124, 0.11, 0.1075, 0.1051, 0.1027, 0.1003],
            [0.0586, 0.0549, 0.0512, 0.0475, 0.0439, 0.0402, 0.0366, 0.033, 0.0294, 0.0258],
            [0.0263, 0.0215, 0.0167, 0.012, 0.0073, 0.0026, -0.0021, -0.0067, -0.0113, -0.0159],
        ]
    )
    optimizer = host.HostAdamW(
        [np.ones(10, np.float32)], learning_rate=1.0, weight_decay=0.5, epsilon=2.0
    )
    optimizer.step([np.full(10, 0.01, np.float32)])
    grads = np.arange(0.1, 1.1, 0.1).astype(np.float32)
    for expected in golden:
        np.testing.assert_allclose(optimizer.params[0], expected, rtol=5e-4, atol=5e-4)
        optimizer.step([grads])
