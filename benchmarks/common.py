"""Shared plumbing of the benchmarks: timers, statistics, the run's metadata, size parsing.

Nothing here knows what is measured (that is :mod:`workloads`); ``run.py`` and the
pytest-benchmark files both import from here.
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

HAS_CUDA = torch.cuda.is_available()
BENCH_DEVICE = "cuda" if HAS_CUDA else "cpu"


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def synchronized(fn: Callable[[], object], device: str = BENCH_DEVICE) -> Callable[[], object]:
    """``fn`` followed by a device synchronisation, so wall-clock timers see the GPU work."""
    if device != "cuda":
        return fn

    def call():
        result = fn()
        torch.cuda.synchronize()
        return result

    return call


# Sentinel statuses of a row that has no timing (kept as strings so that the JSON stays flat).
NO_GPU = "no GPU"
OK = "ok"


def drop_triton_interpreter() -> bool:
    """Unset TRITON_INTERPRET before fastddpm's kernels are imported.

    Timing the interpreter would be meaningless, and with it set the ``triton`` backend would
    run interpreted even on a GPU. Returns whether it was set.
    """
    was_set = triton_interpreted()
    os.environ.pop("TRITON_INTERPRET", None)
    return was_set


# ---------------------------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------------------------
_SUFFIXES = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


def parse_size(text: str) -> int:
    """``"64K"`` -> 65536, ``"16M"`` -> 16777216, ``"1000"`` -> 1000 (binary multiples)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)\s*", str(text))
    if not match:
        raise ValueError(f"size must be a positive integer with an optional K/M/G suffix, got {text!r}")
    value = int(match.group(1)) * _SUFFIXES[match.group(2).upper()]
    if value < 1:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def format_size(numel: int) -> str:
    for suffix in ("G", "M", "K"):
        unit = _SUFFIXES[suffix]
        if numel >= unit and numel % unit == 0:
            return f"{numel // unit}{suffix}"
    return str(numel)


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------
def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty sequence."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("quantile of an empty sequence")
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(times_s: Sequence[float], **extra) -> Dict:
    """Median / p20 / p80 / count of per-call times in seconds, plus every raw time."""
    times = [float(t) for t in times_s]
    return dict(
        median_s=statistics.median(times),
        p20_s=quantile(times, 0.2),
        p80_s=quantile(times, 0.8),
        count=len(times),
        times_s=times,
        **extra,
    )


# ---------------------------------------------------------------------------------------------
# timers
# ---------------------------------------------------------------------------------------------
def time_cpu(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 7, min_repeat_s: float = 0.01,
             max_number: int = 1000) -> Dict:
    """timeit-style: ``warmup`` untimed calls, then ``repeats`` timings of ``number`` back-to-back
    calls each, ``number`` chosen (as timeit's autorange does) so one repeat lasts at least
    ``min_repeat_s``. Per-call times in seconds."""
    for _ in range(warmup):
        fn()
    number = 1
    while True:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_repeat_s or number >= max_number:
            break
        number = min(max_number, number * 10 if elapsed < min_repeat_s / 10 else number * 2)
    times = [elapsed / number]
    for _ in range(repeats - 1):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - start) / number)
    return summarize(times, method="perf_counter", number=number, warmup=warmup)


def time_cuda(fn: Callable[[], object], *, warmup_ms: float = 25, rep_ms: float = 100) -> Dict:
    """Per-call GPU time with the L2 cache flushed before every call: triton.testing.do_bench
    (CUDA events, warm-up, as many repeats as fit in ``rep_ms``). Falls back to the same
    protocol by hand when triton is missing."""
    try:
        from triton.testing import do_bench
    except Exception:  # pragma: no cover - triton ships with CUDA builds of torch on Linux
        do_bench = None
    if do_bench is not None:
        times_ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
        return summarize([t / 1e3 for t in times_ms], method="triton.testing.do_bench (L2 flushed)")
    flush = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end), 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        fn()
    count = max(5, int(rep_ms / estimate_ms))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
    for begin, finish in zip(starts, ends):
        flush.zero_()
        begin.record()
        fn()
        finish.record()
    torch.cuda.synchronize()
    return summarize([b.elapsed_time(f) / 1e3 for b, f in zip(starts, ends)], method="cuda events (L2 flushed)")


def time_cuda_back_to_back(fn: Callable[[], object], *, calls: int = 50, repeats: int = 5, warmup: int = 5) -> Dict:
    """Per-call time of ``calls`` back-to-back launches between two CUDA events, no L2 flush:
    what a sampling loop sees, launch and host overhead included (do_bench's flush before each
    call hides host work shorter than the flush)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return summarize(times, method="cuda events, back-to-back", number=calls)


def time_wall(fn: Callable[[], object], *, device: str, repeats: int = 1, warmup: int = 1) -> Dict:
    """Wall-clock seconds of whole calls (end-to-end runs), synchronising the device around each."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return summarize(times, method="perf_counter (synchronised)", warmup=warmup)


# ---------------------------------------------------------------------------------------------
# run metadata
# ---------------------------------------------------------------------------------------------
def _git(*args: str) -> Optional[str]:
    try:
        result = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20)
    except Exception:
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_state() -> Dict:
    """Short commit and whether the working tree differs from it (read-only git calls).

    ``FASTDDPM_SOURCE_COMMIT`` overrides the commit: a copy of the tree sent to another machine
    (the GPU check) can carry a stale ``.git``, whose HEAD is not the code that ran."""
    override = os.environ.get("FASTDDPM_SOURCE_COMMIT")
    if override:
        return dict(commit=override, dirty=None, commit_from="FASTDDPM_SOURCE_COMMIT")
    commit = _git("rev-parse", "--short", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return dict(commit=commit or "unknown", dirty=None if status is None else bool(status))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else cpu_name()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def device_slug(device: str) -> str:
    name = device_name(device)
    return slug(name) if device == "cuda" else "cpu-" + slug(name)


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def run_metadata(device: str, argv: Sequence[str]) -> Dict:
    """Everything needed to tell two results files apart."""
    meta = dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        device=device,
        device_name=device_name(device),
        command=" ".join([os.path.basename(sys.executable)] + list(argv)),
        python=platform.python_version(),
        platform=platform.platform(),
        torch=torch.__version__,
        triton=_version("triton"),
        diffusers=_version("diffusers"),
        fastddpm=_version("fastddpm"),
        cpu=cpu_name(),
        torch_threads=torch.get_num_threads(),
        **{f"git_{key}": value for key, value in git_state().items()},
    )
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        meta.update(cuda=torch.version.cuda, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_sm_count=props.multi_processor_count,
                    gpu_l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None,
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    return meta


def error_text(exc: BaseException) -> str:
    """One line for a results row: the exception type and the first line of its message."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"error: {type(exc).__name__}: {first}"[:300]


def sanitize(times_summary: Dict, keep_raw: int = 2000) -> Dict:
    """Cap the raw time list of one row (do_bench may return thousands) to keep files small."""
    raw = times_summary.get("times_s")
    if raw is not None and len(raw) > keep_raw:
        times_summary = dict(times_summary, times_s=raw[:keep_raw], times_truncated=True)
    return times_summary


def percent(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def ratio(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.2f}x"


def millis(seconds: Optional[float]) -> str:
    if seconds is None:
        return "—"
    ms = seconds * 1e3
    return f"{ms:.4f}" if ms < 0.1 else f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def markdown_table(headers: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
