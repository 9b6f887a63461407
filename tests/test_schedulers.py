"""fastddpm.DDPMScheduler / DDIMScheduler: subclasses of diffusers' schedulers whose step and
add_noise run fastddpm's ops.

The oracle is diffusers itself: whole sampling loops run through both with generators seeded
alike, over many configurations drawn by hypothesis, and diffusers' own pipelines run with our
schedulers in them. The other tests pin what the subclass adds: which settings take the fused op,
the stricter argument checks, the in-kernel noise, and that a step reads nothing back from a device.
"""
import contextlib
import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, reject, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

diffusers = pytest.importorskip("diffusers")

import fastddpm  # noqa: E402
from conftest import KERNEL_BACKEND, KERNEL_DEVICE, requires_cuda, requires_triton  # noqa: E402
from fastddpm import schedulers  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # tiny tensors: a second thread only contends

SHAPE = (2, 3, 4, 4)
# Errors are max |ours - diffusers'| / (1 + max |diffusers'|) per step (see scaled_error). Both
# schedulers step from the same float32 alpha_bar with the same float32 coefficients; what is left
# is the kernels' rounding (they multiply by 1/sqrt(alpha_bar) where diffusers divides by
# sqrt(alpha_bar)), amplified where x_0 is (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) with
# alpha_bar ~ 2e-9 (the cosine schedule's last step). Measured over 4000 random configurations of
# each loop test below (zero-SNR, epsilon at zero SNR and cosine schedules included): worst 6.3e-6
# (DDPM) and 1.8e-6 (DDIM); 1.3e-5 in an earlier draw. A wrong coefficient shows up at 1e-2 or more.
TOLERANCE = 5e-5
ATOL, RTOL = 1e-5, 1e-5
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
        out = torch.einsum("oc,bchw->bohw", self.mix.to(x.device), x) + self.bias.to(x.device) * math.cos(float(t) / 97.0)
        extra = torch.einsum("oc,bchw->bohw", self.variance_mix.to(x.device), x)
        if self.variance_type == "learned":
            out = torch.cat([out, 1e-3 + 0.05 * torch.sigmoid(extra)], dim=1)
        elif self.variance_type == "learned_range":
            out = torch.cat([out, torch.tanh(extra)], dim=1)
        return out


def run_loop(scheduler, model, *, num_steps=None, timesteps=None, seed=0, step_kwargs=None, use_generator=True,
             device="cpu"):
    """Sample from noise drawn with the loop's generator (a CPU generator, whose draws are moved
    to ``device`` as diffusers' ``randn_tensor`` moves them); returns the final sample, every
    predicted x_0, the timesteps, each step's previous_timestep (when the scheduler has it) and
    the generator's state at the end (equal states: the same number of draws)."""
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=timesteps)
    else:
        scheduler.set_timesteps(num_steps)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=generator).to(device)
    pred_x0, previous = [], []
    for t in scheduler.timesteps:
        if hasattr(scheduler, "previous_timestep"):
            previous.append(int(scheduler.previous_timestep(t)))
        out = scheduler.step(model(x, t), t, x, generator=generator if use_generator else None,
                             **(step_kwargs or {}))
        x = out.prev_sample
        pred_x0.append(out.pred_original_sample)
    return dict(sample=x.cpu(), pred_x0=torch.stack(pred_x0).cpu(), timesteps=scheduler.timesteps.cpu().clone(),
                previous=previous, generator_state=generator.get_state())


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
    # where float32 no longer resolves it.
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
    config["clip_sample"] = draw(st.booleans())
    config["clip_sample_range"] = draw(st.sampled_from([1.0, 1.5]))
    # thresholding runs diffusers' own step: drawn a quarter of the time, so that most examples
    # compare the fused path (FUSED_SHARE, held below)
    config["thresholding"] = draw(st.sampled_from([False, False, False, True]))
    if config["thresholding"]:
        config["dynamic_thresholding_ratio"] = draw(st.sampled_from([0.9, 0.995]))
        config["sample_max_value"] = draw(st.sampled_from([1.0, 1.5, 3.0]))
    # At zero terminal SNR the x_0 of an epsilon prediction at the last timestep is finite only
    # clipped (diffusers divides by 0 and clips the infinities; so do we, in effect).
    finite_epsilon = not config["rescale_betas_zero_snr"] or (config["clip_sample"] and not config["thresholding"])
    config["prediction_type"] = draw(st.sampled_from(
        ["epsilon", "sample", "v_prediction"] if finite_epsilon else ["sample", "v_prediction"]))
    config["timestep_spacing"] = draw(st.sampled_from(["leading", "trailing", "linspace"]))
    config["steps_offset"] = draw(st.sampled_from([0, 0, 1, 3])) if config["timestep_spacing"] == "leading" else 0
    return config


