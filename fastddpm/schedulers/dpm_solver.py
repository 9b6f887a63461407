"""``fastddpm.DPMSolverMultistepScheduler``: diffusers' ``DPMSolverMultistepScheduler`` stepping
through :func:`fastddpm.ops.dpmpp_2m_step`."""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch

from diffusers.schedulers.scheduling_utils import SchedulerOutput

from .. import ops
from ..schedule import NoiseSchedule
from ..reference import DPMSolver
from ..step import StepSpec
from .common import (LEARNED_VARIANCE_TYPES, PREDICTION_TYPES, _check_tensors, _fusable_tensors, _FusedSteps,
                     _init_of, _SolverChain, diffusers, randn_tensor)



# diffusers' algorithm types the fused step takes, and the update rule each is (fastddpm.step.STEP_RULES)
FUSED_ALGORITHMS = {"dpmsolver++": "dpmpp_2m", "sde-dpmsolver++": "dpmpp_2m_sde"}


def _dpmpp_2m(spec: StepSpec, model_output: torch.Tensor, index: torch.Tensor, x: torch.Tensor,
              previous_x0: torch.Tensor, chain: NoiseSchedule, **options) -> torch.Tensor:
    """One fused DPM-Solver++(2M) step from chain index ``index`` (:func:`fastddpm.ops.dpmpp_2m_step`,
    the op :func:`fastddpm.samplers.dpmpp_2m` steps with too): returns x_{i-1} and overwrites
    ``previous_x0`` (contiguous, x's shape) with this step's x_0."""
    return ops.dpmpp_2m_step(spec, model_output, index, x, previous_x0, chain, **options)


