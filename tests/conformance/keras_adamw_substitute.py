"""A pytest plugin that runs Keras's own test modules against keras_adamw.

Loaded with ``-p keras_adamw_substitute`` before pytest imports Keras's
tests, it puts our class where Keras's `Adam` and `AdamW` are found (their
modules, `keras.optimizers`, and the names `keras.optimizers.get` resolves),
in the layout that ``KERAS_ADAMW_LAYOUT`` names: ``ops``, ``auto`` or
``offload`` (``keras``: nothing substituted, Keras's own classes, the
baseline). Tests that legitimately differ are marked xfail(strict=True) from
`accepted_differences.py`: each must still fail, for its stated reason.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

LAYOUTS: dict[str, dict[str, Any]] = {
    "ops": {"implementation": "ops"},
    "auto": {"implementation": "auto"},
    "offload": {"offload_state": True},
    "keras": {},
}
LAYOUT = os.environ.get("KERAS_ADAMW_LAYOUT", "auto")
if LAYOUT not in LAYOUTS:
    raise ValueError(f"KERAS_ADAMW_LAYOUT must be one of {', '.join(LAYOUTS)}, got {LAYOUT!r}")


import keras  # noqa: E402  (after the layout check: KERAS_BACKEND is already set)

import keras_adamw  # noqa: E402


# Module-level and registered, as Keras's classes are: picklable, serializable.
@keras.saving.register_keras_serializable(package="keras_adamw_conformance")
class AdamW(keras_adamw.AdamW):  # type: ignore[misc]
    """Ours, in the layout under test."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # Keras's torch backend replaces whatever class `keras.optimizers.Adam`
        # and `AdamW` name by its own (`TorchOptimizer.__new__`), and those
        # names are ours now: skip that swap. No other base defines __new__.
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**LAYOUTS[LAYOUT], **kwargs})


@keras.saving.register_keras_serializable(package="keras_adamw_conformance")
class Adam(AdamW):
    """Keras's Adam is AdamW without weight decay (its `weight_decay` is the
    same decoupled decay, None by default)."""

    def __init__(self, *args: Any, weight_decay: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, weight_decay=weight_decay or 0.0, **kwargs)


def _substitute() -> None:
    from keras.src import optimizers
    from keras.src.optimizers import adam, adamw

    for module in (adamw, optimizers, keras.optimizers):
        module.AdamW = AdamW
    for module in (adam, optimizers, keras.optimizers):
        module.Adam = Adam
    optimizers.ALL_OBJECTS_DICT.update(adam=Adam, adamw=AdamW)


def pytest_configure(config: pytest.Config) -> None:
    # Keras's own conftest (not in its wheel) registers this mark; every
    # backend here trains, so it selects nothing out.
    config.addinivalue_line("markers", "requires_trainable_backend: needs a trainable backend")
    if LAYOUT != "keras":
        _substitute()


def pytest_report_header(config: pytest.Config) -> str:
    return f"keras_adamw conformance: layout {LAYOUT}, Keras {keras.__version__}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from accepted_differences import accepted

    for item in items:
        reason = accepted(item.nodeid, keras.backend.backend(), LAYOUT)
        if reason is not None:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=True))
