"""Public per-step ops: argument checks, then dispatch to the Triton kernels or the reference.

Backends: ``auto`` (CUDA tensors in float32/float16/bfloat16 go to the kernels, everything else
to the reference), ``reference``, ``triton`` (kernels, CUDA tensors only) and ``interpret``
(kernels through Triton's interpreter, CPU tensors: for tests). Choose per call with
``backend=`` or for the process with the ``FASTDDPM_BACKEND`` environment variable.

Every check runs before anything is launched or written. Values of ``t`` held in CUDA tensors
are not range-checked (that would synchronise with the device); the kernels clamp them.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional, Tuple, Union

import torch

from . import reference
from .checks import SEED_LIMIT
from .schedule import NoiseSchedule
from .step import StepRule, StepSpec, register_rule

__all__ = ["BACKENDS", "KERNEL_DTYPES", "q_sample", "step", "ddpm_step", "ddim_step", "dpmpp_2m_step", "unipc_step",
           "timestep_embedding",
           "resolve_backend", "triton_available"]

BACKENDS = ("auto", "reference", "triton", "interpret")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STORAGE_DTYPES = KERNEL_DTYPES + (torch.float64,)
_kernel_flavours = {}  # interpret (bool) -> the kernels package of that flavour


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return True


def _load_kernels(interpret: bool):
    """The kernels package interpreted (CPU tensors) or compiled (CUDA tensors), each imported once.

    Which flavour a plain ``import fastddpm.kernels`` gives depends on ``TRITON_INTERPRET`` when it
    runs; the flavour is read off the kernel objects, never from the environment. The other one
    is imported as a twin package with Triton's interpret knob set for that import alone, so both
    can live in one process in any order, and nothing is set process-wide."""
    if interpret not in _kernel_flavours:
        from . import kernels

        if kernels.is_interpreted() == interpret:
            _kernel_flavours[interpret] = kernels
        else:
            _kernel_flavours[interpret] = _import_twin(kernels, interpret)
    return _kernel_flavours[interpret]


def kernel_module(name: str, *, interpret: bool):
    """The module ``kernels/<name>.py`` of the flavour :func:`_load_kernels` gives (a sampler's
    kernel without an entry in ``kernels/__init__.py``)."""
    import importlib

    return importlib.import_module(f"{_load_kernels(interpret).__name__}.{name}")


def _import_twin(kernels, interpret: bool):
    import importlib
    import importlib.util
    import pkgutil
    import sys

    name = f"{__package__}._kernels_{'interpreted' if interpret else 'compiled'}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, kernels.__file__, submodule_search_locations=list(kernels.__path__))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            with _interpret_knob(interpret):
                spec.loader.exec_module(module)
                for info in pkgutil.iter_modules(module.__path__):  # every kernel, in this flavour
                    importlib.import_module(f"{name}.{info.name}")
        except BaseException:
            for loaded in [key for key in sys.modules if key == name or key.startswith(name + ".")]:
                del sys.modules[loaded]
            raise
    twin = sys.modules[name]
    if twin.is_interpreted() != interpret:  # pragma: no cover - a Triton without the knob
        raise RuntimeError(f"could not import fastddpm's kernels {'interpreted' if interpret else 'compiled'} "
                           "in this process; set TRITON_INTERPRET before the first import instead")
    return twin


@contextlib.contextmanager
def _interpret_knob(interpret: bool):
    """Triton's interpret switch, read by ``@triton.jit`` while a module is imported, for one import."""
    from triton import knobs

    with knobs.runtime.scope():
        knobs.runtime.interpret = interpret
        yield


