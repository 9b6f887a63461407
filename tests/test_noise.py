"""The Philox noise: the kernels' stream (fastddpm/kernels/noise.py) against
fastddpm.reference.philox_randn and against Triton's own Philox (tl.randint4x), its
sample-indexed layout, determinism, and the statistics of its draws."""
import math

import pytest
import torch
import triton
import triton.language as tl
from conftest import KERNEL_BACKEND, KERNEL_DEVICE, requires_cuda

from fastddpm import ops
from fastddpm.kernels.noise import philox4x32 as kernel_philox4x32
from fastddpm.reference import philox4x32, philox_randn
from fastddpm.schedule import NoiseSchedule

scipy_stats = pytest.importorskip("scipy.stats")

SEEDS = [0, 1, 12345, 2**31 - 1, 2**32 - 1, 2**32, 2**40 + 7, 2**63 - 1]
NUMEL = 1500  # more than one block of 1024, not a multiple of it
F32_EPS = torch.finfo(torch.float32).eps
# Normals are float32 log/sqrt of the same uniforms and sin/cos of the same float32 angle: the
# kernels take log from libdevice (numpy in the interpreter) and sin/cos from their own reduction
# plus polynomials (kernels/noise.py:_sincos), torch from its own libraries; each differs by an ulp
# or two (measured <= 4 ulp of the largest normal, 3.8e-7, in the interpreter). Near a zero of
# cos/sin an ulp of the angle (<= 2 pi) becomes an absolute error, hence the absolute term.
NORMAL_TOLERANCE = dict(rtol=4 * F32_EPS, atol=8 * 2 * math.pi * F32_EPS)


@triton.jit
def _words_kernel(seed_ptr, ours_ptr, triton_ptr, numel, BLOCK: tl.constexpr):
    """Our Philox and Triton's (tl.randint4x: counter (offset, 0, 0, 0)) on the same counters."""
    seed = tl.load(seed_ptr)  # from memory, as the kernels read it
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    counter = offsets.to(tl.uint32)
    zero = counter * 0
    ours = kernel_philox4x32(seed, counter, zero, zero, zero)
    theirs = tl.randint4x(seed, offsets)
    for j in tl.static_range(4):
        tl.store(ours_ptr + 4 * offsets + j, ours[j].to(tl.int32, bitcast=True), mask=mask)
        tl.store(triton_ptr + 4 * offsets + j, theirs[j].to(tl.int32, bitcast=True), mask=mask)


def kernel_words(seed, numel=NUMEL):
    ours = torch.full((numel, 4), -1, dtype=torch.int32, device=KERNEL_DEVICE)
    theirs = torch.full((numel, 4), -1, dtype=torch.int32, device=KERNEL_DEVICE)
    seed_tensor = torch.tensor(seed, dtype=torch.int64, device=KERNEL_DEVICE)
    _words_kernel[(triton.cdiv(numel, 1024),)](seed_tensor, ours, theirs, numel, BLOCK=1024)
    return ours.cpu().to(torch.int64) & 0xFFFFFFFF, theirs.cpu().to(torch.int64) & 0xFFFFFFFF


def reference_words(seed, numel=NUMEL):
    counter = torch.arange(numel, dtype=torch.int64)
    zero = torch.zeros_like(counter)
    return torch.stack(philox4x32(counter, zero, zero, zero, seed & 0xFFFFFFFF, seed >> 32), dim=1)


def kernel_noise(shape, seed, noise_offset=0, index_base=0, dtype=torch.float32):
    """The in-kernel noise of q_sample (what every kernel draws), poisoned first."""
    x0 = torch.zeros(shape, dtype=dtype, device=KERNEL_DEVICE)
    out = torch.full_like(x0, float("nan"))
    _, eps = ops.q_sample(x0, 0, NoiseSchedule.linear(), seed=seed, noise_offset=noise_offset, index_base=index_base,
                          return_noise=True, out=out, backend=KERNEL_BACKEND)
    assert not torch.isnan(out).any()
    return eps.cpu()


# ---------------------------------------------------------------------------------------------
# bit compatibility: our Philox = Triton's = the reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_philox_words_bitwise_equal_triton_and_reference(seed):
    ours, theirs = kernel_words(seed)
    assert torch.equal(ours, theirs)  # integer words: bit for bit
    assert torch.equal(reference_words(seed), ours)


# Aligned (per-sample size a multiple of 4: one Philox call a row of 4) and not (a call per element).
SHAPES = [(3, 4, 5, 7), (2, 3, 16, 16), (5, 7), (4, 1, 3, 3), (1, 2050)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed, noise_offset, index_base", [
    (0, 0, 0), (7, 1, 5), (2**40 + 7, 12345, 2**32 - 5), (2**63 - 1, 2**32 - 1, 0)])
