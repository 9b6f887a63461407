"""fastddpm.accelerate(pipe): called like the pipeline, returns the pipeline's outputs for the same
generator (fastddpm/pipelines.py). Tiny UNet2DModels on the CPU."""
import inspect
import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import fastddpm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

# Images in [0, 1]: the drop-in schedulers' loops stay within ~1e-5 of diffusers' (float32 tables,
# another operation order); trials here differed by at most 1.6e-5.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 16),
        norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()
    return model


def _pipe(kind, unet, scheduler):
    pipe = getattr(diffusers, kind)(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASES = [
    ("DDPMPipeline", diffusers.DDPMScheduler(num_train_timesteps=1000), dict(num_inference_steps=30)),
    ("DDPMPipeline", diffusers.DDPMScheduler(num_train_timesteps=1000, variance_type="fixed_large",
                                             prediction_type="v_prediction"), dict(num_inference_steps=10)),
    ("DDPMPipeline", diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
     dict(num_inference_steps=1000)),
    ("DDIMPipeline", diffusers.DDIMScheduler(num_train_timesteps=1000), dict(num_inference_steps=20)),
    ("DDIMPipeline", diffusers.DDIMScheduler(num_train_timesteps=1000, set_alpha_to_one=False,
                                             steps_offset=1), dict(num_inference_steps=10, eta=0.7)),
    ("DDPMPipeline", diffusers.DDPMScheduler(num_train_timesteps=1000, timestep_spacing="trailing"),
     dict(num_inference_steps=15)),
    ("DDPMPipeline", diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000), dict(num_inference_steps=20)),
    ("DDPMPipeline", diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000), dict(num_inference_steps=50)),
    ("DDPMPipeline", diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, algorithm_type="sde-dpmsolver++"),
     dict(num_inference_steps=12)),
    ("DDPMPipeline", diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, use_karras_sigmas=True),
     dict(num_inference_steps=12)),
    ("DDPMPipeline", diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, prediction_type="sample",
                                                           timestep_spacing="trailing"), dict(num_inference_steps=8)),
]


@pytest.mark.parametrize("kind, scheduler, arguments", CASES,
                         ids=[f"{k}-{type(s).__name__}-{a['num_inference_steps']}" for k, s, a in CASES])
def test_accelerated_pipeline_returns_the_pipelines_images_for_the_same_generator(unet, kind, scheduler, arguments):
    pipe = _pipe(kind, unet, scheduler)
    fast = fastddpm.accelerate(pipe)
    assert isinstance(fast, fastddpm.AcceleratedPipeline)
    theirs_generator, ours_generator = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    theirs = pipe(batch_size=3, generator=theirs_generator, output_type="np", **arguments).images
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fall-back to the pipeline: fastddpm ran the loop
        ours = fast(batch_size=3, generator=ours_generator, output_type="np", **arguments).images
    assert ours.shape == theirs.shape == (3, 8, 8, 1) and ours.dtype == theirs.dtype
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOLERANCE)
    assert np.abs(ours - 0.5).max() > 0.05  # not a constant image: the comparison means something
    # The generator was drawn from as often as the pipeline draws from it.
    assert torch.equal(ours_generator.get_state(), theirs_generator.get_state())
    # The pipeline itself is untouched: its scheduler is still diffusers' own.
    assert type(pipe.scheduler).__module__.startswith("diffusers")
    assert type(fast.scheduler).__module__ == "fastddpm.schedulers"


def test_accelerated_pipeline_is_called_exactly_like_the_pipeline(unet):
    pipe = _pipe("DDIMPipeline", unet, diffusers.DDIMScheduler(num_train_timesteps=1000))
    fast = fastddpm.accelerate(pipe)
    expected = list(inspect.signature(pipe.__call__).parameters.values())
    assert list(inspect.signature(fast).parameters.values()) == expected
    # positional arguments, output types and return_dict, as diffusers' pipeline takes them
    images = fast(2, torch.Generator().manual_seed(0), 0.0, 5).images
    assert isinstance(images, list) and len(images) == 2 and images[0].size == (8, 8)  # PIL by default
    (tensor,) = fast(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=5,
                     output_type="pt", return_dict=False)
    reference = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=5,
                     output_type="pt").images
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (2, 1, 8, 8)
    torch.testing.assert_close(tensor, reference, rtol=0, atol=TOLERANCE)
    with pytest.raises(TypeError):
        fast(batch_size=1, steps=3)  # not an argument of the pipeline
    assert fast.unet is pipe.unet and fast.config == pipe.config  # everything else is the pipeline's


