"""The host path on the torch backend: the kernel in place on the variables'
CPU memory, through NumPy views; with offloaded state, variables on an
accelerator are staged through host buffers (pinned when CUDA is there)."""

from __future__ import annotations

import numpy as np
from keras import ops


def unsupported_reason(variable, offload_state) -> str | None:
    value = variable.value
    if value.device.type != "cpu" and not offload_state:
        return f"variables in CPU memory ({variable.path} is on {value.device.type})"
    return None


def dense(gradient):
    return gradient


def numpy_view(tensor) -> np.ndarray:
    """A CPU tensor's memory as a NumPy array (the kernel's cheapest argument)."""
    return tensor.detach().numpy()


def host_memory(slot) -> np.ndarray:
    """A slot's memory: a view of a Keras variable's tensor, or an offloaded array as it is."""
    return slot if isinstance(slot, np.ndarray) else numpy_view(slot.value)


def on_accelerator(tensor) -> bool:
    return tensor.device.type != "cpu"


class HostPath:
    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.staging = StagingBuffers()

    def falls_back_to_ops(self) -> bool:
        return False

    def update_step(self, grads, variables, learning_rate, indices):
        """In place on CPU variables. With offloaded state, variables on an
        accelerator are staged: parameters and gradients are copied into host
        buffers, updated there, and the parameters copied back."""
        import torch

        optimizer = self.optimizer
        params = [variable.value for variable in variables]
        grads = [grad if grad.is_contiguous() else grad.contiguous() for grad in grads]
        staged = [k for k, param in enumerate(params) if on_accelerator(param)]
        device_params = {k: params[k] for k in staged}
        for k in staged:
            params[k] = self.staging.copy_in(("param", indices[k]), params[k])
            grads[k] = self.staging.copy_in(("grad", indices[k]), grads[k])
        slots = [
            None if slot_list is None else [host_memory(slot) for slot in slot_list]
            for slot_list in optimizer._slots(indices)
        ]
        optimizer._run_kernel(
            int(ops.convert_to_numpy(optimizer.iterations)) + 1,
            float(ops.convert_to_numpy(learning_rate)),
            float(ops.convert_to_numpy(optimizer.weight_decay)),
            indices,
            [numpy_view(param) for param in params],
            [numpy_view(grad) for grad in grads],
            slots,
        )
        with torch.no_grad():
            for k, device_param in device_params.items():
                device_param.copy_(params[k])


class StagingBuffers:
    """Host buffers (pinned when CUDA is there) for tensors staged from an accelerator."""

    def __init__(self):
        self.buffers = {}

    def copy_in(self, key, tensor):
        import torch

        buffer = self.buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape:
            pinned = torch.cuda.is_available()
            buffer = torch.empty(tensor.shape, dtype=torch.float32, pin_memory=pinned)
            self.buffers[key] = buffer
        buffer.copy_(tensor)
        return buffer
