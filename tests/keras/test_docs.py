"""The README's and docs' code still runs: Python blocks marked
``<!-- runnable -->`` are executed, and every ``python <script>`` command in
a shell block names a script that exists and flags its ``--help`` lists."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from keras_helpers import BACKEND

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- runnable -->\n)?```(\w+)\n(.*?)\n```", re.S)


def blocks(language, runnable_only):
    found = []
    for page in PAGES:
        for match in BLOCK.finditer(page.read_text()):
            marked, lang, code = match.groups()
            if lang == language and (marked or not runnable_only):
                line = page.read_text()[: match.start()].count("\n") + 1
                found.append(pytest.param(code, id=f"{page.name}:{line}"))
    return found


RUNNABLE = blocks("python", runnable_only=True)
SHELL = blocks("bash", runnable_only=False)


def test_the_pages_have_blocks_to_check():
    assert len(RUNNABLE) >= 2
    assert len(SHELL) >= 5


@pytest.mark.parametrize("code", RUNNABLE)
def test_a_runnable_python_block_runs(code, tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]


def script_commands(code):
    """(script, flags) of each `python path.py ...` in a shell block."""
    for line in code.splitlines():
        line = line.split("  #")[0]
        for command in re.split(r"&&|;|\|", line):
            words = shlex.split(command, comments=True)
            if "python" in words and len(words) > words.index("python") + 1:
                args = words[words.index("python") + 1 :]
                if args[0].endswith(".py"):
                    yield args[0], [a.split("=")[0] for a in args[1:] if a.startswith("--")]


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the scripts do not depend on the backend")
@pytest.mark.parametrize("code", SHELL)
def test_a_shell_block_names_scripts_and_flags_that_exist(code):
    for script, flags in script_commands(code):
        assert (ROOT / script).is_file(), script
        if not flags:
            continue
        done = subprocess.run(
            [sys.executable, str(ROOT / script), "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        for flag in flags:
            assert flag in done.stdout, f"{script} has no {flag}"
