"""The Triton kernels (through fastddpm.ops) against the float64 reference.

On a machine without CUDA the kernels run in Triton's interpreter on CPU tensors; on a GPU the same
tests compile them for real (KERNEL_BACKEND / KERNEL_DEVICE from conftest). Every output buffer is
poisoned with NaN before the call so that an element the kernel forgets to write cannot pass.

Tolerances (see ``assert_close_to_reference``):

* float32 storage: the kernels compute in float32 with float32 coefficient tables (each rounded at
  2^-24 relative) through ~10 operations. Intermediate terms can be much larger than the result:
  the epsilon -> x0 conversion multiplies x_t and the model output by 1/sqrt(alpha_bar_t) (~160
  at t = T-1) and DDIM's eps from an x0 prediction divides by sqrt(1 - alpha_bar_t) (~100 at
  t = 0), and they cancel. So the error of sample b is bounded relative to
  |result| + amplification(t_b) * max|inputs of b| (``error_scale``): FP32_RTOL = 1e-6 of it,
  ~8x the worst error measured (1.2e-7).
* float16 / bfloat16 storage: the reference runs in float64 on the *same* half-rounded inputs; the
  kernel's float32 result is then rounded once to the storage dtype (<= 0.5 ulp with the GPU's
  round-to-nearest-even; Triton's interpreter truncates float32 -> bfloat16, <= 1 ulp). Allowed:
  HALF_ULPS = 2 ulps of the output dtype at the reference value, plus the float32 term above.
"""
import math

import pytest
import torch
from conftest import KERNEL_BACKEND, KERNEL_DEVICE, requires_cuda
from hypothesis import given, settings
from hypothesis import strategies as st

from fastddpm import ops, reference
from fastddpm.reference import PREDICTION_TYPES, VARIANCE_TYPES
from fastddpm.schedule import NoiseSchedule

FP32_RTOL = 1e-6
HALF_ULPS = 2
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LEARNED = ("learned", "learned_range")

SCHEDULE = NoiseSchedule.linear()
T = SCHEDULE.num_timesteps
RESPACED = NoiseSchedule.cosine().respace_evenly(10)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def randn(shape, seed, dtype=torch.float32):
    """Fresh random values, drawn on the CPU in float32 and rounded once to ``dtype``."""
    values = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return values.to(dtype).to(KERNEL_DEVICE)


