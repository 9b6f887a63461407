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
import operator
import warnings
import weakref
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from . import ops, reference
from .samplers import DEFAULT_SAMPLER, default_steps
from .samplers import SAMPLERS as _REGISTRY
from .acceleration import ModelOptions, prepare_model
from .checks import SAMPLE_INDEX_LIMIT, check_seed, draw_seed, is_int
from .devices import resolve_device
from .outputs import NonFiniteError
from .schedule import as_schedule
from .step import StepSpec, check_choice

__all__ = ["sample"]
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
    sampler: Optional[str] = None,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
    clip_denoised: bool = True,
    clip_range: float = 1.0,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    noise: Optional[torch.Tensor] = None,
    first_index: int = 0,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
    progress: bool = True,
    return_intermediates: bool = False,
    callback: Optional[Callback] = None,
    cuda_graph: Union[str, bool] = "auto",
    backend: Optional[str] = None,
    model_dtype: Union[torch.dtype, str, None] = None,
    channels_last: bool = False,
    compile: Union[bool, dict] = False,
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
        num_steps: number of reverse steps, in ``[1, T]``; default the sampler's
            (:func:`fastddpm.samplers.default_steps`: 20 for ``dpmpp_2m``, the trained T for
            ``ddpm`` and ``ddim``). Fewer than T respace the schedule (each sampler's chain:
            ``fastddpm.samplers.SAMPLERS[name].schedule``).
        sampler: a name of the registry :data:`fastddpm.samplers.SAMPLERS`: ``"unipc"`` (UniPC,
            deterministic; the default, as on the command line), ``"dpmpp_2m"`` (DPM-Solver++(2M),
            deterministic), ``"dpmpp_2m_sde"`` (its SDE variant, noise from ``seed`` or
            ``generator``), ``"ddpm"`` (ancestral sampling) or ``"ddim"`` (Song et al., with ``eta``).
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
        first_index: global index of the batch's first sample in the seed's stream: sample
            ``first_index + b`` of the batch draws the noise of that index whatever the batch
            size (see :func:`fastddpm.reference.philox_randn`). Only with ``seed``.
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
        model_dtype: run the model in ``torch.bfloat16`` / ``torch.float16`` (or ``"bf16"``,
            ``"fp16"``, ``"fp32"``): a cast copy of an ``nn.Module`` (autocast for a plain
            callable), cached across calls; the sample, noise and step stay in ``dtype``. See
            :mod:`fastddpm.acceleration`.
        channels_last: run the (copied) model and its input in channels-last memory layout.
        compile: run the model through ``torch.compile`` (``True``, or a dict of its keyword
            arguments; default mode, static shapes), inside the step's CUDA graph when there is
            one; compiled once and cached across calls.

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
                       clip_range=clip_range, seed=seed, generator=generator, noise=noise,
                       first_index=first_index, device=device,
                       dtype=dtype, progress=progress, return_intermediates=return_intermediates,
                       callback=callback, cuda_graph=cuda_graph, backend=backend,
                       model_options=ModelOptions.build(model_dtype, channels_last, compile))
    with torch.no_grad():
        return _run(plan)


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------
def _check_shape(shape) -> Tuple[int, ...]:
    if isinstance(shape, torch.Tensor) or not isinstance(shape, (tuple, list, torch.Size)):
        raise TypeError(f"shape must be a tuple of ints (B, C, ...), got {type(shape).__name__}")
    if len(shape) < 2:
        raise ValueError(f"shape must have at least two dimensions (B, C, ...), got {tuple(shape)}")
    if not all(is_int(size) and size >= 1 for size in shape):
        raise ValueError(f"shape must hold positive ints, got {tuple(shape)}")
    return tuple(operator.index(size) for size in shape)


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
    if seed is not None:
        check_seed(seed)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return None if seed is None else operator.index(seed)


def _check_num_steps(num_steps, total: int) -> Optional[int]:
    if num_steps is None:
        return None
    if not is_int(num_steps):
        raise TypeError(f"num_steps must be an int, got {type(num_steps).__name__}")
    num_steps = operator.index(num_steps)
    if not 1 <= num_steps <= total:
        raise ValueError(f"num_steps must lie in [1, {total}] (the schedule has T={total} steps), got {num_steps}")
    return num_steps


