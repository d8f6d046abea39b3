"""adamw_update(..., read_from=...): the step read from one set of arrays, written to another."""

import numpy as np
import pytest

from keras_adamw import host

SHAPES = [(300_001,), (7, 3), (0,)]
HYPERPARAMETERS = dict(step=4, learning_rate=1e-2, weight_decay=0.1, epsilon_mode="torch")


def state(seed, amsgrad):
    rng = np.random.default_rng(seed)
    lists = {
        name: [rng.standard_normal(s).astype(np.float32) * scale for s in SHAPES]
        for name, scale in [("params", 1), ("exp_avgs", 0.01), ("exp_avg_sqs", 1e-4)]
    }
    lists["exp_avg_sqs"] = [np.abs(x) for x in lists["exp_avg_sqs"]]
    if amsgrad:
        lists["amsgrad_max"] = [x * 2 for x in lists["exp_avg_sqs"]]
    return lists


def copies(lists):
    return {name: [x.copy() for x in xs] for name, xs in lists.items()}


def nan_like(lists):
    return {name: [np.full_like(x, np.nan) for x in xs] for name, xs in lists.items()}


@pytest.mark.parametrize("amsgrad", [False, True])
def test_matches_the_in_place_step_bitwise_and_leaves_the_sources(amsgrad):
    sources = state(0, amsgrad)
    untouched = copies(sources)
    grads = [np.full(s, 0.3, np.float32) for s in SHAPES]
    in_place = copies(sources)
    host.adamw_update(**in_place, grads=grads, **HYPERPARAMETERS)

    out = nan_like(sources)  # not read: the step overwrites every element
    host.adamw_update(**out, grads=grads, read_from=list(sources.values()), **HYPERPARAMETERS)
    for name in sources:
        for a, b, c, d in zip(
            out[name], in_place[name], sources[name], untouched[name], strict=True
        ):
            np.testing.assert_array_equal(a, b, err_msg=name)
            np.testing.assert_array_equal(c, d, err_msg=name)


def bad_cases():
    return {
        "one list too many": (lambda src, out: [*src, src[2]], "read_from must hold 3 lists"),
        "a shape": (
            lambda src, out: [src[0], src[1], [src[2][0], src[2][1], np.zeros(5, np.float32)]],
            r"read_from exp_avg_sqs\[2\] has shape \[5\] where params\[2\] has shape \[0\]",
        ),
        "a dtype": (
            lambda src, out: [[x.astype(np.float64) for x in src[0]], src[1], src[2]],
            r"read_from params\[0\] must have dtype float32, got float64",
        ),
        "memory written": (
            lambda src, out: [src[0], out["exp_avgs"], src[2]],
            r"shares memory with",
        ),
    }


@pytest.mark.parametrize("case", bad_cases().values(), ids=bad_cases().keys())
def test_bad_sources_are_refused_before_anything_is_written(case):
    make_sources, message = case
    sources = list(state(1, False).values())
    out = state(2, False)
    before = copies(out)
    grads = [np.ones(s, np.float32) for s in SHAPES]
    with pytest.raises((TypeError, ValueError), match=message):
        host.adamw_update(
            **out, grads=grads, read_from=make_sources(sources, out), **HYPERPARAMETERS
        )
    for name in out:
        for a, b in zip(out[name], before[name], strict=True):
            np.testing.assert_array_equal(a, b)
