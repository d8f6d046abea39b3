"""The host path on TensorFlow as a TensorFlow op (rust/tensorflow_op.rs)."""

import numpy as np
import pytest
from keras_helpers import BACKEND, fit, max_difference
from reference import ReferenceAdamW

from keras_adamw import AdamW
from keras_adamw.schedules import WarmupCosineDecay

pytestmark = pytest.mark.skipif(BACKEND != "tensorflow", reason="a TensorFlow op")

FEATURES = {
    "plain": {},
    "amsgrad, torch epsilon": dict(amsgrad=True, epsilon_mode="torch", epsilon=1e-8),
    "schedule, decoupled": dict(
        learning_rate=WarmupCosineDecay(3e-3, warmup_steps=10, decay_steps=90),
        weight_decay=0.05,
        weight_decay_mode="decoupled",
    ),
    "groups": dict(
        lr_multipliers={"out": 2.0, "norm": 0.5},
        weight_decay_multipliers={"hidden": 3.0},
        exclude_from_weight_decay=["bias"],
        weight_decay=0.05,
    ),
    "maximize": dict(maximize=True, learning_rate=1e-4),
}


@pytest.mark.parametrize("kwargs", FEATURES.values(), ids=FEATURES.keys())
def test_fit_runs_the_op_and_matches_the_numpy_function_path_bitwise(kwargs, monkeypatch):
    """The same kernel with the same rates: the op and the tf.numpy_function
    fallback (taken where the op cannot be registered) agree to the bit."""
    from keras_adamw.backends import tensorflow as backend

    op = backend.update_op()
    assert op is not None, "the op registers with the TensorFlow the tests run"
    calls = []

    def counted(**kwargs):
        calls.append(kwargs["params"].shape)
        return op(**kwargs)

    monkeypatch.setattr(backend, "update_op", lambda: counted)
    with_op = fit(AdamW(implementation="host", **kwargs), steps=60)
    shapes = [tuple(v.shape) for v in with_op.trainable_variables]
    assert calls and len(calls) % len(shapes) == 0, "one op per variable, per trace"
    assert sorted(map(tuple, calls[: len(shapes)])) == sorted(shapes)
    monkeypatch.setattr(backend, "update_op", lambda: None)
    with_numpy_function = fit(AdamW(implementation="host", **kwargs), steps=60)
    assert max_difference(with_op, with_numpy_function) == 0


