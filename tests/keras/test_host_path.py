"""implementation="host" and offload_state: the Rust kernel inside keras_adamw.AdamW."""

import numpy as np
import pytest
from keras_helpers import BACKEND, fit, keras, make_data, make_model, max_difference, weights

from keras_adamw import AdamW
from keras_adamw.schedules import WarmupCosineDecay

FEATURES = {
    "plain": {},
    "amsgrad, torch epsilon": dict(amsgrad=True, epsilon_mode="torch", epsilon=1e-8),
    "schedule, decoupled": dict(
        learning_rate=WarmupCosineDecay(3e-3, warmup_steps=10, decay_steps=90),
        weight_decay=0.05,
        weight_decay_mode="decoupled",
    ),
    "weight decay schedule": dict(weight_decay=WarmupCosineDecay(0.1, 0, 100)),
    "groups": dict(
        lr_multipliers={"out": 2.0, "norm": 0.5},
        weight_decay_multipliers={"hidden": 3.0},
        exclude_from_weight_decay=["bias"],
        weight_decay=0.05,
    ),
    "clipping": dict(global_clipnorm=0.05),
    "accumulation": dict(gradient_accumulation_steps=3),
    "ema": dict(use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=7),
    "loss scale": dict(loss_scale_factor=64.0),
    "maximize": dict(maximize=True, learning_rate=1e-4),
}


def apply_steps(optimizer, steps=100):
    """`steps` updates with a fixed sequence of random gradients (no feedback
    through a loss, so only the two paths' arithmetic can differ), run as the
    backend's trainer runs them (jitted stateless_apply on JAX)."""
    model = make_model()
    variables = model.trainable_variables
    rng = np.random.default_rng(0)
    sequence = [
        [
            keras.ops.convert_to_tensor(rng.standard_normal(v.shape).astype("float32") * 0.1)
            for v in variables
        ]
        for _ in range(steps)
    ]
    if BACKEND != "jax":
        for grads in sequence:
            optimizer.apply(grads, variables)
        return model
    import jax

    optimizer.build(variables)
    apply = jax.jit(optimizer.stateless_apply)
    state, values = [v.value for v in optimizer.variables], [v.value for v in variables]
    for grads in sequence:
        values, state = apply(state, grads, values)
    for variable, value in zip(variables, values, strict=True):
        variable.assign(value)
    return model


@pytest.mark.parametrize("kwargs", FEATURES.values(), ids=FEATURES.keys())
@pytest.mark.parametrize("offload_state", [False, True])
def test_host_path_matches_the_ops_path(kwargs, offload_state):
    ops_optimizer = AdamW(implementation="ops", **kwargs)
    host_optimizer = AdamW(implementation="host", offload_state=offload_state, **kwargs)
    ops, on_host = apply_steps(ops_optimizer), apply_steps(host_optimizer)
    assert host_optimizer._on_host and not ops_optimizer._on_host
    assert max_difference(on_host, ops) <= 1e-6


@pytest.mark.skipif(BACKEND != "torch", reason="torch's staging of accelerator variables")
@pytest.mark.parametrize("name", ["plain", "amsgrad, torch epsilon", "groups", "accumulation"])
def test_torch_offload_stages_accelerator_variables_through_host_buffers(name, monkeypatch):
    """No accelerator here: CPU tensors are taken for accelerator ones, so the
    staging path (copy in, update on the host, copy back) runs as it would."""
    from keras_adamw.backends import torch as module

    staged = []
    monkeypatch.setattr(module, "on_accelerator", lambda tensor: staged.append(tensor) or True)
    monkeypatch.setattr(module, "CHUNK_ELEMENTS", 10)  # a chunk per variable
    ops = apply_steps(AdamW(implementation="ops", **FEATURES[name]))
    offloaded = AdamW(offload_state=True, **FEATURES[name])
    on_host = apply_steps(offloaded)
    assert staged and offloaded._host_path.staging.buffers
    assert max_difference(on_host, ops) <= 1e-6


