"""fastddpm.sample(): end to end on an exact model, noise streams, samplers, hooks and bad input."""
import math
import warnings

import pytest
import torch

import fastddpm
from fastddpm import NoiseSchedule, reference
from fastddpm.sampling import sample
from fastddpm.step import StepSpec

from conftest import KERNEL_BACKEND, KERNEL_DEVICE, requires_cuda, requires_triton


pytestmark = pytest.mark.usefixtures("one_cpu_thread")

# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


class GaussianDataModel:
    """The exact minimum-MSE predictor when the data is x_0 ~ N(mean_c, std_c^2), per channel c.

    With x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps, x_t is Gaussian with variance ab s^2 + 1 - ab, and
    E[eps | x_t], E[x_0 | x_t] follow from the covariances; a sampler fed these predictions must
    return samples from the data distribution (up to its discretisation error).
    """

    def __init__(self, schedule, mean, std, prediction_type="epsilon", extra_channels=None):
        self.alphas_cumprod = schedule.alphas_cumprod
        self.mean = torch.tensor(mean, dtype=torch.float64)
        self.var = torch.tensor(std, dtype=torch.float64) ** 2
        self.prediction_type = prediction_type
        self.extra_channels = extra_channels  # a constant learned-variance output, if any

    def __call__(self, x, t):
        assert t.dtype == torch.int64 and t.shape == (x.shape[0],)
        shape = (-1,) + (1,) * (x.ndim - 1)
        ab = self.alphas_cumprod[t.cpu()].reshape(shape)
        mean = self.mean.reshape((1, -1) + (1,) * (x.ndim - 2))
        var = self.var.reshape(mean.shape)
        x64 = x.double().cpu()
        centred = (x64 - ab.sqrt() * mean) / (ab * var + 1 - ab)
        eps = (1 - ab).sqrt() * centred
        x0 = mean + ab.sqrt() * var * centred
        out = {"epsilon": eps, "sample": x0, "v_prediction": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[self.prediction_type]
        if self.extra_channels is not None:
            out = torch.cat([out, torch.full_like(out, self.extra_channels)], dim=1)
        return out.to(device=x.device, dtype=x.dtype)


class RecordingModel(torch.nn.Module):
    """A small conv net that also records the timesteps it is called with."""

    def __init__(self, channels=1, out_channels=None, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(channels, out_channels or channels, 3, padding=1)
        with torch.no_grad():
            for p in self.conv.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
        self.calls = []

    def forward(self, x, t):
        self.calls.append(t.clone())
        return self.conv(x) * (1 + t.to(x.dtype).reshape(-1, 1, 1, 1) / 1000)


SCHEDULE = NoiseSchedule.linear()
DATA_MEAN = (0.25, -0.4)
DATA_STD = (0.3, 0.15)


def _channel_stats(x):
    values = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    return values.mean(dim=1), values.std(dim=1)


# ---------------------------------------------------------------------------------------------
# end to end on Gaussian data
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler,prediction_type", [
    ("ddpm", "epsilon"), ("ddim", "epsilon"), ("ddim", "sample"), ("ddim", "v_prediction"),
])
def test_exact_model_recovers_the_data_distribution(sampler, prediction_type):
    # The full T=1000 chain: respaced DDPM with the fixed small variance shrinks the spread.
    model = GaussianDataModel(SCHEDULE, DATA_MEAN, DATA_STD, prediction_type)
    x = sample(model, (128, 2, 4, 4), schedule=SCHEDULE, sampler=sampler, prediction_type=prediction_type,
               clip_denoised=False, seed=8, progress=False)
    assert x.shape == (128, 2, 4, 4) and x.dtype == torch.float32
    mean, std = _channel_stats(x)
    # 2048 values a channel: the Monte-Carlo error of the mean is std/45, of the std about 1.6%.
    assert torch.allclose(mean, torch.tensor(DATA_MEAN, dtype=torch.float64), atol=0.03)
    assert torch.allclose(std, torch.tensor(DATA_STD, dtype=torch.float64), rtol=0.06)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpmpp_2m_is_second_order_and_recovers_the_data(prediction_type):
    """Against the probability-flow ODE solved finely (1000-step DDIM from the same x_T): doubling
    the steps from 50 to 100 cuts DPM-Solver++(2M)'s error about 4x (second order; measured 0.054
    -> 0.013) and DDIM's about 2x (first order). At 100 steps the samples have the data's
    statistics (the same bounds as the 1000-step samplers above)."""
    model = GaussianDataModel(SCHEDULE, DATA_MEAN, DATA_STD, prediction_type)
    run = lambda sampler, steps: sample(model, (128, 2, 4, 4), schedule=SCHEDULE, num_steps=steps,  # noqa: E731
                                        sampler=sampler, prediction_type=prediction_type, clip_denoised=False,
                                        seed=8, progress=False)
    exact = run("ddim", 1000)
    error = {(sampler, steps): (run(sampler, steps) - exact).abs().max().item()
             for sampler in ("ddim", "dpmpp_2m") for steps in (50, 100)}
    assert error[("dpmpp_2m", 100)] < 0.35 * error[("dpmpp_2m", 50)]
    assert error[("ddim", 100)] > 0.4 * error[("ddim", 50)]
    assert error[("dpmpp_2m", 100)] < error[("ddim", 100)]
    mean, std = _channel_stats(run("dpmpp_2m", 100))
    assert torch.allclose(mean, torch.tensor(DATA_MEAN, dtype=torch.float64), atol=0.03)
    assert torch.allclose(std, torch.tensor(DATA_STD, dtype=torch.float64), rtol=0.06)


