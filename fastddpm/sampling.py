"""``fastddpm.sample``: the whole reverse chain of a noise-prediction model in one call.

The loop never waits on the device: the step index, the model's timesteps, the seed and the
noise offset all live in device tensors that the loop advances with in-place ops, so nothing is
read back to the host between steps. That is also what lets a CUDA graph of "model call + step"
be captured once and replayed for every step.

NaN. Every step also notes on the device the first step whose model output or result is NaN /
infinite; the host reads that note every ``_FINITE_CHECK_EVERY`` steps and at the end, and
:func:`sample` raises :class:`fastddpm.outputs.NonFiniteError` naming the step instead of
returning NaN.

Noise. With ``seed`` (an int), x_T is :func:`fastddpm.reference.philox_randn` at noise offset 0
and step ``k`` (0-based, counted from x_T) draws the Philox stream of the same seed at noise
offset ``k + 1``, inside the fused kernel on CUDA and in the reference on the CPU: both paths
draw the same numbers, so they give the same samples up to float rounding. With a
``torch.Generator``, x_T and every step's noise come from ``torch.randn(generator=...)`` in the
order diffusers' pipelines draw them (x_T, then one draw per step that adds noise).
"""
from __future__ import annotations

import math
import numbers
import operator
import warnings
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from . import ops, reference
from .devices import resolve_device
from .outputs import NonFiniteError
from .reference import LEARNED_VARIANCE_TYPES, PREDICTION_TYPES, VARIANCE_TYPES
from .schedule import NoiseSchedule, as_schedule

__all__ = ["sample", "SAMPLERS"]