def test_without_a_generator_the_global_seed_reproduces_a_call(unet):
    fast = fastddpm.accelerate(_pipe("DDPMPipeline", unet, diffusers.DDPMScheduler(num_train_timesteps=1000)))
    torch.manual_seed(5)
    first = fast(batch_size=2, num_inference_steps=10, output_type="np").images
    torch.manual_seed(5)
    again = fast(batch_size=2, num_inference_steps=10, output_type="np").images
    np.testing.assert_array_equal(first, again)


def test_model_options_apply_and_leave_the_pipelines_unet_alone(unet):
    pipe = _pipe("DDPMPipeline", unet, diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000))
    fast = fastddpm.accelerate(pipe, model_dtype=torch.bfloat16, channels_last=True)
    exact = pipe(batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=10,
                 output_type="np").images
    low = fast(batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=10,
               output_type="np").images
    other = pipe(batch_size=2, generator=torch.Generator().manual_seed(2), num_inference_steps=10,
                 output_type="np").images
    difference = np.abs(low - exact).max()
    # bf16 rounding (2**-9 a value) through a random-weight UNet and 10 steps: measured 0.115 on
    # images in [0, 1]; another generator's images differ by ~0.9. Bound: a quarter of that.
    assert 0 < difference < 0.25 * np.abs(other - exact).max(), difference
    assert pipe.unet.dtype == torch.float32 and next(pipe.unet.parameters()).is_contiguous()
    assert "bfloat16" in repr(fast) and "channels_last" in repr(fast)


def test_a_pipeline_it_cannot_speed_up_is_returned_unchanged_with_one_warning(unet):
    euler = _pipe("DDPMPipeline", unet, diffusers.EulerDiscreteScheduler(num_train_timesteps=1000))
    thresholded = _pipe("DDPMPipeline", unet, diffusers.DDPMScheduler(num_train_timesteps=1000, thresholding=True))
    third_order = _pipe("DDPMPipeline", unet, diffusers.DPMSolverMultistepScheduler(solver_order=3))

    class OwnLoop(diffusers.DDPMPipeline):
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    own = OwnLoop(unet=unet, scheduler=diffusers.DDPMScheduler())
    for pipe, reason in ((euler, "EulerDiscreteScheduler has no fused fastddpm counterpart"),
                         (thresholded, "thresholding=True"), (third_order, "solver_order=2"),
                         (own, "OwnLoop overrides DDPMPipeline.__call__"), (unet, "not of UNet2DModel")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert fastddpm.accelerate(pipe) is pipe
        assert len(caught) == 1 and reason in str(caught[0].message), [str(w.message) for w in caught]


def test_ddim_steps_landing_between_timesteps_run_the_pipeline(unet):
    pipe = _pipe("DDIMPipeline", unet, diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing"))
    fast = fastddpm.accelerate(pipe)
    with pytest.warns(UserWarning, match="land between two of its timesteps"):
        ours = fast(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=15,
                    output_type="np").images
    theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=15,
                  output_type="np").images
    np.testing.assert_array_equal(ours, theirs)


def test_calls_it_cannot_run_go_to_the_pipeline_with_one_warning_each(unet):
    pipe = _pipe("DDPMPipeline", unet, diffusers.DDPMScheduler(num_train_timesteps=1000))
    fast = fastddpm.accelerate(pipe)
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = fast(batch_size=2, generator=generators, num_inference_steps=4, output_type="np").images
        fast(batch_size=2, generator=[torch.Generator().manual_seed(i) for i in range(2)], num_inference_steps=4,
             output_type="np")
    assert len(caught) == 1 and "a list of generators" in str(caught[0].message)
    theirs = pipe(batch_size=2, generator=[torch.Generator().manual_seed(i) for i in range(2)],
                  num_inference_steps=4, output_type="np").images
    np.testing.assert_array_equal(ours, theirs)


def test_bad_options_are_refused_at_wrapping(unet):
    pipe = _pipe("DDPMPipeline", unet, diffusers.DDPMScheduler())
    with pytest.raises(ValueError, match="model_dtype"):
        fastddpm.accelerate(pipe, model_dtype="int8")
    with pytest.raises(ValueError, match="cuda_graph"):
        fastddpm.accelerate(pipe, cuda_graph="sometimes")
