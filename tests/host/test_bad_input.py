"""Bad input: a clear exception naming the argument, and nothing written."""

import numpy as np
import pytest

from keras_adamw import host

N_TENSORS = 3


def fresh():
    """Three tensors per argument; bad values go into the last, so a partial update would show."""
    rng = np.random.default_rng(0)
    make = lambda: [rng.standard_normal(6).astype(np.float32) for _ in range(N_TENSORS)]  # noqa: E731
    return dict(
        params=make(), grads=make(), exp_avgs=make(), exp_avg_sqs=make(), amsgrad_max=make()
    )


def with_last(args, name, value):
    args[name] = [*args[name][:-1], value]
    return args


def read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


ARRAY_CASES = [
    (
        "params float64",
        lambda a: with_last(a, "params", a["params"][-1].astype(np.float64)),
        TypeError,
        r"params\[2\] must have dtype float32, bfloat16 or float16, got float64",
    ),
    (
        "grads int",
        lambda a: with_last(a, "grads", np.ones(6, np.int32)),
        TypeError,
        r"grads\[2\] must have dtype float32",
    ),
    (
        "not an array",
        lambda a: with_last(a, "exp_avgs", [0.0] * 6),
        TypeError,
        r"exp_avgs\[2\] must be a NumPy array or torch CPU tensor of float32, bfloat16 or "
        r"8-bit block-wise, got list",
    ),
    (
        "None in a list",
        lambda a: with_last(a, "grads", None),
        TypeError,
        r"grads\[2\] must be a NumPy array or torch CPU tensor of float32, bfloat16 or "
        r"float16, got NoneType",
    ),
    (
        "shape",
        lambda a: with_last(a, "exp_avg_sqs", np.zeros((2, 3), np.float32)),
        ValueError,
        r"exp_avg_sqs\[2\] has shape \[2, 3\] where params\[2\] has shape \[6\]",
    ),
    (
        "list length",
        lambda a: a | {"grads": a["grads"][:2]},
        ValueError,
        "grads has 2 arrays where params has 3",
    ),
    (
        "amsgrad list length",
        lambda a: a | {"amsgrad_max": a["amsgrad_max"][:1]},
        ValueError,
        "amsgrad_max has 1 arrays where params has 3",
    ),
    ("empty", lambda a: {k: [] for k in a}, ValueError, "params is empty"),
    (
        "non-contiguous",
        lambda a: with_last(a, "params", np.zeros(12, np.float32)[::2]),
        ValueError,
        r"params\[2\] is not C-contiguous",
    ),
    (
        "fortran order",
        lambda a: {k: [np.zeros((3, 2), np.float32, order="F")] for k in a},
        ValueError,
        r"params\[0\] is not C-contiguous",
    ),
    (
        "read-only param",
        lambda a: with_last(a, "params", read_only(a["params"][-1])),
        ValueError,
        r"params\[2\] is read-only",
    ),
    (
        "read-only state",
        lambda a: with_last(a, "amsgrad_max", read_only(a["amsgrad_max"][-1])),
        ValueError,
        r"amsgrad_max\[2\] is read-only",
    ),
    (
        "same param twice",
        lambda a: with_last(a, "params", a["params"][0]),
        ValueError,
        r"params\[2\] shares memory with params\[0\]",
    ),
    (
        "grad is the param",
        lambda a: with_last(a, "grads", a["params"][-1]),
        ValueError,
        r"shares memory with",
    ),
    (
        "m is v",
        lambda a: with_last(a, "exp_avg_sqs", a["exp_avgs"][-1]),
        ValueError,
        r"shares memory with",
    ),
]


def overlapping_views(a):
    buffer = np.zeros(9, np.float32)
    return with_last(with_last(a, "exp_avgs", buffer[:6]), "exp_avg_sqs", buffer[3:])


ARRAY_CASES.append(("overlapping views", overlapping_views, ValueError, "shares memory"))