SAMPLERS = ("ddpm", "ddim")
_SEED_LIMIT = 2**63
# Noise offset of x_T; step k draws from offset k + 1.
_INITIAL_NOISE_OFFSET = 0
# Eager steps before a CUDA graph capture (as PyTorch's CUDA-graph notes advise, a few).
_GRAPH_WARMUP_STEPS = 3
# Every step records on the device whether the sample went NaN / infinite; the host reads that
# record only every this many steps (one host sync each time) and once at the end.
_FINITE_CHECK_EVERY = 50

Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def sample(
    model: Callable,
    shape: Sequence[int],
    *,
    schedule=None,
    num_steps: Optional[int] = None,
    sampler: str = "ddpm",
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
    clip_denoised: bool = True,
    clip_range: float = 1.0,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    noise: Optional[torch.Tensor] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
    progress: bool = True,
    return_intermediates: bool = False,
    callback: Optional[Callback] = None,
    cuda_graph: Union[str, bool] = "auto",
    backend: Optional[str] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, List[torch.Tensor]]]:
    """Draw samples by running the reverse diffusion chain of ``model``.

    Args:
        model: called as ``model(x, t)`` with ``x`` the current sample ``[B, C, ...]`` and ``t``
            an int64 tensor ``[B]`` of *trained-chain* timesteps (``schedule.timesteps[i]``, so a
            respaced chain still shows the model the timesteps it was trained on). Returns a
            tensor of ``x``'s shape, with twice the channels (dim 1) for a learned variance, or
            an object with a ``.sample`` tensor (a diffusers ``UNet2DModel``). Put the model in
            eval mode yourself.
        shape: ``(B, C, ...)`` of the samples.
        schedule: the training schedule: a :class:`NoiseSchedule`, a schedule name or a
            sequence of betas; default the DDPM paper's linear schedule with T=1000.
        num_steps: number of reverse steps, in ``[1, T]``; default ``T`` (the full chain).
            Fewer steps respace the schedule evenly (:meth:`NoiseSchedule.respace_evenly`:
            the chain always starts at the last trained timestep), for both samplers.
        sampler: ``"ddpm"`` (ancestral sampling) or ``"ddim"`` (Song et al., with ``eta``).
        eta: DDIM's noise scale (0: deterministic given x_T; 1: DDPM's posterior variance).
            Only for ``sampler="ddim"``.
        prediction_type: what the model predicts: ``epsilon``, ``sample`` or ``v_prediction``.
        variance_type: ``fixed_small``, ``fixed_small_log``, ``fixed_large``, ``learned`` or
            ``learned_range``. The learned ones expect 2C output channels; DDIM uses only the
            first C (its variance comes from ``eta``).
        clip_denoised, clip_range: clip the predicted x_0 to ``[-clip_range, clip_range]``.
        seed: int in ``[0, 2**63)`` keying the Philox noise (see the module docstring).
        generator: a ``torch.Generator`` to draw all noise from instead (diffusers-like). Not
            together with ``seed``. With neither, a seed is drawn from torch's global RNG, so
            ``torch.manual_seed`` makes the call reproducible.
        noise: optional initial sample x_T of ``shape`` (copied, never modified). With ``seed``
            as well, x_T is ``noise`` and the steps' noise still comes from ``seed``.
        device: where to sample; default the model's parameters' device (else ``noise``'s,
            else CPU).
        dtype: dtype of the sample; default the model's parameters' floating dtype, else
            float32.
        progress: show a tqdm progress bar.
        return_intermediates: also return the sample after every step.
        callback: ``callback(step, t, x, pred_x0)`` after every step, with ``step`` the 0-based
            step count, ``t`` the trained timestep just denoised (int), ``x`` the new sample
            and ``pred_x0`` the clipped x_0 prediction of that step (both copies, yours to
            keep).
        cuda_graph: on CUDA with the Triton kernels, run a few eager warm-up steps, then
            capture "model call + step" in a CUDA graph once and replay it for every other step.
            ``"auto"`` falls back to eager steps with a warning if the capture fails (and does
            nothing on the CPU or with the reference backend); ``True`` raises instead (a
            ``ValueError`` up front where no graph is possible); ``False`` never captures.
        backend: the ops backend (``auto``, ``reference``, ``triton``, ``interpret``); see
            :mod:`fastddpm.ops`. ``auto``: kernels on CUDA, reference on the CPU.

    Returns:
        The samples, a tensor of ``shape`` on ``device`` in ``dtype``, in the model's data
        scale (``[-1, 1]`` for images; no post-processing). With
        ``return_intermediates=True``, a tuple ``(samples, intermediates)`` where
        ``intermediates`` holds the sample after each step (``num_steps`` tensors, the last
        equal to ``samples``).

    Raises :class:`fastddpm.outputs.NonFiniteError` (naming the step where it started) if the
    model's output or the samples become NaN or infinite; a check every 50 steps stops the run
    early.

    On CUDA nothing in the loop synchronises with the host, except the NaN check every 50 steps,
    copying noise from a CPU ``generator`` (use a CUDA generator to avoid it) and the float64
    reference path.
    """
    plan = _Plan.build(model, shape, schedule=schedule, num_steps=num_steps, sampler=sampler, eta=eta,
                       prediction_type=prediction_type, variance_type=variance_type, clip_denoised=clip_denoised,
                       clip_range=clip_range, seed=seed, generator=generator, noise=noise, device=device,
                       dtype=dtype, progress=progress, return_intermediates=return_intermediates,
                       callback=callback, cuda_graph=cuda_graph, backend=backend)
    with torch.no_grad():
        return plan.run()


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------
def _check_shape(shape) -> Tuple[int, ...]:
    if isinstance(shape, torch.Tensor) or not isinstance(shape, (tuple, list, torch.Size)):
        raise TypeError(f"shape must be a tuple of ints (B, C, ...), got {type(shape).__name__}")
    if len(shape) < 2:
        raise ValueError(f"shape must have at least two dimensions (B, C, ...), got {tuple(shape)}")
    if not all(_is_int(size) and size >= 1 for size in shape):
        raise ValueError(f"shape must hold positive ints, got {tuple(shape)}")
    return tuple(operator.index(size) for size in shape)


def _is_int(value) -> bool:
    """An int-like value (int, numpy integer, ...) that is not a bool."""
    if isinstance(value, (bool, torch.Tensor)):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _first_parameter(model) -> Optional[torch.Tensor]:
    if isinstance(model, torch.nn.Module):
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.is_floating_point():
                return tensor
    return None


def _resolve_device(device, model, noise) -> torch.device:
    if device is not None:
        device = resolve_device(device, argument="device")
    else:
        parameter = _first_parameter(model)
        if parameter is not None:
            device = resolve_device(parameter.device, argument="the model's parameters' device")
        elif noise is not None:
            device = resolve_device(noise.device, argument="noise's device")
        else:
            device = torch.device("cpu")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def _resolve_dtype(dtype, model) -> torch.dtype:
    if dtype is None:
        parameter = _first_parameter(model)
        return parameter.dtype if parameter is not None else torch.float32
    if dtype not in ops.STORAGE_DTYPES:
        raise TypeError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype!r}")
    return dtype


