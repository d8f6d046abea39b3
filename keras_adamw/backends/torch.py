"""The host path on the torch backend: the kernel in place on the variables'
CPU memory, through NumPy views; with offloaded state, variables on an
accelerator are staged through host buffers (pinned when CUDA is there)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from keras import ops

from keras_adamw import host

if TYPE_CHECKING:
    from keras_adamw.optimizer import AdamW


def host_dtypes(offload_state: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(variable dtypes, state dtypes) the host path takes (8-bit state as
    `host.QuantizedState` in host memory)."""
    return ("float32", "bfloat16", "float16"), ("float32", "bfloat16", "int8")


def unsupported_reason(variable: Any, offload_state: bool) -> str | None:
    value = variable.value
    if value.device.type != "cpu" and not offload_state:
        return f"variables in CPU memory ({variable.path} is on {value.device.type})"
    return None


def saved_value(variable: Any) -> np.ndarray:
    """A Keras variable's value as the NumPy array a `.keras` file stores."""
    return np.asarray(variable.numpy())


def dense(gradient: Any) -> Any:
    return gradient


def numpy_view(tensor: Any) -> np.ndarray:
    """A CPU tensor's memory as a NumPy array (the kernel's cheapest argument)."""
    view: np.ndarray = host.numpy_view(tensor)
    return view


class Views:
    """NumPy views of the optimizer's own variables (slots, masters), made
    once: a view is reused while the variable holds the same tensor (the
    kernel writes it in place), which spares each step the views' cost
    (about 9 µs for a bfloat16 tensor, 3 µs for float32)."""

    def __init__(self) -> None:
        self.views: dict[int, tuple[Any, np.ndarray]] = {}

    def host_memory(self, slot: Any) -> Any:
        """A slot's memory: a view of a Keras variable's tensor, or host
        state of ours (an array, 8-bit state) as it is."""
        if isinstance(slot, (np.ndarray, host.QuantizedState)):
            return slot
        tensor = slot.value
        cached = self.views.get(id(slot))
        if cached is None or cached[0] is not tensor:
            cached = self.views[id(slot)] = (tensor, numpy_view(tensor))
        return cached[1]


def on_accelerator(tensor: Any) -> bool:
    return bool(tensor.device.type != "cpu")


