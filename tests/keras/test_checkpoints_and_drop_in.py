"""State that crosses configurations (checkpoints, get/set_weights) and the
inputs `keras.optimizers.AdamW` takes: sparse gradients, raw variables, NumPy
scalars."""

import numpy as np
import pytest
from keras_helpers import BACKEND, keras, make_data, make_model, max_difference

from keras_adamw import AdamW
from keras_adamw.schedules import WarmupCosineDecay


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def train(optimizer, x, y, model=None, **compile_kwargs):
    model = model or make_model()
    if not model.compiled:
        model.compile(optimizer=optimizer, loss="mse", **compile_kwargs)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    return model


def resumed_from(path, optimizer):
    """A fresh model with `optimizer`, built, then the weights file at `path` loaded."""
    model = make_model(seed=1)  # other initial weights: the file must set them all
    model.compile(optimizer=optimizer, loss="mse")
    optimizer.build(model.trainable_variables)
    model.load_weights(path)
    return model


LAYOUTS = {
    "offloaded into in-Keras": (dict(offload_state=True), dict(implementation="host")),
    "in-Keras into offloaded": (dict(implementation="host"), dict(offload_state=True)),
    "amsgrad, offloaded into in-Keras": (
        dict(offload_state=True, amsgrad=True),
        dict(implementation="host", amsgrad=True),
    ),
}


@pytest.mark.parametrize("saved, loaded", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_a_checkpoint_loads_with_or_without_offloading(tmp_path, saved, loaded):
    """Offloaded slots are stored where Keras stores its slot variables, so
    either layout resumes the other exactly (m and v in their own places)."""
    x, y = make_data(400)
    straight = train(AdamW(learning_rate=3e-3, **loaded), x, y)
    first = train(AdamW(learning_rate=3e-3, **saved), x[:200], y[:200])
    first.save_weights(tmp_path / "half.weights.h5")
    resumed = resumed_from(tmp_path / "half.weights.h5", AdamW(learning_rate=3e-3, **loaded))
    assert int(to_numpy(resumed.optimizer.iterations)) == 25
    train(None, x[200:], y[200:], model=resumed)
    assert max_difference(resumed, straight) <= 1e-6


def save(model, path):
    model.save(path) if path.suffix == ".keras" else model.save_weights(path)


FILES = ["half.weights.h5", "half.keras"]


@pytest.mark.parametrize("file", FILES)
def test_a_keras_adamw_checkpoint_carries_its_state_into_ours(tmp_path, file):
    """Switching to keras_adamw mid-project: iteration, m and v come along,
    and ours continues within 1e-6 of Keras's own continuation."""
    x, y = make_data(400)
    keras_first = train(keras.optimizers.AdamW(learning_rate=3e-3), x[:200], y[:200])
    save(keras_first, tmp_path / file)
    theirs = resumed_from(tmp_path / file, keras.optimizers.AdamW(learning_rate=3e-3))
    ours = resumed_from(tmp_path / file, AdamW(learning_rate=3e-3, weight_decay=0.1))
    assert int(to_numpy(ours.optimizer.iterations)) == 25
    assert float(to_numpy(ours.optimizer.weight_decay)) == pytest.approx(0.1)  # ours, kept
    ours_slots = [to_numpy(v) for v in ours.optimizer.variables if "momentum" in v.path]
    their_slots = [to_numpy(v) for v in keras_first.optimizer.variables if "momentum" in v.path]
    assert len(ours_slots) == len(their_slots) == 6
    for a, b in zip(ours_slots, their_slots, strict=True):
        np.testing.assert_array_equal(a, b)
        assert np.any(a)
    ours.optimizer.weight_decay = 0.004  # Keras's default, to compare the runs
    for model in (theirs, ours):
        train(None, x[200:], y[200:], model=model)
    assert max_difference(ours, theirs) <= 1e-6


@pytest.mark.parametrize("file", FILES)
@pytest.mark.parametrize("kwargs", [dict(), dict(offload_state=True)], ids=["auto", "offloaded"])
def test_ours_in_the_default_layout_loads_into_keras_adamw(tmp_path, file, kwargs):
    """Ours stores what Keras's AdamW stores (our weight_decay variable is
    config, not state): Keras's class resumes our run within 1e-6."""
    x, y = make_data(400)
    straight = train(AdamW(learning_rate=3e-3, **kwargs), x, y)
    first = train(AdamW(learning_rate=3e-3, **kwargs), x[:200], y[:200])
    save(first, tmp_path / file)
    theirs = resumed_from(tmp_path / file, keras.optimizers.AdamW(learning_rate=3e-3))
    assert int(to_numpy(theirs.optimizer.iterations)) == 25
    train(None, x[200:], y[200:], model=theirs)
    assert max_difference(theirs, straight) <= 1e-6


def test_ours_with_a_weight_decay_schedule_loads_into_keras_adamw(tmp_path):
    """Without a float weight decay ours stores exactly Keras's layout."""
    x, y = make_data(200)
    ours = train(AdamW(learning_rate=3e-3, weight_decay=WarmupCosineDecay(0.1, 0, 100)), x, y)
    ours.save_weights(tmp_path / "ours.weights.h5")
    theirs = resumed_from(tmp_path / "ours.weights.h5", keras.optimizers.AdamW())
    assert int(to_numpy(theirs.optimizer.iterations)) == 25
    for a, b in zip(theirs.optimizer.variables, ours.optimizer.variables, strict=True):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


LAYOUTS_OF_OURS = {
    "auto": dict(),
    "ops": dict(implementation="ops"),
    "offloaded": dict(offload_state=True),
    "bfloat16 state": dict(state_dtype="bfloat16"),
    "8-bit state": dict(state_dtype="int8"),
}


@pytest.mark.parametrize("saved", LAYOUTS_OF_OURS.values(), ids=LAYOUTS_OF_OURS.keys())
@pytest.mark.parametrize("loaded", LAYOUTS_OF_OURS.values(), ids=LAYOUTS_OF_OURS.keys())
def test_every_layout_loads_every_others_file(tmp_path, saved, loaded):
    """The state arrives as the loading layout stores it: exactly in
    float32, rounded in bfloat16, quantised block by block in 8 bits."""
    x, y = make_data(80)
    first = train(AdamW(learning_rate=3e-3, **saved), x, y)
    first.save_weights(tmp_path / "a.weights.h5")
    resumed = resumed_from(tmp_path / "a.weights.h5", AdamW(learning_rate=3e-3, **loaded))
    state_dtype = loaded.get("state_dtype", "float32")
    tolerance = {"float32": 0.0, "bfloat16": 2**-8, "int8": 2**-5}[state_dtype]
    pairs = zip(resumed.optimizer.get_weights(), first.optimizer.get_weights(), strict=True)
    for a, b in pairs:
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance * np.abs(b).max())
    assert int(to_numpy(resumed.optimizer.iterations)) == 10


