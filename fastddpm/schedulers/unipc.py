"""``fastddpm.UniPCMultistepScheduler``: diffusers' ``UniPCMultistepScheduler`` stepping through
:func:`fastddpm.ops.unipc_step` (the corrector and the predictor in one fused pass)."""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch

from diffusers.schedulers.scheduling_utils import SchedulerOutput

from .. import ops
from ..reference import UniPC
from ..schedule import NoiseSchedule
from ..step import StepSpec
from .common import PREDICTION_TYPES, _check_tensors, _fusable_tensors, _FusedSteps, _init_of, _SolverChain, diffusers


def _unipc(spec: StepSpec, model_output: torch.Tensor, index: torch.Tensor, x: torch.Tensor, corrector: torch.Tensor,
           previous_x0: torch.Tensor, chain: NoiseSchedule, solver: UniPC) -> torch.Tensor:
    """One fused UniPC step from chain index ``index`` (:func:`fastddpm.ops.unipc_step`, the op
    :func:`fastddpm.samplers.unipc` steps with too): returns x_{i-1}; overwrites ``corrector`` and
    ``previous_x0`` with the next step's corrector part and this step's x_0."""
    return ops.unipc_step(spec, model_output, index, x, corrector, previous_x0, chain, solver=solver)


class UniPCMultistepScheduler(_SolverChain, _FusedSteps, diffusers.UniPCMultistepScheduler):
    """diffusers' ``UniPCMultistepScheduler`` whose ``step`` runs fastddpm's fused UniPC step
    (``kernels/unipc.py``; :func:`fastddpm.reference.unipc_step` off CUDA unless
    ``FASTDDPM_BACKEND=interpret``): the corrector of the step before (UniC, with this model
    output) and the predictor (UniP) in one pass over the sample.

    The fused path takes ``predict_x0=True``, ``solver_type`` "bh2" or "bh1", ``solver_order`` 1 or 2,
    no ``solver_p``, any ``disable_corrector`` and ``lower_order_final``, ``final_sigmas_type``
    "zero" or "sigma_min" where diffusers' last step is defined (with "zero": bh2, and a first-order
    last step; diffusers' bh1 and second-order last steps onto sigma 0 return NaN, and run its own
    step so that this one does too), the plain VP sigmas of the trained alpha_bar or
    ``use_karras_sigmas`` / ``use_exponential_sigmas`` / ``use_beta_sigmas``, any
    ``timestep_spacing`` and ``steps_offset`` whose timesteps do not repeat, ``thresholding=False``,
    prediction types epsilon / sample / v_prediction, and ``model_output`` / ``sample`` of one shape,
    dtype and device at the loop's first step. Every other setting (``solver_order=3``,
    ``use_flow_sigmas``, ``rescale_betas_zero_snr``, ...), and a loop whose first step is not the
    chain's first (``set_begin_index``), runs ``super().step`` unchanged. ``add_noise`` is the
    parent's.

    The solver's state between steps lives in two device buffers (the corrector's part and the last
    x_0) that the fused op overwrites, instead of diffusers' last sample and list of x_0s: after a
    fused step ``model_outputs[-1]`` is the x_0 buffer, earlier entries are None and
    ``last_sample`` is None. So a loop that starts fused stays fused: a later step whose
    ``model_output`` comes in another dtype or on another device is brought to the sample's.
    """

    __init__ = _init_of(diffusers.UniPCMultistepScheduler)
    _prediction_types = PREDICTION_TYPES + ("flow_prediction",)
    add_noise = diffusers.UniPCMultistepScheduler.add_noise  # indexed by step, not by timestep

    def _prepare(self) -> None:
        super()._prepare()
        self._chain: Optional[NoiseSchedule] = None
        self._solver: Optional[UniPC] = None
        self._buffers: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._fused_loop = False
        self._spec = StepSpec("unipc", self.config.prediction_type if self.config.prediction_type in PREDICTION_TYPES
                              else "epsilon", "fixed_small", None)

    def _fused_settings(self) -> bool:
        config = self.config
        return (self._trained is not None and config.predict_x0 and config.solver_type in ("bh1", "bh2")
                and config.solver_order in (1, 2) and self.solver_p is None and not config.thresholding
                and config.prediction_type in PREDICTION_TYPES and not config.use_dynamic_shifting
                and not self._unfused_sigmas())

    def _last_step_defined(self, num_steps: int) -> bool:
        """Whether diffusers' last step gives numbers (the fused one always does): onto sigma 0 only
        with bh2 and a first-order last step."""
        config = self.config
        if config.final_sigmas_type != "zero":
            return True
        return config.solver_type == "bh2" and (config.lower_order_final or config.solver_order == 1 or num_steps == 1)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Union[str, torch.device, None] = None,
                      sigmas: Optional[List[float]] = None, mu: Optional[float] = None) -> None:
        """diffusers' ``set_timesteps``, then the chain the fused step walks (on ``device``)."""
        if num_inference_steps is not None:
            self._check_num_inference_steps(num_inference_steps)
        values = self._set_parent_timesteps(
            lambda: super(UniPCMultistepScheduler, self).set_timesteps(num_inference_steps, None, sigmas, mu), device)
        self._chain, self._fused_loop = None, False
        if self._fused_settings() and self._last_step_defined(len(values)):
            self._chain = self._solver_chain(values)
        if self._chain is not None:
            config = self.config
            self._solver = UniPC(order=config.solver_order, variant=config.solver_type,
                                 lower_order_final=config.lower_order_final,
                                 disable_corrector=frozenset(config.disable_corrector or ()))
            self._place_chain(self._chain, self._solver)

    def _state(self, sample: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The corrector part and last x_0 buffers in the sample's shape, dtype and device (zeros at
        a loop's first step; moved along if a later step's sample lives elsewhere)."""
        buffers = self._buffers
        if buffers is None or buffers[0].shape != sample.shape:
            buffers = tuple(torch.zeros(sample.shape, dtype=sample.dtype, device=sample.device) for _ in range(2))
        elif buffers[0].dtype != sample.dtype or buffers[0].device != sample.device:
            buffers = tuple(buffer.to(device=sample.device, dtype=sample.dtype) for buffer in buffers)
        self._buffers = buffers
        return buffers

    def step(self, model_output: torch.Tensor, timestep: Union[int, torch.Tensor], sample: torch.Tensor,
             return_dict: bool = True) -> Union[SchedulerOutput, Tuple]:
        """diffusers' ``UniPCMultistepScheduler.step``, fused where the settings allow (class
        docstring)."""
        def parent():
            return super(UniPCMultistepScheduler, self).step(model_output, timestep, sample, return_dict)

        if self.num_inference_steps is None or self._chain is None:
            return parent()
        _check_tensors(model_output=model_output, sample=sample)
        if self.step_index is None:
            self._init_step_index(timestep)
        total = len(self._host_timesteps)
        step = self.step_index
        if not 0 <= step < total:
            return parent()  # diffusers' own error
        output = model_output
        fusable = _fusable_tensors(output, sample) and output.shape == sample.shape
        if step == 0:
            self._fused_loop = fusable
        if not self._fused_loop:
            return parent()
        if not fusable:  # a fused loop stays fused: the output comes to the sample
            output = output.to(device=sample.device, dtype=sample.dtype)
            if output.shape != sample.shape or sample.dtype not in ops.STORAGE_DTYPES:
                raise ValueError(f"model_output must have the sample's shape {tuple(sample.shape)} and a floating "
                                 f"dtype at every step of a fused loop, got {tuple(model_output.shape)} "
                                 f"{model_output.dtype} at step {step}")
        corrector, previous = self._state(sample)
        if step == 0:
            corrector.zero_()
            previous.zero_()
        index = self._index_on(total - 1 - step, sample.device)
        prev_sample = _unipc(self._spec, output, index, sample.contiguous(), corrector, previous, self._chain,
                             self._solver)
        # diffusers' bookkeeping, as its step leaves it (the values live in the buffers)
        order = self.config.solver_order
        self.model_outputs = [None] * (order - 1) + [previous]
        self.timestep_list = [*self.timestep_list[1:], timestep]
        self.this_order = min(order, self.lower_order_nums + 1,
                              (total - step) if self.config.lower_order_final else order)
        self.last_sample = None
        if self.lower_order_nums < order:
            self.lower_order_nums += 1
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
