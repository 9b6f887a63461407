"""The Philox noise: fastddpm.reference.philox_randn against Triton's own tl.randint4x / tl.randn
(and the kernels' philox_normal), determinism, and the statistics of its draws."""
import math

import pytest
import torch
import triton
import triton.language as tl
from conftest import KERNEL_DEVICE, requires_cuda

from fastddpm import ops
from fastddpm.kernels.noise import philox_normal
from fastddpm.reference import philox4x32, philox_randn
from fastddpm.schedule import NoiseSchedule

scipy_stats = pytest.importorskip("scipy.stats")

SEEDS = [0, 1, 12345, 2**31 - 1, 2**32 - 1, 2**32, 2**40 + 7, 2**63 - 1]
NUMEL = 1500  # more than one block of 1024, not a multiple of it
# Normals are float32 log/sqrt/cos of the same uniforms; the device's math library (numpy in the
# interpreter; on a GPU libdevice's __nv_logf / __nv_cosf and sqrt.approx, as the PTX of the
# kernels shows) and torch's differ by an ulp or two in each: measured <= 3 ulp in the
# interpreter. cos near a zero crossing turns an ulp of theta (<= 2 pi) into an absolute error,
# hence the absolute term.
NORMAL_TOLERANCE = dict(rtol=4 * torch.finfo(torch.float32).eps, atol=8 * 2 * math.pi * torch.finfo(torch.float32).eps)