@pytest.mark.parametrize("name", ["plain", "amsgrad, torch epsilon", "groups", "maximize"])
def test_offloaded_state_runs_its_op_in_place_and_matches_the_numpy_function_path(
    name, monkeypatch
):
    """Offloaded state: KerasAdamwUpdateHostState updates the host arrays by
    reference and returns only the new parameters; the same as the
    tf.numpy_function fallback, to the bit, state included."""
    from keras_adamw.backends import tensorflow as backend

    op = backend.host_state_op()
    assert op is not None, "the op registers with the TensorFlow the tests run"
    calls = []

    def counted(**kwargs):
        calls.append(kwargs["host_state"])
        return op(**kwargs)

    monkeypatch.setattr(backend, "host_state_op", lambda: counted)
    with_op = fit(AdamW(offload_state=True, **FEATURES[name]), steps=60)
    assert len(set(calls)) == len(with_op.trainable_variables), "one state per variable"
    monkeypatch.setattr(backend, "host_state_op", lambda: None)
    with_numpy_function = fit(AdamW(offload_state=True, **FEATURES[name]), steps=60)
    assert max_difference(with_op, with_numpy_function) == 0
    states = [o.optimizer.get_weights() for o in (with_op, with_numpy_function)]
    for a, b in zip(*states, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("epsilon_mode", ["keras", "torch"])
def test_the_op_matches_the_float64_reference(amsgrad, epsilon_mode):
    import tensorflow as tf

    from keras_adamw.backends.tensorflow import update_op

    rng = np.random.default_rng(1)
    params = rng.standard_normal((33, 65)).astype(np.float32)
    reference = ReferenceAdamW(
        [params], learning_rate=1e-2, epsilon_mode=epsilon_mode, amsgrad=amsgrad
    )
    p, m, v = params, np.zeros_like(params), np.zeros_like(params)
    hats = [np.zeros_like(params)] if amsgrad else []
    for step in range(1, 21):
        g = rng.standard_normal(params.shape).astype(np.float32)
        reference.step([g])
        rate = reference.weight_decay * reference.learning_rate  # coupled, as Keras
        new = update_op()(
            params=p,
            exp_avg=m,
            exp_avg_sq=v,
            max_exp_avg_sq=hats,
            param_copy=[],
            grads=g,
            step=tf.constant(step, tf.int64),
            rates=tf.constant([1e-2, rate, 0.9, 0.999, 1e-7], tf.float64),
            epsilon_mode=epsilon_mode,
            weight_decay_mode="decoupled",
            decay_form="subtract",
        )
        p, m, v, *hats = (x.numpy() for x in tf.nest.flatten(new))
    np.testing.assert_allclose(p, reference.params[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m, reference.m[0], rtol=1e-5, atol=1e-7)


SIXTEEN_BIT = {
    "bf16 params and grads": ("bfloat16", "float32", "nearest", None),
    "f16 params, bf16 state, stochastic": ("float16", "bfloat16", "stochastic", None),
    "bf16 state": ("float32", "bfloat16", "nearest", None),
    "f32 masters, bf16 copies": ("float32", "float32", "nearest", "bfloat16"),
    "f32 masters, f16 copies, bf16 state, stochastic": (
        "float32",
        "bfloat16",
        "stochastic",
        "float16",
    ),
}


@pytest.mark.parametrize(
    ("params_dtype", "state_dtype", "rounding", "copy_dtype"),
    SIXTEEN_BIT.values(),
    ids=SIXTEEN_BIT.keys(),
)
def test_the_op_on_sixteen_bit_data_matches_the_host_kernel_bitwise(
    params_dtype, state_dtype, rounding, copy_dtype
):
    """The op reads and writes each input's own dtype, and writes float32
    masters' 16-bit copies in the same pass; the same kernel as
    keras_adamw.host (large enough to run in chunks on several threads)."""
    import ml_dtypes
    import tensorflow as tf

    from keras_adamw import host
    from keras_adamw.backends.tensorflow import update_op

    def dtype(name):
        return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)

    rng = np.random.default_rng(7)
    shape = (300, 700)
    expected = dict(
        params=rng.standard_normal(shape).astype(dtype(params_dtype)),
        grads=(rng.standard_normal(shape) * 0.1).astype(dtype(copy_dtype or params_dtype)),
        exp_avgs=(rng.standard_normal(shape) * 0.01).astype(dtype(state_dtype)),
        exp_avg_sqs=np.abs(rng.standard_normal(shape) * 0.01).astype(dtype(state_dtype)),
    )
    copies = None if copy_dtype is None else expected["params"].astype(dtype(copy_dtype))
    current = {k: tf.constant(v) for k, v in expected.items()}
    current["param_copy"] = [] if copies is None else [tf.constant(copies)]
    stochastic = rounding == "stochastic"
    for step in (1, 2):
        rates = [1e-2, 1e-3, 0.9, 0.999, 1e-7] + ([11.0] if stochastic else [])
        params, m, v, _, param_copy = update_op()(
            params=current["params"],
            exp_avg=current["exp_avgs"],
            exp_avg_sq=current["exp_avg_sqs"],
            max_exp_avg_sq=[],
            param_copy=current["param_copy"],
            grads=current["grads"],
            step=tf.constant(step, tf.int64),
            rates=tf.constant(rates, tf.float64),
            epsilon_mode="keras",
            weight_decay_mode="decoupled",
            stochastic=stochastic,
        )
        current.update(params=params, exp_avgs=m, exp_avg_sqs=v, param_copy=param_copy)
        host.adamw_update(
            **expected,
            step=step,
            learning_rate=1e-2,
            weight_decay=1e-3,
            weight_decay_mode="decoupled",
            param_copies=copies,
            rounding=rounding,
            seed=11,
        )
    if copies is not None:
        assert current["param_copy"][0].numpy().dtype == copies.dtype
        np.testing.assert_array_equal(current["param_copy"][0].numpy(), copies)
    for name in ("params", "exp_avgs", "exp_avg_sqs"):
        got = current[name].numpy()
        assert got.dtype == expected[name].dtype, name
        np.testing.assert_array_equal(got, expected[name], err_msg=name)


HOST_STATE_SIXTEEN_BIT = {
    "bf16 params, masters, bf16 state": ("bfloat16", True, "bfloat16", "nearest"),
    "f16 params, masters, int8 state": ("float16", True, "int8", "nearest"),
    "bf16 params, stochastic, int8 state": ("bfloat16", False, "int8", "stochastic"),
}


@pytest.mark.parametrize(
    ("params_dtype", "masters", "state_dtype", "rounding"),
    HOST_STATE_SIXTEEN_BIT.values(),
    ids=HOST_STATE_SIXTEEN_BIT.keys(),
)
def test_the_host_state_op_on_sixteen_bit_data_matches_the_host_kernel_bitwise(
    params_dtype, masters, state_dtype, rounding
):
    """Host state of bfloat16 or 8-bit moments, and float32 masters whose
    rounded copies the op returns as the new 16-bit params."""
    import ml_dtypes
    import tensorflow as tf

    from keras_adamw import host
    from keras_adamw.backends.tensorflow import host_state_op

    def dtype(name):
        return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)

    def state_of(values, moment):
        if state_dtype == "int8":
            return host.QuantizedState.from_float(values, moment=moment)
        return values.astype(dtype(state_dtype))

    rng = np.random.default_rng(8)
    shape = (300, 700)
    master = rng.standard_normal(shape).astype(np.float32)
    grads = (rng.standard_normal(shape) * 0.1).astype(dtype(params_dtype))
    expected = dict(
        params=master.copy() if masters else master.astype(dtype(params_dtype)),
        exp_avgs=state_of(rng.standard_normal(shape) * 0.01, 1),
        exp_avg_sqs=state_of(np.abs(rng.standard_normal(shape) * 0.01), 2),
    )
    copies = master.astype(dtype(params_dtype)) if masters else None
    held = {k: v.copy() for k, v in expected.items() if k != "params" or masters}
    state = host.HostState(
        [held["exp_avgs"]], [held["exp_avg_sqs"]], masters=[held["params"]] if masters else None
    )
    params = tf.constant(copies if masters else expected["params"])
    stochastic = rounding == "stochastic"
    for step in (1, 2):
        rates = [1e-2, 1e-3, 0.9, 0.999, 1e-7] + ([11.0] if stochastic else [])
        params = host_state_op()(
            params=params,
            grads=tf.constant(grads),
            step=tf.constant(step, tf.int64),
            rates=tf.constant(rates, tf.float64),
            host_state=state.id,
            epsilon_mode="keras",
            weight_decay_mode="decoupled",
            stochastic=stochastic,
        )
        host.adamw_update(
            expected["params"],
            grads,
            expected["exp_avgs"],
            expected["exp_avg_sqs"],
            step=step,
            learning_rate=1e-2,
            weight_decay=1e-3,
            weight_decay_mode="decoupled",
            param_copies=copies,
            rounding=rounding,
            seed=11,
        )
    want = copies if masters else expected["params"]
    assert params.numpy().dtype == want.dtype
    np.testing.assert_array_equal(params.numpy(), want)
    for name, got in held.items():
        if isinstance(got, host.QuantizedState):
            got, expected[name] = got.codes, expected[name].codes
        np.testing.assert_array_equal(got, expected[name], err_msg=name)


