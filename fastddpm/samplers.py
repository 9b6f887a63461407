"""The samplers: each one a short function of one reverse step, registered in :data:`SAMPLERS`.

A sampler's ``step(run, model_output)`` reads the run's device state (``run.x``, the schedule index
``run.index``, the noise counters, ``run.spec``) and writes x_{t-1} into ``run.x`` in place, on the
device, without reading anything back to the host. The runner (:mod:`fastddpm.sampling`) owns
everything else: the loop and its counters, the model call (through its denoiser wrapper), the
noise of x_T, progress, callbacks and the CUDA graph. ``buffers(run)`` allocates the device state a
sampler keeps between steps (none for DDPM and DDIM); ``schedule(trained, num_steps)`` gives the
chain the sampler walks.

Adding a sampler with an update rule of its own touches four files: its function and entry here, its
op and rule in ``fastddpm/ops.py``, its reference (and coefficients, if it has its own) in
``fastddpm/reference.py`` and its kernel in ``kernels/`` (docs/architecture.md).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional

import torch

from . import ops
from .schedule import NoiseSchedule
from .step import STEP_RULES, StepRule

__all__ = ["Sampler", "SAMPLERS", "DEFAULT_SAMPLER", "default_steps", "takes_eta_samplers"]


def _no_buffers(run) -> Dict[str, torch.Tensor]:
    return {}


def _respace_evenly(trained: NoiseSchedule, num_steps: Optional[int]) -> NoiseSchedule:
    # The evenly spaced subsequence that always starts at the last trained timestep; DDIM's final
    # step then lands on alpha_bar_prev = 1 (final_alpha_cumprod), i.e. returns the predicted x_0.
    return trained if num_steps is None else trained.respace_evenly(num_steps)


def _respace_linspace(trained: NoiseSchedule, num_steps: Optional[int]) -> NoiseSchedule:
    """The timesteps of ``linspace(0, T - 1, num_steps + 1)`` rounded, without the 0, then a last
    step to x_0 (alpha_bar = 1): diffusers' DPMSolverMultistepScheduler's default chain. Stepping
    from the lowest noise level to x_0 in one first-order step, instead of into t = 0 first, keeps a
    second-order step out of the near-singular end where h = lambda_{t-1} - lambda_t is large."""
    if num_steps is None:
        return trained
    total = trained.num_timesteps
    timesteps = torch.linspace(0, total - 1, num_steps + 1, dtype=torch.float64).round().to(torch.int64)[1:]
    if len(torch.unique(timesteps)) != num_steps:  # too many steps for distinct rounded timesteps
        return trained.respace_evenly(num_steps)
    return trained.respace(timesteps.tolist())


@dataclasses.dataclass(frozen=True)
class Sampler:
    """One sampler: its step, the device buffers it keeps, and the chain it walks."""

    step: Callable[[object, torch.Tensor], None]
    # The update rule of the ops it steps with (fastddpm.step.STEP_RULES: eta, noise, variance channels).
    rule_name: str
    buffers: Callable[[object], Dict[str, torch.Tensor]] = _no_buffers
    schedule: Callable[[NoiseSchedule, Optional[int]], NoiseSchedule] = _respace_evenly
    # The step count when none is given (None: the trained chain).
    default_steps: Optional[int] = None
    # One line for help texts.
    description: str = ""

    def __post_init__(self):
        if self.rule_name not in STEP_RULES:
            raise ValueError(f"rule_name must be one of {tuple(STEP_RULES)}, got {self.rule_name!r}")

    @property
    def rule(self) -> StepRule:
        return STEP_RULES[self.rule_name]


def posterior_step(run, model_output: torch.Tensor) -> None:
    """DDPM's ancestral step and DDIM's update: one fused op, ``run.spec`` says which."""
    ops.step(run.spec, model_output, run.index, run.x, run.schedule, **run.noise_args(), out=run.x,
             pred_x0_out=run.pred_x0, return_pred_x0=False, backend=run.backend)


def dpmpp_2m(run, model_output: torch.Tensor) -> None:
    """DPM-Solver++(2M), second order from the previous step's x_0 (:func:`fastddpm.ops.dpmpp_2m_step`):
    deterministic, or with its SDE variant's noise (the run's stream, as DDPM's)."""
    previous = run.buffers["previous_x0"]
    noise = run.noise_args() if run.spec.adds_noise else {}
    ops.dpmpp_2m_step(run.spec, model_output, run.index, run.x, previous, run.schedule, out=run.x,
                      backend=run.backend, **noise)
    if run.pred_x0 is not None:
        run.pred_x0.copy_(previous)


def _previous_x0(run) -> Dict[str, torch.Tensor]:
    return {"previous_x0": torch.zeros_like(run.x)}


def unipc(run, model_output: torch.Tensor) -> None:
    """UniPC (bh2, order 2): deterministic; each step corrects the sample with this model output,
    then predicts the next (:func:`fastddpm.ops.unipc_step`)."""
    previous = run.buffers["previous_x0"]
    ops.unipc_step(run.spec, model_output, run.index, run.x, run.buffers["corrector"], previous, run.schedule,
                   out=run.x, backend=run.backend)
    if run.pred_x0 is not None:
        run.pred_x0.copy_(previous)


SAMPLERS: Dict[str, Sampler] = {
    "ddpm": Sampler(posterior_step, "ddpm", description="ancestral sampling through the posterior (Ho et al.)"),
    "ddim": Sampler(posterior_step, "ddim", description="Song et al.'s update, noise scale --eta"),
    "dpmpp_2m": Sampler(dpmpp_2m, "dpmpp_2m", buffers=_previous_x0, schedule=_respace_linspace, default_steps=20,
                        description="DPM-Solver++(2M) (Lu et al. 2022), deterministic"),
    "dpmpp_2m_sde": Sampler(dpmpp_2m, "dpmpp_2m_sde", buffers=_previous_x0, schedule=_respace_linspace,
                            default_steps=20, description="DPM-Solver++(2M) SDE (Lu et al. 2022), stochastic"),
    "unipc": Sampler(unipc, "unipc", buffers=lambda run: {"corrector": torch.zeros_like(run.x),
                                                          "previous_x0": torch.zeros_like(run.x)},
                     schedule=_respace_linspace, default_steps=20,
                     description="UniPC (Zhao et al. 2023), bh2 predictor-corrector of order 2, deterministic"),
}


def takes_eta_samplers():
    """The samplers with a noise scale ``eta`` (their rule's ``takes_eta``)."""
    return [name for name, entry in SAMPLERS.items() if entry.rule.takes_eta]


# The one default of fastddpm.sample, `fastddpm sample` and `fastddpm eval`: UniPC at its default 20
# steps. On the shipped model (1000 samples x 5 seeds, paired) it ties DPM-Solver++(2M) at 20 steps and
# beats it at 5 and 10, at the same time a call (one model call a step; benchmarks/sampler_cost.py):
# the best quality per second at every budget up to 20 steps (docs/evaluation.md, "Quality against
# step count").
DEFAULT_SAMPLER = "unipc"


def default_steps(sampler: str, num_timesteps: int) -> int:
    """The step count of ``sampler`` when none is given: its registry default, at most the trained T
    (the trained chain for samplers without one)."""
    return min(SAMPLERS[sampler].default_steps or num_timesteps, num_timesteps)


def describe() -> str:
    """One phrase per sampler for help texts: its name, what it is and its default step count."""
    return "; ".join(f"{name}: {entry.description} ({entry.default_steps or 'T'} steps by default)"
                     for name, entry in SAMPLERS.items())
