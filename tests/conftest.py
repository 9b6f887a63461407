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