def test_dpmpp_2m_matches_diffusers_multistep_scheduler():
    """The same chain, x_T and model through diffusers' DPMSolverMultistepScheduler (dpmsolver++,
    order 2, its defaults: lower_order_final, final_sigmas_type='zero'). diffusers keeps its
    alpha_bar in float32, fastddpm in float64: measured 2e-5 apart on values up to ~200 (a relative
    1e-7); allowed 1e-5 relative."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                                      algorithm_type="dpmsolver++", solver_order=2)
    scheduler.set_timesteps(10)
    model = RecordingModel(channels=2)
    x_T = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(5))
    expected = x_T.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            expected = scheduler.step(model(expected, t.repeat(3)), t, expected).prev_sample
    # fastddpm's dpmpp_2m chain is diffusers' default one (linspace spacing, a last step to x_0).
    ours = sample(model, x_T.shape, schedule=SCHEDULE, num_steps=10, sampler="dpmpp_2m", noise=x_T,
                  clip_denoised=False, progress=False)
    assert [int(t[0]) for t in model.calls[-10:]] == scheduler.timesteps.tolist()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("num_steps", [1, 2, 5, 10, 25])
def test_unipc_matches_diffusers_unipc_scheduler(num_steps):
    """The same chain, x_T and model through diffusers' UniPCMultistepScheduler at its defaults (bh2,
    order 2, predict_x0, lower_order_final, the corrector at every step, final sigma 0): an
    independent implementation of the same steps (fastddpm carries the corrector's part from one
    step to the next instead of the last sample and two x_0s). diffusers keeps alpha_bar in
    float32, fastddpm in float64: measured <= 7e-7 relative over 5-25 steps; allowed 1e-5."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.UniPCMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear")
    scheduler.set_timesteps(num_steps)
    model = RecordingModel(channels=2)
    x_T = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(5))
    expected = x_T.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            expected = scheduler.step(model(expected, t.repeat(3)), t, expected).prev_sample
    ours = sample(model, x_T.shape, schedule=SCHEDULE, num_steps=num_steps, sampler="unipc", noise=x_T,
                  clip_denoised=False, progress=False)
    assert [int(t[0]) for t in model.calls[-num_steps:]] == scheduler.timesteps.tolist()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    if num_steps > 2:  # the corrector changes the samples: without it the chain is DPM-Solver++(2M)'s
        dpm = sample(model, x_T.shape, schedule=SCHEDULE, num_steps=num_steps, sampler="dpmpp_2m", noise=x_T,
                     clip_denoised=False, progress=False)
        assert (dpm - ours).abs().max() > 1e-3 * expected.abs().max()


@pytest.mark.parametrize("num_steps", [1, 3, 10])
def test_dpmpp_2m_sde_with_a_generator_matches_diffusers(num_steps):
    """diffusers' DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++") from the same
    generator: x_T first, then one draw per step. diffusers also draws at the last step, onto x_0,
    where the noise's coefficient is 0 (sample() does not), so the samples are the same.
    measured <= 3e-7 relative; allowed 1e-5."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                                      algorithm_type="sde-dpmsolver++")
    scheduler.set_timesteps(num_steps)
    model = RecordingModel(channels=2)
    generator = torch.Generator().manual_seed(5)
    expected = torch.randn((3, 2, 6, 6), generator=generator)
    with torch.no_grad():
        for t in scheduler.timesteps:
            expected = scheduler.step(model(expected, t.repeat(3)), t, expected, generator=generator).prev_sample
    ours = sample(model, (3, 2, 6, 6), schedule=SCHEDULE, num_steps=num_steps, sampler="dpmpp_2m_sde",
                  generator=torch.Generator().manual_seed(5), clip_denoised=False, progress=False)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_dpmpp_2m_sde_is_seeded_and_recovers_the_data():
    """A seed gives the same samples again (and another seed others); at 100 steps the samples have
    the data's statistics (the bounds of the samplers above)."""
    model = GaussianDataModel(SCHEDULE, DATA_MEAN, DATA_STD)
    run = lambda seed, steps=100: sample(model, (128, 2, 4, 4), schedule=SCHEDULE, num_steps=steps,  # noqa: E731
                                         sampler="dpmpp_2m_sde", clip_denoised=False, seed=seed, progress=False)
    x = run(8)
    assert torch.equal(x, run(8))
    assert not torch.allclose(x, run(9), atol=1e-2)
    mean, std = _channel_stats(x)
    assert torch.allclose(mean, torch.tensor(DATA_MEAN, dtype=torch.float64), atol=0.03)
    assert torch.allclose(std, torch.tensor(DATA_STD, dtype=torch.float64), rtol=0.06)


