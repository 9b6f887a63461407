"""``fastddpm.DDPMScheduler`` and ``fastddpm.DDIMScheduler``: diffusers' schedulers, stepping
through fastddpm's fused ops.

Each class is a subclass of diffusers' scheduler of the same name and keeps everything the parent
does (its config and ``register_to_config``, ``from_pretrained`` / ``save_pretrained``,
``from_config``, ``compatibles``, ``set_timesteps``, ``previous_timestep``, ``get_velocity``,
``_get_variance``, its output classes, ...). Only ``step`` and ``add_noise`` are overridden: they
run through :func:`fastddpm.ops.ddpm_step` / :func:`~fastddpm.ops.ddim_step` /
:func:`~fastddpm.ops.q_sample`, one fused Triton kernel on CUDA. ``set_timesteps`` calls the
parent's and then prepares the tables the ops index. diffusers is an optional dependency of
fastddpm: ``pip install fastddpm[diffusers]``.

Tables (a deliberate choice). The ops read a :class:`~fastddpm.schedule.NoiseSchedule` built once
from the parent's own float32 ``alphas_cumprod``, with the per-step coefficients derived from it
in float32 as diffusers' steps derive them (``NoiseSchedule.from_alphas_cumprod(...,
coefficient_dtype=torch.float32)``): the drop-in reproduces diffusers' numbers, rounding
included, to the kernels' rounding. fastddpm's float64 tables are more accurate (and remain what
``fastddpm.sample`` uses), but early in a chain diffusers' float32 ``1 - alpha_bar_t /
alpha_bar_{t-1}`` cancels and moves its posterior coefficients by up to ~2e-4 (relative), which
put the float64 tables past the tolerance of diffusers' own ``test_full_loop_with_noise``.

The fused path. ``step`` runs the fused op when thresholding is off, ``model_output`` and
``sample`` share a device and a dtype the ops store (float16, bfloat16, float32, float64), the
shapes are the ones diffusers splits or uses as they are, and

* DDPM: ``variance_type`` is ``fixed_small``, ``fixed_small_log``, ``fixed_large`` or
  ``learned_range`` (``learned`` and ``fixed_large_log`` run diffusers' step: the op's ``learned``
  reads a log-variance where diffusers' reads a variance). A last step from a timestep t > 0
  (``trailing`` spacing, ``steps_offset``) runs diffusers' step with ``fixed_large`` or
  ``learned_range``, which add real noise there; with ``fixed_small(_log)`` diffusers adds noise
  of standard deviation 1e-10 there, which the op leaves out.
* DDIM: not ``use_clipped_model_output`` together with ``clip_sample`` (the op does not derive
  epsilon again from the clipped x_0).

Anything else runs ``super().step`` unchanged. ``add_noise`` runs :func:`~fastddpm.ops.q_sample`
for samples and noise of one shape, dtype and device with one timestep or one per sample, and the
parent's otherwise.

Noise. Given a ``generator`` (or a list of them), ``step`` draws its noise with diffusers' own
``randn_tensor``, with the shape, dtype and device diffusers' step uses and only where it draws,
so a loop returns diffusers' samples up to float rounding and leaves the generator where
diffusers leaves it. Without a generator the noise is the in-kernel Philox stream of a seed drawn
from torch's global RNG (one ``torch.randint`` on the CPU) on the first noisy step after
construction or ``set_timesteps``; ``torch.manual_seed`` therefore reproduces a run, and diffusers'
per-step draws from the global RNG do not happen. Each noisy step uses the next stream of that
seed, counted on the sample's device.

No host synchronisation in a step. The timestep's place in the schedule comes from the host when
it is known there without a read from a device: a Python int, a tensor on the CPU (diffusers'
pipelines iterate ``scheduler.timesteps``, on the CPU unless ``set_timesteps`` got a device), or
an element of ``scheduler.timesteps`` wherever it lives (its offset in that tensor's storage gives
its position). The index then reaches the op as a view of an index tensor kept on the device.
Another timestep tensor on a device is looked up in a table kept there (``index_select``), never
read back, except where the step needs a decision on the host that the table cannot give: DDPM
with a generator on a chain that ends at timestep 0 (diffusers draws no noise at t = 0), a DDPM
chain ending above 0 with ``fixed_large`` / ``learned_range``, or a DDIM step with a timestep
whose landing timestep is not the next one of the shared table. Those read the timestep back (one
synchronisation), as diffusers' own step does for any timestep on a device. Values of device
timesteps are not validated. The noise stream's counter is an int64 device tensor advanced in
place.
"""
from __future__ import annotations
from __future__ import annotations

# Layout: common.py (what every drop-in adds to its parent), then one module per scheduler.
# diffusers' pipelines load a component recorded as ["fastddpm.schedulers", <class>] in model_index.json
# by looking its loadable base class up in this module: SchedulerMixin stays importable from here.
from .common import diffusers  # noqa: F401  (the one import guard: a clear error without diffusers)
from diffusers import SchedulerMixin  # noqa: F401  (looked up here by diffusers)
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from .common import FUSED_VARIANCE_TYPES, NEGLIGIBLE_LAST_STEP_NOISE  # noqa: F401  (read by pipelines)
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpm_solver import DPMSolverMultistepScheduler
from .unipc import UniPCMultistepScheduler

# Each class is defined in its own module and presented as fastddpm.schedulers' (its __module__):
# diffusers records a pipeline's scheduler by its class's module, and pipelines saved before the
# package split name ["fastddpm.schedulers", <class>]; both load from here.
for _cls in (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler):
    _cls.__module__ = __name__
del _cls

__all__ = ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
           "DDPMSchedulerOutput",
           "DDIMSchedulerOutput", "SchedulerOutput"]
