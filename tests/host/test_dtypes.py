"""bfloat16 and float16 data in the host kernel, against the float64 reference
rounded to the same dtypes by NumPy and ml_dtypes; stochastic rounding's mean
against the exact update; 16-bit torch tensors in place; bad input."""

import itertools

import ml_dtypes
import numpy as np
import pytest
from reference import ReferenceAdamW

from keras_adamw import host

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
HYPER = dict(learning_rate=1e-2, weight_decay=0.1, beta_1=0.9, beta_2=0.999, epsilon=1e-7)


def random_state(n, dtypes, seed=0, amsgrad=False):
    """p, g, m, v (and v̂) as the given dtypes, m and v as after some steps."""
    p_dtype, g_dtype, state_dtype = dtypes
    rng = np.random.default_rng(seed)
    v = rng.uniform(1e-6, 1e-3, n)
    state = dict(
        params=rng.standard_normal(n).astype(p_dtype),
        grads=(rng.standard_normal(n) * 0.03).astype(g_dtype),
        exp_avgs=(rng.standard_normal(n) * 0.01).astype(state_dtype),
        exp_avg_sqs=v.astype(state_dtype),
    )
    if amsgrad:
        state["amsgrad_max"] = (v * rng.uniform(0.5, 2.0, n)).astype(state_dtype)
    return state


def reference_step(state, step, hyper=HYPER):
    """The float64 reference's step from the state's (widened) values."""
    wide = {k: np.asarray(a, np.float64) for k, a in state.items()}
    ref = ReferenceAdamW([wide["params"]], amsgrad="amsgrad_max" in state, **hyper)
    ref.m, ref.v = [wide["exp_avgs"]], [wide["exp_avg_sqs"]]
    ref.v_max = [wide.get("amsgrad_max", np.zeros_like(wide["params"]))]
    ref.step_count = step - 1
    ref.step([wide["grads"]])
    results = dict(params=ref.params[0], exp_avgs=ref.m[0], exp_avg_sqs=ref.v[0])
    if "amsgrad_max" in state:
        results["amsgrad_max"] = ref.v_max[0]
    return results


def assert_rounded(actual, expected_float64, name):
    """`actual` (16-bit) is the expected value rounded to its dtype by NumPy or
    ml_dtypes, but for elements next to a rounding boundary or near zero: the
    kernel rounds its float32 result, whose own error may fall either side."""
    rounded = expected_float64.astype(actual.dtype).astype(np.float64)
    got = actual.astype(np.float64)
    spacing = np.abs(np.spacing(expected_float64.astype(actual.dtype))).astype(np.float64)
    scale = np.abs(expected_float64).max()
    assert np.all(np.abs(got - expected_float64) <= spacing + 1e-6 * scale), name
    assert np.mean(got == rounded) > 0.99, name


COMBINATIONS = [
    (dtypes, copy, amsgrad)
    for dtypes in itertools.product([F32, BF16, F16], [F32, BF16, F16], [F32, BF16])
    for copy in ([None, BF16, F16] if dtypes[0] == F32 else [None])
    for amsgrad in (False, True)
]


