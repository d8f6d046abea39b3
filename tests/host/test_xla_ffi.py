"""keras_adamw.xla: the kernel as an XLA custom call inside jax.jit."""

import itertools

import numpy as np
import pytest

from keras_adamw import host, xla

jax = pytest.importorskip("jax")
jnp = jax.numpy

SHAPES = [(5, 7), (1000,), (), (0, 3), (70_000,)]  # a scalar, an empty one, one split in chunks


def arrays(seed, shapes=SHAPES):
    rng = np.random.default_rng(seed)

    def make(scale, positive=False):
        values = [rng.standard_normal(s) * scale for s in shapes]
        return [np.asarray(np.abs(x) if positive else x, np.float32) for x in values]

    return dict(
        params=make(1.0),
        grads=make(0.1),
        exp_avgs=make(0.01),
        exp_avg_sqs=make(0.01, positive=True),
        amsgrad_max=make(0.02, positive=True),
    )


OPTIONS = [
    dict(epsilon_mode=mode, weight_decay_mode=decay, maximize=maximize, amsgrad=amsgrad)
    for mode, decay, maximize, amsgrad in itertools.product(
        ["keras", "torch"], ["coupled", "decoupled"], [False, True], [False, True]
    )
]


def jitted(donate):
    def step(step, lr, wd, params, grads, exp_avgs, exp_avg_sqs, amsgrad_max, options):
        return xla.adamw_update(
            step, lr, wd, params, grads, exp_avgs, exp_avg_sqs, amsgrad_max, **options
        )

    def run(*args, options):
        return jax.jit(lambda *a: step(*a, options), donate_argnums=(3, 5, 6, 7) if donate else ())(
            *args
        )

    return run


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_matches_the_host_kernel_bitwise_over_steps(options):
    options = dict(options, beta_1=0.85, beta_2=0.99, epsilon=1e-6)
    amsgrad = options.pop("amsgrad")
    expected = arrays(0)
    state = {k: [jnp.asarray(x) for x in v] for k, v in expected.items() if k != "grads"}
    if not amsgrad:
        expected["amsgrad_max"] = None
        state["amsgrad_max"] = None
    run = jitted(donate=True)
    for step in range(1, 6):
        lr, wd = np.float32(1e-2 / step), np.float32(0.05)
        params, m, v, v_max, _ = run(
            step,
            lr,
            wd,
            state["params"],
            [jnp.asarray(g) for g in expected["grads"]],
            state["exp_avgs"],
            state["exp_avg_sqs"],
            state["amsgrad_max"],
            options=options,
        )
        state = dict(params=params, exp_avgs=m, exp_avg_sqs=v, amsgrad_max=v_max)
        host.adamw_update(
            **expected, step=step, learning_rate=float(lr), weight_decay=float(wd), **options
        )
    for name, values in state.items():
        for i, value in enumerate(values or []):
            np.testing.assert_array_equal(np.asarray(value), expected[name][i], err_msg=name)


SIXTEEN_BIT = {
    "bf16 params": ("bfloat16", "float32", None, "nearest"),
    "f16 params, bf16 state, stochastic": ("float16", "bfloat16", None, "stochastic"),
    "masters, bf16 copies and state": ("float32", "bfloat16", "bfloat16", "nearest"),
    "masters, f16 copies, bf16 state, stochastic": (
        "float32",
        "bfloat16",
        "float16",
        "stochastic",
    ),
}