def test_unipc_recovers_the_data():
    """At 100 steps UniPC's samples have the data's statistics (the bounds of the samplers above),
    and are closer to the probability-flow ODE's solution (1000-step DPM-Solver++) than DDIM's."""
    model = GaussianDataModel(SCHEDULE, DATA_MEAN, DATA_STD)
    run = lambda sampler, steps: sample(model, (128, 2, 4, 4), schedule=SCHEDULE, num_steps=steps,  # noqa: E731
                                        sampler=sampler, clip_denoised=False, seed=8, progress=False)
    x = run("unipc", 100)
    mean, std = _channel_stats(x)
    assert torch.allclose(mean, torch.tensor(DATA_MEAN, dtype=torch.float64), atol=0.03)
    assert torch.allclose(std, torch.tensor(DATA_STD, dtype=torch.float64), rtol=0.06)
    exact = run("dpmpp_2m", 1000)
    assert (x - exact).abs().max() < 0.5 * (run("ddim", 100) - exact).abs().max()


def test_wrong_model_gives_the_wrong_distribution():
    # The check above can fail: a model that believes in another mean moves the samples.
    model = GaussianDataModel(SCHEDULE, (0.6, 0.0), DATA_STD)
    x = sample(model, (128, 2, 4, 4), schedule=SCHEDULE, sampler="ddim", clip_denoised=False, seed=7, progress=False)
    mean, _ = _channel_stats(x)
    assert not torch.allclose(mean, torch.tensor(DATA_MEAN, dtype=torch.float64), atol=0.03)


def test_learned_range_extremes_match_the_fixed_variances():
    # learned_range with v = -1 is the (clipped-log) posterior variance, v = +1 is beta_t.
    schedule = NoiseSchedule.linear(50, beta_start=2e-3, beta_end=0.3)
    shape = (4, 2, 3, 3)
    common = dict(schedule=schedule, clip_denoised=False, seed=11, progress=False)
    fixed = GaussianDataModel(schedule, DATA_MEAN, DATA_STD)
    for value, fixed_type in ((-1.0, "fixed_small"), (1.0, "fixed_large")):
        learned = GaussianDataModel(schedule, DATA_MEAN, DATA_STD, extra_channels=value)
        got = sample(learned, shape, variance_type="learned_range", **{"sampler": "ddpm", **common})
        want = sample(fixed, shape, variance_type=fixed_type, **{"sampler": "ddpm", **common})
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    small = sample(fixed, shape, variance_type="fixed_small", **{"sampler": "ddpm", **common})
    large = sample(fixed, shape, variance_type="fixed_large", **{"sampler": "ddpm", **common})
    assert not torch.allclose(small, large, atol=1e-3)


def test_ddim_ignores_the_variance_channels():
    schedule = NoiseSchedule.linear(50, beta_start=2e-3, beta_end=0.3)
    common = dict(schedule=schedule, sampler="ddim", eta=0.5, seed=3, progress=False)
    learned = GaussianDataModel(schedule, DATA_MEAN, DATA_STD, extra_channels=0.3)
    plain = GaussianDataModel(schedule, DATA_MEAN, DATA_STD)
    got = sample(learned, (3, 2, 2, 2), variance_type="learned", num_steps=10, **{"sampler": "ddpm", **common})
    want = sample(plain, (3, 2, 2, 2), num_steps=10, **{"sampler": "ddpm", **common})
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------
# noise: seeds, the Philox stream contract, generators
# ---------------------------------------------------------------------------------------------
def test_same_seed_same_samples_other_seed_other_samples():
    model = RecordingModel()
    run = lambda seed: sample(model, (2, 1, 4, 4), num_steps=5, seed=seed, progress=False, sampler="ddpm")  # noqa: E731
    first, again, other = run(5), run(5), run(6)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_default_seed_follows_torch_manual_seed():
    model = RecordingModel()
    run = lambda: sample(model, (2, 1, 4, 4), num_steps=4, progress=False, sampler="ddpm")  # noqa: E731
    torch.manual_seed(123)
    first = run()
    torch.manual_seed(123)
    again = run()
    other = run()
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_seed_stream_contract_x_T_at_offset_0_step_k_at_offset_k_plus_1():
    """The documented stream, rebuilt with the reference ops: what the GPU kernel reproduces."""
    model = RecordingModel()
    schedule = SCHEDULE.respace_evenly(4)
    shape, seed = (2, 1, 4, 4), 99
    x = reference.philox_randn(shape, seed, 0)
    with torch.no_grad():
        for k, index in enumerate(reversed(range(4))):
            out = model(x, schedule.timesteps[index].repeat(2))
            x, _ = reference.ddpm_step(out, index, x, schedule, seed=seed, noise_offset=k + 1)
    got = sample(model, shape, num_steps=4, seed=seed, progress=False, sampler="ddpm")
    torch.testing.assert_close(got, x, atol=1e-6, rtol=1e-6)