@pytest.mark.parametrize(
    "dtypes, copy, amsgrad",
    COMBINATIONS,
    ids=[f"{'-'.join(d.name for d in c[0])}-copy_{c[1]}-ams_{c[2]}" for c in COMBINATIONS],
)
def test_a_step_is_the_float64_step_rounded_to_each_dtype(dtypes, copy, amsgrad):
    n = 5003
    state = random_state(n, dtypes, amsgrad=amsgrad)
    expected = reference_step(state, step=5)
    copies = None if copy is None else np.zeros(n, copy)
    arrays = {k: a.copy() for k, a in state.items()}
    host.adamw_update(**arrays, step=5, param_copies=copies, **HYPER)
    outputs = dict(arrays)
    del outputs["grads"]
    if copies is not None:
        outputs["param_copies"] = copies
        expected["param_copies"] = expected["params"]
    for name, actual in outputs.items():
        if actual.dtype == F32:
            np.testing.assert_allclose(actual, expected[name], rtol=2e-6, atol=1e-9, err_msg=name)
            continue
        # The kernel rounds its float32 result once; the reference rounds the
        # float64 one: they differ by a step only next to a rounding boundary.
        assert_rounded(actual, expected[name], name)


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_stochastic_rounding_is_unbiased_where_nearest_stalls(dtype):
    # Weights of 1.0 and steps far below half their spacing: rounding to
    # nearest loses every step; stochastic rounding keeps them on average.
    n = 1 << 20
    grads = np.full(n, 1.0, dtype)
    hyper = dict(HYPER, learning_rate=1e-4, weight_decay=0.0)
    exact = reference_step(
        dict(params=np.ones(1), grads=np.ones(1), exp_avgs=np.zeros(1), exp_avg_sqs=np.zeros(1)),
        step=1,
        hyper=hyper,
    )["params"][0]
    nearest = np.ones(n, dtype)
    host.adamw_update(nearest, grads, np.zeros(n, F32), np.zeros(n, F32), step=1, **hyper)
    assert np.all(nearest == 1), "rounded to nearest, the step is lost"

    params = np.ones(n, dtype)
    host.adamw_update(
        params, grads, np.zeros(n, F32), np.zeros(n, F32), step=1, rounding="stochastic", **hyper
    )
    values = params.astype(np.float64)
    below = float(np.nextafter(np.array(1.0, dtype), np.array(0.0, dtype)))
    assert set(np.unique(values)) == {below, 1.0}, "each rounds to a neighbour"
    spacing = 1.0 - below
    p_down = (1.0 - exact) / spacing
    sigma = spacing * np.sqrt(p_down * (1 - p_down) / n)
    assert abs(values.mean() - exact) < 6 * sigma, (values.mean(), exact, sigma)


def test_stochastic_rounding_of_bfloat16_state_is_unbiased():
    n = 1 << 20
    m = np.full(n, 1.0, BF16)
    grads = np.full(n, 1.0 + 1 / 256, F32)  # m moves to 1 + 0.1/256, a tenth of a bfloat16 step
    host.adamw_update(
        np.zeros(n, F32),
        grads,
        m,
        np.ones(n, BF16),
        step=1,
        rounding="stochastic",
        **HYPER,
    )
    exact = 0.9 * 1.0 + 0.1 * (1 + 1 / 256)
    values = m.astype(np.float64)
    sigma = (1 / 128) * np.sqrt(0.1 * 0.9 / n)
    assert abs(values.mean() - exact) < 6 * sigma


def test_stochastic_rounding_repeats_with_the_seed_and_changes_with_it():
    def run(seed, threads, level):
        host.set_num_threads(threads)
        host.set_simd_level(level)
        state = random_state(300_001, (BF16, BF16, BF16))
        host.adamw_update(**state, step=3, rounding="stochastic", seed=seed, **HYPER)
        return np.concatenate([state[k].view(np.uint16) for k in ("params", "exp_avgs")])

    threads, level = host.num_threads(), host.simd_level()
    try:
        first = run(7, 2, host.supported_simd_levels()[-1])
        for threads_now, level_now in itertools.product([1, 3], host.supported_simd_levels()):
            assert np.array_equal(run(7, threads_now, level_now), first), (threads_now, level_now)
        assert not np.array_equal(run(8, 2, level), first)
    finally:
        host.set_num_threads(threads)
        host.set_simd_level(level)


