"""fastddpm.DDPMScheduler / DDIMScheduler against diffusers' schedulers of the same names.

The oracle is diffusers itself: whole sampling loops run through both with generators seeded
alike, over many configurations drawn by hypothesis, and diffusers' own pipelines run with our
schedulers swapped in.
"""
import copy
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, reject, settings
from hypothesis import strategies as st

diffusers = pytest.importorskip("diffusers")

import fastddpm  # noqa: E402
from conftest import KERNEL_BACKEND, KERNEL_DEVICE, requires_triton  # noqa: E402
from fastddpm.schedulers import SchedulerOutput  # noqa: E402

SHAPE = (2, 3, 4, 4)
# Our coefficients are float64 tables rounded once to float32; diffusers accumulates alpha_bar in
# float32. Errors are measured as max |ours - diffusers'| / (1 + max |diffusers'|) per step (see
# scaled_error). Over 2000 random configurations of each loop test below the worst was 2.5e-5
# (DDPM) and 3.1e-5 (DDIM); a wrong coefficient shows up at 1e-2 or more.
TOLERANCE = 1e-4
# Two families are ill-conditioned in float32 for both libraries: the cosine schedule's last beta
# is capped at 0.999, leaving alpha_bar_999 ~ 2e-9 (x_0 from epsilon multiplies rounding by
# 1/sqrt(alpha_bar) ~ 2e4), and at zero terminal SNR DDIM's sqrt(1 - alpha_bar_prev - sigma^2)
# is the square root of a rounding error when eta = 1. Measured worst: 1.1e-4 (DDPM), 2.6e-3 (DDIM).
ILL_CONDITIONED_TOLERANCE = 1e-2
ATOL, RTOL = 1e-4, 1e-4
HYPOTHESIS = dict(deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------
# a fixed random linear "model" and the sampling loop both schedulers run
# ---------------------------------------------------------------------------------------------
class LinearModel:
    """out = M x + b cos(t): deterministic in (x, t), so both loops see the same model; with a
    learned variance it appends a variance in (1e-3, 0.05) or a value in (-1, 1)."""

    def __init__(self, seed: int, variance_type: str = "fixed_small", channels: int = SHAPE[1]):
        g = torch.Generator().manual_seed(seed)
        self.mix = torch.randn(channels, channels, generator=g) * 0.6
        self.bias = torch.randn(channels, 1, 1, generator=g) * 0.5
        self.variance_mix = torch.randn(channels, channels, generator=g)
        self.variance_type = variance_type

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        out = torch.einsum("oc,bchw->bohw", self.mix, x) + self.bias * math.cos(float(t) / 97.0)
        extra = torch.einsum("oc,bchw->bohw", self.variance_mix, x)
        if self.variance_type == "learned":
            out = torch.cat([out, 1e-3 + 0.05 * torch.sigmoid(extra)], dim=1)
        elif self.variance_type == "learned_range":
            out = torch.cat([out, torch.tanh(extra)], dim=1)
        return out


def run_loop(scheduler, model, *, num_steps=None, timesteps=None, seed=0, step_kwargs=None, use_generator=True):
    """Sample from noise drawn with the loop's generator; returns the final sample, every
    predicted x_0, the timesteps, each step's previous_timestep (when the scheduler has it) and
    the generator's state at the end (equal states: the same number of draws)."""
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=timesteps)
    else:
        scheduler.set_timesteps(num_steps)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=generator)
    pred_x0, previous = [], []
    for t in scheduler.timesteps:
        if hasattr(scheduler, "previous_timestep"):
            previous.append(int(scheduler.previous_timestep(t)))
        out = scheduler.step(model(x, t), t, x, generator=generator if use_generator else None,
                             **(step_kwargs or {}))
        x = out.prev_sample
        pred_x0.append(out.pred_original_sample)
    return dict(sample=x, pred_x0=torch.stack(pred_x0), timesteps=scheduler.timesteps.clone(), previous=previous,
                generator_state=generator.get_state())


def scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / (1 + max |expected|), per step (leading dim) for stacked x_0s.

    Scaled by the step's largest value, not element by element: an unclipped x_0 at high t is
    (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar), whose small elements are differences of
    large float32 terms and carry their absolute rounding error."""
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all() and torch.isfinite(expected).all()
    dims = tuple(range(1, expected.ndim))
    scale = 1.0 + expected.abs().amax(dim=dims, keepdim=True)
    return ((actual - expected).abs() / scale).max().item()


def loop_tolerance(config) -> float:
    ill_conditioned = config.get("rescale_betas_zero_snr") or config.get("beta_schedule") == "squaredcos_cap_v2"
    return ILL_CONDITIONED_TOLERANCE if ill_conditioned else TOLERANCE


def assert_loops_match(ours, theirs, tolerance=TOLERANCE, pred_x0_tolerance=None):
    assert torch.equal(ours["timesteps"], theirs["timesteps"])
    assert torch.equal(ours["generator_state"], theirs["generator_state"]), "different number of noise draws"
    assert scaled_error(ours["pred_x0"], theirs["pred_x0"]) <= (pred_x0_tolerance or tolerance)
    assert scaled_error(ours["sample"][None], theirs["sample"][None]) <= tolerance


# ---------------------------------------------------------------------------------------------
# hypothesis strategies
# ---------------------------------------------------------------------------------------------
@st.composite
def schedule_configs(draw, beta_schedules):
    num_train_timesteps = draw(st.sampled_from([20, 100, 1000]))
    config = dict(num_train_timesteps=num_train_timesteps)
    kind = draw(st.sampled_from(beta_schedules + ("trained_betas",)))
    # Large final betas only on short chains: over 1000 steps they drive alpha_bar below 1e-20,
    # where float32 (and 1 - alpha_bar in float64) no longer resolves it.
    large_beta = 0.2 if num_train_timesteps <= 100 else 0.04
    if kind == "trained_betas":
        low = draw(st.sampled_from([1e-4, 1e-3]))
        high = draw(st.sampled_from([0.02, large_beta]))
        wobble = 1.0 + 0.1 * np.sin(np.arange(num_train_timesteps))
        config["trained_betas"] = (np.linspace(low, high, num_train_timesteps) * wobble).tolist()
    else:
        config["beta_schedule"] = kind
        if kind == "scaled_linear":
            config.update(beta_start=0.00085, beta_end=0.012)
        elif kind != "squaredcos_cap_v2":
            config.update(beta_start=draw(st.sampled_from([1e-4, 1e-3])),
                          beta_end=draw(st.sampled_from([0.02, large_beta / 2])))
    config["rescale_betas_zero_snr"] = draw(st.booleans())
    # At zero terminal SNR an epsilon prediction cannot give x_0 (both libraries divide by 0).
    config["prediction_type"] = draw(st.sampled_from(
        ["sample", "v_prediction"] if config["rescale_betas_zero_snr"] else ["epsilon", "sample", "v_prediction"]))
    config["clip_sample"] = draw(st.booleans())
    config["clip_sample_range"] = draw(st.sampled_from([1.0, 1.5]))
    config["thresholding"] = draw(st.booleans())
    if config["thresholding"]:
        config["dynamic_thresholding_ratio"] = draw(st.sampled_from([0.9, 0.995]))
        config["sample_max_value"] = draw(st.sampled_from([1.0, 1.5, 3.0]))
    config["timestep_spacing"] = draw(st.sampled_from(["leading", "trailing", "linspace"]))
    config["steps_offset"] = draw(st.sampled_from([0, 0, 1, 3])) if config["timestep_spacing"] == "leading" else 0
    return config


def leading_offset_fits(config, num_steps):
    """diffusers itself fails when steps_offset pushes a leading timestep past T - 1."""
    total = config["num_train_timesteps"]
    last = (num_steps - 1) * (total // num_steps) + config["steps_offset"]
    return config["timestep_spacing"] != "leading" or last < total


# ---------------------------------------------------------------------------------------------
# whole loops against diffusers
# ---------------------------------------------------------------------------------------------
@settings(max_examples=200, **HYPOTHESIS)
@given(data=st.data())
def test_ddpm_sampling_loop_matches_diffusers(data):
    config = data.draw(schedule_configs(("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")))
    config["variance_type"] = data.draw(st.sampled_from(
        ["fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"]))
    total = config["num_train_timesteps"]
    loop_args = {}
    if data.draw(st.booleans()):
        loop_args["num_steps"] = data.draw(st.integers(1, 8))
        assume(leading_offset_fits(config, loop_args["num_steps"]))
    else:
        chosen = data.draw(st.sets(st.integers(0, total - 1), min_size=1, max_size=6))
        loop_args["timesteps"] = sorted(chosen, reverse=True)
    model = LinearModel(data.draw(st.integers(0, 3)), config["variance_type"])
    seed = data.draw(st.integers(0, 2**16))

    theirs = run_loop(diffusers.DDPMScheduler(**config), model, seed=seed, **loop_args)
    ours = run_loop(fastddpm.DDPMScheduler(**config), model, seed=seed, **loop_args)
    assert_loops_match(ours, theirs, loop_tolerance(config))
    assert ours["previous"] == theirs["previous"]


@settings(max_examples=200, **HYPOTHESIS)
@given(data=st.data())
def test_ddim_sampling_loop_matches_diffusers(data):
    # diffusers' DDIMScheduler has no sigmoid schedule.
    config = data.draw(schedule_configs(("linear", "scaled_linear", "squaredcos_cap_v2")))
    config["set_alpha_to_one"] = data.draw(st.booleans())
    num_steps = data.draw(st.integers(1, 8))
    assume(leading_offset_fits(config, num_steps))
    step_kwargs = dict(eta=data.draw(st.sampled_from([0.0, 0.3, 1.0])),
                       use_clipped_model_output=data.draw(st.booleans()))
    model = LinearModel(data.draw(st.integers(0, 3)))
    seed = data.draw(st.integers(0, 2**16))

    theirs = run_loop(diffusers.DDIMScheduler(**config), model, num_steps=num_steps, seed=seed, step_kwargs=step_kwargs)
    ours = run_loop(fastddpm.DDIMScheduler(**config), model, num_steps=num_steps, seed=seed, step_kwargs=step_kwargs)
    if not torch.isfinite(theirs["sample"]).all():
        # With eta=1 and alpha_bar_t ~ 0 (zero terminal SNR, or the capped last cosine beta),
        # 1 - alpha_bar_prev - sigma^2 is ~0 and diffusers' float32 rounding can make it negative:
        # its square root is NaN. The op clamps it at 0.
        assert step_kwargs["eta"] == 1.0
        assert torch.isfinite(ours["sample"]).all()
        reject()
    assert_loops_match(ours, theirs, loop_tolerance(config))


def test_full_length_ddpm_chain_matches_diffusers():
    # All 1000 steps of the default config: the final samples differ by 1.9e-5 (measured); x_0
    # predicted at high t multiplies the trajectories' difference by up to 1/sqrt(alpha_bar_999)
    # ~ 160 (measured 2.1e-4), hence its looser bound.
    model = LinearModel(0)
    theirs = run_loop(diffusers.DDPMScheduler(), model, num_steps=1000)
    ours = run_loop(fastddpm.DDPMScheduler(), model, num_steps=1000)
    assert_loops_match(ours, theirs, pred_x0_tolerance=2e-3)


@pytest.mark.parametrize("return_dict", [True, False])
def test_ddim_variance_noise_and_list_of_generators(return_dict):
    config = dict(num_train_timesteps=100, set_alpha_to_one=False, steps_offset=1)
    ours, theirs = fastddpm.DDIMScheduler(**config), diffusers.DDIMScheduler(**config)
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(4)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    model = LinearModel(1)
    t = ours.timesteps[1]
    given_noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    results = []
    for scheduler in (ours, theirs):
        by_noise = scheduler.step(model(x, t), t, x, eta=0.7, variance_noise=given_noise, return_dict=return_dict)
        generators = [torch.Generator().manual_seed(i) for i in range(SHAPE[0])]
        by_list = scheduler.step(model(x, t), t, x, eta=0.7, generator=generators, return_dict=return_dict)
        results.append((by_noise, by_list, [g.get_state() for g in generators]))
    (ours_noise, ours_list, ours_states), (their_noise, their_list, their_states) = results
    if return_dict:
        assert isinstance(ours_noise, SchedulerOutput)
        ours_noise, ours_list = ours_noise.to_tuple(), ours_list.to_tuple()
        their_noise, their_list = their_noise.to_tuple(), their_list.to_tuple()
    else:
        assert isinstance(ours_noise, tuple) and len(ours_noise) == 2
    for mine, reference in zip(ours_noise + ours_list, their_noise + their_list):
        torch.testing.assert_close(mine, reference, atol=ATOL, rtol=RTOL)
    assert all(torch.equal(a, b) for a, b in zip(ours_states, their_states))


def test_step_output_indexing():
    scheduler = fastddpm.DDPMScheduler(num_train_timesteps=10)
    x = torch.randn(SHAPE)
    out = scheduler.step(torch.randn(SHAPE), 5, x, generator=torch.Generator().manual_seed(0))
    assert out[0] is out.prev_sample is out["prev_sample"]
    assert out[1] is out.pred_original_sample
    assert out.to_tuple() == (out.prev_sample, out.pred_original_sample)


def test_a_generator_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run_loop(fastddpm.DDPMScheduler(num_train_timesteps=50), LinearModel(0), num_steps=5)
    run_loop(fastddpm.DDIMScheduler(num_train_timesteps=50), LinearModel(0), num_steps=5, step_kwargs=dict(eta=1.0))
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------------------------------------
# inside diffusers' pipelines
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_unets():
    def build(out_channels):
        torch.manual_seed(0)
        unet = diffusers.UNet2DModel(
            sample_size=8, in_channels=3, out_channels=out_channels, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=4)
        return unet.eval()

    return {3: build(3), 6: build(6)}


def run_pipeline(pipeline, **kwargs):
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipeline(batch_size=2, generator=generator, output_type="np", **kwargs).images


@pytest.mark.parametrize("config, out_channels, steps", [
    (dict(), 3, 4),
    (dict(variance_type="learned_range", timestep_spacing="trailing", prediction_type="v_prediction"), 6, 3),
])
def test_ddpm_pipeline_with_fastddpm_scheduler_matches_diffusers(tiny_unets, config, out_channels, steps):
    unet = tiny_unets[out_channels]
    expected = run_pipeline(diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**config)),
                            num_inference_steps=steps)
    pipeline = diffusers.DDPMPipeline(unet=unet, scheduler=fastddpm.DDPMScheduler(**config))
    images = run_pipeline(pipeline, num_inference_steps=steps)
    assert isinstance(pipeline.scheduler, fastddpm.DDPMScheduler)
    assert images.shape == expected.shape == (2, 8, 8, 3)
    # measured: max |difference| <= 2e-6 on images in [0, 1]
    np.testing.assert_allclose(images, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_pipeline_with_fastddpm_scheduler_matches_diffusers(tiny_unets, eta):
    unet = tiny_unets[3]
    config = dict(set_alpha_to_one=False, steps_offset=1)
    expected = run_pipeline(diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(**config)),
                            num_inference_steps=4, eta=eta)
    pipeline = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(**config))
    # DDIMPipeline rebuilds whatever scheduler it gets as diffusers' DDIMScheduler; swap ours in after.
    pipeline.scheduler = fastddpm.DDIMScheduler.from_config(pipeline.scheduler.config)
    assert isinstance(pipeline.scheduler, fastddpm.DDIMScheduler)
    images = run_pipeline(pipeline, num_inference_steps=4, eta=eta)
    # measured: max |difference| <= 2e-6
    np.testing.assert_allclose(images, expected, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# without a generator: in-kernel Philox noise
# ---------------------------------------------------------------------------------------------
def generator_free_loop(scheduler_factory, seed, step_kwargs=None, device="cpu"):
    torch.manual_seed(seed)
    scheduler = scheduler_factory()
    scheduler.set_timesteps(6)
    x = torch.randn(SHAPE).to(device)
    model = LinearModel(0, getattr(scheduler, "variance_type", "fixed_small"))
    for t in scheduler.timesteps:
        x = scheduler.step(model(x.cpu(), t).to(device), t, x, **(step_kwargs or {})).prev_sample
    return x.cpu()


GENERATOR_FREE_CASES = [
    # trailing spacing ends on t > 0: diffusers adds noise on that last step too
    (lambda: fastddpm.DDPMScheduler(num_train_timesteps=100, timestep_spacing="trailing",
                                    variance_type="learned_range"), None),
    (lambda: fastddpm.DDIMScheduler(num_train_timesteps=100), dict(eta=0.5)),
]


@pytest.mark.parametrize("factory, step_kwargs", GENERATOR_FREE_CASES)
def test_generator_free_sampling_is_reproducible_after_manual_seed(factory, step_kwargs):
    first = generator_free_loop(factory, 0, step_kwargs)
    again = generator_free_loop(factory, 0, step_kwargs)
    other = generator_free_loop(factory, 1, step_kwargs)
    assert torch.isfinite(first).all()
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 0.1


def test_generator_free_steps_use_fresh_standard_normal_noise():
    # An x_0 prediction of 0 at x_t = 0 makes the posterior mean 0: each step returns std_t * z_t.
    torch.manual_seed(0)
    scheduler = fastddpm.DDPMScheduler(num_train_timesteps=10, variance_type="fixed_large", prediction_type="sample")
    scheduler.set_timesteps(10)
    zeros = torch.zeros(8, 3, 16, 16)
    draws = []
    for t in scheduler.timesteps[:-1]:  # the last step (t = 0) adds no noise
        prev = scheduler.step(zeros, t, zeros).prev_sample
        draws.append((prev / scheduler.betas[t].sqrt()).flatten())
    draws = torch.stack(draws)
    assert draws.mean(dim=1).abs().max() < 0.1
    assert (draws.std(dim=1) - 1).abs().max() < 0.1
    correlation = torch.corrcoef(draws) - torch.eye(len(draws))
    assert correlation.abs().max() < 0.1, "two steps reused a noise stream"


@requires_triton
@pytest.mark.parametrize("factory, step_kwargs", GENERATOR_FREE_CASES)
def test_generator_free_noise_is_the_same_through_the_kernel(monkeypatch, factory, step_kwargs):
    # The kernel draws the Philox stream the reference draws: same seed, same samples.
    monkeypatch.setenv("FASTDDPM_BACKEND", "reference")
    expected = generator_free_loop(factory, 3, step_kwargs)
    monkeypatch.setenv("FASTDDPM_BACKEND", KERNEL_BACKEND)
    through_kernel = generator_free_loop(factory, 3, step_kwargs, device=KERNEL_DEVICE)
    torch.testing.assert_close(through_kernel, expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# the rest of diffusers' interface
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("config", [
    dict(),
    dict(num_train_timesteps=500, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
         prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True),
])
def test_config_matches_diffusers_and_round_trips(name, config, tmp_path):
    ours, theirs = getattr(fastddpm, name)(**config), getattr(diffusers, name)(**config)
    shared = [key for key in theirs.config if not key.startswith("_")]
    assert {key: ours.config[key] for key in shared} == {key: theirs.config[key] for key in shared}
    assert ours.config.num_train_timesteps == theirs.config.num_train_timesteps
    assert (len(ours), ours.order, ours.init_noise_sigma) == (len(theirs), theirs.order, theirs.init_noise_sigma)
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, atol=2e-6, rtol=1e-5)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    with pytest.raises(TypeError):
        ours.config["prediction_type"] = "sample"
    assert copy.deepcopy(ours.config) == ours.config

    # configs cross in both directions, and through files each library wrote
    assert getattr(fastddpm, name).from_config(theirs.config).config == ours.config
    crossed = getattr(diffusers, name).from_config(ours.config)
    assert {key: crossed.config[key] for key in shared} == {key: theirs.config[key] for key in shared}
    ours.save_config(tmp_path / "ours")
    theirs.save_config(tmp_path / "theirs")
    assert getattr(fastddpm, name).from_pretrained(tmp_path / "ours").config == ours.config
    assert getattr(fastddpm, name).from_pretrained(tmp_path / "theirs").config == ours.config
    loaded = getattr(diffusers, name).from_pretrained(tmp_path / "ours")
    assert {key: loaded.config[key] for key in shared} == {key: theirs.config[key] for key in shared}


def test_from_config_overrides_and_ignores_the_other_schedulers_keys():
    ddpm = fastddpm.DDPMScheduler(variance_type="fixed_large", prediction_type="sample")
    ddim = fastddpm.DDIMScheduler.from_config(ddpm.config, prediction_type="v_prediction")
    assert ddim.config.prediction_type == "v_prediction"
    assert "variance_type" not in ddim.config
    with pytest.raises(TypeError, match="no_such_argument"):
        fastddpm.DDIMScheduler.from_config(ddpm.config, no_such_argument=1)
    trained = fastddpm.DDPMScheduler(num_train_timesteps=4, trained_betas=np.array([0.1, 0.2, 0.3, 0.4]))
    assert json.loads(json.dumps(trained.config))["trained_betas"] == pytest.approx([0.1, 0.2, 0.3, 0.4])


@pytest.mark.parametrize("batch_timesteps", [True, False])
def test_add_noise_and_get_velocity_match_diffusers(batch_timesteps):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    timesteps = torch.tensor([0, 999]) if batch_timesteps else torch.tensor(500)
    for name in ("DDPMScheduler", "DDIMScheduler"):
        ours, theirs = getattr(fastddpm, name)(), getattr(diffusers, name)()
        torch.testing.assert_close(ours.add_noise(x0, noise, timesteps), theirs.add_noise(x0, noise, timesteps),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.get_velocity(x0, noise, timesteps),
                                   theirs.get_velocity(x0, noise, timesteps), atol=1e-5, rtol=1e-5)
    assert torch.equal(ours.scale_model_input(x0, 3), x0)


def test_ddim_steps_from_a_timestep_off_its_schedule_like_diffusers():
    ours, theirs = fastddpm.DDIMScheduler(set_alpha_to_one=False), diffusers.DDIMScheduler(set_alpha_to_one=False)
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(10)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    model = LinearModel(2)
    for t in (37, 99, 640):  # not among the timesteps; the step lands on t - 100
        expected = theirs.step(model(x, t), t, x, eta=1.0, generator=torch.Generator().manual_seed(t))
        got = ours.step(model(x, t), t, x, eta=1.0, generator=torch.Generator().manual_seed(t))
        torch.testing.assert_close(got.prev_sample, expected.prev_sample, atol=ATOL, rtol=RTOL)


def test_ddim_custom_timesteps_land_on_the_next_listed_timestep():
    # With leading spacing the spaced steps land on the next listed timestep, so listing them
    # explicitly must not change the loop.
    config = dict(num_train_timesteps=100, set_alpha_to_one=False)
    spaced = run_loop(fastddpm.DDIMScheduler(**config), LinearModel(0), num_steps=5, step_kwargs=dict(eta=0.5))
    listed = run_loop(fastddpm.DDIMScheduler(**config), LinearModel(0), timesteps=[80, 60, 40, 20, 0],
                      step_kwargs=dict(eta=0.5))
    assert torch.equal(spaced["timesteps"], listed["timesteps"])
    torch.testing.assert_close(listed["sample"], spaced["sample"])


# ---------------------------------------------------------------------------------------------
# what fastddpm does not support, and bad arguments
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [
    lambda: fastddpm.DDPMScheduler(variance_type="fixed_large_log"),
    lambda: fastddpm.DDPMScheduler(beta_schedule="laplace"),
    lambda: fastddpm.DDIMScheduler.from_pretrained("google/ddpm-cifar10-32"),
    lambda: fastddpm.DDPMScheduler().save_config("unused", push_to_hub=True),
])
def test_what_diffusers_accepts_but_fastddpm_does_not_raises_not_implemented(build):
    with pytest.raises(NotImplementedError):
        build()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(prediction_type="x0"), ValueError, "prediction_type"),
    (dict(variance_type="fixed"), ValueError, "variance_type"),
    (dict(beta_schedule="cosine"), ValueError, "beta_schedule"),
    (dict(timestep_spacing="even"), ValueError, "timestep_spacing"),
    (dict(num_train_timesteps=0), ValueError, "num_train_timesteps"),
    (dict(beta_end=0.0), ValueError, "beta_end"),
    (dict(steps_offset=-1), ValueError, "steps_offset"),
    (dict(clip_sample_range=0.0), ValueError, "clip_sample_range"),
    (dict(dynamic_thresholding_ratio=1.5), ValueError, "dynamic_thresholding_ratio"),
    (dict(clip_sample="yes"), TypeError, "clip_sample"),
    (dict(num_train_timesteps=3, trained_betas=[0.1, 0.2]), ValueError, "trained_betas"),
    (dict(num_train_timesteps=2, trained_betas=[0.1, 1.5]), ValueError, "betas"),
])
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastddpm.DDPMScheduler(**kwargs)


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("kwargs, match", [
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(num_inference_steps=101), "num_inference_steps"),
    (dict(num_inference_steps=5, timesteps=[3, 2]), "not both"),
    (dict(), "num_inference_steps or timesteps"),
    (dict(timesteps=[2, 5]), "descending"),
    (dict(timesteps=[100, 5]), "lie in"),
    (dict(timesteps=[5, -1]), "lie in"),
])
def test_bad_set_timesteps_arguments(name, kwargs, match):
    scheduler = getattr(fastddpm, name)(num_train_timesteps=100)
    with pytest.raises(ValueError, match=match):
        scheduler.set_timesteps(**kwargs)


def test_steps_offset_past_the_chain_is_refused_at_set_timesteps():
    scheduler = fastddpm.DDPMScheduler(num_train_timesteps=10, steps_offset=1)
    with pytest.raises(ValueError, match="steps_offset"):
        scheduler.set_timesteps(10)  # would ask for trained timestep 10


def test_bad_step_arguments_fail_before_drawing_noise():
    x = torch.randn(SHAPE)
    ddpm = fastddpm.DDPMScheduler(num_train_timesteps=100)
    ddpm.set_timesteps(4)
    learned = fastddpm.DDPMScheduler(num_train_timesteps=100, variance_type="learned")
    ddim = fastddpm.DDIMScheduler(num_train_timesteps=100)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    cases = [
        (lambda: ddpm.step(torch.randn(2, 3, 4, 5), 75, x, generator=generator), ValueError, "model_output"),
        (lambda: learned.step(torch.randn(SHAPE), 75, x, generator=generator), ValueError, "model_output"),
        (lambda: ddpm.step(torch.randn(SHAPE), 74, x, generator=generator), ValueError, "not one of"),
        (lambda: ddpm.step(torch.randn(SHAPE), torch.tensor([75, 50]), x, generator=generator), ValueError,
         "single integer"),
        (lambda: ddpm.step(torch.randn(SHAPE), 75, x, generator=1234), TypeError, "generator"),
        (lambda: ddpm.step(torch.randn(SHAPE).numpy(), 75, x, generator=generator), TypeError, "model_output"),
        (lambda: ddim.step(torch.randn(SHAPE), 75, x, generator=generator), ValueError, "set_timesteps"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
    ddim.set_timesteps(4)
    for kwargs, match in ((dict(eta=-0.5, generator=generator), "eta"),
                          (dict(eta=0.5, generator=generator, variance_noise=torch.randn(SHAPE)), "not both"),
                          (dict(eta=0.5, variance_noise=torch.randn(2, 3)), "variance_noise")):
        with pytest.raises(ValueError, match=match):
            ddim.step(torch.randn(SHAPE), 75, x, **kwargs)
    assert torch.equal(generator.get_state(), state), "a failing step consumed the generator"
