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

import functools
import inspect
import numbers
import warnings
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch

try:
    import diffusers
    # diffusers' pipelines load a component recorded as ["fastddpm.schedulers", <class>] in
    # model_index.json by looking its loadable base class up in this module: keep SchedulerMixin here.
    from diffusers import SchedulerMixin  # noqa: F401
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
    from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
    from diffusers.schedulers.scheduling_utils import SchedulerOutput
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as error:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    raise ImportError(f"fastddpm.DDPMScheduler, DDIMScheduler and DPMSolverMultistepScheduler subclass diffusers' "
                      f"schedulers, but "
                      f"diffusers cannot be imported ({reason}); install it with: pip install fastddpm[diffusers]"
                      ) from error

from . import ops
from .checks import check_bool, draw_seed, check_choice, check_int, check_positive, check_real
from .schedule import NoiseSchedule
from .step import StepSpec

__all__ = ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "DDPMSchedulerOutput",
           "DDIMSchedulerOutput", "SchedulerOutput"]

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
DDPM_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
# DDPM variance types the fused op computes as diffusers does.
FUSED_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned_range")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
# On a last step from a timestep t > 0 the posterior variance is 0 and diffusers floors it at 1e-20
# before the square root: noise of standard deviation 1e-10, below float32 resolution of any
# sample that is not itself ~1e-3 or less. The op adds none there.
NEGLIGIBLE_LAST_STEP_NOISE = ("fixed_small", "fixed_small_log")
# Timestep tensors on these devices are read on the host (no synchronisation with a device).
HOST_DEVICE_TYPES = ("cpu",)


# ---------------------------------------------------------------------------------------------
# argument checks (each names the argument)
# ---------------------------------------------------------------------------------------------
def _check_tensors(**named) -> None:
    for name, value in named.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _check_generator(generator) -> None:
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, list) and generator and all(isinstance(g, torch.Generator) for g in generator):
        return
    raise TypeError(f"generator must be a torch.Generator, a list of them, or None, got {type(generator).__name__}")


def _fusable_tensors(model_output: torch.Tensor, sample: torch.Tensor) -> bool:
    """Whether the ops take these tensors as diffusers' step would use them."""
    return (model_output.device == sample.device and model_output.dtype == sample.dtype
            and sample.dtype in ops.STORAGE_DTYPES and sample.ndim >= 1)


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of a small CPU tensor on ``device`` that does not block the host (on CUDA: from
    pinned memory, asynchronously)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _init_of(parent):
    """An ``__init__`` that checks the arguments, runs the parent's (which registers the config)
    and prepares the tables. It carries the parent's signature (``functools.wraps``), which
    diffusers' ``from_config`` and ``compatibles`` read."""

    @functools.wraps(parent.__init__)
    def __init__(self, *args, **kwargs):
        public = {key: value for key, value in kwargs.items() if not key.startswith("_")}
        bound = inspect.signature(parent.__init__).bind(self, *args, **public)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        del arguments[next(iter(arguments))]  # self
        problems: List[str] = []
        self._check_arguments(arguments, problems)
        parent.__init__(self, *args, **kwargs)  # diffusers' own errors stay errors
        self._check_betas(arguments, problems)
        # Where diffusers accepts a setting fastddpm finds nonsensical, the scheduler accepts it too,
        # warns once naming it, and steps exactly as diffusers does (the parent's step, not fused).
        self._unfusable = bool(problems)
        for problem in problems:
            warnings.warn(f"fastddpm.{type(self).__name__}: {problem}; diffusers accepts this setting, so this "
                          "scheduler keeps it and runs diffusers' own step (not fused)", UserWarning, stacklevel=2)
        self._prepare()

    return __init__


def _noted(problems: List[str], check, *args, **kwargs) -> None:
    """Run one argument check; a failure is noted in ``problems`` (a warning), not raised."""
    try:
        check(*args, **kwargs)
    except (ValueError, TypeError) as error:
        problems.append(str(error))