class HostPath:
    def __init__(self, optimizer: AdamW) -> None:
        self.optimizer = optimizer
        self.staging = StagingBuffers()
        self.views = Views()

    def falls_back_to_ops(self, grads: list[Any]) -> bool:
        return False

    def ops_update_step(
        self, grads: list[Any], variables: list[Any], learning_rate: Any, indices: list[int]
    ) -> bool:
        """Where the host kernel does not run: the update as `torch._foreach_*`
        ops, one call of each per parameter group, as Keras's torch AdamW does
        (keras/src/backend/torch/optimizers/torch_adam.py); False, having done
        nothing, for variables of mixed devices or dtypes, or state or masters
        of another dtype than their variables (the per-variable
        keras.ops update then runs). torch's fused AdamW kernel would be
        faster still, but rounds apart from Keras by up to 3e-6 over 100 steps
        of `fit`."""
        import torch

        optimizer = self.optimizer
        params = [variable.value for variable in variables]
        if optimizer._mixed_dtypes or len({(p.device, p.dtype) for p in params}) != 1:
            return False
        dtype = params[0].dtype
        lr = ops.cast(learning_rate, dtype)
        wd = ops.cast(optimizer.weight_decay, dtype)
        local_step = ops.cast(optimizer.iterations + 1, dtype)
        beta_1_power = ops.power(ops.cast(optimizer.beta_1, dtype), local_step)
        beta_2_power = ops.power(ops.cast(optimizer.beta_2, dtype), local_step)
        grads = [grad.to(dtype) for grad in grads]
        if optimizer.maximize:
            grads = list(torch._foreach_neg(grads))
        momenta, velocities, velocity_hats = optimizer._slots(indices)
        with torch.no_grad():  # Keras's variables are leaves that require grad
            for (lr_factor, wd_factor), positions in optimizer._groups(indices).items():
                group_lr, decay = optimizer._group_rates(lr, wd, lr_factor, wd_factor)
                p = [params[k] for k in positions]
                g = [grads[k] for k in positions]
                m = [momenta[k].value for k in positions]
                v = [velocities[k].value for k in positions]
                if wd_factor != 0.0:
                    torch._foreach_mul_(p, 1 - decay)  # p·(1 − lr·wd), as Keras on torch
                torch._foreach_mul_(m, optimizer.beta_1)
                torch._foreach_add_(m, g, alpha=1 - optimizer.beta_1)
                torch._foreach_mul_(v, optimizer.beta_2)
                torch._foreach_addcmul_(v, g, g, value=1 - optimizer.beta_2)
                if velocity_hats is not None:
                    v_hat = [velocity_hats[k].value for k in positions]
                    torch._foreach_maximum_(v_hat, v)
                    v = v_hat
                # In place where Keras's torch AdamW makes a new list of tensors:
                # two temporary lists instead of five, so fewer fresh pages.
                denominator = torch._foreach_sqrt(v)
                if optimizer.epsilon_mode == "keras":
                    alpha = group_lr * ops.sqrt(1 - beta_2_power) / (1 - beta_1_power)
                else:
                    alpha = group_lr / (1 - beta_1_power)
                    torch._foreach_div_(denominator, ops.sqrt(1 - beta_2_power))
                torch._foreach_add_(denominator, optimizer.epsilon)
                step = torch._foreach_mul(m, alpha)
                torch._foreach_div_(step, denominator)
                del denominator
                torch._foreach_sub_(p, step)
        return True

    def update_step(
        self, grads: list[Any], variables: list[Any], learning_rate: Any, indices: list[int]
    ) -> None:
        """In place on CPU variables. With offloaded state, variables on an
        accelerator are staged: gradients are copied into host buffers, and
        the new parameters copied back (after being copied in too, where the
        update runs on the parameters themselves rather than their masters).
        Variables with masters have the kernel write their rounded copies."""
        import torch

        optimizer = self.optimizer
        masters = [optimizer._masters[i] for i in indices]
        params = [variable.value for variable in variables]
        grads = [grad if grad.is_contiguous() else grad.contiguous() for grad in grads]
        staged = [k for k, param in enumerate(params) if on_accelerator(param)]
        device_params = {k: params[k] for k in staged}
        for k in staged:
            keep = masters[k] is not None  # the kernel only writes the copy: nothing to copy in
            params[k] = self.staging.copy_in(("param", indices[k]), params[k], write_only=keep)
            grads[k] = self.staging.copy_in(("grad", indices[k]), grads[k])
        slots = [
            None if slot_list is None else [self.views.host_memory(slot) for slot in slot_list]
            for slot_list in optimizer._slots(indices)
        ]
        optimizer._run_kernel(
            int(ops.convert_to_numpy(optimizer.iterations)) + 1,
            float(ops.convert_to_numpy(learning_rate)),
            float(ops.convert_to_numpy(optimizer.weight_decay)),
            indices,
            [
                numpy_view(param) if master is None else self.views.host_memory(master)
                for param, master in zip(params, masters, strict=True)
            ],
            [numpy_view(grad) for grad in grads],
            slots,
            copies=[
                None if master is None else numpy_view(param)
                for param, master in zip(params, masters, strict=True)
            ],
        )
        with torch.no_grad():
            for k, device_param in device_params.items():
                self.staging.copy_out(device_param, params[k])


class StagingBuffers:
    """Host buffers (pinned when CUDA is there) for tensors staged from an
    accelerator, and the bytes that cross each way."""

    def __init__(self) -> None:
        self.buffers: dict[Any, Any] = {}
        self.bytes_to_host = 0
        self.bytes_to_device = 0

    def copy_in(self, key: Any, tensor: Any, write_only: bool = False) -> Any:
        """A host buffer shaped and typed as ``tensor``, holding its values
        (unless ``write_only``: then only the buffer)."""
        import torch

        buffer = self.buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            pinned = torch.cuda.is_available()
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pinned)
            self.buffers[key] = buffer
        if not write_only:
            buffer.copy_(tensor)
            self.bytes_to_host += tensor.numel() * tensor.element_size()
        return buffer

    def copy_out(self, tensor: Any, buffer: Any) -> None:
        """``buffer``'s values into the accelerator's ``tensor``."""
        tensor.copy_(buffer)
        self.bytes_to_device += buffer.numel() * buffer.element_size()