def test_kernel_noise_equals_reference(shape, seed, noise_offset, index_base):
    if index_base + shape[0] > 2**32:
        index_base = 2**32 - shape[0]
    expected = philox_randn(shape, seed, noise_offset, index_base=index_base)
    torch.testing.assert_close(kernel_noise(shape, seed, noise_offset, index_base), expected, **NORMAL_TOLERANCE)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_noise_in_half_storage(dtype):
    shape = (3, 2, 8, 8)
    expected = philox_randn(shape, 11, 2).to(dtype)
    actual = kernel_noise(shape, 11, 2, dtype=dtype)
    assert actual.dtype == dtype
    # One rounding to the storage dtype of a float32 value within NORMAL_TOLERANCE of the reference.
    torch.testing.assert_close(actual.float(), expected.float(), rtol=2 * torch.finfo(dtype).eps, atol=1e-5)


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
    # a sample's stream depends on its index and its flat element index, not on its shape
    assert torch.equal(a.reshape(3, -1), philox_randn((3, 20), seed=42, noise_offset=3))
    assert torch.equal(philox_randn((3, 20), 42, 3)[:, :10], philox_randn((3, 10), 42, 3))
    assert philox_randn((4,), 1, dtype=torch.float16).dtype == torch.float16


def test_element_e_is_normal_e_mod_4_of_counter_e_div_4():
    """The layout, spelled out: words of counter (e // 4, n, s, 0), Box-Muller cos then sin."""
    seed, offset, n = 2**33 + 5, 9, 6
    draws = philox_randn((1, 12), seed, offset, index_base=n)[0]
    group = torch.arange(3)
    words = philox4x32(group, group * 0 + n, group * 0 + offset, group * 0, seed & 0xFFFFFFFF, seed >> 32)
    uniform = [((w.where(w < 2**31, 2**32 - 1 - w)).double() * 4.6566127342e-10).clamp_min(1e-7) for w in words]
    radius01, radius23 = (torch.sqrt(-2 * torch.log(uniform[i])) for i in (0, 2))
    angle01, angle23 = (2 * math.pi * uniform[i] for i in (1, 3))
    expected = torch.stack([radius01 * torch.cos(angle01), radius01 * torch.sin(angle01),
                            radius23 * torch.cos(angle23), radius23 * torch.sin(angle23)], dim=1).reshape(-1)
    torch.testing.assert_close(draws.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_a_sample_draws_the_same_noise_in_any_batch(batch):
    """Sample k's noise depends on (seed, k, element, step) only: bitwise equal across batchings,
    in the reference and in the kernels."""
    shape = (8, 3, 4, 4)
    whole = philox_randn(shape, 5, 2)
    whole_kernel = kernel_noise(shape, 5, 2)
    for start in range(0, 8, batch):
        size = min(batch, 8 - start)
        part = philox_randn((size,) + shape[1:], 5, 2, index_base=start)
        assert torch.equal(part, whole[start:start + size])
        part_kernel = kernel_noise((size,) + shape[1:], 5, 2, index_base=start)
        assert torch.equal(part_kernel, whole_kernel[start:start + size])


def test_different_seed_offset_or_sample_gives_independent_draws():
    n = 20000
    base = philox_randn((1, n), seed=5)
    others = [philox_randn((1, n), seed=6), philox_randn((1, n), seed=5 + 2**32),
              philox_randn((1, n), seed=5, noise_offset=1), philox_randn((1, n), seed=5, index_base=1)]
    for other in others:
        assert (other != base).float().mean() > 0.999
        # Independent streams: the sample correlation is N(0, 1/n); 5 sigma.
        correlation = torch.corrcoef(torch.cat([base, other]))[0, 1].item()
        assert abs(correlation) < 5 / math.sqrt(n)


# ---------------------------------------------------------------------------------------------
# statistics of 1e6 draws
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed, noise_offset", [(2024, 0), (2**45 + 3, 17)])
def test_moments_and_normality(seed, noise_offset):
    n = 10**6
    draws = philox_randn((1000, n // 1000), seed, noise_offset).double().reshape(-1)  # all four normals of a call
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
    (dict(seed=1, noise_offset=-1), "noise_offset"), (dict(seed=1, noise_offset=2**32), "noise_offset"),
    (dict(seed=1, index_base=-1), "index_base"), (dict(seed=1, index_base=2**32 - 2), "index_base")])
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
