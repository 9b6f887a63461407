"""diffusers' own scheduler test files with the import swapped to fastddpm's drop-ins (issue 23).

Neither diffusers' wheel nor its sdist (0.42.1) ships ``tests/schedulers/``, so these run where a
diffusers checkout is at hand: set ``FASTDDPM_DIFFUSERS_TESTS`` to its ``tests`` folder (the one
holding ``schedulers/test_scheduler_ddpm.py``). Each file is copied with the whole ``tests`` tree
into a scratch folder, the scheduler's name is rebound to fastddpm's class right after the file's
imports (nothing else changes), and pytest runs it in a fresh interpreter: every test must pass.
Without the variable the tests skip, saying so.
"""
import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SUITES = {
    "test_scheduler_ddpm.py": "DDPMScheduler",
    "test_scheduler_ddim.py": "DDIMScheduler",
    "test_scheduler_dpm_multi.py": "DPMSolverMultistepScheduler",
    "test_scheduler_unipc.py": "UniPCMultistepScheduler",
}
TESTS = os.environ.get("FASTDDPM_DIFFUSERS_TESTS")


def swap_import(source: str, name: str) -> str:
    """``source`` with ``name`` rebound to ``fastddpm.<name>`` after its last top-level import."""
    tree = ast.parse(source)
    last = max(node.end_lineno for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom)))
    lines = source.splitlines(keepends=True)
    return "".join(lines[:last]) + f"from fastddpm import {name}  # swapped in by fastddpm's suite\n" + "".join(
        lines[last:])


def test_swap_import_rebinds_the_name_after_the_imports():
    source = "import torch\nfrom diffusers import (\n    DDPMScheduler,\n)\n\nx = DDPMScheduler\n"
    swapped = swap_import(source, "DDPMScheduler")
    namespace = {}
    exec(compile(swapped.replace("import torch\n", "").replace(
        "from diffusers import (\n    DDPMScheduler,\n)\n", "DDPMScheduler = None\n"), "s", "exec"), namespace)
    assert "from fastddpm import DDPMScheduler" in swapped.splitlines()[4]
    assert namespace["x"] is not None  # rebound to fastddpm's class before the module uses it


def run_suite(tests: Path, file_name: str, scratch: Path) -> subprocess.CompletedProcess:
    """pytest on ``tests/schedulers/<file_name>`` copied into ``scratch`` with the import swapped."""
    copy = scratch / "tests"
    shutil.copytree(tests, copy)
    target = copy / "schedulers" / file_name
    target.write_text(swap_import(target.read_text(encoding="utf-8"), SUITES[file_name]), encoding="utf-8")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(target)],
                          cwd=scratch, capture_output=True, text=True, timeout=1800)


def test_the_harness_runs_a_suite_against_fastddpms_class(tmp_path):
    """A stand-in of diffusers' layout whose test reads the class it was given: the swapped copy
    sees fastddpm's, and a failing test fails the run."""
    pytest.importorskip("diffusers")
    tests = tmp_path / "fake" / "tests"
    (tests / "schedulers").mkdir(parents=True)
    (tests / "schedulers" / "test_scheduler_unipc.py").write_text(
        "from diffusers import UniPCMultistepScheduler\n\n\n"
        "def test_which_class():\n"
        "    assert UniPCMultistepScheduler.__module__ == 'fastddpm.schedulers'\n")
    done = run_suite(tests, "test_scheduler_unipc.py", tmp_path / "run1")
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout + done.stderr
    (tests / "schedulers" / "test_scheduler_unipc.py").write_text(
        "from diffusers import UniPCMultistepScheduler\n\n\ndef test_fails():\n    assert False\n")
    assert run_suite(tests, "test_scheduler_unipc.py", tmp_path / "run2").returncode != 0


@pytest.mark.slow
@pytest.mark.parametrize("file_name", list(SUITES))
def test_diffusers_scheduler_suite_passes_with_the_import_swapped(file_name, tmp_path):
    if not TESTS or not (Path(TESTS) / "schedulers" / file_name).is_file():
        pytest.skip(f"diffusers' test files are not at hand (set FASTDDPM_DIFFUSERS_TESTS to a diffusers checkout's "
                    f"tests folder holding schedulers/{file_name}; neither diffusers' wheel nor its sdist ships them)")
    done = run_suite(Path(TESTS), file_name, tmp_path)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