def poisoned(like):
    return torch.full_like(like, float("nan"), memory_format=torch.contiguous_format)


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at each of ``values`` (subnormal spacing below the smallest normal)."""
    info = torch.finfo(dtype)
    magnitude = values.abs().clamp_min(info.tiny)
    return info.eps * torch.exp2(torch.floor(torch.log2(magnitude)))


def error_scale(t, schedule, *inputs, amplified=True) -> torch.Tensor:
    """Per-sample size of the largest intermediate term of a step: amplification(t) * max|inputs|
    (just max|inputs| for q_sample, whose coefficients are <= 1)."""
    amplification = torch.maximum(schedule.sqrt_recip_alphas_cumprod, 1.0 / schedule.sqrt_one_minus_alphas_cumprod)
    if not amplified:
        amplification = torch.ones_like(amplification)
    inputs = [x.detach().double().cpu() for x in inputs if x is not None]
    batch = inputs[0].shape[0]
    magnitude = torch.stack([x.reshape(batch, -1).abs().amax(dim=1) for x in inputs]).amax(dim=0)
    t = torch.as_tensor(t).reshape(-1).cpu()
    scale = amplification[t] * magnitude  # t is [] or [B]: broadcasts either way
    return scale.reshape((batch,) + (1,) * (inputs[0].ndim - 1))


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "",
                              scale=1.0):
    """``actual`` (kernel, storage ``dtype``) against ``expected`` (float64 reference); see the module doc.
    ``scale`` bounds the intermediate terms (``error_scale``), 1 where none exceeds the inputs."""
    assert actual.dtype == dtype, what
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, what
    tolerance = FP32_RTOL * (expected.abs() + scale)
    if dtype != torch.float32:
        tolerance = tolerance + HALF_ULPS * ulp(expected, dtype)
    error = (actual - expected).abs()
    ok = error <= tolerance  # False for NaN: a poisoned element that was never written fails here
    if not ok.all():
        worst = torch.argmax(torch.where(ok, torch.zeros_like(error), error.nan_to_num(float("inf"))))
        index = tuple(int(i) for i in torch.unravel_index(worst, expected.shape))
        raise AssertionError(f"{what}: {int((~ok).sum())} of {ok.numel()} elements off; worst at {index}: "
                             f"kernel {actual[index].item()!r}, reference {expected[index].item()!r}, "
                             f"tolerance {tolerance[index].item():.3g}")


def used_noise(noise, shape, seed, noise_offset):
    """The noise a step uses: the given tensor, or the Philox stream it draws in-kernel."""
    return noise if noise is not None else reference.philox_randn(shape, seed, noise_offset)


def as64(x):
    return None if x is None else x.detach().double().cpu()


def t_arg(t):
    return t.to(KERNEL_DEVICE) if isinstance(t, torch.Tensor) else t


def check_ddpm(shape, dtype=torch.float32, t=None, *, schedule=SCHEDULE, prediction_type="epsilon",
               variance_type="fixed_small", clip=True, given_noise=True, seed=0, noise_offset=0):
    """Run ddpm_step through the kernels into poisoned buffers and compare with the float64 reference."""
    channels = (shape[0], 2 * shape[1]) + tuple(shape[2:]) if variance_type in LEARNED else shape
    x_t, model_output = randn(shape, seed, dtype), randn(channels, seed + 1, dtype)
    noise = randn(shape, seed + 2, dtype) if given_noise else None
    if t is None:
        t = torch.randint(0, schedule.num_timesteps, (shape[0],), generator=torch.Generator().manual_seed(seed))
    out, x0_out = poisoned(x_t), poisoned(x_t)
    options = dict(prediction_type=prediction_type, variance_type=variance_type, clip_denoised=clip, clip_range=1.0)
    kernel_seed = None if given_noise else seed + 7  # noise or seed, not both
    x_prev, x0 = ops.ddpm_step(model_output, t_arg(t), x_t, schedule, noise=noise, seed=kernel_seed,
                               noise_offset=noise_offset, out=out, pred_x0_out=x0_out, backend=KERNEL_BACKEND, **options)
    assert x_prev is out and x0 is x0_out
    ref_prev, ref_x0 = reference.ddpm_step(as64(model_output), t, as64(x_t), schedule, noise=as64(noise), seed=seed + 7,
                                           noise_offset=noise_offset, **options)
    what = f"ddpm {shape} {dtype} {prediction_type}/{variance_type}/clip={clip}"
    scale = error_scale(t, schedule, x_t, model_output, used_noise(noise, shape, seed + 7, noise_offset))
    assert_close_to_reference(x_prev, ref_prev, dtype, what + " x_prev", scale)
    assert_close_to_reference(x0, ref_x0, dtype, what + " x0", scale)


def check_ddim(shape, dtype=torch.float32, t=None, *, schedule=RESPACED, eta=0.0, prediction_type="epsilon",
               clip=True, given_noise=True, seed=0):
    x_t, model_output = randn(shape, seed, dtype), randn(shape, seed + 1, dtype)
    noise = randn(shape, seed + 2, dtype) if given_noise else None
    if t is None:
        t = torch.randint(0, schedule.num_timesteps, (shape[0],), generator=torch.Generator().manual_seed(seed))
    out, x0_out = poisoned(x_t), poisoned(x_t)
    options = dict(eta=eta, prediction_type=prediction_type, clip_denoised=clip)
    kernel_seed = None if given_noise else seed + 7  # noise or seed, not both
    x_prev, x0 = ops.ddim_step(model_output, t_arg(t), x_t, schedule, noise=noise, seed=kernel_seed, out=out,
                               pred_x0_out=x0_out, backend=KERNEL_BACKEND, **options)
    assert x_prev is out and x0 is x0_out
    ref_prev, ref_x0 = reference.ddim_step(as64(model_output), t, as64(x_t), schedule, noise=as64(noise),
                                           seed=seed + 7, **options)
    what = f"ddim {shape} {dtype} eta={eta} {prediction_type}/clip={clip}"
    scale = error_scale(t, schedule, x_t, model_output, used_noise(noise, shape, seed + 7, 0))
    assert_close_to_reference(x_prev, ref_prev, dtype, what + " x_prev", scale)
    assert_close_to_reference(x0, ref_x0, dtype, what + " x0", scale)


def check_q_sample(shape, dtype=torch.float32, t=None, *, given_noise=True, seed=0, noise_offset=0):
    x0 = randn(shape, seed, dtype)
    noise = randn(shape, seed + 1, dtype) if given_noise else None
    if t is None:
        t = torch.randint(0, T, (shape[0],), generator=torch.Generator().manual_seed(seed))
    out = poisoned(x0)
    kernel_seed = None if given_noise else seed + 7  # noise or seed, not both
    x_t, eps = ops.q_sample(x0, t_arg(t), SCHEDULE, noise, seed=kernel_seed, noise_offset=noise_offset, out=out,
                            return_noise=True, backend=KERNEL_BACKEND)
    assert x_t is out
    ref_x_t, ref_eps = reference.q_sample(as64(x0), t, SCHEDULE, as64(noise), seed=seed + 7, noise_offset=noise_offset)
    scale = error_scale(t, SCHEDULE, x0, used_noise(noise, shape, seed + 7, noise_offset), amplified=False)
    assert_close_to_reference(x_t, ref_x_t, dtype, f"q_sample {shape} {dtype} x_t", scale)
    if given_noise:
        assert eps is noise
    else:
        assert_close_to_reference(eps, ref_eps, dtype, f"q_sample {shape} {dtype} eps", 1.0)


# ---------------------------------------------------------------------------------------------
# every option of the reverse step
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_step_every_option(prediction_type, variance_type, clip):
    # per-sample t covering both ends of the chain; given noise and in-kernel noise
    t = torch.tensor([0, 417, T - 1])
    for given_noise in (True, False):
        check_ddpm((3, 2, 5, 7), t=t, prediction_type=prediction_type, variance_type=variance_type, clip=clip,
                   given_noise=given_noise, seed=11)


@pytest.mark.parametrize("t", [0, 1, T - 1, torch.tensor(0), torch.tensor(T - 1), torch.tensor([T - 1, 0], dtype=torch.int32)])
@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
def test_ddpm_step_scalar_and_per_sample_t(t, variance_type):
    check_ddpm((2, 3, 4), t=t, variance_type=variance_type, prediction_type="v_prediction", given_noise=False, seed=3)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_step_on_respaced_schedule(prediction_type, eta, clip):
    t = torch.tensor([0, 1, 5, 9])
    check_ddim((4, 3, 5), t=t, eta=eta, prediction_type=prediction_type, clip=clip, seed=5)
    if eta > 0:
        check_ddim((4, 3, 5), t=t, eta=eta, prediction_type=prediction_type, clip=clip, given_noise=False, seed=6)
    # DDIM with set_alpha_to_one=False (first step is empty) and scalar t at both ends
    full = NoiseSchedule.linear()
    no_final_one = full.respace(range(0, 1000, 100), final_alpha_cumprod=full.alphas_cumprod[0].item())
    for t in (0, 9):
        check_ddim((2, 7), t=t, schedule=no_final_one, eta=eta, prediction_type=prediction_type, clip=clip, seed=7)


# ---------------------------------------------------------------------------------------------
# sizes, shapes and dtypes
# ---------------------------------------------------------------------------------------------
ODD_SHAPES = [(1,), (1023,), (1025,), (3, 5, 7, 11), (2, 3), (1, 1025), (2, 1, 3, 2, 5), (5, 2, 1, 3, 3)]


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
def test_odd_sizes_and_ranks(shape):
    """numel 1, block +- 1 and products of odd primes; 1-D (t per element) to 5-D."""
    check_q_sample(shape, seed=1)
    check_q_sample(shape, given_noise=False, seed=2)
    check_ddpm(shape, given_noise=False, seed=3)
    check_ddpm(shape, prediction_type="sample", variance_type="fixed_large", seed=4)
    check_ddim(shape, eta=0.7, prediction_type="v_prediction", given_noise=False, seed=5)
    if len(shape) >= 2:
        check_ddpm(shape, variance_type="learned", seed=6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_storage_dtypes(dtype):
    shape, t = (3, 2, 9, 7), torch.tensor([0, 500, T - 1])
    check_q_sample(shape, dtype, t, seed=1)
    check_q_sample(shape, dtype, 999, given_noise=False, seed=2)
    for prediction_type in PREDICTION_TYPES:
        check_ddpm(shape, dtype, t, prediction_type=prediction_type, variance_type="learned_range", seed=3)
        check_ddpm(shape, dtype, t, prediction_type=prediction_type, variance_type="fixed_small_log", clip=False,
                   given_noise=False, seed=4)
        check_ddim(shape, dtype, torch.tensor([0, 4, 9]), eta=0.7, prediction_type=prediction_type, seed=5)
    check_ddpm((1025,), dtype, 1, variance_type="fixed_large", seed=6)


@settings(max_examples=15, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=5).map(tuple),
    prediction_type=st.sampled_from(PREDICTION_TYPES),
    variance_type=st.sampled_from(VARIANCE_TYPES),
    clip=st.booleans(),
    scalar_t=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**40),
)
def test_random_shapes_and_options(shape, prediction_type, variance_type, clip, scalar_t, dtype, seed):
    if len(shape) < 2 and variance_type in LEARNED:
        variance_type = "fixed_small"
    t = seed % T if scalar_t else None
    check_ddpm(shape, dtype, t, prediction_type=prediction_type, variance_type=variance_type, clip=clip,
               given_noise=bool(seed % 2), seed=seed % 1000, noise_offset=seed % 2**32)


# ---------------------------------------------------------------------------------------------
# memory layouts and in-place use
# ---------------------------------------------------------------------------------------------
def test_non_contiguous_inputs_and_out():
    base_x = randn((5, 3, 4), 0)
    x_t = base_x.transpose(0, 2)  # [4, 3, 5], transposed
    model_output = randn((4, 3, 10), 1)[..., ::2]  # sliced
    noise = randn((5, 3, 4), 2).permute(2, 1, 0)
    assert not (x_t.is_contiguous() or model_output.is_contiguous() or noise.is_contiguous())
    t = torch.tensor([0, 3, 500, 999])
    storage = torch.full((5, 3, 4), float("nan"), device=KERNEL_DEVICE)
    out = storage.transpose(0, 2)  # non-contiguous out
    x0_out = torch.full((4, 5, 3), float("nan"), device=KERNEL_DEVICE).transpose(1, 2)
    x_prev, x0 = ops.ddpm_step(model_output, t_arg(t), x_t, SCHEDULE, variance_type="fixed_large", noise=noise,
                               out=out, pred_x0_out=x0_out, backend=KERNEL_BACKEND)
    assert x_prev is out and x0 is x0_out
    ref_prev, ref_x0 = reference.ddpm_step(as64(model_output), t, as64(x_t), SCHEDULE, variance_type="fixed_large",
                                           noise=as64(noise))
    scale = error_scale(t, SCHEDULE, x_t, model_output, noise)
    assert_close_to_reference(out, ref_prev, torch.float32, "non-contiguous x_prev", scale)
    assert_close_to_reference(x0_out, ref_x0, torch.float32, "non-contiguous x0", scale)
    assert not storage.isnan().any()

    # learned variance: a sliced [B, 2C, ...] model output
    wide = randn((4, 6, 5, 2), 3)[:, :, :, 0]
    x_t = randn((4, 5, 3), 4).transpose(1, 2)
    x_prev, _ = ops.ddpm_step(wide, t_arg(t), x_t, SCHEDULE, variance_type="learned", seed=9, backend=KERNEL_BACKEND)
    ref_prev, _ = reference.ddpm_step(as64(wide), t, as64(x_t), SCHEDULE, variance_type="learned", seed=9)
    scale = error_scale(t, SCHEDULE, x_t, wide, used_noise(None, x_t.shape, 9, 0))
    assert_close_to_reference(x_prev, ref_prev, torch.float32, "sliced learned model output", scale)

    # q_sample and DDIM on transposed inputs
    x0 = randn((3, 7), 5).t()
    x_t = ops.q_sample(x0, t_arg(t[:1].expand(7).contiguous()), SCHEDULE, randn((3, 7), 6).t(), backend=KERNEL_BACKEND)
    ref_x_t, _ = reference.q_sample(as64(x0), t[:1].expand(7), SCHEDULE, as64(randn((3, 7), 6).t()))
    assert_close_to_reference(x_t, ref_x_t, torch.float32, "transposed q_sample", 4.0)
    x_prev, _ = ops.ddim_step(randn((3, 7), 7).t(), 4, x0, RESPACED, eta=0.7, seed=1, backend=KERNEL_BACKEND)
    ref_prev, _ = reference.ddim_step(as64(randn((3, 7), 7).t()), 4, as64(x0), RESPACED, eta=0.7, seed=1)
    scale = error_scale(4, RESPACED, x0, randn((3, 7), 7).t(), used_noise(None, x0.shape, 1, 0))
    assert_close_to_reference(x_prev, ref_prev, torch.float32, "transposed ddim", scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("contiguous", [True, False])
def test_in_place(dtype, contiguous):
    shape = (3, 4, 6)
    t = torch.tensor([0, 7, 999])

    def sample(seed):
        x = randn((shape[0], shape[2], shape[1]), seed, dtype).transpose(1, 2)
        return x.contiguous() if contiguous else x

    x_t, model_output = sample(0), randn((3, 8, 6), 1, dtype)
    expected = reference.ddpm_step(as64(model_output), t, as64(x_t), SCHEDULE, variance_type="learned_range", seed=4)
    scale = error_scale(t, SCHEDULE, x_t, model_output, used_noise(None, shape, 4, 0))
    x_prev, x0 = ops.ddpm_step(model_output, t_arg(t), x_t, SCHEDULE, variance_type="learned_range", seed=4, out=x_t,
                               backend=KERNEL_BACKEND)
    assert x_prev is x_t
    assert_close_to_reference(x_t, expected[0], dtype, "in-place ddpm", scale)
    assert_close_to_reference(x0, expected[1], dtype, "in-place ddpm x0", scale)

    x_t, model_output = sample(2), randn(shape, 3, dtype)
    expected = reference.ddim_step(as64(model_output), t % 10, as64(x_t), RESPACED, eta=0.7, seed=5)
    scale = error_scale(t % 10, RESPACED, x_t, model_output, used_noise(None, shape, 5, 0))
    ops.ddim_step(model_output, t_arg(t % 10), x_t, RESPACED, eta=0.7, seed=5, out=x_t, backend=KERNEL_BACKEND)
    assert_close_to_reference(x_t, expected[0], dtype, "in-place ddim", scale)

    x0 = sample(4)
    expected = reference.q_sample(as64(x0), t, SCHEDULE, seed=6)
    scale = error_scale(t, SCHEDULE, x0, used_noise(None, shape, 6, 0), amplified=False)
    assert ops.q_sample(x0, t_arg(t), SCHEDULE, seed=6, out=x0, backend=KERNEL_BACKEND) is x0
    assert_close_to_reference(x0, expected[0], dtype, "in-place q_sample", scale)


def test_return_pred_x0_false():
    x_t, model_output = randn((2, 5), 0), randn((2, 5), 1)
    x_prev, x0 = ops.ddpm_step(model_output, 3, x_t, SCHEDULE, seed=1, return_pred_x0=False, backend=KERNEL_BACKEND)
    assert x0 is None
    ref_prev, _ = reference.ddpm_step(as64(model_output), 3, as64(x_t), SCHEDULE, seed=1)
    scale = error_scale(3, SCHEDULE, x_t, model_output, used_noise(None, x_t.shape, 1, 0))
    assert_close_to_reference(x_prev, ref_prev, torch.float32, "no x0", scale)


# ---------------------------------------------------------------------------------------------
# noise handling
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed, noise_offset", [(0, 0), (123, 5), (2**40 + 17, 2**32 - 1)])
def test_in_kernel_noise_equals_given_philox_noise(seed, noise_offset):
    shape = (2, 3, 171)
    x_t, model_output = randn(shape, 0), randn(shape, 1)
    t = torch.tensor([5, 999])
    drawn, _ = ops.ddpm_step(model_output, t_arg(t), x_t, SCHEDULE, seed=seed, noise_offset=noise_offset,
                             backend=KERNEL_BACKEND)
    noise = reference.philox_randn(shape, seed, noise_offset, device=KERNEL_DEVICE)
    given, _ = ops.ddpm_step(model_output, t_arg(t), x_t, SCHEDULE, noise=noise, backend=KERNEL_BACKEND)
    # Same normals up to the last ulps of log/cos (device libm vs torch), scaled by sigma_t < 1.
    torch.testing.assert_close(drawn, given, rtol=1e-6, atol=1e-6)
    # and the noise actually moves the result: a different stream gives a different step
    other, _ = ops.ddpm_step(model_output, t_arg(t), x_t, SCHEDULE, seed=seed, noise_offset=(noise_offset + 1) % 2**32,
                             backend=KERNEL_BACKEND)
    assert (other - drawn).abs().max() > 1e-2


def test_in_kernel_noise_is_the_reference_stream():
    """x_t = 0 and a model predicting x0 = 0 leave only sigma_t z: z must be philox_randn's stream."""
    shape, seed, noise_offset = (4, 300), 2**33 + 5, 77
    zeros = torch.zeros(shape, device=KERNEL_DEVICE)
    x_prev, _ = ops.ddpm_step(zeros, 500, zeros, SCHEDULE, prediction_type="sample", seed=seed, noise_offset=noise_offset,
                              backend=KERNEL_BACKEND)
    sigma = SCHEDULE.posterior_variance[500].sqrt().item()
    z = reference.philox_randn(shape, seed, noise_offset, dtype=torch.float64)
    torch.testing.assert_close(x_prev.double().cpu() / sigma, z, rtol=2e-6, atol=2e-6)
    _, eps = ops.q_sample(zeros, 3, SCHEDULE, seed=seed, noise_offset=noise_offset, return_noise=True,
                          backend=KERNEL_BACKEND)
    torch.testing.assert_close(eps.double().cpu(), z, rtol=2e-6, atol=2e-6)


