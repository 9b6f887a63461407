"""The model's forward pass, fast: precision, memory layout, ``torch.compile`` and the batch size.

At the batch sizes people sample at, the model is ~99 % of every step; the fused step kernels
cannot help there. This module is the one place that turns a user's model into the callable the
sampling loop runs, with three options (:class:`ModelOptions`):

* ``dtype`` (``model_dtype=`` of :func:`fastddpm.sample`, ``--dtype`` on the command line): the
  model runs in bfloat16 or float16. For an ``nn.Module`` that is a **cast copy** of the model
  (its floating parameters and buffers cast once, the caller's model untouched), not autocast:
  autocast casts the weights again at every call, and inside a CUDA graph those casts would be
  replayed every step. A plain callable (not an ``nn.Module``) runs under ``torch.autocast``
  instead. The sample, the noise and the step's tables stay in the sample's dtype (float32 by
  default): only the model's input is cast down and its output cast back.
* ``channels_last``: the copy's 4-D weights and the model's input in channels-last layout, which
  cuDNN's convolutions prefer on tensor-core GPUs; the output goes back to the default layout.
* ``compile``: the prepared model through ``torch.compile`` (default mode, static shapes). Modes
  that capture CUDA graphs of their own (``reduce-overhead``, ``max-autotune``) are refused where
  fastddpm captures the step in its own graph: one graph holds model and step, the compiled
  kernels inside it.

Prepared models are cached per (model, options, device), so a second :func:`fastddpm.sample`
call neither copies nor compiles again; when the caller's weights change in place (an optimiser
step), the copy's weights are refreshed in place before the next call (torch bumps a tensor's
version counter on every in-place write; the copy is compared against those counters), so a
compiled function or a captured graph that holds the copy's storage stays valid.

:func:`auto_batch_size` picks the largest batch whose trial forward passes fit in the device's
free memory (``--batch-size auto``).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import weakref
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["ModelOptions", "MODEL_DTYPES", "prepare_model", "auto_batch_size", "search_batch_size",
           "CPU_DEFAULT_BATCH_SIZE"]

# The command line's names of the model precisions (--dtype), one home for them.
MODEL_DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# torch.compile modes that capture CUDA graphs of their own: they cannot live inside fastddpm's.
_GRAPHING_COMPILE_MODES = ("reduce-overhead", "max-autotune")
_COMPILE_KEYWORDS = ("mode", "backend", "fullgraph", "dynamic", "options")
# --batch-size auto where there is no device memory to measure (a CPU): the stated default.
CPU_DEFAULT_BATCH_SIZE = 64
# Share of the free device memory a chosen batch may use (the rest: allocator fragmentation,
# cuDNN workspaces, the CUDA graph's pool).
AUTO_BATCH_MEMORY_FRACTION = 0.85
# Tensors of the sample's size a sampling run keeps besides the model's own activations: x, the
# model output, the predicted x_0 / previous x_0 and a noise buffer.
_SAMPLER_STATE_COPIES = 4


def _parse_dtype(value, argument: str) -> Optional[torch.dtype]:
    if value is None:
        return None
    if isinstance(value, str):
        if value not in MODEL_DTYPES:
            raise ValueError(f"{argument} must be one of {', '.join(MODEL_DTYPES)} (or a torch dtype), got {value!r}")
        return MODEL_DTYPES[value]
    if value not in MODEL_DTYPES.values():
        raise ValueError(f"{argument} must be torch.float32, torch.bfloat16 or torch.float16, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How the model runs: ``dtype`` (None: as it is), ``channels_last``, ``compile`` (None, or
    the ``torch.compile`` keyword arguments as sorted items)."""

    dtype: Optional[torch.dtype] = None
    channels_last: bool = False
    compile: Optional[Tuple[Tuple[str, object], ...]] = None

    @classmethod
    def build(cls, model_dtype=None, channels_last=False, compile=False) -> "ModelOptions":
        """Checked options: ``model_dtype`` a torch dtype or ``"fp32"|"bf16"|"fp16"``;
        ``compile`` a bool or a dict of ``torch.compile`` keyword arguments."""
        dtype = _parse_dtype(model_dtype, "model_dtype")
        if not isinstance(channels_last, bool):
            raise TypeError(f"channels_last must be a bool, got {type(channels_last).__name__}")
        if compile is True:
            compile = {}
        if compile is False or compile is None:
            settings = None
        elif isinstance(compile, dict):
            unknown = sorted(set(compile) - set(_COMPILE_KEYWORDS))
            if unknown:
                raise ValueError(f"compile takes the torch.compile keywords {', '.join(_COMPILE_KEYWORDS)}, got "
                                 f"{', '.join(unknown)}")
            settings = {"dynamic": False, **compile}
            if isinstance(settings.get("options"), dict):
                settings["options"] = tuple(sorted(settings["options"].items()))
            settings = tuple(sorted(settings.items()))
        else:
            raise TypeError(f"compile must be a bool or a dict of torch.compile keyword arguments, got "
                            f"{type(compile).__name__}")
        return cls(dtype, channels_last, settings)

    @property
    def is_plain(self) -> bool:
        """Nothing to do: the model runs as the caller gave it."""
        return self.dtype is None and not self.channels_last and self.compile is None

    def compile_kwargs(self) -> Optional[dict]:
        """The ``torch.compile`` keyword arguments (None: not compiled)."""
        if self.compile is None:
            return None
        settings = dict(self.compile)
        if isinstance(settings.get("options"), tuple):
            settings["options"] = dict(settings["options"])
        return settings

    def sample_kwargs(self) -> dict:
        """These options as :func:`fastddpm.sample`'s keyword arguments (what ``build`` takes back)."""
        return dict(model_dtype=self.dtype, channels_last=self.channels_last, compile=self.compile_kwargs() or False)

    def compile_mode(self) -> Optional[str]:
        return dict(self.compile or ()).get("mode")

    def check_graph(self, use_graph: bool) -> None:
        """Refuse a compile mode that would capture a CUDA graph inside fastddpm's own."""
        mode = self.compile_mode()
        if use_graph and mode in _GRAPHING_COMPILE_MODES:
            raise ValueError(f"compile mode {mode!r} captures CUDA graphs of its own, and fastddpm captures the model "
                             "and step in one graph: use mode 'max-autotune-no-cudagraphs' or the default, or "
                             "cuda_graph=False")

    def describe(self) -> str:
        parts = [str(self.dtype).replace("torch.", "") if self.dtype is not None else "model dtype"]
        if self.channels_last:
            parts.append("channels_last")
        if self.compile is not None:
            parts.append("compiled" + (f" ({self.compile_mode()})" if self.compile_mode() else ""))
        return ", ".join(parts)


