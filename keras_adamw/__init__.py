"""keras_adamw: AdamW for Keras 3, with a fast in-place host kernel in Rust.

- `keras_adamw.AdamW`: the Keras 3 optimizer (TensorFlow, JAX, PyTorch).
- `keras_adamw.schedules`: warmup + cosine / linear decay schedules.
- `keras_adamw.host`: the host (CPU) kernel; works without Keras.

The Keras parts load on first use, so that `keras_adamw.host` never imports
Keras (and with it a backend such as TensorFlow). When Keras is already
imported, they load at once, which registers them with Keras so that a saved
`.keras` file loads after `import keras, keras_adamw`.
"""

import sys
from typing import TYPE_CHECKING, Any

from keras_adamw._core import __version__

if TYPE_CHECKING:
    from keras_adamw import schedules
    from keras_adamw.optimizer import AdamW

__all__ = ["AdamW", "__version__", "schedules"]


def __getattr__(name: str) -> Any:
    if name == "AdamW":
        from keras_adamw.optimizer import AdamW

        return AdamW
    if name == "schedules":
        import keras_adamw.schedules

        return keras_adamw.schedules
    raise AttributeError(f"module 'keras_adamw' has no attribute {name!r}")


if "keras" in sys.modules:
    from keras_adamw import schedules
    from keras_adamw.optimizer import AdamW