def test_same_seed_same_output_different_seed_different():
    x_t, model_output = randn((3, 40), 0), randn((3, 40), 1)

    def step(seed, noise_offset):
        return ops.ddpm_step(model_output, 600, x_t, SCHEDULE, seed=seed, noise_offset=noise_offset,
                             backend=KERNEL_BACKEND)[0]

    assert torch.equal(step(4, 1), step(4, 1))
    assert not torch.equal(step(4, 1), step(5, 1))
    assert not torch.equal(step(4, 1), step(4, 2))
    x0 = randn((3, 40), 2)
    a = ops.q_sample(x0, 10, SCHEDULE, seed=8, backend=KERNEL_BACKEND)
    assert torch.equal(a, ops.q_sample(x0, 10, SCHEDULE, seed=8, backend=KERNEL_BACKEND))
    assert not torch.equal(a, ops.q_sample(x0, 10, SCHEDULE, seed=9, backend=KERNEL_BACKEND))


def test_seed_and_offset_as_tensors():
    x_t, model_output = randn((2, 33), 0), randn((2, 33), 1)
    seed, offset = torch.tensor(2**35 + 1, device=KERNEL_DEVICE), torch.tensor(9, device=KERNEL_DEVICE)
    a, _ = ops.ddpm_step(model_output, 100, x_t, SCHEDULE, seed=seed, noise_offset=offset, backend=KERNEL_BACKEND)
    b, _ = ops.ddpm_step(model_output, 100, x_t, SCHEDULE, seed=2**35 + 1, noise_offset=9, backend=KERNEL_BACKEND)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# timestep embedding
