"""The README's set-up commands are what CI runs: keep the two from drifting apart."""
import re
from pathlib import Path

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
