"""pytest-benchmark set-up for benchmarks/ (not part of the CI test run: testpaths is tests/).

    pytest benchmarks/ --benchmark-only       # measure
    pytest benchmarks/ --benchmark-disable    # smoke test: every case runs once

GPU cases are skipped without CUDA, and when TRITON_INTERPRET is set (that would time Triton's
interpreter, not the compiled kernels).
"""
import sys
from pathlib import Path

# The test files import the helper modules beside them (common, workloads) by name, whatever
# pytest's import mode.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
