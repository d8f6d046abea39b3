"""adamw_update and HostAdamW against the float64 reference."""

import numpy as np
import pytest
from reference import ReferenceAdamW

from keras_adamw import host

SHAPES = [(7,), (3, 5), (2, 3, 4), (1000,), (0,), (129, 33)]


def random_tensors(rng, shapes, scale=1.0):
    return [(rng.standard_normal(s) * scale).astype(np.float32) for s in shapes]


@pytest.mark.parametrize("epsilon_mode", ["keras", "torch"])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_fifty_steps_follow_the_float64_reference(epsilon_mode, amsgrad, maximize):
    rng = np.random.default_rng(0)
    params = random_tensors(rng, SHAPES)
    hyper = dict(learning_rate=3e-3, beta_1=0.85, beta_2=0.99, epsilon=1e-6, weight_decay=0.05)
    reference = ReferenceAdamW(
        params, epsilon_mode=epsilon_mode, amsgrad=amsgrad, maximize=maximize, **hyper
    )
    optimizer = host.HostAdamW(
        params, epsilon_mode=epsilon_mode, amsgrad=amsgrad, maximize=maximize, **hyper
    )
    for _ in range(50):
        grads = random_tensors(rng, SHAPES, scale=0.1)
        reference.step(grads)
        optimizer.step(grads)
    for ours, expected in zip(optimizer.params, reference.params, strict=True):
        # float32 storage rounds p each step: up to ~50 half-ulps of |p| accumulate.
        np.testing.assert_allclose(ours, expected, rtol=4e-6, atol=1e-6)
    for ours, expected in zip(optimizer.exp_avg_sqs, reference.v, strict=True):
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-12)


def test_grad_scale_divides_the_gradients_in_the_same_pass():
    rng = np.random.default_rng(1)
    params = random_tensors(rng, [(100,)])
    reference = ReferenceAdamW(params, learning_rate=1e-2)
    optimizer = host.HostAdamW(params, learning_rate=1e-2)
    for _ in range(10):
        scaled = random_tensors(rng, [(100,)], scale=1024.0)
        reference.step(scaled, grad_scale=1024.0)
        optimizer.step(scaled, grad_scale=1024.0)
    np.testing.assert_allclose(optimizer.params[0], reference.params[0], atol=1e-6)


def test_a_single_array_and_a_list_give_the_same_update():
    rng = np.random.default_rng(2)
    p, g = random_tensors(rng, [(33,), (33,)])
    single = [p.copy(), g, np.zeros(33, np.float32), np.zeros(33, np.float32)]
    listed = [[p.copy()], [g], [np.zeros(33, np.float32)], [np.zeros(33, np.float32)]]
    host.adamw_update(*single, step=1, learning_rate=0.1)
    host.adamw_update(*listed, step=1, learning_rate=0.1)
    assert np.array_equal(single[0], listed[0][0])
    assert not np.array_equal(single[0], p)


def test_decay_alone_is_the_closed_form():
    """Zero gradients leave only the decay: p·(1 − lr·wd) each step."""
    p = np.linspace(-2, 2, 50, dtype=np.float32)
    optimizer = host.HostAdamW([p], learning_rate=0.1, weight_decay=0.5)
    for _ in range(3):
        optimizer.step([np.zeros_like(p)])
    np.testing.assert_allclose(p, np.linspace(-2, 2, 50) * (1 - 0.1 * 0.5) ** 3, rtol=1e-6)


def test_hyperparameters_and_schedules_change_between_steps():
    rng = np.random.default_rng(3)
    params = random_tensors(rng, [(64,)])
    reference = ReferenceAdamW(params)
    optimizer = host.HostAdamW(params, learning_rate=lambda step: 1e-3 * step)
    for step in range(1, 6):
        if step == 4:
            optimizer.beta_1 = reference.beta_1 = 0.5
            optimizer.weight_decay = reference.weight_decay = 0.1
        reference.learning_rate = 1e-3 * step
        grads = random_tensors(rng, [(64,)], scale=0.1)
        reference.step(grads)
        optimizer.step(grads)
    np.testing.assert_allclose(optimizer.params[0], reference.params[0], atol=1e-6)


def test_state_dict_round_trip_continues_exactly():
    rng = np.random.default_rng(4)
    params = random_tensors(rng, [(10, 3), (5,)])
    grads = [random_tensors(rng, [(10, 3), (5,)]) for _ in range(6)]

    straight = host.HostAdamW([p.copy() for p in params], amsgrad=True, learning_rate=0.01)
    for g in grads:
        straight.step(g)

    first = host.HostAdamW([p.copy() for p in params], amsgrad=True, learning_rate=0.01)
    for g in grads[:3]:
        first.step(g)
    saved = first.state_dict()
    first.step(grads[3])  # a step after saving must not leak into the saved copy
    resumed = host.HostAdamW([p.copy() for p in first.params], amsgrad=True, learning_rate=0.5)
    # Parameters come back from a checkpoint too: rewind them to the saved step.
    rewind = host.HostAdamW([p.copy() for p in params], amsgrad=True, learning_rate=0.01)
    for g in grads[:3]:
        rewind.step(g)
    for own, p in zip(resumed.params, rewind.params, strict=True):
        own[...] = p
    resumed.load_state_dict(saved)
    assert resumed.iterations == 3 and resumed.learning_rate == 0.01
    for g in grads[3:]:
        resumed.step(g)
    for a, b in zip(
        resumed.params + resumed.amsgrad_max, straight.params + straight.amsgrad_max, strict=True
    ):
        assert np.array_equal(a, b)


def test_load_state_dict_checks_everything_before_changing_anything():
    optimizer = host.HostAdamW([np.ones(4, np.float32), np.ones(2, np.float32)])
    optimizer.step([np.ones(4, np.float32), np.ones(2, np.float32)])
    before = optimizer.state_dict()
    bad_shape = optimizer.state_dict()
    bad_shape["exp_avgs"][0] = np.zeros(4, np.float32)
    bad_shape["exp_avg_sqs"][1] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"exp_avg_sqs'\]\[1\] has shape \(3,\)"):
        optimizer.load_state_dict(bad_shape)
    bad_hyper = optimizer.state_dict()
    bad_hyper["exp_avgs"][0] = np.zeros(4, np.float32)
    bad_hyper["hyperparameters"]["beta_2"] = 1.5
    with pytest.raises(ValueError, match="beta_2"):
        optimizer.load_state_dict(bad_hyper)
    after = optimizer.state_dict()
    assert (
        after["iterations"] == before["iterations"] and after["hyperparameters"]["beta_2"] == 0.999
    )
    for a, b in zip(after["exp_avgs"], before["exp_avgs"], strict=True):
        assert np.array_equal(a, b)