class _CastModel(nn.Module):
    """``model(x, t)`` with the input cast to the model's precision and layout and the output
    (a tensor, or a diffusers output's ``.sample``) back to the input's dtype and default layout.
    One module, so that ``torch.compile`` fuses the casts into the neighbouring kernels."""

    def __init__(self, model, dtype: Optional[torch.dtype], channels_last: bool, autocast: bool):
        super().__init__()
        self.model = model
        self.dtype, self.channels_last, self.autocast = dtype, channels_last, autocast

    def forward(self, x: torch.Tensor, t: torch.Tensor):
        inputs = x
        if self.channels_last and x.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        if self.autocast:
            # cache_enabled=False: autocast's weight-cast cache must not outlive a graph capture.
            with torch.autocast(device_type=x.device.type, dtype=self.dtype, cache_enabled=False):
                output = self.model(inputs, t)
        else:
            if self.dtype is not None and inputs.dtype != self.dtype:
                inputs = inputs.to(self.dtype)
            output = self.model(inputs, t)
        if not isinstance(output, torch.Tensor):
            output = getattr(output, "sample", output)
        if isinstance(output, torch.Tensor):
            output = output.to(dtype=x.dtype, memory_format=torch.contiguous_format)
        return output


def _floating_state(module: nn.Module):
    return [tensor for _, tensor in sorted(list(module.named_parameters(remove_duplicate=False))
                                           + list(module.named_buffers(remove_duplicate=False)),
                                           key=lambda item: item[0])]


class PreparedModel:
    """The callable the loop runs for one (model, options, device): see the module docstring."""

    def __init__(self, model, options: ModelOptions):
        self.options = options
        self._source = weakref.ref(model) if isinstance(model, nn.Module) else None
        if isinstance(model, nn.Module) and (options.dtype is not None or options.channels_last):
            try:
                inner = copy.deepcopy(model)
            except Exception as error:  # e.g. a model holding an open file or a lock
                raise ValueError(f"model_dtype / channels_last make a cast copy of the model, and this model cannot "
                                 f"be copied ({type(error).__name__}: {error})") from error
            if options.dtype is not None:
                nn.Module.to(inner, dtype=options.dtype)
            if options.channels_last:
                nn.Module.to(inner, memory_format=torch.channels_last)
            inner.requires_grad_(False)
            self.copy = inner
            self._pairs = list(zip(_floating_state(model), _floating_state(inner)))
            self._versions = self._source_versions()
            wrapped = _CastModel(inner, options.dtype, options.channels_last, autocast=False)
        else:
            self.copy, self._pairs, self._versions = None, [], None
            autocast = options.dtype is not None  # a plain callable: autocast is all there is
            wrapped = _CastModel(model, options.dtype, options.channels_last, autocast=autocast)
        self.module = wrapped
        self.forward: Callable = wrapped
        if options.compile is not None:
            self.forward = torch.compile(wrapped, **options.compile_kwargs())

    def _source_versions(self):
        return [source._version for source, _ in self._pairs]

    def refresh(self) -> bool:
        """Copy the caller's weights into the cast copy if any changed since; True if it did."""
        if self.copy is None:
            return False
        versions = self._source_versions()
        if versions == self._versions:
            return False
        with torch.no_grad():
            for source, target in self._pairs:
                target.copy_(source)
        self._versions = versions
        return True

    def __call__(self, x: torch.Tensor, t: torch.Tensor):
        return self.forward(x, t)


