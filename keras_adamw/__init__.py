"""keras_adamw: AdamW for Keras 3, with a fast in-place host kernel in Rust.

- `keras_adamw.AdamW`: the Keras 3 optimizer (TensorFlow, JAX, PyTorch).
- `keras_adamw.schedules`: warmup + cosine / linear decay schedules.
- `keras_adamw.host`: the host (CPU) kernel; works without Keras.

Importing the package registers `AdamW` and the schedules with Keras (so a
saved `.keras` file loads) when Keras and its backend import.
"""

from keras_adamw._core import __version__

__all__ = ["__version__"]

try:
    import keras  # noqa: F401
except ImportError:  # no Keras, or no backend for it: keras_adamw.host still works
    pass
else:
    from keras_adamw import schedules
    from keras_adamw.optimizer import AdamW

    __all__ += ["AdamW", "schedules"]