# ---------------------------------------------------------------------------------------------
# 64, 96 (16-column blocks, three a half), 513: blocks tile each half (SPLIT, one function a program);
# 2, 7, 40: they do not (both functions, selected per column).
@pytest.mark.parametrize("dim", [2, 7, 40, 64, 96, 513])
@pytest.mark.parametrize("flip_sin_to_cos, downscale_freq_shift, scale, max_period",
                         [(False, 1, 1.0, 10000.0), (True, 0, 1.0, 10000.0), (False, 0, 1000.0, 100.0)])
def test_timestep_embedding_kernel(dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period):
    if dim // 2 == downscale_freq_shift:
        downscale_freq_shift = 0
    options = dict(flip_sin_to_cos=flip_sin_to_cos, downscale_freq_shift=downscale_freq_shift, scale=scale,
                   max_period=max_period)
    for t in (torch.arange(0, 1000, 13), torch.tensor([0.0, 0.5, 17.25, 999.0])):
        ours = ops.timestep_embedding(t.to(KERNEL_DEVICE), dim, backend=KERNEL_BACKEND, **options)
        expected = reference.timestep_embedding(t, dim, **options)
        assert ours.shape == (len(t), dim) and ours.dtype == torch.float32
        # The kernel's exp differs from torch's (numpy's in the interpreter: ~1 ulp; on a GPU
        # ex2.approx of a rounded x * log2(e): up to ~6 ulp), so the argument scale * t * freq
        # carries a relative error of up to ~8 eps32, which sin and cos pass on (slope <= 1).
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / (half - downscale_freq_shift))
        args = (scale * t.double()[:, None] * freqs[None, :]).abs()
        arg_scale = torch.cat([args, args, torch.zeros(len(t), dim % 2, dtype=torch.float64)], dim=1)
        tolerance = 16 * torch.finfo(torch.float32).eps * arg_scale + 1e-6
        error = (ours.double().cpu() - expected.double()).abs()
        assert (error <= tolerance).all(), f"max error {error.max().item()}"
        if dim % 2:
            assert (ours[:, -1] == 0).all()


