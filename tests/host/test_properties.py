"""Hypothesis: any shapes, hyperparameters and split into tensors."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import ReferenceAdamW

from keras_adamw import host

shapes = st.lists(
    st.integers(0, 40).map(lambda n: (n,)) | st.tuples(st.integers(1, 9), st.integers(1, 9)),
    min_size=1,
    max_size=6,
)
hyperparameters = st.fixed_dictionaries(
    {
        "learning_rate": st.floats(0, 0.1),
        "beta_1": st.floats(0, 0.99),
        "beta_2": st.floats(0.5, 0.9999),
        "epsilon": st.floats(1e-8, 1e-3),
        "weight_decay": st.floats(0, 0.5),
        "epsilon_mode": st.sampled_from(["keras", "torch"]),
        "weight_decay_mode": st.sampled_from(["coupled", "decoupled"]),
        "amsgrad": st.booleans(),
        "maximize": st.booleans(),
    }
)


@settings(max_examples=60, deadline=None)
@given(
    shapes=shapes,
    hyper=hyperparameters,
    seed=st.integers(0, 2**32 - 1),
    steps=st.integers(1, 4),
    data=st.data(),
)
def test_any_shapes_and_hyperparameters_follow_the_reference(shapes, hyper, seed, steps, data):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    reference = ReferenceAdamW(params, **hyper)
    decay_form = data.draw(st.sampled_from([None, "subtract", "multiply"]))  # rounding only
    optimizer = host.HostAdamW([p.copy() for p in params], decay_form=decay_form, **hyper)
    for _ in range(steps):
        grads = [(rng.standard_normal(s) * 0.1).astype(np.float32) for s in shapes]
        reference.step(grads)
        optimizer.step(grads)
    for ours, expected in zip(optimizer.params, reference.params, strict=True):
        np.testing.assert_allclose(
            ours, expected, rtol=1e-6, atol=2e-7 + 1e-5 * hyper["learning_rate"]
        )


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5000), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_any_split_into_tensors_gives_the_same_bits(n, data, seed):
    cuts = sorted(data.draw(st.sets(st.integers(1, n), max_size=12)))
    rng = np.random.default_rng(seed)
    whole = [rng.standard_normal(n).astype(np.float32) for _ in range(3)] + [
        rng.random(n).astype(np.float32) * 1e-3
    ]
    pieces = [[x.copy() for x in np.split(a, cuts)] for a in whole]
    host.adamw_update(*whole, step=3, learning_rate=1e-2)
    host.adamw_update(*pieces, step=3, learning_rate=1e-2)
    for a, parts in zip(whole, pieces, strict=True):
        assert np.concatenate(parts).tobytes() == a.tobytes()
