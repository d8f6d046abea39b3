"""Float32 values rounded to a 16-bit type inside a compiled step, over keras.ops.

To nearest even is a cast. Stochastic rounding rounds up with probability
equal to the fraction of a step it drops, so it is unbiased: updates smaller
than half a step add up in expectation instead of being rounded away. The
definitions are the host kernel's (rust/dtype/bf16.rs and f16.rs), with
random bits of Keras's generator instead of the kernel's hash.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

SIXTEEN_BIT = ("bfloat16", "float16")

#: Random bits per element: bfloat16 drops 16 of float32's bits, float16 13.
RANDOM_BITS = 16


def random_bits(shape: Any, seed_generator: Any) -> Any:
    """Uniform int32 in [0, 2^16), one per element."""
    return keras.random.randint(shape, 0, 1 << RANDOM_BITS, dtype="int32", seed=seed_generator)


def stochastic(x: Any, dtype: str, random: Any) -> Any:
    """Float32 ``x`` rounded stochastically to ``dtype`` (bfloat16 or float16),
    with ``random`` from `random_bits`. NaN stays NaN; values past the largest
    finite one may round to infinity, as a cast does."""
    rounded = _bfloat16_grid(x, random) if dtype == "bfloat16" else _float16_grid(x, random)
    return ops.cast(ops.where(ops.isnan(x), x, rounded), dtype)


def _carried(x: Any, random: Any, dropped: int) -> Any:
    """``x`` with ``random`` added below its kept bits, which are then kept:
    an integer carry rounds up with probability equal to the dropped fraction.
    (On float32 bit patterns two's complement adds as unsigned numbers do.)"""
    bits = ops.add(ops.view(x, "int32"), ops.bitwise_and(random, dropped))
    return ops.view(ops.bitwise_and(bits, ~dropped), "float32")


def _bfloat16_grid(x: Any, random: Any) -> Any:
    return _carried(x, random, 0xFFFF)  # bfloat16 is float32's top half


def _float16_grid(x: Any, random: Any) -> Any:
    # Normal float16 values have float32's exponent range clipped and 10 of
    # its 23 mantissa bits. Below the smallest normal, 2^-14, float16's grid
    # is fixed (2^-24 apart), so scale to it and round up with the fraction.
    normal = _carried(x, random, 0x1FFF)
    fraction = ops.cast(ops.bitwise_and(random, 0x1FFF), "float32") * (1.0 / 8192)
    subnormal = ops.floor(x * 2.0**24 + fraction) * 2.0**-24
    return ops.where(ops.abs(x) < 2.0**-14, subnormal, normal)