# ---------------------------------------------------------------------------------------------
# GPU only: large tensors with the kernels compiled for real
# ---------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_tensors_on_gpu(dtype):
    shape = (16, 4, 512, 512)  # 16M elements: many blocks, int32 offsets near their useful range
    t = torch.randint(0, T, (16,), generator=torch.Generator().manual_seed(0))
    x_t = torch.randn(shape, device="cuda").to(dtype)
    model_output = torch.randn((16, 8, 512, 512), device="cuda").to(dtype)
    out, x0_out = poisoned(x_t), poisoned(x_t)
    ops.ddpm_step(model_output, t.cuda(), x_t, SCHEDULE, variance_type="learned_range", seed=3, noise_offset=1,
                  out=out, pred_x0_out=x0_out, backend="triton")
    ref_prev, ref_x0 = reference.ddpm_step(model_output.double(), t.cuda(), x_t.double(), SCHEDULE,
                                           variance_type="learned_range", seed=3, noise_offset=1)
    scale = error_scale(t, SCHEDULE, x_t, model_output, used_noise(None, shape, 3, 1))
    assert_close_to_reference(out, ref_prev, dtype, "large ddpm x_prev", scale)
    assert_close_to_reference(x0_out, ref_x0, dtype, "large ddpm x0", scale)
    x_t_out = poisoned(x_t)
    ops.q_sample(x_t, t.cuda(), SCHEDULE, seed=4, out=x_t_out, backend="triton")
    scale = error_scale(t, SCHEDULE, x_t, used_noise(None, shape, 4, 0), amplified=False)
    expected = reference.q_sample(x_t.double(), t.cuda(), SCHEDULE, seed=4)[0]
    assert_close_to_reference(x_t_out, expected, dtype, "large q_sample", scale)