def test_torch_16_bit_tensors_are_updated_in_place():
    torch = pytest.importorskip("torch")
    n = 1000
    for dtype in (torch.bfloat16, torch.float16):
        p = torch.randn(n, dtype=dtype)
        g = torch.randn(n, dtype=dtype) * 0.1
        m, v = torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16)
        pointer, before = p.data_ptr(), p.clone()
        host.adamw_update(p, g, m, v, step=1, **HYPER)
        assert p.data_ptr() == pointer and p.dtype == dtype
        # Against torch's own AdamW in float32, rounded to the params' dtype.
        expected = before.float().clone().requires_grad_(True)
        opt = torch.optim.AdamW([expected], lr=1e-2, weight_decay=0.1, eps=1e-7)
        expected.grad = g.float()
        opt.step()
        expected = expected.detach().to(dtype)
        assert (p.float() - expected.float()).abs().max() <= 2 * (
            expected.float().abs().max() * 2.0**-7
        )
        assert (p != before).float().mean() > 0.5


def snapshot(arrays):
    return {k: None if a is None else a.copy() for k, a in arrays.items()}


BAD = [
    (
        "float16 state",
        dict(exp_avg_sqs=np.zeros(8, F16)),
        TypeError,
        r"exp_avg_sqs\[0\] must have dtype float32, bfloat16 or 8-bit block-wise, got float16",
    ),
    (
        "state of two dtypes",
        dict(exp_avg_sqs=np.zeros(8, BF16)),
        TypeError,
        r"exp_avg_sqs\[0\] has dtype bfloat16 where exp_avgs\[0\] has float32",
    ),
    (
        "amsgrad maxima of another dtype",
        dict(amsgrad_max=np.zeros(8, BF16)),
        TypeError,
        r"amsgrad_max\[0\] has dtype bfloat16 where exp_avgs\[0\] has float32",
    ),
    (
        "float32 copies",
        dict(param_copies=np.zeros(8, F32)),
        TypeError,
        r"param_copies\[0\] must have dtype bfloat16 or float16, got float32",
    ),
    (
        "copies of 16-bit params",
        dict(params=np.zeros(8, BF16), param_copies=np.zeros(8, BF16)),
        TypeError,
        r"params\[0\] must be float32 with param_copies \(the master copy\), got bfloat16",
    ),
    (
        "copies of another shape",
        dict(param_copies=np.zeros(9, BF16)),
        ValueError,
        r"param_copies\[0\] has shape \[9\] where params\[0\] has shape \[8\]",
    ),
    (
        "copies in the params' memory",
        "alias",
        ValueError,
        r"shares memory",
    ),
    (
        "stochastic with nothing to round",
        dict(rounding="stochastic"),
        ValueError,
        r"rounding = 'stochastic' needs something to round",
    ),
    ("unknown rounding", dict(rounding="up"), ValueError, r"rounding must be 'nearest' or"),
    ("negative seed", dict(seed=-1), ValueError, r"seed must be in \[0, 2\*\*64\)"),
    ("bool seed", dict(seed=True), TypeError, r"seed must be an int"),
    (
        "16-bit out of place",
        dict(params=np.zeros(8, BF16), read_from=[np.zeros(8, F32)] * 3),
        TypeError,
        r"params\[0\] must be float32 out of place",
    ),
    (
        "int8 params",
        dict(params=np.zeros(8, np.int8)),
        TypeError,
        r"params\[0\] must have dtype float32, bfloat16 or float16, got int8",
    ),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_dtypes_raise_before_anything_is_written(case):
    _, change, error, message = case
    rng = np.random.default_rng(1)
    arrays = dict(
        params=rng.standard_normal(8).astype(F32),
        grads=rng.standard_normal(8).astype(BF16),
        exp_avgs=np.full(8, 0.5, F32),
        exp_avg_sqs=np.full(8, 0.25, F32),
    )
    options = {}
    if change == "alias":
        buffer = np.zeros(8, F32)
        arrays["params"] = buffer
        options["param_copies"] = buffer.view(BF16)[:8]
    else:
        for name, value in change.items():
            (arrays if name in arrays else options)[name] = value
    if "amsgrad_max" in options:
        arrays["amsgrad_max"] = options.pop("amsgrad_max")
    before = snapshot(arrays)
    with pytest.raises(error, match=message):
        host.adamw_update(**arrays, **options, step=1, **HYPER)
    for name, array in arrays.items():
        assert np.array_equal(array.view(np.uint8), before[name].view(np.uint8)), name


def test_host_adamw_keeps_float32_masters_of_16_bit_params():
    rng = np.random.default_rng(3)
    initial = [rng.standard_normal(s).astype(BF16) for s in (1000, 37)]
    grads = [[(rng.standard_normal(p.shape) * 0.1).astype(BF16) for p in initial] for _ in range(5)]
    optimizer = host.HostAdamW(
        [p.copy() for p in initial], master_weights=True, learning_rate=1e-3, weight_decay=0.1
    )
    reference = ReferenceAdamW([p.astype(np.float64) for p in initial], **HYPER)
    reference.learning_rate = 1e-3
    for step_grads in grads:
        optimizer.step(step_grads)
        reference.step([g.astype(np.float64) for g in step_grads])
    for p, master, expected in zip(
        optimizer.params, optimizer.master_params, reference.params, strict=True
    ):
        assert master.dtype == F32
        np.testing.assert_allclose(master, expected, rtol=1e-5, atol=1e-7)
        assert np.array_equal(p.view(np.uint16), master.astype(BF16).view(np.uint16))
    # Without masters the same steps, each far below a bfloat16 spacing, are lost.
    plain = host.HostAdamW([p.copy() for p in initial], learning_rate=1e-5, weight_decay=0.0)
    for step_grads in grads:
        plain.step(step_grads)
    assert all(np.array_equal(a, b) for a, b in zip(plain.params, initial, strict=True))


def test_host_adamw_bfloat16_state_and_its_checkpoints():
    rng = np.random.default_rng(4)
    initial = [rng.standard_normal(500).astype(F32)]
    grads = [[(rng.standard_normal(500) * 0.1).astype(F32)] for _ in range(6)]

    def optimizer(**options):
        return host.HostAdamW([p.copy() for p in initial], learning_rate=1e-2, **options)

    compact, full = optimizer(state_dtype="bfloat16", amsgrad=True), optimizer(amsgrad=True)
    for step_grads in grads[:3]:
        compact.step(step_grads)
        full.step(step_grads)
    assert compact.exp_avgs[0].dtype == BF16
    np.testing.assert_allclose(compact.params[0], full.params[0], atol=1e-4)

    # Saved and loaded: bitwise the same continuation.
    resumed = optimizer(state_dtype="bfloat16", amsgrad=True)
    resumed.params[0][...] = compact.params[0]
    resumed.load_state_dict(compact.state_dict())
    for step_grads in grads[3:]:
        compact.step(step_grads)
        resumed.step(step_grads)
    assert np.array_equal(compact.params[0], resumed.params[0])

    # A float32 checkpoint loads into bfloat16 state (rounded), and back.
    into_bf16 = optimizer(state_dtype="bfloat16", amsgrad=True)
    into_bf16.load_state_dict(full.state_dict())
    assert np.array_equal(
        into_bf16.exp_avg_sqs[0].view(np.uint16), full.exp_avg_sqs[0].astype(BF16).view(np.uint16)
    )
    into_f32 = optimizer(amsgrad=True)
    into_f32.load_state_dict(compact.state_dict())
    assert np.array_equal(into_f32.exp_avgs[0], compact.exp_avgs[0].astype(F32))


def test_host_adamw_masters_survive_a_checkpoint():
    rng = np.random.default_rng(5)
    params = [rng.standard_normal(300).astype(F16)]
    first = host.HostAdamW([p.copy() for p in params], master_weights=True, learning_rate=1e-3)
    first.step([np.full(300, 0.01, F16)])
    saved = first.state_dict()
    second = host.HostAdamW([p.copy() for p in params], master_weights=True, learning_rate=1e-3)
    second.load_state_dict(saved)
    assert np.array_equal(second.master_params[0], first.master_params[0])
    assert np.array_equal(second.params[0], first.params[0])
    # Loaded where no masters are kept, the params take the masters' rounded values.
    plain = host.HostAdamW([p.copy() for p in params], learning_rate=1e-3)
    plain.load_state_dict(saved)
    assert np.array_equal(plain.params[0], first.master_params[0].astype(F16))


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(state_dtype="int4"), ValueError, "state_dtype must be 'float32', 'bfloat16' or"),
        (dict(state_dtype="float16"), ValueError, "state_dtype must be"),
        (dict(master_weights=True), ValueError, "master_weights=True needs bfloat16 or float16"),
        (dict(master_weights="yes"), TypeError, "master_weights must be True or False"),
        (dict(rounding="up"), ValueError, "rounding must be 'nearest' or 'stochastic'"),
        (dict(seed=-3), ValueError, r"seed must be in \[0, 2\*\*64\)"),
    ],
)
def test_host_adamw_refuses_bad_dtype_options(options, error, message):
    with pytest.raises(error, match=message):
        host.HostAdamW([np.zeros(4, F32)], **options)


