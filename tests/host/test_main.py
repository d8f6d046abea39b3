"""`python -m keras_adamw`: what the package does on this machine."""

import importlib.util
import json
import subprocess
import sys

from keras_adamw import _core


def run(*args, tmp_path):
    # -I, outside the source tree: the installed package.
    out = subprocess.run(
        [sys.executable, "-I", "-m", "keras_adamw", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_json_report_describes_this_machine(tmp_path):
    report = json.loads(run("--json", tmp_path=tmp_path))
    assert report["versions"]["keras_adamw"] == _core.__version__
    assert report["simd_level"] in report["supported_simd_levels"]
    assert report["supported_simd_levels"] == _core.supported_simd_levels()
    assert report["threads"] == _core.num_threads() >= 1
    check = report["self_check"]
    assert check["kernel_gparams_per_s"] > 0 and check["ceiling_gparams_per_s"] > 0
    assert 10 < check["percent_of_ceiling"] < 1000
    installed = [b for b in ("tensorflow", "jax", "torch") if importlib.util.find_spec(b)]
    assert sorted(report["auto"]) == sorted(installed)
    for backend in installed:  # float32 on a CPU: the README says "auto" takes the host kernel
        assert report["auto"][backend]["path"] == "host", report["auto"][backend]
    if "tensorflow" in installed:
        assert report["auto"]["tensorflow"]["runs as"] == "the TensorFlow op"


def test_text_report_names_the_simd_level_and_each_backend(tmp_path):
    text = run(tmp_path=tmp_path)
    assert f"SIMD: {_core.simd_level()}" in text
    assert "% of the ceiling" in text
    for backend in ("tensorflow", "jax", "torch"):
        if importlib.util.find_spec(backend):
            assert f"  {backend:<11} host" in text
