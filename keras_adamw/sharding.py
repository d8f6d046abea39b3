"""Optimizer state sharded over keras.distribution's data-parallel axis.

With ``shard_state=True`` each slot (m, v, v̂) gets its variable's layout with
the distribution's batch axis added, as ZeRO stage 1 shards optimizer state:
each data-parallel device holds and updates 1/N of it, and XLA gathers what
the parameters' update needs. A model axis of the variable's own layout is
kept.

Offloaded (or 8-bit) state under a distribution is host memory of ours, not
Keras variables: `HostShards` holds one block per local device, the block that
device's slot variable would hold, so each process keeps only its own
devices' part.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from keras_adamw import host


def state_layout(variable: Any) -> Any:
    """The layout of `variable`'s slots: its own with the batch axis added on
    its first dimension that is not sharded yet and that the axis divides.
    None (the variable's own layout) without a distribution, with one device
    on the batch axis, or where no dimension divides."""
    distribution = keras.distribution.distribution()
    axis = getattr(distribution, "batch_dim_name", None)
    if distribution is None or axis is None:
        return None
    mesh = distribution.device_mesh
    names = list(mesh.axis_names)
    devices = mesh.shape[names.index(axis)] if axis in names else 1
    if devices == 1:
        return None
    own = distribution.get_variable_layout(variable)
    axes = list(own.axes) if own is not None else [None] * len(variable.shape)
    if axis in axes:
        return None
    for i, (size, current) in enumerate(zip(variable.shape, axes, strict=True)):
        if current is None and size > 0 and size % devices == 0:
            axes[i] = axis
            return keras.distribution.TensorLayout(axes, mesh)
    return None


def named_sharding(layout: Any) -> Any:
    """The `jax.sharding.NamedSharding` of a Keras layout (or of a sharding)
    when it spans several devices, else None."""
    sharding = getattr(layout, "backend_layout", layout)
    mesh = getattr(sharding, "mesh", None)
    return sharding if mesh is not None and mesh.size > 1 else None


def host_state_sharding(variable: Any, shard_state: bool) -> Any:
    """How `variable`'s state in host memory is split over devices (as its
    slot variables would be), or None where it is one array."""
    layout = state_layout(variable) if shard_state else None
    return named_sharding(getattr(variable, "_layout", None) if layout is None else layout)


class HostShards:
    """A slot (or master) in host memory split as ``sharding`` splits an
    array of ``shape``: one block per device of this process, each an array
    or a `host.QuantizedState` made by ``make_block(block_shape)``. Devices
    that hold the same slice (replicas) hold copies, as their slot variables
    would: each device's kernel call updates its own."""

    def __init__(
        self, shape: tuple[int, ...], sharding: Any, make_block: Callable[[tuple[int, ...]], Any]
    ) -> None:
        self.shape = tuple(shape)
        self.sharding = sharding
        self.slices = sharding.addressable_devices_indices_map(self.shape)
        self.blocks = {
            device: make_block(_sliced_shape(self.shape, index))
            for device, index in self.slices.items()
        }

    def to_array(self) -> np.ndarray:
        """The whole slot's values (8-bit state decoded to float32); gathered
        from the other processes when they hold part of it (a collective:
        every process calls it)."""
        blocks = {device: _values(block) for device, block in self.blocks.items()}
        if self.sharding.is_fully_addressable:
            first = next(iter(blocks.values()))
            whole = np.empty(self.shape, first.dtype)
            for device, values in blocks.items():
                whole[self.slices[device]] = values
            return whole
        import jax
        from jax.experimental import multihost_utils

        array = jax.make_array_from_single_device_arrays(
            self.shape,
            self.sharding,
            [jax.device_put(values, device) for device, values in blocks.items()],
        )
        return np.asarray(multihost_utils.process_allgather(array, tiled=True))

    def assign(self, values: Any) -> None:
        """Each block from its slice of ``values`` (the whole slot), converted
        to the block's dtype or quantised."""
        values = np.asarray(values)
        for device, block in self.blocks.items():
            host._copy_state_into(block, values[self.slices[device]])


def _sliced_shape(shape: tuple[int, ...], index: tuple[slice, ...]) -> tuple[int, ...]:
    return tuple(len(range(*part.indices(size))) for part, size in zip(index, shape, strict=True))


def _values(block: Any) -> np.ndarray:
    return block.to_float() if isinstance(block, host.QuantizedState) else np.asarray(block)