def test_auto_backend_sends_cpu_tensors_to_the_reference(monkeypatch):
    """On CPU tensors ``auto`` never loads the kernels (compiled or interpreted)."""
    def no_kernels(interpret):
        raise AssertionError(f"kernels loaded (interpret={interpret}) for CPU tensors under backend='auto'")

    monkeypatch.setattr(ops, "_load_kernels", no_kernels)
    x_t, model_output = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    x_prev, x0 = ops.ddpm_step(model_output, torch.tensor([0, 9]), x_t, SCHEDULE, seed=3, noise_offset=2, backend="auto")
    assert x_prev.shape == x_t.shape and torch.isfinite(x_prev).all() and torch.isfinite(x0).all()
    assert ops.resolve_backend("auto", torch.device("cpu"), torch.float32) == "reference"
    with pytest.raises(AssertionError, match="kernels loaded"):
        ops.ddpm_step(model_output, 0, x_t, SCHEDULE, seed=3, backend="interpret")


def test_mixed_input_dtypes():
    """A half-precision sample with a float32 model output and float64 noise: each is read as stored."""
    x_t = randn((2, 3, 5), 0, torch.float16)
    model_output, noise = randn((2, 3, 5), 1), randn((2, 3, 5), 2).double()
    t = torch.tensor([3, 800])
    x_prev, x0 = ops.ddpm_step(model_output, t_arg(t), x_t, SCHEDULE, noise=noise, backend=KERNEL_BACKEND)
    ref_prev, ref_x0 = reference.ddpm_step(as64(model_output), t, as64(x_t), SCHEDULE, noise=as64(noise))
    scale = error_scale(t, SCHEDULE, x_t, model_output, noise)
    assert_close_to_reference(x_prev, ref_prev, torch.float16, "mixed dtypes x_prev", scale)
    assert_close_to_reference(x0, ref_x0, torch.float16, "mixed dtypes x0", scale)


# ---------------------------------------------------------------------------------------------
# NaN propagates through clipping (a GPU's plain min/max would return the clip bound instead)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_model_output_stays_nan_through_clipping(sampler, dtype):
    shape = (2, 3, 5, 4)
    x_t = randn(shape, 31, dtype)
    model_output = randn(shape, 32, dtype)
    bad = torch.zeros(shape, dtype=torch.bool)
    bad[0, 1, 2, 3] = bad[1, 0, 0, 0] = True
    model_output[bad.to(KERNEL_DEVICE)] = float("nan")
    step = ops.ddpm_step if sampler == "ddpm" else ops.ddim_step
    x_prev, x0 = step(model_output, 500, x_t, SCHEDULE, clip_denoised=True, seed=3, backend=KERNEL_BACKEND)
    expected_prev, expected_x0 = step(model_output.double(), 500, x_t.double(), SCHEDULE, clip_denoised=True, seed=3,
                                      backend="reference")
    assert torch.equal(x0.isnan().cpu(), bad) and torch.equal(expected_x0.isnan().cpu(), bad)
    assert torch.equal(x_prev.isnan().cpu(), bad)
    finite = ~bad.to(KERNEL_DEVICE)
    assert (x0[finite].abs() <= 1).all()


