"""The main demo: a small Keras model learns scikit-learn's handwritten digits
with keras_adamw.AdamW and a warmup-cosine schedule, on whichever backend
KERAS_BACKEND names (tensorflow, jax or torch).

    KERAS_BACKEND=jax python examples/train_digits.py
"""

import keras
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from keras_adamw import AdamW
from keras_adamw.schedules import WarmupCosineDecay

EPOCHS = 20
BATCH_SIZE = 32


def main():
    keras.utils.set_random_seed(0)
    digits = load_digits()  # 1797 8×8 images, shipped inside scikit-learn
    x = (digits.images.reshape(-1, 64) / 16.0).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.25, random_state=0, stratify=digits.target
    )
    steps = EPOCHS * int(np.ceil(len(x_train) / BATCH_SIZE))

    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="relu", name="hidden"),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(10, activation="softmax", name="classifier"),
        ]
    )
    optimizer = AdamW(
        learning_rate=WarmupCosineDecay(3e-3, warmup_steps=steps // 10, decay_steps=steps),
        weight_decay=0.01,
        exclude_from_weight_decay=["bias"],
    )
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    print(f"Keras {keras.__version__} on {keras.backend.backend()}; {len(x_train)} training images")
    model.fit(
        x_train, y_train, batch_size=BATCH_SIZE, epochs=EPOCHS, validation_split=0.1, verbose=2
    )
    loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"test accuracy: {accuracy:.4f} (loss {loss:.4f})")


if __name__ == "__main__":
    main()
