"""The host kernel as a JAX operation: an XLA custom call on CPU buffers.

Inside `jax.jit`, the kernel reads and writes XLA's own buffers. Each result
is aliased to its operand, so when the caller donates the parameters and state
(``donate_argnums``; Keras's JAX trainer does) the update is in place with no
copies; otherwise XLA copies the operands into fresh results first.

    params, exp_avgs, exp_avg_sqs, _, _ = xla.adamw_update(
        step, learning_rate, weight_decay, params, grads, exp_avgs, exp_avg_sqs)

Params and gradients may be float32, bfloat16 or float16, the state float32
or bfloat16; with ``param_copies`` (16-bit arrays, such as a bfloat16 model's
variables) the params are float32 masters and the copies receive their new
values rounded to nearest, in the same pass.

Offloaded state (`HostState`): m and v (and v̂) stay NumPy arrays (float32,
bfloat16, or 8-bit `host.QuantizedState`) that the step updates in place by
reference, so only the parameters and gradients are operands, with no copies
in or out:

    state = xla.HostState(exp_avgs, exp_avg_sqs)
    params = xla.adamw_update_host_state(step, learning_rate, weight_decay,
                                         params, grads, state)

With ``masters=`` (float32 arrays) in the state, the update runs on them and
the call returns 16-bit params, their rounded copies.

CPU only: the buffers must live in host memory. Imports JAX on first use, not
before.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from keras_adamw import _core
from keras_adamw.host import HostState

__all__ = ["HostState", "adamw_update", "adamw_update_host_state", "register"]

TARGET = "keras_adamw_adamw_update"
_FLOATS = ("float32", "bfloat16", "float16")


class Updated(NamedTuple):
    """The new values of `adamw_update`'s written lists."""

    params: list[Any]
    exp_avgs: list[Any]
    exp_avg_sqs: list[Any]
    amsgrad_max: list[Any] | None
    param_copies: list[Any] | None


@functools.cache
def register() -> str:
    """Registers the kernel's XLA FFI handler with JAX (once); returns its name."""
    import jax

    jax.ffi.register_ffi_target(TARGET, _core.xla_ffi_handler(), platform="cpu")
    return TARGET


def adamw_update(
    step: Any,
    learning_rate: Any,
    weight_decay: Any,
    params: Sequence[Any],
    grads: Sequence[Any],
    exp_avgs: Sequence[Any],
    exp_avg_sqs: Sequence[Any],
    amsgrad_max: Sequence[Any] | None = None,
    *,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
    epsilon_mode: str = "keras",
    weight_decay_mode: str = "coupled",
    decay_form: str | None = None,
    maximize: bool = False,
    param_copies: Sequence[Any] | None = None,
    rounding: str = "nearest",
    seed: Any = 0,
) -> Updated:
    """One AdamW step of the host kernel as a JAX operation.

    ``step`` (1-based), ``learning_rate`` and ``weight_decay`` are scalars,
    traced or not; the i-th array of each list is shaped like ``params[i]``.
    The hyperparameters, ``rounding`` and ``seed`` (a scalar, traced or not)
    mean what they mean in `keras_adamw.host.adamw_update`. Returns the new
    values of the lists (`Updated`; ``amsgrad_max`` and ``param_copies``
    None when not given). A bad argument raises ``ValueError`` at trace time
    when its shape or dtype shows it, and when the step runs otherwise,
    before anything is written.
    """
    written = [list(params), list(exp_avgs), list(exp_avg_sqs)]
    names = ["params", "exp_avgs", "exp_avg_sqs"]
    for name, values in (("amsgrad_max", amsgrad_max), ("param_copies", param_copies)):
        if values is not None:
            written.append(list(values))
            names.append(name)
    _check_lists(dict(zip(names, written, strict=True)) | {"grads": list(grads)})
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    options = dict(
        beta_1=beta_1,
        beta_2=beta_2,
        epsilon=epsilon,
        epsilon_mode=epsilon_mode,
        weight_decay_mode=weight_decay_mode,
        decay_form=decay_form,
        maximize=bool(maximize),
        amsgrad=amsgrad_max is not None,
        param_copies=param_copies is not None,
        stochastic=rounding == "stochastic",
    )
    scalars = [step, learning_rate, weight_decay] + ([seed] if rounding == "stochastic" else [])
    new = _call(scalars, written, list(grads), options)
    n = len(written[0])
    lists = {name: list(new[k * n : (k + 1) * n]) for k, name in enumerate(names)}
    return Updated(
        lists["params"],
        lists["exp_avgs"],
        lists["exp_avg_sqs"],
        lists.get("amsgrad_max"),
        lists.get("param_copies"),
    )


