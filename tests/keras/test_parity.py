"""keras_adamw.AdamW against keras.optimizers.AdamW: 100 steps of fit, every option.

These test the keras.ops path (implementation="ops"); test_host_path.py holds
the host kernel to the ops path.
"""

import pytest
from keras_helpers import fit, keras, make_model, max_difference

from keras_adamw import AdamW

# On TF and JAX the arithmetic is Keras's, op for op (the difference is 0); on
# torch, Keras runs torch._foreach ops that round m·β₁ + g·(1−β₁) differently.
TOLERANCE = 1e-6

CASES = {
    "plain": {},
    "amsgrad": dict(amsgrad=True),
    "hyperparameters": dict(
        learning_rate=3e-3, weight_decay=0.1, beta_1=0.8, beta_2=0.95, epsilon=1e-5
    ),
    "schedule": dict(
        learning_rate=keras.optimizers.schedules.CosineDecay(
            1e-3, decay_steps=80, warmup_target=3e-3, warmup_steps=20
        )
    ),
    "callable lr": dict(learning_rate=lambda: 2e-3),
    "clipnorm": dict(clipnorm=0.1),
    "clipvalue": dict(clipvalue=0.01),
    "global_clipnorm": dict(global_clipnorm=0.1),
    "accumulation": dict(gradient_accumulation_steps=4),
    "ema": dict(use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=10),
    "loss_scale_factor": dict(loss_scale_factor=128.0),
}


@pytest.mark.parametrize("kwargs", CASES.values(), ids=CASES.keys())
def test_fit_matches_keras_adamw(kwargs):
    ours = fit(AdamW(implementation="ops", **kwargs))
    theirs = fit(keras.optimizers.AdamW(**kwargs))
    assert max_difference(ours, theirs) <= TOLERANCE


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_matches_keras_adamw(policy):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        ours = fit(AdamW(implementation="ops"), model=make_model())
        theirs = fit(keras.optimizers.AdamW(), model=make_model())
        if policy == "mixed_float16":  # compile wraps the optimizer in a LossScaleOptimizer
            assert isinstance(ours.optimizer, keras.optimizers.LossScaleOptimizer)
            assert isinstance(ours.optimizer.inner_optimizer, AdamW)
    finally:
        keras.config.set_dtype_policy(previous)
    assert max_difference(ours, theirs) <= TOLERANCE
