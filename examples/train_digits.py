"""The main demo: one Keras model learns scikit-learn's handwritten digits
twice on the CPU, once with keras.optimizers.AdamW and once with
keras_adamw.AdamW, with the same schedule, decay and seed, on whichever
backend KERAS_BACKEND names (tensorflow, jax or torch). It prints each
epoch's time and validation accuracy, and writes digits.png: both loss curves
and the time per epoch.

The model is wide for 8x8 images (two hidden layers of 2048, 4.3M
parameters), so that the optimizer's update weighs in each step as it does
in models dominated by wide layers or embeddings.

    KERAS_BACKEND=jax python examples/train_digits.py
"""

import time

import keras
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from keras_adamw import AdamW
from keras_adamw.schedules import WarmupCosineDecay

EPOCHS = 8
BATCH_SIZE = 32
WIDTH = 2048
PLOT = "digits.png"


class EpochTimes(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs["time"] = time.perf_counter() - self.start  # lands in the History


def load():
    digits = load_digits()  # 1797 8x8 images, shipped inside scikit-learn
    x = (digits.images.reshape(-1, 64) / 16.0).astype("float32")
    return train_test_split(
        x, digits.target, test_size=0.25, random_state=0, stratify=digits.target
    )


def train(name, make_optimizer, x_train, y_train, x_test, y_test):
    keras.utils.set_random_seed(0)  # the same initial weights and batches for both
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(WIDTH, activation="relu", name="hidden_1"),
            keras.layers.Dense(WIDTH, activation="relu", name="hidden_2"),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(10, activation="softmax", name="classifier"),
        ]
    )
    steps = EPOCHS * int(np.ceil(len(x_train) * 0.9 / BATCH_SIZE))
    schedule = WarmupCosineDecay(1e-3, warmup_steps=steps // 10, decay_steps=steps)
    optimizer = make_optimizer(schedule)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    print(f"\n== {name} ({model.count_params() / 1e6:.1f}M parameters)")
    history = model.fit(
        x_train,
        y_train,
        batch_size=BATCH_SIZE,
        epochs=EPOCHS,
        validation_split=0.1,
        callbacks=[EpochTimes()],
        verbose=1,
    )
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    return history.history, accuracy


def keras_adamw_optimizer(schedule):
    return AdamW(learning_rate=schedule, weight_decay=0.01, exclude_from_weight_decay=["bias"])


def keras_optimizer(schedule):
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=0.01)
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    return optimizer


def plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (losses, times) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = np.arange(1, EPOCHS + 1)
    for (name, (history, _)), color in zip(runs.items(), ["tab:gray", "tab:orange"], strict=True):
        losses.plot(epochs, history["loss"], color=color, label=f"{name}, training")
        losses.plot(epochs, history["val_loss"], "--", color=color, label=f"{name}, validation")
    losses.set(xlabel="epoch", ylabel="loss", yscale="log", title="Loss")
    losses.legend()
    width = 0.4
    for k, (name, (history, _)) in enumerate(runs.items()):
        times.bar(epochs + (k - 0.5) * width, history["time"], width, label=name)
    times.set(xlabel="epoch", ylabel="seconds", title="Time per epoch (the first compiles)")
    times.legend()
    figure.suptitle(f"Digits, {keras.backend.backend()} backend, CPU")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main():
    x_train, x_test, y_train, y_test = load()
    print(f"Keras {keras.__version__} on {keras.backend.backend()}; {len(x_train)} training images")
    runs = {
        "keras.optimizers.AdamW": train(
            "keras.optimizers.AdamW", keras_optimizer, x_train, y_train, x_test, y_test
        ),
        "keras_adamw.AdamW": train(
            "keras_adamw.AdamW", keras_adamw_optimizer, x_train, y_train, x_test, y_test
        ),
    }
    print(f"\n{'epoch':>5}  {'keras.optimizers.AdamW':>28}  {'keras_adamw.AdamW':>28}")
    for epoch in range(EPOCHS):
        cells = [
            f"{h['time'][epoch]:6.2f} s, val acc {h['val_accuracy'][epoch]:.3f}"
            for h, _ in runs.values()
        ]
        print(f"{epoch + 1:>5}  {cells[0]:>28}  {cells[1]:>28}")
    (theirs, their_accuracy), (ours, our_accuracy) = runs.values()
    # After the first epoch, which compiles the step.
    their_time, our_time = sum(theirs["time"][1:]), sum(ours["time"][1:])
    print(
        f"epochs 2-{EPOCHS}: keras.optimizers.AdamW {their_time:.1f} s, keras_adamw.AdamW "
        f"{our_time:.1f} s ({their_time / our_time:.2f}x)"
    )
    print(f"keras.optimizers.AdamW test accuracy: {their_accuracy:.4f}")
    print(f"test accuracy: {our_accuracy:.4f} (keras_adamw.AdamW)")
    plot(runs, PLOT)
    print(f"wrote {PLOT}")


if __name__ == "__main__":
    main()
