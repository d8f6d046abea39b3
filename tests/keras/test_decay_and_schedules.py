"""Weight decay in both modes, against closed forms; schedules; Keras's golden values."""

import math

import numpy as np
import pytest
from keras_helpers import fit, keras, make_model
from reference import KERAS_GOLDEN_FIVE_STEPS

from keras_adamw import AdamW
from keras_adamw.schedules import WarmupCosineDecay, WarmupLinearDecay


def decay_only(optimizer, steps, value=2.0):
    """`steps` updates with zero gradients: only the decay moves the variable."""
    variable = keras.Variable(np.full((3,), value, np.float32))
    for _ in range(steps):
        optimizer.apply_gradients([(keras.ops.zeros((3,)), variable)])
    return np.asarray(keras.ops.convert_to_numpy(variable), np.float64)


@pytest.mark.parametrize("epsilon_mode", ["keras", "torch"])
def test_coupled_decay_is_lr_times_wd(epsilon_mode):
    got = decay_only(AdamW(learning_rate=0.1, weight_decay=0.3, epsilon_mode=epsilon_mode), 4)
    np.testing.assert_allclose(got, 2.0 * (1 - 0.1 * 0.3) ** 4, rtol=1e-6)


def test_decoupled_decay_ignores_a_constant_learning_rate():
    got = decay_only(AdamW(learning_rate=0.1, weight_decay=0.01, weight_decay_mode="decoupled"), 3)
    np.testing.assert_allclose(got, 2.0 * (1 - 0.01) ** 3, rtol=1e-6)


def test_decoupled_decay_follows_only_the_schedules_shape():
    def run(peak):
        schedule = WarmupLinearDecay(peak, warmup_steps=2, decay_steps=4)
        opt = AdamW(learning_rate=schedule, weight_decay=0.05, weight_decay_mode="decoupled")
        return decay_only(opt, 5)

    # Multipliers lr_t/peak at steps 0..4: 0, 0.5, 1, 0.75, 0.5.
    expected = 2.0 * np.prod([1 - 0.05 * f for f in (0.0, 0.5, 1.0, 0.75, 0.5)])
    np.testing.assert_allclose(run(1e-3), expected, rtol=1e-6)
    np.testing.assert_allclose(run(5e-2), expected, rtol=1e-6)  # a new peak, the same decay


def test_weight_decay_schedule():
    schedule = WarmupCosineDecay(0.2, warmup_steps=1, decay_steps=2, initial_value=0.1)
    got = decay_only(AdamW(learning_rate=0.5, weight_decay=schedule), 4)
    wds = [0.1, 0.2, 0.1, 0.0]  # warmup start, peak, half way down the cosine, end
    np.testing.assert_allclose(got, 2.0 * np.prod([1 - 0.5 * wd for wd in wds]), rtol=1e-6)


@pytest.mark.parametrize("cls", [WarmupCosineDecay, WarmupLinearDecay])
def test_schedules_follow_their_formulas_and_round_trip(cls):
    schedule = cls(1.0, warmup_steps=10, decay_steps=20, initial_value=0.2, final_value=0.1)

    def expected(step):
        if step < 10:
            return 0.2 + 0.8 * step / 10
        progress = min((step - 10) / 20, 1.0)
        fall = 0.5 * (1 - math.cos(math.pi * progress)) if cls is WarmupCosineDecay else progress
        return 1.0 - 0.9 * fall

    for step in [0, 5, 10, 15, 20, 30, 45]:
        assert float(schedule(step)) == pytest.approx(expected(step), abs=1e-6)
    again = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(schedule))
    assert isinstance(again, cls) and again.get_config() == schedule.get_config()


def test_weight_decay_reassignment_reaches_the_compiled_step():
    """Assigned between fits, a new weight decay is used: a Python float would
    be frozen into the compiled train step on JAX and TF."""
    model = make_model()
    optimizer = AdamW(learning_rate=1e-2, weight_decay=0.0, weight_decay_mode="decoupled")
    fit(optimizer, steps=2, model=model)
    kernel = model.get_layer("hidden").kernel
    optimizer.learning_rate = 0.0  # the Adam step is lr·(…): zero; decoupled decay is not
    optimizer.weight_decay = 0.5
    before = np.asarray(keras.ops.convert_to_numpy(kernel), np.float64)
    x, y = _batch()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    after = np.asarray(keras.ops.convert_to_numpy(kernel), np.float64)
    np.testing.assert_allclose(after, before * 0.5, rtol=1e-6)
    with pytest.raises(TypeError, match="only from a float to a float"):
        optimizer.weight_decay = WarmupLinearDecay(1.0, 1, 1)


def _batch():
    rng = np.random.default_rng(1)
    return rng.standard_normal((8, 8)).astype("float32"), rng.standard_normal((8, 1)).astype(
        "float32"
    )


def test_keras_golden_values():
    """keras/src/optimizers/adamw_test.py: single step, decay, five steps."""
    optimizer = AdamW(learning_rate=0.5)
    variable = keras.Variable([1.0, 2.0, 3.0, 4.0])
    optimizer.apply_gradients([(keras.ops.convert_to_tensor([1.0, 6.0, 7.0, 2.0]), variable)])
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(variable), [0.4980, 1.4960, 2.494, 3.492], atol=1e-4
    )

    optimizer = AdamW(learning_rate=1.0, weight_decay=0.5, epsilon=2.0)
    x = keras.Variable(np.ones(10, np.float32))
    optimizer.apply_gradients([(keras.ops.full((10,), 0.01), x)])
    grads = keras.ops.convert_to_tensor(np.arange(0.1, 1.1, 0.1).astype(np.float32))
    for expected in KERAS_GOLDEN_FIVE_STEPS:
        np.testing.assert_allclose(keras.ops.convert_to_numpy(x), expected, rtol=5e-4, atol=5e-4)
        optimizer.apply_gradients([(grads, x)])


def test_maximize_ascends():
    optimizer = AdamW(learning_rate=0.1, weight_decay=0.0, maximize=True)
    variable = keras.Variable(np.zeros(3, np.float32))
    optimizer.apply_gradients([(keras.ops.ones((3,)), variable)])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(variable), 0.1, rtol=1e-5)