# model -> {(options, device): PreparedModel}; a weak key, so the entry goes with the model.
_PREPARED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def model_dtype(model) -> Optional[torch.dtype]:
    """The dtype of an ``nn.Module``'s first floating parameter (None: no module, or none)."""
    if not isinstance(model, nn.Module):
        return None
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def prepare_model(model, options: ModelOptions, device: Optional[torch.device] = None):
    """``model`` as the sampling loop should call it under ``options``: the model itself when the
    options ask for nothing, else a cached :class:`PreparedModel` (weights refreshed if changed)."""
    if options.is_plain:
        return model
    if not options.channels_last and options.compile is None and model_dtype(model) == options.dtype:
        return model  # already in that precision: nothing to copy
    key = (options, None if device is None else str(device))
    try:
        entries = _PREPARED.setdefault(model, {})
    except TypeError:  # cannot be weakly referenced: prepared anew every call
        return PreparedModel(model, options)
    prepared = entries.get(key)
    if prepared is None:
        prepared = entries[key] = PreparedModel(model, options)
    else:
        prepared.refresh()
    return prepared


# ---------------------------------------------------------------------------------------------
# --batch-size auto
# ---------------------------------------------------------------------------------------------
def search_batch_size(fits: Callable[[int], bool], limit: int) -> int:
    """The largest batch in ``[1, limit]`` for which ``fits(batch)`` holds, found by doubling from
    1 and then bisecting between the last batch that fit and the first that did not; ``fits`` is
    assumed monotone (a batch that fits means every smaller one does). Returns 0 if not even 1
    fits. Above 8 the result is rounded down to a multiple of 8 (tensor-core-friendly shapes)."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    good, bad, batch = 0, None, 1
    while batch <= limit:
        if fits(batch):
            good = batch
            batch *= 2
        else:
            bad = batch
            break
    if good == 0:
        return 0
    high = (bad - 1) if bad is not None else limit
    while good < high:  # invariant: good fits; everything above high is known not to (or is past limit)
        middle = (good + high + 1) // 2
        if fits(middle):
            good = middle
        else:
            high = middle - 1
    return good - good % 8 if good > 8 else good


def auto_batch_size(model, sample_shape: Sequence[int], *, device, dtype: torch.dtype = torch.float32,
                    options: ModelOptions = ModelOptions(), limit: int = 4096,
                    memory_fraction: float = AUTO_BATCH_MEMORY_FRACTION) -> Tuple[int, str]:
    """The largest batch of samples of ``sample_shape`` (C, H, W) whose sampling fits in the
    device's free memory, and a one-line account of how it was found.

    On CUDA, trial forward passes of the prepared model (``options``' precision and layout; not
    compiled: each new batch size would compile again) at growing batch sizes measure the peak
    memory; a batch fits if that peak plus the sampler's state (``_SAMPLER_STATE_COPIES`` tensors of
    the batch's size) stays within ``memory_fraction`` of the memory free before the search, and
    the forward pass did not run out of memory. Off CUDA there is nothing to measure: the stated
    default :data:`CPU_DEFAULT_BATCH_SIZE` (at most ``limit``)."""
    device = torch.device(device)
    if device.type != "cuda":
        batch = min(CPU_DEFAULT_BATCH_SIZE, limit)
        return batch, f"batch size {batch}: the default on {device.type} (no device memory to measure)"
    probe_options = dataclasses.replace(options, compile=None)
    forward = prepare_model(model, probe_options, device)
    free, _ = torch.cuda.mem_get_info(device)
    budget = memory_fraction * free
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_sample_state = _SAMPLER_STATE_COPIES * math.prod(sample_shape) * itemsize
    peaks: Dict[int, int] = {}

    def fits(batch: int) -> bool:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            with torch.no_grad():
                x = torch.randn((batch, *sample_shape), device=device, dtype=dtype)
                t = torch.full((batch,), 1, dtype=torch.int64, device=device)
                forward(x, t)
                del x, t
            torch.cuda.synchronize(device)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return False
        peaks[batch] = torch.cuda.max_memory_allocated(device) - base
        return peaks[batch] + batch * per_sample_state <= budget

    batch = search_batch_size(fits, limit)
    torch.cuda.empty_cache()
    if batch == 0:
        raise RuntimeError(f"not even one sample's forward pass fits in the {free / 2**30:.1f} GiB free on {device}")
    peak = peaks.get(batch)
    account = (f"batch size {batch}: the largest of the trial forward passes ({len(peaks)} sizes tried, up to "
               f"{limit}) within {memory_fraction:.0%} of the {free / 2**30:.1f} GiB free on {device}"
               + (f" (peak {peak / 2**30:.2f} GiB + sampler state)" if peak is not None else ""))
    return batch, account