def test_a_file_of_keras_adamw_0_1_with_its_weight_decay_variable_loads():
    """keras_adamw 0.1 stored our weight_decay variable after learning_rate."""
    x, y = make_data(80)
    first = train(AdamW(learning_rate=3e-3, weight_decay=0.02), x, y)
    state = first.optimizer.get_weights()
    old_file = {str(i): w for i, w in enumerate([*state[:2], np.float32(0.02), *state[2:]])}
    optimizer = AdamW(learning_rate=3e-3, weight_decay=0.05)
    optimizer.build(make_model().trainable_variables)
    optimizer.load_own_variables(old_file)
    for a, b in zip(optimizer.get_weights(), state, strict=True):
        np.testing.assert_array_equal(a, b)
    assert float(to_numpy(optimizer.weight_decay)) == pytest.approx(0.02)


def test_a_checkpoint_of_another_model_raises_before_loading_anything(tmp_path):
    x, y = make_data(80)
    other = keras.Sequential([keras.Input((8,)), keras.layers.Dense(5), keras.layers.Dense(1)])
    other.compile(optimizer=AdamW(), loss="mse")
    other.fit(x, y, batch_size=8, verbose=0)
    optimizer = AdamW()
    model = make_model()
    optimizer.build(model.trainable_variables)
    before = [to_numpy(v) for v in optimizer.variables]
    store = {str(i): w for i, w in enumerate(other.optimizer.get_weights())}
    store.update({str(i): np.zeros(1) for i in range(len(store), len(optimizer.variables))})
    with pytest.raises(ValueError, match=r"has shape .* comes from another model"):
        optimizer.load_own_variables(store)
    for a, b in zip(before, optimizer.variables, strict=True):
        np.testing.assert_array_equal(a, to_numpy(b))


