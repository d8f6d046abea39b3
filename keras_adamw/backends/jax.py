"""The host path on the JAX backend: the kernel as an XLA custom call on the
variables' buffers inside the compiled step (in place when they are donated,
as Keras's trainer does); with offloaded state, the same call on the host
arrays by reference on CPU, and an ordered host callback on accelerators."""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import TYPE_CHECKING, Any

import numpy as np
from keras import ops

from keras_adamw import sharding, xla

if TYPE_CHECKING:
    from keras_adamw.optimizer import AdamW


def host_dtypes(offload_state: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(variable dtypes, state dtypes) the host path takes, in the custom
    call (8-bit state as `host.QuantizedState` in host memory)."""
    return ("float32", "bfloat16", "float16"), ("float32", "bfloat16", "int8")


def unsupported_reason(variable: Any, offload_state: bool) -> str | None:
    value = variable.value
    platforms = [device.platform for device in value.devices()]
    if len(platforms) > 1 and layout_of(variable) is None:
        return (
            "variables on one device, or laid out by a keras.distribution "
            f"({variable.path} is on {len(platforms)})"
        )
    if len(platforms) > 1 and offload_state and platforms[0] != "cpu":
        return (
            "CPU devices for offloaded state on several devices (an accelerator's "
            f"offloaded step is a host callback on one device; {variable.path} is on "
            f"{len(platforms)} {platforms[0]} devices)"
        )
    if platforms[0] != "cpu" and not offload_state:
        return f"variables in CPU memory ({variable.path} is on {platforms[0]})"
    return None


def layout_of(variable: Any) -> Any:
    """The `jax.sharding.NamedSharding` a keras.distribution lays ``variable``
    out by when it spans several devices, else None."""
    return sharding.named_sharding(getattr(variable, "_layout", None))


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


def as_keras_updates_it(variable: Any) -> Any:
    return variable


def eagerly() -> contextlib.nullcontext[None]:
    return contextlib.nullcontext()  # nothing is traced at build


def dense(gradient: Any) -> Any:
    if type(gradient).__name__ == "BCOO":  # todense sums duplicate entries
        return gradient.todense()
    return gradient


class HostPath:
    def __init__(self, optimizer: AdamW) -> None:
        self.optimizer = optimizer
        self.host_states: dict[tuple[tuple[int, ...], Any], xla.HostState] = {}

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
            update = functools.partial(
                xla.adamw_update,
                beta_1=optimizer.beta_1,
                beta_2=optimizer.beta_2,
                epsilon=optimizer.epsilon,
                rounding="stochastic" if stochastic else "nearest",
                **optimizer._kernel_options(),
            )
            scalars = (step, group_lr, decay, optimizer._rounding_seed() if stochastic else 0)
            arrays = xla.Updated(params, exp_avgs, exp_avg_sqs, amsgrad_max, param_copies)
            group_grads = [grads[k] for k in positions]
            layouts = [layout_of(v) for v in written]
            if any(layout is not None for layout in layouts):
                new = on_each_shard(update, scalars, arrays, group_grads, targets, layouts)
            else:
                new = call_update(update, scalars, arrays, group_grads)
            for group, new_values in zip(targets, new, strict=True):
                for variable, value in zip(group or [], new_values or [], strict=True):
                    optimizer.assign(variable, value)

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
                beta_1=optimizer.beta_1,
                beta_2=optimizer.beta_2,
                epsilon=optimizer.epsilon,
                rounding="stochastic" if stochastic else "nearest",
                seed=optimizer._rounding_seed() if stochastic else 0,
                **optimizer._kernel_options(),
            )
            group = [indices[k] for k in positions]
            momenta: list[Any] = optimizer._slots(group)[0]
            if isinstance(momenta[0], sharding.HostShards):
                update = functools.partial(
                    host_state_on_each_shard,
                    update,
                    self.sharded_host_states(group),
                    [layout_of(variables[k]) for k in positions],
                    [momentum.sharding.spec for momentum in momenta],
                )
            else:
                update = functools.partial(update, state=self.host_state(group))
            # JAX computes the update on every step and discards it between
            # accumulation boundaries; host state must not see those steps.
            keep = lambda params, grads: list(params)  # noqa: E731
            group_grads = [grads[k] for k in positions]
            new_params = jax.lax.cond(applies_now(optimizer), update, keep, params, group_grads)
            for k, value in zip(positions, new_params, strict=True):
                optimizer.assign(variables[k], value)

    def host_state(self, indices: list[int], device: Any = None) -> xla.HostState:
        """The registered host state (slots, and masters if any) of these
        variables, made once; with ``device``, of its blocks (`HostShards`)."""
        key = (tuple(indices), device)
        if key not in self.host_states:
            optimizer = self.optimizer
            momenta, velocities, velocity_hats = optimizer._slots(indices)
            masters = [optimizer._masters[i] for i in indices]
            if device is not None:

                def block(shards: Any) -> Any:
                    return shards.blocks[device]

                momenta, velocities = [*map(block, momenta)], [*map(block, velocities)]
                velocity_hats = velocity_hats and [*map(block, velocity_hats)]
                masters = [None if m is None else block(m) for m in masters]
            self.host_states[key] = xla.HostState(
                momenta,
                velocities,
                velocity_hats,
                masters=None if masters[0] is None else masters,
            )
        return self.host_states[key]

    def sharded_host_states(self, indices: list[int]) -> dict[Any, xla.HostState]:
        """Per device of this process, the registered state of its blocks."""
        devices: dict[Any, Any] = self.optimizer._slots(indices)[0][0].blocks
        return {device: self.host_state(indices, device) for device in devices}

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
            optimizer.assign(variable, value)


def host_state_on_each_shard(
    update: Any,
    states: dict[Any, xla.HostState],
    layouts: list[Any],
    state_specs: list[Any],
    params: list[Any],
    grads: list[Any],
) -> list[Any]:
    """``update`` (`xla.adamw_update_host_state` with its scalars and options)
    run by each device on its local shards (`jax.shard_map`) and its own
    registered ``states`` block, named by the device's position in the mesh.
    As in `on_each_shard`, a variable whose state is split further (ZeRO
    stage 1) is cut to the state's block and gathered back."""
    import jax
    import jax.numpy as jnp

    mesh = next(layout.mesh for layout in layouts if layout is not None)
    variable_specs = [replicated() if layout is None else layout.spec for layout in layouts]
    blocks = StateBlocks(mesh, variable_specs, state_specs)
    ids = np.array([states[d].id if d in states else -1 for d in mesh.devices.flat], np.int32)
    any_state = next(iter(states.values()))

    def local(params: list[Any], grads: list[Any]) -> list[Any]:
        position = 0
        for name in mesh.axis_names:  # row-major, as mesh.devices
            position = position * mesh.shape[name] + jax.lax.axis_index(name)
        new = update(
            [blocks.cut(k, p) for k, p in enumerate(params)],
            [blocks.cut(k, g) for k, g in enumerate(grads)],
            state=any_state,
            state_id=jnp.asarray(ids)[position],
        )
        return [blocks.join(k, p) for k, p in enumerate(new)]

    sharded = unchecked_shard_map(local, mesh, (variable_specs, variable_specs), variable_specs)
    new_params: list[Any] = sharded(params, grads)
    return new_params


def call_update(
    update: Any, scalars: tuple[Any, ...], arrays: xla.Updated, grads: list[Any]
) -> Any:
    """``update`` (`xla.adamw_update` with its options) on these arrays."""
    step, lr, wd, seed = scalars
    params, exp_avgs, exp_avg_sqs, amsgrad_max, param_copies = arrays
    return update(
        step,
        lr,
        wd,
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        amsgrad_max,
        param_copies=param_copies,
        seed=seed,
    )


def on_each_shard(
    update: Any,
    scalars: tuple[Any, ...],
    arrays: xla.Updated,
    grads: list[Any],
    targets: xla.Updated,
    layouts: list[Any],
) -> Any:
    """``update`` run by each device on its local shards (`jax.shard_map`),
    in place as on one device. Each array keeps its own layout; the state
    (and masters) of `shard_state` is split further along the data axis than
    its variable, as ZeRO stage 1 splits it: there each device updates its
    slice of the variable, which the devices then gather back whole."""
    mesh = next(layout.mesh for layout in layouts if layout is not None)
    # The variables' specs (variables, their gradients and 16-bit copies),
    # and each target's own (the state's, and masters', may add the data axis).
    variable_specs = [replicated() if layout is None else layout.spec for layout in layouts]
    target_specs = xla.Updated(
        *[None if group is None else [spec_of(v) for v in group] for group in targets]  # type: ignore[arg-type]
    )
    state_specs = target_specs.exp_avgs
    blocks = StateBlocks(mesh, variable_specs, state_specs)
    # The written lists laid out as the variables are (params without
    # masters, copies): cut to the state's block before, gathered after.
    cut = [
        name
        for name in ("params", "param_copies")
        if getattr(arrays, name) is not None and getattr(target_specs, name) == variable_specs
    ]

    def local(scalars: Any, arrays: xla.Updated, grads: list[Any]) -> xla.Updated:
        arrays = arrays._replace(
            **{
                name: [blocks.cut(k, x) for k, x in enumerate(getattr(arrays, name))]
                for name in cut
            }
        )
        new: xla.Updated = call_update(
            update, scalars, arrays, [blocks.cut(k, g) for k, g in enumerate(grads)]
        )
        return new._replace(
            **{name: [blocks.join(k, x) for k, x in enumerate(getattr(new, name))] for name in cut}
        )

    whole = tuple(replicated() for _ in scalars)
    in_specs = (whole, target_specs, variable_specs)
    return unchecked_shard_map(local, mesh, in_specs, target_specs)(scalars, arrays, grads)


class StateBlocks:
    """Within `jax.shard_map`: a device's local block of each variable (or
    gradient) cut to its state's block, where ``shard_state`` splits the
    state along an axis its variable is not split on, and gathered back."""

    def __init__(self, mesh: Any, variable_specs: list[Any], state_specs: list[Any]) -> None:
        self.mesh = mesh
        self.extra = [extra_axes(v, s) for v, s in zip(variable_specs, state_specs, strict=True)]

    def cut(self, k: int, x: Any) -> Any:
        import jax

        for dim, axis in self.extra[k]:
            size = x.shape[dim] // self.mesh.shape[axis]
            x = jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(axis) * size, size, dim)
        return x

    def join(self, k: int, x: Any) -> Any:
        import jax

        for dim, axis in reversed(self.extra[k]):
            x = jax.lax.all_gather(x, axis, axis=dim, tiled=True)
        return x


