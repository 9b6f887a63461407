"""The variational bound against independent computations, and ``fastddpm eval`` end to end.

The independent computations rebuild every coefficient from the betas in numpy (not from
NoiseSchedule's tables) and use scipy for the normal CDF, so they share no code with the bound.
"""
import json
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from fastddpm import NoiseSchedule
from fastddpm.evaluation import (
    discretized_gaussian_log_likelihood,
    evaluate_toy_samples,
    snap_to_8bit,
    variational_bound,
)
from fastddpm.reference import philox_randn

LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------
# independent numpy model of the DDPM quantities
# ---------------------------------------------------------------------------------------------
class NumpyDDPM:
    def __init__(self, betas):
        self.betas = np.asarray(betas, dtype=np.float64)
        self.alpha_bar = np.cumprod(1.0 - self.betas)
        self.alpha_bar_prev = np.concatenate([[1.0], self.alpha_bar[:-1]])

    def posterior(self, x0, x_t, t):
        """Mean and variance of q(x_{t-1} | x_t, x_0) (Ho et al. eq. 6-7)."""
        b, ab, abp = self.betas[t], self.alpha_bar[t], self.alpha_bar_prev[t]
        mean = (np.sqrt(abp) * b / (1 - ab)) * x0 + (np.sqrt(1 - b) * (1 - abp) / (1 - ab)) * x_t
        return mean, b * (1 - abp) / (1 - ab)

    def x0_from_eps(self, x_t, eps, t):
        return (x_t - np.sqrt(1 - self.alpha_bar[t]) * eps) / np.sqrt(self.alpha_bar[t])


def gaussian_kl(m1, v1, m2, v2):
    return 0.5 * (np.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1.0)


def decoder_nll(x0, mean, std):
    """-log P(x0) of N(mean, std^2) discretized to 256 bins on [-1, 1], through scipy's CDF."""
    upper = np.where(x0 > 1 - 1e-6, np.inf, (x0 + 1 / 255 - mean) / std)
    lower = np.where(x0 < -1 + 1e-6, -np.inf, (x0 - 1 / 255 - mean) / std)
    # P = cdf(u) - cdf(l) = sf(l) - sf(u); take the form whose terms are not both near 1
    log_hi = np.where(lower > 0, stats.norm.logsf(lower), stats.norm.logcdf(upper))
    log_lo = np.where(lower > 0, stats.norm.logsf(upper), stats.norm.logcdf(lower))
    return -(log_hi + np.log1p(-np.exp(log_lo - log_hi))).sum()


def toy_model(channels_out=1, scale=0.3):
    """A fixed, imperfect, deterministic model: output depends on x_t and t."""
    def model(x, t):
        phase = (t.to(x.dtype) / 50.0).reshape(-1, 1, 1, 1)
        out = scale * x + 0.2 * torch.sin(phase + x)
        if channels_out == 2:
            out = torch.cat([out, torch.tanh(x - phase / 10)], dim=1)
        return out
    return model


def numpy_model(x_t, t, channels_out=1, scale=0.3):
    out = scale * x_t + 0.2 * np.sin(t / 50.0 + x_t)
    second = np.tanh(x_t - t / 500.0) if channels_out == 2 else None
    return out, second


def small_images(n=2, side=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, side, side, generator=g) * 2 - 1
    x[:, :, 0, 0] = -1.0  # exercise the edge bins of the decoder
    x[:, :, -1, -1] = 1.0
    return snap_to_8bit(x.double())


SCHEDULE = NoiseSchedule.linear(40, beta_start=1e-3, beta_end=0.2)