def call_op(**changes):
    import tensorflow as tf

    from keras_adamw.backends.tensorflow import update_op

    zeros = np.zeros((4, 3), np.float32)
    arguments = dict(
        params=zeros + 1,
        exp_avg=zeros,
        exp_avg_sq=zeros,
        max_exp_avg_sq=[],
        param_copy=[],
        grads=zeros + 0.5,
        step=tf.constant(1, tf.int64),
        rates=tf.constant([1e-3, 0.0, 0.9, 0.999, 1e-7], tf.float64),
        epsilon_mode="keras",
        weight_decay_mode="decoupled",
    )
    return update_op()(**{**arguments, **changes})


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(grads=np.zeros((3, 4), np.float32)), r"grads has shape \[3, 4\] where params"),
        (dict(exp_avg_sq=np.zeros(12, np.float32)), "exp_avg_sq has shape"),
        (dict(step=np.int64(0)), "step must be an integer >= 1, got 0"),
        (dict(rates=np.array([1e-3, 0.0], np.float64)), "rates must be 5 float64"),
        (dict(rates=np.array([np.nan, 0, 0.9, 0.999, 1e-7])), "learning_rate"),
        (dict(rates=np.array([1e-3, 0, 1.5, 0.999, 1e-7])), "beta_1"),
        (dict(epsilon_mode="bogus"), "epsilon_mode"),
        (dict(decay_form="bogus"), "decay_form"),
        (dict(max_exp_avg_sq=[np.zeros((4, 3), np.float32)] * 2), "amsgrad must be 0 or 1"),
        (dict(param_copy=[np.zeros((3, 4), np.float16)]), r"param_copy has shape \[3, 4\]"),
        (dict(param_copy=[np.zeros((4, 3), np.float16)] * 2), "copies must be 0 or 1"),
    ],
)
def test_the_op_rejects_bad_input_with_an_error_naming_it(changes, message):
    import tensorflow as tf

    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        call_op(**changes)
    new_params = call_op()[0].numpy()  # and the op still works afterwards
    assert np.all(new_params < 1)


