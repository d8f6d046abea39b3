"""Optimizer state sharded over keras.distribution's data-parallel axis.

With ``shard_state=True`` each slot (m, v, v̂) gets its variable's layout with
the distribution's batch axis added, as ZeRO stage 1 shards optimizer state:
each data-parallel device holds and updates 1/N of it, and XLA gathers what
the parameters' update needs. A model axis of the variable's own layout is
kept.
"""

from __future__ import annotations

from typing import Any

import keras


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
