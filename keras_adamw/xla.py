"""The host kernel as a JAX operation: an XLA custom call on CPU buffers.

Inside `jax.jit`, the kernel reads and writes XLA's own buffers. Each result
is aliased to its operand, so when the caller donates the parameters and state
(``donate_argnums``; Keras's JAX trainer does) the update is in place with no
copies; otherwise XLA copies the operands into fresh results first.

    params, exp_avgs, exp_avg_sqs, _ = xla.adamw_update(
        step, learning_rate, weight_decay, params, grads, exp_avgs, exp_avg_sqs)

Offloaded state (`HostState`): m and v (and v̂) stay NumPy arrays that the
step updates in place by reference, so only the parameters and gradients
are operands, with no copies in or out:

    state = xla.HostState(exp_avgs, exp_avg_sqs)
    params = xla.adamw_update_host_state(step, learning_rate, weight_decay,
                                         params, grads, state)

CPU only: the buffers must live in host memory. Imports JAX on first use, not
before.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from keras_adamw import _core
from keras_adamw.host import HostState

__all__ = ["HostState", "adamw_update", "adamw_update_host_state", "register"]

TARGET = "keras_adamw_adamw_update"


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
) -> tuple[list[Any], list[Any], list[Any], list[Any] | None]:
    """One AdamW step of the host kernel as a JAX operation.

    ``step`` (1-based), ``learning_rate`` and ``weight_decay`` are scalars,
    traced or not; the lists hold float32 arrays, the i-th of each list shaped
    like ``params[i]``. The hyperparameters mean what they mean in
    `keras_adamw.host.adamw_update`. Returns the new ``(params, exp_avgs,
    exp_avg_sqs, amsgrad_max)`` (``amsgrad_max`` None without AMSGrad).
    A bad argument raises ``ValueError`` at trace time when its shape or dtype
    shows it, and when the step runs otherwise, before anything is written.
    """
    written = [list(params), list(exp_avgs), list(exp_avg_sqs)]
    if amsgrad_max is not None:
        written.append(list(amsgrad_max))
    names = ["params", "exp_avgs", "exp_avg_sqs", "amsgrad_max"]
    _check_lists(dict(zip(names, written, strict=False)) | {"grads": list(grads)})
    options = dict(
        beta_1=beta_1,
        beta_2=beta_2,
        epsilon=epsilon,
        epsilon_mode=epsilon_mode,
        weight_decay_mode=weight_decay_mode,
        decay_form=decay_form,
        maximize=bool(maximize),
        amsgrad=amsgrad_max is not None,
    )
    new = _call(step, learning_rate, weight_decay, written, list(grads), options)
    n = len(written[0])
    lists = [list(new[k * n : (k + 1) * n]) for k in range(len(written))]
    return lists[0], lists[1], lists[2], lists[3] if amsgrad_max is not None else None


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
) -> list[Any]:
    """`adamw_update` with the state in `state`'s host arrays, updated in
    place when the step runs; returns the new params. The call has a side
    effect, so XLA neither drops nor merges it; inside `jax.lax.cond` it runs
    only where its branch is taken."""
    params, grads = list(params), list(grads)
    _check_lists({"params": params, "grads": grads})
    shapes = [tuple(np.shape(p)) for p in params]
    if shapes != [tuple(s) for s in state.shapes]:
        raise ValueError(f"params have shapes {shapes} where state holds {state.shapes}")
    options = dict(
        beta_1=beta_1,
        beta_2=beta_2,
        epsilon=epsilon,
        epsilon_mode=epsilon_mode,
        weight_decay_mode=weight_decay_mode,
        decay_form=decay_form,
        maximize=bool(maximize),
        amsgrad=state.amsgrad,
        host_state=state.id,
    )
    return list(_call(step, learning_rate, weight_decay, [params], grads, options))


def _call(
    step: Any,
    learning_rate: Any,
    weight_decay: Any,
    written: list[list[Any]],
    grads: list[Any],
    options: dict[str, Any],
) -> Any:
    """The custom call: operands the three scalars, params, grads, then the
    other written lists; each result aliased to its operand."""
    import jax
    import jax.numpy as jnp

    n = len(written[0])
    operands = written[0] + grads + [x for state in written[1:] for x in state]
    results = [x for state in written for x in state]
    aliases = {3 + (k if k < n else k + n): k for k in range(len(results))}
    attributes = {
        name: np.float64(value) if name in ("beta_1", "beta_2", "epsilon") else value
        for name, value in options.items()
        if value is not None
    }
    if "host_state" in attributes:
        attributes["host_state"] = np.int64(attributes["host_state"])
    return jax.ffi.ffi_call(
        register(),
        [jax.ShapeDtypeStruct(jnp.shape(x), jnp.float32) for x in results],  # type: ignore[no-untyped-call]
        input_output_aliases=aliases,
        has_side_effect="host_state" in attributes,
    )(
        jnp.asarray(step),
        jnp.asarray(learning_rate, jnp.float32),
        jnp.asarray(weight_decay, jnp.float32),
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
        for i, (value, param) in enumerate(zip(values, params, strict=True)):
            if jnp.result_type(value) != jnp.float32:
                raise ValueError(
                    f"{name}[{i}] must have dtype float32, got {jnp.result_type(value)}"
                )
            if jnp.shape(value) != jnp.shape(param):
                raise ValueError(
                    f"{name}[{i}] has shape {jnp.shape(value)} "
                    f"where params[{i}] has shape {jnp.shape(param)}"
                )
