"""The pure-PyTorch reference against independent float64 derivations of the papers' equations and
against diffusers (DDPMScheduler.step, DDIMScheduler.step, get_timestep_embedding)."""
import math

import pytest
import torch

from fastddpm import reference
from fastddpm.reference import PREDICTION_TYPES, VARIANCE_TYPES
from fastddpm.schedule import NoiseSchedule

diffusers = pytest.importorskip("diffusers")
from diffusers.models.embeddings import get_timestep_embedding  # noqa: E402

F64 = torch.float64


def randn(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def alpha_bar(schedule, t):
    """alpha_bar_t = prod_{s <= t} (1 - beta_s), multiplied out here rather than read from the tables."""
    return math.prod(1.0 - b for b in schedule.betas[: t + 1].tolist())


def per_sample(values, ndim):
    return torch.tensor(values, dtype=F64).reshape((-1,) + (1,) * (ndim - 1))


# float64 against float64 with a different operation order: a few ulps, amplified at most ~1e3 by
# the 1/sqrt(alpha_bar) of the epsilon -> x0 conversion at t = T-1.
EXACT = dict(rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# forward process
# ---------------------------------------------------------------------------------------------
def test_q_sample_is_eq_4():
    schedule = NoiseSchedule.linear()
    t = [0, 1, 500, 999]
    x0, eps = randn(4, 3, 5, seed=1), randn(4, 3, 5, seed=2)
    x_t, returned_eps = reference.q_sample(x0, torch.tensor(t), schedule, eps)
    ab = per_sample([alpha_bar(schedule, i) for i in t], 3)
    torch.testing.assert_close(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * eps, **EXACT)
    assert torch.equal(returned_eps, eps)
    # scalar t broadcasts to every sample
    x_t, _ = reference.q_sample(x0, 250, schedule, eps)
    ab = alpha_bar(schedule, 250)
    torch.testing.assert_close(x_t, math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps, **EXACT)


# ---------------------------------------------------------------------------------------------
# DDPM reverse step
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_step_is_algorithm_2(variance_type):
    """Ho et al. Algorithm 2: x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - ab_t) eps) + sigma_t z,
    sigma_t^2 = beta_t or beta~_t = (1 - ab_{t-1}) / (1 - ab_t) beta_t (no clipping of x0)."""
    schedule = NoiseSchedule.linear()
    t = [1, 2, 300, 998, 999]
    x_t, eps, z = randn(5, 2, 3, seed=3), randn(5, 2, 3, seed=4), randn(5, 2, 3, seed=5)
    x_prev, _ = reference.ddpm_step(eps, torch.tensor(t), x_t, schedule, variance_type=variance_type,
                                    clip_denoised=False, noise=z)
    beta = per_sample([schedule.betas[i].item() for i in t], 3)
    ab = per_sample([alpha_bar(schedule, i) for i in t], 3)
    ab_prev = per_sample([alpha_bar(schedule, i - 1) for i in t], 3)
    sigma2 = beta if variance_type == "fixed_large" else (1 - ab_prev) / (1 - ab) * beta
    expected = (x_t - beta / (1 - ab).sqrt() * eps) / (1 - beta).sqrt() + sigma2.sqrt() * z
    torch.testing.assert_close(x_prev, expected, **EXACT)


def test_ddpm_step_mean_is_bayes_posterior_mean():
    """With the model predicting x0 itself and zero noise, the step is the posterior mean
    E[x_{t-1} | x_t, x0] of the Gaussians q(x_{t-1} | x0) and q(x_t | x_{t-1})."""
    schedule = NoiseSchedule.cosine()
    for t in [1, 10, 500, 999]:
        x_t, x0 = randn(3, 4, seed=t), randn(3, 4, seed=t + 1)
        x_prev, x0_out = reference.ddpm_step(x0, t, x_t, schedule, prediction_type="sample",
                                             clip_denoised=False, noise=torch.zeros_like(x_t))
        beta, ab_prev = schedule.betas[t].item(), alpha_bar(schedule, t - 1)
        variance = 1.0 / (1.0 / (1.0 - ab_prev) + (1.0 - beta) / beta)
        mean = variance * (math.sqrt(ab_prev) / (1.0 - ab_prev) * x0 + math.sqrt(1.0 - beta) / beta * x_t)
        torch.testing.assert_close(x_prev, mean, **EXACT)
        assert torch.equal(x0_out, x0)


def test_fixed_small_log_and_learned_range_std():
    schedule = NoiseSchedule.linear()
    x_t = randn(2, 3, 4, seed=0)
    for t in [1, 2, 700]:
        posterior_var = (1 - alpha_bar(schedule, t - 1)) / (1 - alpha_bar(schedule, t)) * schedule.betas[t].item()
        small_log = reference.ddpm_std(t, x_t, schedule, "fixed_small_log")
        assert small_log.item() == pytest.approx(math.sqrt(posterior_var), rel=1e-10)
        # Nichol & Dhariwal eq. 15: Sigma = exp(v log beta + (1 - v) log beta~), v = (model + 1) / 2.
        values = torch.tensor([[-1.0, -0.3], [0.0, 1.0]], dtype=F64)
        std = reference.ddpm_std(t, x_t, schedule, "learned_range", values)
        frac = (values + 1) / 2
        expected = torch.exp(0.5 * (frac * math.log(schedule.betas[t].item()) + (1 - frac) * math.log(posterior_var)))
        torch.testing.assert_close(std, expected, **EXACT)
    log_var = torch.tensor([-3.0, 0.5], dtype=F64)
    torch.testing.assert_close(reference.ddpm_std(5, x_t, schedule, "learned", log_var), torch.exp(0.5 * log_var))


@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
def test_no_noise_at_t0(variance_type):
    schedule = NoiseSchedule.linear()
    channels = 6 if variance_type in ("learned", "learned_range") else 3
    x_t, model_output = randn(3, 3, 2, seed=0), randn(3, channels, 2, seed=1)
    huge = torch.full_like(x_t, 1e6)
    t = torch.tensor([0, 0, 4])
    with_noise, _ = reference.ddpm_step(model_output, t, x_t, schedule, variance_type=variance_type, noise=huge)
    without, _ = reference.ddpm_step(model_output, t, x_t, schedule, variance_type=variance_type, noise=torch.zeros_like(x_t))
    assert torch.equal(with_noise[:2], without[:2])
    assert (with_noise[2] - without[2]).abs().min() > 1.0  # t = 4 does get noise
    scalar, _ = reference.ddpm_step(model_output, 0, x_t, schedule, variance_type=variance_type, noise=huge)
    assert torch.equal(scalar[:2], without[:2])


def test_clipping_of_x0():
    schedule = NoiseSchedule.linear()
    model_output = torch.tensor([[-3.0, -0.2, 0.4, 2.5]], dtype=F64)
    x_t = randn(1, 4, seed=0)
    z = torch.zeros_like(x_t)
    _, x0 = reference.ddpm_step(model_output, 10, x_t, schedule, prediction_type="sample", clip_range=0.5, noise=z)
    assert x0.tolist() == [[-0.5, -0.2, 0.4, 0.5]]
    _, x0 = reference.ddpm_step(model_output, 10, x_t, schedule, prediction_type="sample", clip_denoised=False, noise=z)
    assert torch.equal(x0, model_output)


def test_v_prediction_relations():
    """v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho): x0 = sqrt(ab) x_t - sqrt(1 - ab) v, and a
    step from v equals the step from the eps it encodes."""
    schedule = NoiseSchedule.cosine()
    t = torch.tensor([1, 400, 999])
    x0, eps, z = randn(3, 5, seed=0), randn(3, 5, seed=1), randn(3, 5, seed=2)
    ab = per_sample([alpha_bar(schedule, i) for i in t.tolist()], 2)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    v = ab.sqrt() * eps - (1 - ab).sqrt() * x0
    torch.testing.assert_close(reference.predict_x0(v, t, x_t, schedule, "v_prediction", None), x0, **EXACT)
    torch.testing.assert_close(reference.predict_x0(eps, t, x_t, schedule, "epsilon", None), x0, rtol=1e-9, atol=1e-9)
    for variance_type in ("fixed_small", "fixed_large"):
        from_v = reference.ddpm_step(v, t, x_t, schedule, prediction_type="v_prediction",
                                     variance_type=variance_type, clip_denoised=False, noise=z)
        from_eps = reference.ddpm_step(eps, t, x_t, schedule, variance_type=variance_type, clip_denoised=False, noise=z)
        from_x0 = reference.ddpm_step(x0, t, x_t, schedule, prediction_type="sample",
                                      variance_type=variance_type, clip_denoised=False, noise=z)
        torch.testing.assert_close(from_v[0], from_eps[0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(from_x0[0], from_eps[0], rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# DDIM
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_step_is_song_eq_12(eta, prediction_type):
    """x_{t-1} = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z with
    sigma = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev), on a respaced schedule."""
    full = NoiseSchedule.linear()
    kept = [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    schedule = full.respace(kept)
    index = torch.tensor([0, 1, 5, 9])
    x0, eps, z = randn(4, 3, seed=0), randn(4, 3, seed=1), randn(4, 3, seed=2)
    ab = per_sample([alpha_bar(full, kept[i]) for i in index.tolist()], 2)
    ab_prev = per_sample([alpha_bar(full, kept[i - 1]) if i > 0 else 1.0 for i in index.tolist()], 2)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    model_output = {"epsilon": eps, "sample": x0, "v_prediction": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[prediction_type]
    x_prev, x0_out = reference.ddim_step(model_output, index, x_t, schedule, eta=eta, prediction_type=prediction_type,
                                         clip_denoised=False, noise=z)
    sigma = eta * ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).sqrt()
    expected = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).sqrt() * eps + sigma * z
    torch.testing.assert_close(x_prev, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x0_out, x0, rtol=1e-9, atol=1e-9)


def test_ddim_eta_one_is_ddpm_on_respaced_schedule():
    schedule = NoiseSchedule.cosine().respace_evenly(25)
    t = torch.tensor([0, 3, 24])
    model_output, x_t, z = randn(3, 2, 2, seed=0), randn(3, 2, 2, seed=1), randn(3, 2, 2, seed=2)
    # Equal only without clipping: DDIM's direction term keeps the model's own (unclipped) eps.
    ddim, _ = reference.ddim_step(model_output, t, x_t, schedule, eta=1.0, clip_denoised=False, noise=z)
    ddpm, _ = reference.ddpm_step(model_output, t, x_t, schedule, clip_denoised=False, noise=z)
    torch.testing.assert_close(ddim, ddpm, rtol=1e-10, atol=1e-10)


def test_ddim_eta_zero_is_deterministic_and_ignores_noise():
    schedule = NoiseSchedule.linear().respace_evenly(10)
    model_output, x_t = randn(2, 3, seed=0), randn(2, 3, seed=1)
    a, _ = reference.ddim_step(model_output, 4, x_t, schedule, eta=0.0)
    b, _ = reference.ddim_step(model_output, 4, x_t, schedule, eta=0.0, noise=torch.full_like(x_t, 1e6))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="eta"):
        reference.ddim_step(model_output, 4, x_t, schedule, eta=-0.1)


# ---------------------------------------------------------------------------------------------
# against diffusers
# ---------------------------------------------------------------------------------------------
def in_float64(scheduler):
    """Switch a diffusers scheduler's tables to float64 and return our schedule of the same betas.

    diffusers keeps float32 tables and forms 1 - alpha_bar_t / alpha_bar_{t-1} in float32, which
    cancels catastrophically at small t (relative error ~eps32 / beta_t ~ 5e-4 at t = 1). Running
    its step in float64 turns the comparison into a check of the step math alone, to ~1e-12.
    """
    scheduler.betas = scheduler.betas.double()
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = (torch.tensor(1.0, dtype=F64) if scheduler.config.set_alpha_to_one
                                         else scheduler.alphas_cumprod[0])
    return NoiseSchedule(scheduler.betas)


def randn64(seed, shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def assert_matches(ours, theirs):
    # float64 on both sides; errors are relative to the largest magnitude (the epsilon -> x0
    # conversion at t = T-1 multiplies by 1/sqrt(alpha_bar) ~ 160).
    scale = max(1.0, ours.abs().max().item())
    torch.testing.assert_close(theirs, ours, rtol=1e-11, atol=1e-11 * scale)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("num_inference_steps", [None, 20])
def test_ddpm_step_matches_diffusers(prediction_type, variance_type, clip, num_inference_steps):
    theirs = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction_type,
                                     variance_type=variance_type, clip_sample=clip, clip_sample_range=1.5)
    schedule = in_float64(theirs)
    if num_inference_steps is None:
        steps = [0, 1, 2, 500, 998, 999]
        index_of = {t: t for t in steps}
    else:
        theirs.set_timesteps(num_inference_steps)
        trained = sorted(theirs.timesteps.tolist())
        schedule = schedule.respace(trained)
        steps = [trained[0], trained[1], trained[10], trained[-1]]
        index_of = {t: trained.index(t) for t in steps}
    learned = variance_type in ("learned", "learned_range")
    shape = (2, 3, 4, 4)
    for k, t in enumerate(steps):
        x_t = randn64(10 + k, shape)
        model_output = randn64(20 + k, (2, 6 if learned else 3, 4, 4))
        their_output = model_output
        if variance_type == "learned":  # diffusers reads a variance, ours a log-variance
            their_output = torch.cat([model_output[:, :3], model_output[:, 3:].exp()], dim=1)
        elif variance_type == "learned_range":
            model_output = torch.cat([model_output[:, :3], model_output[:, 3:].clamp(-1, 1)], dim=1)
            their_output = model_output
        result = theirs.step(their_output, t, x_t, generator=torch.Generator().manual_seed(k))
        z = randn64(k, shape)  # what diffusers drew from the generator
        x_prev, x0 = reference.ddpm_step(model_output, index_of[t], x_t, schedule, prediction_type=prediction_type,
                                         variance_type=variance_type, clip_denoised=clip, clip_range=1.5, noise=z)
        assert_matches(x0, result.pred_original_sample)
        assert_matches(x_prev, result.prev_sample)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("eta", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_step_matches_diffusers(prediction_type, eta, set_alpha_to_one, clip):
    theirs = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type=prediction_type,
                                     clip_sample=clip, set_alpha_to_one=set_alpha_to_one)
    theirs.set_timesteps(25)
    trained = sorted(theirs.timesteps.tolist())
    schedule = in_float64(theirs).respace(trained, final_alpha_cumprod=float(theirs.final_alpha_cumprod))
    shape = (3, 2, 5)
    for k, t in enumerate([trained[0], trained[1], trained[12], trained[-1]]):
        x_t, model_output, z = randn64(k, shape), randn64(100 + k, shape), randn64(200 + k, shape)
        result = theirs.step(model_output, t, x_t, eta=eta, variance_noise=z if eta > 0 else None)
        x_prev, x0 = reference.ddim_step(model_output, trained.index(t), x_t, schedule, eta=eta,
                                         prediction_type=prediction_type, clip_denoised=clip, noise=z)
        assert_matches(x0, result.pred_original_sample)
        assert_matches(x_prev, result.prev_sample)


# ---------------------------------------------------------------------------------------------
# timestep embedding
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [5, 4, 7, 64, 127])
@pytest.mark.parametrize("flip_sin_to_cos", [False, True])
@pytest.mark.parametrize("downscale_freq_shift", [0, 1])
@pytest.mark.parametrize("scale, max_period", [(1, 10000), (1000.0, 10000), (1, 100)])
def test_timestep_embedding_bitwise_equals_diffusers(dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period):
    for t in (torch.arange(0, 1000, 37), torch.tensor([0.0, 0.25, 3.5, 999.0])):
        ours = reference.timestep_embedding(t, dim, max_period=max_period, flip_sin_to_cos=flip_sin_to_cos,
                                            downscale_freq_shift=downscale_freq_shift, scale=scale)
        theirs = get_timestep_embedding(t, dim, flip_sin_to_cos=flip_sin_to_cos,
                                        downscale_freq_shift=downscale_freq_shift, scale=scale, max_period=max_period)
        assert ours.dtype == torch.float32 and ours.shape == (len(t), dim)
        # Same float32 operations in the same order on the CPU: bit for bit.
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dim", [8, 33, 128])
@pytest.mark.parametrize("flip_sin_to_cos, downscale_freq_shift", [(False, 1), (True, 0)])
def test_timestep_embedding_float64_formula(dim, flip_sin_to_cos, downscale_freq_shift):
    """Ho et al.'s embedding (and improved-diffusion's variant) written out in float64."""
    t = torch.tensor([0, 1, 17, 500, 999])
    ours = reference.timestep_embedding(t, dim, flip_sin_to_cos=flip_sin_to_cos, downscale_freq_shift=downscale_freq_shift)
    half = dim // 2
    freqs = torch.tensor([math.exp(-math.log(10000) * k / (half - downscale_freq_shift)) for k in range(half)], dtype=F64)
    args = t.double()[:, None] * freqs[None, :]
    halves = [args.cos(), args.sin()] if flip_sin_to_cos else [args.sin(), args.cos()]
    expected = torch.cat(halves + [torch.zeros(len(t), dim % 2, dtype=F64)], dim=1)
    # float32 arguments up to 999 carry ~1.5 ulp(999) = 1e-4 absolute error, which sin/cos pass on.
    torch.testing.assert_close(ours.double(), expected, rtol=0, atol=2e-4)
