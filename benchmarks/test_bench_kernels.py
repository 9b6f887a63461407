"""pytest-benchmark groups of the per-step kernels and their baselines (one group per op, dtype
and size: fastddpm's Triton kernel, the eager reference, torch.compile of it, diffusers).

These time back-to-back calls with a synchronisation each (no L2 flush); benchmarks/run.py is
the L2-flushed, roofline-relative measurement.
"""
import pytest
import torch

import workloads
from common import BENCH_DEVICE as DEVICE
from common import HAS_CUDA, format_size, synchronized, triton_interpreted

requires_gpu = pytest.mark.skipif(not HAS_CUDA or triton_interpreted(),
                                  reason="needs a CUDA device (and TRITON_INTERPRET unset)")

# On a CPU the sizes stay small: these double as a quick smoke test with --benchmark-disable.
SIZES = [2**20, 16 * 2**20] if HAS_CUDA else [2**16]
EMBEDDING_BATCHES = [128, 4096]
DTYPES = ["fp32", "bf16"]


def _impl_params(op):
    return [pytest.param(impl, marks=requires_gpu) if impl in workloads.GPU_ONLY_IMPLS else impl
            for impl in workloads.OP_IMPLS[op]]


def _run(benchmark, op, impl, numel, dtype_name):
    dtype = workloads.DTYPES[dtype_name]
    fn = workloads.build_kernel_case(op, impl, numel, dtype, DEVICE)
    result = fn()  # compiles / warms up outside the timing, and checks the op computed something
    assert workloads.finite(result), f"{op} by {impl} produced non-finite values"
    benchmark.extra_info.update(bytes=workloads.bytes_moved(op, numel, dtype), numel=numel, device=DEVICE)
    benchmark(synchronized(fn))


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("numel", SIZES, ids=format_size)
@pytest.mark.parametrize("impl", _impl_params("ddpm_step"))
def test_ddpm_step(benchmark, impl, numel, dtype_name):
    benchmark.group = f"ddpm_step {dtype_name} {format_size(numel)}"
    _run(benchmark, "ddpm_step", impl, numel, dtype_name)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("numel", SIZES, ids=format_size)
@pytest.mark.parametrize("impl", _impl_params("q_sample"))
def test_q_sample(benchmark, impl, numel, dtype_name):
    benchmark.group = f"q_sample {dtype_name} {format_size(numel)}"
    _run(benchmark, "q_sample", impl, numel, dtype_name)


@pytest.mark.parametrize("batch", EMBEDDING_BATCHES)
@pytest.mark.parametrize("impl", _impl_params("timestep_embedding"))
def test_timestep_embedding(benchmark, impl, batch):
    benchmark.group = f"timestep_embedding b{batch}"
    _run(benchmark, "timestep_embedding", impl, batch, "fp32")


def test_copy_bandwidth(benchmark):
    """The roofline: a device-to-device copy (bytes = read + write)."""
    numel = 2**27 if HAS_CUDA else 2**22
    benchmark.group = "copy"
    benchmark.extra_info.update(bytes=workloads.copy_bytes(numel, torch.float32), numel=numel, device=DEVICE)
    fn = workloads.build_copy(numel, DEVICE)
    result = benchmark(synchronized(fn))
    assert result.shape == (numel,)