@pytest.mark.parametrize("source_offloaded", [False, True])
def test_get_and_set_weights_carry_offloaded_state(source_offloaded):
    x, y = make_data(160)
    source = train(AdamW(learning_rate=3e-3, offload_state=source_offloaded), x[:80], y[:80])
    target_model = make_model()
    target_model.set_weights(source.get_weights())
    target = AdamW(learning_rate=3e-3, offload_state=not source_offloaded)
    target_model.compile(optimizer=target, loss="mse")
    target.build(target_model.trainable_variables)
    target.set_weights(source.optimizer.get_weights())
    if not source_offloaded:  # Keras's own idiom works as well
        target.set_weights(source.optimizer.variables)
    for model in (source, target_model):
        train(None, x[80:], y[80:], model=model)
    assert max_difference(source, target_model) <= 1e-6
    with pytest.raises(ValueError, match="set_weights got 2 arrays"):
        target.set_weights(target.get_weights()[:2])


def test_float8_layers_with_offloaded_state_save_and_load(tmp_path):
    """Keras gives float8 scale and history variables no slots; nor does offloading."""
    x, y = make_data(160)
    model = make_model()
    model.quantize("float8")
    model.compile(optimizer=AdamW(offload_state=True), loss="mse")
    model.fit(x[:80], y[:80], batch_size=8, verbose=0)
    slots = [m for m in model.optimizer._momentums if m is not None]
    reference = keras.optimizers.AdamW()
    reference.build(model.trainable_variables)
    assert len(slots) == len([v for v in reference.variables if "momentum" in v.path])
    model.save(tmp_path / "float8.keras")
    loaded = keras.saving.load_model(tmp_path / "float8.keras")
    for a, b in zip(loaded.optimizer.get_weights(), model.optimizer.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # Training goes on. (Not bitwise as an uninterrupted run: Keras's float8
    # layers do not resume exactly, with keras.optimizers.AdamW either.)
    loaded.fit(x[80:], y[80:], batch_size=8, verbose=0)
    assert all(np.isfinite(to_numpy(v)).all() for v in loaded.trainable_variables)


def test_numpy_and_backend_scalars_are_hyperparameters():
    x, y = make_data(160)
    plain = train(AdamW(learning_rate=3e-3, weight_decay=0.01, beta_1=0.9, epsilon=1.0), x, y)
    optimizer = AdamW(
        learning_rate=np.float64(3e-3),
        weight_decay=np.float32(0.01),
        beta_1=np.float32(0.9),
        epsilon=np.int64(1),
        amsgrad=np.bool_(False),
    )
    assert optimizer.beta_1 == float(np.float32(0.9))
    optimizer.beta_1 = 0.9  # np.float32(0.9) is not 0.9: compare like with like
    optimizer.weight_decay = np.float32(0.01)
    optimizer.weight_decay = keras.ops.convert_to_tensor(np.float32(0.01))
    scalars = train(optimizer, x, y)
    assert max_difference(plain, scalars) <= 1e-7


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(maximize="False"), TypeError, "maximize must be True or False, got 'False'"),
        (dict(offload_state="False"), TypeError, "offload_state must be True or False"),
        (dict(shard_state="False"), TypeError, "shard_state must be True or False"),
        (dict(amsgrad=1), TypeError, "amsgrad must be True or False, got 1"),
        (
            dict(exclude_from_weight_decay=5),
            ValueError,
            "exclude_from_weight_decay must be a list of regular expressions, got int",
        ),
        (dict(weight_decay=np.array([0.1, 0.2])), ValueError, "weight_decay must be a finite"),
    ],
)
def test_truthy_and_non_list_arguments_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        AdamW(**kwargs)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="raw tf.Variables")
@pytest.mark.parametrize("implementation", ["ops", "auto"])
def test_a_raw_tf_variable_is_updated_as_keras_does(implementation):
    import tensorflow as tf

    variables = [tf.Variable([[1.0, 2.0], [3.0, 4.0]]) for _ in range(2)]
    ours = AdamW(learning_rate=1.0, implementation=implementation)
    theirs = keras.optimizers.AdamW(learning_rate=1.0)
    for optimizer, variable in zip((ours, theirs), variables, strict=True):
        for _ in range(3):
            optimizer.apply_gradients([(tf.ones((2, 2)) * 0.5, variable)])
    np.testing.assert_allclose(variables[0].numpy(), variables[1].numpy(), atol=1e-6)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="raw tf.Variables")
