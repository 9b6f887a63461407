"""Test set-up: without a GPU the Triton kernels run in Triton's interpreter on CPU tensors.

TRITON_INTERPRET is read when ``@triton.jit`` runs, so it is set here, before any test imports
fastddpm's kernels.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover
    HAS_TRITON = False

# Device and backend the kernel tests use: the compiled kernels on a GPU, the interpreter on CPU.
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"
KERNEL_BACKEND = "triton" if HAS_CUDA else "interpret"

requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture
def kernel_device():
    return KERNEL_DEVICE


@pytest.fixture
def kernel_backend():
    return KERNEL_BACKEND


@pytest.fixture(scope="module")
def tiny_unet():
    """A diffusers UNet2DModel small enough to sample with on a CPU in a test (random weights)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 8),
        norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


@pytest.fixture(scope="module")
def one_cpu_thread():
    """For modules of tiny tensors: intra-op threads only add contention on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_tf32():
    """Full float32 convolutions and matmuls on a GPU. cuDNN runs float32 convolutions in TF32 by
    default (10-bit mantissa: ~1e-3 relative per product, measured 2.5e-2 on a small UNet), which a
    comparison with a CPU float32 run at 1e-4 cannot absorb; tests that compare GPU with CPU
    results turn it off. No effect on a CPU."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# The test files that exercise a GPU when there is one (kernels, graphs, host syncs, the schedulers
# on the kernel path, reliability on CUDA, the model options): benchmarks/gpu_check.sh runs the
# tests marked gpu_facing first, so a GPU session's time limit cuts the CPU-only rest, not them.
GPU_FACING_FILES = frozenset({
    "test_kernels.py", "test_noise.py", "test_sampling.py", "test_schedulers.py", "test_ops_errors.py",
    "test_reliability.py", "test_acceleration.py", "test_pipelines.py", "test_training.py", "test_cli_sample.py",
    "test_sharded_sampling.py",
})


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in GPU_FACING_FILES or item.get_closest_marker("gpu"):
            item.add_marker(pytest.mark.gpu_facing)