def expected_terms(x0, schedule, seed, prediction_type, variance_type, clip=True):
    """Per-t bound terms (bits/dim, mean over images) and L_T, computed independently."""
    ddpm = NumpyDDPM(schedule.betas.numpy())
    x0 = x0.numpy()
    n, dims = x0.shape[0], x0[0].size
    channels = 2 if variance_type in ("learned", "learned_range") else 1
    terms = np.zeros(len(ddpm.betas))
    for t in range(len(ddpm.betas)):
        eps = philox_randn(x0.shape, seed, t, dtype=torch.float64).numpy()
        x_t = np.sqrt(ddpm.alpha_bar[t]) * x0 + np.sqrt(1 - ddpm.alpha_bar[t]) * eps
        out, var_out = numpy_model(x_t, t, channels)
        x0_pred = ddpm.x0_from_eps(x_t, out, t) if prediction_type == "epsilon" else out
        if clip:
            x0_pred = np.clip(x0_pred, -1, 1)
        model_mean, _ = ddpm.posterior(x0_pred, x_t, t)
        true_mean, true_var = ddpm.posterior(x0, x_t, t)
        # beta~_0 is 0: the clipped value is beta~_1, as in the DDPM code
        small = true_var if t > 0 else ddpm.posterior(x0, x_t, 1)[1]
        if variance_type == "fixed_small":
            model_var = small
        elif variance_type == "fixed_large":
            model_var = ddpm.betas[t]
        elif variance_type == "learned":
            model_var = np.exp(var_out)
        else:  # learned_range
            frac = (var_out + 1) / 2
            model_var = np.exp(frac * np.log(ddpm.betas[t]) + (1 - frac) * np.log(small))
        model_var = np.broadcast_to(model_var, x0.shape)
        for i in range(n):
            if t == 0:
                nats = decoder_nll(x0[i], model_mean[i], np.sqrt(model_var[i]))
            else:
                nats = gaussian_kl(true_mean[i], true_var, model_mean[i], model_var[i]).sum()
            terms[t] += nats / (dims * LN2) / n
    ab_T = ddpm.alpha_bar[-1]
    prior = gaussian_kl(np.sqrt(ab_T) * x0, 1 - ab_T, 0.0, 1.0).sum() / (dims * LN2) / n
    return terms, prior


# ---------------------------------------------------------------------------------------------
# the bound's terms
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type,variance_type", [
    ("epsilon", "fixed_small"),
    ("epsilon", "fixed_large"),
    ("sample", "fixed_small"),
    ("epsilon", "learned_range"),
    ("epsilon", "learned"),
])
def test_every_term_matches_an_independent_computation(prediction_type, variance_type):
    x0 = small_images()
    channels = 2 if variance_type.startswith("learned") else 1
    result = variational_bound(toy_model(channels), x0, SCHEDULE, prediction_type=prediction_type,
                               variance_type=variance_type, seed=3, batch_size=16)
    terms, prior = expected_terms(x0, SCHEDULE, 3, prediction_type, variance_type)
    np.testing.assert_allclose(result.terms.numpy(), terms, rtol=1e-6, atol=1e-10)
    assert result.prior == pytest.approx(prior, rel=1e-9)
    assert result.decoder == pytest.approx(terms[0], rel=1e-6)
    assert result.diffusion == pytest.approx(terms[1:].sum(), rel=1e-6)
    assert result.bits_per_dim == pytest.approx(terms.sum() + prior, rel=1e-6)
    assert result.per_image.shape == (2,)
    assert float(result.per_image.mean()) == pytest.approx(result.bits_per_dim, rel=1e-12)


def test_gaussian_kl_formula_matches_monte_carlo():
    """The closed-form KL used by the bound (fastddpm.losses.normal_kl) vs a Monte Carlo estimate."""
    from fastddpm.losses import normal_kl

    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.tensor([0.3, -1.0], dtype=torch.float64), torch.tensor([-0.2, -0.4], dtype=torch.float64)
    lv1, lv2 = torch.tensor([-1.0, 0.5], dtype=torch.float64), torch.tensor([-0.3, -0.2], dtype=torch.float64)
    x = m1 + torch.exp(0.5 * lv1) * torch.randn(400_000, 2, generator=g, dtype=torch.float64)
    log_q = torch.distributions.Normal(m1, torch.exp(0.5 * lv1)).log_prob(x)
    log_p = torch.distributions.Normal(m2, torch.exp(0.5 * lv2)).log_prob(x)
    monte_carlo = (log_q - log_p).mean(0)
    closed = normal_kl(m1, lv1, m2, lv2)
    np.testing.assert_allclose(closed.numpy(), monte_carlo.numpy(), rtol=0.02)


