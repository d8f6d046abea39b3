"""bfloat16 and float16 variables (a "bfloat16" dtype policy), master weights,
bfloat16 state and stochastic rounding, on the keras.ops path.

References: the float64 NumPy AdamW (tests/reference.py) for one step from the
optimizer's own state, rounded to 16 bits by ml_dtypes; NumPy's nextafter for
the neighbours a stochastic rounding may pick.
"""

import ml_dtypes
import numpy as np
import pytest
from keras_helpers import BACKEND, keras, make_data, make_model, weights
from reference import ReferenceAdamW

from keras_adamw import AdamW, rounding

ops = keras.ops
NUMPY_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}
# How far float32 arithmetic may land from the float64 reference, relative
# to the magnitude of the terms summed (a sum may cancel), and relative to a
# step: the bias correction 1 − β₂ᵗ cancels in float32, in Keras's formula.
SUM_ERROR = 1e-6
STEP_ERROR = 1e-4


def values(x):
    return np.asarray(ops.convert_to_numpy(ops.cast(x, "float32")), np.float64)


def sixteen_bit(x, dtype):
    """float64 values rounded to nearest (even) in ``dtype``, back in float64."""
    return np.asarray(x).astype(np.float32).astype(NUMPY_DTYPES[dtype]).astype(np.float64)


def near_a_midpoint(x, dtype, error):
    """Where ``x`` lies within ``error`` of the midpoint of two ``dtype``
    neighbours, so that float32 arithmetic may round to either."""
    low, high = neighbours(x, dtype)
    return np.abs(x - (low + high) / 2) <= error


def neighbours(x, dtype):
    """The ``dtype`` values just below and just above float64 ``x`` (equal when exact)."""
    kind = NUMPY_DTYPES[dtype]
    nearest = np.asarray(x).astype(np.float32).astype(kind)
    up = np.nextafter(nearest, np.array(np.inf, kind))
    down = np.nextafter(nearest, np.array(-np.inf, kind))
    above = nearest.astype(np.float64) >= x
    low = np.where(above & (nearest.astype(np.float64) != x), down, nearest)
    high = np.where(above, nearest, up)
    return low.astype(np.float64), high.astype(np.float64)


def gradients(shape, steps, dtype, seed=0):
    """Gradients that are exact ``dtype`` values, as a 16-bit model's are."""
    rng = np.random.default_rng(seed)
    return [sixteen_bit(rng.standard_normal(shape) * 0.1, dtype) for _ in range(steps)]


def reference_step(p, m, v, grad, step, **hyperparameters):
    """One float64 step from (p, m, v) at 1-based ``step``: (p, m, v) after it."""
    reference = ReferenceAdamW([p], **hyperparameters)
    reference.m, reference.v, reference.step_count = [np.array(m)], [np.array(v)], step - 1
    reference.step([grad])
    return reference.params[0], reference.m[0], reference.v[0]


def built(optimizer, initial, dtype):
    variable = keras.Variable(initial.astype(NUMPY_DTYPES[dtype]), dtype=dtype, name="w")
    optimizer.build([variable])
    return variable


def apply(optimizer, variable, grad):
    optimizer.apply([ops.convert_to_tensor(grad.astype(np.float32), variable.dtype)], [variable])