class DPMSolverMultistepScheduler(_SolverChain, _FusedSteps, diffusers.DPMSolverMultistepScheduler):
    """diffusers' ``DPMSolverMultistepScheduler`` whose ``step`` runs fastddpm's fused
    DPM-Solver++(2M) step (``kernels/dpm_solver.py``; :func:`fastddpm.reference.dpmpp_2m_step`
    off CUDA unless ``FASTDDPM_BACKEND=interpret``).

    The fused path takes ``algorithm_type="dpmsolver++"`` or ``"sde-dpmsolver++"`` (its noise:
    ``variance_noise``, or drawn from ``generator`` with diffusers' ``randn_tensor`` exactly where
    diffusers draws it, or without either the in-kernel Philox stream of a seed drawn from torch's
    global RNG at ``set_timesteps``, as the DDPM scheduler's), ``solver_order`` 1, 2 or 3 (the SDE:
    1 or 2), ``solver_type="midpoint"``, each step of the order diffusers gives it
    (``lower_order_final``, ``euler_at_final``, ``final_sigmas_type`` "zero" or "sigma_min": the
    orders are computed at ``set_timesteps`` by diffusers' rule and the coefficients of each step
    derived for its order, :class:`fastddpm.reference.DPMSolver`), the plain VP sigmas of the trained
    alpha_bar or ``use_karras_sigmas`` / ``use_exponential_sigmas`` / ``use_beta_sigmas`` (a chain
    built from diffusers' own sigmas; not ``use_lu_lambdas`` or ``use_flow_sigmas``), any
    ``timestep_spacing``, ``steps_offset``, ``lambda_min_clipped`` or custom ``timesteps`` whose
    timesteps do not repeat, ``thresholding=False`` (dynamic thresholding needs a quantile of each
    sample's |x_0| before the update: not one elementwise pass; it runs diffusers' step), prediction
    types epsilon / sample / v_prediction, ``variance_type`` None or, with epsilon, learned /
    learned_range (diffusers keeps the first 3 channels, as the fused path does), and
    ``model_output`` / ``sample`` of one shape, dtype and device. Every other setting (among them
    ``rescale_betas_zero_snr``, whose last alpha_bar diffusers raises to 2**-24, above the one before
    it), and a step whose warm-up count differs from a loop started at the chain's top
    (``set_begin_index``), runs ``super().step`` unchanged. ``add_noise`` is the parent's.

    The step index is diffusers' counter (``step_index``; its first value found on the host for a
    timestep that is an int, a CPU tensor or an element of ``scheduler.timesteps``), so a step
    reads nothing back from the device. The predicted x_0s live in device buffers that the fused op
    overwrites in place; after a fused step ``model_outputs[-1]`` is this step's (and, with
    third-order steps, ``model_outputs[-2]`` the step before's); an older entry that is one of the
    buffers is set to None (its value is gone; no step reads it), so the parent's step may follow
    a fused one, and a fused one the parent's, within one loop.
    """

    __init__ = _init_of(diffusers.DPMSolverMultistepScheduler)
    _prediction_types = PREDICTION_TYPES + ("flow_prediction",)
    add_noise = diffusers.DPMSolverMultistepScheduler.add_noise  # indexed by step, not by timestep

    def _prepare(self) -> None:
        super()._prepare()
        self._chain: Optional[NoiseSchedule] = None
        self._x0_buffers: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._spec: Optional[StepSpec] = None
        self._solver: Optional[DPMSolver] = None

    def _fused_settings(self) -> bool:
        config = self.config
        return (self._trained is not None and config.algorithm_type in FUSED_ALGORITHMS
                and config.solver_order in ((1, 2) if config.algorithm_type.startswith("sde") else (1, 2, 3))
                and config.solver_type == "midpoint" and config.final_sigmas_type in ("zero", "sigma_min")
                and not config.thresholding and config.prediction_type in PREDICTION_TYPES
                and not self._unfused_sigmas())

    def fused_sampler(self) -> str:
        """The fastddpm sampler (and update rule) of the fused step: "dpmpp_2m", or "dpmpp_2m_sde" for
        ``algorithm_type="sde-dpmsolver++"``."""
        return FUSED_ALGORITHMS.get(self.config.algorithm_type, "dpmpp_2m")

    def _order_of_step(self, step: int, warmed: int, num_steps: int) -> int:
        """The order diffusers' step gives step ``step`` of ``num_steps`` after ``warmed`` steps
        (its ``lower_order_nums``)."""
        config, order = self.config, self.config.solver_order
        final = step == num_steps - 1 and (config.euler_at_final or (config.lower_order_final and num_steps < 15)
                                           or config.final_sigmas_type == "zero")
        second = step == num_steps - 2 and config.lower_order_final and num_steps < 15
        if order == 1 or warmed < 1 or final:
            return 1
        if order == 2 or warmed < 2 or second:
            return 2
        return 3

    def _orders(self, num_steps: int) -> Tuple[int, ...]:
        """Each step's order in a loop from the chain's top, by chain index (index i is step
        num_steps - 1 - i)."""
        order = self.config.solver_order
        return tuple(reversed([self._order_of_step(k, min(k, order), num_steps) for k in range(num_steps)]))

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Union[str, torch.device, None] = None,
                      mu: Optional[float] = None, timesteps: Optional[List[int]] = None) -> None:
        """diffusers' ``set_timesteps``, then the chain the fused step walks (on ``device``)."""
        if num_inference_steps is not None:
            self._check_num_inference_steps(num_inference_steps)
        values = self._set_parent_timesteps(
            lambda: super(DPMSolverMultistepScheduler, self).set_timesteps(num_inference_steps, None, mu, timesteps),
            device)
        self._chain = None
        if self._fused_settings():
            self._chain = self._solver_chain(values)
        if self._chain is not None:
            self._spec = StepSpec(self.fused_sampler(), self.config.prediction_type, "fixed_small", None)
            self._solver = DPMSolver(sde=self._spec.adds_noise, orders=self._orders(len(values)))
            self._place_chain(self._chain, self._solver)

    def _buffers(self, sample: torch.Tensor, order: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The device buffers the op reads D0_prev (and D0_prev2) from and writes D0 (and D0_prev)
        to, holding the parent's ``model_outputs[-1]`` (and ``[-2]``) where a parent's step left
        them elsewhere and this step's order reads them."""
        buffers = self._x0_buffers
        if buffers is None or buffers[0].shape != sample.shape or buffers[0].dtype != sample.dtype \
                or buffers[0].device != sample.device:
            buffers = self._x0_buffers = tuple(torch.zeros(sample.shape, dtype=sample.dtype, device=sample.device)
                                               for _ in range(2))
        previous, older = buffers
        third = self._solver.max_order == 3
        if third and order >= 3 and self.model_outputs[-2] is not older:
            older.copy_(self.model_outputs[-2])  # first: [-2] may be the other buffer
        if order >= 2 and self.model_outputs[-1] is not previous:
            previous.copy_(self.model_outputs[-1])
        return previous, (older if third else None)

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
        if self._order_of_step(step, self.lower_order_nums, total) != self._solver.order_at(index, total):
            return parent()  # e.g. the first steps below the chain's top (set_begin_index)

        device = sample.device
        previous, older = self._buffers(sample, self._solver.order_at(index, total))
        chain_index = self._index_on(index, device)
        noise, stream = None, {}
        if self._spec.adds_noise:  # the SDE variant: diffusers' draw where it draws, else the kernel's stream
            if variance_noise is not None:
                noise = variance_noise.to(device=device, dtype=torch.float32)
            elif generator is not None:
                noise = randn_tensor(output.shape, generator=generator, device=output.device, dtype=torch.float32)
            else:
                stream = self._noise_stream(device)
        prev_sample = _dpmpp_2m(self._spec, output, chain_index, sample.contiguous(), previous, self._chain,
                                older_x0=older, solver=self._solver, noise=noise, **stream)
        if stream:
            stream["noise_offset"].add_(1)
        # diffusers' list after its shift: [..., D0_prev2, D0_prev, D0]; the buffers hold the newest
        kept = (older, previous) if older is not None else (previous,)
        outputs = self.model_outputs
        shifted = [None if any(entry is buffer for buffer in kept) else entry
                   for entry in outputs[1:len(outputs) - len(kept) + 1]]
        self.model_outputs = [*shifted, *kept]
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
