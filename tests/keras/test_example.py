"""The README's main job: examples/train_digits.py trains and reports its accuracy."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from keras_helpers import BACKEND

EXAMPLE = Path(__file__).parents[2] / "examples" / "train_digits.py"


def test_digits_example_learns(tmp_path):
    pytest.importorskip("sklearn")
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
    accuracy = float(re.search(r"test accuracy: ([0-9.]+)", out.stdout).group(1))
    assert accuracy >= 0.93, out.stdout[-2000:]
