"""Drop-in replacements for diffusers' ``DDPMScheduler`` and ``DDIMScheduler``.

Same constructor arguments and defaults, the same ``config`` / ``set_timesteps`` / ``step`` /
``add_noise`` interface, so ``from fastddpm import DDPMScheduler`` can replace
``from diffusers import DDPMScheduler`` in a sampling loop or inside ``diffusers.DDPMPipeline``.
Every step runs through :func:`fastddpm.ops.ddpm_step` / :func:`fastddpm.ops.ddim_step` (the
fused Triton kernel on CUDA) on a :class:`~fastddpm.schedule.NoiseSchedule` built once from
the betas and respaced by ``set_timesteps``.

Randomness: given a ``torch.Generator`` (or a list of them), ``step`` draws its noise exactly
as diffusers does (same shape, dtype, device and call order, and only on the steps where
diffusers draws), so a loop gets diffusers' samples up to float rounding. Our tables are float64
rounded once to float32; diffusers accumulates its cumulative products in float32. Measured on
CPU (tests/test_schedulers.py) as max |ours - diffusers'| / (1 + max |diffusers'|) per step:
at most 3.1e-5 over 4000 random configurations of short DDPM/DDIM loops; up to 2.6e-3 where
float32 itself is ill-conditioned for both (the cosine schedule's alpha_bar_999 ~ 2e-9, DDIM with
eta=1 at zero terminal SNR); 1.9e-5 on the final sample of the full 1000-step default DDPM chain
(2e-4 on its x_0 predictions at high t, where 1/sqrt(alpha_bar) ~ 160 amplifies the
trajectories' difference); <= 2e-6 on DDPMPipeline / DDIMPipeline images.

Without a generator the noise is the in-kernel Philox stream of a seed drawn from torch's global
RNG on the first noisy step after construction or ``set_timesteps`` (so ``torch.manual_seed``
reproduces a run, and the global RNG is untouched until then), with a fresh ``noise_offset``
every step.

Inside diffusers: ``DDPMPipeline(unet=..., scheduler=DDPMScheduler(...))`` works as is.
``DDIMPipeline`` rebuilds any scheduler it is given as diffusers' own DDIMScheduler, so assign
``pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`` after building it. These
classes do not derive from diffusers' ``SchedulerMixin`` (fastddpm does not depend on
diffusers), so ``pipeline.save_pretrained`` skips them with a warning; save them with
``save_config``.
"""
from __future__ import annotations

import inspect
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import ops, reference
from .schedule import NoiseSchedule, make_betas

__all__ = ["DDPMScheduler", "DDIMScheduler", "SchedulerOutput", "SchedulerConfig", "CONFIG_NAME"]

CONFIG_NAME = "scheduler_config.json"
SUPPORTED_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
DDPM_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# diffusers floors the posterior variance here before its square root or log; it only matters on
# a final step whose trained timestep is > 0, where the posterior variance is exactly 0.
VARIANCE_FLOOR = 1e-20
# diffusers accepts these but fastddpm does not implement them.
_UNSUPPORTED_BETA_SCHEDULES = {"laplace": "the 'laplace' beta schedule is not implemented in fastddpm"}
_UNSUPPORTED_VARIANCE_TYPES = {
    "fixed_large_log": "variance_type='fixed_large_log' is not implemented in fastddpm (diffusers' step takes "
                       "the square root of log(beta_t) < 0 there, which gives NaN); use 'fixed_large'",
}