def resolve_backend(backend: Optional[str], device: torch.device, dtype: torch.dtype) -> str:
    """The backend a call will use: ``reference``, ``triton`` or ``interpret``."""
    if backend is None:
        backend = os.environ.get("FASTDDPM_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        use_kernels = device.type == "cuda" and dtype in KERNEL_DTYPES and triton_available()
        return "triton" if use_kernels else "reference"
    if backend in ("triton", "interpret"):
        if not triton_available():
            raise RuntimeError(f"backend={backend!r} needs the triton package, which is not importable")
        if dtype not in KERNEL_DTYPES:
            raise TypeError(f"the Triton kernels store {[str(d) for d in KERNEL_DTYPES]}, got {dtype}; "
                            "use backend='reference' for other dtypes")
        if backend == "triton" and device.type != "cuda":
            raise ValueError(f"backend='triton' needs CUDA tensors, got device {device}; "
                             "use backend='interpret' to run the kernels on the CPU")
        if backend == "interpret" and device.type != "cpu":
            raise ValueError(f"backend='interpret' runs on CPU tensors, got device {device}")
    return backend


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------
def _check_floating(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in STORAGE_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    return x


def _check_schedule(schedule) -> NoiseSchedule:
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a fastddpm.NoiseSchedule, got {type(schedule).__name__}")
    return schedule


def _check_same_device(name: str, x: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; they must share a device")


def _check_t(t, batch: Optional[int], num_timesteps: int, device: torch.device) -> torch.Tensor:
    """``t`` as an int64 tensor on ``device``, shape [] or [batch]."""
    if isinstance(t, bool) or not isinstance(t, (int, torch.Tensor)) and not hasattr(t, "__index__"):
        raise TypeError(f"t must be an int or an integer tensor, got {type(t).__name__}")
    if not isinstance(t, torch.Tensor):
        t = int(t)
        if not 0 <= t < num_timesteps:
            raise ValueError(f"t must lie in [0, {num_timesteps - 1}] (the schedule's indices), got {t}")
        return torch.tensor(t, dtype=torch.int64, device=device)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"t must be an integer tensor, got dtype {t.dtype}")
    if t.ndim > 1 or (t.ndim == 1 and batch is not None and t.shape[0] != batch):
        raise ValueError(f"t must be a scalar or have shape [{batch}] (one index per sample), got shape {tuple(t.shape)}")
    if t.device.type == "cpu" and t.numel() > 0:
        low, high = int(t.min()), int(t.max())
        if low < 0 or high >= num_timesteps:
            raise ValueError(f"t must lie in [0, {num_timesteps - 1}] (the schedule's indices), got values in [{low}, {high}]")
    return t.to(device=device, dtype=torch.int64).contiguous()


def _check_batch(name: str, x: torch.Tensor) -> None:
    """The one rule for a batch (``fastddpm.sample``'s too): shape [B, ...] with B >= 1."""
    if x.ndim == 0 or x.shape[0] < 1:
        raise ValueError(f"{name} must have shape [B, ...] with a batch of B >= 1, got shape {tuple(x.shape)}")


def _check_noise(noise, x: torch.Tensor, seed, noise_offset, index_base=0, *, needed: bool = True):
    if noise is not None:
        _check_floating("noise", noise)
        if noise.shape != x.shape:
            raise ValueError(f"noise must have the shape of the sample {tuple(x.shape)}, got {tuple(noise.shape)}")
        _check_same_device("noise", noise, x, "the sample")
        if seed is not None:
            raise ValueError("give noise or seed, not both: seed keys the in-kernel noise that noise replaces")
        return
    if not needed:
        return
    if seed is None:
        raise ValueError("give either noise (a tensor) or seed (an int or int64 tensor) for the step's noise")
    batch = x.shape[0] if x.ndim else 1
    for name, value, limit in (("seed", seed, SEED_LIMIT), ("noise_offset", noise_offset, 2**32),
                               ("index_base", index_base, 2**32 - batch + 1)):
        if isinstance(value, torch.Tensor):
            if value.dtype != torch.int64 or value.numel() != 1:
                raise TypeError(f"{name} as a tensor must be a single int64 value, got dtype {value.dtype}, shape {tuple(value.shape)}")
            if value.device.type == "cpu" and not 0 <= int(value) < limit:
                raise ValueError(f"{name} must lie in [0, {limit}), got {int(value)}")
        elif isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int or an int64 tensor, got {type(value).__name__}")
        elif not 0 <= value < limit:
            raise ValueError(f"{name} must lie in [0, {limit}), got {value}")
    if x.numel() // max(batch, 1) >= 4 * 2**32:
        raise ValueError(f"in-kernel noise covers at most 4 * 2**32 - 1 elements a sample, got "
                         f"{x.numel() // batch}; pass noise")


_SCALAR_CACHE_SIZE = 64
_scalar_cache = {}  # (int, device) -> int64 tensor []: constants (index_base=0, ...) copied once


def _scalar_on(value, device: torch.device) -> torch.Tensor:
    """``value`` as an int64 device tensor []; Python ints are copied to the device once each (a
    copy per call would cost a host-device transfer each time), the most recent few kept."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device).reshape(())
    key = (int(value), device)
    tensor = _scalar_cache.pop(key, None)
    if tensor is None:
        tensor = torch.tensor(key[0], dtype=torch.int64, device=device)
    elif len(_scalar_cache) >= _SCALAR_CACHE_SIZE:
        _scalar_cache.pop(next(iter(_scalar_cache)))
    _scalar_cache[key] = tensor  # most recent last
    return tensor


def _noise_scalars(in_kernel: bool, seed, noise_offset, index_base, device: torch.device) -> dict:
    """The in-kernel noise's key and counters as int64 device tensors [] (None when not drawn)."""
    names = ("seed", "noise_offset", "index_base")
    if not in_kernel:
        return dict.fromkeys(names)
    return {name: _scalar_on(value, device) for name, value in zip(names, (seed, noise_offset, index_base))}


def _check_out(name: str, out, like: torch.Tensor):
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"{name} must match the sample: shape {tuple(like.shape)}, {like.dtype}, {like.device}; "
                         f"got shape {tuple(out.shape)}, {out.dtype}, {out.device}")


def _write(out: Optional[torch.Tensor], value: torch.Tensor) -> torch.Tensor:
    if out is None:
        return value
    out.copy_(value)
    return out


def _settled(out: Optional[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """The kernel's result in ``out`` (copied there when the kernel wrote a contiguous stand-in)."""
    if out is not None and target is not out:
        out.copy_(target)
        return out
    return target


def _check_chain_index(t_index: torch.Tensor, op: str) -> None:
    """A multistep solver steps one chain index at a time (its buffers are the batch's)."""
    if t_index.ndim != 0:
        raise ValueError(f"t must be one chain index (a scalar) for {op}, got shape {tuple(t_index.shape)}")


def _kernel_target(out: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Where a kernel may write directly: ``out`` if contiguous, else a fresh buffer."""
    if out is not None and out.is_contiguous():
        return out
    return torch.empty_like(like, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------------
# ops
# ---------------------------------------------------------------------------------------------
def q_sample(
    x0: torch.Tensor,
    t,
    schedule: NoiseSchedule,
    noise: Optional[torch.Tensor] = None,
    *,
    seed=None,
    noise_offset=0,
    index_base=0,
    return_noise: bool = False,
    out: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
):
    """Sample q(x_t | x_0): ``sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps``.

    ``t`` is an int or an integer tensor of shape [] or [B] (indices into ``schedule``).
    ``eps`` is ``noise`` if given, else drawn in-kernel from ``seed``/``noise_offset`` (the
    Philox stream of :func:`fastddpm.reference.philox_randn`, batch position ``b`` drawing as
    sample ``index_base + b``); give one of ``noise`` and ``seed``, not both. ``x0`` needs a batch
    of at least one. Returns x_t, or (x_t, eps) with ``return_noise=True``.
    """
    _check_floating("x0", x0)
    schedule = _check_schedule(schedule)
    _check_batch("x0", x0)
    t = _check_t(t, x0.shape[0], schedule.num_timesteps, x0.device)
    _check_noise(noise, x0, seed, noise_offset, index_base)
    _check_out("out", out, x0)
    chosen = resolve_backend(backend, x0.device, x0.dtype)
    if chosen == "reference":
        x_t, eps = reference.q_sample(x0, t, schedule, noise, seed=seed, noise_offset=noise_offset,
                                      index_base=index_base)
        x_t = _write(out, x_t)
        return (x_t, eps) if return_noise else x_t
    kernels = _load_kernels(chosen == "interpret")
    target = _kernel_target(out, x0)
    noise_out = torch.empty_like(target) if return_noise and noise is None else None
    kernels.q_sample(
        x0.contiguous(), t, schedule.table(x0.device, torch.float32),
        noise=noise.contiguous() if noise is not None else None,
        **_noise_scalars(noise is None, seed, noise_offset, index_base, x0.device),
        out=target, noise_out=noise_out,
    )
    x_t = _settled(out, target)
    if return_noise:
        return x_t, noise.to(x0.dtype) if noise is not None else noise_out
    return x_t


# The update rules of the step ops below (fastddpm.step.STEP_RULES: what each is, as every path needs
# to know it). DDPM: the posterior, noise at every index but the last, a learned variance read from
# the model; DDIM: Song et al.'s update, noise scale eta; DPM-Solver++(2M) and UniPC: deterministic.
register_rule("ddpm", StepRule(always_noisy=True, noise_at_last_index=False, reads_model_variance=True))
register_rule("ddim", StepRule(takes_eta=True))
register_rule("dpmpp_2m", StepRule())
# DPM-Solver++(2M) SDE: noise at every step; none at the last, onto x_0 (its noise coefficient is 0)
register_rule("dpmpp_2m_sde", StepRule(always_noisy=True, noise_at_last_index=False))
register_rule("unipc", StepRule())  # UniPC: deterministic


def _check_step_args(spec, model_output, t, x_t, schedule):
    if not isinstance(spec, StepSpec):
        raise TypeError(f"spec must be a fastddpm.StepSpec, got {type(spec).__name__}")
    _check_floating("x_t", x_t)
    _check_floating("model_output", model_output)
    schedule = _check_schedule(schedule)
    _check_batch("x_t", x_t)
    _check_same_device("model_output", model_output, x_t, "x_t")
    schedule.check_prediction_type(spec.prediction_type)
    expected = spec.model_output_shape(x_t.shape)
    if tuple(model_output.shape) != expected:
        why = (f" (variance_type={spec.variance_type!r}: twice the channels of x_t, dim 1)"
               if spec.learned_variance else " (the shape of x_t)")
        raise ValueError(f"model_output must have shape {expected}{why}, got {tuple(model_output.shape)}")
    return schedule, _check_t(t, x_t.shape[0], schedule.num_timesteps, x_t.device)


def step(
    spec: StepSpec,
    model_output: torch.Tensor,
    t,
    x_t: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    noise: Optional[torch.Tensor] = None,
    seed=None,
    noise_offset=0,
    index_base=0,
    out: Optional[torch.Tensor] = None,
    pred_x0_out: Optional[torch.Tensor] = None,
    return_pred_x0: bool = True,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One reverse step of ``spec`` (a :class:`fastddpm.StepSpec`); returns (x_{t-1}, predicted
    x_0 or None). :func:`ddpm_step` and :func:`ddim_step` build the spec from keywords; the
    arguments are theirs."""
    schedule, t_index = _check_step_args(spec, model_output, t, x_t, schedule)
    _check_noise(noise, x_t, seed, noise_offset, index_base, needed=spec.adds_noise)
    _check_out("out", out, x_t)
    _check_out("pred_x0_out", pred_x0_out, x_t)
    chosen = resolve_backend(backend, x_t.device, x_t.dtype)
    noise = noise if spec.adds_noise else None
    if chosen == "reference":
        x_prev, x0 = reference.step(spec, model_output, t_index, x_t, schedule, noise=noise, seed=seed,
                                    noise_offset=noise_offset, index_base=index_base)
        x_prev = _write(out, x_prev)
        x0 = _write(pred_x0_out, x0)
        return (x_prev, x0) if return_pred_x0 or pred_x0_out is not None else (x_prev, None)
    kernels = _load_kernels(chosen == "interpret")
    target = _kernel_target(out, x_t)
    x0_target = None
    if return_pred_x0 or pred_x0_out is not None:
        x0_target = _kernel_target(pred_x0_out, x_t)
    kernels.reverse_step(
        spec, model_output.contiguous(), t_index, x_t.contiguous(), schedule.table(x_t.device, torch.float32),
        noise=noise.contiguous() if noise is not None else None,
        **_noise_scalars(noise is None and spec.adds_noise, seed, noise_offset, index_base, x_t.device),
        out=target, pred_x0_out=x0_target,
    )
    return _settled(out, target), (_settled(pred_x0_out, x0_target) if x0_target is not None else None)


def _check_state(name: str, value, x_t: torch.Tensor) -> None:
    """A multistep solver's buffer: x_t's shape, dtype and device."""
    _check_floating(name, value)
    if value.shape != x_t.shape or value.dtype != x_t.dtype or value.device != x_t.device:
        raise ValueError(f"{name} must match x_t (shape {tuple(x_t.shape)}, {x_t.dtype}, {x_t.device}), got "
                         f"shape {tuple(value.shape)}, {value.dtype}, {value.device}")


def _check_contiguous_state(**named) -> None:
    for name, value in named.items():
        if not value.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the kernel overwrites it in place)")


DPMPP_SAMPLERS = ("dpmpp_2m", "dpmpp_2m_sde")  # the rules dpmpp_2m_step implements


def dpmpp_2m_step(
    spec: StepSpec,
    model_output: torch.Tensor,
    t,
    x_t: torch.Tensor,
    previous_x0: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    older_x0: Optional[torch.Tensor] = None,
    solver: Optional[reference.DPMSolver] = None,
    noise: Optional[torch.Tensor] = None,
    seed=None,
    noise_offset=0,
    index_base=0,
    out: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """One DPM-Solver++ step from chain index ``t`` (:func:`fastddpm.reference.dpmpp_2m_step`,
    ``kernels/dpm_solver.py``): returns x_{t-1} and overwrites ``previous_x0`` (x_t's shape, dtype
    and device; D0 of the step before, ignored where the step is first order) with this step's
    predicted x_0. ``spec.sampler`` is ``"dpmpp_2m"`` (deterministic) or ``"dpmpp_2m_sde"`` (its SDE
    variant: ``noise``, or the Philox stream of ``seed`` / ``noise_offset`` / ``index_base`` as
    :func:`step` takes them); ``out`` may be ``x_t``. ``solver`` (a
    :class:`fastddpm.reference.DPMSolver`) gives each step's order (default: 2M's); a solver with
    third-order steps needs ``older_x0`` (D0_prev2, overwritten with D0_prev)."""
    if isinstance(spec, StepSpec) and spec.sampler not in DPMPP_SAMPLERS:
        raise ValueError(f"spec.sampler must be one of {DPMPP_SAMPLERS} for dpmpp_2m_step, got {spec.sampler!r}")
    if solver is None:
        solver = reference.DPMSolver(sde=isinstance(spec, StepSpec) and spec.adds_noise)
    elif not isinstance(solver, reference.DPMSolver):
        raise TypeError(f"solver must be a fastddpm.reference.DPMSolver, got {type(solver).__name__}")
    schedule, t_index = _check_step_args(spec, model_output, t, x_t, schedule)
    if solver.sde != spec.adds_noise:
        raise ValueError(f"solver.sde={solver.sde} must match spec.sampler={spec.sampler!r}")
    _check_state("previous_x0", previous_x0, x_t)
    if solver.max_order == 3 and older_x0 is None:
        raise ValueError("older_x0 (the x_0 two steps back) is needed by a solver with third-order steps")
    if older_x0 is not None:
        _check_state("older_x0", older_x0, x_t)
    _check_chain_index(t_index, "dpmpp_2m_step")
    _check_noise(noise, x_t, seed, noise_offset, index_base, needed=spec.adds_noise)
    _check_out("out", out, x_t)
    chosen = resolve_backend(backend, x_t.device, x_t.dtype)
    noise = noise if spec.adds_noise else None
    if chosen == "reference":
        x_prev, x0 = reference.dpmpp_2m_step(spec, model_output, t_index, x_t, previous_x0, schedule,
                                             older_x0=older_x0, solver=solver, noise=noise, seed=seed,
                                             noise_offset=noise_offset, index_base=index_base)
        if older_x0 is not None:
            older_x0.copy_(previous_x0)
        previous_x0.copy_(x0)
        return _write(out, x_prev)
    kernels = kernel_module("dpm_solver", interpret=chosen == "interpret")
    _check_contiguous_state(previous_x0=previous_x0, **({} if older_x0 is None else dict(older_x0=older_x0)))
    target = _kernel_target(out, x_t)
    kernels.dpmpp_2m(spec, model_output.contiguous(), t_index, x_t.contiguous(), previous_x0,
                     schedule.table(x_t.device, torch.float32), solver.table(schedule, x_t.device), older_x0=older_x0,
                     noise=noise.contiguous() if noise is not None else None,
                     **_noise_scalars(noise is None and spec.adds_noise, seed, noise_offset, index_base, x_t.device),
                     out=target)
    return _settled(out, target)


def unipc_step(
    spec: StepSpec,
    model_output: torch.Tensor,
    t,
    x_t: torch.Tensor,
    corrector: torch.Tensor,
    previous_x0: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    solver: Optional[reference.UniPC] = None,
    out: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """One UniPC step from chain index ``t`` (:func:`fastddpm.reference.unipc_step`,
    ``kernels/unipc.py``): the corrector of the step before, then the predictor; returns x_{t-1}
    and overwrites ``corrector`` (the corrector's part carried to the next step) and
    ``previous_x0`` (this step's predicted x_0). Both start as zeros, in x_t's shape, dtype and
    device. ``solver`` is a :class:`fastddpm.reference.UniPC` (default: bh2, order 2, a first-order
    last step, every corrector); ``spec.sampler`` must be ``"unipc"``; ``out`` may be ``x_t``."""
    if isinstance(spec, StepSpec) and spec.sampler != "unipc":
        raise ValueError(f"spec.sampler must be 'unipc' for unipc_step, got {spec.sampler!r}")
    if solver is None:
        solver = reference.UniPC()
    elif not isinstance(solver, reference.UniPC):
        raise TypeError(f"solver must be a fastddpm.reference.UniPC, got {type(solver).__name__}")
    schedule, t_index = _check_step_args(spec, model_output, t, x_t, schedule)
    _check_state("corrector", corrector, x_t)
    _check_state("previous_x0", previous_x0, x_t)
    _check_chain_index(t_index, "unipc_step")
    _check_out("out", out, x_t)
    chosen = resolve_backend(backend, x_t.device, x_t.dtype)
    if chosen == "reference":
        x_prev, carried, x0 = reference.unipc_step(spec, model_output, t_index, x_t, corrector, previous_x0,
                                                   schedule, solver)
        corrector.copy_(carried)
        previous_x0.copy_(x0)
        return _write(out, x_prev)
    kernels = kernel_module("unipc", interpret=chosen == "interpret")
    _check_contiguous_state(corrector=corrector, previous_x0=previous_x0)
    target = _kernel_target(out, x_t)
    kernels.unipc(spec, model_output.contiguous(), t_index, x_t.contiguous(), corrector, previous_x0,
                  schedule.table(x_t.device, torch.float32), solver.table(schedule, x_t.device), out=target)
    return _settled(out, target)


def ddpm_step(
    model_output: torch.Tensor,
    t,
    x_t: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
    clip_denoised: bool = True,
    clip_range: float = 1.0,
    noise: Optional[torch.Tensor] = None,
    seed=None,
    noise_offset=0,
    index_base=0,
    out: Optional[torch.Tensor] = None,
    pred_x0_out: Optional[torch.Tensor] = None,
    return_pred_x0: bool = True,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One DDPM reverse step x_t -> x_{t-1}; returns (x_{t-1}, predicted x_0 or None).

    ``t`` indexes ``schedule`` (a full or respaced schedule), int or integer tensor [] / [B].
    ``model_output`` is the model's epsilon / x_0 / v prediction, with the variance channels
    appended along dim 1 for ``learned`` / ``learned_range``. Noise is ``noise`` if given (e.g.
    drawn from a torch.Generator), else the in-kernel Philox stream of ``seed`` at
    ``noise_offset`` (one of the two, not both; batch position ``b`` drawing as sample
    ``index_base + b``, see :func:`fastddpm.reference.philox_randn`); none is added where
    t == 0. ``out=x_t`` updates in place. With
    ``return_pred_x0=False`` the kernel does not write x_0 (less memory traffic).
    """
    spec = StepSpec.build("ddpm", prediction_type=prediction_type, variance_type=variance_type,
                          clip_denoised=clip_denoised, clip_range=clip_range)
    return step(spec, model_output, t, x_t, schedule, noise=noise, seed=seed, noise_offset=noise_offset,
                index_base=index_base, out=out, pred_x0_out=pred_x0_out, return_pred_x0=return_pred_x0,
                backend=backend)


def ddim_step(
    model_output: torch.Tensor,
    t,
    x_t: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    clip_denoised: bool = True,
    clip_range: float = 1.0,
    noise: Optional[torch.Tensor] = None,
    seed=None,
    noise_offset=0,
    index_base=0,
    out: Optional[torch.Tensor] = None,
    pred_x0_out: Optional[torch.Tensor] = None,
    return_pred_x0: bool = True,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One DDIM step from index t to t-1 of a (usually respaced) schedule; returns
    (x_{t-1}, predicted x_0 or None). ``eta=0`` is deterministic; ``eta=1`` has DDPM's
    posterior variance. Other arguments as in :func:`ddpm_step`."""
    spec = StepSpec.build("ddim", prediction_type=prediction_type, clip_denoised=clip_denoised,
                          clip_range=clip_range, eta=eta)
    return step(spec, model_output, t, x_t, schedule, noise=noise, seed=seed, noise_offset=noise_offset,
                index_base=index_base, out=out, pred_x0_out=pred_x0_out, return_pred_x0=return_pred_x0,
                backend=backend)


def timestep_embedding(
    t: Union[torch.Tensor, int],
    dim: int,
    *,
    max_period: float = 10000.0,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Sinusoidal time embedding, float32 [len(t), dim]; see
    :func:`fastddpm.reference.timestep_embedding` for the formula and its options."""
    if isinstance(t, bool) or not isinstance(t, (int, torch.Tensor)):
        raise TypeError(f"t must be an int or a 1-D tensor of timesteps, got {type(t).__name__}")
    if not isinstance(t, torch.Tensor):
        t = torch.tensor([t])
    if t.ndim > 1:
        raise ValueError(f"t must be a scalar or 1-D tensor of timesteps, got shape {tuple(t.shape)}")
    if t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"t must hold real numbers, got dtype {t.dtype}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        raise ValueError(f"dim must be an int >= 2, got {dim!r}")
    if not max_period > 1:
        raise ValueError(f"max_period must be > 1, got {max_period}")
    if dim // 2 - downscale_freq_shift == 0:
        raise ValueError(f"dim // 2 - downscale_freq_shift must not be 0 (dim={dim}, shift={downscale_freq_shift})")
    t = t.reshape(-1)
    chosen = resolve_backend(backend, t.device, torch.float32)
    options = dict(max_period=max_period, flip_sin_to_cos=flip_sin_to_cos,
                   downscale_freq_shift=downscale_freq_shift, scale=scale)
    if chosen == "reference":
        return reference.timestep_embedding(t, dim, **options)
    return _load_kernels(chosen == "interpret").timestep_embedding(t.contiguous(), dim, **options)
