"""Parameter groups and exclusions; the state through save/load and pickling."""

import pickle
import subprocess
import sys

import numpy as np
from keras_helpers import BACKEND, fit, keras, make_data, make_model, weights

from keras_adamw import AdamW
from keras_adamw.schedules import WarmupCosineDecay


def by_path(model):
    return {v.path: np.asarray(keras.ops.convert_to_numpy(v), np.float64) for v in model.weights}


def set_nonzero(model):
    """Every weight nonzero, so that any decay shows."""
    rng = np.random.default_rng(0)
    for v in model.trainable_variables:
        v.assign(rng.uniform(0.5, 1.0, v.shape).astype("float32"))


def zero_gradient_step(model, optimizer):
    """One update with zero gradients: only (scaled) weight decay moves anything."""
    optimizer.apply_gradients(
        [(keras.ops.zeros(v.shape, v.dtype), v) for v in model.trainable_variables]
    )


GROUPS = dict(
    learning_rate=0.1,
    weight_decay=0.1,
    exclude_from_weight_decay=["bias", "norm/beta"],
    lr_multipliers={"out": 0.5},
    weight_decay_multipliers={"hidden/kernel": 2.0, "norm": 3.0},
)
# Expected decay factor per variable for one zero-gradient step under GROUPS.
EXPECTED_FACTORS = {
    "hidden/kernel": 1 - 0.1 * 0.1 * 2.0,
    "hidden/bias": 1.0,
    "norm/gamma": 1 - 0.1 * 0.1 * 3.0,
    "norm/beta": 1.0,
    "out/kernel": 1 - 0.1 * 0.5 * 0.1,
    "out/bias": 1.0,
}


def check_groups(model, optimizer):
    set_nonzero(model)
    before = by_path(model)
    zero_gradient_step(model, optimizer)
    after = by_path(model)
    for path, value in after.items():
        suffix = next(s for s in EXPECTED_FACTORS if path.endswith(s))
        np.testing.assert_allclose(value, before[path] * EXPECTED_FACTORS[suffix], rtol=1e-6)


def test_exclusions_and_multipliers_are_honoured_and_survive_saving(tmp_path):
    model = make_model()
    model.compile(optimizer=AdamW(**GROUPS), loss="mse")
    model.optimizer.build(model.trainable_variables)
    check_groups(model, model.optimizer)

    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    config = loaded.optimizer.get_config()
    assert config["exclude_from_weight_decay"] == GROUPS["exclude_from_weight_decay"]
    assert config["lr_multipliers"] == GROUPS["lr_multipliers"]
    assert config["weight_decay_multipliers"] == GROUPS["weight_decay_multipliers"]
    check_groups(loaded, loaded.optimizer)


def test_a_zero_lr_multiplier_freezes_a_layer_under_fit():
    model = make_model()
    before = by_path(model)
    fit(AdamW(learning_rate=1e-2, lr_multipliers={"norm": 0.0}), steps=20, model=model)
    for path, value in by_path(model).items():
        assert np.array_equal(value, before[path]) == ("norm" in path), path


def test_excluding_every_variable_equals_no_decay():
    """keras.optimizers.AdamW crashes here on torch (_foreach_mul_ of an empty list)."""
    excluded = fit(AdamW(weight_decay=0.5, exclude_from_weight_decay=[".*"]))
    undecayed = fit(AdamW(weight_decay=0.0))
    for a, b in zip(weights(excluded), weights(undecayed), strict=True):
        np.testing.assert_array_equal(a, b)


def full_featured():
    return AdamW(
        learning_rate=WarmupCosineDecay(3e-3, warmup_steps=10, decay_steps=90),
        weight_decay=0.05,
        amsgrad=True,
        gradient_accumulation_steps=2,
        lr_multipliers={"out": 2.0},
        exclude_from_weight_decay=["bias"],
    )


def test_saving_mid_training_continues_exactly(tmp_path):
    x, y = make_data(800)
    straight = make_model()
    straight.compile(optimizer=full_featured(), loss="mse")
    straight.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)

    first = make_model()
    first.compile(optimizer=full_featured(), loss="mse")
    first.fit(x[:400], y[:400], batch_size=8, epochs=1, shuffle=False, verbose=0)
    first.save(tmp_path / "half.keras")
    resumed = keras.saving.load_model(tmp_path / "half.keras")
    assert int(keras.ops.convert_to_numpy(resumed.optimizer.iterations)) == 25
    resumed.fit(x[400:], y[400:], batch_size=8, epochs=1, shuffle=False, verbose=0)

    assert int(keras.ops.convert_to_numpy(resumed.optimizer.iterations)) == 50
    for a, b in zip(weights(resumed), weights(straight), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(resumed.optimizer.variables, straight.optimizer.variables, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))


def test_pickled_model_continues_exactly():
    x, y = make_data(160)
    model = make_model()
    model.compile(optimizer=full_featured(), loss="mse")
    model.fit(x[:80], y[:80], batch_size=8, epochs=1, shuffle=False, verbose=0)
    clone = pickle.loads(pickle.dumps(model))
    assert isinstance(clone.optimizer, AdamW)
    for m in (model, clone):
        m.fit(x[80:], y[80:], batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(weights(clone), weights(model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_config_round_trips():
    optimizer = AdamW(
        learning_rate=WarmupCosineDecay(1e-3, 5, 50),
        weight_decay=WarmupCosineDecay(0.1, 0, 50, final_value=0.01),
        epsilon_mode="torch",
        weight_decay_mode="decoupled",
        maximize=True,
        clipnorm=1.0,
        gradient_accumulation_steps=2,
        **{k: GROUPS[k] for k in ("exclude_from_weight_decay", "lr_multipliers")},
    )
    config = optimizer.get_config()
    again = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(again) is AdamW
    assert again.get_config() == config


def test_a_saved_model_loads_in_a_fresh_process(tmp_path):
    """Importing keras_adamw registers AdamW and the schedules with Keras."""
    model = make_model()
    fit(AdamW(**GROUPS), steps=3, model=model)
    model.save(tmp_path / "model.keras")
    code = (
        "import keras, keras_adamw, sys; m = keras.saving.load_model(sys.argv[1]); "
        "print(type(m.optimizer).__module__, m.optimizer.get_config()['lr_multipliers'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "model.keras")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    )
    assert out.stdout.split()[0] == "keras_adamw.optimizer", out.stderr
    assert BACKEND == keras.backend.backend()
