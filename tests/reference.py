"""A plain float64 NumPy AdamW, written from the definitions: the tests' reference."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# keras/src/optimizers/adamw_test.py, test_correctness_with_golden: the weights
# before each of five steps (lr 1, wd 0.5, ε 2; a first step with gradients 0.01).
KERAS_GOLDEN_FIVE_STEPS = np.array(
    [
        [0.4998] * 10,
        [0.2486, 0.2475, 0.2463, 0.2451, 0.244, 0.2428, 0.2417, 0.2405, 0.2394, 0.2382],
        [0.1223, 0.1198, 0.1174, 0.1149, 0.1124, 0.11, 0.1075, 0.1051, 0.1027, 0.1003],
        [0.0586, 0.0549, 0.0512, 0.0475, 0.0439, 0.0402, 0.0366, 0.033, 0.0294, 0.0258],
        [0.0263, 0.0215, 0.0167, 0.012, 0.0073, 0.0026, -0.0021, -0.0067, -0.0113, -0.0159],
    ]
)


@dataclass
class ReferenceAdamW:
    """AdamW over float64 copies of the parameters, one tensor at a time."""

    params: list[np.ndarray]
    learning_rate: float = 1e-3
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7
    weight_decay: float = 0.004
    epsilon_mode: str = "keras"
    weight_decay_mode: str = "coupled"
    amsgrad: bool = False
    maximize: bool = False
    step_count: int = 0
    m: list[np.ndarray] = field(init=False)
    v: list[np.ndarray] = field(init=False)
    v_max: list[np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.params = [np.array(p, dtype=np.float64) for p in self.params]
        self.m = [np.zeros_like(p) for p in self.params]
        self.v = [np.zeros_like(p) for p in self.params]
        self.v_max = [np.zeros_like(p) for p in self.params]

    def step(self, grads: list[np.ndarray], grad_scale: float | None = None) -> None:
        self.step_count += 1
        t = self.step_count
        lr, b1, b2, eps = self.learning_rate, self.beta_1, self.beta_2, self.epsilon
        for i, grad in enumerate(grads):
            g = np.asarray(grad, dtype=np.float64)
            if grad_scale is not None:
                g = g / grad_scale
            if self.maximize:
                g = -g
            rate = self.weight_decay * (lr if self.weight_decay_mode == "coupled" else 1.0)
            self.params[i] = self.params[i] - rate * self.params[i]
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            v = self.v[i]
            if self.amsgrad:
                self.v_max[i] = np.maximum(self.v_max[i], v)
                v = self.v_max[i]
            bias_correction_1 = 1 - b1**t
            bias_correction_2 = 1 - b2**t
            if self.epsilon_mode == "keras":
                alpha = lr * np.sqrt(bias_correction_2) / bias_correction_1
                self.params[i] = self.params[i] - alpha * self.m[i] / (np.sqrt(v) + eps)
            else:
                m_hat = self.m[i] / bias_correction_1
                v_hat = v / bias_correction_2
                self.params[i] = self.params[i] - lr * m_hat / (np.sqrt(v_hat) + eps)