HYPERPARAMETERS = dict(learning_rate=3e-3, weight_decay=0.1)
# The host path takes 16-bit variables and bf16 state on every backend:
# torch in place, JAX in the custom call, TensorFlow in its op.
IMPLEMENTATIONS = ["ops", "host"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_masters_follow_float32_adamw_and_the_variable_is_their_rounding(dtype, implementation):
    initial = sixteen_bit(np.random.default_rng(1).standard_normal((64, 33)), dtype)
    optimizer = AdamW(implementation=implementation, **HYPERPARAMETERS)
    variable = built(optimizer, initial, dtype)
    assert optimizer._on_host == (implementation == "host")
    master = optimizer._masters[0]
    assert str(master.dtype) == "float32" and str(optimizer._momentums[0].dtype) == "float32"
    np.testing.assert_array_equal(values(master), initial)
    reference = ReferenceAdamW([initial], **HYPERPARAMETERS)
    for grad in gradients(initial.shape, 20, dtype):
        apply(optimizer, variable, grad)
        reference.step([grad])
        np.testing.assert_allclose(values(master), reference.params[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(values(variable), sixteen_bit(values(master), dtype))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_without_masters_each_step_rounds_the_float32_result_to_nearest(dtype, implementation):
    initial = sixteen_bit(np.random.default_rng(2).standard_normal((64, 33)), dtype)
    optimizer = AdamW(implementation=implementation, master_weights=False, **HYPERPARAMETERS)
    variable = built(optimizer, initial, dtype)
    assert optimizer._on_host == (implementation == "host")
    assert optimizer._masters == [None]
    for step, grad in enumerate(gradients(initial.shape, 10, dtype), start=1):
        p, m, v = (values(x) for x in (variable, optimizer._momentums[0], optimizer._velocities[0]))
        expected, _, _ = reference_step(p, m, v, grad, step, **HYPERPARAMETERS)
        apply(optimizer, variable, grad)
        error = SUM_ERROR * np.abs(p) + STEP_ERROR * HYPERPARAMETERS["learning_rate"]
        clear = ~near_a_midpoint(expected, dtype, error)
        assert clear.mean() > 0.95  # most elements are checked
        np.testing.assert_array_equal(values(variable)[clear], sixteen_bit(expected, dtype)[clear])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bfloat16_state_stores_the_moments_rounded_to_nearest(implementation):
    initial = np.random.default_rng(3).standard_normal((64, 33))
    optimizer = AdamW(implementation=implementation, state_dtype="bfloat16", **HYPERPARAMETERS)
    variable = built(optimizer, initial, "float32")
    assert optimizer._on_host == (implementation == "host")
    assert optimizer._masters == [None]
    assert str(optimizer._momentums[0].dtype) == "bfloat16"
    for step, grad in enumerate(gradients(initial.shape, 10, "float32"), start=1):
        p, m, v = (values(x) for x in (variable, optimizer._momentums[0], optimizer._velocities[0]))
        expected_p, expected_m, expected_v = reference_step(p, m, v, grad, step, **HYPERPARAMETERS)
        apply(optimizer, variable, grad)
        for slot, expected, terms in (
            (optimizer._momentums[0], expected_m, np.abs(m) + np.abs(grad)),
            (optimizer._velocities[0], expected_v, v + grad**2),
        ):
            clear = ~near_a_midpoint(expected, "bfloat16", SUM_ERROR * terms)
            np.testing.assert_array_equal(
                values(slot)[clear], sixteen_bit(expected, "bfloat16")[clear]
            )
        np.testing.assert_allclose(values(variable), expected_p, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_stochastic_rounding_picks_a_neighbour_and_is_unbiased(dtype):
    rng = np.random.default_rng(4)
    exponents = rng.uniform(-20 if dtype == "float16" else -30, 10, 256)  # float16 subnormals too
    x = (rng.choice([-1, 1], 256) * 2.0**exponents).astype(np.float32).astype(np.float64)
    draws = 2000
    tiled = np.tile(x, (draws, 1))
    generator = keras.random.SeedGenerator(5)
    random = rounding.random_bits(tiled.shape, generator)
    rounded = values(rounding.stochastic(ops.convert_to_tensor(tiled, "float32"), dtype, random))
    low, high = neighbours(x, dtype)
    assert np.all((rounded == low) | (rounded == high))
    # Each draw is low or high with probabilities that make the mean x:
    # within 5 standard errors of it, the spread being at most (high - low)/2.
    error = np.abs(rounded.mean(axis=0) - x)
    assert np.all(error <= 5 * (high - low) / 2 / np.sqrt(draws) + 1e-12 * np.abs(x))
    both = (low != high) & ((x - low) / np.where(high > low, high - low, 1) > 0.1)
    assert both.sum() > 100 and np.all(np.abs(rounded[:, both] - low[both]).max(axis=0) > 0)


def test_stochastic_rounding_keeps_nan_and_exact_values():
    exact = np.array([np.nan, 0.0, -0.0, 1.0, -2.5, np.inf, -np.inf], np.float32)
    generator = keras.random.SeedGenerator(6)
    for dtype in ("bfloat16", "float16"):
        tiled = np.tile(exact, (100, 1))
        random = rounding.random_bits(tiled.shape, generator)
        rounded = values(rounding.stochastic(ops.convert_to_tensor(tiled), dtype, random))
        np.testing.assert_array_equal(rounded, np.tile(exact, (100, 1)).astype(np.float64))


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_steps_below_half_a_bfloat16_step_stall_to_nearest_and_add_up_stochastically(stochastic):
    # At 1.0 bfloat16 steps are 2^-8 below and 2^-7 above; Adam with a
    # constant gradient moves by the learning rate each step, a quarter step.
    lr, steps = 1e-3, 10
    optimizer = AdamW(lr, weight_decay=0.0, master_weights=False, stochastic_rounding=stochastic)
    variable = built(optimizer, np.ones(8192), "bfloat16")
    for _ in range(steps):
        apply(optimizer, variable, np.full(8192, 0.5))
    mean = values(variable).mean()
    if stochastic:
        standard_error = np.sqrt(steps) * 2.0**-8 / 2 / np.sqrt(8192)
        assert abs(mean - (1 - steps * lr)) < 5 * standard_error
    else:
        assert mean == 1.0


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_stochastic_rounding_of_bfloat16_state_is_unbiased(implementation):
    # v = (1 − β₂)·g² after one step, a value between two bfloat16 neighbours.
    grad = np.full(8192, 0.3)
    expected = (1 - 0.999) * 0.3**2
    low, high = neighbours(np.array([expected]), "bfloat16")
    optimizer = AdamW(
        state_dtype="bfloat16", stochastic_rounding=True, implementation=implementation
    )
    variable = built(optimizer, np.zeros(8192), "float32")
    apply(optimizer, variable, grad)
    stored = values(optimizer._velocities[0])
    assert set(np.unique(stored)) == {low[0], high[0]}
    standard_error = (high[0] - low[0]) / 2 / np.sqrt(8192)
    assert abs(stored.mean() - expected) < 5 * standard_error


CONFIGURATIONS = {
    f"{name}, {implementation}": dict(kwargs, implementation=implementation)
    for name, kwargs in {
        "masters": dict(),
        "masters, bfloat16 state": dict(state_dtype="bfloat16"),
        "stochastic": dict(master_weights=False, stochastic_rounding=True),
        "bfloat16 state, stochastic": dict(state_dtype="bfloat16", stochastic_rounding=True),
    }.items()
    for implementation in IMPLEMENTATIONS
}
# Host memory state of other kinds: offloaded, and 8-bit.
CONFIGURATIONS["masters, bfloat16 state, offloaded"] = dict(
    state_dtype="bfloat16", offload_state=True
)
CONFIGURATIONS["masters, int8 state"] = dict(state_dtype="int8")
CONFIGURATIONS["stochastic, int8 state"] = dict(
    state_dtype="int8", master_weights=False, stochastic_rounding=True
)


def bfloat16_fit(optimizer, x, y, model=None):
    model = model or make_model(dtype="bfloat16")
    if optimizer is not None:
        model.compile(optimizer=optimizer, loss="mse")
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    return model


@pytest.mark.parametrize(
    "kwargs",
    [dict(implementation="ops"), dict(implementation="host"), dict(offload_state=True)],
    ids=["ops", "host", "offloaded"],
)
def test_masters_start_from_the_variables_under_fit(kwargs):
    """TF builds the optimizer inside its traced step; each master must still
    start at its variable's value, so a first step moves a weight by about
    the learning rate and half a bfloat16 step (it once started at zero)."""
    x, y = make_data(8)
    model = make_model(dtype="bfloat16")
    before = weights(model)
    lr = 1e-3
    bfloat16_fit(AdamW(lr, **kwargs), x, y, model)  # one step
    for a, b in zip(weights(model), before, strict=True):
        half_a_step = 2.0**-8 * np.maximum(np.abs(b), np.abs(a))  # bfloat16: 8 bits
        assert np.all(np.abs(a - b) <= 1.01 * lr + half_a_step)


@pytest.mark.parametrize("kwargs", CONFIGURATIONS.values(), ids=CONFIGURATIONS.keys())
def test_saving_mid_training_continues_exactly(kwargs, tmp_path):
    x, y = make_data(320)
    straight = bfloat16_fit(AdamW(**kwargs), x, y)
    first = bfloat16_fit(AdamW(**kwargs), x[:160], y[:160])
    first.save(tmp_path / "half.keras")
    resumed = bfloat16_fit(None, x[160:], y[160:], keras.saving.load_model(tmp_path / "half.keras"))
    for a, b in zip(weights(resumed), weights(straight), strict=True):
        np.testing.assert_array_equal(a, b)
    pairs = zip(resumed.optimizer.variables, straight.optimizer.variables, strict=True)
    for a, b in pairs:
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(values(a), values(b))


def test_a_file_loads_into_another_state_dtype_converted(tmp_path):
    x, y = make_data(80)
    saved = bfloat16_fit(AdamW(state_dtype="bfloat16"), x, y)
    saved.save(tmp_path / "saved.keras")
    model = make_model(dtype="bfloat16")
    model.compile(optimizer=AdamW(state_dtype="float32"), loss="mse")
    model.optimizer.build(model.trainable_variables)
    model.load_weights(tmp_path / "saved.keras")
    assert str(model.optimizer._momentums[0].dtype) == "float32"
    assert str(saved.optimizer._momentums[0].dtype) == "bfloat16"
    for ours, theirs in zip(model.optimizer.variables, saved.optimizer.variables, strict=True):
        np.testing.assert_array_equal(values(ours), values(theirs))  # bfloat16 widens exactly


def test_masters_not_saved_are_made_from_the_variables_and_saved_ones_are_dropped(tmp_path):
    x, y = make_data(80)
    without = bfloat16_fit(AdamW(master_weights=False), x, y)
    without.save(tmp_path / "without.keras")
    with_masters = keras.saving.load_model(
        tmp_path / "without.keras", custom_objects={}, compile=False
    )
    with_masters.compile(optimizer=AdamW(master_weights=True), loss="mse")
    with_masters.optimizer.build(with_masters.trainable_variables)
    with_masters.load_weights(tmp_path / "without.keras")
    for master, variable in zip(
        with_masters.optimizer._masters, with_masters.trainable_variables, strict=True
    ):
        np.testing.assert_array_equal(values(master), values(variable))
    np.testing.assert_array_equal(
        values(with_masters.optimizer._momentums[0]), values(without.optimizer._momentums[0])
    )

    masters = bfloat16_fit(AdamW(), x, y)
    masters.save(tmp_path / "masters.keras")
    plain = make_model(dtype="bfloat16")
    plain.compile(optimizer=AdamW(master_weights=False), loss="mse")
    plain.optimizer.build(plain.trainable_variables)
    plain.load_weights(tmp_path / "masters.keras")
    np.testing.assert_array_equal(
        values(plain.optimizer._velocities[-1]), values(masters.optimizer._velocities[-1])
    )
    for a, b in zip(weights(plain), weights(masters), strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_dtype_options_are_rejected_before_training():
    with pytest.raises(TypeError, match="master_weights"):
        AdamW(master_weights="yes")
    with pytest.raises(TypeError, match="stochastic_rounding"):
        AdamW(stochastic_rounding=1)
    with pytest.raises(ValueError, match="state_dtype"):
        AdamW(state_dtype="float16")
    with pytest.raises(ValueError, match=r"state_dtype='int8' .* not \"ops\""):
        AdamW(state_dtype="int8", implementation="ops")
    float64 = keras.Variable(np.zeros(3), dtype="float64")
    with pytest.raises(ValueError, match=r"master_weights=True.*float64"):
        AdamW(master_weights=True).build([float64])
    with pytest.raises(ValueError, match=r"state_dtype=.bfloat16..*float64"):
        AdamW(state_dtype="bfloat16").build([float64])
    float32 = keras.Variable(np.zeros(3), dtype="float32")
    with pytest.raises(ValueError, match="stochastic_rounding=True needs something to round"):
        AdamW(stochastic_rounding=True).build([float32])
    bfloat16 = keras.Variable(np.zeros(3), dtype="bfloat16")
    with pytest.raises(ValueError, match="stochastic_rounding=True needs something to round"):
        AdamW(stochastic_rounding=True).build([bfloat16])  # its master is float32
    config = AdamW(master_weights=False, state_dtype="bfloat16").get_config()
    assert config["master_weights"] is False and config["state_dtype"] == "bfloat16"


def test_offloaded_masters_and_state_match_the_host_path_bitwise():
    x, y = make_data(160)
    kwargs = dict(state_dtype="bfloat16", stochastic_rounding=True)
    offloaded = bfloat16_fit(AdamW(offload_state=True, **kwargs), x, y)
    in_place = bfloat16_fit(AdamW(implementation="host", **kwargs), x, y)
    assert isinstance(offloaded.optimizer._masters[0], np.ndarray)
    assert offloaded.optimizer._momentums[0].dtype == ml_dtypes.bfloat16
    for a, b in zip(weights(offloaded), weights(in_place), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        offloaded.optimizer.get_weights(), in_place.optimizer.get_weights(), strict=True
    ):
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(BACKEND != "torch", reason="torch stages variables through host buffers")
@pytest.mark.parametrize(
    ("dtype", "bytes_per_parameter"), [("bfloat16", (2, 2)), ("float32", (8, 4))]
)
def test_offloaded_steps_move_16_bit_gradients_and_weights_only(
    dtype, bytes_per_parameter, monkeypatch
):
    """Variables on an accelerator are staged through host buffers. With
    masters in host memory only the 16-bit gradients go to the host and the
    16-bit weights come back: 4 bytes per parameter per step, not 12. (No
    accelerator here: the staging layer is made to stage CPU variables, and
    counts what it copies.)"""
    from keras_adamw.backends import torch as backend

    x, y = make_data(80)
    model = make_model(dtype=dtype)
    optimizer = AdamW(offload_state=True)
    reference = bfloat16_fit(AdamW(offload_state=True), x, y, make_model(dtype=dtype))
    monkeypatch.setattr(backend, "on_accelerator", lambda tensor: True)
    monkeypatch.setattr(backend, "CHUNK_ELEMENTS", 100)  # several chunks, pipelined
    bfloat16_fit(optimizer, x, y, model)
    staging = optimizer._host_path.staging
    parameters = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    steps = int(keras.ops.convert_to_numpy(optimizer.iterations))
    assert steps == 10
    to_host, to_device = bytes_per_parameter
    assert staging.bytes_to_host == steps * parameters * to_host
    assert staging.bytes_to_device == steps * parameters * to_device
    for a, b in zip(weights(model), weights(reference), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's host callback for offloaded state")
def test_jax_offloaded_masters_through_a_host_callback_match_the_host_state_call(monkeypatch):
    """On an accelerator JAX's offloaded state goes through an ordered host
    callback, which hands the kernel the masters and 16-bit copies; taking
    the CPU for one, it matches the custom call on host state bitwise."""
    from keras_adamw.backends import jax as backend

    x, y = make_data(160)
    kwargs = dict(state_dtype="bfloat16", stochastic_rounding=True, offload_state=True)
    by_reference = bfloat16_fit(AdamW(**kwargs), x, y)
    monkeypatch.setattr(backend, "state_by_reference", lambda: False)
    through_callback = bfloat16_fit(AdamW(**kwargs), x, y)
    for a, b in zip(weights(through_callback), weights(by_reference), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        through_callback.optimizer.get_weights(), by_reference.optimizer.get_weights(), strict=True
    ):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_state_is_the_host_kernels_8_bit_state(dtype):
    """state_dtype="int8": m and v (and v̂) are `host.QuantizedState`, which
    the step updates exactly as `host.adamw_update` does (its 8-bit format is
    checked against a NumPy reading in tests/host/test_dtypes.py)."""
    from keras_adamw import host

    initial = sixteen_bit(np.random.default_rng(8).standard_normal((300, 500)), dtype)
    optimizer = AdamW(state_dtype="int8", amsgrad=True, **HYPERPARAMETERS)
    variable = built(optimizer, initial, dtype)
    assert optimizer._on_host
    assert [type(s[0]) for s in optimizer._slot_lists()] == [host.QuantizedState] * 3
    params = initial.astype(np.float32)
    copies = initial.astype(ml_dtypes.bfloat16) if dtype == "bfloat16" else None
    state = [host.QuantizedState(initial.shape, moment=k) for k in (1, 2, 2)]
    # The rates as the optimizer holds them: float32 variables.
    lr, wd = (float(np.float32(HYPERPARAMETERS[k])) for k in ("learning_rate", "weight_decay"))
    for step, grad in enumerate(gradients(initial.shape, 4, dtype), start=1):
        apply(optimizer, variable, grad)
        host.adamw_update(
            params,
            grad.astype(NUMPY_DTYPES[dtype]),
            state[0],
            state[1],
            amsgrad_max=state[2],
            step=step,
            learning_rate=lr,
            weight_decay=wd * lr,  # coupled: the whole rate, as the kernel takes it
            weight_decay_mode="decoupled",
            # As Keras decays: p·(1 − lr·wd) on torch, p − p·lr·wd elsewhere.
            decay_form="multiply" if BACKEND == "torch" else "subtract",
            param_copies=copies,
        )
    np.testing.assert_array_equal(values(variable), (params if copies is None else copies))
    for ours, theirs in zip([s[0] for s in optimizer._slot_lists()], state, strict=True):
        np.testing.assert_array_equal(ours.codes, theirs.codes)
        np.testing.assert_array_equal(ours.scales, theirs.scales)
    # Saved as float32 values, which encode back to the same codes.
    weights_now = optimizer.get_weights()
    optimizer.set_weights(weights_now)
    for ours, theirs in zip([s[0] for s in optimizer._slot_lists()], state, strict=True):
        np.testing.assert_array_equal(ours.codes, theirs.codes)
