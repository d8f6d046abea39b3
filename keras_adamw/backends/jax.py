"""The host path on the JAX backend: the kernel as an XLA custom call on the
variables' buffers inside the compiled step (in place when they are donated,
as Keras's trainer does); with offloaded state, the same call on the host
arrays by reference on CPU, and an ordered host callback on accelerators."""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING, Any

import numpy as np
from keras import ops

from keras_adamw import xla

if TYPE_CHECKING:
    from keras_adamw.optimizer import AdamW


def host_dtypes(offload_state: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(variable dtypes, state dtypes) the host path takes, in the custom
    call (8-bit state as `host.QuantizedState` in host memory)."""
    return ("float32", "bfloat16", "float16"), ("float32", "bfloat16", "int8")


def unsupported_reason(variable: Any, offload_state: bool) -> str | None:
    value = variable.value
    platforms = [device.platform for device in value.devices()]
    if len(platforms) > 1:
        return f"variables on one device ({variable.path} is on {len(platforms)})"
    if platforms[0] != "cpu" and not offload_state:
        return f"variables in CPU memory ({variable.path} is on {platforms[0]})"
    return None


def traced_by_keras_trainer() -> bool:
    """Whether Keras's JAX trainer is tracing this step. It jits its steps
    with ``donate_argnums=0`` (`JAXTrainer.make_train_function`), so the
    custom call updates the variables' buffers in place; JAX itself does not
    tell a trace whether its arguments are donated."""
    try:
        from keras.src.backend.jax import trainer
    except ImportError:  # Keras moved it: assume a custom loop
        return False
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename == trainer.__file__:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def state_by_reference() -> bool:
    """Whether the custom call can reach offloaded state by reference: JAX
    runs on the CPU, so Keras placed the variables there."""
    import jax

    return jax.default_backend() == "cpu"


def applies_now(optimizer: AdamW) -> Any:
    """Whether this step applies the update: JAX computes it on every step and
    discards it between gradient accumulation boundaries."""
    accumulation = optimizer.gradient_accumulation_steps
    if not accumulation:
        return ops.convert_to_tensor(True)
    return ops.equal((optimizer._iterations + 1) % accumulation, 0)


def saved_value(variable: Any) -> np.ndarray:
    """A Keras variable's value as the NumPy array a `.keras` file stores. A
    value sharded over other processes' devices (``shard_state`` across
    processes) is gathered first: a collective, so every process saves."""
    value = variable.value
    if getattr(value, "is_fully_addressable", True) or value.is_fully_replicated:
        return np.asarray(variable.numpy())
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(value, tiled=True))


def dense(gradient: Any) -> Any:
    if type(gradient).__name__ == "BCOO":  # todense sums duplicate entries
        return gradient.todense()
    return gradient


class HostPath:
    def __init__(self, optimizer: AdamW) -> None:
        self.optimizer = optimizer
        self.host_states: dict[tuple[int, ...], xla.HostState] = {}

    def falls_back_to_ops(self, grads: list[Any]) -> bool:
        """ "auto" in a jitted step that Keras's trainer did not make: the
        caller may not donate the state, and then XLA copies each aliased
        buffer before the custom call, which loses to the ops path
        (benchmarks/keras_step.py, "not donated"). A custom loop that donates
        asks for the host path with implementation="host"."""
        import jax

        optimizer = self.optimizer
        automatic = optimizer.implementation == "auto" and not optimizer.offload_state
        traced = any(isinstance(g, jax.core.Tracer) for g in grads)
        return automatic and traced and not traced_by_keras_trainer()

    def ops_update_step(
        self, grads: list[Any], variables: list[Any], learning_rate: Any, indices: list[int]
    ) -> bool:
        return False  # XLA fuses the keras.ops update

    def update_step(
        self, grads: list[Any], variables: list[Any], learning_rate: Any, indices: list[int]
    ) -> None:
        if self.optimizer._state_in_host_memory:
            self.offloaded_update_step(grads, variables, learning_rate, indices)
        else:
            self.kernel_update_step(grads, variables, learning_rate, indices)

    def kernel_update_step(
        self, grads: list[Any], variables: list[Any], learning_rate: Any, indices: list[int]
    ) -> None:
        """The kernel as an XLA custom call on the variables' buffers (in place:
        Keras's JAX trainer donates the parameters and state). A variable with
        a master has the call update the master and write the variable as its
        rounded copy (a call of its own: copies go with all of a call's params
        or none)."""
        optimizer = self.optimizer
        step = ops.convert_to_tensor(optimizer.iterations + 1)
        lr = ops.cast(learning_rate, "float32")
        wd = ops.cast(optimizer.weight_decay, "float32")
        for lr_factor, wd_factor, copied, positions in optimizer._kernel_calls(indices):
            group_lr, decay = optimizer._group_rates(lr, wd, lr_factor, wd_factor)
            slots = [[slot[indices[k]] for k in positions] for slot in optimizer._slot_lists()]
            written = [variables[k] for k in positions]
            # With masters the call updates the masters and writes the variables as copies.
            targets = xla.Updated(
                [optimizer._masters[indices[k]] for k in positions] if copied else written,
                slots[0],
                slots[1],
                slots[2] if optimizer.amsgrad else None,
                written if copied else None,
            )
            values = [None if group is None else [v.value for v in group] for group in targets]
            params, exp_avgs, exp_avg_sqs, amsgrad_max, param_copies = values
            assert params is not None and exp_avgs is not None and exp_avg_sqs is not None
            stochastic = optimizer._rounds_stochastically([p.dtype for p in params], copied)
            new = xla.adamw_update(
                step,
                group_lr,
                decay,
                params,
                [grads[k] for k in positions],
                exp_avgs,
                exp_avg_sqs,
                amsgrad_max,
                beta_1=optimizer.beta_1,
                beta_2=optimizer.beta_2,
                epsilon=optimizer.epsilon,
                param_copies=param_copies,
                rounding="stochastic" if stochastic else "nearest",
                seed=optimizer._rounding_seed() if stochastic else 0,
                **optimizer._kernel_options(),
            )
            for group, new_values in zip(targets, new, strict=True):
                for variable, value in zip(group or [], new_values or [], strict=True):
                    variable.assign(value)

    def offloaded_update_step(
        self, grads: list[Any], variables: list[Any], learning_rate: Any, indices: list[int]
    ) -> None:
        """The state stays in host arrays. On CPU the custom call updates them
        by reference (`xla.HostState`), in place and without copies; on an
        accelerator an ordered host callback does, and only the parameters and
        gradients cross, as in ZeRO-Offload."""
        if state_by_reference():
            self.host_state_update_step(grads, variables, learning_rate, indices)
        else:
            self.callback_update_step(grads, variables, learning_rate, indices)

    def host_state_update_step(
        self, grads: list[Any], variables: list[Any], learning_rate: Any, indices: list[int]
    ) -> None:
        """One custom call per `_kernel_calls` entry on its registered host
        state; a call with masters updates them and returns the variables'
        rounded copies."""
        import jax

        optimizer = self.optimizer
        step = ops.convert_to_tensor(optimizer.iterations + 1)
        lr = ops.cast(learning_rate, "float32")
        wd = ops.cast(optimizer.weight_decay, "float32")
        for lr_factor, wd_factor, copied, positions in optimizer._kernel_calls(indices):
            group_lr, decay = optimizer._group_rates(lr, wd, lr_factor, wd_factor)
            params = [variables[k].value for k in positions]
            stochastic = optimizer._rounds_stochastically([p.dtype for p in params], copied)
            update = functools.partial(
                xla.adamw_update_host_state,
                step,
                group_lr,
                decay,
                state=self.host_state([indices[k] for k in positions]),
                beta_1=optimizer.beta_1,
                beta_2=optimizer.beta_2,
                epsilon=optimizer.epsilon,
                rounding="stochastic" if stochastic else "nearest",
                seed=optimizer._rounding_seed() if stochastic else 0,
                **optimizer._kernel_options(),
            )
            # JAX computes the update on every step and discards it between
            # accumulation boundaries; host state must not see those steps.
            keep = lambda params, grads: list(params)  # noqa: E731
            group_grads = [grads[k] for k in positions]
            new_params = jax.lax.cond(applies_now(optimizer), update, keep, params, group_grads)
            for k, value in zip(positions, new_params, strict=True):
                variables[k].assign(value)

    def host_state(self, indices: list[int]) -> xla.HostState:
        """The registered host state (slots, and masters if any) of these variables, made once."""
        key = tuple(indices)
        if key not in self.host_states:
            optimizer = self.optimizer
            momenta, velocities, velocity_hats = optimizer._slots(indices)
            masters = [optimizer._masters[i] for i in indices]
            self.host_states[key] = xla.HostState(
                momenta,
                velocities,
                velocity_hats,
                masters=None if masters[0] is None else masters,
            )
        return self.host_states[key]

    def callback_update_step(
        self, grads: list[Any], variables: list[Any], learning_rate: Any, indices: list[int]
    ) -> None:
        import jax
        from jax.experimental import io_callback

        optimizer = self.optimizer
        applies = applies_now(optimizer)

        def offloaded(
            applies: Any,
            step: Any,
            lr: Any,
            wd: Any,
            seed: Any,
            params: list[Any],
            grads: list[Any],
        ) -> list[np.ndarray]:
            params = [np.array(p) for p in params]  # writable copies
            if applies:
                grads = [np.asarray(g) for g in grads]
                masters = [optimizer._masters[i] for i in indices]
                optimizer._run_kernel(
                    int(step),
                    float(lr),
                    float(wd),
                    indices,
                    [p if m is None else m for p, m in zip(params, masters, strict=True)],
                    grads,
                    optimizer._slots(indices),
                    copies=[None if m is None else p for p, m in zip(params, masters, strict=True)],
                    seed=seed,
                )
            return params

        params = [variable.value for variable in variables]
        # The generator's state is read here: a callback cannot read a traced variable.
        seed = optimizer._rounding_seed() if optimizer.stochastic_rounding else 0
        scalars = (optimizer.iterations + 1, learning_rate, optimizer.weight_decay, seed)
        new_params = io_callback(
            offloaded,
            [jax.ShapeDtypeStruct(p.shape, p.dtype) for p in params],  # type: ignore[no-untyped-call]
            applies,
            *map(ops.convert_to_tensor, scalars),
            params,
            grads,
            ordered=True,
        )
        for variable, value in zip(variables, new_params, strict=True):
            variable.assign(value)