def adamw_update_host_state(
    step: Any,
    learning_rate: Any,
    weight_decay: Any,
    params: Sequence[Any],
    grads: Sequence[Any],
    state: HostState,
    *,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
    epsilon_mode: str = "keras",
    weight_decay_mode: str = "coupled",
    decay_form: str | None = None,
    maximize: bool = False,
    rounding: str = "nearest",
    seed: Any = 0,
    state_id: Any = None,
) -> list[Any]:
    """`adamw_update` with the state in `state`'s host arrays, updated in
    place when the step runs; returns the new params (with `state`'s masters:
    the masters' rounded copies, in the params' 16-bit dtype). The call has a
    side effect, so XLA neither drops nor merges it; inside `jax.lax.cond` it
    runs only where its branch is taken.

    ``state_id``: under `jax.shard_map`, where each device updates a state of
    its own, the `HostState.id` of this device's (a traced integer, picked by
    the device's position); ``state`` is then any one of them, for its shapes
    and options. By default ``state.id``."""
    import jax.numpy as jnp

    params, grads = list(params), list(grads)
    _check_lists({"params": params, "grads": grads})
    shapes = [tuple(np.shape(p)) for p in params]
    if shapes != [tuple(s) for s in state.shapes]:
        raise ValueError(f"params have shapes {shapes} where state holds {state.shapes}")
    for i, param in enumerate(params):
        dtype = str(jnp.result_type(param))
        if state.masters and dtype not in ("bfloat16", "float16"):
            raise ValueError(f"params[{i}] must be bfloat16 or float16 with masters, got {dtype}")
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    options = dict(
        beta_1=beta_1,
        beta_2=beta_2,
        epsilon=epsilon,
        epsilon_mode=epsilon_mode,
        weight_decay_mode=weight_decay_mode,
        decay_form=decay_form,
        maximize=bool(maximize),
        amsgrad=state.amsgrad,
        host_state=True,
        stochastic=rounding == "stochastic",
    )
    scalars = [step, learning_rate, weight_decay] + ([seed] if rounding == "stochastic" else [])
    state_id = state.id if state_id is None else state_id
    return list(_call([*scalars, state_id], [params], grads, options))


def _call(
    scalars: list[Any],
    written: list[list[Any]],
    grads: list[Any],
    options: dict[str, Any],
) -> Any:
    """The custom call: operands the scalars (step, learning rate, weight
    decay, and the seed when rounding stochastically), params, grads, then
    the other written lists; each result aliased to its operand."""
    import jax
    import jax.numpy as jnp

    n = len(written[0])
    operands = written[0] + grads + [x for state in written[1:] for x in state]
    results = [x for state in written for x in state]
    first = len(scalars)
    aliases = {first + (k if k < n else k + n): k for k in range(len(results))}
    attributes = {
        name: np.float64(value) if name in ("beta_1", "beta_2", "epsilon") else value
        for name, value in options.items()
        if value is not None
    }
    return jax.ffi.ffi_call(
        register(),
        [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in results],  # type: ignore[no-untyped-call]
        input_output_aliases=aliases,
        has_side_effect="host_state" in attributes,
    )(
        jnp.asarray(scalars[0]),
        jnp.asarray(scalars[1], jnp.float32),
        jnp.asarray(scalars[2], jnp.float32),
        *map(jnp.asarray, scalars[3:]),
        *operands,
        **attributes,
    )


def _check_lists(lists: dict[str, Any]) -> None:
    import jax.numpy as jnp

    params = lists["params"]
    if not params:
        raise ValueError("params is empty: pass at least one array")
    for name, values in lists.items():
        if len(values) != len(params):
            raise ValueError(f"{name} has {len(values)} arrays where params has {len(params)}")
        allowed = {
            "params": _FLOATS,
            "grads": _FLOATS,
            "param_copies": ("bfloat16", "float16"),
        }.get(name, ("float32", "bfloat16"))
        for i, (value, param) in enumerate(zip(values, params, strict=True)):
            dtype = str(jnp.result_type(value))
            if dtype not in allowed:
                raise ValueError(f"{name}[{i}] must be {' or '.join(allowed)}, got {dtype}")
            if jnp.shape(value) != jnp.shape(param):
                raise ValueError(
                    f"{name}[{i}] has shape {jnp.shape(value)} "
                    f"where params[{i}] has shape {jnp.shape(param)}"
                )