@pytest.mark.parametrize("kwargs", [dict(offload_state=True), dict(state_dtype="int8")])
def test_a_raw_tf_variable_with_state_in_host_memory_raises_before_anything_is_written(kwargs):
    """Host memory of ours holds the state of Keras variables only: a clear
    error names the argument and the variable, and nothing is built or moved."""
    import tensorflow as tf

    keras_variable, raw = keras.Variable([[1.0, 2.0]]), tf.Variable([[3.0, 4.0]])
    optimizer = AdamW(learning_rate=1.0, **kwargs)
    needs = "offload_state=True" if "offload_state" in kwargs else 'state_dtype="int8"'
    with pytest.raises(ValueError, match=f"{needs} needs Keras variables.*ResourceVariable"):
        optimizer.apply_gradients([(tf.ones((1, 2)), keras_variable), (tf.ones((1, 2)), raw)])
    assert not optimizer.built
    assert int(to_numpy(optimizer.iterations)) == 0
    np.testing.assert_array_equal(to_numpy(keras_variable), [[1.0, 2.0]])
    np.testing.assert_array_equal(raw.numpy(), [[3.0, 4.0]])


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TF IndexedSlices")
@pytest.mark.parametrize("kwargs", [dict(implementation="ops"), dict(implementation="host")])
def test_indexed_slices_with_repeated_rows_equal_their_dense_sum(kwargs):
    """v must get (Σg)², not Σg²: duplicate rows are summed first."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    start = rng.standard_normal((4, 3)).astype("float32")
    sparse_variable, dense_variable = keras.Variable(start), keras.Variable(start)
    sparse, dense = AdamW(learning_rate=0.1, **kwargs), AdamW(learning_rate=0.1, **kwargs)
    for _ in range(3):
        values = rng.standard_normal((3, 3)).astype("float32")
        slices = tf.IndexedSlices(tf.constant(values), tf.constant([1, 1, 2]), (4, 3))
        sparse.apply_gradients([(slices, sparse_variable)])
        dense.apply_gradients([(tf.convert_to_tensor(slices), dense_variable)])
    np.testing.assert_allclose(to_numpy(sparse_variable), to_numpy(dense_variable), atol=1e-6)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.numpy_function run eagerly")
def test_offloaded_state_with_one_variable_runs_eagerly():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1, use_bias=False)])
    x, y = make_data(80)
    model.compile(optimizer=AdamW(offload_state=True), loss="mse", run_eagerly=True)
    model.fit(x, y, batch_size=8, verbose=0)
    assert int(to_numpy(model.optimizer.iterations)) == 10


@pytest.mark.skipif(BACKEND != "jax", reason="JAX BCOO")
@pytest.mark.parametrize("kwargs", [dict(), dict(offload_state=True), dict(implementation="ops")])
def test_a_bcoo_gradient_equals_its_dense_form(kwargs):
    from jax.experimental import sparse

    rng = np.random.default_rng(0)
    start = rng.standard_normal((4, 3)).astype("float32")
    sparse_variable, dense_variable = keras.Variable(start), keras.Variable(start)
    optimizers = AdamW(learning_rate=0.1, **kwargs), AdamW(learning_rate=0.1, **kwargs)
    for _ in range(3):
        gradient = rng.standard_normal((4, 3)).astype("float32") * (rng.random((4, 1)) > 0.5)
        optimizers[0].apply_gradients([(sparse.BCOO.fromdense(gradient), sparse_variable)])
        optimizers[1].apply_gradients([(gradient, dense_variable)])
    np.testing.assert_allclose(to_numpy(sparse_variable), to_numpy(dense_variable), atol=1e-6)