@pytest.mark.skipif(BACKEND != "torch", reason="torch's staging of accelerator variables")
def test_torch_staging_chunks_cut_at_the_chunk_size_without_splitting_a_variable(monkeypatch):
    import torch

    from keras_adamw.backends import torch as module

    monkeypatch.setattr(module, "CHUNK_ELEMENTS", 10)
    tensors = [torch.zeros(n) for n in [4, 4, 4, 30, 1, 9, 2]]
    assert module.chunks([0, 1, 2, 3, 4, 5, 6], tensors) == [[0, 1, 2], [3], [4, 5], [6]]
    assert module.chunks([1, 3, 6], tensors) == [[1, 3], [6]]
    assert module.chunks([], tensors) == []


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's host callback for offloaded state")
@pytest.mark.parametrize("name", ["plain", "amsgrad, torch epsilon", "groups", "accumulation"])
def test_jax_offload_through_a_host_callback_as_on_an_accelerator(name, monkeypatch):
    """No accelerator here: the CPU is taken for one, so the offloaded state
    is updated through an ordered host callback, as it would be there."""
    from keras_adamw.backends import jax as module

    monkeypatch.setattr(module, "state_by_reference", lambda: False)
    ops = apply_steps(AdamW(implementation="ops", **FEATURES[name]))
    on_host = apply_steps(AdamW(offload_state=True, **FEATURES[name]))
    assert max_difference(on_host, ops) <= 1e-6


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
@pytest.mark.parametrize("offload_state", [False, True])
def test_host_path_trains_under_fit_like_the_ops_path(policy, offload_state):
    """Under fit, rounding differences of any two float32 implementations grow
    through the loss; they stay small. mixed_float16 wraps the optimizer in a
    LossScaleOptimizer, which hands the host path unscaled gradients."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        ops = fit(AdamW(implementation="ops", weight_decay=0.05), model=make_model())
        on_host = AdamW(implementation="host", offload_state=offload_state, weight_decay=0.05)
        on_host = fit(on_host, model=make_model())
    finally:
        keras.config.set_dtype_policy(previous)
    inner = getattr(on_host.optimizer, "inner_optimizer", on_host.optimizer)
    assert inner._on_host
    assert max_difference(on_host, ops) <= 1e-5


def test_auto_picks_the_host_kernel_for_cpu_float32_variables():
    model = fit(AdamW(), steps=2)
    assert model.optimizer._on_host


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's trainer donates the variables' buffers")
@pytest.mark.parametrize("kwargs", [{}, dict(amsgrad=True, lr_multipliers={"out": 2.0})])
def test_jax_train_steps_update_the_donated_buffers_in_place(kwargs):
    """As Keras's JAX trainer runs it (state in and out in one structure,
    donated), the compiled step copies no float32 buffer: the kernel writes the
    variables' own memory. (The ops path copies none either; the host path's
    custom call would need copies were its results not aliased.)"""
    import jax

    model, optimizer = make_model(), AdamW(implementation="host", **kwargs)
    variables = model.trainable_variables
    optimizer.build(variables)

    def train_step(state, grads):
        trainable, optimizer_variables = state
        return optimizer.stateless_apply(optimizer_variables, grads, trainable)

    state = ([v.value for v in variables], [v.value for v in optimizer.variables])
    grads = [np.ones(v.shape, "float32") for v in variables]
    compiled = jax.jit(train_step, donate_argnums=0).lower(state, grads).compile().as_text()
    assert 'custom_call_target="keras_adamw_adamw_update"' in compiled
    assert [line for line in compiled.splitlines() if " copy(" in line and "f32[" in line] == []


@pytest.mark.skipif(BACKEND != "jax", reason="JAX: whether the caller donates the state")
def test_jax_auto_runs_the_kernel_under_keras_trainer_and_ops_in_other_jitted_steps(
    monkeypatch,
):
    """Keras's trainer donates its state, so "auto" runs the custom call
    there; a jitted custom loop may not donate (and then the aliased custom
    call would copy every buffer first), so "auto" takes the ops path there,
    and "host" asks for the kernel."""
    import jax

    from keras_adamw.backends import jax as module

    kernel_traces = []
    adamw_update = module.xla.adamw_update
    monkeypatch.setattr(
        module.xla,
        "adamw_update",
        lambda *args, **kwargs: kernel_traces.append(1) or adamw_update(*args, **kwargs),
    )
    fit(AdamW(), steps=2)
    assert kernel_traces, "fit with auto did not run the kernel"

    def custom_call_in_jitted_step(optimizer):
        model = make_model()
        variables = model.trainable_variables
        optimizer.build(variables)
        state = [v.value for v in optimizer.variables]
        grads = [np.ones(v.shape, "float32") for v in variables]
        step = jax.jit(optimizer.stateless_apply)
        hlo = step.lower(state, grads, [v.value for v in variables]).as_text()
        return "keras_adamw_adamw_update" in hlo

    assert not custom_call_in_jitted_step(AdamW())
    assert custom_call_in_jitted_step(AdamW(implementation="host"))
    # Offloaded state on CPU: the custom call, the state named by reference.
    assert custom_call_in_jitted_step(AdamW(offload_state=True))


def test_offloaded_state_is_not_a_keras_variable_yet_is_saved_exactly(tmp_path):
    x, y = make_data(400)
    kwargs = dict(amsgrad=True, offload_state=True, learning_rate=3e-3)
    straight = make_model()
    straight.compile(optimizer=AdamW(**kwargs), loss="mse")
    straight.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)

    first = make_model()
    first.compile(optimizer=AdamW(**kwargs), loss="mse")
    first.fit(x[:200], y[:200], batch_size=8, epochs=1, shuffle=False, verbose=0)
    slot_names = ("momentum", "velocity", "velocity_hat")
    assert not [v.path for v in first.optimizer.variables if any(s in v.path for s in slot_names)]
    assert all(isinstance(m, np.ndarray) for m in first.optimizer._momentums)
    first.save(tmp_path / "offloaded.keras")

    resumed = keras.saving.load_model(tmp_path / "offloaded.keras")
    for a, b in zip(resumed.optimizer._velocity_hats, first.optimizer._velocity_hats, strict=True):
        np.testing.assert_array_equal(a, b)
        assert np.any(a)
    resumed.fit(x[200:], y[200:], batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(weights(resumed), weights(straight), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="XLA compiles TensorFlow's step")
def test_tensorflow_under_xla_refuses_the_host_path_clearly_and_auto_takes_ops():
    for kwargs in (dict(implementation="host"), dict(offload_state=True)):
        with pytest.raises(
            ValueError, match="XLA cannot compile: compile the model with jit_compile=False"
        ):
            fit(AdamW(**kwargs), steps=1, jit_compile=True)
    auto = fit(AdamW(), jit_compile=True)
    assert auto.optimizer._on_host  # host where the step is not compiled by XLA
    assert max_difference(auto, fit(AdamW(implementation="ops"), jit_compile=True)) == 0


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute")
def test_offloading_refuses_tf_distribute_clearly_and_auto_takes_the_op():
    import tensorflow as tf

    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        with pytest.raises(ValueError, match=r"needs variables outside tf.distribute, or a Mirr"):
            fit(AdamW(offload_state=True), steps=1)
        assert fit(AdamW(), steps=1).optimizer._on_host


def test_bad_implementation_arguments():
    with pytest.raises(ValueError, match="implementation must be one of 'auto', 'ops', 'host'"):
        AdamW(implementation="rust")
    with pytest.raises(ValueError, match="offload_state=True keeps the state in host memory"):
        AdamW(implementation="ops", offload_state=True)


@pytest.mark.skipif(BACKEND == "torch", reason="torch variables are updated in place by design")
def test_values_read_out_of_the_variables_do_not_change_with_later_steps():
    """TF may hand the host path's result arrays to the variables, and JAX may
    share a donated buffer with NumPy: a value read out must stay as read."""
    model = make_model()
    model.compile(optimizer=AdamW(implementation="host"), loss="mse")
    x, y = make_data(64)
    model.fit(x, y, batch_size=8, verbose=0)
    variables = model.trainable_variables + model.optimizer.variables
    read = [np.asarray(keras.ops.convert_to_numpy(v)) for v in variables]
    kept = [a.copy() for a in read]
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    for a, b in zip(read, kept, strict=True):
        np.testing.assert_array_equal(a, b)
    trained = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
    assert any(not np.array_equal(a, b) for a, b in zip(trained, kept, strict=False))


@pytest.mark.skipif(BACKEND != "torch", reason="torch's foreach path")
def test_torch_ops_path_runs_foreach_over_groups_not_per_variable(monkeypatch):
    """Matched against Keras and the host kernel by the parity tests; here, that
    those tests exercise the batched path and not the per-variable fallback."""

    def per_variable(*args):
        raise AssertionError("the per-variable update ran")

    monkeypatch.setattr(AdamW, "update_step", per_variable)
    fit(AdamW(implementation="ops", **FEATURES["groups"]), steps=3)
    fit(AdamW(implementation="ops", amsgrad=True, epsilon_mode="torch", maximize=True), steps=3)