@triton.jit
def _triton_randn_kernel(seed, words_ptr, normal_ptr, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    w0, w1, w2, w3 = tl.randint4x(seed, offsets)
    tl.store(words_ptr + 4 * offsets, w0.to(tl.int32, bitcast=True), mask=mask)
    tl.store(words_ptr + 4 * offsets + 1, w1.to(tl.int32, bitcast=True), mask=mask)
    tl.store(words_ptr + 4 * offsets + 2, w2.to(tl.int32, bitcast=True), mask=mask)
    tl.store(words_ptr + 4 * offsets + 3, w3.to(tl.int32, bitcast=True), mask=mask)
    tl.store(normal_ptr + offsets, tl.randn(seed, offsets), mask=mask)


@triton.jit
def _philox_normal_kernel(seed_ptr, noise_offset_ptr, normal_ptr, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    tl.store(normal_ptr + offsets, philox_normal(tl.load(seed_ptr), tl.load(noise_offset_ptr), offsets), mask=mask)


def triton_randn(seed, numel=NUMEL):
    words = torch.empty((numel, 4), dtype=torch.int32, device=KERNEL_DEVICE)
    normal = torch.full((numel,), float("nan"), device=KERNEL_DEVICE)
    _triton_randn_kernel[(triton.cdiv(numel, 1024),)](seed, words, normal, numel, BLOCK=1024)
    return words.cpu().to(torch.int64) & 0xFFFFFFFF, normal.cpu()


def kernel_philox_normal(seed, noise_offset, numel=NUMEL):
    normal = torch.full((numel,), float("nan"), device=KERNEL_DEVICE)
    seed_t = torch.tensor(seed, dtype=torch.int64, device=KERNEL_DEVICE)
    offset_t = torch.tensor(noise_offset, dtype=torch.int64, device=KERNEL_DEVICE)
    _philox_normal_kernel[(triton.cdiv(numel, 1024),)](seed_t, offset_t, normal, numel, BLOCK=1024)
    return normal.cpu()


def reference_words(seed, counter1=0, numel=NUMEL):
    counter = torch.arange(numel, dtype=torch.int64)
    zero = torch.zeros_like(counter)
    return torch.stack(philox4x32(counter, zero + counter1, zero, zero, seed & 0xFFFFFFFF, seed >> 32), dim=1)


# ---------------------------------------------------------------------------------------------
# bit compatibility with Triton
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_philox_words_bitwise_equal_triton(seed):
    words, normal = triton_randn(seed)
    assert torch.equal(reference_words(seed), words)  # integer words: bit for bit
    torch.testing.assert_close(philox_randn((NUMEL,), seed), normal, **NORMAL_TOLERANCE)


@pytest.mark.parametrize("seed, noise_offset", [(0, 0), (7, 1), (2**40 + 7, 12345), (2**63 - 1, 2**32 - 1)])
def test_kernel_philox_normal_equals_reference(seed, noise_offset):
    torch.testing.assert_close(philox_randn((NUMEL,), seed, noise_offset), kernel_philox_normal(seed, noise_offset),
                               **NORMAL_TOLERANCE)
    if noise_offset == 0:  # offset 0 is exactly tl.randn(seed, i)
        assert torch.equal(kernel_philox_normal(seed, 0), triton_randn(seed)[1])


def test_philox_known_answer():
    """Philox4x32-10 known-answer vectors of Salmon et al.'s Random123 (kat_vectors)."""
    def run(counter, key):
        words = philox4x32(*(torch.tensor([c]) for c in counter), *key)
        return [int(w) for w in words]

    assert run([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert run([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert run([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


# ---------------------------------------------------------------------------------------------
# determinism and streams
# ---------------------------------------------------------------------------------------------
def test_same_seed_same_draws_and_shapes():
    a = philox_randn((3, 4, 5), seed=42, noise_offset=3)
    assert a.shape == (3, 4, 5) and a.dtype == torch.float32
    assert torch.equal(a, philox_randn((3, 4, 5), seed=42, noise_offset=3))
    # element i is counter i: the flat stream does not depend on the shape
    assert torch.equal(a.reshape(-1), philox_randn((60,), seed=42, noise_offset=3))
    assert torch.equal(philox_randn((60,), 42, 3)[:10], philox_randn((10,), 42, 3))
    assert philox_randn((4,), 1, dtype=torch.float16).dtype == torch.float16


def test_different_seed_or_offset_gives_independent_draws():
    n = 20000
    base = philox_randn((n,), seed=5)
    others = [philox_randn((n,), seed=6), philox_randn((n,), seed=5 + 2**32), philox_randn((n,), seed=5, noise_offset=1)]
    for other in others:
        assert (other != base).float().mean() > 0.999
        # Independent streams: the sample correlation is N(0, 1/n); 5 sigma.
        correlation = torch.corrcoef(torch.stack([base, other]))[0, 1].item()
        assert abs(correlation) < 5 / math.sqrt(n)


# ---------------------------------------------------------------------------------------------
# statistics of 1e6 draws
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed, noise_offset", [(2024, 0), (2**45 + 3, 17)])
def test_moments_and_normality(seed, noise_offset):
    n = 10**6
    draws = philox_randn((n,), seed, noise_offset).double()
    assert torch.isfinite(draws).all()
    mean = draws.mean().item()
    centered = draws - mean
    variance = centered.pow(2).mean().item()
    skew = (centered.pow(3).mean() / variance**1.5).item()
    excess_kurtosis = (centered.pow(4).mean() / variance**2).item() - 3
    # Standard errors of the sample moments of a normal: sqrt(1/n), sqrt(2/n), sqrt(6/n),
    # sqrt(24/n). Bounds at 5 standard errors (two-sided p ~ 6e-7 each for a true normal).
    assert abs(mean) < 5 * math.sqrt(1 / n)
    assert abs(variance - 1) < 5 * math.sqrt(2 / n)
    assert abs(skew) < 5 * math.sqrt(6 / n)
    assert abs(excess_kurtosis) < 5 * math.sqrt(24 / n)
    # Kolmogorov-Smirnov against N(0, 1) and D'Agostino-Pearson: reject at significance 1e-3.
    array = draws.numpy()
    assert scipy_stats.kstest(array, "norm").pvalue > 1e-3
    assert scipy_stats.normaltest(array).pvalue > 1e-3


# ---------------------------------------------------------------------------------------------
# argument ranges
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(seed=-1), "seed"), (dict(seed=2**63), "seed"),
    (dict(seed=1, noise_offset=-1), "noise_offset"), (dict(seed=1, noise_offset=2**32), "noise_offset")])
def test_philox_randn_ranges(kwargs, match):
    with pytest.raises(ValueError, match=match):
        philox_randn((3,), **kwargs)


# ---------------------------------------------------------------------------------------------
# GPU only: the compiled kernels draw the CPU reference's noise
# ---------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("seed, noise_offset", [(0, 0), (2**40 + 7, 3), (2**63 - 1, 2**32 - 1)])
def test_gpu_noise_equals_cpu_reference(seed, noise_offset):
    shape = (8, 3, 64, 64)
    zeros = torch.zeros(shape, device="cuda")
    _, eps = ops.q_sample(zeros, 0, NoiseSchedule.linear(), seed=seed, noise_offset=noise_offset, return_noise=True,
                          backend="triton")
    cpu = philox_randn(shape, seed, noise_offset)
    torch.testing.assert_close(eps.cpu(), cpu, **NORMAL_TOLERANCE)
    # torch's integer ops give the same stream on either device
    torch.testing.assert_close(philox_randn(shape, seed, noise_offset, device="cuda").cpu(), cpu, **NORMAL_TOLERANCE)
    words, _ = triton_randn(seed)
    assert torch.equal(words, reference_words(seed))