def _check_seed(seed, generator) -> Optional[int]:
    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    if seed is not None and not (_is_int(seed) and 0 <= seed < _SEED_LIMIT):
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return None if seed is None else operator.index(seed)


def _schedule_for(schedule, num_steps) -> NoiseSchedule:
    schedule = as_schedule(schedule)
    total = schedule.num_timesteps
    if num_steps is None:
        return schedule
    if not _is_int(num_steps):
        raise TypeError(f"num_steps must be an int, got {type(num_steps).__name__}")
    num_steps = operator.index(num_steps)
    if not 1 <= num_steps <= total:
        raise ValueError(f"num_steps must lie in [1, {total}] (the schedule has T={total} steps), got {num_steps}")
    # Both samplers use the same evenly spaced subsequence; DDIM's final step then lands on
    # alpha_bar_prev = 1 (final_alpha_cumprod), i.e. it returns the predicted x_0.
    return schedule.respace_evenly(num_steps)


# ---------------------------------------------------------------------------------------------
# the sampling loop
# ---------------------------------------------------------------------------------------------
class _Plan:
    """Validated arguments and the device state of one sampling run."""

    @classmethod
    def build(cls, model, shape, *, schedule, num_steps, sampler, eta, prediction_type, variance_type,
              clip_denoised, clip_range, seed, generator, noise, device, dtype, progress, return_intermediates,
              callback, cuda_graph, backend) -> "_Plan":
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, t), got {type(model).__name__}")
        shape = _check_shape(shape)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not (eta >= 0 and math.isfinite(eta)):
            raise ValueError(f"eta must be a finite float >= 0, got {eta!r}")
        if sampler == "ddpm" and eta != 0:
            raise ValueError(f"eta applies to sampler='ddim' only, got eta={eta} with sampler='ddpm'")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
        if isinstance(clip_range, bool) or not isinstance(clip_range, numbers.Real) or not clip_range > 0:
            raise ValueError(f"clip_range must be a number > 0, got {clip_range!r}")
        seed = _check_seed(seed, generator)
        if noise is not None:
            if not isinstance(noise, torch.Tensor):
                raise TypeError(f"noise must be a torch.Tensor (the initial x_T), got {type(noise).__name__}")
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise (the initial x_T) must have shape {shape}, got {tuple(noise.shape)}")
            if not noise.is_floating_point():
                raise TypeError(f"noise must be a floating-point tensor, got {noise.dtype}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable as callback(step, t, x, pred_x0), got {type(callback).__name__}")
        if cuda_graph not in ("auto", True, False):
            raise ValueError(f"cuda_graph must be 'auto', True or False, got {cuda_graph!r}")

        schedule = _schedule_for(schedule, num_steps)
        schedule.check_prediction_type(prediction_type)
        device = _resolve_device(device, model, noise)
        dtype = _resolve_dtype(dtype, model)
        chosen_backend = ops.resolve_backend(backend, device, dtype)
        use_graph = cuda_graph is not False and device.type == "cuda" and chosen_backend == "triton"
        if cuda_graph is True and not use_graph:
            raise ValueError(f"cuda_graph=True needs a CUDA device and the Triton kernels; got device {device} "
                             f"and backend {chosen_backend!r}")
        if generator is None and math.prod(shape) >= 2**32:
            raise ValueError(f"the Philox noise covers at most 2**32 - 1 elements a step, shape {shape} has "
                             f"{math.prod(shape)}; pass a generator or sample in smaller batches")
        if seed is None and generator is None:
            # From torch's global RNG, so that torch.manual_seed makes the call reproducible.
            seed = int(torch.randint(0, _SEED_LIMIT - 1, (), dtype=torch.int64))

        plan = cls()
        plan.model, plan.shape, plan.schedule, plan.sampler = model, shape, schedule, sampler
        plan.eta, plan.prediction_type, plan.variance_type = float(eta), prediction_type, variance_type
        plan.clip_denoised, plan.clip_range = bool(clip_denoised), float(clip_range)
        plan.seed, plan.generator, plan.initial_noise = seed, generator, noise
        plan.device, plan.dtype, plan.backend = device, dtype, chosen_backend
        plan.progress, plan.return_intermediates, plan.callback = progress, return_intermediates, callback
        plan.cuda_graph, plan.use_graph = cuda_graph, use_graph
        return plan

    # ------------------------------------------------------------------ set-up
    @property
    def num_steps(self) -> int:
        return self.schedule.num_timesteps

    @property
    def learned_variance(self) -> bool:
        return self.variance_type in LEARNED_VARIANCE_TYPES

    @property
    def expected_output_shape(self) -> Tuple[int, ...]:
        if self.learned_variance:
            return (self.shape[0], 2 * self.shape[1]) + self.shape[2:]
        return self.shape

    @property
    def step_adds_noise(self) -> bool:
        return self.sampler == "ddpm" or self.eta > 0

    def _draw(self) -> torch.Tensor:
        """One ``torch.randn`` of the sample's shape from the generator, as diffusers draws it."""
        drawn = torch.randn(self.shape, generator=self.generator, device=self.generator.device, dtype=self.dtype)
        return drawn.to(self.device)

    def _initial_sample(self) -> torch.Tensor:
        if self.initial_noise is not None:
            return self.initial_noise.to(device=self.device, dtype=self.dtype, copy=True).contiguous()
        if self.generator is not None:
            return self._draw().contiguous()
        x_T = reference.philox_randn(self.shape, self.seed, _INITIAL_NOISE_OFFSET, device=self.device)
        return x_T.to(self.dtype).contiguous()

    def _allocate_state(self) -> None:
        """Device tensors the step reads and advances; fixed addresses, so a CUDA graph can too."""
        device, steps, batch = self.device, self.num_steps, self.shape[0]
        self.x = self._initial_sample()
        # Row i: the trained timestep of schedule index i, once per sample.
        self.model_timesteps = self.schedule.timesteps.to(device)[:, None].expand(steps, batch).contiguous()
        self.step_index = torch.tensor(steps - 1, dtype=torch.int64, device=device)
        self.noise_offset = torch.tensor(_INITIAL_NOISE_OFFSET + 1, dtype=torch.int64, device=device)
        self.seed_tensor = None
        self.noise_buffer = None
        if self.generator is None:
            self.seed_tensor = torch.tensor(self.seed, dtype=torch.int64, device=device)
        elif self.step_adds_noise:
            # Steps that add no noise (DDPM's last) still read it, times a zero std: keep it finite.
            self.noise_buffer = torch.zeros(self.shape, dtype=self.dtype, device=device)
        wants_pred_x0 = self.callback is not None
        self.pred_x0 = torch.empty_like(self.x) if wants_pred_x0 else None
        # Schedule index of the first step that left x NaN / infinite; -1 while none has.
        self.first_non_finite = torch.full((), -1, dtype=torch.int64, device=device)
        self.schedule.table(device, torch.float32)  # build the device table now, not during capture

    # ------------------------------------------------------------------ one step
    def _model_output(self) -> torch.Tensor:
        t = self.model_timesteps.index_select(0, self.step_index.view(1)).view(-1)
        output = self.model(self.x, t)
        if not isinstance(output, torch.Tensor):
            inner = getattr(output, "sample", None)
            if not isinstance(inner, torch.Tensor):
                raise TypeError(f"model(x, t) must return a tensor or an object with a .sample tensor, "
                                f"got {type(output).__name__}")
            output = inner
        expected = self.expected_output_shape
        if tuple(output.shape) != expected:
            why = (f" (variance_type={self.variance_type!r} needs twice the sample's {self.shape[1]} channels)"
                   if self.learned_variance else "")
            raise ValueError(f"model output has the wrong shape: expected {expected}{why}, got {tuple(output.shape)}")
        if self.sampler == "ddim" and self.learned_variance:
            output = output[:, : self.shape[1]]
        return output

    def _step(self) -> None:
        """Model call + reverse step + counter updates: device work only, no host reads."""
        output = self._model_output()
        noise_args = dict(noise=self.noise_buffer, seed=self.seed_tensor, noise_offset=self.noise_offset)
        common = dict(prediction_type=self.prediction_type, clip_denoised=self.clip_denoised,
                      clip_range=self.clip_range, out=self.x, pred_x0_out=self.pred_x0, return_pred_x0=False,
                      backend=self.backend, **noise_args)
        if self.sampler == "ddpm":
            ops.ddpm_step(output, self.step_index, self.x, self.schedule, variance_type=self.variance_type, **common)
        else:
            ops.ddim_step(output, self.step_index, self.x, self.schedule, eta=self.eta, **common)
        self._track_non_finite(output)
        self.step_index.sub_(1)
        self.noise_offset.add_(1)

    def _track_non_finite(self, output: torch.Tensor) -> None:
        """Note on the device (no host read, so also inside a CUDA graph) the schedule index of
        the first step whose model output or result holds a NaN or infinity. The output counts
        too: clipping x_0 can turn a NaN prediction into finite garbage."""
        finite = torch.isfinite(output).all() & torch.isfinite(self.x).all()
        went_bad = finite.logical_not() & (self.first_non_finite < 0)
        self.first_non_finite.copy_(torch.where(went_bad, self.step_index, self.first_non_finite))

    def _raise_if_non_finite(self) -> None:
        """Read the device-side record (a host sync) and refuse non-finite samples."""
        index = int(self.first_non_finite)
        if index >= 0:
            step = self.num_steps - index  # 1-based: the first step has schedule index T - 1
            raise NonFiniteError(
                f"samples contain NaN or infinite values (in the model's output or the sample), first at step "
                f"{step} of {self.num_steps} (model timestep {int(self.schedule.timesteps[index])}); check the "
                "model's weights and the noise schedule")

    def _before_step(self, step: int) -> None:
        """Host-side preparation of step ``step``: the generator's noise, drawn in diffusers' order."""
        if self.noise_buffer is None:
            return
        index = self.num_steps - 1 - step
        if self.sampler == "ddim" or index > 0:  # DDPM adds (and draws) no noise at index 0
            self.noise_buffer.copy_(self._draw())

    def _after_step(self, step: int, intermediates: Optional[List[torch.Tensor]]) -> None:
        if (step + 1) % _FINITE_CHECK_EVERY == 0:
            self._raise_if_non_finite()
        if intermediates is not None:
            intermediates.append(self.x.clone())
        if self.callback is not None:
            t = int(self.schedule.timesteps[self.num_steps - 1 - step])  # host copy: no sync
            self.callback(step, t, self.x.clone(), self.pred_x0.clone())

    # ------------------------------------------------------------------ the loop
    def run(self):
        self._allocate_state()
        intermediates: Optional[List[torch.Tensor]] = [] if self.return_intermediates else None
        from tqdm import tqdm

        with tqdm(total=self.num_steps, disable=not self.progress, desc=f"{self.sampler} sampling",
                  unit="step", leave=False) as bar:
            if self.use_graph:
                self._run_graphed(intermediates, bar)
            else:
                for step in range(self.num_steps):
                    self._before_step(step)
                    self._step()
                    self._after_step(step, intermediates)
                    bar.update(1)
        self._raise_if_non_finite()
        return (self.x, intermediates) if self.return_intermediates else self.x

    def _run_graphed(self, intermediates, bar) -> None:
        """The first steps eagerly on a side stream (they compile the kernels and initialise
        cuBLAS/cuDNN and the like outside the capture), then one step captured and replayed for
        the rest."""
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            warmup_steps = min(_GRAPH_WARMUP_STEPS, self.num_steps)
            for step in range(warmup_steps):
                side.wait_stream(current)
                with torch.cuda.stream(side):
                    self._before_step(step)
                    self._step()
                current.wait_stream(side)
                self._after_step(step, intermediates)
                bar.update(1)
            if warmup_steps == self.num_steps:
                return
            graph = self._capture()
            for step in range(warmup_steps, self.num_steps):
                self._before_step(step)
                if graph is not None:
                    graph.replay()
                else:
                    self._step()
                self._after_step(step, intermediates)
                bar.update(1)

    def _capture(self):
        """A CUDA graph of :meth:`_step`, or None (after a warning) when the model can't be captured.

        Capturing runs nothing: the counters, the sample and the noise buffer keep their values,
        so a failed capture leaves the state as it was and the loop continues eagerly.
        """
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._step()
        except Exception as error:  # whatever the model did that a graph can't hold
            if self.cuda_graph is True:
                raise RuntimeError(f"cuda_graph=True but capturing the model call and step failed: {error}") from error
            warnings.warn(f"fastddpm.sample: could not capture the model in a CUDA graph ({error}); "
                          "running the steps eagerly instead (pass cuda_graph=False to skip the attempt)",
                          RuntimeWarning, stacklevel=4)
            return None
        return graph