def format_values(moment):
    """Every code's stored value at scale 1, from the format's description
    (not the kernel's code): first moments a sign, 3 exponent and 4 mantissa
    bits; second moments (their square roots) 3 exponent and 5 mantissa bits;
    subnormal at exponent 0, bias 7."""
    codes = np.arange(256)
    mantissa_bits = 4 if moment == 1 else 5
    magnitude = codes & 0x7F if moment == 1 else codes
    exponent = magnitude >> mantissa_bits
    mantissa = (magnitude & (2**mantissa_bits - 1)) / 2**mantissa_bits
    value = np.where(exponent == 0, mantissa * 2.0**-6, (1 + mantissa) * 2.0 ** (exponent - 7))
    return np.where((moment == 1) & (codes >= 128), -value, value)


@pytest.mark.parametrize("moment", [1, 2])
def test_8_bit_codes_decode_as_described_and_encode_to_the_nearest(moment):
    rng = np.random.default_rng(6)
    n = 10 * host.QuantizedState.BLOCK + 77
    values = rng.standard_normal(n) * np.exp(rng.uniform(-12, 2, n))
    if moment == 2:
        values = values**2
    stored = values if moment == 1 else np.sqrt(values)
    state = host.QuantizedState.from_float(values, moment=moment)
    table = format_values(moment)
    scale = np.repeat(state.scales.astype(np.float64), host.QuantizedState.BLOCK)[:n]
    decoded = (table[state.codes] * scale).astype(np.float32)
    np.testing.assert_array_equal(state.to_float(), decoded if moment == 1 else decoded**2)
    # Each block's scale is its largest stored magnitude over the largest code.
    largest = 1.9375 if moment == 1 else 1.96875
    blocks = np.array_split(np.abs(stored).astype(np.float32), range(256, n, 256))
    np.testing.assert_allclose(state.scales, [b.max() / largest for b in blocks], rtol=1e-6)
    # Nearest among all 256 codes, found by brute force (ties may go either way),
    # except that a nonzero second moment never rounds to zero.
    distances = np.abs(table[None, :] * scale[:, None] - stored.astype(np.float32)[:, None])
    if moment == 2:
        distances[:, 0] = np.inf
    chosen = distances[np.arange(n), state.codes]
    assert np.all(chosen <= distances.min(1) * (1 + 1e-6) + 1e-30)