def leading_offset_fits(config, num_steps):
    """steps_offset must not push a leading timestep past T - 1 (diffusers then fails in step)."""
    total = config["num_train_timesteps"]
    last = (num_steps - 1) * (total // num_steps) + config["steps_offset"]
    return config["timestep_spacing"] != "leading" or last < total


# ---------------------------------------------------------------------------------------------
# whole loops against diffusers
# ---------------------------------------------------------------------------------------------
# Which path each example of the loop tests took: (test, fused op calls > 0). An example whose
# settings run diffusers' own step compares diffusers with itself; at least FUSED_SHARE of them must
# take the fused path, or the tests say little (measured over 200 examples: 0.56 DDPM, 0.54 DDIM;
# about 0.4 before thresholding was drawn a quarter of the time).
PATHS_TAKEN = []
FUSED_SHARE = 0.45


@contextlib.contextmanager
def fused_calls():
    """Counts the fused step ops the schedulers call (fastddpm.ops.ddpm_step / ddim_step)."""
    calls = []
    originals = {name: getattr(fastddpm.ops, name) for name in ("ddpm_step", "ddim_step")}

    def counting(real):
        def op(*args, **kwargs):
            calls.append(real.__name__)
            return real(*args, **kwargs)
        return op

    for name, real in originals.items():
        setattr(fastddpm.ops, name, counting(real))
    try:
        yield calls
    finally:
        for name, real in originals.items():
            setattr(fastddpm.ops, name, real)


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
    with fused_calls() as calls:
        ours = run_loop(fastddpm.DDPMScheduler(**config), model, seed=seed, **loop_args)
    PATHS_TAKEN.append(("ddpm", bool(calls)))
    assert_loops_match(ours, theirs)
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
    with fused_calls() as calls:
        ours = run_loop(fastddpm.DDIMScheduler(**config), model, num_steps=num_steps, seed=seed,
                        step_kwargs=step_kwargs)
    PATHS_TAKEN.append(("ddim", bool(calls)))
    if not torch.isfinite(theirs["sample"]).all():
        # With eta=1 and alpha_bar_t ~ 0 (zero terminal SNR, or the capped last cosine beta),
        # 1 - alpha_bar_prev - sigma^2 is ~0 and diffusers' float32 rounding can make it negative:
        # its square root is NaN. The op clamps it at 0 (diffusers' own step, where we run it, does not).
        assert step_kwargs["eta"] == 1.0
        fused = not config["thresholding"] and not (step_kwargs["use_clipped_model_output"] and config["clip_sample"])
        assert torch.isfinite(ours["sample"]).all() or not fused
        reject()
    assert_loops_match(ours, theirs)


def test_most_loop_examples_compared_the_fused_path():
    """After the two loop tests (pytest runs a file's tests in order): the share of their examples
    that ran the fused op, per scheduler."""
    for name in ("ddpm", "ddim"):
        taken = [fused for test, fused in PATHS_TAKEN if test == name]
        if len(taken) < 50:
            pytest.skip(f"the {name} loop test did not run here (selected out, or on another xdist worker)")
        share = sum(taken) / len(taken)
        assert share >= FUSED_SHARE, f"{name}: only {share:.0%} of {len(taken)} examples ran the fused step"


def test_full_length_ddpm_chain_matches_diffusers():
    # All 1000 steps of the default config (measured: 3.3e-7 on the final sample, 1.1e-5 on the
    # x_0 predictions, where 1/sqrt(alpha_bar_999) ~ 160 amplifies the trajectories' difference).
    model = LinearModel(0)
    theirs = run_loop(diffusers.DDPMScheduler(), model, num_steps=1000)
    ours = run_loop(fastddpm.DDPMScheduler(), model, num_steps=1000)
    assert_loops_match(ours, theirs, pred_x0_tolerance=1e-4)


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
        assert isinstance(ours_noise, diffusers.schedulers.scheduling_ddim.DDIMSchedulerOutput)
        ours_noise, ours_list = ours_noise.to_tuple(), ours_list.to_tuple()
        their_noise, their_list = their_noise.to_tuple(), their_list.to_tuple()
    else:
        assert isinstance(ours_noise, tuple) and len(ours_noise) == 2
    for mine, reference in zip(ours_noise + ours_list, their_noise + their_list):
        torch.testing.assert_close(mine, reference, atol=ATOL, rtol=RTOL)
    assert all(torch.equal(a, b) for a, b in zip(ours_states, their_states))


def test_step_output_is_diffusers_dict_like_output():
    scheduler = fastddpm.DDPMScheduler(num_train_timesteps=10)
    x = torch.randn(SHAPE)
    out = scheduler.step(torch.randn(SHAPE), 5, x, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, diffusers.schedulers.scheduling_ddpm.DDPMSchedulerOutput)
    assert out[0] is out.prev_sample is out["prev_sample"]
    assert out[1] is out.pred_original_sample
    assert list(out.keys()) == ["prev_sample", "pred_original_sample"]
    assert out.to_tuple() == (out.prev_sample, out.pred_original_sample)


def test_a_generator_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run_loop(fastddpm.DDPMScheduler(num_train_timesteps=50), LinearModel(0), num_steps=5)
    run_loop(fastddpm.DDIMScheduler(num_train_timesteps=50), LinearModel(0), num_steps=5, step_kwargs=dict(eta=1.0))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_zero_snr_step_at_the_last_timestep_is_finite_where_diffusers_is(name, prediction_type):
    # alpha_bar_999 = 0: diffusers' x_0 of an epsilon prediction is (x - eps) / 0 = +-inf, clipped
    # to +-1. Ours must give the same clipped x_0 and step, not inf - inf = NaN.
    config = dict(rescale_betas_zero_snr=True, prediction_type=prediction_type)
    ours, theirs = getattr(fastddpm, name)(**config), getattr(diffusers, name)(**config)
    for scheduler in (ours, theirs):
        if name == "DDPMScheduler":
            scheduler.set_timesteps(timesteps=[999, 500, 0])
        else:
            scheduler.set_timesteps(10)  # the step from 999 lands on 899
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = 999
    assert theirs.alphas_cumprod[999].item() == 0.0
    expected = theirs.step(eps, t, x, generator=torch.Generator().manual_seed(1))
    got = ours.step(eps, t, x, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(expected.prev_sample).all() and torch.isfinite(expected.pred_original_sample).all()
    torch.testing.assert_close(got.pred_original_sample, expected.pred_original_sample, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got.prev_sample, expected.prev_sample, atol=ATOL, rtol=RTOL)
    if prediction_type == "epsilon":
        # x_0 is the sign of x - eps, clipped: every element at +-1
        assert torch.equal(got.pred_original_sample.abs(), torch.ones_like(x))


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


def public(config) -> dict:
    return {key: value for key, value in config.items() if not key.startswith("_")}


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
    # measured: max |difference| <= 6.6e-7 on images in [0, 1]
    np.testing.assert_allclose(images, expected, atol=1e-5, rtol=0)


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
    np.testing.assert_allclose(images, expected, atol=1e-5, rtol=0)  # measured: <= 1.4e-6


def test_ddpm_pipeline_round_trips_through_save_pretrained_with_our_scheduler(tiny_unets, tmp_path):
    scheduler = fastddpm.DDPMScheduler(num_train_timesteps=50, variance_type="fixed_large", beta_end=0.1)
    pipeline = diffusers.DDPMPipeline(unet=tiny_unets[3], scheduler=scheduler)
    expected = run_pipeline(pipeline, num_inference_steps=5)
    pipeline.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == ["fastddpm.schedulers", "DDPMScheduler"]
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert saved["variance_type"] == "fixed_large" and saved["num_train_timesteps"] == 50

    for loader in (diffusers.DDPMPipeline, diffusers.DiffusionPipeline):
        loaded = loader.from_pretrained(tmp_path)
        assert type(loaded.scheduler) is fastddpm.DDPMScheduler
        assert public(loaded.scheduler.config) == public(scheduler.config)
        np.testing.assert_array_equal(run_pipeline(loaded, num_inference_steps=5), expected)


def test_ddim_pipeline_records_our_scheduler_but_rebuilds_diffusers_own_on_load(tiny_unets, tmp_path):
    pipeline = diffusers.DDIMPipeline(unet=tiny_unets[3], scheduler=diffusers.DDIMScheduler(num_train_timesteps=50))
    pipeline.scheduler = fastddpm.DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["scheduler"] == \
        ["fastddpm.schedulers", "DDIMScheduler"]
    # DDIMPipeline.__init__ converts any scheduler to diffusers' DDIMScheduler (README).
    loaded = diffusers.DDIMPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is diffusers.DDIMScheduler
    assert type(fastddpm.DDIMScheduler.from_pretrained(tmp_path, subfolder="scheduler")) is fastddpm.DDIMScheduler


# ---------------------------------------------------------------------------------------------
# diffusers' scheduler machinery, inherited
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("config", [
    dict(),
    dict(num_train_timesteps=500, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
         prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True),
])
def test_config_and_files_cross_between_the_libraries(name, config, tmp_path):
    ours_class, their_class = getattr(fastddpm, name), getattr(diffusers, name)
    assert issubclass(ours_class, their_class)
    ours, theirs = ours_class(**config), their_class(**config)
    assert dict(ours.config) == dict(theirs.config)
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)  # the parent builds the tables
    assert their_class in ours.compatibles
    noted = ours_class(**config)
    noted.register_to_config(extra_note=1)
    assert noted.config.extra_note == 1 and "extra_note" not in ours.config

    crossed = ours_class.from_config(theirs.config)
    assert type(crossed) is ours_class and dict(crossed.config) == dict(theirs.config)
    assert type(their_class.from_config(ours.config)) is their_class
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    for folder in ("ours", "theirs"):
        loaded = ours_class.from_pretrained(tmp_path / folder)
        assert type(loaded) is ours_class
        assert public(loaded.config) == public(theirs.config)
    assert json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())["_class_name"] == name


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_trained_betas_round_trip(name, tmp_path):
    betas = np.linspace(1e-3, 0.3, 7)
    scheduler = getattr(fastddpm, name)(num_train_timesteps=7, trained_betas=betas)
    scheduler.save_pretrained(tmp_path)
    loaded = getattr(fastddpm, name).from_pretrained(tmp_path)
    assert loaded.betas.tolist() == scheduler.betas.tolist() == torch.tensor(betas, dtype=torch.float32).tolist()


