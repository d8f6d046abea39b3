"""The README's main job: examples/train_digits.py trains one model with
keras.optimizers.AdamW and with ours, reports both, and plots them."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from keras_helpers import BACKEND

EXAMPLE = Path(__file__).parents[2] / "examples" / "train_digits.py"


def test_digits_example_learns_with_both_optimizers_and_plots(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    env = dict(os.environ, KERAS_BACKEND=BACKEND)
    out = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"on {BACKEND}" in out.stdout
    for line in (
        r"^keras\.optimizers\.AdamW test accuracy: ([0-9.]+)$",
        r"^test accuracy: ([0-9.]+) \(keras_adamw\.AdamW\)$",
    ):
        accuracy = float(re.search(line, out.stdout, re.MULTILINE).group(1))
        assert accuracy >= 0.93, out.stdout[-2000:]
    assert re.search(r"epochs 2-\d+: keras.optimizers.AdamW [0-9.]+ s, keras_adamw", out.stdout)
    assert (tmp_path / "digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
