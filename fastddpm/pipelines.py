"""``fastddpm.accelerate(pipe)``: one line that speeds up an existing diffusers pipeline.

``accelerate`` takes a ``DDPMPipeline`` or ``DDIMPipeline`` (whatever scheduler among the ones
fastddpm subclasses it holds: ``DDPMScheduler``, ``DDIMScheduler``, ``DPMSolverMultistepScheduler``)
and returns an :class:`AcceleratedPipeline`: called with the pipeline's own arguments, it returns
the pipeline's output type, but draws through :func:`fastddpm.sample`: x_T drawn as the pipeline
draws it (``randn_tensor`` with the same generator, device and dtype), the chain the scheduler
would walk (fastddpm's drop-in of the same config chooses the timesteps and builds the float32
tables it would step with), one fused step kernel a step, every step captured in one CUDA graph on
a GPU, and the model options of :mod:`fastddpm.acceleration` (``model_dtype``,
``channels_last``, ``compile``) the caller asks for. With the same generator the images are the
pipeline's up to float rounding (the drop-in scheduler's per-step bound, ~1e-5 of the sample's
scale over a loop; the tests hold 1e-4 on images in [0, 1]) when no model option changes the
model's arithmetic.

Where it cannot take the loop over, nothing is changed:

* at wrapping time (another pipeline class, a pipeline subclass with its own ``__call__``, a
  scheduler fastddpm does not subclass, a scheduler setting the fused steps do not cover): the
  pipeline is returned as it was, with one ``UserWarning`` saying why;
* at call time (a list of generators, DDIM's ``use_clipped_model_output`` with clipping, an
  ``eta`` outside [0, 1]): that call runs the original pipeline, with one warning a reason.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Optional, Union

import torch

from .acceleration import ModelOptions

__all__ = ["accelerate", "AcceleratedPipeline"]


def _diffusers():
    try:
        import diffusers
    except ImportError as error:
        raise ImportError(f"fastddpm.accelerate needs diffusers ({error}); install it with: "
                          "pip install fastddpm[diffusers]") from error
    return diffusers


def accelerate(pipe, *, model_dtype: Union[torch.dtype, str, None] = None, channels_last: bool = False,
               compile: Union[bool, dict] = False, cuda_graph: Union[str, bool] = "auto"):
    """``pipe`` with its denoising loop run by fastddpm (see the module docstring).

    Args:
        pipe: a diffusers ``DDPMPipeline`` or ``DDIMPipeline``.
        model_dtype, channels_last, compile: how the UNet runs (:func:`fastddpm.sample`'s options
            of the same names; a cast copy, the pipeline's UNet is not modified).
        cuda_graph: as in :func:`fastddpm.sample` (``"auto"``: capture on a GPU, fall back with a
            warning).

    Returns an :class:`AcceleratedPipeline`, or ``pipe`` itself (with a warning) where fastddpm
    cannot run its loop.
    """
    options = ModelOptions.build(model_dtype, channels_last, compile)
    if cuda_graph not in ("auto", True, False):
        raise ValueError(f"cuda_graph must be 'auto', True or False, got {cuda_graph!r}")
    reason = _why_not(pipe)
    if reason is None:
        scheduler, reason = _drop_in(pipe)
        if reason is None:
            return AcceleratedPipeline(pipe, scheduler, options, cuda_graph)
    warnings.warn(f"fastddpm.accelerate: returning the pipeline unchanged: {reason}", UserWarning, stacklevel=2)
    return pipe


def _why_not(pipe) -> Optional[str]:
    diffusers = _diffusers()
    kinds = (diffusers.DDPMPipeline, diffusers.DDIMPipeline)
    if not isinstance(pipe, kinds):
        name = type(pipe).__name__
        scheduler = getattr(pipe, "scheduler", None)
        hint = ""
        if scheduler is not None and type(scheduler).__name__ in _SAMPLERS_OF:
            hint = (f"; its scheduler can still be swapped for fastddpm.{type(scheduler).__name__}.from_config("
                    "pipe.scheduler.config), which fuses each step")
        return f"fastddpm runs the loop of DDPMPipeline and DDIMPipeline, not of {name}{hint}"
    base = next(kind for kind in kinds if isinstance(pipe, kind))
    if type(pipe).__call__ is not base.__call__:
        return f"{type(pipe).__name__} overrides {base.__name__}.__call__ (its loop is its own)"
    return None


# diffusers scheduler class name -> the fastddpm sampler that walks its chain
_SAMPLERS_OF = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim", "DPMSolverMultistepScheduler": "dpmpp_2m"}


def _drop_in(pipe):
    """fastddpm's scheduler of the pipeline's scheduler config, or the reason there is none."""
    from . import schedulers

    name = type(pipe.scheduler).__name__
    if name not in _SAMPLERS_OF:
        return None, (f"its scheduler {name} has no fused fastddpm counterpart (DDPMScheduler, DDIMScheduler, "
                      "DPMSolverMultistepScheduler)")
    scheduler = getattr(schedulers, name).from_config(pipe.scheduler.config)
    config = scheduler.config
    if scheduler._trained is None:
        return None, "its float32 alpha_bar reaches 0 before the last timestep (diffusers' own step handles that)"
    if getattr(config, "thresholding", False):
        return None, "thresholding=True runs diffusers' step (not fused)"
    if name == "DDPMScheduler" and config.variance_type not in schedulers.FUSED_VARIANCE_TYPES:
        return None, f"variance_type={config.variance_type!r} runs diffusers' step (not fused)"
    if name == "DPMSolverMultistepScheduler":
        if not scheduler._fused_settings():
            return None, ("the fused DPM-Solver++ step covers algorithm_type 'dpmsolver++' / 'sde-dpmsolver++', "
                          "solver_type='midpoint', no thresholding, and the plain VP, Karras, exponential or beta "
                          "sigmas")
        if config.solver_order != 2:
            return None, (f"solver_order={config.solver_order}: the drop-in scheduler fuses it in your own loop, but "
                          "fastddpm.sample walks DPM-Solver++(2M) (solver_order=2)")
        if config.variance_type is not None:
            return None, f"variance_type={config.variance_type!r} is not fused for DPMSolverMultistepScheduler here"
    return scheduler, None


class AcceleratedPipeline:
    """A ``DDPMPipeline`` / ``DDIMPipeline`` whose ``__call__`` draws through :func:`fastddpm.sample`.

    Called exactly as the pipeline (same arguments and defaults, same output type). Every other
    attribute is the wrapped pipeline's (``unet``, ``device``, ``save_pretrained``, ...), except
    ``scheduler``: fastddpm's drop-in built from the pipeline's scheduler config. ``pipeline`` is
    the original, unchanged.
    """

    def __init__(self, pipe, scheduler, options: ModelOptions, cuda_graph):
        self.pipeline = pipe
        self.scheduler = scheduler
        # the sampler that walks the drop-in's chain (the DPM scheduler's algorithm says which variant)
        variant = getattr(scheduler, "fused_sampler", None)
        self.sampler = variant() if variant is not None else _SAMPLERS_OF[type(scheduler).__name__]
        self.options, self.cuda_graph = options, cuda_graph
        self._signature = inspect.signature(type(pipe).__call__)
        self.__signature__ = self._signature.replace(parameters=list(self._signature.parameters.values())[1:])
        self._warned = set()

    def __getattr__(self, name):
        if name == "pipeline":  # not set yet (copy / unpickling)
            raise AttributeError(name)
        return getattr(self.pipeline, name)

    def __repr__(self) -> str:
        return (f"fastddpm.AcceleratedPipeline({type(self.pipeline).__name__}, sampler={self.sampler!r}, "
                f"model: {self.options.describe()})")

    def to(self, *args, **kwargs) -> "AcceleratedPipeline":
        self.pipeline.to(*args, **kwargs)
        return self

    def _fall_back(self, reason: str, arguments: dict):
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"fastddpm.AcceleratedPipeline: this call runs the original pipeline: {reason}",
                          UserWarning, stacklevel=3)
        return self.pipeline(**arguments)

    def __call__(self, *args, **kwargs):
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
        from diffusers.utils.torch_utils import randn_tensor

        from .sampling import sample

        bound = self._signature.bind(self.pipeline, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        arguments.pop(next(iter(self._signature.parameters)))  # self
        extra = arguments.pop("kwargs", None)
        if extra:
            raise TypeError(f"unexpected keyword arguments {', '.join(extra)}")
        generator = arguments["generator"]
        eta = float(arguments.get("eta", 0.0) or 0.0)
        if isinstance(generator, list):
            return self._fall_back("a list of generators (one per sample)", arguments)
        if self.sampler == "ddim":
            if not 0.0 <= eta <= 1.0:
                return self._fall_back(f"eta={eta} outside [0, 1]", arguments)
            if arguments.get("use_clipped_model_output") and self.scheduler.config.clip_sample:
                return self._fall_back("use_clipped_model_output with clip_sample", arguments)

        pipe, unet, scheduler = self.pipeline, self.pipeline.unet, self.scheduler
        config = unet.config
        size = config.sample_size
        shape = (arguments["batch_size"], config.in_channels, *((size, size) if isinstance(size, int) else size))
        device = pipe._execution_device
        scheduler.set_timesteps(arguments["num_inference_steps"])
        chain, why_not = self._chain(scheduler)
        if chain is None:
            return self._fall_back(why_not, arguments)
        # x_T exactly as the pipeline draws it (the generator's device, then moved; the UNet's dtype).
        x_t = randn_tensor(shape, generator=generator, device=device, dtype=unet.dtype)
        sched = scheduler.config
        settings = dict(prediction_type=sched.prediction_type, clip_denoised=bool(getattr(sched, "clip_sample", False)),
                        clip_range=float(getattr(sched, "clip_sample_range", 1.0)))
        if self.sampler == "ddpm":
            settings["variance_type"] = sched.variance_type
        if self.sampler == "ddim":
            settings["eta"] = eta
        noise = dict(generator=generator) if generator is not None else {}
        progress = not dict(getattr(pipe, "_progress_bar_config", {}) or {}).get("disable", False)
        # num_steps: every level of the drop-in's chain (no respacing by sample()'s default steps).
        image = sample(unet, shape, schedule=chain, num_steps=chain.num_timesteps, sampler=self.sampler, noise=x_t,
                       device=device, dtype=unet.dtype, progress=progress, cuda_graph=self.cuda_graph, **self.options.sample_kwargs(),
                       **settings, **noise)
        if generator is not None and self.sampler == "dpmpp_2m_sde":
            # diffusers also draws the last step's noise (onto x_0, where its coefficient is 0): draw it
            # too, so that the generator is left where the pipeline leaves it.
            randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        if generator is not None and self.sampler == "ddpm" and scheduler._chain_start > 0:
            # diffusers also draws the last step's noise from a timestep above 0 (of standard deviation
            # 1e-10 with the fixed_small variances, which the fused step leaves out): draw it too, so
            # that the generator is left where the pipeline leaves it.
            randn_tensor(shape, generator=generator, device=device, dtype=unet.dtype)
        return self._finish(image, arguments, ImagePipelineOutput)

    def _chain(self, scheduler):
        """``(schedule, None)``: the chain the drop-in would step on after ``set_timesteps``; or
        ``(None, why)`` where fastddpm.sample cannot walk it."""
        from .schedulers import NEGLIGIBLE_LAST_STEP_NOISE

        if self.sampler == "ddpm":
            if scheduler._chain_start > 0 and scheduler.variance_type not in NEGLIGIBLE_LAST_STEP_NOISE:
                return None, (f"a chain ending at timestep {scheduler._chain_start} > 0 with variance_type="
                              f"{scheduler.variance_type!r} (diffusers' own last step)")
            return scheduler._chain, None
        if self.sampler == "ddim":
            # fastddpm.sample walks every level of the chain: each step must land on the next
            # timestep (diffusers' DDIM lands on t - T // n, which "trailing" spacing and some step
            # counts put between two timesteps).
            if not scheduler._all_shared or scheduler._shared.num_timesteps != len(scheduler._host_timesteps):
                return None, ("DDIM steps that land between two of its timesteps (t - T // n is not the next "
                              "timestep; e.g. 'trailing' spacing)")
            return scheduler._shared, None
        if scheduler._chain is None:
            return None, "timesteps that repeat (not fused)"
        chain, solver = scheduler._chain, scheduler._solver
        walked = type(solver)(sde=solver.sde)  # the orders fastddpm.sample's dpmpp_2m steps with
        steps = chain.num_timesteps
        if any(solver.order_at(i, steps) != walked.order_at(i, steps) for i in range(steps)):
            return None, ("steps of other orders than DPM-Solver++(2M)'s (solver_order 1 or 3, or a second-order "
                          "last step onto sigma_min): the drop-in scheduler fuses them, fastddpm.sample walks 2M")
        return chain, None

    def _finish(self, image: torch.Tensor, arguments: dict, output_class):
        """The pipeline's own post-processing: [0, 1], then numpy / PIL, hooks freed."""
        image = (image / 2 + 0.5).clamp(0, 1)
        output_type = arguments["output_type"]
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = self.pipeline.numpy_to_pil(image)
        self.pipeline.maybe_free_model_hooks()
        if not arguments["return_dict"]:
            return (image,)
        return output_class(images=image)