def test_perfect_model_of_a_point_mass_has_the_closed_form_bound():
    """Data = one image x*; the model predicts the exact noise, so every KL term vanishes and the
    bound is L_T plus the decoder's -log P(bin of x*) under N(x*, beta~_1)."""
    schedule = NoiseSchedule.linear(200)
    x_star = small_images(1, 4, seed=5)
    sab = schedule.sqrt_alphas_cumprod
    s1m = schedule.sqrt_one_minus_alphas_cumprod

    def oracle(x, t):
        return (x - sab[t].reshape(-1, 1, 1, 1) * x_star) / s1m[t].reshape(-1, 1, 1, 1)

    result = variational_bound(oracle, x_star.repeat(3, 1, 1, 1), schedule, seed=1, batch_size=64)
    ddpm = NumpyDDPM(schedule.betas.numpy())
    std0 = math.sqrt(ddpm.posterior(0.0, 0.0, 1)[1])
    expected_decoder = decoder_nll(x_star[0].numpy(), x_star[0].numpy(), std0) / (16 * LN2)
    ab_T = ddpm.alpha_bar[-1]
    expected_prior = gaussian_kl(math.sqrt(ab_T) * x_star.numpy(), 1 - ab_T, 0.0, 1.0).sum() / (16 * LN2)
    assert result.decoder == pytest.approx(expected_decoder, rel=1e-9)
    assert result.prior == pytest.approx(expected_prior, rel=1e-9)
    assert abs(result.diffusion) < 1e-9
    assert result.bits_per_dim == pytest.approx(expected_decoder + expected_prior, rel=1e-7)
    assert float(result.x0_mse.max()) < 1e-20


def test_bound_is_independent_of_batching_and_deterministic():
    x0 = small_images(5)
    model = toy_model()
    a = variational_bound(model, x0, SCHEDULE, seed=7, batch_size=3)
    b = variational_bound(model, x0, SCHEDULE, seed=7, batch_size=1000)
    c = variational_bound(model, x0, SCHEDULE, seed=8, batch_size=1000)
    torch.testing.assert_close(a.terms, b.terms, rtol=1e-12, atol=0)
    torch.testing.assert_close(a.per_image, b.per_image, rtol=1e-12, atol=0)
    assert a.bits_per_dim != c.bits_per_dim  # the seed does change the Monte Carlo draw


def test_bound_calls_the_model_with_trained_timesteps_of_a_respaced_schedule():
    full = NoiseSchedule.linear(100)
    respaced = full.respace_evenly(10)
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    result = variational_bound(model, small_images(2), respaced, batch_size=4)
    assert torch.equal(torch.unique(torch.cat(seen)), respaced.timesteps)
    assert result.terms.shape == (10,)
    assert torch.equal(result.timesteps, respaced.timesteps)


def test_bound_restores_training_mode_and_reads_the_model_device_dtype():
    model = torch.nn.Conv2d(1, 1, 1).double().train()
    wrapped = torch.nn.Module()
    wrapped.inner = model
    wrapped.forward = lambda x, t: model(x)
    assert variational_bound(wrapped, small_images(2), SCHEDULE).bits_per_dim > 0
    assert model.training


def test_bound_rejects_bad_arguments():
    x0 = small_images(2)
    model = toy_model()
    with pytest.raises(ValueError, match="x0"):
        variational_bound(model, x0 * 2, SCHEDULE)
    with pytest.raises(TypeError, match="x0"):
        variational_bound(model, x0.numpy(), SCHEDULE)
    with pytest.raises(TypeError, match="schedule"):
        variational_bound(model, x0, "linear")
    with pytest.raises(ValueError, match="variance_type"):
        variational_bound(model, x0, SCHEDULE, variance_type="small")
    with pytest.raises(ValueError, match="prediction_type"):
        variational_bound(model, x0, SCHEDULE, prediction_type="eps")
    with pytest.raises(ValueError, match="batch_size"):
        variational_bound(model, x0, SCHEDULE, batch_size=0)
    with pytest.raises(ValueError, match="seed"):
        variational_bound(model, x0, SCHEDULE, seed=-1)


# ---------------------------------------------------------------------------------------------
# the decoder
# ---------------------------------------------------------------------------------------------
LEVELS = torch.linspace(-1.0, 1.0, 256, dtype=torch.float64)