# ---------------------------------------------------------------------------------------------
# the sampling loop
# ---------------------------------------------------------------------------------------------
class _Plan:
    """Validated arguments of one sampling call (host values only)."""

    @classmethod
    def build(cls, model, shape, *, schedule, num_steps, sampler, eta, prediction_type, variance_type,
              clip_denoised, clip_range, seed, generator, noise, first_index, device, dtype, progress,
              return_intermediates, callback, cuda_graph, backend,
              model_options: ModelOptions = ModelOptions()) -> "_Plan":
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, t), got {type(model).__name__}")
        shape = _check_shape(shape)
        if isinstance(clip_range, bool):
            raise ValueError(f"clip_range must be a number > 0, got {clip_range!r}")
        if sampler is None:
            sampler = DEFAULT_SAMPLER
        sampler_entry = _REGISTRY[check_choice("sampler", sampler, tuple(_REGISTRY))]
        spec = StepSpec.build(sampler_entry.rule_name, prediction_type=prediction_type, variance_type=variance_type,
                              clip_denoised=bool(clip_denoised), clip_range=clip_range, eta=eta)
        seed = _check_seed(seed, generator)
        if not (is_int(first_index) and 0 <= first_index and first_index + shape[0] <= SAMPLE_INDEX_LIMIT):
            raise ValueError(f"first_index must be an int with first_index + batch <= 2**32, got {first_index!r}")
        if first_index and generator is not None:
            raise ValueError("first_index indexes the seed's noise stream; it does not apply to a generator")
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

        trained = as_schedule(schedule)
        num_steps = _check_num_steps(num_steps, trained.num_timesteps)
        if num_steps is None:
            num_steps = default_steps(sampler, trained.num_timesteps)
        schedule = sampler_entry.schedule(trained, num_steps)
        schedule.check_prediction_type(spec.prediction_type)
        device = _resolve_device(device, model, noise)
        dtype = _resolve_dtype(dtype, model)
        chosen_backend = ops.resolve_backend(backend, device, dtype)
        use_graph = cuda_graph is not False and device.type == "cuda" and chosen_backend == "triton"
        if cuda_graph is True and not use_graph:
            raise ValueError(f"cuda_graph=True needs a CUDA device and the Triton kernels; got device {device} "
                             f"and backend {chosen_backend!r}")
        model_options.check_graph(use_graph)
        if generator is None and math.prod(shape[1:]) >= 4 * 2**32:
            raise ValueError(f"the Philox noise covers at most 4 * 2**32 - 1 elements a sample, shape {shape} "
                             f"has {math.prod(shape[1:])}; pass a generator")
        if seed is None and generator is None:
            # From torch's global RNG, so that torch.manual_seed makes the call reproducible.
            seed = draw_seed()

        plan = cls()
        plan.model, plan.shape, plan.schedule, plan.spec, plan.sampler = model, shape, schedule, spec, sampler_entry
        plan.seed, plan.generator, plan.initial_noise, plan.first_index = seed, generator, noise, int(first_index)
        plan.device, plan.dtype, plan.backend = device, dtype, chosen_backend
        plan.progress, plan.return_intermediates, plan.callback = progress, return_intermediates, callback
        plan.cuda_graph, plan.use_graph = cuda_graph, use_graph
        plan.model_options = model_options
        # What the loop calls: the model itself, or its prepared (cast / channels-last / compiled) form.
        plan.forward = prepare_model(model, model_options, device)
        return plan

    @property
    def num_steps(self) -> int:
        return self.schedule.num_timesteps

    def graph_key(self) -> tuple:
        """What a captured graph depends on besides the model: shapes, dtypes, the step, the chain."""
        return (self.shape, self.dtype, self.device, self.spec, self.sampler, self.backend,
                self.schedule.num_timesteps, self.schedule.timesteps.tolist(), self.schedule.betas.tolist(),
                self.generator is None, self.callback is not None, self.model_options)


class _Denoiser:
    """``model(x, t)`` as the steps need it: the output tensor (a diffusers output's ``.sample``),
    in the shape the step spec expects, checked once (the first call)."""

    def __init__(self, model, spec: StepSpec, shape):
        self.model, self.expected = model, spec.model_output_shape(shape)
        self.why = (f" (variance_type={spec.variance_type!r} needs twice the sample's {shape[1]} channels)"
                    if spec.learned_variance else "")
        self.checked = False

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        output = self.model(x, t)
        if not isinstance(output, torch.Tensor):
            output = getattr(output, "sample", output)
        if not self.checked:
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"model(x, t) must return a tensor or an object with a .sample tensor, "
                                f"got {type(output).__name__}")
            if tuple(output.shape) != self.expected:
                raise ValueError(f"model output has the wrong shape: expected {self.expected}{self.why}, "
                                 f"got {tuple(output.shape)}")
            self.checked = True
        return output