# ---------------------------------------------------------------------------------------------
# config and output containers
# ---------------------------------------------------------------------------------------------
class SchedulerConfig(dict):
    """Read-only dict whose keys are also attributes, like diffusers' ``FrozenDict``:
    pipelines read ``scheduler.config.num_train_timesteps``, and diffusers' ``from_config``
    accepts it because it is a dict."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"scheduler config has no entry {name!r}") from None

    def _read_only(self, *args, **kwargs):
        raise TypeError("a scheduler config is read-only; build a new scheduler with from_config(config, key=value)")

    __setitem__ = __delitem__ = __setattr__ = __delattr__ = _read_only
    setdefault = pop = popitem = update = clear = _read_only

    def __reduce__(self):  # copy/deepcopy/pickle rebuild through __init__, not item assignment
        return (SchedulerConfig, (dict(self),))


class SchedulerOutput:
    """What ``step`` returns: ``prev_sample`` (x_{t-1}) and ``pred_original_sample`` (x_0).

    Indexable like diffusers' outputs: ``out[0]`` / ``out["prev_sample"]``, ``out.to_tuple()``.
    """

    __slots__ = ("prev_sample", "pred_original_sample")
    _fields = ("prev_sample", "pred_original_sample")

    def __init__(self, prev_sample: torch.Tensor, pred_original_sample: Optional[torch.Tensor] = None):
        self.prev_sample = prev_sample
        self.pred_original_sample = pred_original_sample

    def to_tuple(self) -> Tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in self._fields if getattr(self, name) is not None)

    def keys(self) -> Tuple[str, ...]:
        return tuple(name for name in self._fields if getattr(self, name) is not None)

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self._fields:
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __repr__(self) -> str:
        shape = tuple(self.prev_sample.shape) if isinstance(self.prev_sample, torch.Tensor) else None
        return f"SchedulerOutput(prev_sample=<tensor {shape}>, pred_original_sample=...)"


# diffusers' names for the same object
DDPMSchedulerOutput = DDIMSchedulerOutput = SchedulerOutput


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------
def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_positive_float(name: str, value, maximum: Optional[float] = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not math.isfinite(value) \
            or value <= 0 or (maximum is not None and value > maximum):
        bound = f" and <= {maximum}" if maximum is not None else ""
        raise ValueError(f"{name} must be a float > 0{bound}, got {value!r}")
    return float(value)


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _check_choice(name: str, value, choices: Sequence[str], unsupported: Optional[Dict[str, str]] = None) -> str:
    if unsupported and value in unsupported:
        raise NotImplementedError(unsupported[value])
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def _check_generator(generator) -> None:
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, (list, tuple)) and generator and all(isinstance(g, torch.Generator) for g in generator):
        return
    raise TypeError(f"generator must be a torch.Generator, a list of them, or None, got {type(generator).__name__}")


def _check_step_tensors(model_output, sample, expected_output_shape) -> None:
    for name, value in (("model_output", model_output), ("sample", sample)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if sample.ndim < 2:
        raise ValueError(f"sample must have shape [batch, channels, ...], got {tuple(sample.shape)}")
    if tuple(model_output.shape) != tuple(expected_output_shape):
        raise ValueError(f"model_output must have shape {tuple(expected_output_shape)}, "
                         f"got {tuple(model_output.shape)}")


def _timestep_int(timestep) -> int:
    """The trained-chain timestep of a step, as an int (pipelines pass 0-d tensors)."""
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() != 1 or timestep.dtype.is_complex or timestep.dtype == torch.bool:
            raise ValueError(f"timestep must be a single integer, got a tensor of shape {tuple(timestep.shape)}")
        value = timestep.item()
    else:
        value = timestep
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or value != int(value):
        raise TypeError(f"timestep must be an integer (int or 0-d tensor), got {timestep!r}")
    return int(value)


# ---------------------------------------------------------------------------------------------
# betas, noise, thresholding
# ---------------------------------------------------------------------------------------------
def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas (float64) rescaled so that alpha_bar at the last step is exactly 0 (Lin et al. 2023,
    "Common diffusion noise schedules and sample steps are flawed", Algorithm 1): sqrt(alpha_bar)
    is shifted so its last value is 0 and scaled so its first value is unchanged."""
    sqrt_alpha_bar = torch.cumprod(1.0 - betas.to(torch.float64), dim=0).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * (first / (first - last))
    alpha_bar = sqrt_alpha_bar ** 2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


def _trained_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale) -> torch.Tensor:
    if trained_betas is not None:
        betas = torch.as_tensor(np.asarray(trained_betas, dtype=np.float64))
        if betas.ndim != 1 or betas.numel() != num_train_timesteps:
            raise ValueError(f"trained_betas must be a 1-D sequence of num_train_timesteps={num_train_timesteps} "
                             f"values, got shape {tuple(betas.shape)}")
    else:
        _check_choice("beta_schedule", beta_schedule, SUPPORTED_BETA_SCHEDULES, _UNSUPPORTED_BETA_SCHEDULES)
        betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
    if not torch.isfinite(betas).all() or (betas <= 0).any() or (betas > 1).any():
        raise ValueError("the betas (from trained_betas or beta_start/beta_end) must all lie in (0, 1]")
    if rescale:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def randn_like_diffusers(shape, generator, device, dtype) -> torch.Tensor:
    """Standard normals drawn as diffusers' ``randn_tensor`` draws them, so that a generator
    advances identically: a CPU generator draws on the CPU and the result moves to ``device``;
    a list of generators draws one sample each along dim 0."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    generator_device = (generator[0] if isinstance(generator, (list, tuple)) else generator).device
    draw_device = device
    if generator_device.type != device.type:
        if generator_device.type != "cpu":
            raise ValueError(f"cannot draw a {device} tensor from a generator on {generator_device}")
        draw_device = torch.device("cpu")
    if isinstance(generator, (list, tuple)):
        batch = shape[0]
        if len(generator) < batch:
            raise ValueError(f"a list of generators needs one per sample: got {len(generator)} for batch {batch}")
        rows = [torch.randn((1,) + tuple(shape[1:]), generator=g, device=draw_device, dtype=dtype)
                for g in generator[:batch]]
        return torch.cat(rows, dim=0).to(device)
    return torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=dtype).to(device)


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding: per sample, s = the ``ratio`` quantile of |x0| clamped to
    [1, max_value]; x0 is clipped to [-s, s] and divided by s (plain [-1, 1] clipping when s = 1)."""
    flat = x0.reshape(x0.shape[0], -1)
    if flat.dtype not in (torch.float32, torch.float64):  # quantile needs float32/64
        flat = flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1.0, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(x0.dtype)