@pytest.mark.parametrize(
    ("params_dtype", "state_dtype", "copy_dtype", "rounding"),
    SIXTEEN_BIT.values(),
    ids=SIXTEEN_BIT.keys(),
)
def test_sixteen_bit_data_matches_the_host_kernel_bitwise(
    params_dtype, state_dtype, copy_dtype, rounding
):
    """The custom call takes what the host kernel takes (but 8-bit state):
    16-bit params and grads, bfloat16 state, copies of float32 masters."""
    import ml_dtypes

    def dtype(name):
        return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)

    a = arrays(6)
    expected = dict(
        params=[x.astype(dtype(params_dtype)) for x in a["params"]],
        grads=[x.astype(ml_dtypes.bfloat16) for x in a["grads"]],
        exp_avgs=[x.astype(dtype(state_dtype)) for x in a["exp_avgs"]],
        exp_avg_sqs=[x.astype(dtype(state_dtype)) for x in a["exp_avg_sqs"]],
    )
    copies = None if copy_dtype is None else [x.astype(dtype(copy_dtype)) for x in a["params"]]
    state = {k: [jnp.asarray(x) for x in v] for k, v in expected.items()}
    state["param_copies"] = None if copies is None else [jnp.asarray(x) for x in copies]

    def step(t, params, grads, m, v, param_copies):
        return xla.adamw_update(
            t,
            1e-2,
            0.05,
            params,
            grads,
            m,
            v,
            param_copies=param_copies,
            rounding=rounding,
            seed=jnp.uint32(7),
        )

    run = jax.jit(step, donate_argnums=(1, 3, 4, 5))
    args = [state[k] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "param_copies")]
    compiled = run.lower(1, *args).compile().as_text()
    assert [line for line in compiled.splitlines() if " copy(" in line and "[0," not in line] == []
    for t in range(1, 4):
        new = run(t, *args)
        args = [new.params, args[1], new.exp_avgs, new.exp_avg_sqs, new.param_copies]
        host.adamw_update(
            **expected,
            step=t,
            learning_rate=float(np.float32(1e-2)),
            weight_decay=float(np.float32(0.05)),
            param_copies=copies,
            rounding=rounding,
            seed=7,
        )
    for got, want in zip(
        args[0] + (args[4] or []), expected["params"] + (copies or []), strict=True
    ):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), want)
    for got, want in zip(
        args[2] + args[3], expected["exp_avgs"] + expected["exp_avg_sqs"], strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("donate", [True, False])
def test_donated_buffers_are_updated_in_place_and_others_copied_first(donate):
    """XLA passes the kernel each result in its operand's buffer: donated, as
    is; otherwise it copies the operand first (the kernel sees no difference)."""
    p, g, m, v = (jnp.zeros((256, 1024)) for _ in range(4))

    def step(p, g, m, v):
        return xla.adamw_update(1, 1e-3, 0.0, [p], [g], [m], [v])[:3]

    donated = (0, 2, 3) if donate else ()
    compiled = jax.jit(step, donate_argnums=donated).lower(p, g, m, v).compile().as_text()
    copies = [line for line in compiled.splitlines() if " copy(" in line]
    assert len(copies) == (0 if donate else 3)


def test_operands_that_are_not_donated_are_left_as_they_were():
    a = arrays(2)
    params = [jnp.asarray(x) for x in a["params"]]
    new_params, *_ = jitted(donate=False)(
        1,
        1e-2,
        0.1,
        params,
        [jnp.asarray(x) for x in a["grads"]],
        [jnp.asarray(x) for x in a["exp_avgs"]],
        [jnp.asarray(x) for x in a["exp_avg_sqs"]],
        None,
        options={},
    )
    for old, original, new in zip(params, a["params"], new_params, strict=True):
        np.testing.assert_array_equal(np.asarray(old), original)
        if original.size:
            assert not np.array_equal(np.asarray(new), original)


def call(options=None, step=1, lr=1e-3, wd=0.0, **replace):
    a = {k: [jnp.asarray(x) for x in v] for k, v in arrays(3).items()}
    a["amsgrad_max"] = None
    a.update(replace)
    return jitted(donate=False)(step, lr, wd, *a.values(), options=options or {})[0][
        0
    ].block_until_ready()


@pytest.mark.parametrize(
    ("replace", "message"),
    [
        (dict(grads=[jnp.zeros(3)] * len(SHAPES)), r"grads\[0\] has shape \(3,\) where params"),
        (dict(exp_avgs=[jnp.zeros(1)]), "exp_avgs has 1 arrays where params has 5"),
        (
            dict(exp_avg_sqs=[jnp.zeros(s, jnp.int32) for s in SHAPES]),
            r"exp_avg_sqs\[0\] must be float32 or bfloat16, got int32",
        ),
        (dict(params=[]), "params is empty"),
    ],
)
def test_bad_arrays_are_refused_when_traced(replace, message):
    with pytest.raises(ValueError, match=message):
        call(**replace)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(step=0), "step must be an integer >= 1, got 0"),
        (dict(lr=-1.0), "learning_rate must be a finite number >= 0, got -1"),
        (dict(wd=float("nan")), "weight_decay must be a finite number >= 0, got NaN"),
        (dict(options=dict(beta_1=1.0)), r"beta_1 must be in \[0, 1\), got 1"),
        (dict(options=dict(epsilon=0.0)), "epsilon must be a finite number > 0"),
        (dict(options=dict(epsilon_mode="tf")), 'epsilon_mode must be "keras" or "torch"'),
        (dict(options=dict(decay_form="divide")), "decay_form must be"),
        # Finite in float64, not in the float32 the kernel computes in.
        (dict(options=dict(epsilon=1e39)), "epsilon = 1e39 overflows float32"),
        (
            dict(lr=1e38, options=dict(beta_1=0.999)),  # the step size is 31.6 lr at step 1
            "learning_rate = 9.99.*e37 gives a step size .* overflows float32",
        ),
        (
            dict(lr=1e20, wd=1e20),
            "weight_decay = 1.0*2.*e20 gives a decay rate 1.0*4.*e40 per step that overflows",
        ),
    ],
)
def test_bad_hyperparameters_raise_when_the_step_runs(kwargs, message):
    with pytest.raises(Exception, match=message) as raised:
        call(**kwargs)
    assert "keras_adamw" in str(raised.value)