@pytest.mark.parametrize("batch_timesteps", [True, False])
def test_add_noise_matches_diffusers(batch_timesteps):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    timesteps = torch.tensor([0, 999]) if batch_timesteps else torch.tensor([500])
    for name in ("DDPMScheduler", "DDIMScheduler"):
        ours, theirs = getattr(fastddpm, name)(rescale_betas_zero_snr=True), getattr(diffusers, name)(
            rescale_betas_zero_snr=True)
        torch.testing.assert_close(ours.add_noise(x0, noise, timesteps), theirs.add_noise(x0, noise, timesteps),
                                   atol=1e-6, rtol=1e-6)


def test_add_noise_takes_the_parents_path_where_diffusers_broadcasts():
    ours, theirs = fastddpm.DDPMScheduler(), diffusers.DDPMScheduler()
    x0, noise = torch.randn(SHAPE), torch.randn(1, *SHAPE[1:])  # noise broadcast over the batch
    timesteps = torch.tensor([10, 900])
    torch.testing.assert_close(ours.add_noise(x0, noise, timesteps), theirs.add_noise(x0, noise, timesteps))


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


def test_float32_alpha_bar_that_underflows_runs_the_parents_step():
    # betas up to 0.2 over 1000 steps: float32 alpha_bar is 0 from t ~ 890 on (0 / 0 in a step);
    # the tables cannot hold that, so every step is diffusers' own.
    config = dict(beta_start=0.01, beta_end=0.2)
    ours, theirs = fastddpm.DDPMScheduler(**config), diffusers.DDPMScheduler(**config)
    assert (theirs.alphas_cumprod[-20:] == 0).all()
    x = torch.randn(SHAPE)
    for t in (0, 1, 500):
        expected = theirs.step(x * 0.1, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        assert torch.equal(ours.step(x * 0.1, t, x, generator=torch.Generator().manual_seed(t)).prev_sample, expected)


# ---------------------------------------------------------------------------------------------
# which settings take the fused op
# ---------------------------------------------------------------------------------------------
class CountingOps:
    """Stands in for fastddpm.ops inside fastddpm.schedulers: counts the fused calls, and
    records each call's keyword arguments, then runs the real op."""

    def __init__(self, on_call=None):
        self.calls = []
        self.on_call = on_call

    def __getattr__(self, name):
        real = getattr(fastddpm.ops, name)
        if name not in ("ddpm_step", "ddim_step", "q_sample"):
            return real

        def op(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            if self.on_call is None:
                return real(*args, **kwargs)
            with self.on_call():
                return real(*args, **kwargs)

        return op


def patch_ops(monkeypatch, counting):
    """Put ``counting`` in place of fastddpm.ops in every module of the schedulers package."""
    for module in (schedulers.common, schedulers.ddpm, schedulers.ddim, schedulers.dpm_solver):
        monkeypatch.setattr(module, "ops", counting)


@pytest.fixture
def counting_ops(monkeypatch):
    counting = CountingOps()
    patch_ops(monkeypatch, counting)
    return counting


FUSED_DDPM = [dict(), dict(variance_type="fixed_small_log"), dict(variance_type="fixed_large"),
              dict(variance_type="learned_range"), dict(prediction_type="v_prediction", clip_sample=False),
              dict(rescale_betas_zero_snr=True, prediction_type="sample")]
PARENT_DDPM = [dict(thresholding=True), dict(variance_type="learned"), dict(variance_type="fixed_large_log")]


@pytest.mark.parametrize("config", FUSED_DDPM + PARENT_DDPM)
def test_which_ddpm_settings_take_the_fused_op(counting_ops, config):
    model = LinearModel(0, config.get("variance_type", "fixed_small"))
    ours = run_loop(fastddpm.DDPMScheduler(num_train_timesteps=100, **config), model, num_steps=4)
    fused = sum(name == "ddpm_step" for name, _, _ in counting_ops.calls)
    theirs = run_loop(diffusers.DDPMScheduler(num_train_timesteps=100, **config), model, num_steps=4)
    if config in FUSED_DDPM:
        assert fused == 4
        assert_loops_match(ours, theirs)
    else:  # diffusers' own step, NaN included (fixed_large_log takes the square root of a log < 0)
        assert fused == 0
        for key in ("sample", "pred_x0"):
            torch.testing.assert_close(ours[key], theirs[key], atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("variance_type, fused_steps", [
    ("fixed_small", 4), ("fixed_small_log", 4), ("fixed_large", 3), ("learned_range", 3)])
def test_ddpm_last_step_from_above_zero(counting_ops, variance_type, fused_steps):
    # trailing spacing ends on t = 24: diffusers adds noise on that step too. fixed_large and
    # learned_range add real noise there (the parent's step); fixed_small(_log) adds 1e-10 (fused,
    # without it). The generator advances as diffusers' does either way.
    config = dict(num_train_timesteps=100, timestep_spacing="trailing", variance_type=variance_type)
    model = LinearModel(3, variance_type)
    ours = run_loop(fastddpm.DDPMScheduler(**config), model, num_steps=4)
    assert ours["timesteps"].tolist() == [99, 74, 49, 24]
    assert sum(name == "ddpm_step" for name, _, _ in counting_ops.calls) == fused_steps
    assert_loops_match(ours, run_loop(diffusers.DDPMScheduler(**config), model, num_steps=4))


@pytest.mark.parametrize("config, step_kwargs, fused", [
    (dict(), dict(eta=0.0), True),
    (dict(), dict(eta=0.5, use_clipped_model_output=True), False),
    (dict(clip_sample=False), dict(eta=0.5, use_clipped_model_output=True), True),
    (dict(thresholding=True), dict(), False),
])
def test_which_ddim_settings_take_the_fused_op(counting_ops, config, step_kwargs, fused):
    model = LinearModel(1)
    ours = run_loop(fastddpm.DDIMScheduler(num_train_timesteps=100, **config), model, num_steps=3,
                    step_kwargs=step_kwargs)
    assert sum(name == "ddim_step" for name, _, _ in counting_ops.calls) == (3 if fused else 0)
    theirs = run_loop(diffusers.DDIMScheduler(num_train_timesteps=100, **config), model, num_steps=3,
                      step_kwargs=step_kwargs)
    assert_loops_match(ours, theirs)


# ---------------------------------------------------------------------------------------------
# no host synchronisation in a step
# ---------------------------------------------------------------------------------------------
# aten ops that read a tensor back to the host (a synchronisation for a device tensor), make a
# tensor from Python data (a host -> device copy per call on a device), or copy a tensor to another
# dtype or device (conservative: on the CPU this also catches harmless conversions).
HOST_ROUND_TRIPS = {"_local_scalar_dense", "lift_fresh", "lift_fresh_copy", "nonzero", "_to_copy", "item"}


class HostRoundTrips(TorchDispatchMode):
    """Records every aten op of HOST_ROUND_TRIPS the scheduler's own code runs around the op (the
    op itself is paused: on CUDA it reads its scalar tensors in the kernel)."""

    def __init__(self):
        super().__init__()
        self.seen, self.paused = [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and func.__name__.split(".")[0] in HOST_ROUND_TRIPS:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))

    def pause(self):
        mode = self

        class Paused:
            def __enter__(self):
                mode.paused = True

            def __exit__(self, *exc):
                mode.paused = False

        return Paused()


def count_round_trips(monkeypatch, scheduler, timesteps, *, step_kwargs=None, generator=None):
    """Host round trips per step over a loop (after one warm-up step, which builds the tables on
    the device and draws the seed), and the ops' calls."""
    recorder = HostRoundTrips()
    counting = CountingOps(on_call=recorder.pause)
    patch_ops(monkeypatch, counting)
    model, x = LinearModel(0), torch.randn(SHAPE)
    outputs = [model(x, 0) for _ in timesteps]
    x = scheduler.step(outputs[0], timesteps[0], x, generator=generator, **(step_kwargs or {})).prev_sample
    per_step = []
    for t, output in zip(timesteps[1:], outputs[1:]):
        with recorder:
            x = scheduler.step(output, t, x, generator=generator, **(step_kwargs or {})).prev_sample
        per_step.append(len(recorder.seen))
        recorder.seen.clear()
    return per_step, counting.calls


def device_like(monkeypatch):
    """Treat CPU tensors as a device's: timestep tensors on the CPU are then never read."""
    monkeypatch.setattr(schedulers.common, "HOST_DEVICE_TYPES", ())


SYNC_FREE_CASES = [
    (name, step_kwargs, timesteps_from, with_generator)
    for name, step_kwargs in (("DDPMScheduler", {}), ("DDIMScheduler", dict(eta=0.5)))
    for timesteps_from in ("elements", "ints", "other device tensors")
    for with_generator in (False, True)
    # diffusers draws no noise at t = 0: with a generator, a DDPM step reads back a device timestep
    # it cannot place (README; test_the_documented_read_back_is_seen)
    if not (name == "DDPMScheduler" and with_generator and timesteps_from == "other device tensors")
]


@pytest.mark.parametrize("name, step_kwargs, timesteps_from, with_generator", SYNC_FREE_CASES)
def test_a_step_reads_nothing_back_and_makes_no_tensor_from_a_number(monkeypatch, name, step_kwargs,
                                                                      timesteps_from, with_generator):
    device_like(monkeypatch)
    scheduler = getattr(fastddpm, name)(num_train_timesteps=100)
    scheduler.set_timesteps(8)
    if timesteps_from == "elements":  # as pipelines iterate scheduler.timesteps
        timesteps = list(scheduler.timesteps)
    elif timesteps_from == "ints":
        timesteps = scheduler.timesteps.tolist()
    else:  # tensors of their own, not views of scheduler.timesteps
        timesteps = [t.clone() for t in scheduler.timesteps]
    generator = torch.Generator().manual_seed(0) if with_generator else None
    per_step, calls = count_round_trips(monkeypatch, scheduler, timesteps, step_kwargs=step_kwargs, generator=generator)
    assert per_step == [0] * 7
    # every scalar reaches the op as a tensor: the index, and the noise stream's counters
    for _, args, kwargs in calls:
        assert isinstance(args[1], torch.Tensor) and args[1].dtype == torch.int64
        if kwargs.get("noise") is None and "seed" in kwargs:
            assert all(isinstance(kwargs[key], torch.Tensor) for key in ("seed", "noise_offset", "index_base"))
    if not with_generator:
        offsets = [kwargs["noise_offset"] for _, _, kwargs in calls]
        assert all(offset is offsets[0] for offset in offsets)  # one counter, advanced in place
        assert offsets[0].item() == len(calls)


def test_the_documented_read_back_is_seen(monkeypatch):
    # The detector itself: a DDPM step with a generator, given a device timestep that is not an
    # element of scheduler.timesteps, reads it back once (diffusers draws no noise at t = 0).
    device_like(monkeypatch)
    scheduler = fastddpm.DDPMScheduler(num_train_timesteps=100)
    scheduler.set_timesteps(8)
    timesteps = [t.clone() for t in scheduler.timesteps]
    per_step, _ = count_round_trips(monkeypatch, scheduler, timesteps, generator=torch.Generator().manual_seed(0))
    assert per_step == [1] * 7


@pytest.mark.parametrize("name, step_kwargs", [("DDPMScheduler", {}), ("DDIMScheduler", dict(eta=0.5))])
def test_device_timesteps_give_the_host_paths_result(monkeypatch, name, step_kwargs):
    # The on-device lookup (timesteps that are neither ints nor elements of scheduler.timesteps)
    # steps exactly as the host path does.
    config = dict(num_train_timesteps=100, timestep_spacing="linspace")
    model = LinearModel(2)
    results = []
    for device_timesteps in (False, True):
        if device_timesteps:
            device_like(monkeypatch)
        torch.manual_seed(5)
        scheduler = getattr(fastddpm, name)(**config)
        scheduler.set_timesteps(6)
        x = torch.randn(SHAPE)
        for t in scheduler.timesteps.tolist():
            timestep = torch.tensor(t) if device_timesteps else t
            x = scheduler.step(model(x, t), timestep, x, **step_kwargs).prev_sample
        results.append(x)
    assert torch.equal(results[0], results[1])


@requires_cuda
@pytest.mark.parametrize("name, step_kwargs", [("DDPMScheduler", {}), ("DDIMScheduler", dict(eta=0.5))])
@pytest.mark.parametrize("timesteps_on", ["cpu", "cuda"])
@pytest.mark.parametrize("generator_on", [None, "cuda"])
def test_cuda_step_does_not_synchronise(name, step_kwargs, timesteps_on, generator_on):
    scheduler = getattr(fastddpm, name)(num_train_timesteps=1000)
    scheduler.set_timesteps(20, device=timesteps_on)
    x = torch.randn(4, 3, 16, 16, device="cuda")
    output = torch.randn_like(x)
    generator = torch.Generator(generator_on).manual_seed(0) if generator_on else None

    def loop():
        sample = x
        for t in scheduler.timesteps:
            sample = scheduler.step(output, t, sample, generator=generator, **step_kwargs).prev_sample
        return sample

    loop()  # warm-up: kernels compiled, tables and the noise stream on the device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        result = loop()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(result).all()


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
        x = scheduler.step(model(x, t), t, x, **(step_kwargs or {})).prev_sample
    return x.cpu()


GENERATOR_FREE_CASES = [
    (lambda: fastddpm.DDPMScheduler(num_train_timesteps=100, variance_type="learned_range"), None),
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


@requires_triton
@pytest.mark.parametrize("name, config, step_kwargs", [
    ("DDPMScheduler", dict(variance_type="learned_range"), {}),
    ("DDPMScheduler", dict(rescale_betas_zero_snr=True), {}),
    ("DDIMScheduler", dict(set_alpha_to_one=False, prediction_type="v_prediction"), dict(eta=1.0)),
])
def test_kernel_loop_with_a_generator_matches_diffusers(monkeypatch, name, config, step_kwargs):
    # The kernel backend and the device it runs on come together (conftest): triton on CUDA
    # tensors on a GPU host, the interpreter on CPU tensors elsewhere.
    monkeypatch.setenv("FASTDDPM_BACKEND", KERNEL_BACKEND)
    model = LinearModel(1, config.get("variance_type", "fixed_small"))
    ours = run_loop(getattr(fastddpm, name)(num_train_timesteps=100, **config), model, num_steps=5,
                    step_kwargs=step_kwargs, device=KERNEL_DEVICE)
    theirs = run_loop(getattr(diffusers, name)(num_train_timesteps=100, **config), model, num_steps=5,
                      step_kwargs=step_kwargs, device=KERNEL_DEVICE)
    assert_loops_match(ours, theirs)


# ---------------------------------------------------------------------------------------------
# stricter than diffusers, and bad arguments
# ---------------------------------------------------------------------------------------------
WARNED_SETTINGS = [
    (dict(prediction_type="x0"), "prediction_type"),
    (dict(variance_type="other"), "variance_type"),
    (dict(timestep_spacing="even"), "timestep_spacing"),
    (dict(beta_start=0.1, beta_end=2.0), "beta_end=2.0"),
    (dict(beta_end=float("nan")), "beta_end"),
    (dict(steps_offset=-1), "steps_offset"),
    (dict(clip_sample_range=0.0), "clip_sample_range"),
    (dict(dynamic_thresholding_ratio=1.5), "dynamic_thresholding_ratio"),
    (dict(thresholding=True, dynamic_thresholding_ratio=0.0), "dynamic_thresholding_ratio"),
    (dict(sample_max_value=-1.0), "sample_max_value"),
    (dict(clip_sample="yes"), "clip_sample"),
    (dict(num_train_timesteps=30, trained_betas=[0.1, 0.2]), "trained_betas"),
    (dict(num_train_timesteps=2, trained_betas=[0.1, 1.5]), "trained_betas"),
]


def _outcome(scheduler, steps=4):
    """A short loop's result, or the type of the error it stops with (diffusers' own)."""
    try:
        scheduler.set_timesteps(steps)
        return run_loop(scheduler, LinearModel(2), num_steps=steps)["sample"]
    except Exception as error:  # noqa: BLE001 - the comparison is of which error
        return type(error)


@pytest.mark.parametrize("kwargs, name", WARNED_SETTINGS)
def test_settings_diffusers_accepts_are_accepted_with_one_warning_and_run_as_diffusers(kwargs, name):
    """A drop-in with no exceptions: what diffusers accepts, ours accepts (a UserWarning naming the
    setting), and a loop gives what diffusers' own class gives (its result, or its error)."""
    kwargs = dict(kwargs, num_train_timesteps=kwargs.get("num_train_timesteps", 30))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = fastddpm.DDPMScheduler(**kwargs)
    mine = [w for w in caught if issubclass(w.category, UserWarning) and "fastddpm.DDPMScheduler" in str(w.message)]
    assert len(mine) == 1 and name.split("=")[0] in str(mine[0].message), [str(w.message) for w in caught]
    assert ours._trained is None  # every step is diffusers' own
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = diffusers.DDPMScheduler(**kwargs)
        expected, got = _outcome(theirs), _outcome(ours)
    if isinstance(expected, type):
        assert got is expected
    else:
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(beta_schedule="cosine"), NotImplementedError, "cosine"),  # diffusers' own checks stay errors
    (dict(no_such_argument=1), TypeError, "no_such_argument"),
])
def test_diffusers_own_constructor_errors_stay_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastddpm.DDPMScheduler(**kwargs)