def test_8_bit_state_follows_the_float64_reference_within_its_rounding():
    rng = np.random.default_rng(7)
    n = 5000
    p = rng.standard_normal(n).astype(F32)
    g = (rng.standard_normal(n) * 0.03).astype(BF16)
    m = host.QuantizedState.from_float(rng.standard_normal(n) * 0.01, moment=1)
    v = host.QuantizedState.from_float(rng.uniform(1e-6, 1e-3, n), moment=2)
    expected = reference_step(
        dict(params=p, grads=g, exp_avgs=m.to_float(), exp_avg_sqs=v.to_float()), step=4
    )
    host.adamw_update(p, g, m, v, step=4, **HYPER)
    # The params use the new moments before they are rounded: float32 accuracy.
    np.testing.assert_allclose(p, expected["params"], rtol=2e-6, atol=1e-8)
    for state, exact, spacing, smallest in (
        (m, expected["exp_avgs"], 1 / 32, 2.0**-10),
        (v, np.sqrt(expected["exp_avg_sqs"]), 1 / 64, 2.0**-11),
    ):
        scale = np.repeat(state.scales, host.QuantizedState.BLOCK)[:n].astype(np.float64)
        got = state.to_float().astype(np.float64)
        got = got if state.moment == 1 else np.sqrt(got)
        error = np.abs(got - exact)
        assert np.all(error <= np.abs(exact) * spacing * 1.0001 + smallest * scale)