# ---------------------------------------------------------------------------------------------
# what both schedulers add to their parent
# ---------------------------------------------------------------------------------------------
class _FusedSteps:
    """Argument checks, the NoiseSchedule of the parent's alpha_bar, timestep -> index tables on
    the device, the in-kernel noise stream, and ``add_noise``."""

    # prediction types the parent accepts (DPMSolverMultistepScheduler adds flow_prediction)
    _prediction_types: Tuple[str, ...] = PREDICTION_TYPES

    # ------------------------------------------------------------------ construction
    def _check_arguments(self, arguments: dict, problems: List[str]) -> None:
        """Settings diffusers accepts and then fails on, or silently treats as something else,
        later: each noted in ``problems`` (warned about; the parent's step runs)."""
        _noted(problems, check_int, "num_train_timesteps", arguments["num_train_timesteps"], 1)
        if arguments["trained_betas"] is None:
            _noted(problems, check_real, "beta_start", arguments["beta_start"])
            _noted(problems, check_real, "beta_end", arguments["beta_end"])
        _noted(problems, check_choice, "prediction_type", arguments["prediction_type"], self._prediction_types)
        _noted(problems, check_choice, "timestep_spacing", arguments["timestep_spacing"], TIMESTEP_SPACINGS)
        for name in ("clip_sample", "thresholding", "rescale_betas_zero_snr"):
            if name in arguments:  # DPMSolverMultistepScheduler has no clip_sample
                _noted(problems, check_bool, name, arguments[name])
        if "clip_sample_range" in arguments:
            _noted(problems, check_positive, "clip_sample_range", arguments["clip_sample_range"])
        _noted(problems, check_positive, "dynamic_thresholding_ratio", arguments["dynamic_thresholding_ratio"],
               maximum=1.0)
        _noted(problems, check_positive, "sample_max_value", arguments["sample_max_value"])
        _noted(problems, check_int, "steps_offset", arguments["steps_offset"], 0)

    def _check_betas(self, arguments: dict, problems: List[str]) -> None:
        if any(problem.startswith(("beta_start", "beta_end")) for problem in problems):
            return  # one warning for one setting
        betas, total = self.betas, arguments["num_train_timesteps"]
        if arguments["trained_betas"] is not None:
            if betas.ndim != 1 or betas.numel() != total:
                problems.append(f"trained_betas should hold num_train_timesteps={total} values (a 1-D sequence), "
                                f"got shape {tuple(betas.shape)} (diffusers then fails at the first step past the "
                                "betas given)")
                return
            source = "trained_betas"
        else:
            source = (f"beta_schedule={arguments['beta_schedule']!r} with beta_start={arguments['beta_start']!r}, "
                      f"beta_end={arguments['beta_end']!r}")
        if not torch.isfinite(betas).all() or (betas <= 0).any() or (betas > 1).any():
            problems.append(f"the betas of {source} should all lie in (0, 1] (beta_t is the variance step t adds), "
                            f"got values in [{betas.min().item():.4g}, {betas.max().item():.4g}]")

    def _prepare(self) -> None:
        # The one schedule the steps and add_noise read, of the parent's float32 alpha_bar with the
        # coefficients derived as diffusers derives them; its indices are trained timesteps.
        try:
            self._trained = NoiseSchedule.from_alphas_cumprod(self.alphas_cumprod, coefficient_dtype=torch.float32)
        except ValueError:
            # float32 alpha_bar reaching 0 before the last timestep (large betas over a long chain)
            # leaves steps the tables cannot hold (diffusers' give 0 / 0 there): run the parent's.
            self._trained = None
        if getattr(self, "_unfusable", False):  # a setting warned about at construction
            self._trained = None
        self._index_cache: Dict[torch.device, torch.Tensor] = {}
        self._lookup_host: Optional[torch.Tensor] = None
        self._lookup_cache: Dict[torch.device, torch.Tensor] = {}
        self._remember_timesteps(self.timesteps.tolist())
        self._reset_noise()

    # ------------------------------------------------------------------ set_timesteps helpers
    def _check_num_inference_steps(self, num_inference_steps) -> None:
        total = self.config.num_train_timesteps
        if isinstance(num_inference_steps, (bool, np.bool_)) or not isinstance(num_inference_steps, (int, np.integer)) \
                or not 1 <= num_inference_steps <= total:
            raise ValueError(f"num_inference_steps must be an int in [1, num_train_timesteps={total}], "
                             f"got {num_inference_steps!r}")

    def _set_parent_timesteps(self, call, device) -> List[int]:
        """Run the parent's ``set_timesteps`` (``call``) on the CPU, check the timesteps it chose,
        move them to ``device`` as the parent would, and return them as ints. A refused choice
        leaves the scheduler as it was."""
        saved = {name: self.__dict__[name] for name in ("timesteps", "num_inference_steps", "custom_timesteps",
                                                        "sigmas", "model_outputs", "lower_order_nums",
                                                        "_step_index", "_begin_index")
                 if name in self.__dict__}
        call()
        values = self.timesteps.tolist()
        total = self.config.num_train_timesteps
        if self._trained is not None and (min(values) < 0 or max(values) >= total):
            self.__dict__.update(saved)
            raise ValueError(f"timestep_spacing={self.config.timestep_spacing!r} with "
                             f"steps_offset={self.config.steps_offset} gives timesteps outside "
                             f"[0, {total - 1}] ({values[:3]}...); lower steps_offset or num_inference_steps")
        self.timesteps = self.timesteps.to(device)
        self._remember_timesteps(values)
        self._reset_noise()
        return values

    def _remember_timesteps(self, values: List[int]) -> None:
        """Host copy of ``self.timesteps`` and its storage, so that an element of it identifies
        its position without being read."""
        self._host_timesteps = list(values)
        reference = self.timesteps
        self._timesteps_reference = reference if reference.ndim == 1 and reference.is_contiguous() else None

    def _set_lookup(self, index_of: Dict[int, int], schedule: NoiseSchedule) -> None:
        """Timestep -> index table of ``schedule`` (-1 off the table), copied to a device once on
        first use; after ``set_timesteps(device=...)`` it and the schedule's kernel table are
        copied there now, so that no step copies anything."""
        table = torch.full((self.config.num_train_timesteps,), -1, dtype=torch.int64)
        for timestep, index in index_of.items():
            table[timestep] = index
        self._lookup_host = table
        self._lookup_cache = {}
        device = self.timesteps.device
        if device.type not in HOST_DEVICE_TYPES:
            self._lookup(device)
            schedule.table(device, torch.float32)

    # ------------------------------------------------------------------ timestep -> index
    def _host_timestep(self, timestep) -> Optional[int]:
        """The timestep as an int when the host knows it without reading a device tensor, else None."""
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1 or timestep.dtype.is_floating_point or timestep.dtype.is_complex \
                    or timestep.dtype == torch.bool:
                raise TypeError(f"timestep must be an int or an integer tensor of one element, got a "
                                f"{timestep.dtype} tensor of shape {tuple(timestep.shape)}")
            position = self._position_in_timesteps(timestep)
            if position is not None:
                return self._host_timesteps[position]
            if timestep.device.type in HOST_DEVICE_TYPES:
                return int(timestep)
            return None
        if isinstance(timestep, (int, np.integer)) and not isinstance(timestep, (bool, np.bool_)):
            return int(timestep)
        raise TypeError(f"timestep must be an int or an integer tensor of one element, got {type(timestep).__name__}")

    def _position_in_timesteps(self, timestep: torch.Tensor) -> Optional[int]:
        """Position of ``timestep`` in ``self.timesteps`` when it is an element of it (a view into
        its storage, as iterating over it or indexing it gives), else None."""
        reference = self._timesteps_reference
        if reference is None or timestep.device != reference.device or timestep.dtype != reference.dtype:
            return None
        if timestep.untyped_storage().data_ptr() != reference.untyped_storage().data_ptr():
            return None
        position = timestep.storage_offset() - reference.storage_offset()
        return position if 0 <= position < len(self._host_timesteps) else None

    def _index_on(self, index: int, device: torch.device) -> torch.Tensor:
        """``index`` as an int64 device tensor [], a view of one kept on the device (no copy)."""
        indices = self._index_cache.get(device)
        if indices is None:
            indices = self._index_cache[device] = torch.arange(self.config.num_train_timesteps + 1, device=device)
        return indices[index]

    def _lookup(self, device: torch.device) -> torch.Tensor:
        table = self._lookup_cache.get(device)
        if table is None:
            table = self._lookup_cache[device] = _to_device(self._lookup_host, device)
        return table

    def _looked_up_index(self, timestep: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Schedule index of a device timestep, gathered on the device (never read back)."""
        table = self._lookup(device)
        position = timestep.reshape(1).to(device=device, dtype=torch.int64).clamp(0, table.shape[0] - 1)
        return table.index_select(0, position).reshape(())

    # ------------------------------------------------------------------ noise
    def _reset_noise(self) -> None:
        self._noise_seed: Optional[int] = None
        self._noise_streams: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}

    def _noise_stream(self, device: torch.device) -> dict:
        """The in-kernel noise of this step as the ops' ``seed`` / ``noise_offset`` /
        ``index_base``, int64 tensors [] on ``device``; advance ``noise_offset`` after the step.
        The seed is drawn from torch's global RNG (on the CPU) once per set_timesteps, so the same
        ``torch.manual_seed`` gives the same noise on every device."""
        if self._noise_seed is None:
            self._noise_seed = draw_seed()  # as sample() draws one
        stream = self._noise_streams.get(device)
        if stream is None:
            seed = _to_device(torch.tensor(self._noise_seed, dtype=torch.int64), device)
            stream = self._noise_streams[device] = (seed, torch.zeros((), dtype=torch.int64, device=device))
        seed, counter = stream
        return dict(seed=seed, noise_offset=counter, index_base=self._zero_on(device))

    def _zero_on(self, device: torch.device) -> torch.Tensor:
        """An int64 zero [] on ``device`` (never written): the ops' index_base, and the seed and
        offset of a step whose noise is not used."""
        return self._index_on(0, device)

    # ------------------------------------------------------------------ forward process
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """diffusers' ``add_noise`` (sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise) through
        :func:`fastddpm.ops.q_sample`, for one timestep or one per sample; the parent's for other
        shapes, or mixed dtypes and devices."""
        _check_tensors(original_samples=original_samples, noise=noise)
        if not isinstance(timesteps, torch.Tensor) or timesteps.dtype.is_floating_point \
                or timesteps.dtype.is_complex or timesteps.dtype == torch.bool:
            raise TypeError(f"timesteps must be an integer tensor, got "
                            f"{timesteps.dtype if isinstance(timesteps, torch.Tensor) else type(timesteps).__name__}")
        batch = original_samples.shape[0] if original_samples.ndim else None
        fusable = (self._trained is not None and _fusable_tensors(noise, original_samples)
                   and noise.shape == original_samples.shape and timesteps.numel() in (1, batch))
        if not fusable:
            return super().add_noise(original_samples, noise, timesteps)
        t = timesteps.reshape(()) if timesteps.numel() == 1 else timesteps.reshape(-1)
        return ops.q_sample(original_samples, t.to(original_samples.device), self._trained, noise=noise)


# ---------------------------------------------------------------------------------------------
# DDPM
# ---------------------------------------------------------------------------------------------
class DDPMScheduler(_FusedSteps, diffusers.DDPMScheduler):
    """diffusers' ``DDPMScheduler`` whose ``step`` and ``add_noise`` run fastddpm's fused ops.

    Constructor, config and every other method are diffusers'; see :mod:`fastddpm.schedulers`
    for the settings that take the fused path, the noise and the synchronisation-free lookup.
    """

    __init__ = _init_of(diffusers.DDPMScheduler)

    def _check_arguments(self, arguments: dict, problems: List[str]) -> None:
        super()._check_arguments(arguments, problems)
        _noted(problems, check_choice, "variance_type", arguments["variance_type"], DDPM_VARIANCE_TYPES)

    def _prepare(self) -> None:
        super()._prepare()
        self._set_chain(self._host_timesteps)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Union[str, torch.device, None] = None,
                      timesteps: Optional[List[int]] = None) -> None:
        """diffusers' ``set_timesteps``, then the sampling chain's schedule and lookup table."""
        if num_inference_steps is None and timesteps is None:
            raise ValueError("set_timesteps needs num_inference_steps or timesteps")
        if timesteps is None:
            self._check_num_inference_steps(num_inference_steps)
        elif num_inference_steps is None:
            values = np.asarray(timesteps.cpu() if isinstance(timesteps, torch.Tensor) else timesteps)
            if values.ndim != 1 or values.size == 0 or not np.issubdtype(values.dtype, np.integer) or values.min() < 0:
                raise ValueError(f"timesteps must be a non-empty 1-D sequence of ints >= 0, got {timesteps!r}")
        values = self._set_parent_timesteps(
            lambda: super(DDPMScheduler, self).set_timesteps(num_inference_steps, None, timesteps), device)
        self._set_chain(values)

    def _set_chain(self, values: List[int]) -> None:
        """The respaced schedule of the sampling chain: index i is the i-th smallest timestep, and
        its step lands on index i - 1 (diffusers' ``previous_timestep``)."""
        if self._trained is None:
            return
        ascending = sorted(values)
        if ascending == list(range(self.config.num_train_timesteps)):
            self._chain = self._trained
        else:
            self._chain = self._trained.respace(ascending)
        self._chain_index = {t: i for i, t in enumerate(ascending)}
        self._chain_start = ascending[0]
        self._set_lookup(self._chain_index, self._chain)

    def _needs_host_timestep(self, generator) -> bool:
        if self._chain_start == 0:
            return generator is not None  # diffusers draws noise only where t > 0
        return self.variance_type not in NEGLIGIBLE_LAST_STEP_NOISE

    def step(self, model_output: torch.Tensor, timestep: Union[int, torch.Tensor], sample: torch.Tensor,
             generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
             return_dict: bool = True) -> Union[DDPMSchedulerOutput, Tuple]:
        """diffusers' ``DDPMScheduler.step``, fused where the settings allow (module docstring)."""
        _check_tensors(model_output=model_output, sample=sample)
        _check_generator(generator)
        learned = self.variance_type in LEARNED_VARIANCE_TYPES
        expected = (*sample.shape[:1], 2 * sample.shape[1], *sample.shape[2:]) if learned and sample.ndim >= 2 \
            else tuple(sample.shape)
        if (self._trained is None or self.config.thresholding or self.variance_type not in FUSED_VARIANCE_TYPES
                or not _fusable_tensors(model_output, sample) or tuple(model_output.shape) != expected):
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)

        device = sample.device
        t = self._host_timestep(timestep)
        if t is None and self._needs_host_timestep(generator):
            t = int(timestep)  # a device tensor read back (see the module docstring)
        if t is not None:
            index = self._chain_index.get(t)
            if index is None:
                raise ValueError(f"timestep {t} is not one of the scheduler's timesteps "
                                 f"({self._host_timesteps[:3]}...{self._host_timesteps[-1:]})")
            if index == 0 and t > 0 and self.variance_type not in NEGLIGIBLE_LAST_STEP_NOISE:
                return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
            draws = t > 0
            index = self._index_on(index, device)
        else:
            draws = True  # every timestep of this chain is > 0, or there is no generator
            index = self._looked_up_index(timestep, device)

        if generator is None:
            noise, stream = None, self._noise_stream(device)
        elif draws:
            noise, stream = randn_tensor(sample.shape, generator=generator, device=model_output.device,
                                         dtype=model_output.dtype), {}
        else:  # t = 0: the op adds no noise, but takes a stream
            zero = self._zero_on(device)
            noise, stream = None, dict(seed=zero, noise_offset=zero, index_base=zero)
        config = self.config
        prev_sample, pred_original_sample = ops.ddpm_step(
            model_output, index, sample, self._chain, prediction_type=config.prediction_type,
            variance_type=self.variance_type, clip_denoised=config.clip_sample, clip_range=config.clip_sample_range,
            noise=noise, **stream,
        )
        if generator is None:
            stream["noise_offset"].add_(1)
        if not return_dict:
            return prev_sample, pred_original_sample
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


# ---------------------------------------------------------------------------------------------
# DDIM
# ---------------------------------------------------------------------------------------------
class DDIMScheduler(_FusedSteps, diffusers.DDIMScheduler):
    """diffusers' ``DDIMScheduler`` whose ``step`` and ``add_noise`` run fastddpm's fused ops.

    As in diffusers, the step from timestep t lands on t - num_train_timesteps //
    num_inference_steps (below 0: ``final_alpha_cumprod``), from any timestep.
    """

    __init__ = _init_of(diffusers.DDIMScheduler)

    def _check_arguments(self, arguments: dict, problems: List[str]) -> None:
        super()._check_arguments(arguments, problems)
        _noted(problems, check_bool, "set_alpha_to_one", arguments["set_alpha_to_one"])

    def _prepare(self) -> None:
        super()._prepare()
        # alpha_bar below trained timestep 0, where a step landing below 0 goes (the parent's value).
        self._final_alpha_cumprod = float(self.final_alpha_cumprod)
        self._plan: Dict[int, Tuple[NoiseSchedule, int]] = {}
        self._shared: Optional[NoiseSchedule] = None
        self._all_shared = False

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device, None] = None) -> None:
        """diffusers' ``set_timesteps``, then the schedule the steps index and its lookup table."""
        self._check_num_inference_steps(num_inference_steps)
        values = self._set_parent_timesteps(
            lambda: super(DDIMScheduler, self).set_timesteps(num_inference_steps, None), device)
        self._plan_steps(values)

    def _landing(self, t: int) -> int:
        return t - self.config.num_train_timesteps // self.num_inference_steps

    def _plan_steps(self, values: List[int]) -> None:
        """One schedule respaced to the sampling timesteps and their landing timesteps serves every
        step whose landing timestep is the level just below it (every spacing diffusers offers);
        another step gets a schedule of its own two levels."""
        if self._trained is None:
            return
        landing = {t: self._landing(t) for t in values}
        levels = sorted(set(landing) | {p for p in landing.values() if p >= 0})
        shared = self._trained.respace(levels, final_alpha_cumprod=self._final_alpha_cumprod)
        position = {level: i for i, level in enumerate(levels)}
        self._plan, shared_index = {}, {}
        for t, p in landing.items():
            i = position[t]
            if (i == 0) if p < 0 else (i > 0 and levels[i - 1] == p):
                self._plan[t] = (shared, i)
                shared_index[t] = i
            else:
                self._plan[t] = self._pair(t, p)
        self._shared, self._all_shared = shared, len(shared_index) == len(landing)
        self._set_lookup(shared_index, shared)

    def _pair(self, t: int, landing: int) -> Tuple[NoiseSchedule, int]:
        if landing < 0:
            return self._trained.respace([t], final_alpha_cumprod=self._final_alpha_cumprod), 0
        return self._trained.respace([landing, t], final_alpha_cumprod=self._final_alpha_cumprod), 1

    def _step_target(self, t: int) -> Tuple[NoiseSchedule, int]:
        target = self._plan.get(t)
        if target is None:  # diffusers steps from any timestep; build that step's pair once
            if not 0 <= t < self.config.num_train_timesteps:
                raise ValueError(f"timestep must lie in [0, {self.config.num_train_timesteps - 1}], got {t}")
            target = self._plan[t] = self._pair(t, self._landing(t))
        return target

    def step(self, model_output: torch.Tensor, timestep: Union[int, torch.Tensor], sample: torch.Tensor,
             eta: float = 0.0, use_clipped_model_output: bool = False,
             generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
             variance_noise: Optional[torch.Tensor] = None,
             return_dict: bool = True) -> Union[DDIMSchedulerOutput, Tuple]:
        """diffusers' ``DDIMScheduler.step``, fused where the settings allow (module docstring)."""
        def parent():
            return super(DDIMScheduler, self).step(model_output, timestep, sample, eta, use_clipped_model_output,
                                                   generator, variance_noise, return_dict)

        if self.num_inference_steps is None:
            return parent()  # diffusers' error: set_timesteps first
        _check_tensors(model_output=model_output, sample=sample)
        _check_generator(generator)
        if isinstance(eta, torch.Tensor):
            return parent()
        if isinstance(eta, (bool, np.bool_)) or not isinstance(eta, numbers.Real) or not eta >= 0:
            raise ValueError(f"eta must be a number >= 0, got {eta!r}")
        eta = float(eta)
        if (self._trained is None or self.config.thresholding
                or (use_clipped_model_output and self.config.clip_sample)
                or not _fusable_tensors(model_output, sample) or model_output.shape != sample.shape):
            return parent()
        if eta > 0 and variance_noise is not None:
            if generator is not None or not isinstance(variance_noise, torch.Tensor) \
                    or not _fusable_tensors(variance_noise, sample) or variance_noise.shape != sample.shape:
                return parent()  # diffusers' error, or its broadcasting

        device = sample.device
        t = self._host_timestep(timestep)
        if t is None and not self._all_shared:
            t = int(timestep)  # a device tensor read back (see the module docstring)
        if t is not None:
            schedule, index = self._step_target(t)
            index = self._index_on(index, device)
        else:
            schedule, index = self._shared, self._looked_up_index(timestep, device)

        noise, stream = None, {}
        if eta > 0:
            if variance_noise is not None:
                noise = variance_noise
            elif generator is not None:
                noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                     dtype=model_output.dtype)
            else:
                stream = self._noise_stream(device)
        config = self.config
        prev_sample, pred_original_sample = ops.ddim_step(
            model_output, index, sample, schedule, eta=eta, prediction_type=config.prediction_type,
            clip_denoised=config.clip_sample, clip_range=config.clip_sample_range, noise=noise, **stream,
        )
        if stream:
            stream["noise_offset"].add_(1)
        if not return_dict:
            return prev_sample, pred_original_sample
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