def test_ddim_warns_about_a_non_bool_set_alpha_to_one():
    with pytest.warns(UserWarning, match="set_alpha_to_one"):
        scheduler = fastddpm.DDIMScheduler(set_alpha_to_one="no")
    assert scheduler._trained is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(num_inference_steps=101), "num_inference_steps"),
    (dict(num_inference_steps=2.5), "num_inference_steps"),
    (dict(num_inference_steps=5, timesteps=[3, 2]), "one of"),  # diffusers' own check
    (dict(), "num_inference_steps or timesteps"),
    (dict(timesteps=[2, 5]), "descending"),  # diffusers' own check
    (dict(timesteps=[100, 5]), "start before"),  # diffusers' own check
    (dict(timesteps=[5, -1]), "timesteps"),
    (dict(timesteps=[5.5, 1]), "timesteps"),
])
def test_bad_ddpm_set_timesteps_arguments(kwargs, match):
    scheduler = fastddpm.DDPMScheduler(num_train_timesteps=100)
    with pytest.raises(ValueError, match=match):
        scheduler.set_timesteps(**kwargs)


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_steps_offset_past_the_chain_is_refused_at_set_timesteps(name):
    scheduler = getattr(fastddpm, name)(num_train_timesteps=10, steps_offset=1)
    scheduler.set_timesteps(5)
    before = scheduler.timesteps.clone()
    with pytest.raises(ValueError, match="steps_offset"):
        scheduler.set_timesteps(10)  # would ask for trained timestep 10
    assert torch.equal(scheduler.timesteps, before) and scheduler.num_inference_steps == 5  # unchanged


