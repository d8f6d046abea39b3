"""The host path on the TensorFlow backend.

The kernel runs as a TensorFlow op, `KerasAdamwUpdate` (rust/tensorflow_op.rs),
registered through TensorFlow's C API on first use: one op per variable reads
the variable's value (or its float32 master), its slots and its gradient, of
float32 or 16-bit dtypes, and writes the new values (and a master's 16-bit
copy, the variable's new value) in one pass into tensors
that TF allocates and the variables then adopt, without a copy. State in
host memory (offloaded, or 8-bit; with float32 masters of 16-bit variables)
goes to its sibling, `KerasAdamwUpdateHostState`, which updates the arrays in
place by reference (`host.HostState`) and writes only the new parameters. A TensorFlow whose C
API the ops cannot find takes a `tf.numpy_function` instead.
Under a MirroredStrategy over CPU devices, each replica's copy is updated by
the op on its device. XLA compiles neither, so under `jit_compile=True`
"auto" takes the ops path.
"""

from __future__ import annotations

import functools
import glob
import math
import os
import sys
import types
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from keras_adamw import _core
from keras_adamw.host import HostState

if TYPE_CHECKING:
    from keras_adamw.optimizer import AdamW


def host_dtypes(offload_state: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(variable dtypes, state dtypes) the host path takes: 16-bit ones and
    8-bit state (host memory) in the ops; float32 in tf.numpy_function
    (where the ops are unavailable)."""
    if update_op() is None:
        return ("float32",), ("float32",)
    return ("float32", "bfloat16", "float16"), ("float32", "bfloat16", "int8")


def unsupported_reason(variable: Any, offload_state: bool) -> str | None:
    value = variable.value
    import tensorflow as tf

    if isinstance(value, tf.distribute.DistributedValues):
        strategy = tf.distribute.get_strategy()
        if offload_state or not isinstance(strategy, tf.distribute.MirroredStrategy):
            return (
                "variables outside tf.distribute, or a MirroredStrategy without "
                f"offload_state ({variable.path} is distributed by {type(strategy).__name__})"
            )
        if update_op() is None:
            return "the TensorFlow op under tf.distribute"
        if variable.dtype != "float32":
            return f"float32 variables under tf.distribute ({variable.path} is {variable.dtype})"
        devices = [component.device for component in value.values]
    else:
        devices = [value.device]
    for device in devices:
        device_type = (tf.DeviceSpec.from_string(device).device_type or "cpu").lower()
        if device_type != "cpu" and not offload_state:
            return f"variables in CPU memory ({variable.path} is on {device_type})"
    return None


def saved_value(variable: Any) -> np.ndarray:
    """A Keras variable's value as the NumPy array a `.keras` file stores
    (read eagerly, also where `build` runs inside a traced step)."""
    import tensorflow as tf

    with tf.init_scope():
        return np.asarray(variable.numpy())


def as_keras_updates_it(variable: Any) -> Any:
    import keras

    # Keras's TF optimizer updates the tf.Variable (a raw one is its own).
    return variable.value if isinstance(variable, keras.Variable) else variable


def eagerly() -> Any:
    import tensorflow as tf

    return tf.init_scope()


def dense(gradient: Any) -> Any:
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
    return bool(GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


class HostPath:
    def __init__(self, optimizer: AdamW) -> None:
        self.optimizer = optimizer
        self.results = ResultArrays()
        self.host_states: dict[int, HostState] = {}

    def falls_back_to_ops(self, grads: list[Any]) -> bool:
        """XLA cannot compile the host path: "auto" then takes the ops path,
        which shares the slot variables (offloaded state has none)."""
        optimizer = self.optimizer
        automatic = optimizer.implementation == "auto" and not optimizer._state_in_host_memory
        return automatic and compiles_with_xla()

    def ops_update_step(
        self, grads: list[Any], variables: list[Any], learning_rate: Any, indices: list[int]
    ) -> bool:
        return False  # XLA fuses the keras.ops update

    def update_step(
        self, grads: list[Any], variables: list[Any], learning_rate: Any, indices: list[int]
    ) -> None:
        if compiles_with_xla():
            raise ValueError(
                'implementation="host" and offload_state on TensorFlow run the kernel in '
                "a TensorFlow op (or tf.numpy_function), which XLA cannot compile: "
                "compile the model with "
                'jit_compile=False (jit_compile="auto" uses XLA when TF sees a GPU), '
                'or use implementation="ops"'
            )
        import tensorflow as tf

        in_host_memory = self.optimizer._state_in_host_memory
        op = host_state_op() if in_host_memory else update_op()
        if op is None:
            self.numpy_function_step(grads, variables, learning_rate, indices)
        elif in_host_memory:
            self.host_state_op_step(op, grads, variables, learning_rate, indices)
        elif tf.distribute.has_strategy():
            self.distributed_op_step(op, grads, variables, learning_rate, indices)
        else:
            self.op_step(op, grads, variables, learning_rate, indices)

    def distributed_op_step(
        self,
        op: Callable[..., Any],
        grads: list[Any],
        variables: list[Any],
        learning_rate: Any,
        indices: list[int],
    ) -> None:
        """Under a MirroredStrategy, as Keras's TF optimizer does it: the
        gradients summed across replicas, then each replica's copy of each
        variable updated by the op on that replica's device."""
        import tensorflow as tf

        optimizer = self.optimizer
        grads_and_vars = optimizer._all_reduce_sum_gradients(
            list(zip(grads, [v.value for v in variables], strict=True))
        )

        def update_each_replica(distribution: Any, grads_and_vars: list[Any]) -> None:
            for k, (grad, mirrored) in enumerate(grads_and_vars):

                def update(
                    _: Any, grad: Any, k: int = k
                ) -> None:  # the Keras variable reads the replica's copy here
                    self.op_step(op, [grad], [variables[k]], learning_rate, [indices[k]])

                distribution.extended.update(mirrored, update, args=(grad,), group=False)

        tf.__internal__.distribute.interim.maybe_merge_call(
            update_each_replica, optimizer._distribution_strategy, grads_and_vars
        )

    def op_step(
        self,
        op: Callable[..., Any],
        grads: list[Any],
        variables: list[Any],
        learning_rate: Any,
        indices: list[int],
    ) -> None:
        """One op per variable: TF can run them side by side, and frees each
        variable's old memory as soon as its new values are assigned. The
        rates are formed once per parameter group. A variable with a master
        has the op update the master and write the variable's new value, its
        rounding, in the same pass."""
        import tensorflow as tf

        optimizer = self.optimizer
        step = tf.cast(optimizer.iterations + 1, tf.int64)
        for rates, positions in self.group_rates(learning_rate, indices):
            for k in positions:
                variable, master = variables[k], optimizer._masters[indices[k]]
                weights = variable if master is None else master
                momentum, velocity, *velocity_hat = (s[indices[k]] for s in optimizer._slot_lists())
                stochastic = optimizer._rounds_stochastically([weights.dtype], False)
                seed = tf.cast(optimizer._rounding_seed(), tf.float64) if stochastic else None
                copied = [] if master is None else [variable]
                new_values = op(
                    params=weights.value,
                    exp_avg=momentum.value,
                    exp_avg_sq=velocity.value,
                    max_exp_avg_sq=[v.value for v in velocity_hat],
                    param_copy=[v.value for v in copied],
                    grads=tf.cast(grads[k], variable.dtype),
                    step=step,
                    rates=rates if seed is None else tf.concat([rates, [seed]], 0),
                    stochastic=stochastic,
                    **optimizer._kernel_options(),
                )
                new_values = tf.nest.flatten(new_values)
                targets = [weights, momentum, velocity, *velocity_hat, *copied]
                for target, value in zip(targets, new_values, strict=True):
                    optimizer.assign(target, value)

    def group_rates(self, learning_rate: Any, indices: list[int]) -> list[tuple[Any, list[int]]]:
        """Per parameter group: the ops' `rates` input (learning rate, weight
        decay, β₁, β₂, ε as float64) and the group's positions."""
        import tensorflow as tf

        optimizer = self.optimizer
        learning_rate = tf.cast(learning_rate, tf.float64)
        weight_decay = tf.cast(optimizer.weight_decay, tf.float64)
        constants = [float(optimizer.beta_1), float(optimizer.beta_2), float(optimizer.epsilon)]
        groups = []
        for (lr_factor, wd_factor), positions in optimizer._groups(indices).items():
            rates = optimizer._group_rates(learning_rate, weight_decay, lr_factor, wd_factor)
            rates = tf.stack([tf.cast(r, tf.float64) for r in rates] + constants)
            groups.append((rates, positions))
        return groups

    def host_state_op_step(
        self,
        op: Callable[..., Any],
        grads: list[Any],
        variables: list[Any],
        learning_rate: Any,
        indices: list[int],
    ) -> None:
        """State in host memory: per variable, the op updates its host arrays
        (and master) in place and returns only the new parameters (the
        master's rounded copy), which the variable adopts."""
        import tensorflow as tf

        optimizer = self.optimizer
        step = tf.cast(optimizer.iterations + 1, tf.int64)
        for rates, positions in self.group_rates(learning_rate, indices):
            for k in positions:
                variable, master = variables[k], optimizer._masters[indices[k]]
                stochastic = optimizer._rounds_stochastically([variable.dtype], master is not None)
                seed = tf.cast(optimizer._rounding_seed(), tf.float64) if stochastic else None
                new_params = op(
                    params=variable.value,
                    grads=tf.cast(grads[k], variable.dtype),
                    step=step,
                    rates=rates if seed is None else tf.concat([rates, [seed]], 0),
                    host_state=self.host_state(indices[k]).id,
                    stochastic=stochastic,
                    **optimizer._kernel_options(),
                )
                optimizer.assign(variable, new_params)

    def host_state(self, index: int) -> HostState:
        """The registered host state (slots, and master if any) of variable ``index``, made once."""
        if index not in self.host_states:
            optimizer = self.optimizer
            momentum, velocity, *velocity_hat = (s[index] for s in optimizer._slot_lists())
            master = optimizer._masters[index]
            self.host_states[index] = HostState(
                [momentum],
                [velocity],
                velocity_hat or None,
                masters=None if master is None else [master],
            )
        return self.host_states[index]

    def numpy_function_step(
        self, grads: list[Any], variables: list[Any], learning_rate: Any, indices: list[int]
    ) -> None:
        import tensorflow as tf

        optimizer = self.optimizer
        n = len(variables)
        offloaded = optimizer._state_in_host_memory
        state = [] if offloaded else [s[i] for s in optimizer._slot_lists() for i in indices]
        written = list(variables) + state

        def kernel(step: Any, lr: Any, wd: Any, *arrays: np.ndarray) -> list[np.ndarray]:
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

    def __init__(self) -> None:
        self.arrays: dict[Any, list[np.ndarray]] = {}

    def array(self, key: Any, shape: tuple[int, ...]) -> np.ndarray:
        arrays = self.arrays.setdefault(key, [])
        for array in arrays:
            # References: the list, `array`, and getrefcount's own argument.
            if sys.getrefcount(array) == 3 and array.shape == shape:
                return array
        fresh = aligned_empty(shape)
        if len(arrays) < self.KEEP:
            arrays.append(fresh)
        return fresh


def aligned_empty(shape: tuple[int, ...], alignment: int = 64) -> np.ndarray:
    """A float32 array at a 64-byte aligned address, which TF takes without copying."""
    size = math.prod(shape)
    raw = np.empty(size + alignment // 4, np.float32)
    start = (-raw.ctypes.data % alignment) // 4
    return raw[start : start + size].reshape(shape)


@functools.cache
def tensorflow_ops() -> Any:
    """The kernel's TensorFlow ops as Python functions (TF's generated
    wrappers), registered on first use: ``update`` and ``update_host_state``.
    None, with a warning, where they cannot be."""
    try:
        name = _core.register_tensorflow_op(framework_library())
    except RuntimeError as error:
        warnings.warn(
            f"keras_adamw: the TensorFlow op is unavailable ({error}); the host path "
            "runs the kernel in tf.numpy_function instead, with more memory per step",
            stacklevel=2,
        )
        return None
    # What tf.load_op_library does with the ops a library registers.
    from tensorflow.core.framework import op_def_pb2
    from tensorflow.python.framework import _pywrap_python_op_gen, op_def_registry

    names = [name, name + "HostState"]
    op_list = op_def_pb2.OpList(op=[op_def_registry.get(n) for n in names])
    module = types.ModuleType("keras_adamw_tensorflow_ops")
    exec(_pywrap_python_op_gen.GetPythonWrappers(op_list.SerializeToString()), module.__dict__)
    return types.SimpleNamespace(
        update=module.keras_adamw_update, update_host_state=module.keras_adamw_update_host_state
    )


def update_op() -> Callable[..., Any] | None:
    """The op of Keras-variable state, or None where the ops are unavailable."""
    ops = tensorflow_ops()
    return None if ops is None else ops.update


def host_state_op() -> Callable[..., Any] | None:
    """The op of offloaded state, or None where the ops are unavailable."""
    ops = tensorflow_ops()
    return None if ops is None else ops.update_host_state


def framework_library() -> str:
    """The path of TensorFlow's framework library, which exports its C API."""
    import tensorflow as tf

    directory = tf.sysconfig.get_lib()
    found = sorted(glob.glob(os.path.join(directory, "libtensorflow_framework*")))
    return found[0] if found else os.path.join(directory, "libtensorflow_framework.so.2")
