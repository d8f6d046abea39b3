"""keras_adamw: AdamW for Keras 3, with a fast in-place host kernel in Rust.

- `keras_adamw.host`: the host (CPU) kernel; imports without Keras.
"""

from keras_adamw._core import __version__

__all__ = ["__version__"]