def test_8_bit_state_round_trips_through_checkpoints_and_converts():
    rng = np.random.default_rng(8)
    initial = [rng.standard_normal(1000).astype(F32)]
    grads = [[(rng.standard_normal(1000) * 0.1).astype(F32)] for _ in range(6)]

    def optimizer(**options):
        return host.HostAdamW([p.copy() for p in initial], learning_rate=1e-2, **options)

    first = optimizer(state_dtype="int8", amsgrad=True)
    for step_grads in grads[:3]:
        first.step(step_grads)
    saved = first.state_dict()
    second = optimizer(state_dtype="int8", amsgrad=True)
    second.params[0][...] = first.params[0]
    second.load_state_dict(saved)
    for name in ("exp_avgs", "exp_avg_sqs", "amsgrad_max"):
        ours, theirs = getattr(second, name)[0], saved[name][0]
        assert np.array_equal(ours.codes, theirs.codes) and np.array_equal(
            ours.scales, theirs.scales
        )
    for step_grads in grads[3:]:
        first.step(step_grads)
        second.step(step_grads)
    assert np.array_equal(first.params[0], second.params[0])
    # Into float32 state (decoded) and back into 8-bit (encoded again: the same codes).
    full = optimizer(amsgrad=True)
    full.load_state_dict(saved)
    assert np.array_equal(full.exp_avgs[0], saved["exp_avgs"][0].to_float())
    again = optimizer(state_dtype="int8", amsgrad=True)
    again.load_state_dict(full.state_dict())
    assert np.array_equal(again.exp_avg_sqs[0].codes, saved["exp_avg_sqs"][0].codes)


def test_8_bit_state_of_the_wrong_kind_or_size_is_refused():
    p, g = np.ones(600, F32), np.ones(600, F32)
    m, v = host.QuantizedState(600, moment=1), host.QuantizedState(600, moment=2)
    before = p.copy()
    with pytest.raises(ValueError, match=r"exp_avgs\[0\] needs a QuantizedState of moment=1"):
        host.adamw_update(p, g, v, m, step=1, **HYPER)
    short = host.QuantizedState(600, moment=2)
    short.scales = short.scales[:2]
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[0\] has 2 block scales where 600"):
        host.adamw_update(p, g, m, short, step=1, **HYPER)
    wrong = host.QuantizedState(600, moment=2)
    wrong.codes = wrong.codes.astype(np.int16)
    with pytest.raises(TypeError, match=r"exp_avg_sqs\[0\]\.codes has dtype int16"):
        host.adamw_update(p, g, m, wrong, step=1, **HYPER)
    with pytest.raises(TypeError, match=r"exp_avg_sqs\[0\] has dtype float32 where exp_avgs"):
        host.adamw_update(p, g, m, np.zeros(600, F32), step=1, **HYPER)
    with pytest.raises(ValueError, match="rounding = 'stochastic' needs something to round"):
        host.adamw_update(p, g, m, v, step=1, rounding="stochastic", **HYPER)
    assert np.array_equal(p, before) and not m.codes.any() and not v.scales.any()
    with pytest.raises(ValueError, match="moment must be 1"):
        host.QuantizedState(4, moment=3)
