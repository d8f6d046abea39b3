"""AdamW on host (CPU) memory, in place, in Rust: no Keras needed.

`adamw_update` is one step over lists of arrays the caller owns; `HostAdamW`
owns the optimizer state and counts the steps. Both take NumPy arrays and
torch CPU tensors (zero-copy), C-contiguous and writable, of float32,
bfloat16 (``ml_dtypes.bfloat16``, ``torch.bfloat16``) or float16: the update
computes in float32 and rounds what it stores in a 16-bit type to nearest
even, or stochastically (``rounding="stochastic"``).

The update, for each element (``t`` = ``step``, ``g`` already divided by
``grad_scale`` and negated under ``maximize``)::

    p ← p · (1 − lr·wd)                          # decay, before the Adam step (decoupled: 1 − wd)
    m ← m + (1 − β₁)(g − m)
    v ← v + (1 − β₂)(g² − v)
    v̂ ← max(v̂, v) with AMSGrad, else v
    keras:  p ← p − lr·√(1−β₂ᵗ)/(1−β₁ᵗ) · m / (√v̂ + ε)
    torch:  p ← p − lr/(1−β₁ᵗ) · m / (√v̂/√(1−β₂ᵗ) + ε)

Per-step constants are computed in float64 for each call. Every SIMD level
gives bitwise the same result as the scalar reference, for any thread count
and any split of the data into tensors.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np

from keras_adamw import _core
from keras_adamw._checks import flag

__all__ = [
    "HostAdamW",
    "HostState",
    "QuantizedState",
    "adamw_update",
    "num_threads",
    "set_num_threads",
    "set_simd_level",
    "simd_level",
    "supported_simd_levels",
]

simd_level = _core.simd_level
supported_simd_levels = _core.supported_simd_levels
set_simd_level = _core.set_simd_level
num_threads = _core.num_threads
set_num_threads = _core.set_num_threads

#: Caps the SIMD level (``scalar``, ``avx2``, ``avx512``, ``avx512bf16``, ``neon``); read once.
SIMD_ENV_VAR: str = _core.SIMD_ENV_VAR
#: The default thread count; read when the thread pool starts.
THREADS_ENV_VAR: str = _core.THREADS_ENV_VAR


def numpy_view(x: Any, label: str = "a tensor") -> Any:
    """A torch CPU tensor as a NumPy array over the same memory (bfloat16 as
    ml_dtypes' type); others unchanged."""
    if type(x).__module__.startswith("torch"):
        import torch

        if isinstance(x, torch.Tensor):
            if x.device.type != "cpu":
                raise ValueError(f"{label} is on {x.device}: host arrays must be on the CPU")
            if x.dtype == torch.bfloat16:  # NumPy has no bfloat16: ml_dtypes' is the same bits
                import ml_dtypes

                return x.detach().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            if x.dtype not in (torch.float32, torch.float16):
                raise TypeError(
                    f"{label} must have dtype float32, bfloat16 or float16, got {x.dtype}"
                )
            return x.detach().numpy()
    return x


def _as_list(x: Any, name: str) -> list[Any]:
    if not isinstance(x, (list, tuple)):
        x = [x]
    if set(map(type, x)) <= {np.ndarray}:  # the common case, kept cheap for many tensors
        return list(x)
    return [numpy_view(a, f"{name}[{i}]") for i, a in enumerate(x)]


def adamw_update(
    params: Any,
    grads: Any,
    exp_avgs: Any,
    exp_avg_sqs: Any,
    *,
    step: int,
    learning_rate: float,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
    weight_decay: float = 0.004,
    epsilon_mode: str = "keras",
    weight_decay_mode: str = "coupled",
    decay_form: str | None = None,
    amsgrad_max: Any = None,
    maximize: bool = False,
    grad_scale: float | None = None,
    read_from: Sequence[Any] | None = None,
    param_copies: Any = None,
    rounding: str = "nearest",
    seed: int = 0,
) -> None:
    """One AdamW step, in place, over a list of tensors (or one array).

    Args:
        params, grads, exp_avgs, exp_avg_sqs: parallel lists of C-contiguous
            arrays of matching shapes; all but ``grads`` are updated in place.
            ``exp_avgs``/``exp_avg_sqs`` start at zero. ``params`` and
            ``grads`` may be float32, bfloat16 or float16 (each array its own);
            a tensor's state (with ``amsgrad_max``) is float32, bfloat16, or
            8-bit block-wise (`QuantizedState`: ``moment=1`` for ``exp_avgs``,
            2 for the others).
        step: the 1-based count of this update (bias correction).
        epsilon_mode: ``"keras"`` (ε added to √v, as ``keras.optimizers.AdamW``)
            or ``"torch"`` (ε added to √v̂, as ``torch.optim.AdamW``).
        weight_decay_mode: ``"coupled"`` (the decay rate is lr·wd, as Keras and
            torch) or ``"decoupled"`` (the rate is ``weight_decay`` itself).
        decay_form: how ``p·(1 − rate)`` is rounded: ``"subtract"`` (p − p·rate,
            Keras on TF/JAX) or ``"multiply"`` (torch); default: as the
            ``epsilon_mode``'s reference does.
        amsgrad_max: the running maxima of ``exp_avg_sqs`` (start at zero);
            passing them turns AMSGrad on.
        maximize: ascend the objective instead of descending it.
        grad_scale: divide the gradients by this first (unscaling a loss-scaled
            gradient in the same pass).
        read_from: out of place: ``(params, exp_avgs, exp_avg_sqs)`` (and
            ``amsgrad_max`` with AMSGrad), lists shaped like the arguments above,
            holding the current values; those are left unchanged and the step's
            results are written into the arguments above, whose contents are
            not read. Each chunk is copied and updated in one pass. Float32
            only.
        param_copies: bfloat16 or float16 arrays parallel to float32
            ``params`` (the master weights): each receives its params' new
            values rounded to nearest, in the same pass.
        rounding: how values stored in a 16-bit type are rounded:
            ``"nearest"`` (even) or ``"stochastic"`` (up with probability equal
            to the dropped fraction, so unbiased: for 16-bit params kept
            without a master copy, and bfloat16 state). Needs a 16-bit
            ``params`` or state array.
        seed: stochastic rounding's key, with the step and each element's
            position: results are the same for any SIMD level or thread count,
            and from run to run.

    Raises ``TypeError``/``ValueError`` naming the bad argument before any
    array is written.
    """
    _core.adamw_update(
        _as_list(params, "params"),
        _as_list(grads, "grads"),
        _as_list(exp_avgs, "exp_avgs"),
        _as_list(exp_avg_sqs, "exp_avg_sqs"),
        None if amsgrad_max is None else _as_list(amsgrad_max, "amsgrad_max"),
        {
            "step": step,
            "learning_rate": learning_rate,
            "beta_1": beta_1,
            "beta_2": beta_2,
            "epsilon": epsilon,
            "weight_decay": weight_decay,
            "epsilon_mode": epsilon_mode,
            "weight_decay_mode": weight_decay_mode,
            "decay_form": decay_form,
            "maximize": flag("maximize", maximize),
            "grad_scale": grad_scale,
        },
        None
        if read_from is None
        else [_as_list(x, f"read_from[{i}]") for i, x in enumerate(read_from)],
        None if param_copies is None else _as_list(param_copies, "param_copies"),
        rounding,
        _seed(seed),
    )


def _seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return int(seed)


class QuantizedState:
    """8-bit block-wise quantised optimizer state of one tensor: ``codes``
    (uint8, the tensor's shape) and ``scales`` (float32, one per ``BLOCK``
    elements), about 1.02 bytes per element instead of 4.

    A code is a small float relative to its block's scale (the block's largest
    stored magnitude over the largest code). First moments (``moment=1``, for
    ``exp_avgs``): a sign, 3 exponent and 4 mantissa bits, down to 2^-10 of
    the scale. Second moments (``moment=2``, for ``exp_avg_sqs`` and
    ``amsgrad_max``) are stored as their square roots, which is what the
    update divides by: 3 exponent and 5 mantissa bits, down to 2^-11 of the
    scale, and a nonzero value never rounds to zero (that would make the step
    m/ε). Values round to nearest: relative error at most 1/32 (m) and 1/64
    (√v) above the subnormals. Encoding and decoding are integer arithmetic
    (no table, no search), the same on every SIMD level.
    ``HostAdamW(state_dtype="int8")`` makes them.
    """

    BLOCK: int = _core.QUANTIZATION_BLOCK

    def __init__(self, shape: int | tuple[int, ...], *, moment: int) -> None:
        if isinstance(moment, bool) or moment not in (1, 2):
            raise ValueError(f"moment must be 1 (exp_avgs) or 2 (exp_avg_sqs), got {moment!r}")
        self.moment = int(moment)
        self.codes = np.zeros(shape, np.uint8)
        self.scales = np.zeros(-(-self.codes.size // self.BLOCK), np.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @classmethod
    def from_float(cls, values: Any, *, moment: int) -> QuantizedState:
        """``values`` (moments) quantised."""
        shape = np.shape(values)  # np.ascontiguousarray makes a 0-d array 1-d
        values = np.ascontiguousarray(values, np.float32).reshape(shape)
        state = cls(shape, moment=moment)
        _core.quantize(values, state.codes, state.scales, state.moment)
        return state

    def to_float(self) -> np.ndarray[Any, np.dtype[np.float32]]:
        """The float32 moments the codes stand for."""
        values = np.empty(self.codes.shape, np.float32)
        _core.dequantize(self.codes, self.scales, self.moment, values)
        return values

    def copy(self) -> QuantizedState:
        twin = QuantizedState(self.shape, moment=self.moment)
        np.copyto(twin.codes, self.codes)
        np.copyto(twin.scales, self.scales)
        return twin

    def __repr__(self) -> str:
        return f"QuantizedState(shape={self.shape}, moment={self.moment})"


_FLOAT_DTYPES = ("float32", "bfloat16", "float16")
_STATE_DTYPES = ("float32", "bfloat16", "int8")


def _state_like(shape: tuple[int, ...], state_dtype: str, *, moment: int) -> Any:
    if state_dtype == "int8":
        return QuantizedState(shape, moment=moment)
    return np.zeros(shape, _dtype(state_dtype))


def _copy_state_into(own: Any, saved: Any) -> None:
    """``saved`` (an array or a QuantizedState) into ``own``, converting."""
    if isinstance(own, QuantizedState):
        if isinstance(saved, QuantizedState) and saved.moment == own.moment:
            np.copyto(own.codes, saved.codes)
            np.copyto(own.scales, saved.scales)
        else:
            values = saved.to_float() if isinstance(saved, QuantizedState) else saved
            _core.quantize(
                np.ascontiguousarray(values, np.float32), own.codes, own.scales, own.moment
            )
    else:
        values = saved.to_float() if isinstance(saved, QuantizedState) else np.asarray(saved)
        np.copyto(own, values.astype(own.dtype))


def _dtype(name: str) -> np.dtype[Any]:
    if name == "bfloat16":
        import ml_dtypes

        bfloat16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
        return bfloat16
    return np.dtype(name)


class HostAdamW:
    """A stateful AdamW over host arrays it updates in place.

    It owns the first and second moments (and the AMSGrad maxima) as NumPy
    arrays of ``state_dtype`` and counts steps. Hyperparameters are plain
    attributes that may change between steps; ``learning_rate`` and
    ``weight_decay`` may also be callables of the 1-based step count (a
    schedule).

    ``state_dtype`` is ``"float32"``, ``"bfloat16"`` or ``"int8"`` (8-bit
    block-wise, a `QuantizedState` per tensor). Params may be float32,
    bfloat16 or float16. For 16-bit params,
    ``master_weights=True`` keeps float32 copies that the update runs on and
    writes the params as their rounded copies, in the same pass; without
    masters, ``rounding="stochastic"`` keeps small steps from being rounded
    away.

    >>> opt = HostAdamW([w], learning_rate=1e-3)
    >>> opt.step([grad_w])
    """

    def __init__(
        self,
        params: Sequence[Any],
        *,
        learning_rate: float | Callable[[int], float] = 1e-3,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        weight_decay: float | Callable[[int], float] = 0.004,
        epsilon_mode: str = "keras",
        weight_decay_mode: str = "coupled",
        decay_form: str | None = None,
        amsgrad: bool = False,
        maximize: bool = False,
        state_dtype: str = "float32",
        master_weights: bool = False,
        rounding: str = "nearest",
        seed: int = 0,
    ) -> None:
        self.params = _as_list(params, "params")
        if not self.params:
            raise ValueError("params is empty: pass at least one array")
        for i, p in enumerate(self.params):
            if not isinstance(p, np.ndarray) or p.dtype.name not in _FLOAT_DTYPES:
                raise TypeError(
                    f"params[{i}] must be a float32, bfloat16 or float16 NumPy array or "
                    "torch CPU tensor"
                )
        if state_dtype not in _STATE_DTYPES:
            raise ValueError(
                f"state_dtype must be 'float32', 'bfloat16' or 'int8', got {state_dtype!r}"
            )
        self.master_weights = flag("master_weights", master_weights)
        if self.master_weights and any(p.dtype == np.float32 for p in self.params):
            raise ValueError(
                "master_weights=True needs bfloat16 or float16 params (float32 ones are "
                "their own masters)"
            )
        if rounding not in ("nearest", "stochastic"):
            raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
        if (
            rounding == "stochastic"
            and state_dtype != "bfloat16"
            and (self.master_weights or all(p.dtype == np.float32 for p in self.params))
        ):
            raise ValueError(
                "rounding='stochastic' needs something to round: 16-bit params without "
                "master weights, or state_dtype='bfloat16'"
            )
        self.learning_rate = learning_rate
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.weight_decay = weight_decay
        self.epsilon_mode = epsilon_mode
        self.weight_decay_mode = weight_decay_mode
        self.decay_form = decay_form
        self.amsgrad = flag("amsgrad", amsgrad)
        self.maximize = maximize
        self.state_dtype = state_dtype
        self.rounding = rounding
        self.seed = _seed(seed)
        self.iterations = 0
        self.master_params = (
            [p.astype(np.float32) for p in self.params] if self.master_weights else None
        )
        self.exp_avgs = [_state_like(p.shape, state_dtype, moment=1) for p in self.params]
        self.exp_avg_sqs = [_state_like(p.shape, state_dtype, moment=2) for p in self.params]
        self.amsgrad_max = (
            [_state_like(p.shape, state_dtype, moment=2) for p in self.params]
            if self.amsgrad
            else None
        )
        # Fail now, not at the first step, on bad hyperparameters.
        self._hyperparameters(1)

    def _hyperparameters(self, step: int) -> dict[str, Any]:
        def value(x: Any) -> Any:
            return x(step) if callable(x) else x

        hyperparameters = {
            "learning_rate": value(self.learning_rate),
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "epsilon": self.epsilon,
            "weight_decay": value(self.weight_decay),
            "epsilon_mode": self.epsilon_mode,
            "weight_decay_mode": self.weight_decay_mode,
            "decay_form": self.decay_form,
            "maximize": flag("maximize", self.maximize),
        }
        _check_hyperparameters(hyperparameters)
        return hyperparameters

    def step(self, grads: Any, *, grad_scale: float | None = None) -> None:
        """Applies one update with ``grads`` (a list parallel to ``params``)."""
        step = self.iterations + 1
        adamw_update(
            self.params if self.master_params is None else self.master_params,
            grads,
            self.exp_avgs,
            self.exp_avg_sqs,
            step=step,
            amsgrad_max=self.amsgrad_max,
            grad_scale=grad_scale,
            param_copies=None if self.master_params is None else self.params,
            rounding=self.rounding,
            seed=self.seed,
            **self._hyperparameters(step),
        )
        self.iterations = step

    def state_dict(self) -> dict[str, Any]:
        """Copies of the state: step count, moments (in their dtype), float32
        master weights if kept, scalar hyperparameters."""
        state: dict[str, Any] = {
            "iterations": self.iterations,
            "exp_avgs": [m.copy() for m in self.exp_avgs],
            "exp_avg_sqs": [v.copy() for v in self.exp_avg_sqs],
            "amsgrad_max": None
            if self.amsgrad_max is None
            else [x.copy() for x in self.amsgrad_max],
            "master_params": None
            if self.master_params is None
            else [p.copy() for p in self.master_params],
            "hyperparameters": {
                name: getattr(self, name)
                for name in _SCALAR_HYPERPARAMETERS
                if not callable(getattr(self, name))
            },
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores `state_dict()`'s output, also one saved by another
        configuration (other state dtype, 8-bit included: converted, rounding to nearest;
        master weights saved but not kept here: the params take their rounded
        values; kept but not saved: made from the params). Checks everything
        before changing anything."""
        iterations = state["iterations"]
        if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)):
            raise TypeError(f"state['iterations'] must be an int, got {iterations!r}")
        if iterations < 0:
            raise ValueError(f"state['iterations'] must be >= 0, got {iterations}")
        names = ["exp_avgs", "exp_avg_sqs"] + (["amsgrad_max"] if self.amsgrad else [])
        if not self.amsgrad and state.get("amsgrad_max") is not None:
            raise ValueError("state has amsgrad_max but this optimizer has amsgrad=False")
        masters = state.get("master_params")
        for name in names + (["master_params"] if masters is not None else []):
            arrays = state.get(name)
            if arrays is None or len(arrays) != len(self.params):
                count = "none" if arrays is None else len(arrays)
                raise ValueError(
                    f"state[{name!r}] must hold {len(self.params)} arrays, got {count}"
                )
            for i, (array, p) in enumerate(zip(arrays, self.params, strict=True)):
                if np.shape(array) != p.shape:
                    raise ValueError(
                        f"state[{name!r}][{i}] has shape {np.shape(array)} where params[{i}] "
                        f"has shape {p.shape}"
                    )
                if isinstance(array, QuantizedState):
                    continue
                kind = np.asarray(array).dtype
                if kind.name not in _FLOAT_DTYPES and kind != np.float64:
                    raise TypeError(f"state[{name!r}][{i}] must hold floats, got {kind}")
        hyperparameters = {**self._hyperparameters(self.iterations + 1)}
        hyperparameters.update(state.get("hyperparameters", {}))
        _check_hyperparameters(hyperparameters)

        for name in names:
            for own, array in zip(getattr(self, name), state[name], strict=True):
                _copy_state_into(own, array)
        if masters is not None:
            targets = self.params if self.master_params is None else self.master_params
            for own, array in zip(targets, masters, strict=True):
                np.copyto(own, np.asarray(array).astype(own.dtype))
        elif self.master_params is not None:
            for own, p in zip(self.master_params, self.params, strict=True):
                np.copyto(own, p.astype(np.float32))
        if masters is not None and self.master_params is not None:
            for p, master in zip(self.params, self.master_params, strict=True):
                np.copyto(p, master.astype(p.dtype))
        for name, value in state.get("hyperparameters", {}).items():
            setattr(self, name, value)
        self.iterations = int(iterations)


_SCALAR_HYPERPARAMETERS = (
    "learning_rate",
    "beta_1",
    "beta_2",
    "epsilon",
    "weight_decay",
    "epsilon_mode",
    "weight_decay_mode",
    "decay_form",
    "maximize",
)


def _check_hyperparameters(hyperparameters: dict[str, Any]) -> None:
    """The kernel's own checks, for a clear error before a step is attempted."""
    complete = {"step": 1, "grad_scale": None, **hyperparameters}
    _core.check_hyperparameters(cast("_core.Hyperparameters", complete))


class HostState:
    """Optimizer state in host memory that a compiled step updates in place by
    reference (`keras_adamw.xla.adamw_update_host_state`, and the TensorFlow
    op of offloaded state), registered with the kernel while this object
    lives. The step names the state by its id, so the arrays are never
    copied in or out; a step run after the object is freed raises.

    The state lists hold float32 or bfloat16 NumPy arrays (C-contiguous,
    aligned, writable) or `QuantizedState`; ``masters``, float32 arrays, make
    the update run on them, the params the step is handed (bfloat16 or
    float16) receiving their rounded copies."""

    def __init__(
        self,
        exp_avgs: Sequence[Any],
        exp_avg_sqs: Sequence[Any],
        amsgrad_max: Sequence[Any] | None = None,
        masters: Sequence[Any] | None = None,
    ) -> None:
        self.id = _core.register_host_state(
            list(exp_avgs),
            list(exp_avg_sqs),
            None if amsgrad_max is None else list(amsgrad_max),
            None if masters is None else list(masters),
        )
        self.shapes = [tuple(x.shape) for x in exp_avgs]
        self.amsgrad = amsgrad_max is not None
        self.masters = masters is not None
        weakref.finalize(self, _core.unregister_host_state, self.id)