def test_generator_path_is_reproducible_and_draws_from_the_generator():
    model = RecordingModel()
    run = lambda g: sample(model, (2, 1, 4, 4), num_steps=4, generator=g, progress=False, sampler="ddpm")  # noqa: E731
    first = run(torch.Generator().manual_seed(0))
    again = run(torch.Generator().manual_seed(0))
    other = run(torch.Generator().manual_seed(1))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    # x_T, then one draw per step that adds noise (all but the last), as diffusers draws them.
    generator = torch.Generator().manual_seed(0)
    schedule = SCHEDULE.respace_evenly(4)
    x = torch.randn((2, 1, 4, 4), generator=generator)
    with torch.no_grad():
        for index in reversed(range(4)):
            noise = torch.randn((2, 1, 4, 4), generator=generator) if index > 0 else torch.zeros(2, 1, 4, 4)
            x, _ = reference.ddpm_step(model(x, schedule.timesteps[index].repeat(2)), index, x, schedule, noise=noise)
    torch.testing.assert_close(first, x)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_generator_path_matches_diffusers_pipelines(sampler, tiny_unet):
    """A diffusers UNet2DModel is accepted as is, and a generator reproduces diffusers' pipelines."""
    diffusers = pytest.importorskip("diffusers")
    unet = tiny_unet
    steps = 10
    if sampler == "ddpm":
        pipeline = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=steps))
        extra, ours = {}, {}
    else:
        pipeline = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(num_train_timesteps=steps))
        extra, ours = {"eta": 0.5}, {"eta": 0.5}
    pipeline.set_progress_bar_config(disable=True)
    want = pipeline(batch_size=2, generator=torch.Generator().manual_seed(4), num_inference_steps=steps,
                    output_type="pt", **extra).images
    schedule = NoiseSchedule.linear(steps)
    got = sample(unet, (2, 1, 8, 8), schedule=schedule, sampler=sampler, generator=torch.Generator().manual_seed(4),
                 progress=False, **ours)
    # diffusers' tables are float32, ours float64: rounding differences only.
    torch.testing.assert_close((got / 2 + 0.5).clamp(0, 1), want, atol=2e-5, rtol=1e-4)


def test_diffusers_unet_with_a_seed(tiny_unet):
    x = sample(tiny_unet, (2, 1, 8, 8), num_steps=3, seed=0, progress=False, sampler="ddpm")
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()


# ---------------------------------------------------------------------------------------------
# CPU reference vs the fused kernel (Triton interpreter)
# ---------------------------------------------------------------------------------------------
@requires_triton
@pytest.mark.parametrize("sampler,eta,variance_type,clip", [
    ("ddpm", 0.0, "fixed_small", False),
    ("ddpm", 0.0, "learned_range", True),
    ("ddim", 0.5, "fixed_small", False),
    ("dpmpp_2m", 0.0, "fixed_small", True),
    ("unipc", 0.0, "fixed_small", True),
    ("unipc", 0.0, "learned_range", False),
    ("dpmpp_2m_sde", 0.0, "fixed_small", True),
])
def test_reference_and_kernel_paths_agree(sampler, eta, variance_type, clip):
    learned = variance_type == "learned_range"
    model = RecordingModel(channels=1, out_channels=2 if learned else 1)
    if learned:  # keep the variance channel in learned_range's [-1, 1]
        conv = model.conv
        model.forward = lambda x, t: torch.cat([conv(x)[:, :1], torch.tanh(conv(x)[:, 1:])], dim=1)
    schedule = NoiseSchedule.linear(40, beta_start=1e-3, beta_end=0.2)
    common = dict(schedule=schedule, num_steps=6, sampler=sampler, eta=eta, variance_type=variance_type,
                  clip_denoised=clip, seed=21, progress=False)
    cpu = sample(model, (2, 1, 4, 4), backend="reference", **{"sampler": "ddpm", **common})
    kernel = sample(model, (2, 1, 4, 4), backend="interpret", **{"sampler": "ddpm", **common})
    x_T = reference.philox_randn((2, 1, 4, 4), 21, 0)
    assert not torch.allclose(cpu, x_T, atol=1e-2)  # the chain did something
    torch.testing.assert_close(kernel, cpu, atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------------------------------------
# samplers and respacing
# ---------------------------------------------------------------------------------------------
def test_ddim_eta_zero_is_deterministic_given_x_T():
    model = RecordingModel()
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    run = lambda **kw: sample(model, (2, 1, 4, 4), num_steps=5, sampler="ddim", noise=x_T, progress=False, **kw)  # noqa
    assert torch.equal(run(seed=1), run(seed=2))
    assert torch.equal(run(generator=torch.Generator().manual_seed(1)), run(seed=3))
    assert not torch.allclose(run(seed=1, eta=0.5), run(seed=2, eta=0.5))
    assert torch.equal(x_T, torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)))  # not modified


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("num_steps", [1, 2, 7, None])
def test_model_sees_the_respaced_trained_timesteps(sampler, num_steps):
    schedule = NoiseSchedule.linear(30)
    model = RecordingModel()
    sample(model, (3, 1, 2, 2), schedule=schedule, num_steps=num_steps, sampler=sampler, seed=0, progress=False)
    expected = schedule.respace_evenly(num_steps or 30).timesteps.flip(0)
    seen = torch.stack(model.calls)
    assert seen.dtype == torch.int64 and seen.shape == (len(expected), 3)
    assert torch.equal(seen, expected[:, None].expand(-1, 3))
    assert int(seen[0, 0]) == 29  # every chain starts from the last trained timestep
    if num_steps != 1:
        assert int(seen[-1, 0]) == 0


def test_schedule_by_name_and_by_betas():
    model = RecordingModel()
    betas = torch.linspace(1e-3, 0.2, 20)
    by_betas = sample(model, (1, 1, 2, 2), schedule=betas, seed=0, progress=False, sampler="ddpm")
    by_object = sample(model, (1, 1, 2, 2), schedule=NoiseSchedule(betas), seed=0, progress=False, sampler="ddpm")
    assert torch.equal(by_betas, by_object)
    model.calls.clear()
    sample(model, (1, 1, 2, 2), schedule="cosine", num_steps=3, seed=0, progress=False, sampler="ddpm")
    assert [int(t[0]) for t in model.calls] == [999, 500, 0]


