"""Keras idioms that must work with ours as with `keras.optimizers.AdamW`:
weights loaded before the optimizer is built, pickling, `set_weights` from
another optimizer's `variables`, and Keras's `exclude_from_weight_decay`."""

import pickle

import numpy as np
import pytest
from keras_helpers import BACKEND, keras, make_data, make_model, max_difference

from keras_adamw import AdamW

LAYOUTS = {
    "auto": dict(),
    "ops": dict(implementation="ops"),
    "offloaded": dict(offload_state=True),
    "offloaded amsgrad": dict(offload_state=True, amsgrad=True),
    "bfloat16 state": dict(state_dtype="bfloat16"),
    "8-bit state": dict(state_dtype="int8"),
    "shard_state, no distribution": dict(shard_state=True),
}


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def compiled(kwargs, seed=0, dtype=None):
    model = make_model(seed=seed, dtype=dtype)
    model.compile(optimizer=AdamW(learning_rate=3e-3, **kwargs), loss="mse")
    return model


def train(model, x, y):
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    return model


@pytest.mark.parametrize("kwargs", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("file", ["half.weights.h5", "half.keras"])
def test_weights_loaded_before_build_resume_training(tmp_path, kwargs, file):
    """`model.load_weights` into a freshly compiled model, whose optimizer is
    not built: the state is kept and assigned at build, so the run goes on as
    if never stopped (Keras's own optimizer warns and starts afresh)."""
    x, y = make_data(400)
    straight = train(compiled(kwargs), x, y)
    first = train(compiled(kwargs), x[:200], y[:200])
    path = tmp_path / file
    first.save(path) if file.endswith(".keras") else first.save_weights(path)
    resumed = compiled(kwargs, seed=1)  # other initial weights: the file must set them all
    assert not resumed.optimizer.built
    resumed.load_weights(path)
    train(resumed, x[200:], y[200:])
    assert int(to_numpy(resumed.optimizer.iterations)) == 50
    assert max_difference(resumed, straight) <= 1e-6


def test_a_bf16_model_with_masters_resumes_from_weights_loaded_before_build(tmp_path):
    x, y = make_data(400)
    straight = train(compiled({}, dtype="bfloat16"), x, y)
    first = train(compiled({}, dtype="bfloat16"), x[:200], y[:200])
    first.save_weights(tmp_path / "half.weights.h5")
    resumed = compiled({}, seed=1, dtype="bfloat16")
    resumed.load_weights(tmp_path / "half.weights.h5")
    train(resumed, x[200:], y[200:])
    masters = [m for m in resumed.optimizer._masters if m is not None]
    assert len(masters) == 6
    assert max_difference(resumed, straight) == 0.0


def test_a_state_that_fits_no_layout_is_skipped_with_keras_warning(tmp_path):
    x, y = make_data(80)
    other = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
    other.compile(optimizer=AdamW(), loss="mse")
    train(other, x, y)
    store = {str(i): w for i, w in enumerate(other.optimizer.get_weights())}
    model = compiled({})
    model.optimizer.load_own_variables(store)  # kept: the optimizer is not built
    with pytest.warns(UserWarning, match="Skipping variable loading for optimizer"):
        model.optimizer.build(model.trainable_variables)
    assert int(to_numpy(model.optimizer.iterations)) == 0


@pytest.mark.parametrize("kwargs", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_a_compiled_model_pickles_with_its_optimizer_state(kwargs):
    x, y = make_data(160)
    model = train(compiled(kwargs), x[:80], y[:80])
    again = pickle.loads(pickle.dumps(model))
    assert again.optimizer.get_config() == model.optimizer.get_config()
    for a, b in zip(again.optimizer.get_weights(), model.optimizer.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    for m in (model, again):
        train(m, x[80:], y[80:])
    assert max_difference(model, again) <= 1e-7


def test_set_weights_before_build_raises_keras_error():
    with pytest.raises(ValueError, match="You are calling `set_weights\\(\\)` on an optimizer"):
        AdamW().set_weights([np.zeros(())])


SOURCES = {"offloaded": dict(offload_state=True), "8-bit state": dict(state_dtype="int8")}
TARGETS = {
    "auto": dict(),
    "ops": dict(implementation="ops"),
    "offloaded": dict(offload_state=True),
    "8-bit state": dict(state_dtype="int8"),
}


@pytest.mark.parametrize("target_kwargs", TARGETS.values(), ids=[f"into {t}" for t in TARGETS])
@pytest.mark.parametrize("source_kwargs", SOURCES.values(), ids=[f"from {s}" for s in SOURCES])
def test_set_weights_from_variables_of_state_in_host_memory(source_kwargs, target_kwargs):
    """Keras's `a.set_weights(b.variables)`, where b's m and v are host arrays
    (not in `variables`): b's whole state comes along, and where both keep
    their state in the same dtype, both step alike."""
    x, y = make_data(160)
    source = train(compiled(source_kwargs), x[:80], y[:80])
    target = compiled(target_kwargs, seed=1)
    target.set_weights(source.get_weights())
    target.optimizer.build(target.trainable_variables)
    target.optimizer.set_weights(source.optimizer.variables)
    state = source.optimizer.get_weights()
    assert len(state) == 2 + 6 * 2  # iteration, learning rate, m and v of each variable
    # Exact into float32 state (8-bit state decodes losslessly); 8-bit state
    # quantises what it receives, block by block.
    tolerance = 2**-5 if target_kwargs.get("state_dtype") == "int8" else 0.0
    for a, b in zip(target.optimizer.get_weights(), state, strict=True):
        np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance * np.abs(b).max())
    if source_kwargs.get("state_dtype") == target_kwargs.get("state_dtype"):
        for model in (source, target):
            train(model, x[80:], y[80:])
        # The host kernel on both sides steps identically; the ops path
        # rounds in another order (within 1e-6 of it, as test_parity holds).
        on_ops = target_kwargs.get("implementation") == "ops"
        assert max_difference(source, target) <= (1e-6 if on_ops else 1e-7)


# -- exclude_from_weight_decay, Keras's method -------------------------------------


def decayed_variables(optimizer, exclude):
    """Names of the variables one zero-gradient step decays."""
    model = make_model()
    model.compile(optimizer=optimizer, loss="mse")
    exclude(optimizer, model)
    for variable in model.trainable_variables:
        variable.assign(keras.ops.ones(variable.shape))
    optimizer.apply_gradients([(keras.ops.zeros(v.shape), v) for v in model.trainable_variables])
    # Paths below the model's own name, which differs from model to model.
    return [v.path.split("/", 1)[1] for v in model.trainable_variables if to_numpy(v).max() < 1.0]


EXCLUSIONS = {
    "by name": lambda o, m: o.exclude_from_weight_decay(var_names=["bias"]),
    "by list": lambda o, m: o.exclude_from_weight_decay(var_list=[m.get_layer("out").kernel]),
    # A name on JAX and torch ("gamma"); on TF, as Keras's own TF optimizer
    # sees a variable, its path and ":0" ("sequential/norm/gamma:0").
    "a layer's name": lambda o, m: o.exclude_from_weight_decay(var_names=["norm"]),
    "an anchored name": lambda o, m: o.exclude_from_weight_decay(var_names=["^bias$"]),
    "the last call replaces the first": lambda o, m: (
        o.exclude_from_weight_decay(var_names=["kernel"]),
        o.exclude_from_weight_decay(var_names=["gamma"]),
    ),
}


@pytest.mark.parametrize("exclude", EXCLUSIONS.values(), ids=EXCLUSIONS.keys())
@pytest.mark.parametrize("implementation", ["auto", "ops"])
def test_exclude_from_weight_decay_decays_what_keras_decays(exclude, implementation):
    ours = decayed_variables(AdamW(weight_decay=0.5, implementation=implementation), exclude)
    theirs = decayed_variables(keras.optimizers.AdamW(weight_decay=0.5), exclude)
    assert ours == theirs
    assert ours


def test_constructor_exclusions_are_saved_and_the_methods_are_not():
    optimizer = AdamW(exclude_from_weight_decay=["norm"])
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    assert optimizer.get_config()["exclude_from_weight_decay"] == ["norm"]
    both = lambda o, m: o.exclude_from_weight_decay(var_names=["bias"])  # noqa: E731
    decayed = decayed_variables(AdamW(weight_decay=0.5, exclude_from_weight_decay=["norm"]), both)
    assert decayed == ["hidden/kernel", "out/kernel"]


def test_exclude_from_weight_decay_after_build_applies_from_the_next_step():
    def after_build(optimizer, model):
        optimizer.build(model.trainable_variables)
        optimizer.exclude_from_weight_decay(var_names=["kernel"])

    ours = decayed_variables(AdamW(weight_decay=0.5), after_build)
    assert ours == decayed_variables(keras.optimizers.AdamW(weight_decay=0.5), after_build)
    assert ours == ["hidden/bias", "norm/gamma", "norm/beta", "out/bias"]


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TF IndexedSlices")
@pytest.mark.parametrize("implementation", ["ops", "host"])
def test_an_id_repeated_in_a_batch_is_summed_before_squaring(implementation):
    """An accepted difference: ours equals Keras's AdamW fed the densified
    gradient, v += (Σgᵢ)²; Keras's own AdamW, fed the `IndexedSlices`,
    squares each piece (v += Σgᵢ²)."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    start = rng.standard_normal((4, 3)).astype("float32")
    ours, dense, pieces = (keras.Variable(start) for _ in range(3))
    optimizers = [
        AdamW(learning_rate=0.1, implementation=implementation),
        keras.optimizers.AdamW(learning_rate=0.1),
        keras.optimizers.AdamW(learning_rate=0.1),
    ]
    for _ in range(5):
        values = rng.standard_normal((3, 3)).astype("float32")
        slices = tf.IndexedSlices(tf.constant(values), tf.constant([1, 1, 2]), (4, 3))
        optimizers[0].apply_gradients([(slices, ours)])
        optimizers[1].apply_gradients([(tf.convert_to_tensor(slices), dense)])
        optimizers[2].apply_gradients([(slices, pieces)])
    # The host kernel rounds in another order than Keras's ops (test_parity).
    np.testing.assert_allclose(
        to_numpy(ours), to_numpy(dense), atol=1e-6 if implementation == "ops" else 1e-5
    )
    # Row 1 (the repeated id) is where Keras's own differs; rows 0, 2, 3 agree.
    difference = np.abs(to_numpy(pieces) - to_numpy(dense)).max(axis=1)
    assert difference[1] > 1e-4
    assert difference[[0, 2, 3]].max() <= 1e-6