@pytest.mark.parametrize("mean,std", [(0.0, 0.01), (0.37, 0.003), (-0.99, 0.05), (1.3, 0.2), (0.2, 1e-4),
                                      (-0.5, 3.0), (0.999, 1e-3)])
def test_decoder_probabilities_sum_to_one_over_the_256_bins(mean, std):
    log_p = discretized_gaussian_log_likelihood(LEVELS, torch.tensor(mean, dtype=torch.float64),
                                                torch.tensor(math.log(std), dtype=torch.float64))
    assert (log_p <= 0).all() and not torch.isnan(log_p).any()
    assert float(torch.exp(log_p).sum()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("distance", [0.0, 0.7, 3.0, 6.0, 9.0, 15.0])
def test_decoder_is_accurate_far_in_the_tails(distance):
    """log P(bin) against quadrature of the normal density, including bins many sigmas away."""
    std = 0.004
    x = float(LEVELS[140])
    for sign in (1.0, -1.0):
        mean = x + sign * distance * std
        exact, _ = integrate.quad(lambda u: stats.norm.pdf(u, mean, std), x - 1 / 255, x + 1 / 255,
                                  epsabs=0, epsrel=1e-12, limit=200)
        got = discretized_gaussian_log_likelihood(torch.tensor(x, dtype=torch.float64),
                                                  torch.tensor(mean, dtype=torch.float64),
                                                  torch.tensor(math.log(std), dtype=torch.float64))
        assert float(got) == pytest.approx(math.log(exact), rel=1e-7, abs=1e-9)


def test_snap_to_8bit_lands_on_the_grid():
    x = torch.linspace(-1, 1, 17, dtype=torch.float64)  # the digits' 17 levels
    snapped = snap_to_8bit(x)
    codes = (snapped + 1) * 127.5
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-9)
    assert float((snapped - x).abs().max()) <= 1 / 255 + 1e-12


# ---------------------------------------------------------------------------------------------
# toy metrics and the command
# ---------------------------------------------------------------------------------------------
def test_toy_evaluation_separates_the_right_distribution_from_a_wrong_one():
    from fastddpm.data import toy2d

    right = evaluate_toy_samples(toy2d("moons", 1000, seed=3), "moons")
    wrong = evaluate_toy_samples(toy2d("8gaussians", 1000, seed=3), "moons")
    assert right["sliced_wasserstein"] < 3 * right["sliced_wasserstein_floor"]
    assert wrong["sliced_wasserstein"] > 5 * wrong["sliced_wasserstein_floor"]
    assert wrong["energy_distance"] > 10 * right["energy_distance"]


def _tiny_checkpoint(path, *, image: bool):
    from fastddpm.checkpoint import save_checkpoint
    from fastddpm.models import create_model

    torch.manual_seed(0)
    if image:
        model = create_model("digits", ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=())
        shape, data = [1, 8, 8], "digits"
    else:
        model = create_model("toy2d", hidden=16, num_layers=1, temb_dim=8)
        shape, data = [2], "moons"
    config = dict(model=model.config, diffusion=dict(prediction_type="epsilon", variance_type="fixed_small"),
                  sample_shape=shape, data=data)
    save_checkpoint(path, config=config, schedule=NoiseSchedule.linear(20, beta_end=0.3), model=model)
    return path