def test_dtype_and_device_defaults_follow_the_model():
    model = RecordingModel().double()
    x = sample(model, (2, 1, 3, 3), num_steps=3, seed=0, progress=False, sampler="ddpm")
    assert x.dtype == torch.float64 and x.device.type == "cpu"
    x32 = sample(model.float(), (2, 1, 3, 3), num_steps=3, seed=0, progress=False, sampler="ddpm")
    torch.testing.assert_close(x.float(), x32, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# hooks
# ---------------------------------------------------------------------------------------------
def test_callback_and_intermediates():
    schedule = NoiseSchedule.linear(20)
    model = RecordingModel()
    seen = []
    final, intermediates = sample(model, (2, 1, 4, 4), schedule=schedule, num_steps=5, seed=0, progress=False,
                                  return_intermediates=True,
                                  callback=lambda step, t, x, pred_x0: seen.append((step, t, x, pred_x0)), sampler="ddpm")
    assert len(intermediates) == 5 and len(seen) == 5
    assert torch.equal(intermediates[-1], final)
    assert [s[0] for s in seen] == [0, 1, 2, 3, 4]
    assert [s[1] for s in seen] == schedule.respace_evenly(5).timesteps.flip(0).tolist()
    for (_, _, x, pred_x0), kept in zip(seen, intermediates):
        assert torch.equal(x, kept)
        assert pred_x0.shape == x.shape and pred_x0.abs().max() <= 1.0
    assert not torch.equal(intermediates[0], intermediates[1])  # copies, not one live buffer
    # The last DDPM step returns the posterior mean at index 0, which is the predicted x_0.
    torch.testing.assert_close(seen[-1][3], final)
    assert sample(model, (2, 1, 4, 4), schedule=schedule, num_steps=5, seed=0, progress=False, sampler="ddpm").equal(final)


def test_progress_bar_on_and_off(capsys):
    sample(RecordingModel(), (1, 1, 2, 2), num_steps=3, seed=0, progress=True, sampler="ddpm")
    assert "/3 [" in capsys.readouterr().err
    sample(RecordingModel(), (1, 1, 2, 2), num_steps=3, seed=0, progress=False, sampler="ddpm")
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------
# bad input: rejected before the model runs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(sampler="euler"), ValueError, "sampler"),
    (dict(num_steps=1001), ValueError, r"num_steps must lie in \[1, 1000\]"),
    (dict(num_steps=0), ValueError, "num_steps"),
    (dict(num_steps=2.5), TypeError, "num_steps"),
    (dict(shape=(4,)), ValueError, "shape"),
    (dict(shape=(2, 0, 4, 4)), ValueError, "shape"),
    (dict(shape="2x1x4x4"), TypeError, "shape"),
    (dict(seed=1, generator=torch.Generator()), ValueError, "seed or generator"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=1.5), ValueError, "seed"),
    (dict(generator=0), TypeError, "generator"),
    (dict(eta=0.5), ValueError, "eta applies to sampler='ddim'"),
    (dict(sampler="dpmpp_2m", eta=0.5), ValueError, "eta applies to sampler='ddim'"),
    (dict(sampler="euler"), ValueError, "sampler must be one of"),
    (dict(sampler="ddim", eta=-1.0), ValueError, "eta"),
    (dict(prediction_type="score"), ValueError, "prediction_type"),
    (dict(variance_type="huge"), ValueError, "variance_type"),
    (dict(clip_range=0.0), ValueError, "clip_range"),
    (dict(noise=torch.zeros(2, 1, 4, 5)), ValueError, "noise"),
    (dict(dtype=torch.int32), TypeError, "dtype"),
    (dict(cuda_graph="sometimes"), ValueError, "cuda_graph"),
    (dict(cuda_graph=True), ValueError, "cuda_graph=True"),
    (dict(backend="fast"), ValueError, "backend"),
    (dict(callback=3), TypeError, "callback"),
    (dict(schedule=3), TypeError, "schedule"),
])
def test_bad_arguments_are_rejected_before_any_model_call(kwargs, error, match):
    if kwargs.get("cuda_graph") is True and torch.cuda.is_available():
        pytest.skip("cuda_graph=True is valid with a GPU")
    model = RecordingModel()
    kwargs = dict(kwargs)
    shape = kwargs.pop("shape", (2, 1, 4, 4))
    with pytest.raises(error, match=match):
        sample(model, shape, progress=False, **{"sampler": "ddpm", **kwargs})
    assert model.calls == []


def test_model_that_is_not_callable():
    with pytest.raises(TypeError, match="callable"):
        sample("unet", (1, 1, 2, 2), progress=False, sampler="ddpm")


def test_model_returning_the_wrong_shape_names_expected_and_got():
    bad = lambda x, t: x[:, :, :2]  # noqa: E731
    with pytest.raises(ValueError, match=r"expected \(2, 1, 4, 4\).*got \(2, 1, 2, 4\)"):
        sample(bad, (2, 1, 4, 4), num_steps=3, seed=0, progress=False, sampler="ddpm")