class _Run:
    """The device state of a sampling loop: fixed addresses, so that a CUDA graph can hold them.

    The step index, the model's timesteps, the seed, the noise stream counter and the sample index
    base all live in device tensors, advanced in place: nothing is read back to the host between
    steps. A run is kept with its graph and reused by a later call with the same graph key."""

    def __init__(self, plan: _Plan):
        device, steps, batch = plan.device, plan.num_steps, plan.shape[0]
        self.spec, self.schedule, self.backend, self.sampler = plan.spec, plan.schedule, plan.backend, plan.sampler
        self.denoiser = _Denoiser(plan.forward, plan.spec, plan.shape)
        self.x = torch.empty(plan.shape, dtype=plan.dtype, device=device)
        # Row i: the trained timestep of schedule index i, once per sample.
        self.model_timesteps = plan.schedule.timesteps.to(device)[:, None].expand(steps, batch).contiguous()
        self.index = torch.empty((), dtype=torch.int64, device=device)
        self.noise_offset = torch.empty((), dtype=torch.int64, device=device)
        self.seed = torch.empty((), dtype=torch.int64, device=device) if plan.generator is None else None
        self.index_base = torch.empty((), dtype=torch.int64, device=device)
        # With a generator, the step reads its noise from here (filled before each step); a step
        # that adds none (DDPM's last) still reads it, times a zero std: keep it finite.
        self.noise_buffer = (torch.zeros(plan.shape, dtype=plan.dtype, device=device)
                             if plan.generator is not None and plan.spec.adds_noise else None)
        self.pred_x0 = torch.empty_like(self.x) if plan.callback is not None else None
        # Schedule index of the first step that left a NaN / infinity; -1 while none has.
        self.first_non_finite = torch.empty((), dtype=torch.int64, device=device)
        self.buffers = plan.sampler.buffers(self)
        plan.schedule.table(device, torch.float32)  # build the device table now, not during a capture

    def reset(self, plan: _Plan) -> None:
        """Counters and x_T of a new call (in place: a graph holding this run replays them)."""
        self.denoiser.model = plan.forward
        self.x.copy_(_initial_sample(plan))
        self.index.fill_(plan.num_steps - 1)
        self.noise_offset.fill_(_INITIAL_NOISE_OFFSET + 1)
        self.index_base.fill_(plan.first_index)
        self.first_non_finite.fill_(-1)
        for buffer in self.buffers.values():  # a sampler's state between steps starts at zero
            buffer.zero_()
        if self.seed is not None:
            self.seed.fill_(plan.seed)

    def noise_args(self) -> dict:
        return dict(noise=self.noise_buffer, seed=self.seed, noise_offset=self.noise_offset,
                    index_base=self.index_base)

    def step(self) -> None:
        """Model call, the sampler's step and the counters: device work only, no host reads."""
        t = self.model_timesteps.index_select(0, self.index.view(1)).view(-1)
        output = self.denoiser(self.x, t)
        self.sampler.step(self, output)
        self._track_non_finite(output)
        self.index.sub_(1)
        self.noise_offset.add_(1)

    def _track_non_finite(self, output: torch.Tensor) -> None:
        """Note on the device (no host read, so also inside a CUDA graph) the schedule index of the
        first step whose model output or result holds a NaN or infinity. The output counts too:
        clipping x_0 can turn a NaN prediction into finite garbage."""
        finite = torch.isfinite(output).all() & torch.isfinite(self.x).all()
        went_bad = finite.logical_not() & (self.first_non_finite < 0)
        self.first_non_finite.copy_(torch.where(went_bad, self.index, self.first_non_finite))

    def raise_if_non_finite(self) -> None:
        """Read the device-side record (a host sync) and refuse non-finite samples."""
        index = int(self.first_non_finite)
        if index >= 0:
            steps = self.schedule.num_timesteps
            raise NonFiniteError(
                f"samples contain NaN or infinite values (in the model's output or the sample), first at step "
                f"{steps - index} of {steps} (model timestep {int(self.schedule.timesteps[index])}); check the "
                "model's weights and the noise schedule")


def _initial_sample(plan: _Plan) -> torch.Tensor:
    if plan.initial_noise is not None:
        return plan.initial_noise.to(device=plan.device, dtype=plan.dtype)
    if plan.generator is not None:
        return _draw(plan)
    return reference.philox_randn(plan.shape, plan.seed, _INITIAL_NOISE_OFFSET, index_base=plan.first_index,
                                  device=plan.device).to(plan.dtype)


def _draw(plan: _Plan) -> torch.Tensor:
    """One ``torch.randn`` of the sample's shape from the generator, as diffusers draws it."""
    drawn = torch.randn(plan.shape, generator=plan.generator, device=plan.generator.device, dtype=plan.dtype)
    return drawn.to(plan.device)