def test_a_buffer_of_another_dtype_is_named_in_the_error():
    """Past the Python wrapper's checks, the handler names XLA dtypes as JAX does."""
    ints = jnp.zeros(3, jnp.int16)
    call = jax.ffi.ffi_call(xla.register(), [jax.ShapeDtypeStruct((3,), jnp.int16)] * 3)
    with pytest.raises(
        Exception, match=r"params\[0\] must be float32 or bfloat16 or float16, got int16"
    ):
        jax.block_until_ready(
            call(
                jnp.asarray(1),
                jnp.float32(1e-3),
                jnp.float32(0.0),
                *[ints] * 4,
                beta_1=np.float64(0.9),
                beta_2=np.float64(0.999),
                epsilon=np.float64(1e-7),
                epsilon_mode="keras",
                weight_decay_mode="coupled",
                maximize=False,
                amsgrad=False,
            )
        )


@pytest.mark.parametrize("amsgrad", [False, True])
def test_host_state_is_updated_by_reference_bitwise_like_the_host_kernel(amsgrad):
    """Offloaded state: m and v (and v̂) stay NumPy arrays that the custom call
    updates in place; the compiled step copies nothing."""
    a = arrays(4)
    expected = {k: [x.copy() for x in v] for k, v in a.items()}
    if not amsgrad:
        a["amsgrad_max"] = expected["amsgrad_max"] = None
    state = xla.HostState(a["exp_avgs"], a["exp_avg_sqs"], a["amsgrad_max"])

    def step(t, params, grads):
        return xla.adamw_update_host_state(t, 1e-2, 0.05, params, grads, state, epsilon=1e-6)

    run = jax.jit(step, donate_argnums=1)
    params = [jnp.asarray(x) for x in a["params"]]
    grads = [jnp.asarray(x) for x in a["grads"]]
    compiled = run.lower(1, params, grads).compile().as_text()
    copies = [line for line in compiled.splitlines() if " copy(" in line]
    assert [line for line in copies if "f32[0," not in line] == []  # empty ones cost nothing
    for t in range(1, 4):
        params = run(t, params, grads)
        host.adamw_update(
            **expected,
            step=t,
            learning_rate=float(np.float32(1e-2)),
            weight_decay=float(np.float32(0.05)),  # as the custom call takes it
            epsilon=1e-6,
        )
    for name in ["exp_avgs", "exp_avg_sqs"] + (["amsgrad_max"] if amsgrad else []):
        for got, want in zip(a[name], expected[name], strict=True):
            np.testing.assert_array_equal(got, want, err_msg=name)
    for got, want in zip(params, expected["params"], strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)


HOST_STATE_SIXTEEN_BIT = {
    "bfloat16 params, masters, bfloat16 state": ("bfloat16", True, "bfloat16", "nearest"),
    "float16 params, masters, int8 state, amsgrad": ("float16", True, "int8", "nearest"),
    "bfloat16 params, stochastic, int8 state": ("bfloat16", False, "int8", "stochastic"),
    "float32 params, bfloat16 state, stochastic": ("float32", False, "bfloat16", "stochastic"),
}