def test_learned_variance_needs_twice_the_channels():
    with pytest.raises(ValueError, match=r"expected \(2, 2, 4, 4\).*twice.*got \(2, 1, 4, 4\)"):
        sample(RecordingModel(), (2, 1, 4, 4), num_steps=3, seed=0, variance_type="learned_range", progress=False, sampler="ddpm")


def test_model_returning_something_else():
    with pytest.raises(TypeError, match=r"\.sample"):
        sample(lambda x, t: {"sample": x}, (1, 1, 2, 2), num_steps=2, seed=0, progress=False, sampler="ddpm")


def test_lazy_export():
    assert fastddpm.sample is sample


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ---------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.3), ("dpmpp_2m", 0.0), ("dpmpp_2m_sde", 0.0),
                                        ("unipc", 0.0)])
def test_cuda_graph_replay_matches_eager_steps(sampler, eta):
    model = RecordingModel(channels=3).cuda()
    common = dict(num_steps=20, sampler=sampler, eta=eta, seed=5, progress=False)
    eager = sample(model, (4, 3, 8, 8), cuda_graph=False, **{"sampler": "ddpm", **common})
    graphed, intermediates = sample(model, (4, 3, 8, 8), cuda_graph=True, return_intermediates=True, **{"sampler": "ddpm", **common})
    torch.testing.assert_close(graphed, eager)
    assert len(intermediates) == 20 and not torch.equal(intermediates[-2], intermediates[-1])


@requires_cuda
def test_cuda_kernel_path_matches_the_cpu_reference_for_the_same_seed(no_tf32):
    # TF32 off (see conftest.no_tf32); the kernels' noise is the CPU's within a few ulp.
    model = RecordingModel(channels=3)
    common = dict(schedule=NoiseSchedule.linear(100), num_steps=25, seed=17, progress=False, clip_denoised=False)
    cpu = sample(model, (4, 3, 8, 8), device="cpu", **{"sampler": "ddpm", **common})
    gpu = sample(model.cuda(), (4, 3, 8, 8), device="cuda", **{"sampler": "ddpm", **common})
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)


@requires_cuda
def test_cuda_generator_path_with_graph():
    model = RecordingModel(channels=3).cuda()
    run = lambda graph: sample(model, (2, 3, 8, 8), num_steps=10, progress=False, cuda_graph=graph,  # noqa: E731
                               generator=torch.Generator("cuda").manual_seed(0), sampler="ddpm")
    torch.testing.assert_close(run(True), run(False))


class _SyncingModel(RecordingModel):
    def forward(self, x, t):
        scale = 1 + float(t[0].item()) / 1000  # a host read: cannot be captured
        return self.conv(x) * scale


@requires_cuda
def test_uncapturable_model_falls_back_with_a_warning():
    model = _SyncingModel(channels=3).cuda()
    common = dict(num_steps=5, seed=1, progress=False)
    eager = sample(model, (2, 3, 8, 8), cuda_graph=False, **{"sampler": "ddpm", **common})
    stream = torch.cuda.current_stream()
    with pytest.warns(RuntimeWarning, match="CUDA graph"):
        fallback = sample(model, (2, 3, 8, 8), cuda_graph="auto", **{"sampler": "ddpm", **common})
    torch.testing.assert_close(fallback, eager)
    # The failed capture leaves the caller's stream current (not the capture's side stream).
    assert torch.cuda.current_stream() == stream
    torch.cuda.synchronize()  # and the device is usable
    with pytest.raises(RuntimeError, match="cuda_graph=True"):
        sample(model, (2, 3, 8, 8), cuda_graph=True, **{"sampler": "ddpm", **common})
    assert torch.cuda.current_stream() == stream


class _FakeStream:
    def wait_stream(self, other):
        pass


class _FakeGraph:
    """torch.cuda.CUDAGraph on the CPU, with a real graph's semantics: capturing runs nothing (the
    stand-in lets the step run, then puts back every tensor the run holds), and each replay runs
    the captured work again on the same tensors."""

    captures = 0

    def __init__(self):
        self.work = None

    def replay(self):
        self.work()


class _FakeCapture:
    def __init__(self, graph):
        self.graph = graph

    def __enter__(self):
        import sys

        from fastddpm.sampling import _Run

        frame = sys._getframe(1)
        while not isinstance(frame.f_locals.get("run"), _Run):  # the run being captured
            frame = frame.f_back
        self.run = frame.f_locals["run"]
        # every tensor the run holds, those of its dicts (a sampler's buffers) included
        self.saved = [(value, value.clone()) for value in vars(self.run).values() if isinstance(value, torch.Tensor)]
        self.saved += [(value, value.clone()) for held in vars(self.run).values() if isinstance(held, dict)
                       for value in held.values() if isinstance(value, torch.Tensor)]
        return self

    def __exit__(self, *exc_info):
        for tensor, value in self.saved:
            tensor.copy_(value)
        if exc_info[0] is None:
            _FakeGraph.captures += 1
            self.graph.work = self.run.step
        return False


