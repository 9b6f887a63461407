"""``fastddpm.DDIMScheduler``: diffusers' ``DDIMScheduler`` stepping through :func:`fastddpm.ops.ddim_step`."""
from __future__ import annotations

import numbers
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

from .. import ops
from ..checks import check_bool
from ..schedule import NoiseSchedule
from .common import _FusedSteps, _fusable_tensors, _check_generator, _check_tensors, _init_of, _noted, diffusers, randn_tensor

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