# ---------------------------------------------------------------------------------------------
# DPM-Solver++(2M) step (kernels/dpm_solver.py) against reference.dpmpp_2m_step
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, variance_type", [((3, 2, 9, 7), "fixed_small"), ((1025,), "fixed_small"),
                                                  ((2, 3, 5, 4), "learned_range")], ids=str)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_dpmpp_2m_kernel_matches_the_reference(dtype, shape, variance_type, prediction_type):
    """Every chain index (first- and second-order steps), fresh inputs, poisoned outputs; the
    previous x_0 is overwritten with this step's. The tolerance scale adds the D0 - D0_prev term's
    amplification (the largest sum of the step's coefficients' sizes) to error_scale's."""
    from fastddpm.step import StepSpec

    spec = StepSpec("dpmpp_2m", prediction_type, variance_type, clip_range=1.0 if prediction_type == "epsilon" else None)
    schedule = RESPACED
    kernels = ops.kernel_module("dpm_solver", interpret=KERNEL_BACKEND == "interpret")
    table = schedule.table(KERNEL_DEVICE, torch.float32)
    out_shape = spec.model_output_shape(shape)
    amplification = 1 + sum(row.abs().max().item() for row in reference.dpmpp_coefficients(schedule).values())
    for index in range(schedule.num_timesteps):
        seed = 100 * index + len(shape)
        x_t, model_output = randn(shape, seed, dtype), randn(out_shape, seed + 1, dtype)
        previous = randn(shape, seed + 2, dtype)
        expected_prev, expected_x0 = reference.dpmpp_2m_step(spec, as64(model_output), index, as64(x_t),
                                                             as64(previous), schedule)
        out = poisoned(x_t)
        t = torch.tensor(index, dtype=torch.int64, device=KERNEL_DEVICE)
        kernels.dpmpp_2m(spec, model_output, t, x_t, previous, table, reference.DPMSolver().table(schedule, KERNEL_DEVICE),
                         out=out)
        scale = amplification * error_scale(torch.tensor(index), schedule, x_t, model_output, previous)
        what = f"dpmpp_2m {shape} {dtype} {prediction_type}/{variance_type} index {index}"
        assert_close_to_reference(out, expected_prev, dtype, what + " x_prev", scale)
        assert_close_to_reference(previous, expected_x0, dtype, what + " x0", scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 2, 9, 7), (1025,)], ids=str)
def test_dpmpp_3m_kernel_matches_the_reference(dtype, shape):
    """Third-order steps (diffusers' solver_order=3: orders 1, 2, 3, ..., 3, 2, 1 from the top): every
    chain index against the float64 reference; both x_0 buffers shift in place (D0 over D0_prev,
    D0_prev over D0_prev2)."""
    from fastddpm.step import StepSpec

    schedule = RESPACED
    n = schedule.num_timesteps
    solver = reference.DPMSolver(orders=(1, 2) + (3,) * (n - 4) + (2, 1))
    spec = StepSpec("dpmpp_2m", "epsilon", "fixed_small", clip_range=1.0)
    kernels = ops.kernel_module("dpm_solver", interpret=KERNEL_BACKEND == "interpret")
    table, solver_table = schedule.table(KERNEL_DEVICE, torch.float32), solver.table(schedule, KERNEL_DEVICE)
    amplification = 1 + sum(row.abs().max().item() for row in solver.coefficients(schedule).values())
    assert solver.coefficients(schedule)["dpmpp_prev2_coef"].abs().max() > 0  # third-order steps are there
    for index in range(n):
        seed = 100 * index + len(shape)
        x_t, model_output = randn(shape, seed, dtype), randn(shape, seed + 1, dtype)
        previous, older = randn(shape, seed + 2, dtype), randn(shape, seed + 3, dtype)
        expected_prev, expected_x0 = reference.dpmpp_2m_step(spec, as64(model_output), index, as64(x_t), as64(previous),
                                                             schedule, older_x0=as64(older), solver=solver)
        expected_older = as64(previous)
        out = poisoned(x_t)
        t = torch.tensor(index, dtype=torch.int64, device=KERNEL_DEVICE)
        kernels.dpmpp_2m(spec, model_output, t, x_t, previous, table, solver_table, older_x0=older, out=out)
        scale = amplification * error_scale(torch.tensor(index), schedule, x_t, model_output, previous, older)
        what = f"dpmpp_3m {shape} {dtype} index {index}"
        assert_close_to_reference(out, expected_prev, dtype, what + " x_prev", scale)
        assert_close_to_reference(previous, expected_x0, dtype, what + " x0", scale)
        assert torch.equal(older.cpu().double(), expected_older), what + " older"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 2, 9, 7), (1025,), (2, 3, 4, 4)], ids=str)
@pytest.mark.parametrize("given_noise", [True, False], ids=["noise", "philox"])
def test_dpmpp_2m_sde_kernel_matches_the_reference(dtype, shape, given_noise):
    """The SDE variant: every chain index, the noise given or drawn in the kernel (the Philox stream
    of the reference, equal to a few ulps), fresh inputs, poisoned output. The tolerance scale adds
    the noise term's size to the ODE step's."""
    from fastddpm.step import StepSpec

    spec = StepSpec("dpmpp_2m_sde", "epsilon", "fixed_small", clip_range=1.0)
    schedule = RESPACED
    kernels = ops.kernel_module("dpm_solver", interpret=KERNEL_BACKEND == "interpret")
    table, solver_table = schedule.table(KERNEL_DEVICE, torch.float32), reference.DPMSolver(sde=True).table(schedule, KERNEL_DEVICE)
    rows = reference.dpmpp_coefficients(schedule, sde=True)
    amplification = 1 + sum(row.abs().max().item() for row in rows.values()) + 4 * rows["dpmpp_noise_coef"].max().item()
    for index in range(schedule.num_timesteps):
        seed = 100 * index + len(shape)
        x_t, model_output, previous = randn(shape, seed, dtype), randn(shape, seed + 1, dtype), randn(shape, seed + 2, dtype)
        noise = randn(shape, seed + 3, dtype) if given_noise else None
        scalars = {} if given_noise else dict(seed=seed, noise_offset=index + 1, index_base=5)
        expected_prev, expected_x0 = reference.dpmpp_2m_step(spec, as64(model_output), index, as64(x_t), as64(previous),
                                                             schedule, noise=as64(noise), **scalars)
        out = poisoned(x_t)
        t = torch.tensor(index, dtype=torch.int64, device=KERNEL_DEVICE)
        device_scalars = {name: torch.tensor(value, dtype=torch.int64, device=KERNEL_DEVICE)
                          for name, value in scalars.items()}
        kernels.dpmpp_2m(spec, model_output, t, x_t, previous, table, solver_table, noise=noise, out=out,
                         **device_scalars)
        scale = amplification * error_scale(torch.tensor(index), schedule, x_t, model_output, previous)
        what = f"dpmpp_2m_sde {shape} {dtype} index {index} {'noise' if given_noise else 'philox'}"
        assert_close_to_reference(out, expected_prev, dtype, what + " x_prev", scale)
        assert_close_to_reference(previous, expected_x0, dtype, what + " x0", scale)


