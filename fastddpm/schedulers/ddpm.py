"""``fastddpm.DDPMScheduler``: diffusers' ``DDPMScheduler`` stepping through :func:`fastddpm.ops.ddpm_step`."""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import numpy as np
import torch

from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput

from .. import ops
from ..checks import check_choice
from .common import (DDPM_VARIANCE_TYPES, FUSED_VARIANCE_TYPES, LEARNED_VARIANCE_TYPES, NEGLIGIBLE_LAST_STEP_NOISE,
                     _FusedSteps, _fusable_tensors, _check_generator, _check_tensors, _init_of, _noted, diffusers, randn_tensor)

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