@pytest.mark.parametrize(
    ("params_dtype", "masters", "state_dtype", "rounding"),
    HOST_STATE_SIXTEEN_BIT.values(),
    ids=HOST_STATE_SIXTEEN_BIT.keys(),
)
def test_host_state_of_sixteen_bit_params_and_compact_state_matches_the_host_kernel(
    params_dtype, masters, state_dtype, rounding
):
    """Host state holds bfloat16 or 8-bit moments, and float32 masters whose
    rounded copies the call returns as the 16-bit params: bitwise as
    `host.adamw_update` with ``param_copies``."""
    import ml_dtypes

    def dtype(name):
        return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)

    def state_of(values, moment):
        if state_dtype == "int8":
            return [host.QuantizedState.from_float(x, moment=moment) for x in values]
        return [x.astype(dtype(state_dtype)) for x in values]

    a = arrays(7)
    amsgrad = params_dtype == "float16"
    grads = [x.astype(dtype(params_dtype)) for x in a["grads"]]
    expected_masters = [x.copy() for x in a["params"]] if masters else None
    expected = dict(
        params=expected_masters or [x.astype(dtype(params_dtype)) for x in a["params"]],
        exp_avgs=state_of(a["exp_avgs"], 1),
        exp_avg_sqs=state_of(a["exp_avg_sqs"], 2),
        amsgrad_max=state_of(a["amsgrad_max"], 2) if amsgrad else None,
    )
    copies = [x.astype(dtype(params_dtype)) for x in a["params"]] if masters else None
    # The host state: the moments, and the masters when the params are their copies.
    held = {
        k: [x.copy() for x in v]
        for k, v in expected.items()
        if v is not None and (k != "params" or masters)
    }
    state = xla.HostState(
        held["exp_avgs"],
        held["exp_avg_sqs"],
        held.get("amsgrad_max"),
        masters=held.get("params") if masters else None,
    )

    def step(t, params, grads):
        return xla.adamw_update_host_state(
            t, 1e-2, 0.05, params, grads, state, rounding=rounding, seed=jnp.uint32(9)
        )

    run = jax.jit(step, donate_argnums=1)
    params = [jnp.asarray(x.copy()) for x in (copies or expected["params"])]  # JAX may alias x
    for t in range(1, 4):
        params = run(t, params, [jnp.asarray(g) for g in grads])
        host.adamw_update(
            expected["params"],
            grads,
            expected["exp_avgs"],
            expected["exp_avg_sqs"],
            amsgrad_max=expected["amsgrad_max"],
            step=t,
            learning_rate=float(np.float32(1e-2)),
            weight_decay=float(np.float32(0.05)),
            param_copies=copies,
            rounding=rounding,
            seed=9,
        )
    for got, want in zip(params, copies or expected["params"], strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), want)
    for name in held:
        for got, want in zip(held[name], expected[name], strict=True):
            if state_dtype == "int8" and name != "params":
                got, want = got.codes, want.codes
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=name)


def test_host_state_of_masters_refuses_float32_params_and_copies():
    a = arrays(8, [(3, 4)])
    state = xla.HostState(a["exp_avgs"], a["exp_avg_sqs"], masters=a["params"])
    params = [jnp.asarray(a["params"][0])]
    with pytest.raises(ValueError, match=r"params\[0\] must be bfloat16 or float16 with masters"):
        xla.adamw_update_host_state(1, 1e-3, 0.0, params, params, state)
    with pytest.raises(ValueError, match=r"masters\[0\] has shape \[4, 3\] where exp_avgs\[0\]"):
        xla.HostState(a["exp_avgs"], a["exp_avg_sqs"], masters=[np.zeros((4, 3), np.float32)])
    with pytest.raises(ValueError, match=r"masters\[0\] shares memory with exp_avgs\[0\]"):
        xla.HostState(a["exp_avgs"], a["exp_avg_sqs"], masters=a["exp_avgs"])


def test_host_state_refuses_what_does_not_fit_and_a_freed_state():
    a = arrays(5)
    params = [jnp.asarray(x) for x in a["params"]]
    grads = [jnp.asarray(x) for x in a["grads"]]
    held = {"state": xla.HostState(a["exp_avgs"], a["exp_avg_sqs"])}
    with pytest.raises(ValueError, match="params have shapes"):
        xla.adamw_update_host_state(1, 1e-3, 0.0, params[:2], grads[:2], held["state"])
    with pytest.raises(TypeError, match=r"exp_avgs\[0\] must have dtype float32"):
        xla.HostState([np.zeros(3, np.float64)], [np.zeros(3, np.float32)])
    read_only = np.zeros(3, np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[0\] is read-only"):
        xla.HostState([np.zeros(3, np.float32)], [read_only])

    step = lambda p, g: xla.adamw_update_host_state(1, 1e-3, 0.0, p, g, held["state"])  # noqa: E731
    compiled = jax.jit(step).lower(params, grads).compile()  # while the state lives
    before = [x.copy() for x in a["exp_avgs"]]
    held.clear()
    import gc

    gc.collect()
    with pytest.raises(Exception, match=r"host_state \d+ is not registered"):
        jax.block_until_ready(compiled(params, grads))
    for got, want in zip(a["exp_avgs"], before, strict=True):
        np.testing.assert_array_equal(got, want)