# ---------------------------------------------------------------------------------------------
# UniPC step (kernels/unipc.py) against reference.unipc_step
# ---------------------------------------------------------------------------------------------
UNIPC_SOLVERS = [reference.UniPC(), reference.UniPC(order=1), reference.UniPC(variant="bh1"),
                 reference.UniPC(disable_corrector=frozenset({1, 4}), lower_order_final=False)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, variance_type", [((3, 2, 9, 7), "fixed_small"), ((1025,), "fixed_small"),
                                                  ((2, 3, 5, 4), "learned_range")], ids=str)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("solver", UNIPC_SOLVERS, ids=lambda s: f"{s.variant}-{s.order}-{sorted(s.disable_corrector)}")
def test_unipc_kernel_matches_the_reference(dtype, shape, variance_type, prediction_type, solver):
    """Every chain index (first steps, corrector on and off, the last step), fresh inputs, poisoned
    output; the corrector part and the previous x_0 are overwritten in place. The tolerance scale
    adds the largest combination of the eight coefficients, sum |row| (an element's three outputs
    are sums of at most four such products of inputs), to error_scale's."""
    from fastddpm.step import StepSpec

    spec = StepSpec("unipc", prediction_type, variance_type, clip_range=1.0 if prediction_type == "epsilon" else None)
    schedule = NoiseSchedule.from_alphas_cumprod(
        RESPACED.alphas_cumprod, final_alpha_cumprod=(1 + RESPACED.alphas_cumprod[0].item()) / 2) \
        if not solver.lower_order_final else RESPACED  # an order-2 last step needs a last level below 1
    kernels = ops.kernel_module("unipc", interpret=KERNEL_BACKEND == "interpret")
    table = schedule.table(KERNEL_DEVICE, torch.float32)
    solver_table = solver.table(schedule, KERNEL_DEVICE)
    coefficients = solver.coefficients(schedule)
    amplification = 1 + sum(row.abs().max().item() for row in coefficients.values())
    out_shape = spec.model_output_shape(shape)
    for index in range(schedule.num_timesteps):
        seed = 100 * index + len(shape)
        x_t, model_output = randn(shape, seed, dtype), randn(out_shape, seed + 1, dtype)
        corrector, previous = randn(shape, seed + 2, dtype), randn(shape, seed + 3, dtype)
        expected_prev, expected_c, expected_x0 = reference.unipc_step(
            spec, as64(model_output), index, as64(x_t), as64(corrector), as64(previous), schedule, solver)
        out = poisoned(x_t)
        t = torch.tensor(index, dtype=torch.int64, device=KERNEL_DEVICE)
        kernels.unipc(spec, model_output, t, x_t, corrector, previous, table, solver_table, out=out)
        scale = amplification * error_scale(torch.tensor(index), schedule, x_t, model_output, previous, corrector)
        what = f"unipc {shape} {dtype} {prediction_type}/{variance_type} index {index}"
        assert_close_to_reference(out, expected_prev, dtype, what + " x_prev", scale)
        assert_close_to_reference(corrector, expected_c, dtype, what + " corrector", scale)
        assert_close_to_reference(previous, expected_x0, dtype, what + " x0", scale)


def test_unipc_op_takes_non_contiguous_inputs_and_writes_in_place():
    """ops.unipc_step on a transposed x_t and model output, out=x_t: the kernel path's result is the
    reference's (float64) on the same values."""
    from fastddpm.step import StepSpec

    spec = StepSpec("unipc", "epsilon", "fixed_small", 1.0)
    base = randn((2, 3, 6, 5), 7)
    x_t = base.transpose(2, 3)
    model_output = randn((2, 3, 6, 5), 8).transpose(2, 3)
    corrector, previous = randn(x_t.shape, 9), randn(x_t.shape, 10)
    expected_prev, expected_c, expected_x0 = reference.unipc_step(
        spec, as64(model_output), 5, as64(x_t), as64(corrector), as64(previous), RESPACED)
    written = ops.unipc_step(spec, model_output, 5, x_t, corrector, previous, RESPACED, out=x_t, backend=KERNEL_BACKEND)
    assert written is x_t
    scale = 10 * error_scale(torch.tensor(5), RESPACED, x_t, model_output, previous, corrector)
    assert_close_to_reference(x_t, expected_prev, torch.float32, "x_prev", scale)
    assert_close_to_reference(corrector, expected_c, torch.float32, "corrector", scale)
    assert_close_to_reference(previous, expected_x0, torch.float32, "x0", scale)
