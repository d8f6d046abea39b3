"""The host path on the torch backend: the kernel in place on the variables'
CPU memory, through NumPy views; with offloaded state, variables on an
accelerator are staged through host buffers (pinned when CUDA is there)."""

from __future__ import annotations

import contextlib
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


def as_keras_updates_it(variable: Any) -> Any:
    return variable


def eagerly() -> contextlib.nullcontext[None]:
    return contextlib.nullcontext()  # nothing is traced at build


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
        accelerator are staged through host buffers, in chunks of about
        `CHUNK_ELEMENTS` that pipeline: every chunk's gradients start for the
        host at once; each chunk's update starts when its own have arrived,
        and its new parameters start back while the next chunk updates.
        Parameters are copied in too where the update runs on them rather
        than on their masters. Variables with masters have the kernel write
        their rounded copies, so only 16-bit values cross."""
        optimizer = self.optimizer
        step = int(ops.convert_to_numpy(optimizer.iterations)) + 1
        lr = float(ops.convert_to_numpy(learning_rate))
        wd = float(ops.convert_to_numpy(optimizer.weight_decay))
        masters = [optimizer._masters[i] for i in indices]
        params = [variable.value for variable in variables]
        grads = [grad if grad.is_contiguous() else grad.contiguous() for grad in grads]
        staged = [k for k, param in enumerate(params) if on_accelerator(param)]
        staged_chunks = chunks(staged, params)
        device_params = {k: params[k] for k in staged}
        staging = self.staging
        staging.begin(list(device_params.values()))
        arrivals = []
        for chunk in staged_chunks:
            for k in chunk:
                keep = masters[k] is not None  # the kernel only writes the copy: nothing to copy in
                params[k] = staging.copy_in(("param", indices[k]), params[k], write_only=keep)
                grads[k] = staging.copy_in(("grad", indices[k]), grads[k])
            arrivals.append(staging.arrival())
        in_place = [k for k in range(len(params)) if k not in device_params]
        if in_place:
            self._run_kernel_on(in_place, step, lr, wd, indices, params, grads, masters)
        for chunk, arrival in zip(staged_chunks, arrivals, strict=True):
            staging.wait(arrival)
            self._run_kernel_on(chunk, step, lr, wd, indices, params, grads, masters)
            for k in chunk:
                staging.copy_out(device_params[k], params[k])
        staging.end()

    def _run_kernel_on(
        self,
        positions: list[int],
        step: int,
        lr: float,
        wd: float,
        indices: list[int],
        params: list[Any],
        grads: list[Any],
        masters: list[Any],
    ) -> None:
        """The kernel over these positions of the step's lists (CPU tensors)."""
        optimizer = self.optimizer
        chunk_indices = [indices[k] for k in positions]
        slots = [
            None if slot_list is None else [self.views.host_memory(slot) for slot in slot_list]
            for slot_list in optimizer._slots(chunk_indices)
        ]
        optimizer._run_kernel(
            step,
            lr,
            wd,
            chunk_indices,
            [
                numpy_view(params[k]) if masters[k] is None else self.views.host_memory(masters[k])
                for k in positions
            ],
            [numpy_view(grads[k]) for k in positions],
            slots,
            copies=[None if masters[k] is None else numpy_view(params[k]) for k in positions],
        )


# Elements per chunk of staged variables: a chunk's update (about 10 ms at
# 20 GB/s for bfloat16 variables with masters) is long against a kernel
# call's fixed cost, and short against a whole model's step.
CHUNK_ELEMENTS = 1 << 23


def chunks(positions: list[int], tensors: list[Any]) -> list[list[int]]:
    """``positions`` in order, cut where a chunk reaches `CHUNK_ELEMENTS`
    (a variable is never split: a larger one is a chunk of its own)."""
    cut: list[list[int]] = []
    size = CHUNK_ELEMENTS
    for k in positions:
        if size >= CHUNK_ELEMENTS:
            cut.append([])
            size = 0
        cut[-1].append(k)
        size += tensors[k].numel()
    return cut


class StagingBuffers:
    """Host buffers (pinned when CUDA is there) for tensors staged from an
    accelerator, and the bytes that cross each way. On CUDA the copies are
    issued on two streams of their own (one each way, so both copy engines
    work) and do not block: `arrival` marks what the host waits for, and
    `end` makes the device's work wait for what goes back. Elsewhere they
    are plain copies."""

    def __init__(self) -> None:
        self.buffers: dict[Any, Any] = {}
        self.bytes_to_host = 0
        self.bytes_to_device = 0
        self.streams: dict[Any, tuple[Any, Any]] = {}  # device: (to host, to device)

    def begin(self, tensors: list[Any]) -> None:
        """Before a step's copies of these tensors: the copy streams wait for
        the work queued so far (the gradients, and all reads of the
        parameters about to be overwritten). Through that wait each step's
        copies in also follow the last step's copies back, so a buffer is
        never rewritten while it is still being read."""
        import torch

        for device in {t.device for t in tensors if t.device.type == "cuda"}:
            if device not in self.streams:
                self.streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))  # type: ignore[no-untyped-call]
            for stream in self.streams[device]:
                stream.wait_stream(torch.cuda.current_stream(device))

    def copy_in(self, key: Any, tensor: Any, write_only: bool = False) -> Any:
        """A host buffer shaped and typed as ``tensor``, receiving its values
        (unless ``write_only``: then only the buffer)."""
        import torch

        buffer = self.buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            pinned = torch.cuda.is_available()
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pinned)
            self.buffers[key] = buffer
        if not write_only:
            with self._stream(tensor, 0), torch.no_grad():
                buffer.copy_(tensor, non_blocking=tensor.device in self.streams)
            self.bytes_to_host += tensor.numel() * tensor.element_size()
        return buffer

    def arrival(self) -> list[Any]:
        """What the copies in issued so far are marked by (CUDA events)."""
        import torch

        events = []
        for to_host, _ in self.streams.values():
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(to_host)
            events.append(event)
        return events

    def wait(self, arrival: list[Any]) -> None:
        """Blocks until the copies that ``arrival`` marks have landed."""
        for event in arrival:
            event.synchronize()

    def copy_out(self, tensor: Any, buffer: Any) -> None:
        """``buffer``'s values into the accelerator's ``tensor``."""
        import torch

        with self._stream(tensor, 1), torch.no_grad():
            tensor.copy_(buffer, non_blocking=tensor.device in self.streams)
        self.bytes_to_device += buffer.numel() * buffer.element_size()

    def end(self) -> None:
        """The device's next work waits for the copies back."""
        import torch

        for device, (_, to_device) in self.streams.items():
            torch.cuda.current_stream(device).wait_stream(to_device)

    def _stream(self, tensor: Any, direction: int) -> Any:
        """The context issuing a copy of ``tensor`` on its copy stream."""
        import torch

        streams = self.streams.get(tensor.device)
        return (
            contextlib.nullcontext() if streams is None else torch.cuda.stream(streams[direction])
        )
