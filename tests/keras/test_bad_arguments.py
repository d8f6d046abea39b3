"""Bad constructor arguments raise a clear ValueError at construction."""

import pytest
from keras_helpers import keras

from keras_adamw import AdamW

BAD = [
    (dict(learning_rate=-0.1), "learning_rate must be a finite number >= 0"),
    (dict(learning_rate="fast"), "learning_rate must be a finite number >= 0"),
    (dict(weight_decay=-1e-3), "weight_decay must be a finite number >= 0"),
    (dict(weight_decay=None), "Argument `weight_decay` must be a float. Received: weight_decay=N"),
    (dict(beta_1=1.0), r"beta_1 must be a number in \[0, 1\), got 1.0"),
    (dict(beta_2=-0.5), r"beta_2 must be a number in \[0, 1\)"),
    (dict(epsilon=0.0), "epsilon must be a finite number > 0"),
    (dict(epsilon_mode="tf"), "epsilon_mode must be one of 'keras', 'torch', got 'tf'"),
    (dict(weight_decay_mode="paper"), "weight_decay_mode must be one of 'coupled', 'decoupled'"),
    (
        dict(lr_multipliers={"dense": "2"}),
        r"lr_multipliers\['dense'\] must be a finite number >= 0",
    ),
    (dict(weight_decay_multipliers={"x": -1.0}), r"weight_decay_multipliers\['x'\] must be"),
    (dict(lr_multipliers=[("dense", 2.0)]), "lr_multipliers must be a dict"),
    (dict(exclude_from_weight_decay=["bias("]), r"pattern 'bias\(' does not compile"),
    (dict(exclude_from_weight_decay="bias"), "must be a list of regular expressions"),
    (dict(lr_multipliers={"[": 1.0}), "pattern '\\[' does not compile"),
    (
        dict(learning_rate=lambda: 1e-3, weight_decay_mode="decoupled"),
        "the peak of .* is not known",
    ),
    (dict(clipnorm=1.0, clipvalue=1.0), "Only one of `clipnorm`, `clipvalue`"),
    (dict(gradient_accumulation_steps=1), "gradient_accumulation_steps"),
]


@pytest.mark.parametrize("kwargs, message", BAD, ids=[str(k) for k, _ in BAD])
def test_bad_arguments_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdamW(**kwargs)


def test_keras_schedules_give_the_peak_for_decoupled_decay():
    schedules = keras.optimizers.schedules
    for schedule in (
        schedules.ExponentialDecay(1e-3, 100, 0.9),
        schedules.CosineDecay(1e-4, 100, warmup_target=1e-3, warmup_steps=10),
        schedules.PiecewiseConstantDecay([10], [1e-3, 1e-4]),
    ):
        assert AdamW(learning_rate=schedule, weight_decay_mode="decoupled")._peak_learning_rate == (
            pytest.approx(1e-3)
        )
