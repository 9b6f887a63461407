"""What every drop-in scheduler adds to its diffusers parent: the argument checks (a setting
diffusers accepts and fastddpm finds nonsensical is warned about, then stepped by the parent),
the NoiseSchedule of the parent's alpha_bar, timestep -> index tables on the device, the
in-kernel noise stream and ``add_noise``. The package docstring (:mod:`fastddpm.schedulers`)
states the tables, noise and synchronisation rules they implement."""
from __future__ import annotations

import functools
import inspect
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

try:
    import diffusers  # noqa: F401  (the subclasses' parents, imported from here)
    from diffusers.utils.torch_utils import randn_tensor  # noqa: F401
except ImportError as error:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    raise ImportError(f"fastddpm's drop-in schedulers subclass diffusers' schedulers, but diffusers cannot be "
                      f"imported ({reason}); install it with: pip install fastddpm[diffusers]") from error

from .. import ops
from ..checks import check_bool, check_choice, check_int, check_positive, check_real, draw_seed
from ..schedule import NoiseSchedule


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


def _off_host(device: torch.device) -> bool:
    """Whether a tensor on ``device`` is read only through a synchronisation (not a host device)."""
    return device.type not in HOST_DEVICE_TYPES


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
        if _off_host(device):
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
            if not _off_host(timestep.device):
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


# ---------------------------------------------------------------------------------------------
# what the multistep solvers (DPM-Solver++, UniPC) add: a chain of diffusers' sigmas, the step index
# ---------------------------------------------------------------------------------------------
# Sigma schedules other than the plain VP one of the trained alpha_bar (the fused step's chain).
DPM_SIGMA_SCHEDULES = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                       "use_flow_sigmas")
# Of those, the ones the fused step takes: another chain of noise levels, the same step. The chain's
# table is built from alpha_bar = 1 / (1 + sigma^2) of diffusers' own sigmas (set_timesteps).
DPM_FUSED_SIGMA_SCHEDULES = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


class _SolverChain:
    """The chain of a multistep solver's own sigmas, and diffusers' step-index rule found on the host."""

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

    def _solver_chain(self, values: List[int]) -> Optional[NoiseSchedule]:
        """The chain the fused step walks after the parent's ``set_timesteps`` chose ``values``:
        index i is diffusers' step len - 1 - i, and the last step lands on diffusers' last sigma (0:
        x_0; sigma_min: alpha_bar = 1 / (1 + sigma_min^2)). The trained levels respaced, or a chain of
        diffusers' own sigmas (Karras, exponential, beta); None where the timesteps repeat."""
        ascending = sorted(values)
        sigma_chain = any(getattr(self.config, name, False) for name in DPM_FUSED_SIGMA_SCHEDULES)
        if not sigma_chain and not all(a < b for a, b in zip(ascending, ascending[1:])):
            return None
        final = 1.0 / (1.0 + float(self.sigmas[-1]) ** 2)
        return self._sigma_chain(final) if sigma_chain else self._trained.respace(ascending, final_alpha_cumprod=final)

    def _unfused_sigmas(self) -> bool:
        """Whether the config asks for a sigma schedule the fused step does not take (Lu lambdas,
        flow sigmas; a setting the parent class lacks counts as off)."""
        return any(getattr(self.config, name, False) for name in DPM_SIGMA_SCHEDULES
                   if name not in DPM_FUSED_SIGMA_SCHEDULES)

    def _place_chain(self, chain: NoiseSchedule, solver) -> None:
        """After ``set_timesteps(device=...)``: the chain's table, the solver's coefficient table and
        the index tensors on that device now, so that no step copies anything."""
        if _off_host(self.timesteps.device):
            chain.table(self.timesteps.device, torch.float32)
            solver.table(chain, self.timesteps.device)
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
