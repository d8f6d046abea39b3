"""The host path on the TensorFlow backend: the kernel in a
`tf.numpy_function`. TF hands the function views of buffers it may share
between variables (one zeros buffer behind every fresh slot), so the kernel
only reads them: it writes the step's results, out of place in the same pass,
into host arrays that TF then takes as the variables' memory. XLA cannot
compile `numpy_function`, so under `jit_compile=True` "auto" takes the ops
path."""

from __future__ import annotations

import math
import sys

import numpy as np


def unsupported_reason(variable, offload_state) -> str | None:
    value = variable.value
    import tensorflow as tf

    if isinstance(value, tf.distribute.DistributedValues):
        return f"variables outside tf.distribute ({variable.path} is distributed)"
    device = (tf.DeviceSpec.from_string(value.device).device_type or "cpu").lower()
    if device != "cpu" and not offload_state:
        return f"variables in CPU memory ({variable.path} is on {device})"
    return None


def dense(gradient):
    if type(gradient).__name__ == "IndexedSlices":  # the conversion sums duplicate rows
        import tensorflow as tf

        return tf.convert_to_tensor(gradient)
    return gradient


def compiles_with_xla() -> bool:
    """Whether TensorFlow is tracing for XLA here (jit_compile=True)."""
    import tensorflow as tf

    try:  # TF's own check, not public API: without it, TF's error on XLA compilation stands
        from tensorflow.python.ops.control_flow_util import GraphOrParentsInXlaContext
    except ImportError:
        return False
    return GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


class HostPath:
    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.results = ResultArrays()

    def falls_back_to_ops(self) -> bool:
        """XLA cannot compile the host path: "auto" then takes the ops path,
        which shares the slot variables (offloaded state has none)."""
        optimizer = self.optimizer
        automatic = optimizer.implementation == "auto" and not optimizer.offload_state
        return automatic and compiles_with_xla()

    def ops_update_step(self, grads, variables, learning_rate, indices) -> bool:
        return False  # XLA fuses the keras.ops update

    def update_step(self, grads, variables, learning_rate, indices):
        import tensorflow as tf

        optimizer = self.optimizer
        if compiles_with_xla():
            raise ValueError(
                'implementation="host" and offload_state on TensorFlow run the kernel in '
                "tf.numpy_function, which XLA cannot compile: compile the model with "
                'jit_compile=False (jit_compile="auto" uses XLA when TF sees a GPU), '
                'or use implementation="ops"'
            )
        n = len(variables)
        offloaded = optimizer.offload_state
        state = [] if offloaded else [s[i] for s in optimizer._slot_lists() for i in indices]
        written = list(variables) + state

        def kernel(step, lr, wd, *arrays):
            # params, grads, then each slot list (not offloaded): n arrays each
            params_in, grads, *state_in = (arrays[k : k + n] for k in range(0, len(arrays), n))
            results = [
                [self.results.array((k, i), x.shape) for i, x in zip(indices, xs, strict=True)]
                for k, xs in enumerate([params_in, *state_in])
            ]
            hyperparameters = int(step), float(lr), float(wd), indices
            if offloaded:  # the state is host memory of ours: in place
                for result, current in zip(results[0], params_in, strict=True):
                    np.copyto(result, current)
                slots = optimizer._slots(indices)
                optimizer._run_kernel(*hyperparameters, results[0], list(grads), slots)
            else:
                slots = results[1], results[2], results[3] if optimizer.amsgrad else None
                read_from = [params_in, *state_in]
                optimizer._run_kernel(*hyperparameters, results[0], list(grads), slots, read_from)
            return [x for result in results for x in result]

        scalars = [optimizer.iterations + 1, learning_rate, optimizer.weight_decay]
        new_values = tf.numpy_function(
            kernel,
            [
                *scalars,
                *[v.value for v in variables],
                *[tf.cast(g, "float32") for g in grads],
                *[v.value for v in state],
            ],
            [tf.float32] * len(written),
            stateful=True,
        )
        if len(written) == 1:  # run eagerly, numpy_function returns a lone output bare
            new_values = tf.nest.flatten(new_values)
        for variable, value in zip(written, new_values, strict=True):
            optimizer.assign(variable, tf.reshape(value, variable.shape))


class ResultArrays:
    """Host arrays the host path writes results into and hands to TF.

    TF may keep a returned array as a variable's memory, so an array is
    written again only once nothing but this pool refers to it; reusing
    arrays spares each step the page faults of fresh large allocations.
    TF still refers to the previous step's array when the next step runs,
    hence three.
    """

    KEEP = 3  # per key: the variable's current memory, the previous one, the next result

    def __init__(self):
        self.arrays = {}

    def array(self, key, shape) -> np.ndarray:
        arrays = self.arrays.setdefault(key, [])
        for array in arrays:
            # References: the list, `array`, and getrefcount's own argument.
            if sys.getrefcount(array) == 3 and array.shape == shape:
                return array
        fresh = aligned_empty(shape)
        if len(arrays) < self.KEEP:
            arrays.append(fresh)
        return fresh


def aligned_empty(shape, alignment=64) -> np.ndarray:
    """A float32 array at a 64-byte aligned address, which TF takes without copying."""
    size = math.prod(shape)
    raw = np.empty(size + alignment // 4, np.float32)
    start = (-raw.ctypes.data % alignment) // 4
    return raw[start : start + size].reshape(shape)