def unchecked_shard_map(function: Any, mesh: Any, in_specs: Any, out_specs: Any) -> Any:
    """`jax.shard_map` without its replication check: the custom call has no
    replication rule, so that the outputs hold their specs is ours to keep
    (the gathers do), not JAX's to check."""
    import jax

    shard_map: Any = getattr(jax, "shard_map", None)
    unchecked = {"check_vma": False}
    if shard_map is None:  # JAX before 0.7
        from jax.experimental.shard_map import shard_map

        unchecked = {"check_rep": False}
    return shard_map(function, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **unchecked)


def spec_of(variable: Any) -> Any:
    """The `jax.sharding.PartitionSpec` of a Keras variable (replicated without a layout)."""
    layout = layout_of(variable)
    return replicated() if layout is None else layout.spec


def replicated() -> Any:
    """The `jax.sharding.PartitionSpec` of a replicated array."""
    from jax.sharding import PartitionSpec

    return PartitionSpec()  # type: ignore[no-untyped-call]


def extra_axes(variable_spec: Any, state_spec: Any) -> list[tuple[int, str]]:
    """(dimension, mesh axis) where the state is split and its variable is not."""

    def entry(spec: Any, dim: int) -> Any:
        return spec[dim] if dim < len(spec) else None

    dims = max(len(variable_spec), len(state_spec))
    return [
        (dim, entry(state_spec, dim))
        for dim in range(dims)
        if entry(variable_spec, dim) is None and entry(state_spec, dim) is not None
    ]