def test_bad_step_arguments_fail_before_drawing_noise():
    x = torch.randn(SHAPE)
    ddpm = fastddpm.DDPMScheduler(num_train_timesteps=100)
    ddpm.set_timesteps(4)
    ddim = fastddpm.DDIMScheduler(num_train_timesteps=100)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    cases = [
        (lambda: ddpm.step(torch.randn(SHAPE), 74, x, generator=generator), ValueError, "not one of"),
        (lambda: ddpm.step(torch.randn(SHAPE), torch.tensor([75, 50]), x, generator=generator), TypeError,
         "one element"),
        (lambda: ddpm.step(torch.randn(SHAPE), torch.tensor(75.0), x, generator=generator), TypeError, "integer"),
        (lambda: ddpm.step(torch.randn(SHAPE), 75, x, generator=1234), TypeError, "generator"),
        (lambda: ddpm.step(torch.randn(SHAPE).numpy(), 75, x, generator=generator), TypeError, "model_output"),
        (lambda: ddim.step(torch.randn(SHAPE), 75, x, generator=generator), ValueError, "set_timesteps"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
    ddim.set_timesteps(4)
    for kwargs, error, match in ((dict(eta=-0.5, generator=generator), ValueError, "eta"),
                                 (dict(eta=0.5, generator=generator, variance_noise=torch.randn(SHAPE)), ValueError,
                                  "generator"),
                                 (dict(timestep=1000), ValueError, "timestep")):
        with pytest.raises(error, match=match):
            ddim.step(torch.randn(SHAPE), kwargs.pop("timestep", 75), x, **kwargs)
    assert torch.equal(generator.get_state(), state), "a failing step consumed the generator"


def test_missing_diffusers_gives_an_install_hint():
    # In a fresh interpreter where diffusers cannot be imported: fastddpm imports, its schedulers
    # say how to get diffusers.
    code = (
        "import sys; sys.modules['diffusers'] = None\n"
        "import fastddpm\n"
        "assert fastddpm.NoiseSchedule is not None\n"
        "try:\n"
        "    fastddpm.DDPMScheduler\n"
        "except ImportError as error:\n"
        "    print(error)\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "pip install fastddpm[diffusers]" in result.stdout
    assert len(result.stdout.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# DPMSolverMultistepScheduler
# ---------------------------------------------------------------------------------------------
# Errors as scaled_error. The fused step reads DPM-Solver++ coefficients derived in float64 from
# the float32 alpha_bar where diffusers derives them in float32 from its float32 sigmas; measured
# (epsilon / v_prediction / sample, 10-50 steps, linear / scaled_linear / cosine, linspace /
# trailing, reference and interpreted kernel): worst 7.4e-7 per loop relative to max |sample|,
# worst 4.8e-7 scaled per step (each step from diffusers' own sample).
DPM_TOLERANCE = 5e-6


@pytest.fixture
def dpm_calls(monkeypatch):
    """Counts the fused DPM-Solver++(2M) steps: the kernel backend of KERNEL_DEVICE (the compiled
    kernel on a GPU host, the interpreter on CPU); the loops put their tensors on KERNEL_DEVICE."""
    monkeypatch.setenv("FASTDDPM_BACKEND", KERNEL_BACKEND)
    calls = []
    real = schedulers.dpm_solver._dpmpp_2m

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(schedulers.dpm_solver, "_dpmpp_2m", counting)
    return calls


def dpm_loop(scheduler, model, num_steps, *, per_step_reference=None, dtype_at=None, device=KERNEL_DEVICE):
    """The loop on ``device``; with ``per_step_reference`` (a diffusers scheduler) each step is also
    run by it from the same inputs, and the worst scaled per-step error is returned too."""
    torch.manual_seed(0)  # the SDE variants' noise
    scheduler.set_timesteps(num_steps)
    if per_step_reference is not None:
        per_step_reference.set_timesteps(num_steps)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float32).to(device)
    worst = 0.0
    for k, t in enumerate(scheduler.timesteps):
        out = model(x, t)
        if dtype_at is not None and k in dtype_at:
            out = out.double()  # mixed dtypes: the parent's step
        step = scheduler.step(out, t, x).prev_sample
        if per_step_reference is not None:
            expected = per_step_reference.step(out, t, x).prev_sample
            worst = max(worst, scaled_error(step[None], expected[None]))
            x = expected
        else:
            x = step.float()  # a float64 model output gives a float64 step
    return x.cpu(), worst


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("num_steps", [10, 20])
def test_dpm_loop_matches_diffusers(dpm_calls, prediction_type, num_steps):
    config = dict(prediction_type=prediction_type)
    model = LinearModel(3)
    ours, _ = dpm_loop(fastddpm.DPMSolverMultistepScheduler(**config), model, num_steps)
    assert len(dpm_calls) == num_steps
    theirs, _ = dpm_loop(diffusers.DPMSolverMultistepScheduler(**config), model, num_steps)
    assert scaled_error(ours[None], theirs[None]) <= DPM_TOLERANCE
    _, per_step = dpm_loop(fastddpm.DPMSolverMultistepScheduler(**config), model, num_steps,
                           per_step_reference=diffusers.DPMSolverMultistepScheduler(**config))
    assert per_step <= DPM_TOLERANCE


FUSED_DPM = [dict(prediction_type="sample", timestep_spacing="trailing"),
             dict(beta_schedule="squaredcos_cap_v2", lower_order_final=False),
             dict(euler_at_final=True, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"),
             dict(variance_type="learned_range"),
             # another chain of noise levels, the same fused step (issue 23)
             dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True),
             dict(use_karras_sigmas=True, prediction_type="v_prediction", beta_schedule="scaled_linear",
                  timestep_spacing="trailing"),
             # the last step lands on sigma_min, first order as diffusers' below 15 steps
             dict(final_sigmas_type="sigma_min"), dict(final_sigmas_type="sigma_min", use_karras_sigmas=True),
             # each step of the order diffusers gives it (issue 23): 3M, first order throughout, and a
             # second-order last step onto sigma_min
             dict(solver_order=3), dict(solver_order=3, prediction_type="v_prediction", use_karras_sigmas=True),
             dict(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min"),
             dict(solver_order=1), dict(final_sigmas_type="sigma_min", lower_order_final=False)]
PARENT_DPM = [dict(use_lu_lambdas=True),
              dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"),
              dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
              dict(solver_type="heun"),
              dict(thresholding=True),
              # diffusers raises the last alpha_bar to 2**-24, above the one before: no table for the op
              dict(rescale_betas_zero_snr=True, prediction_type="v_prediction")]


@pytest.mark.parametrize("config", FUSED_DPM + PARENT_DPM)
def test_which_dpm_settings_take_the_fused_step(dpm_calls, config):
    variance = config.get("variance_type") or "fixed_small"
    model = LinearModel(4, variance_type=variance)
    ours, _ = dpm_loop(fastddpm.DPMSolverMultistepScheduler(**config), model, 8)
    theirs, _ = dpm_loop(diffusers.DPMSolverMultistepScheduler(**config), model, 8)
    assert len(dpm_calls) == (8 if config in FUSED_DPM else 0)
    if config in PARENT_DPM:
        assert torch.equal(ours, theirs)
    else:
        assert scaled_error(ours[None], theirs[None]) <= DPM_TOLERANCE


@pytest.mark.parametrize("parent_steps", [{0}, {3}, {4, 5}, {8}])
def test_dpm_parent_and_fused_steps_mix_in_one_loop(dpm_calls, parent_steps):
    model = LinearModel(5)
    ours, _ = dpm_loop(fastddpm.DPMSolverMultistepScheduler(), model, 9, dtype_at=parent_steps)
    theirs, _ = dpm_loop(diffusers.DPMSolverMultistepScheduler(), model, 9, dtype_at=parent_steps)
    assert len(dpm_calls) == 9 - len(parent_steps)
    assert scaled_error(ours[None], theirs[None]) <= DPM_TOLERANCE


def test_dpm_first_step_below_the_top_runs_the_parents_step(dpm_calls):
    model = LinearModel(6)
    results = []
    for cls in (fastddpm.DPMSolverMultistepScheduler, diffusers.DPMSolverMultistepScheduler):
        scheduler = cls()
        scheduler.set_timesteps(10)
        scheduler.set_begin_index(4)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(KERNEL_DEVICE)
        for t in scheduler.timesteps[4:]:
            x = scheduler.step(model(x, t), t, x).prev_sample
        results.append(x.cpu())
    assert len(dpm_calls) == 5  # the first step (first order below the chain's top) is the parent's
    assert scaled_error(results[0][None], results[1][None]) <= DPM_TOLERANCE


def test_dpm_pipeline_matches_diffusers_and_round_trips(tiny_unets, tmp_path, dpm_calls, monkeypatch):
    monkeypatch.setenv("FASTDDPM_BACKEND", "interpret")  # the pipeline runs on the CPU, on any host
    unet = tiny_unets[3]
    expected = run_pipeline(diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DPMSolverMultistepScheduler()),
                            num_inference_steps=5)
    scheduler = fastddpm.DPMSolverMultistepScheduler()
    pipeline = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    images = run_pipeline(pipeline, num_inference_steps=5)
    assert len(dpm_calls) == 5
    np.testing.assert_allclose(images, expected, atol=1e-5, rtol=0)
    pipeline.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == ["fastddpm.schedulers", "DPMSolverMultistepScheduler"]
    loaded = diffusers.DDPMPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is fastddpm.DPMSolverMultistepScheduler
    assert public(loaded.scheduler.config) == public(scheduler.config)
    np.testing.assert_array_equal(run_pipeline(loaded, num_inference_steps=5), images)
    again = fastddpm.DPMSolverMultistepScheduler.from_pretrained(tmp_path / "scheduler")
    assert type(again) is fastddpm.DPMSolverMultistepScheduler


@pytest.mark.parametrize("kwargs", [dict(beta_start=0.1, beta_end=2.0), dict(variance_type="other"),
                                    dict(num_train_timesteps=1000, trained_betas=[0.1, 0.2]),
                                    dict(thresholding=True, dynamic_thresholding_ratio=0.0)])
def test_a_pipeline_diffusers_saved_with_such_a_setting_loads_runs_and_saves_through_ours(tiny_unets, tmp_path,
                                                                                            kwargs):
    """Issue 23: a user's saved pipeline keeps working after the import swap."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        diffusers.DDPMPipeline(unet=tiny_unets[3], scheduler=diffusers.DDPMScheduler(**kwargs)).save_pretrained(
            tmp_path / "theirs")
        with pytest.warns(UserWarning, match="diffusers accepts this setting"):
            scheduler = fastddpm.DDPMScheduler.from_pretrained(tmp_path / "theirs" / "scheduler")
        ours = diffusers.DDPMPipeline(unet=tiny_unets[3], scheduler=scheduler)
        theirs = diffusers.DDPMPipeline.from_pretrained(tmp_path / "theirs")

        def outcome(pipe):
            try:
                return run_pipeline(pipe, num_inference_steps=3)
            except Exception as error:  # noqa: BLE001 - diffusers' own error, the same on both sides
                return type(error)

        expected, got = outcome(theirs), outcome(ours)
        if isinstance(expected, type):
            assert got is expected
        else:
            np.testing.assert_array_equal(got, expected)
        ours.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "model_index.json").read_text())["scheduler"] == [
        "fastddpm.schedulers", "DDPMScheduler"]


@pytest.mark.parametrize("solver_order", [2, 3])
@pytest.mark.parametrize("num_steps", [14, 15, 20])
def test_dpm_orders_follow_diffusers_rule_at_every_length(dpm_calls, solver_order, num_steps):
    """diffusers' last steps onto sigma_min are first order below 15 steps and of the solver's order
    from 15 on (lower_order_final's rule): the fused chain gives each step diffusers' order, so the
    whole loop is fused and matches, per step as well."""
    model = LinearModel(7)
    config = dict(final_sigmas_type="sigma_min", solver_order=solver_order)
    ours, _ = dpm_loop(fastddpm.DPMSolverMultistepScheduler(**config), model, num_steps)
    assert len(dpm_calls) == num_steps
    theirs, _ = dpm_loop(diffusers.DPMSolverMultistepScheduler(**config), model, num_steps)
    assert scaled_error(ours[None], theirs[None]) <= DPM_TOLERANCE
    _, per_step = dpm_loop(fastddpm.DPMSolverMultistepScheduler(**config), model, num_steps,
                           per_step_reference=diffusers.DPMSolverMultistepScheduler(**config))
    assert per_step <= DPM_TOLERANCE


@pytest.mark.parametrize("parent_steps", [{0}, {2}, {3, 4}, {7}])
def test_dpm_3m_parent_and_fused_steps_mix_in_one_loop(dpm_calls, parent_steps):
    """A parent's step between fused third-order ones: the buffers take the parent's x_0s back."""
    model = LinearModel(5)
    config = dict(solver_order=3)
    ours, _ = dpm_loop(fastddpm.DPMSolverMultistepScheduler(**config), model, 9, dtype_at=parent_steps)
    theirs, _ = dpm_loop(diffusers.DPMSolverMultistepScheduler(**config), model, 9, dtype_at=parent_steps)
    assert len(dpm_calls) == 9 - len(parent_steps)
    assert scaled_error(ours[None], theirs[None]) <= DPM_TOLERANCE


def _sde_loop(scheduler, model, num_steps, *, generator=None, noises=None, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    scheduler.set_timesteps(num_steps)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(KERNEL_DEVICE)
    for k, t in enumerate(scheduler.timesteps):
        noise = None if noises is None else noises[k].to(KERNEL_DEVICE)
        x = scheduler.step(model(x, t), t, x, generator=generator, variance_noise=noise).prev_sample
    return x.cpu()


@pytest.mark.parametrize("config", [dict(), dict(prediction_type="v_prediction", use_karras_sigmas=True),
                                    dict(final_sigmas_type="sigma_min", beta_schedule="scaled_linear"),
                                    dict(solver_order=1), dict(final_sigmas_type="sigma_min", lower_order_final=False)],
                         ids=str)
def test_dpm_sde_variant_is_fused_and_matches_diffusers_with_its_noise(dpm_calls, config):
    """"sde-dpmsolver++" (order 2, midpoint) takes the fused step: with a generator (diffusers'
    randn_tensor where diffusers draws) and with variance_noise, diffusers' samples (measured <= 4e-7
    relative); without either, the in-kernel stream of a seed drawn from torch's global RNG:
    torch.manual_seed reproduces it, another seed moves it."""
    config = dict(config, algorithm_type="sde-dpmsolver++")
    model = LinearModel(9)
    steps = 8
    generator = lambda: torch.Generator(KERNEL_DEVICE).manual_seed(3)  # noqa: E731
    ours = _sde_loop(fastddpm.DPMSolverMultistepScheduler(**config), model, steps, generator=generator())
    assert len(dpm_calls) == steps
    theirs = _sde_loop(diffusers.DPMSolverMultistepScheduler(**config), model, steps, generator=generator())
    assert scaled_error(ours[None], theirs[None]) <= DPM_TOLERANCE
    noises = [torch.randn(SHAPE, generator=torch.Generator().manual_seed(k)) for k in range(steps)]
    ours = _sde_loop(fastddpm.DPMSolverMultistepScheduler(**config), model, steps, noises=noises)
    theirs = _sde_loop(diffusers.DPMSolverMultistepScheduler(**config), model, steps, noises=noises)
    assert scaled_error(ours[None], theirs[None]) <= DPM_TOLERANCE
    seeded = [_sde_loop(fastddpm.DPMSolverMultistepScheduler(**config), model, steps, seed=s) for s in (1, 1, 2)]
    assert torch.equal(seeded[0], seeded[1]) and not torch.allclose(seeded[0], seeded[2], atol=1e-3)
    assert torch.isfinite(seeded[0]).all()


# ---------------------------------------------------------------------------------------------
# UniPCMultistepScheduler (issue 23): the corrector and predictor fused
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def unipc_calls(monkeypatch):
    """Counts the fused UniPC steps on KERNEL_DEVICE's kernel backend (as dpm_calls)."""
    monkeypatch.setenv("FASTDDPM_BACKEND", KERNEL_BACKEND)
    calls = []
    real = schedulers.unipc._unipc

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(schedulers.unipc, "_unipc", counting)
    return calls


FUSED_UNIPC = [dict(), dict(prediction_type="v_prediction", beta_schedule="scaled_linear"),
               dict(prediction_type="sample", timestep_spacing="trailing"),
               dict(solver_order=1), dict(disable_corrector=[0, 2, 5]),
               dict(timestep_spacing="leading", steps_offset=1, lower_order_final=True),
               dict(solver_type="bh1", final_sigmas_type="sigma_min"),
               dict(lower_order_final=False, final_sigmas_type="sigma_min"),
               dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True),
               dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", beta_schedule="scaled_linear"),
               dict(solver_type="midpoint")]  # diffusers registers it as bh2
PARENT_UNIPC = [dict(solver_order=3), dict(predict_x0=False), dict(thresholding=True),
                dict(solver_type="bh1"),  # onto sigma 0 diffusers' bh1 returns NaN: so does ours
                dict(lower_order_final=False),  # a second-order step onto sigma 0: the same
                dict(use_flow_sigmas=True, prediction_type="flow_prediction"),
                dict(rescale_betas_zero_snr=True, prediction_type="v_prediction")]


@pytest.mark.parametrize("config", FUSED_UNIPC + PARENT_UNIPC, ids=str)
def test_which_unipc_settings_take_the_fused_step(unipc_calls, config):
    """diffusers' loop and ours from the same x_T, every step per step as well: fused settings within
    DPM_TOLERANCE (measured <= 9e-7 on the CPU), the others are diffusers' own step, bit for bit."""
    model = LinearModel(4)
    ours, _ = dpm_loop(fastddpm.UniPCMultistepScheduler(**config), model, 8)
    theirs, _ = dpm_loop(diffusers.UniPCMultistepScheduler(**config), model, 8)
    assert len(unipc_calls) == (8 if config in FUSED_UNIPC else 0)
    if config in PARENT_UNIPC:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)
        return
    assert torch.isfinite(ours).all()
    assert scaled_error(ours[None], theirs[None]) <= DPM_TOLERANCE


@pytest.mark.parametrize("num_steps", [1, 2, 3, 20])
def test_unipc_loop_matches_diffusers_at_any_length(unipc_calls, num_steps):
    model = LinearModel(3)
    ours, _ = dpm_loop(fastddpm.UniPCMultistepScheduler(), model, num_steps)
    theirs, _ = dpm_loop(diffusers.UniPCMultistepScheduler(), model, num_steps)
    assert len(unipc_calls) == num_steps
    assert scaled_error(ours[None], theirs[None]) <= DPM_TOLERANCE


def test_unipc_loops_run_again_after_set_timesteps_and_keep_diffusers_counters(unipc_calls):
    """A second loop on the same scheduler starts its state from zeros (a stale corrector part would
    move it); the counters diffusers' code reads afterwards are diffusers'."""
    model = LinearModel(8)
    scheduler = fastddpm.UniPCMultistepScheduler()
    first, _ = dpm_loop(scheduler, model, 6)
    second, _ = dpm_loop(scheduler, model, 6)
    assert torch.equal(first, second)
    reference_scheduler = diffusers.UniPCMultistepScheduler()
    dpm_loop(reference_scheduler, model, 6)
    for name in ("step_index", "lower_order_nums", "this_order"):
        assert getattr(scheduler, name) == getattr(reference_scheduler, name), name


def test_unipc_first_step_below_the_top_runs_the_parents_step(unipc_calls):
    model = LinearModel(6)
    results = []
    for cls in (fastddpm.UniPCMultistepScheduler, diffusers.UniPCMultistepScheduler):
        scheduler = cls()
        scheduler.set_timesteps(10)
        scheduler.set_begin_index(4)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(KERNEL_DEVICE)
        for t in scheduler.timesteps[4:]:
            x = scheduler.step(model(x, t), t, x).prev_sample
        results.append(x.cpu())
    assert len(unipc_calls) == 0  # the loop's first step is not the chain's: diffusers' steps throughout
    assert torch.equal(results[0], results[1])


def test_a_fused_unipc_loop_takes_a_later_output_in_another_dtype(unipc_calls):
    model = LinearModel(5)
    ours, _ = dpm_loop(fastddpm.UniPCMultistepScheduler(), model, 9, dtype_at={3, 4})
    theirs, _ = dpm_loop(diffusers.UniPCMultistepScheduler(), model, 9)
    assert len(unipc_calls) == 9
    assert scaled_error(ours[None], theirs[None]) <= DPM_TOLERANCE


def _unet_loop(unet, scheduler, num_steps):
    """The loop of diffusers' own examples for a scheduler whose step takes no generator (diffusers'
    DDPMPipeline passes one, which UniPCMultistepScheduler.step refuses, ours as diffusers')."""
    scheduler.set_timesteps(num_steps)
    x = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    return x


def test_unipc_with_a_unet_matches_diffusers_and_round_trips_in_a_pipeline(tiny_unets, tmp_path, unipc_calls,
                                                                           monkeypatch):
    monkeypatch.setenv("FASTDDPM_BACKEND", "interpret")  # the loop runs on the CPU, on any host
    unet = tiny_unets[3]
    expected = _unet_loop(unet, diffusers.UniPCMultistepScheduler(), 5)
    scheduler = fastddpm.UniPCMultistepScheduler()
    got = _unet_loop(unet, scheduler, 5)
    assert len(unipc_calls) == 5
    torch.testing.assert_close(got, expected, atol=1e-5 * expected.abs().max().item(), rtol=0)
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == ["fastddpm.schedulers", "UniPCMultistepScheduler"]
    loaded = diffusers.DDPMPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is fastddpm.UniPCMultistepScheduler
    assert public(loaded.scheduler.config) == public(scheduler.config)
    assert torch.equal(_unet_loop(loaded.unet, loaded.scheduler, 5), got)
    with pytest.raises(TypeError, match="generator"):  # as diffusers' own scheduler in this pipeline
        run_pipeline(loaded, num_inference_steps=2)
    # diffusers' scheduler swap (from_config) works both ways
    swapped = diffusers.DPMSolverMultistepScheduler.from_config(loaded.scheduler.config)
    assert type(fastddpm.UniPCMultistepScheduler.from_config(swapped.config)) is fastddpm.UniPCMultistepScheduler
