"""Argument checks shared by the host API and the Keras optimizer (NumPy only)."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np


def real(value: Any) -> float | None:
    """A real scalar as a float: Python and NumPy numbers, 0-d arrays and
    tensors of any backend (as Keras accepts them); None for anything else."""
    if isinstance(value, (bool, np.bool_, str, bytes)):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if getattr(value, "shape", None) != ():
        return None
    try:
        array = np.asarray(value)
    except Exception:  # a symbolic tensor, or anything NumPy cannot read
        return None
    return float(array) if array.dtype.kind in "fiu" else None


def flag(name: str, value: Any) -> bool:
    """True or False (NumPy's too), never a truthy stand-in such as the string "False"."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)