HYPER_CASES = [
    (
        dict(learning_rate=-1e-3),
        ValueError,
        "learning_rate must be a finite number >= 0, got -0.001",
    ),
    (dict(learning_rate=float("nan")), ValueError, "learning_rate must be a finite number >= 0"),
    (dict(learning_rate="fast"), TypeError, "learning_rate must be a number, got str"),
    (dict(beta_1=1.0), ValueError, r"beta_1 must be in \[0, 1\), got 1"),
    (dict(beta_2=-0.1), ValueError, r"beta_2 must be in \[0, 1\)"),
    (dict(epsilon=0.0), ValueError, "epsilon must be a finite number > 0"),
    (dict(epsilon=float("inf")), ValueError, "epsilon must be a finite number > 0"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay must be a finite number >= 0"),
    (dict(step=0), ValueError, r"step must be an int in \[1, 2\*\*64\), got 0"),
    (dict(step=-3), ValueError, r"step must be an int in \[1, 2\*\*64\), got -3"),
    (dict(step=2**64), ValueError, r"step must be an int in \[1, 2\*\*64\), got 18446744"),
    (dict(step=1.5), TypeError, "step must be an int .*, got float"),
    (dict(step=True), TypeError, "step must be an int .*, got bool"),
    (dict(maximize="False"), TypeError, "maximize must be True or False, got 'False'"),
    (dict(maximize=1), TypeError, "maximize must be True or False, got 1"),
    # Finite in float64, not in the float32 the kernel computes in.
    (dict(learning_rate=2e39), ValueError, "learning_rate = 2e39 gives a step size .* overflows"),
    (
        dict(weight_decay=1e39, weight_decay_mode="decoupled"),
        ValueError,
        "weight_decay = 1e39 gives a decay rate .* overflows float32",
    ),
    (
        dict(learning_rate=1e20, weight_decay=1e20),
        ValueError,
        "weight_decay = 1e20 gives a decay rate 1e40 per step that overflows float32",
    ),
    (dict(epsilon=1e39), ValueError, "epsilon = 1e39 overflows float32"),
    (dict(grad_scale=1e-39), ValueError, "grad_scale = 1e-39 has no normal float32 reciprocal"),
    (dict(grad_scale=0.0), ValueError, "grad_scale must be a finite number > 0"),
    (dict(grad_scale=float("nan")), ValueError, "grad_scale must be a finite number > 0"),
    (dict(epsilon_mode="tf"), ValueError, 'epsilon_mode must be "keras" or "torch", got "tf"'),
    (
        dict(weight_decay_mode="paper"),
        ValueError,
        'weight_decay_mode must be "coupled" or "decoupled"',
    ),
    (dict(decay_form="fma"), ValueError, 'decay_form must be "subtract" or "multiply", got "fma"'),
    (dict(decay_form=1), TypeError, "decay_form must be a string or None, got int"),
]


def assert_unchanged(before, after):
    for name in before:
        for a, b in zip(before[name], after[name], strict=False):
            if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape:
                assert np.array_equal(a, b), name


def snapshot(args):
    return {
        k: [np.array(x, copy=True) if isinstance(x, np.ndarray) else x for x in v]
        for k, v in args.items()
    }


@pytest.mark.parametrize("case", ARRAY_CASES, ids=[c[0] for c in ARRAY_CASES])
def test_bad_arrays_raise_before_anything_is_written(case):
    _, corrupt, error, message = case
    args = corrupt(fresh())
    before = snapshot(args)
    with pytest.raises(error, match=message):
        host.adamw_update(**args, step=1, learning_rate=0.1)
    assert_unchanged(before, args)


@pytest.mark.parametrize("case", HYPER_CASES, ids=[str(c[0]) for c in HYPER_CASES])
def test_bad_hyperparameters_raise_before_anything_is_written(case):
    override, error, message = case
    args = fresh()
    before = snapshot(args)
    hyper = dict(step=1, learning_rate=0.1) | override
    with pytest.raises(error, match=message):
        host.adamw_update(**args, **hyper)
    assert_unchanged(before, args)


def test_read_only_gradients_and_shared_gradients_are_fine():
    args = fresh()
    shared = read_only(args["grads"][0])
    args["grads"] = [shared] * N_TENSORS
    before = snapshot(args)
    host.adamw_update(**args, step=1, learning_rate=0.1)
    assert not np.array_equal(before["params"][-1], args["params"][-1])


def test_host_adamw_checks_its_hyperparameters_at_construction():
    p = [np.zeros(3, np.float32)]
    with pytest.raises(ValueError, match=r"beta_1 must be in \[0, 1\)"):
        host.HostAdamW(p, beta_1=1.2)
    with pytest.raises(ValueError, match="epsilon_mode"):
        host.HostAdamW(p, epsilon_mode="jax")
    with pytest.raises(TypeError, match=r"params\[0\] must be a float32"):
        host.HostAdamW([np.zeros(3)])
    with pytest.raises(ValueError, match="params is empty"):
        host.HostAdamW([])


def valid_state():
    """fresh() with the second moments (and their maxima) >= 0, as a real state has them."""
    args = fresh()
    for name in ("exp_avg_sqs", "amsgrad_max"):
        args[name] = [np.abs(v) for v in args[name]]
    return args


def test_numpy_scalars_are_hyperparameters():
    """NumPy scalars and 0-d arrays work where Python numbers do, with the same result."""
    plain, numpy = valid_state(), valid_state()
    host.adamw_update(**plain, step=3, learning_rate=0.5, beta_1=0.5, weight_decay=0.25)
    host.adamw_update(
        **numpy,
        step=np.int64(3),
        learning_rate=np.float64(0.5),
        beta_1=np.array(0.5),
        weight_decay=np.float32(0.25),
        maximize=np.bool_(False),
    )
    for name in plain:
        for a, b in zip(plain[name], numpy[name], strict=True):
            assert np.array_equal(a, b), name


def test_huge_steps_are_fine():
    args = valid_state()
    host.adamw_update(**args, step=2**63, learning_rate=0.1)
    host.adamw_update(**args, step=2**64 - 1, learning_rate=0.1)
    assert all(np.isfinite(p).all() for p in args["params"])