def test_eval_command_writes_json_for_a_digits_model(tmp_path, tmp_path_factory, monkeypatch, capsys):
    from fastddpm.cli import main

    # the folder test_metrics.py uses, so one pytest run trains the classifier once
    cache = tmp_path_factory.getbasetemp() / "fastddpm-classifier-cache"
    monkeypatch.setenv("FASTDDPM_CACHE", str(cache))
    checkpoint = _tiny_checkpoint(tmp_path / "tiny.safetensors", image=True)
    out = tmp_path / "eval.json"
    code = main(["eval", "--checkpoint", str(checkpoint), "--num-samples", "24", "--steps", "5", "--sampler",
                 "ddim", "--bound-images", "6", "--batch-size", "50", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "bits/dim" in printed and "FD floor" in printed and "KID" in printed
    report = json.loads(out.read_text())
    quality, bound, per_seed = report["quality"], report["bound"], report["quality_per_seed"]
    assert report["data"] == "digits" and report["steps"] == 5 and report["clip_denoised"] is True
    # Three seeds by default, each its own draw of samples and of the floor's training digits.
    assert report["seeds"] == [0, 1, 2] and len(per_seed) == 3
    assert len({result["fd"] for result in per_seed}) == 3 and len({r["fd_floor"] for r in per_seed}) == 3
    assert sum(quality["class_histogram"]) == 3 * 24
    assert quality["fd"] == pytest.approx(sum(result["fd"] for result in per_seed) / 3)
    assert quality["fd"] > quality["fd_floor"] > 0  # an untrained model is worse than real data
    assert quality["kid"] > quality["kid_floor"] + 2 * quality["kid_excess_se"]
    assert quality["heldout_accuracy"] > 0.9
    assert bound["num_images"] == 6 and len(bound["terms"]) == 20
    assert bound["bits_per_dim"] == pytest.approx(bound["prior"] + bound["decoder"] + bound["diffusion"], rel=1e-9)
    assert list(cache.glob("digit_classifier_*.pt"))


def test_eval_command_runs_the_model_in_the_precision_asked_for(tmp_path, tmp_path_factory, monkeypatch):
    from fastddpm.cli import main

    monkeypatch.setenv("FASTDDPM_CACHE", str(tmp_path_factory.getbasetemp() / "fastddpm-classifier-cache"))
    reports = {}
    for dtype in ("fp32", "bf16"):
        out = tmp_path / f"{dtype}.json"
        # the shipped digits model: trained, so the precision shows in the bound and the samples
        assert main(["eval", "--num-samples", "16", "--steps", "5", "--sampler", "dpmpp_2m", "--seed", "0",
                     "--bound-images", "4", "--dtype", dtype, "--channels-last", "--json", str(out),
                     "--no-progress"]) == 0
        reports[dtype] = json.loads(out.read_text())
    assert reports["bf16"]["model_dtype"] == "bf16" and reports["bf16"]["channels_last"] is True
    exact, low = reports["fp32"]["bound"]["bits_per_dim"], reports["bf16"]["bound"]["bits_per_dim"]
    # bf16 moves the bound, but only a little (its rounding, not another model): measured ~1e-3 bits/dim
    assert exact != low and abs(exact - low) < 0.05 * exact
    assert reports["fp32"]["quality"]["fd"] != reports["bf16"]["quality"]["fd"]


def test_eval_command_on_a_toy_model_and_bad_arguments(tmp_path, capsys):
    from fastddpm.cli import main

    checkpoint = _tiny_checkpoint(tmp_path / "toy.safetensors", image=False)
    out = tmp_path / "toy.json"
    assert main(["eval", "--checkpoint", str(checkpoint), "--num-samples", "64", "--seed", "4", "--json",
                 str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["data"] == "moons" and "bound" not in report and report["seeds"] == [4]
    assert report["clip_denoised"] is False  # toy points extend beyond [-1, 1]
    assert report["quality"]["sliced_wasserstein"] > 0
    capsys.readouterr()
    for bad, message in ((["--num-samples", "-3"], "--num-samples"), (["--data", "cifar"], "--data"),
                         (["--eta", "0.5"], "--eta"), (["--data", "digits"], "digits"),
                         (["--bound-images", "0"], "--bound-images"), (["--seed", "1", "1"], "--seed"),
                         (["--seed", "-2"], "--seed")):
        assert main(["eval", "--checkpoint", str(checkpoint), *bad]) == 2
        assert message in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err


def test_eval_command_reads_a_diffusers_folder(tiny_unet, tmp_path, tmp_path_factory, monkeypatch, capsys):
    """``--checkpoint`` takes a diffusers folder in eval as in sample: the same loader."""
    diffusers = pytest.importorskip("diffusers")
    from fastddpm.cli import main
    from fastddpm.data import load_digits

    monkeypatch.setenv("FASTDDPM_CACHE", str(tmp_path_factory.getbasetemp() / "fastddpm-classifier-cache"))
    folder = tmp_path / "unet"
    tiny_unet.save_pretrained(folder)
    diffusers.DDPMScheduler(num_train_timesteps=12, beta_end=0.3).save_config(folder)
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(folder), "--num-samples", "4", "--steps", "3", "--bound-images", "3",
                 "--seed", "0", "--json", str(out), "--no-progress", "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert report["checkpoint"] == str(folder) and report["num_timesteps"] == 12
    assert report["checkpoint_sha256"].startswith("sha256:")
    assert report["data"] == "digits" and sum(report["quality"]["class_histogram"]) == 4
    # The bound is the one of this model under the folder's schedule.
    heldout, _ = load_digits("test")
    want = variational_bound(tiny_unet, heldout[:3], NoiseSchedule.linear(12, beta_end=0.3), seed=0)
    assert report["bound"]["bits_per_dim"] == pytest.approx(want.bits_per_dim, rel=1e-6)
    assert len(report["bound"]["terms"]) == 12


def test_pooled_quality_is_read_off_the_seeds_results():
    from fastddpm.evaluation import pool_digit_quality

    def result(fd, floor, kid, kid_se, kid_floor, kid_floor_se, histogram, confidence):
        return dict(fd=fd, fd_floor=floor, kid=kid, kid_se=kid_se, kid_floor=kid_floor, kid_floor_se=kid_floor_se,
                    class_histogram=histogram, mean_max_probability=confidence, num_samples=sum(histogram),
                    heldout_mean_max_probability=0.98, heldout_accuracy=0.97, fraction_outside_unit_range=0.0,
                    nearest_train_distance=fd / 10, heldout_nearest_train_distance=2.5, near_copy_fraction=0.0)

    pooled = pool_digit_quality([
        result(30.0, 20.0, 0.05, 0.03, 0.01, 0.04, [10, 10, 10, 10, 10], 0.90),
        result(24.0, 16.0, 0.02, 0.04, -0.01, 0.03, [16, 9, 10, 8, 7], 0.96),
    ])
    assert pooled["seeds"] == 2 and pooled["num_samples"] == 50
    assert pooled["fd"] == pytest.approx(27.0) and pooled["fd_floor"] == pytest.approx(18.0)
    assert pooled["fd_ratio"] == pytest.approx(27.0 / 18.0)  # mean over mean, not the mean of ratios
    assert pooled["fd_ratio_mean"] == pytest.approx(1.5)
    assert pooled["fd_sd"] == pytest.approx(math.sqrt(18.0))  # sample sd of 30 and 24
    assert pooled["kid"] == pytest.approx(0.035) and pooled["kid_floor"] == pytest.approx(0.0)
    assert pooled["kid_se"] == pytest.approx(0.05 / 2) and pooled["kid_floor_se"] == pytest.approx(0.05 / 2)
    assert pooled["kid_excess_se"] == pytest.approx(math.hypot(0.025, 0.025))
    assert pooled["kid_excess_in_se"] == pytest.approx(0.035 / math.hypot(0.025, 0.025))
    assert pooled["class_histogram"] == [26, 19, 20, 18, 17]
    assert pooled["class_deviation"] == pytest.approx(0.3)  # 26 against 20 expected
    assert pooled["mean_max_probability"] == pytest.approx(0.93)
    with pytest.raises(ValueError, match="per_seed"):
        pool_digit_quality([])


def test_digit_evaluation_flags_copies_of_training_digits(tmp_path_factory):
    """Training digits passed off as samples are real digits to FD and KID but are flagged as
    copies; the held-out digits are real unseen digits and are not (1 % by the cut's definition)."""
    from fastddpm.data import load_digits
    from fastddpm.evaluation import evaluate_digit_samples

    cache = tmp_path_factory.getbasetemp() / "fastddpm-classifier-cache"
    train_images, _ = load_digits("train")
    heldout_images, _ = load_digits("test")
    some = torch.randperm(train_images.shape[0], generator=torch.Generator().manual_seed(5))[:300]
    copies = evaluate_digit_samples(train_images[some], seed=0, cache_dir=cache)
    assert copies["near_copy_fraction"] == 1.0 and copies["nearest_train_distance"] == 0.0
    unseen = evaluate_digit_samples(heldout_images, seed=0, cache_dir=cache)
    assert unseen["near_copy_fraction"] == pytest.approx(0.01, abs=0.004)
    assert unseen["nearest_train_distance"] == pytest.approx(unseen["heldout_nearest_train_distance"])
    assert unseen["nearest_train_distance"] > 1.0
