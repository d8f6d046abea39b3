"""Type stubs for the compiled module (rust/python.rs)."""

from typing import Any, TypedDict

__all__ = [
    "QUANTIZATION_BLOCK",
    "SIMD_ENV_VAR",
    "THREADS_ENV_VAR",
    "__version__",
    "adamw_update",
    "check_hyperparameters",
    "dequantize",
    "num_threads",
    "quantize",
    "read_modify_write",
    "register_host_state",
    "register_tensorflow_op",
    "set_num_threads",
    "set_simd_level",
    "simd_level",
    "supported_simd_levels",
    "unregister_host_state",
    "xla_ffi_handler",
]

__version__: str
SIMD_ENV_VAR: str
THREADS_ENV_VAR: str
QUANTIZATION_BLOCK: int

class Hyperparameters(TypedDict):
    step: int
    learning_rate: float
    beta_1: float
    beta_2: float
    epsilon: float
    weight_decay: float
    epsilon_mode: str
    weight_decay_mode: str
    decay_form: str | None
    maximize: bool
    grad_scale: float | None

def adamw_update(
    params: list[Any],
    grads: list[Any],
    exp_avgs: list[Any],
    exp_avg_sqs: list[Any],
    amsgrad_max: list[Any] | None,
    hyperparameters: Hyperparameters,
    read_from: list[list[Any]] | None,
    param_copies: list[Any] | None,
    rounding: str,
    seed: int,
) -> None: ...
def check_hyperparameters(hyperparameters: Hyperparameters) -> None: ...
def quantize(values: Any, codes: Any, scales: Any, moment: int) -> None: ...
def dequantize(codes: Any, scales: Any, moment: int, values: Any) -> None: ...
def read_modify_write(
    params: list[Any], grads: list[Any], exp_avgs: list[Any], exp_avg_sqs: list[Any]
) -> None: ...
def simd_level() -> str: ...
def xla_ffi_handler() -> Any:
    """The update as an XLA FFI handler (a PyCapsule) for jax.ffi.register_ffi_target."""

def register_host_state(
    exp_avgs: list[Any],
    exp_avg_sqs: list[Any],
    amsgrad_max: list[Any] | None = None,
    masters: list[Any] | None = None,
) -> int:
    """Registers host arrays as state the XLA handler and the TensorFlow op
    update by reference (and float32 masters of 16-bit params); returns its id."""

def unregister_host_state(id: int) -> None: ...
def supported_simd_levels() -> list[str]: ...
def set_simd_level(level: str) -> None: ...
def num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def register_tensorflow_op(framework_library: str) -> str:
    """Registers the update as a TensorFlow op; returns the op's name."""
