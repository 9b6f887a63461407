"""The README stays true: its set-up commands are what CI runs, and its scheduler example runs as written."""
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _shell_lines(text: str):
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, flags=re.S)
    assert blocks, "README.md has no bash code block"
    test_block = next((b for b in blocks if "pytest" in b), None)
    assert test_block is not None, "README.md has no test command"
    test_command = next(line for line in _shell_lines(test_block) if "pytest" in line)
    ci_lines = _shell_lines((ROOT / ".ci" / "run").read_text(encoding="utf-8"))
    assert test_command in ci_lines
    assert "pip install torch==2.13.0" in ci_lines


def test_cli_help_lists_every_command(capsys):
    from fastddpm.cli import COMMANDS, main

    assert main([]) == 2
    printed = capsys.readouterr().out
    for name in COMMANDS:
        assert name in printed


def test_the_scheduler_swap_snippet_runs_as_written(one_cpu_thread):
    """The README's "Swapping the scheduler" example defines everything it uses and samples."""
    pytest.importorskip("diffusers")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Swapping the scheduler", 1)[1].split("\n### ", 1)[0]
    snippets = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(snippets) == 1
    namespace = {}
    exec(compile(snippets[0], "README.md", "exec"), namespace)
    x, scheduler = namespace["x"], namespace["scheduler"]
    assert type(scheduler).__module__ == "fastddpm.schedulers"
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()


def test_the_accelerate_snippet_runs_as_written(one_cpu_thread):
    """The README's "One line for an existing diffusers pipeline" example runs and draws images."""
    pytest.importorskip("diffusers")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### One line for an existing diffusers pipeline", 1)[1].split("\n### ", 1)[0]
    snippets = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(snippets) == 1
    namespace = {}
    exec(compile(snippets[0], "README.md", "exec"), namespace)
    pipe, images = namespace["pipe"], namespace["images"]
    assert type(pipe).__name__ == "AcceleratedPipeline"
    assert len(images) == 4 and images[0].size == (8, 8)
