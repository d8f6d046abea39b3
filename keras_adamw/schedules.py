"""Warmup schedules for the learning rate or the weight decay.

Both rise linearly from ``initial_value`` to ``peak_value`` over
``warmup_steps``, then fall to ``final_value`` over ``decay_steps`` (by a
half cosine or a straight line) and stay there. They are Keras
``LearningRateSchedule``s: serializable, and usable wherever Keras takes one,
including ``keras_adamw.AdamW(weight_decay=...)``.
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops


class _Warmup(keras.optimizers.schedules.LearningRateSchedule):  # type: ignore[misc]
    """Linear warmup, then `_decay_fraction` shapes the way down."""

    def __init__(
        self,
        peak_value: float,
        warmup_steps: int,
        decay_steps: int,
        initial_value: float = 0.0,
        final_value: float = 0.0,
        name: str | None = None,
    ) -> None:
        for arg, value in (("warmup_steps", warmup_steps), ("decay_steps", decay_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{arg} must be an int >= 0, got {value!r}")
        for arg, number in (
            ("peak_value", peak_value),
            ("initial_value", initial_value),
            ("final_value", final_value),
        ):
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                raise ValueError(f"{arg} must be a number, got {number!r}")
            if not math.isfinite(number) or number < 0:
                raise ValueError(f"{arg} must be a finite number >= 0, got {number!r}")
        self.peak_value = float(peak_value)
        self.warmup_steps = warmup_steps
        self.decay_steps = decay_steps
        self.initial_value = float(initial_value)
        self.final_value = float(final_value)
        self.name = name

    def _decay_fraction(self, progress: Any) -> Any:
        """How far down the value is, from 0 at the peak to 1 at the end."""
        raise NotImplementedError

    def __call__(self, step: Any) -> Any:
        step = ops.cast(step, "float32")
        warmup = max(self.warmup_steps, 1)
        rising = self.initial_value + (self.peak_value - self.initial_value) * step / warmup
        progress = ops.clip((step - self.warmup_steps) / max(self.decay_steps, 1), 0.0, 1.0)
        falling = self.peak_value - (self.peak_value - self.final_value) * self._decay_fraction(
            progress
        )
        return ops.where(step < self.warmup_steps, rising, falling)

    def get_config(self) -> dict[str, Any]:
        return {
            "peak_value": self.peak_value,
            "warmup_steps": self.warmup_steps,
            "decay_steps": self.decay_steps,
            "initial_value": self.initial_value,
            "final_value": self.final_value,
            "name": self.name,
        }


@keras.saving.register_keras_serializable(package="keras_adamw")
class WarmupCosineDecay(_Warmup):
    """Linear warmup to ``peak_value``, then a half cosine down to ``final_value``."""

    def _decay_fraction(self, progress: Any) -> Any:
        return 0.5 * (1.0 - ops.cos(math.pi * progress))


@keras.saving.register_keras_serializable(package="keras_adamw")
class WarmupLinearDecay(_Warmup):
    """Linear warmup to ``peak_value``, then a straight line down to ``final_value``."""

    def _decay_fraction(self, progress: Any) -> Any:
        return progress
