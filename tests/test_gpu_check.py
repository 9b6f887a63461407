"""The GPU check's plumbing (benchmarks/gpu_check.sh --dry): every stage runs on a CPU in Triton's
interpreter at tiny sizes and leaves its files, so a lent GPU's minutes are not spent on a typo."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_stage(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this venv's python3
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    log = (out / "log.txt").read_text() if (out / "log.txt").exists() else done.stdout + done.stderr
    assert done.returncode == 0, log
    for stage in ("env", "tune", "syncs", "kernels", "throughput"):
        assert f"=== {stage}: exit 0" in log, log
    with tarfile.open(out / "results.tgz") as archive:
        names = set(archive.getnames())
    assert {"files/tune.json", "files/syncs.json"} <= names
    assert any(name.startswith("files/bench/") and name.endswith(".json") for name in names)
    tune = json.loads((out / "files" / "tune.json").read_text())
    # Every launch wrote every element, and the launch shape does not change the noise stream.
    steps = [row for row in tune["rows"] if row["op"] != "copy"]
    assert steps and all(row["all_written"] for row in steps)
    assert all(row["same_as_first_shape"] in (None, True) for row in steps)
    syncs = json.loads((out / "files" / "syncs.json").read_text())
    assert any(row["case"].startswith("fastddpm.sample") for row in syncs["rows"])
    # The throughput stage: one row per (system, setting, batch), the fields the issue names.
    [throughput_file] = (out / "files" / "bench").glob("*/*-throughput.json")
    rows = json.loads(throughput_file.read_text())["throughput"]
    assert {row["system"] for row in rows} == {"fastddpm", "diffusers"}
    assert any(row["batch_label"] == "auto" for row in rows)
    for row in rows:
        assert row["status"] == "ok", row
        for key in ("setting", "batch_size", "samples_per_s", "projected_50k_s", "peak_memory_bytes", "timing"):
            assert key in row, (key, row)
        if row["system"] == "fastddpm":
            assert row["model_only_samples_per_s"] > 0 and row["outside_model_share"] < 1
    assert len({(row["system"], row["setting"], row["batch_label"]) for row in rows}) == len(rows)
    assert not list((out / "files" / "bench").glob("*/*.partial.json"))  # replaced by the whole file


def test_the_gpu_stage_prints_each_failure_as_it_happens(tmp_path):
    """tests/print_failures.py: the traceback of a failed test reaches stderr before the next test
    runs, not only in the summary at the end (a GPU stage can be cut short by its limit)."""
    (tmp_path / "test_two.py").write_text(
        "import sys\n"
        "def test_fails():\n    assert 1 + 1 == 3, 'arithmetic'\n"
        "def test_next():\n    sys.stderr.write('NEXT TEST RUNNING\\n')\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"))
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "print_failures", "--tb=short", "-q", "-s",
                           "-p", "no:cacheprovider", str(tmp_path / "test_two.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    err = done.stderr
    assert "=== FAILED test_two.py::test_fails (call)" in err and "arithmetic" in err, err
    assert err.index("=== FAILED") < err.index("NEXT TEST RUNNING")


def test_gpu_facing_tests_are_marked_for_the_gpu_stage():
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu_facing",
                           "-p", "no:cacheprovider", "tests/test_kernels.py", "tests/test_metrics.py"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    collected = [line for line in done.stdout.splitlines() if "::" in line]
    assert collected and all(line.startswith("tests/test_kernels.py::") for line in collected), done.stdout[-2000:]