@pytest.fixture
def fake_cuda_graphs(monkeypatch):
    """Runs sample()'s CUDA-graph loop on the CPU with stand-ins for streams and graphs."""
    import contextlib

    import fastddpm.sampling as sampling

    replays = []
    original_replay = _FakeGraph.replay

    def replay(graph):
        replays.append(1)
        original_replay(graph)

    _FakeGraph.captures = 0
    caller_stream = _FakeStream()
    made_current = []
    monkeypatch.setattr(_FakeGraph, "replay", replay)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: caller_stream)
    monkeypatch.setattr(torch.cuda, "set_stream", made_current.append)
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a: _FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", _FakeCapture)
    monkeypatch.setattr(sampling, "_GRAPHS", __import__("weakref").WeakKeyDictionary())

    def run(model, shape, cuda_graph=True, **kwargs):
        arguments = dict(schedule=None, num_steps=None, sampler="ddpm", eta=0.0, prediction_type="epsilon",
                         variance_type="fixed_small", clip_denoised=True, clip_range=1.0, seed=None, generator=None,
                         noise=None, first_index=0, device=None, dtype=None, return_intermediates=False,
                         callback=None, backend=None)
        arguments.update(kwargs)
        plan = sampling._Plan.build(model, shape, progress=False, cuda_graph=False, **arguments)
        plan.use_graph, plan.cuda_graph = True, cuda_graph
        with torch.no_grad():
            return sampling._run(plan)

    run.replays = replays
    run.caller_stream, run.made_current = caller_stream, made_current
    return run


def _reference_loop(model, shape, schedule, *, sampler, eta, seed=None, generator=None):
    """The documented noise contract spelled out with the reference ops (not the runner): x_T at
    stream 0 and step k at stream k + 1 for a seed; x_T, then one draw per noisy step, for a
    generator."""
    spec = StepSpec.build(sampler, eta=eta)
    if generator is not None:
        x = torch.randn(shape, generator=generator)
    else:
        x = reference.philox_randn(shape, seed, 0)
    steps = schedule.num_timesteps
    with torch.no_grad():
        for k, index in enumerate(reversed(range(steps))):
            out = model(x, schedule.timesteps[index].repeat(shape[0]))
            noise = None
            if generator is not None and (sampler == "ddim" or index > 0):
                noise = torch.randn(shape, generator=generator)
            elif generator is not None:
                noise = torch.zeros(shape)
            x, _ = reference.step(spec, out, index, x, schedule, noise=noise, seed=seed, noise_offset=k + 1)
    return x


@pytest.mark.parametrize("noise", ["seed", "generator"])
def test_graph_loop_follows_the_noise_contract_on_cpu_stand_ins(fake_cuda_graphs, noise):
    model = RecordingModel()
    steps, shape = 8, (2, 1, 4, 4)
    random = (lambda: dict(seed=4)) if noise == "seed" else (lambda: dict(generator=torch.Generator().manual_seed(4)))
    seen = []
    graphed, graphed_steps = fake_cuda_graphs(model, shape, num_steps=steps, sampler="ddim", eta=0.7,
                                              return_intermediates=True, callback=lambda *a: seen.append(a),
                                              **random())
    assert len(fake_cuda_graphs.replays) == steps - 3  # three eager warm-up steps, then replays
    assert len(model.calls) == 3 + 1 + (steps - 3)  # warm-up, the capture, the replays
    expected = _reference_loop(model, shape, SCHEDULE.respace_evenly(steps), sampler="ddim", eta=0.7, **random())
    torch.testing.assert_close(graphed, expected, atol=1e-6, rtol=1e-6)
    assert len(graphed_steps) == steps and torch.equal(graphed_steps[-1], graphed)
    assert [s[1] for s in seen] == SCHEDULE.respace_evenly(steps).timesteps.flip(0).tolist()


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_2m_sde", "unipc"])
def test_multistep_samplers_keep_their_state_in_device_buffers_when_graphed(fake_cuda_graphs, sampler):
    """A replayed step reads the previous steps' x_0 (and UniPC's corrector part) from the buffers the
    graph captured: the graphed loop equals the eager one, twice in a row (the kept graph's buffers
    start again from zeros)."""
    model = RecordingModel()
    shape = (2, 1, 4, 4)
    eager = sample(model, shape, num_steps=9, sampler=sampler, seed=6, progress=False)
    for _ in range(2):
        graphed = fake_cuda_graphs(model, shape, num_steps=9, sampler=sampler, seed=6)
        torch.testing.assert_close(graphed, eager, atol=1e-6, rtol=1e-6)


