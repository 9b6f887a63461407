"""A pytest plugin for a GPU session's test stage: each failure's traceback printed the moment it
happens (to stderr), not only in the summary at the end, so a stage cut short by its time limit
still shows why its tests failed. Used as ``python -m pytest -p print_failures --tb=short ...``
with ``tests/`` on ``PYTHONPATH`` (benchmarks/gpu_check.sh); under pytest-xdist the controller
prints the workers' reports as they arrive."""
import sys


def pytest_runtest_logreport(report):
    if report.failed:
        sys.stderr.write(f"\n=== FAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n")
        sys.stderr.flush()