# ---------------------------------------------------------------------------------------------
# DPM-Solver++(2M)
# ---------------------------------------------------------------------------------------------
# Sigma schedules other than the plain VP one of the trained alpha_bar (the fused step's chain).
DPM_SIGMA_SCHEDULES = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                       "use_flow_sigmas")
# Of those, the ones the fused step takes: another chain of noise levels, the same step. The chain's
# table is built from alpha_bar = 1 / (1 + sigma^2) of diffusers' own sigmas (set_timesteps).
DPM_FUSED_SIGMA_SCHEDULES = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def _dpmpp_2m(spec: StepSpec, model_output: torch.Tensor, index: torch.Tensor, x: torch.Tensor,
              previous_x0: torch.Tensor, chain: NoiseSchedule) -> torch.Tensor:
    """One fused DPM-Solver++(2M) step from chain index ``index`` (:func:`fastddpm.ops.dpmpp_2m_step`,
    the op :func:`fastddpm.samplers.dpmpp_2m` steps with too): returns x_{i-1} and overwrites
    ``previous_x0`` (contiguous, x's shape) with this step's x_0."""
    return ops.dpmpp_2m_step(spec, model_output, index, x, previous_x0, chain)


class DPMSolverMultistepScheduler(_FusedSteps, diffusers.DPMSolverMultistepScheduler):
    """diffusers' ``DPMSolverMultistepScheduler`` whose ``step`` runs fastddpm's fused
    DPM-Solver++(2M) step (``kernels/dpm_solver.py``; :func:`fastddpm.reference.dpmpp_2m_step`
    off CUDA unless ``FASTDDPM_BACKEND=interpret``).

    The fused path takes ``algorithm_type="dpmsolver++"``, ``solver_order=2``,
    ``solver_type="midpoint"``, ``final_sigmas_type="zero"`` (whatever ``lower_order_final`` and
    ``euler_at_final``: with "zero" diffusers' last step is first order anyway) or ``"sigma_min"``
    where diffusers' last step is first order too (``euler_at_final``, or ``lower_order_final`` below
    15 steps), the plain VP sigmas
    of the trained alpha_bar or ``use_karras_sigmas`` / ``use_exponential_sigmas`` /
    ``use_beta_sigmas`` (a chain built from diffusers' own sigmas; not ``use_lu_lambdas`` or
    ``use_flow_sigmas``), any ``timestep_spacing``,
    ``steps_offset``, ``lambda_min_clipped`` or custom ``timesteps`` whose timesteps do not repeat,
    ``thresholding=False``, prediction types epsilon / sample / v_prediction, ``variance_type``
    None or, with epsilon, learned / learned_range (diffusers keeps the first 3 channels, as the
    fused path does), and ``model_output`` / ``sample`` of one shape, dtype and device. Every other
    setting (among them ``rescale_betas_zero_snr``, whose last alpha_bar diffusers raises to 2**-24,
    above the one before it), and a first step taken below the chain's top (``set_begin_index``),
    runs ``super().step`` unchanged. ``add_noise`` is the parent's.

    The step index is diffusers' counter (``step_index``; its first value found on the host for a
    timestep that is an int, a CPU tensor or an element of ``scheduler.timesteps``), so a step
    reads nothing back from the device. The predicted x_0 lives in a device buffer that the fused
    op overwrites in place; after a fused step ``model_outputs[-1]`` is that buffer and an earlier
    entry that is the same buffer is set to None (its value is gone; order 2 never reads it), so
    the parent's step may follow a fused one, and a fused one the parent's, within one loop.
    """

    __init__ = _init_of(diffusers.DPMSolverMultistepScheduler)
    _prediction_types = PREDICTION_TYPES + ("flow_prediction",)
    add_noise = diffusers.DPMSolverMultistepScheduler.add_noise  # indexed by step, not by timestep

    def _prepare(self) -> None:
        super()._prepare()
        self._chain: Optional[NoiseSchedule] = None
        self._x0_buffer: Optional[torch.Tensor] = None
        self._spec: Optional[StepSpec] = None

    def _fused_settings(self) -> bool:
        config = self.config
        return (self._trained is not None and config.algorithm_type == "dpmsolver++" and config.solver_order == 2
                and config.solver_type == "midpoint" and config.final_sigmas_type in ("zero", "sigma_min")
                and not config.thresholding and config.prediction_type in PREDICTION_TYPES
                and not any(getattr(config, name, False) for name in DPM_SIGMA_SCHEDULES
                            if name not in DPM_FUSED_SIGMA_SCHEDULES))

    def _last_step_first_order(self, num_steps: int) -> bool:
        """Whether diffusers' last step is first order (the fused chain's is): always when it lands
        on sigma 0; with ``final_sigmas_type="sigma_min"`` under ``euler_at_final``, or
        ``lower_order_final`` below 15 steps (diffusers' rule)."""
        config = self.config
        return (config.final_sigmas_type == "zero" or config.euler_at_final
                or (config.lower_order_final and num_steps < 15))

    def _sigma_chain(self, final_alpha_cumprod: float = 1.0) -> Optional[NoiseSchedule]:
        """The chain of diffusers' own sigmas (Karras, exponential, beta): index i is the i-th lowest
        noise level, alpha_bar = 1 / (1 + sigma^2) as diffusers' ``_sigma_to_alpha_sigma_t`` gives;
        the last step lands on sigma 0 (x_0). None where the levels do not strictly decrease."""
        sigmas = self.sigmas.detach().to(device="cpu", dtype=torch.float64)
        levels = sigmas[:-1]  # the last entry is final_sigmas_type's 0
        alpha_bar = 1.0 / (1.0 + levels.flip(0) ** 2)
        try:
            # the model's timestep at each level: diffusers' own (interpolated from the sigmas), ascending
            return NoiseSchedule.from_alphas_cumprod(alpha_bar, coefficient_dtype=torch.float32,
                                                     timesteps=torch.tensor(self._host_timesteps[::-1]),
                                                     final_alpha_cumprod=final_alpha_cumprod)
        except ValueError:
            return None

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Union[str, torch.device, None] = None,
                      mu: Optional[float] = None, timesteps: Optional[List[int]] = None) -> None:
        """diffusers' ``set_timesteps``, then the chain the fused step walks (on ``device``)."""
        if num_inference_steps is not None:
            self._check_num_inference_steps(num_inference_steps)
        values = self._set_parent_timesteps(
            lambda: super(DPMSolverMultistepScheduler, self).set_timesteps(num_inference_steps, None, mu, timesteps),
            device)
        self._chain = None
        ascending = sorted(values)
        sigma_chain = any(getattr(self.config, name, False) for name in DPM_FUSED_SIGMA_SCHEDULES)
        if self._fused_settings() and self._last_step_first_order(len(values)) \
                and (sigma_chain or all(a < b for a, b in zip(ascending, ascending[1:]))):
            # index i of the chain is diffusers' step len - 1 - i; its last step lands on diffusers' last
            # sigma (0: x_0; sigma_min: alpha_bar = 1 / (1 + sigma_min^2))
            final = 1.0 / (1.0 + float(self.sigmas[-1]) ** 2)
            self._chain = (self._sigma_chain(final) if sigma_chain
                           else self._trained.respace(ascending, final_alpha_cumprod=final))
        if self._chain is not None:
            self._spec = StepSpec("dpmpp_2m", self.config.prediction_type, "fixed_small", None)
            if self.timesteps.device.type not in HOST_DEVICE_TYPES:
                self._chain.table(self.timesteps.device, torch.float32)
                self._index_on(0, self.timesteps.device)

    def _init_step_index(self, timestep) -> None:
        """diffusers' rule (the second match of a repeated timestep, the last step if none),
        without reading the timestep back where the host knows it."""
        if self.begin_index is None and (isinstance(timestep, (int, np.integer)) or (
                isinstance(timestep, torch.Tensor) and timestep.numel() == 1 and not timestep.dtype.is_floating_point
                and not timestep.dtype.is_complex and timestep.dtype != torch.bool)):
            t = self._host_timestep(timestep)
            if t is not None:
                matches = [k for k, value in enumerate(self._host_timesteps) if value == t]
                self._step_index = (len(self._host_timesteps) - 1 if not matches
                                    else matches[1] if len(matches) > 1 else matches[0])
                return
        super()._init_step_index(timestep)

    def _previous_x0(self, sample: torch.Tensor, first_order: bool) -> torch.Tensor:
        """The device buffer the op reads D0_prev from and writes D0 to, holding the parent's
        ``model_outputs[-1]`` when that is not the buffer already."""
        buffer = self._x0_buffer
        if buffer is None or buffer.shape != sample.shape or buffer.dtype != sample.dtype \
                or buffer.device != sample.device:
            buffer = self._x0_buffer = torch.zeros(sample.shape, dtype=sample.dtype, device=sample.device)
        previous = self.model_outputs[-1]
        if previous is not buffer and not first_order:
            buffer.copy_(previous)
        return buffer

    def step(self, model_output: torch.Tensor, timestep: Union[int, torch.Tensor], sample: torch.Tensor,
             generator=None, variance_noise: Optional[torch.Tensor] = None,
             return_dict: bool = True) -> Union[SchedulerOutput, Tuple]:
        """diffusers' ``DPMSolverMultistepScheduler.step``, fused where the settings allow (class
        docstring)."""
        def parent():
            return super(DPMSolverMultistepScheduler, self).step(model_output, timestep, sample, generator,
                                                                 variance_noise, return_dict)

        if self.num_inference_steps is None or self._chain is None:
            return parent()
        _check_tensors(model_output=model_output, sample=sample)
        output = model_output
        if self.config.variance_type in LEARNED_VARIANCE_TYPES and self.config.prediction_type == "epsilon" \
                and output.ndim >= 2:
            output = output[:, :3]  # diffusers' split of the variance channels
        if not _fusable_tensors(output, sample) or output.shape != sample.shape:
            return parent()
        if self.step_index is None:
            self._init_step_index(timestep)
        total = len(self._host_timesteps)
        step = self.step_index
        if not 0 <= step < total:
            return parent()  # diffusers' own error
        index = total - 1 - step
        first_order = self.lower_order_nums < 1 or step == total - 1
        if first_order != (index in (0, total - 1)):
            return parent()  # e.g. a first step below the chain's top (set_begin_index)

        device = sample.device
        previous = self._previous_x0(sample, first_order)
        chain_index = self._index_on(index, device)
        prev_sample = _dpmpp_2m(self._spec, output, chain_index, sample.contiguous(), previous, self._chain)
        shifted = [None if entry is previous else entry for entry in self.model_outputs[1:]]
        self.model_outputs = [*shifted, previous]
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
