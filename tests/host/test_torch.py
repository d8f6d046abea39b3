"""Torch CPU tensors in place, zero-copy, against torch.optim.AdamW."""

import numpy as np
import pytest

from keras_adamw import host

torch = pytest.importorskip("torch")

SHAPES = [(17,), (4, 9), (256,), (3, 3, 3)]


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_hundred_steps_match_torch_adamw(amsgrad, maximize):
    gen = torch.Generator().manual_seed(0)
    theirs = [torch.randn(s, generator=gen, requires_grad=True) for s in SHAPES]
    ours = [t.detach().clone() for t in theirs]
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
    reference = torch.optim.AdamW(
        theirs, amsgrad=amsgrad, maximize=maximize, foreach=False, **hyper
    )
    optimizer = host.HostAdamW(
        ours,
        learning_rate=1e-2,
        beta_1=0.9,
        beta_2=0.99,
        epsilon=1e-8,
        weight_decay=0.01,
        epsilon_mode="torch",
        amsgrad=amsgrad,
        maximize=maximize,
    )
    for _ in range(100):
        grads = [torch.randn(s, generator=gen) * 0.1 for s in SHAPES]
        for t, g in zip(theirs, grads, strict=True):
            t.grad = g.clone()
        reference.step()
        optimizer.step(grads)
    worst = max((a - b.detach()).abs().max().item() for a, b in zip(ours, theirs, strict=True))
    assert worst <= 1e-6, worst
    # The tensors were updated in place: the optimizer holds views of them.
    assert all(np.shares_memory(p, t.numpy()) for p, t in zip(optimizer.params, ours, strict=True))


def test_adamw_update_writes_into_torch_tensors_and_their_parameters():
    param = torch.nn.Parameter(torch.ones(1000))
    grad = torch.full((1000,), 0.5)
    m, v = torch.zeros(1000), torch.zeros(1000)
    host.adamw_update([param], [grad], [m], [v], step=1, learning_rate=0.1, weight_decay=0.0)
    # First step of Adam moves every weight by lr·sign(g) (up to ε).
    assert torch.allclose(param.detach(), torch.full((1000,), 0.9), atol=1e-6)
    assert torch.allclose(m, torch.full((1000,), 0.05))


def test_torch_tensors_that_cannot_be_updated_in_place_are_refused():
    p, g, m, v = (torch.zeros(8, 8) for _ in range(4))
    bad = [
        (dict(params=[p.t()]), ValueError, r"params\[0\] is not C-contiguous"),
        (dict(grads=[g.double()]), TypeError, r"grads\[0\] must have dtype float32"),
        (dict(exp_avgs=[p]), ValueError, r"exp_avgs\[0\] shares memory with params\[0\]"),
        (dict(exp_avg_sqs=[p.view(64)[:64].view(8, 8)]), ValueError, "shares memory"),
    ]
    for override, error, message in bad:
        args = dict(params=[p], grads=[g], exp_avgs=[m], exp_avg_sqs=[v]) | override
        with pytest.raises(error, match=message):
            host.adamw_update(**args, step=1, learning_rate=0.1)
        assert not p.any() and not m.any() and not v.any()