# model -> (graph key, run, graph): one captured loop per model, replayed by later calls with the
# same key (a weak reference: the entry goes with the model).
_GRAPHS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _run(plan: _Plan):
    from tqdm import tqdm

    cached = _cached_graph(plan)
    run, graph = cached if cached is not None else (_Run(plan), None)
    run.reset(plan)
    intermediates: Optional[List[torch.Tensor]] = [] if plan.return_intermediates else None
    try:
        with tqdm(total=plan.num_steps, disable=not plan.progress, desc=f"{plan.spec.sampler} sampling",
                  unit="step", leave=False) as bar:
            if plan.use_graph:
                _loop_graphed(plan, run, graph, intermediates, bar)
            else:
                for step in range(plan.num_steps):
                    _before_step(plan, run, step)
                    run.step()
                    _after_step(plan, run, step, intermediates)
                    bar.update(1)
    finally:
        # A kept run must not hold the model: the graph cache's weak key would never be freed.
        run.denoiser.model = None
    run.raise_if_non_finite()
    x = run.x.clone() if plan.use_graph else run.x  # a graphed run is kept and its x reused by the next call
    return (x, intermediates) if plan.return_intermediates else x


def _before_step(plan: _Plan, run: _Run, step: int) -> None:
    """Host-side preparation of step ``step``: the generator's noise, drawn in diffusers' order."""
    if run.noise_buffer is None:
        return
    if plan.spec.draws_noise_at(plan.num_steps - 1 - step):  # DDPM draws none at its last index
        run.noise_buffer.copy_(_draw(plan))


def _after_step(plan: _Plan, run: _Run, step: int, intermediates: Optional[List[torch.Tensor]]) -> None:
    if (step + 1) % _FINITE_CHECK_EVERY == 0:
        run.raise_if_non_finite()
    if intermediates is not None:
        intermediates.append(run.x.clone())
    if plan.callback is not None:
        t = int(plan.schedule.timesteps[plan.num_steps - 1 - step])  # host copy: no sync
        plan.callback(step, t, run.x.clone(), run.pred_x0.clone())


def _cached_graph(plan: _Plan):
    if not plan.use_graph:
        return None
    try:
        key, run, graph = _GRAPHS[plan.model]
    except (KeyError, TypeError):  # not cached, or a model that cannot be weakly referenced
        return None
    return (run, graph) if key == plan.graph_key() else None


def _loop_graphed(plan: _Plan, run: _Run, graph, intermediates, bar) -> None:
    """A graph cached by an earlier call replays every step. Otherwise the first steps run eagerly
    on a side stream (they compile the kernels and initialise cuBLAS/cuDNN outside the capture),
    then one step is captured and replayed for the rest, and kept for later calls."""
    with torch.cuda.device(plan.device):
        first = 0
        if graph is None:
            current = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            first = min(_GRAPH_WARMUP_STEPS, plan.num_steps)
            for step in range(first):
                side.wait_stream(current)
                with torch.cuda.stream(side):
                    _before_step(plan, run, step)
                    run.step()
                current.wait_stream(side)
                _after_step(plan, run, step, intermediates)
                bar.update(1)
            if first == plan.num_steps:
                return
            graph = _capture(plan, run)
            if graph is not None:
                try:
                    _GRAPHS[plan.model] = (plan.graph_key(), run, graph)
                except TypeError:  # a model that cannot be weakly referenced: no reuse
                    pass
        for step in range(first, plan.num_steps):
            _before_step(plan, run, step)
            if graph is not None:
                graph.replay()
            else:
                run.step()
            _after_step(plan, run, step, intermediates)
            bar.update(1)


def _capture(plan: _Plan, run: _Run):
    """A CUDA graph of :meth:`_Run.step`, or None (after a warning) when the model can't be captured.

    Capturing runs nothing: the counters, the sample and the noise buffer keep their values, so a
    failed capture leaves the state as it was and the loop continues eagerly.
    """
    graph = torch.cuda.CUDAGraph()
    caller_stream = torch.cuda.current_stream()
    try:
        with torch.cuda.graph(graph):
            run.step()
    except Exception as error:  # whatever the model did that a graph can't hold
        # torch.cuda.graph's exit ends the capture before it restores the caller's stream, so a
        # capture that fails to end leaves its side stream current: put the caller's back.
        torch.cuda.set_stream(caller_stream)
        if plan.cuda_graph is True:
            raise RuntimeError(f"cuda_graph=True but capturing the model call and step failed: {error}") from error
        warnings.warn(f"fastddpm.sample: could not capture the model in a CUDA graph ({error}); "
                      "running the steps eagerly instead (pass cuda_graph=False to skip the attempt)",
                      RuntimeWarning, stacklevel=5)
        return None
    return graph