def test_registration_names_a_missing_library_and_can_be_retried(tmp_path):
    """In a fresh process, since a process registers the op once."""
    import subprocess
    import sys

    script = """
import tensorflow
from keras_adamw import _core
from keras_adamw.backends.tensorflow import framework_library
try:
    _core.register_tensorflow_op("/nonexistent/libtensorflow_framework.so.2")
except RuntimeError as error:
    print("refused:", error)
print("registered:", _core.register_tensorflow_op(framework_library()))
"""
    run = subprocess.run(
        [sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "refused: TensorFlow's framework library /nonexistent/" in run.stdout
    assert "is not loaded in this process" in run.stdout
    assert "registered: KerasAdamwUpdate" in run.stdout


def test_graph_of_a_host_step_holds_the_op_and_no_python_function():
    import keras
    import tensorflow as tf

    variable = keras.Variable(np.ones((5, 2), np.float32))
    optimizer = AdamW(implementation="host")
    optimizer.build([variable])
    step = tf.function(lambda g: optimizer.apply([g], [variable]))
    graph = step.get_concrete_function(tf.TensorSpec((5, 2), tf.float32)).graph
    types = {op.type for op in graph.get_operations()}
    assert "KerasAdamwUpdate" in types
    assert not types & {"PyFunc", "PyFuncStateless", "EagerPyFunc"}


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the TensorFlow op")
def test_the_host_state_op_refuses_a_freed_state_and_a_state_of_another_shape():
    import gc

    import tensorflow as tf

    from keras_adamw.backends.tensorflow import host_state_op
    from keras_adamw.host import HostState

    m, v = np.zeros(6, np.float32), np.zeros(6, np.float32)
    arguments = dict(
        params=tf.ones(6),
        grads=tf.ones(6),
        step=tf.constant(1, tf.int64),
        rates=tf.constant([1e-3, 0.0, 0.9, 0.999, 1e-7], tf.float64),
        epsilon_mode="keras",
        weight_decay_mode="coupled",
    )
    state = HostState([m], [v])
    host_state_op()(**arguments, host_state=state.id)
    assert m.any() and v.any(), "the op updated the host arrays in place"
    with pytest.raises(tf.errors.InvalidArgumentError, match="holds exp_avg of"):
        host_state_op()(
            **{**arguments, "params": tf.ones(5), "grads": tf.ones(5)}, host_state=state.id
        )
    freed, before = state.id, m.copy()
    del state
    gc.collect()
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=f"host_state {freed} is not registered"
    ):
        host_state_op()(**arguments, host_state=freed)
    np.testing.assert_array_equal(m, before)