# ---------------------------------------------------------------------------------------------
# shared machinery
# ---------------------------------------------------------------------------------------------
class _ScheduleBackedScheduler:
    """Config handling, the trained schedule, spacing, forward-process helpers and the noise
    source shared by both schedulers."""

    order = 1
    init_noise_sigma = 1.0
    config_name = CONFIG_NAME

    # ------------------------------------------------------------------ config
    @property
    def config(self) -> SchedulerConfig:
        return self._internal_dict

    def _store_config(self, values: Dict[str, Any]) -> None:
        values = dict(values)
        if values.get("trained_betas") is not None:  # JSON-friendly, and diffusers accepts a list
            values["trained_betas"] = [float(b) for b in np.asarray(values["trained_betas"], dtype=np.float64)]
        self._internal_dict = SchedulerConfig({"_class_name": type(self).__name__, **values})

    @classmethod
    def _init_keys(cls) -> List[str]:
        return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """A scheduler from a config dict (ours, or a diffusers scheduler's ``.config``), with
        ``kwargs`` overriding entries. Entries this class does not take (private ``_*`` keys,
        the other scheduler's arguments) are ignored, as diffusers ignores them."""
        if config is None:
            config = {}
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict (e.g. another scheduler's .config), got {type(config).__name__}; "
                            "use from_pretrained for a path")
        keys = cls._init_keys()
        unexpected = sorted(key for key in kwargs if key not in keys)
        if unexpected and not return_unused_kwargs:
            raise TypeError(f"{cls.__name__} has no argument(s) {unexpected}")
        init = {key: config[key] for key in keys if key in config}
        init.update((key, value) for key, value in kwargs.items() if key in keys)
        unused = {key: value for key, value in config.items() if key not in keys and not key.startswith("_")}
        unused.update((key, kwargs[key]) for key in unexpected)
        scheduler = cls(**init)
        return (scheduler, unused) if return_unused_kwargs else scheduler

    def save_config(self, save_directory: Union[str, os.PathLike], push_to_hub: bool = False, **kwargs) -> str:
        """Write ``scheduler_config.json`` into ``save_directory`` (readable by diffusers' and our
        ``from_pretrained``). Returns the file's path."""
        if push_to_hub:
            raise NotImplementedError("push_to_hub is not supported by fastddpm's schedulers")
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory must be a directory, got the file {save_directory!r}")
        os.makedirs(save_directory, exist_ok=True)
        from . import __version__

        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump({**self.config, "_fastddpm_version": __version__}, handle, indent=2, sort_keys=True)
        return path

    save_pretrained = save_config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], subfolder: Optional[str] = None,
                        return_unused_kwargs: bool = False, **kwargs):
        """Load from a local directory holding ``scheduler_config.json`` (optionally in
        ``subfolder``, e.g. ``"scheduler"`` of a saved pipeline) or from the JSON file itself."""
        path = os.fspath(pretrained_model_name_or_path)
        if not os.path.exists(path):
            raise NotImplementedError(
                f"{path!r} is not a local file or directory, and fastddpm does not download from the Hugging Face Hub; "
                f"load it with diffusers and pass its .config to {cls.__name__}.from_config")
        if os.path.isdir(path):
            path = os.path.join(path, subfolder or "", CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} at {path!r}")
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.config.items() if not k.startswith("_") and k != "trained_betas"}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ------------------------------------------------------------------ common construction
    def _init_common(self, *, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, clip_sample,
                     prediction_type, thresholding, dynamic_thresholding_ratio, clip_sample_range, sample_max_value,
                     timestep_spacing, steps_offset, rescale_betas_zero_snr) -> None:
        num_train_timesteps = _check_int("num_train_timesteps", num_train_timesteps, 1)
        if trained_betas is None:
            _check_positive_float("beta_start", beta_start, 1.0)
            _check_positive_float("beta_end", beta_end, 1.0)
        _check_bool("clip_sample", clip_sample)
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        _check_bool("thresholding", thresholding)
        _check_positive_float("dynamic_thresholding_ratio", dynamic_thresholding_ratio, 1.0)
        _check_positive_float("clip_sample_range", clip_sample_range)
        _check_positive_float("sample_max_value", sample_max_value)
        _check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        _check_int("steps_offset", steps_offset, 0)
        _check_bool("rescale_betas_zero_snr", rescale_betas_zero_snr)
        betas = _trained_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                               rescale_betas_zero_snr)
        # The one home of every coefficient; indices of this schedule are trained timesteps.
        self._trained_schedule = NoiseSchedule(betas)
        self.num_inference_steps: Optional[int] = None
        self.custom_timesteps = False
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self._reset_noise_stream()

    # diffusers exposes these float32 tables; training code reads alphas_cumprod (e.g. for SNR).
    @property
    def betas(self) -> torch.Tensor:
        return self._trained_schedule.betas.to(torch.float32)

    @property
    def alphas(self) -> torch.Tensor:
        return self._trained_schedule.alphas.to(torch.float32)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._trained_schedule.alphas_cumprod.to(torch.float32)

    def scale_model_input(self, sample: torch.Tensor, timestep: Optional[int] = None) -> torch.Tensor:
        """Identity: DDPM/DDIM models take x_t unscaled (kept for interchangeability)."""
        return sample

    # ------------------------------------------------------------------ spacing
    def _check_num_inference_steps(self, num_inference_steps) -> int:
        total = self.config.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
                or not 1 <= num_inference_steps <= total:
            raise ValueError(f"num_inference_steps must be an int in [1, num_train_timesteps={total}], "
                             f"got {num_inference_steps!r}")
        return int(num_inference_steps)

    def _spaced_timesteps(self, num_inference_steps: int) -> np.ndarray:
        """Descending trained timesteps for ``num_inference_steps`` steps, following the config's
        ``timestep_spacing`` exactly as diffusers computes it (numpy, same float rounding)."""
        total, spacing = self.config.num_train_timesteps, self.config.timestep_spacing
        if spacing == "linspace":
            timesteps = np.linspace(0, total - 1, num_inference_steps).round()[::-1].astype(np.int64)
        elif spacing == "leading":
            step_ratio = total // num_inference_steps
            timesteps = (np.arange(num_inference_steps) * step_ratio)[::-1].astype(np.int64) + self.config.steps_offset
        else:  # trailing
            step_ratio = total / num_inference_steps
            timesteps = np.round(np.arange(total, 0, -step_ratio)).astype(np.int64) - 1
        if timesteps.max() >= total or timesteps.min() < 0 or len(np.unique(timesteps)) != len(timesteps):
            raise ValueError(f"timestep_spacing={spacing!r} with steps_offset={self.config.steps_offset} and "
                             f"num_inference_steps={num_inference_steps} gives timesteps {timesteps.tolist()}, outside "
                             f"[0, {total - 1}] or repeated; lower steps_offset or num_inference_steps")
        return np.ascontiguousarray(timesteps)

    def _choose_timesteps(self, num_inference_steps: Optional[int], timesteps: Optional[Sequence[int]]) -> np.ndarray:
        """The descending sampling timesteps of ``set_timesteps``; sets ``num_inference_steps``
        and ``custom_timesteps``."""
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("pass either num_inference_steps or timesteps, not both")
        if num_inference_steps is None and timesteps is None:
            raise ValueError("pass num_inference_steps or timesteps")
        if timesteps is not None:
            values = self._check_custom_timesteps(timesteps)
            self.custom_timesteps = True
            # diffusers leaves num_inference_steps as it was here; the count of steps is more useful.
            self.num_inference_steps = len(values)
        else:
            self.num_inference_steps = self._check_num_inference_steps(num_inference_steps)
            values = self._spaced_timesteps(self.num_inference_steps)
            self.custom_timesteps = False
        return values

    def _check_custom_timesteps(self, timesteps) -> np.ndarray:
        values = np.asarray(timesteps.cpu() if isinstance(timesteps, torch.Tensor) else timesteps)
        integral = np.issubdtype(values.dtype, np.integer) or (
            np.issubdtype(values.dtype, np.floating) and bool(np.all(values == np.round(values))))
        if values.ndim != 1 or values.size == 0 or not integral:
            raise ValueError(f"timesteps must be a non-empty 1-D sequence of integers, got {timesteps!r}")
        values = values.astype(np.int64)
        if np.any(values[1:] >= values[:-1]):
            raise ValueError("custom timesteps must be in strictly descending order")
        if values[0] >= self.config.num_train_timesteps or values[-1] < 0:
            raise ValueError(f"custom timesteps must lie in [0, num_train_timesteps - 1 = "
                             f"{self.config.num_train_timesteps - 1}], got {values.tolist()}")
        return values

    # ------------------------------------------------------------------ forward process
    def _trained_timesteps(self, timesteps, like: torch.Tensor) -> torch.Tensor:
        """Trained-chain timesteps as an int64 tensor of shape [] or [batch] on ``like``'s device
        (diffusers flattens whatever it gets; one value serves the whole batch)."""
        if not isinstance(like, torch.Tensor) or like.ndim < 1:
            raise TypeError("samples must be a torch.Tensor with a batch dimension")
        if isinstance(timesteps, torch.Tensor):
            t = timesteps
        elif isinstance(timesteps, (int, np.integer, list, tuple, np.ndarray)) and not isinstance(timesteps, bool):
            t = torch.as_tensor(np.asarray(timesteps))
        else:
            raise TypeError("timesteps must be an integer tensor, int or sequence of ints, "
                            f"got {type(timesteps).__name__}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"timesteps must hold integers, got dtype {t.dtype}")
        t = t.reshape(-1)
        if t.numel() == 1:
            t = t.reshape(())
        elif t.numel() != like.shape[0]:
            raise ValueError(f"timesteps must hold one value or one per sample, got {t.numel()} "
                             f"for batch {like.shape[0]}")
        return t.to(device=like.device, dtype=torch.int64)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """q(x_t | x_0) with the given ``noise`` at trained timesteps ``timesteps`` ([] or [batch]):
        sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise, through :func:`fastddpm.ops.q_sample`."""
        t = self._trained_timesteps(timesteps, original_samples)
        return ops.q_sample(original_samples, t, self._trained_schedule, noise=noise)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """v-prediction target sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) sample."""
        for name, value in (("sample", sample), ("noise", noise)):
            if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
                raise TypeError(f"{name} must be a floating-point torch.Tensor")
        if noise.shape != sample.shape:
            raise ValueError(f"noise must have the shape of sample {tuple(sample.shape)}, got {tuple(noise.shape)}")
        t = self._trained_timesteps(timesteps, sample)
        if t.device.type == "cpu" and (int(t.min()) < 0 or int(t.max()) >= len(self)):
            raise ValueError(f"timesteps must lie in [0, {len(self) - 1}]")
        dtype = torch.float64 if sample.dtype == torch.float64 else torch.float32
        shape = (-1,) + (1,) * (sample.ndim - 1) if t.ndim == 1 else ()
        sqrt_ab = self._trained_schedule.coefficient("sqrt_alphas_cumprod", sample.device, dtype)[t].reshape(shape)
        sqrt_1m_ab = self._trained_schedule.coefficient("sqrt_one_minus_alphas_cumprod", sample.device, dtype)[t]
        velocity = sqrt_ab * noise.to(dtype) - sqrt_1m_ab.reshape(shape) * sample.to(dtype)
        return velocity.to(sample.dtype)

    # ------------------------------------------------------------------ noise
    def _reset_noise_stream(self) -> None:
        # The seed is drawn lazily, on the first step that needs in-kernel noise, so that building a
        # scheduler or calling set_timesteps leaves torch's global RNG where diffusers leaves it.
        self._noise_seed: Optional[int] = None
        self._noise_offset = 0

    def _next_philox_stream(self) -> Tuple[int, int]:
        """(seed, noise_offset) for one step's in-kernel noise; every call gets a new stream."""
        if self._noise_seed is None or self._noise_offset >= 2**32:
            self._noise_seed = int(torch.randint(0, 2**62, (1,)).item())
            self._noise_offset = 0
        stream = (self._noise_seed, self._noise_offset)
        self._noise_offset += 1
        return stream


# ---------------------------------------------------------------------------------------------
# DDPM
# ---------------------------------------------------------------------------------------------
class DDPMScheduler(_ScheduleBackedScheduler):
    """Ancestral DDPM sampling (Ho et al. 2020) with diffusers' ``DDPMScheduler`` interface.

    Arguments and defaults are diffusers'. ``variance_type``: ``fixed_small`` (posterior
    variance), ``fixed_small_log``, ``fixed_large`` (beta_t), ``learned`` (the model's extra
    channels are the variance) and ``learned_range`` (extra channels in [-1, 1] interpolate
    the log-variance between the two fixed ones); ``fixed_large_log`` and the ``laplace``
    schedule raise NotImplementedError. With ``thresholding`` the predicted x_0 goes through
    dynamic thresholding instead of clipping.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, Sequence[float]]] = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        _check_choice("variance_type", variance_type, DDPM_VARIANCE_TYPES, _UNSUPPORTED_VARIANCE_TYPES)
        self._init_common(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas, clip_sample=clip_sample,
            prediction_type=prediction_type, thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio, clip_sample_range=clip_sample_range,
            sample_max_value=sample_max_value, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )
        self.variance_type = variance_type
        self._store_config(dict(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas, variance_type=variance_type,
            clip_sample=clip_sample, prediction_type=prediction_type, thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio, clip_sample_range=clip_sample_range,
            sample_max_value=sample_max_value, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        ))
        self._set_chain(None)

    def _set_chain(self, timesteps: Optional[np.ndarray]) -> None:
        """Respace the trained schedule to the sampling chain: index i of the chain schedule is
        the i-th smallest sampling timestep, and each step goes to the next smaller one."""
        if timesteps is None:
            self._chain, self._chain_index = self._trained_schedule, None
            return
        ascending = sorted(int(t) for t in timesteps)
        if ascending == list(range(len(self))):
            self._chain = self._trained_schedule
        else:
            self._chain = self._trained_schedule.respace(ascending)
        self._chain_index = {t: i for i, t in enumerate(ascending)}

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Union[str, torch.device, None] = None,
                      timesteps: Optional[Sequence[int]] = None) -> None:
        """Choose the sampling timesteps: ``num_inference_steps`` spaced by the config's
        ``timestep_spacing``, or explicit descending ``timesteps`` (not both)."""
        values = self._choose_timesteps(num_inference_steps, timesteps)
        self._set_chain(values)
        self.timesteps = torch.from_numpy(values).to(device)
        self._reset_noise_stream()

    def previous_timestep(self, timestep):
        """The timestep the step from ``timestep`` lands on (-1 after the last one)."""
        if self._chain_index is None:
            return timestep - 1
        t = _timestep_int(timestep)
        position = (self.timesteps == t).nonzero()
        if position.numel() == 0:
            raise ValueError(f"timestep {t} is not one of the scheduler's timesteps {self.timesteps.tolist()}")
        index = int(position[0, 0])
        return torch.tensor(-1) if index == self.timesteps.shape[0] - 1 else self.timesteps[index + 1]

    def _chain_position(self, t: int) -> int:
        if self._chain_index is None:
            if not 0 <= t < len(self):
                raise ValueError(f"timestep must lie in [0, {len(self) - 1}], got {t}")
            return t
        index = self._chain_index.get(t)
        if index is None:
            raise ValueError(f"timestep {t} is not one of the scheduler's timesteps {self.timesteps.tolist()}")
        return index

    def _final_step_std(self, log_variance_values: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Standard deviation diffusers uses on a final step whose trained timestep is > 0 (index
        0 of the chain; the ops add no noise there). The posterior variance is 0 on that step, so
        it is floored at VARIANCE_FLOOR; beta is 1 - alpha_bar_t."""
        floored_log = math.log(max(float(self._chain.posterior_variance[0]), VARIANCE_FLOOR))
        beta_log = float(self._chain.log_betas[0])
        kind = self.variance_type
        if kind in ("fixed_small", "fixed_small_log"):
            log_variance = torch.tensor(floored_log, dtype=dtype)
        elif kind == "fixed_large":
            log_variance = torch.tensor(beta_log, dtype=dtype)
        elif kind == "learned":
            log_variance = log_variance_values.to(dtype)
        else:  # learned_range
            frac = (log_variance_values.to(dtype) + 1.0) / 2.0
            log_variance = frac * beta_log + (1.0 - frac) * floored_log
        return torch.exp(0.5 * log_variance)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
             return_dict: bool = True) -> Union[SchedulerOutput, Tuple[torch.Tensor, torch.Tensor]]:
        """One step from trained timestep ``timestep`` to the previous one of the chain.

        ``model_output`` is the model's epsilon / x_0 / v prediction (with the variance channels
        appended along dim 1 for ``learned`` / ``learned_range``). Returns ``prev_sample`` and
        ``pred_original_sample`` (a tuple when ``return_dict=False``).
        """
        learned = self.variance_type in ("learned", "learned_range")
        if isinstance(sample, torch.Tensor) and sample.ndim >= 2:
            channels = sample.shape[1]
            expected = (sample.shape[0], 2 * channels, *sample.shape[2:]) if learned else tuple(sample.shape)
        else:
            expected = ()
        _check_step_tensors(model_output, sample, expected)
        _check_generator(generator)
        t = _timestep_int(timestep)
        index = self._chain_position(t)
        config = self.config

        if learned:
            prediction, variance_values = model_output[:, :channels], model_output[:, channels:]
            if self.variance_type == "learned":
                # diffusers reads these channels as a variance; the ops read a log-variance.
                variance_values = torch.log(variance_values.clamp_min(VARIANCE_FLOOR))
        else:
            prediction, variance_values = model_output, None

        # diffusers draws noise exactly when the trained timestep is > 0.
        noise, seed, noise_offset = None, 0, 0
        if t > 0:
            if generator is not None:
                noise = randn_like_diffusers(prediction.shape, generator, prediction.device, prediction.dtype)
            else:
                seed, noise_offset = self._next_philox_stream()
        final_step_noise = index == 0 and t > 0
        if final_step_noise and noise is None:
            noise = reference.philox_randn(sample.shape, seed, noise_offset, device=sample.device)

        op_prediction, prediction_type, clip = prediction, config.prediction_type, config.clip_sample
        if config.thresholding:
            # The per-sample quantile needs the whole x_0, so it runs here; the op then takes the
            # thresholded x_0 as an x_0 ("sample") prediction, unclipped.
            x0 = reference.predict_x0(prediction, index, sample, self._chain, config.prediction_type, clip_range=None)
            x0 = dynamic_threshold(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
            op_prediction, prediction_type, clip = x0.to(sample.dtype), "sample", False
        if learned:
            op_prediction = torch.cat([op_prediction.to(model_output.dtype), variance_values.to(model_output.dtype)], 1)

        prev_sample, pred_original_sample = ops.ddpm_step(
            op_prediction, index, sample, self._chain, prediction_type=prediction_type,
            variance_type=self.variance_type, clip_denoised=clip, clip_range=config.clip_sample_range,
            noise=noise, seed=None if noise is not None else seed, noise_offset=noise_offset,
        )
        if final_step_noise:
            compute = torch.float64 if sample.dtype == torch.float64 else torch.float32
            std = self._final_step_std(variance_values, compute).to(sample.device)
            prev_sample = (prev_sample.to(compute) + std * noise.to(compute)).to(sample.dtype)

        if not return_dict:
            return prev_sample, pred_original_sample
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


# ---------------------------------------------------------------------------------------------
# DDIM
# ---------------------------------------------------------------------------------------------
class DDIMScheduler(_ScheduleBackedScheduler):
    """DDIM sampling (Song et al. 2021) with diffusers' ``DDIMScheduler`` interface.

    As in diffusers, the step from timestep t lands on t - num_train_timesteps //
    num_inference_steps (past 0: the "final" alpha_bar, 1 with ``set_alpha_to_one`` else
    alpha_bar_0), whatever the spacing. ``eta`` (per step) scales the noise: 0 is
    deterministic DDIM, 1 has the DDPM posterior variance. Explicit ``timesteps`` in
    ``set_timesteps`` are an extension: each step then lands on the next listed timestep.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, Sequence[float]]] = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        _check_bool("set_alpha_to_one", set_alpha_to_one)
        self._init_common(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas, clip_sample=clip_sample,
            prediction_type=prediction_type, thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio, clip_sample_range=clip_sample_range,
            sample_max_value=sample_max_value, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )
        self._store_config(dict(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas, clip_sample=clip_sample,
            set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset, prediction_type=prediction_type,
            thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            clip_sample_range=clip_sample_range, sample_max_value=sample_max_value,
            timestep_spacing=timestep_spacing, rescale_betas_zero_snr=rescale_betas_zero_snr,
        ))
        # alpha_bar "before" trained timestep 0, where the last step lands.
        self._final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self._trained_schedule.alphas_cumprod[0])
        self._landing: Dict[int, int] = {}
        self._plan: Dict[int, Tuple[NoiseSchedule, int]] = {}

    @property
    def final_alpha_cumprod(self) -> torch.Tensor:
        return torch.tensor(self._final_alpha_cumprod, dtype=torch.float32)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Union[str, torch.device, None] = None,
                      timesteps: Optional[Sequence[int]] = None) -> None:
        """Choose the sampling timesteps: ``num_inference_steps`` spaced by the config's
        ``timestep_spacing`` (diffusers' DDIM), or explicit descending ``timesteps``."""
        values = self._choose_timesteps(num_inference_steps, timesteps)
        if self.custom_timesteps:
            landing = list(values[1:]) + [-1]
        else:
            jump = self.config.num_train_timesteps // self.num_inference_steps
            landing = [int(t) - jump for t in values]
        self._landing = {int(t): int(p) for t, p in zip(values, landing)}
        self._plan = self._plan_steps(self._landing)
        self.timesteps = torch.from_numpy(values).to(device)
        self._reset_noise_stream()

    def _plan_steps(self, landing: Dict[int, int]) -> Dict[int, Tuple[NoiseSchedule, int]]:
        """(schedule, index) per sampling timestep such that the schedule's entry before
        ``index`` is the landing timestep (or, landing below 0, ``index`` is 0 and the
        schedule's final alpha_bar stands in).

        One schedule respaced to the sampling timesteps together with the landing ones serves
        every step: the spacings keep each landing point directly below its timestep. A step
        where that does not hold gets its own two-level schedule.
        """
        levels = sorted(set(landing) | {p for p in landing.values() if p >= 0})
        shared = self._trained_schedule.respace(levels, final_alpha_cumprod=self._final_alpha_cumprod)
        position = {level: i for i, level in enumerate(levels)}
        plan = {}
        for t, p in landing.items():
            i = position[t]
            chained = i == 0 if p < 0 else i > 0 and levels[i - 1] == p
            plan[t] = (shared, i) if chained else self._pair_schedule(t, p)
        return plan

    def _pair_schedule(self, t: int, landing: int) -> Tuple[NoiseSchedule, int]:
        if landing < 0:
            return self._trained_schedule.respace([t], final_alpha_cumprod=self._final_alpha_cumprod), 0
        return self._trained_schedule.respace([landing, t], final_alpha_cumprod=self._final_alpha_cumprod), 1

    def previous_timestep(self, timestep):
        """The timestep the step from ``timestep`` lands on (negative past the start)."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before previous_timestep")
        if self.custom_timesteps:
            t = _timestep_int(timestep)
            if t not in self._landing:
                raise ValueError(f"timestep {t} is not one of the scheduler's timesteps {self.timesteps.tolist()}")
            return self._landing[t]
        return timestep - self.config.num_train_timesteps // self.num_inference_steps

    def _step_target(self, t: int) -> Tuple[NoiseSchedule, int]:
        target = self._plan.get(t)
        if target is None:
            if self.custom_timesteps:
                raise ValueError(f"timestep {t} is not one of the scheduler's timesteps {self.timesteps.tolist()}")
            if not 0 <= t < len(self):
                raise ValueError(f"timestep must lie in [0, {len(self) - 1}], got {t}")
            # diffusers steps from any timestep; off the planned ones, build the pair once.
            target = self._pair_schedule(t, int(self.previous_timestep(t)))
            self._plan[t] = target
        return target

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False,
             generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
             variance_noise: Optional[torch.Tensor] = None,
             return_dict: bool = True) -> Union[SchedulerOutput, Tuple[torch.Tensor, torch.Tensor]]:
        """One DDIM step from trained timestep ``timestep``.

        ``eta`` >= 0 scales the noise; ``use_clipped_model_output`` recomputes epsilon from the
        clipped (or thresholded) x_0; ``variance_noise`` supplies the noise instead of
        ``generator``. Returns ``prev_sample`` and ``pred_original_sample`` (a tuple when
        ``return_dict=False``).
        """
        if self.num_inference_steps is None:
            raise ValueError("the number of inference steps is not set: call set_timesteps before step")
        _check_step_tensors(model_output, sample, tuple(sample.shape) if isinstance(sample, torch.Tensor) else ())
        if isinstance(eta, bool) or not isinstance(eta, (int, float, np.floating)) or not eta >= 0:
            raise ValueError(f"eta must be a float >= 0, got {eta!r}")
        eta = float(eta)
        # DDIMPipeline passes None for "not set"
        use_clipped_model_output = _check_bool("use_clipped_model_output", bool(use_clipped_model_output)
                                               if use_clipped_model_output is None else use_clipped_model_output)
        _check_generator(generator)
        if eta > 0 and variance_noise is not None and generator is not None:
            raise ValueError("pass either generator or variance_noise, not both")
        if variance_noise is not None and (not isinstance(variance_noise, torch.Tensor)
                                           or variance_noise.shape != sample.shape):
            raise ValueError(f"variance_noise must be a tensor of shape {tuple(sample.shape)}")
        t = _timestep_int(timestep)
        schedule, index = self._step_target(t)
        config = self.config

        noise, seed, noise_offset = None, None, 0
        if eta > 0:
            if variance_noise is not None:
                noise = variance_noise.to(sample.device)
            elif generator is not None:
                noise = randn_like_diffusers(model_output.shape, generator, model_output.device, model_output.dtype)
            else:
                seed, noise_offset = self._next_philox_stream()
        step_args = dict(eta=eta, clip_range=config.clip_sample_range, noise=noise, seed=seed,
                         noise_offset=noise_offset)

        clipping = config.clip_sample and not config.thresholding
        if not config.thresholding and not (use_clipped_model_output and clipping):
            prev_sample, pred_original_sample = ops.ddim_step(
                model_output, index, sample, schedule, prediction_type=config.prediction_type,
                clip_denoised=clipping, **step_args)
        else:
            # x_0 is thresholded (a per-sample quantile) or clipped before epsilon is rederived
            # from it, so it is computed here, correctly rather than fused.
            x0 = reference.predict_x0(model_output, index, sample, schedule, config.prediction_type, clip_range=None)
            if config.thresholding:
                x0 = dynamic_threshold(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
            else:
                x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)
            pred_original_sample = x0.to(sample.dtype)
            if use_clipped_model_output:
                # epsilon rederived from the final x_0 is what the op derives from an x_0 prediction.
                prev_sample, _ = ops.ddim_step(pred_original_sample, index, sample, schedule,
                                               prediction_type="sample", clip_denoised=False, **step_args)
            else:
                # The update is linear in x_0: step with the raw x_0 and the model's epsilon, then
                # move the x_0 term to the thresholded x_0.
                prev_sample, raw_x0 = ops.ddim_step(model_output, index, sample, schedule,
                                                    prediction_type=config.prediction_type, clip_denoised=False,
                                                    **step_args)
                compute = x0.dtype
                sqrt_ab_prev = schedule.coefficient("sqrt_alphas_cumprod_prev", sample.device, compute)[index]
                prev_sample = (prev_sample.to(compute) + sqrt_ab_prev * (x0 - raw_x0.to(compute))).to(sample.dtype)

        if not return_dict:
            return prev_sample, pred_original_sample
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