def test_a_second_call_replays_the_kept_graph(fake_cuda_graphs):
    model = RecordingModel()
    shape = (2, 1, 4, 4)
    first = fake_cuda_graphs(model, shape, num_steps=6, seed=1)
    assert _FakeGraph.captures == 1
    second = fake_cuda_graphs(model, shape, num_steps=6, seed=2)  # same shapes: no new capture
    assert _FakeGraph.captures == 1 and len(fake_cuda_graphs.replays) == 3 + 6
    schedule = SCHEDULE.respace_evenly(6)
    torch.testing.assert_close(first, _reference_loop(model, shape, schedule, sampler="ddpm", eta=0.0, seed=1),
                               atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(second, _reference_loop(model, shape, schedule, sampler="ddpm", eta=0.0, seed=2),
                               atol=1e-6, rtol=1e-6)
    assert not torch.equal(first, second)  # the first result is not overwritten by the second call
    fake_cuda_graphs(model, shape, num_steps=5, seed=2)  # another chain: captured anew
    assert _FakeGraph.captures == 2


class _NaNBelowTimestep(RecordingModel):
    """NaN output for trained timesteps below ``threshold``, with device ops only (capturable)."""

    threshold = 180

    def forward(self, x, t):
        poison = torch.where(t < self.threshold, float("nan"), 1.0).to(x.dtype).reshape(-1, 1, 1, 1)
        return super().forward(x, t) * poison


def test_nan_is_recorded_inside_the_replayed_step_on_cpu_stand_ins(fake_cuda_graphs):
    from fastddpm.outputs import NonFiniteError

    # T=200 in 100 steps: step 11 is the first to see a timestep below 180 (179).
    with pytest.raises(NonFiniteError, match=r"first at step 11 of 100 \(model timestep 179\)"):
        fake_cuda_graphs(_NaNBelowTimestep(), (2, 1, 4, 4), schedule=NoiseSchedule.linear(200), num_steps=100, seed=0)
    assert len(fake_cuda_graphs.replays) == 50 - 3  # replays of steps 4..50; the check after step 50 stopped it


class _FailsUnderCapture(RecordingModel):
    capturing = False

    def forward(self, x, t):
        if type(self).capturing:
            raise RuntimeError("operation not permitted when stream is capturing")
        return super().forward(x, t)


def test_graph_capture_failure_falls_back_or_raises(fake_cuda_graphs, monkeypatch):
    class Capture(_FakeCapture):
        def __enter__(self):
            _FailsUnderCapture.capturing = True
            return super().__enter__()

        def __exit__(self, *exc_info):
            _FailsUnderCapture.capturing = False
            return super().__exit__(*exc_info)

    monkeypatch.setattr(torch.cuda, "graph", Capture)
    model = _FailsUnderCapture()
    shape = (2, 1, 4, 4)
    with pytest.warns(RuntimeWarning, match="could not capture"):
        fallback = fake_cuda_graphs(model, shape, cuda_graph="auto", num_steps=6, seed=2)
    expected = _reference_loop(model, shape, SCHEDULE.respace_evenly(6), sampler="ddpm", eta=0.0, seed=2)
    torch.testing.assert_close(fallback, expected, atol=1e-6, rtol=1e-6)
    assert fake_cuda_graphs.replays == []
    # The failed capture puts the caller's stream back (torch.cuda.graph would leave its own).
    assert fake_cuda_graphs.made_current == [fake_cuda_graphs.caller_stream]
    with pytest.raises(RuntimeError, match="cuda_graph=True but capturing"):
        fake_cuda_graphs(model, shape, cuda_graph=True, num_steps=6, seed=2)
    assert fake_cuda_graphs.made_current == [fake_cuda_graphs.caller_stream] * 2


def test_cpu_never_tries_a_graph(monkeypatch):
    def no_graphs(*args, **kwargs):
        raise AssertionError("CUDA graph touched on the CPU")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", no_graphs)
    monkeypatch.setattr(torch.cuda, "Stream", no_graphs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = sample(RecordingModel(), (1, 1, 2, 2), num_steps=3, seed=0, cuda_graph="auto", progress=False, sampler="ddpm")
    assert math.isfinite(float(x.sum()))


def test_the_loop_creates_no_tensor_from_a_python_number_per_step(monkeypatch):
    """What makes a CUDA step block the host: a Python number copied to the device
    (``torch.tensor(3, device=...)`` and friends). The loop's counters live in device tensors, so
    the number of such calls must not grow with the steps (GPU: benchmarks/sync_count.py counts
    the syncs themselves, 0 per step on an H100)."""
    made = []
    for name in ("tensor", "as_tensor", "full", "scalar_tensor"):
        original = getattr(torch, name)

        def counting(*args, _original=original, _name=name, **kwargs):
            made.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, name, counting)
    model = RecordingModel()

    def count(steps, **kwargs):
        made.clear()
        sample(model, (2, 1, 4, 4), num_steps=steps, seed=3, progress=False, backend=KERNEL_BACKEND,
               device=KERNEL_DEVICE, **{"sampler": "ddpm", **kwargs})
        return len(made)

    for kwargs in (dict(), dict(sampler="ddim", eta=0.5), dict(sampler="dpmpp_2m"), dict(sampler="unipc")):
        assert count(4, **kwargs) == count(12, **kwargs), kwargs


def _host_syncs(call) -> int:
    """Synchronising CUDA calls a call makes (torch.cuda.set_sync_debug_mode's warnings)."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("cuda_graph", [False, True])
@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp_2m", "dpmpp_2m_sde", "unipc"])
def test_no_step_synchronises_with_the_host_on_cuda(sampler, cuda_graph):
    """0 host syncs a step, eager and graphed: a 30-step call makes as many as a 10-step one (the
    fixed ones: the NaN record read at the end). Each step count is warmed up first, so that both
    graphed calls replay a kept graph (a first call's capture has fixed syncs of its own)."""
    model = torch.nn.Conv2d(3, 3, 3, padding=1).cuda()

    def run(steps):
        return lambda: sample(model, (4, 3, 16, 16), num_steps=steps, seed=1, progress=False, sampler=sampler,
                              cuda_graph=cuda_graph)

    for steps in (10, 30):
        run(steps)()
    assert _host_syncs(run(30)) == _host_syncs(run(10))
