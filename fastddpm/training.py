"""Training: L_simple (or the hybrid / bound losses) with AdamW, EMA, AMP, checkpoints and DDP.

Reproducibility is by construction: everything random in step ``s`` (which images, their flips,
the timesteps, the noise, dropout) comes from generators seeded from ``(seed, s)``, and the
data order from a per-epoch permutation seeded from ``(seed, epoch)``. A run resumed from a
checkpoint at step ``s`` therefore draws exactly what the uninterrupted run draws, and with the
weights, EMA and optimizer state restored from the checkpoint it ends with the same weights.

Under ``torchrun`` (``WORLD_SIZE > 1``) every rank draws the *global* batch's randomness and
keeps its own slice, so data-parallel training matches one process on the same global batch.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from . import distributed, ops
from .checks import check_int, check_positive, check_seed
from .checkpoint import CheckpointError, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from .data import Dataset, load_dataset
from .devices import resolve_device
from .interrupts import DeferredInterrupts, Interrupted
from .losses import LOSS_TYPES, training_losses
from .models import PRESETS, create_model
from .outputs import NonFiniteError, check_writable, describe_os_error, save_or_rescue
from .step import LEARNED_VARIANCE_TYPES, PREDICTION_TYPES, VARIANCE_TYPES, check_choice
from .schedule import BETA_SCHEDULES, NoiseSchedule

__all__ = ["train", "TrainResult", "TRAINING_DEFAULTS"]

# Per-preset defaults for whatever train() is not told. The paper's CIFAR-10 run: lr 2e-4,
# batch 128, 800k steps, 5000 warm-up steps, EMA 0.9999. The small presets train for minutes,
# so they use a larger learning rate and a shorter EMA horizon. The digits recipe is the one the
# shipped checkpoint was trained with, chosen by the ablation in docs/evaluation.md.
TRAINING_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "ddpm_cifar10": dict(data=None, steps=800_000, batch_size=128, lr=2e-4, warmup_steps=5000, ema_decay=0.9999,
                         lr_schedule="constant", ema_start=0,
                         ckpt_every=10_000, sample_every=50_000, log_every=100),
    "digits": dict(data="digits", steps=16000, batch_size=64, lr=1e-3, warmup_steps=200, ema_decay=0.999,
                   lr_schedule="cosine", ema_start=0,
                   ckpt_every=500, sample_every=1000, log_every=100),
    "toy2d": dict(data="moons", steps=5000, batch_size=256, lr=1e-3, warmup_steps=100, ema_decay=0.995,
                  lr_schedule="constant", ema_start=0,
                  ckpt_every=1000, sample_every=0, log_every=100),
}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# After the linear warm-up: "constant" keeps lr; "cosine" decays it to 0 at the last step
# (half a cosine period over the steps after warm-up, as in Loshchilov & Hutter's SGDR without restarts).
LR_SCHEDULES = ("constant", "cosine")
CHECKPOINT_NAME = "checkpoint.safetensors"
EMA_NAME = "ema.safetensors"

# Independent random streams derived from (seed, step); the numbers only need to differ.
_STREAM_INIT, _STREAM_DATA_ORDER, _STREAM_BATCH, _STREAM_DROPOUT = 1, 2, 3, 4


def learning_rate(step: int, *, steps: int, lr: float, warmup_steps: int, schedule: str = "constant") -> float:
    """The learning rate of 0-based ``step`` of ``steps``: linear warm-up over ``warmup_steps``
    to ``lr``, then constant or (``schedule="cosine"``) a half cosine down to 0 at the last step."""
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    decay_steps = max(steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def derive_seed(seed: int, *words: int) -> int:
    """A 63-bit seed from ``seed`` and further integers (step, stream, ...), well mixed."""
    state = np.random.SeedSequence([seed, *words]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & (2**63 - 1)


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained module, an EMA copy, where it stopped, and the log."""

    model: nn.Module
    ema_model: nn.Module
    step: int
    config: Dict[str, Any]
    schedule: NoiseSchedule
    losses: List[Tuple[int, float]] = field(default_factory=list)
    out: Optional[Path] = None
    wall_seconds: float = 0.0
    start_step: int = 0  # where this call began (the resumed checkpoint's step, else 0)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
LOG_NAME = "log.jsonl"


class RunLog:
    """``out/log.jsonl``, one JSON record a line, appended whole: each record is one ``write`` of
    an ``O_APPEND`` descriptor (a process killed mid-run leaves whole lines). A torn last line left by
    an older writer or a crash of the machine is cut off, with a note, before the first append, so
    that a resumed run's first record does not join it."""

    def __init__(self, path):
        self.path = Path(path)
        self._cut_torn_tail()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def _cut_torn_tail(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            print(f"note: {self.path} ended in a torn line ({len(data) - keep} bytes, a run stopped mid-write); "
                  "cut it off", file=sys.stderr)
            os.truncate(self.path, keep)

    def append(self, record: Dict[str, Any]) -> None:
        os.write(self._fd, (json.dumps(record) + "\n").encode("utf-8"))

    def close(self) -> None:
        os.close(self._fd)


def read_log(path) -> List[Dict[str, Any]]:
    """The records of a run's ``log.jsonl``; a torn last line (a run stopped mid-write) is skipped
    with a warning, a bad line elsewhere is an error naming it."""
    import warnings

    lines = Path(path).read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            if number == len(lines):
                warnings.warn(f"{path}: skipped a torn last line ({line[:40]!r}...)", UserWarning, stacklevel=2)
                break
            raise ValueError(f"{path}: line {number} is not a JSON record: {line[:60]!r}") from None
    return records
class _DataOrder:
    """Position ``p`` of the endless stream of training indices: epoch ``p // N`` is a permutation
    seeded from (seed, epoch); only the epochs in use are kept."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        self._cache: Dict[int, torch.Tensor] = {}

    def _epoch(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            if len(self._cache) > 4:
                self._cache.pop(min(self._cache))
            generator = torch.Generator().manual_seed(derive_seed(self.seed, _STREAM_DATA_ORDER, epoch))
            self._cache[epoch] = torch.randperm(self.size, generator=generator)
        return self._cache[epoch]

    def indices(self, start: int, count: int) -> torch.Tensor:
        positions = torch.arange(start, start + count)
        epochs, offsets = positions // self.size, positions % self.size
        out = torch.empty(count, dtype=torch.int64)
        for epoch in epochs.unique().tolist():
            mask = epochs == epoch
            out[mask] = self._epoch(epoch)[offsets[mask]]
        return out


def _positive_int(name: str, value, allow_zero: bool = False) -> int:
    return check_int(name, value, 0 if allow_zero else 1)


def _positive_float(name: str, value, allow_zero: bool = False) -> float:
    return check_positive(name, value, allow_zero=allow_zero)


def _amp_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp32":
        return None
    if device.type != "cuda":
        raise ValueError(f"precision={precision!r} (autocast) is for CUDA; on {device.type} use 'fp32' or 'auto'")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def _save_sample_grid(ema_model: nn.Module, schedule: NoiseSchedule, config: Dict[str, Any], path: Path,
                      seed: int, num_samples: int, num_steps: int, device: torch.device) -> Optional[Path]:
    try:
        from .imaging import save_image_grid
        from .sampling import sample
    except ImportError:  # the sampler is optional for training
        return None
    shape = (num_samples, *config["sample_shape"])
    was_training = ema_model.training
    ema_model.eval()
    try:
        with torch.no_grad():
            images = sample(ema_model, shape, schedule=schedule, num_steps=min(num_steps, schedule.num_timesteps),
                            prediction_type=config["diffusion"]["prediction_type"],
                            variance_type=config["diffusion"]["variance_type"],
                            clip_denoised=config["diffusion"].get("clip_denoised", True), seed=seed, device=device,
                            progress=False)
    finally:
        ema_model.train(was_training)
    return save_image_grid(images, path)


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------
def _variance_and_loss(variance_type: Optional[str], loss_type: Optional[str], overrides: Dict[str, Any]):
    """The variance type and loss (defaults from each other), checked together; sets the model's
    ``learned_variance`` override to match."""
    if variance_type is None:
        variance_type = "learned_range" if overrides.get("learned_variance") else "fixed_small"
    check_choice("variance_type", variance_type, VARIANCE_TYPES)
    learned = variance_type in LEARNED_VARIANCE_TYPES
    if overrides.get("learned_variance", learned) != learned:
        raise ValueError(f"model_overrides learned_variance={overrides['learned_variance']} contradicts "
                         f"variance_type={variance_type!r}")
    overrides["learned_variance"] = learned
    if loss_type is None:
        loss_type = "hybrid" if learned else "simple"
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if loss_type == "simple" and learned:
        raise ValueError(f"variance_type={variance_type!r} needs loss_type 'hybrid' or 'vlb'")
    if loss_type == "hybrid" and not learned:
        raise ValueError("loss_type='hybrid' needs a learned variance (variance_type='learned_range')")
    return variance_type, loss_type


def _noise_schedule_of(schedule, num_timesteps):
    """``(NoiseSchedule, its name)`` of ``train``'s ``schedule`` argument."""
    if isinstance(schedule, NoiseSchedule):
        return schedule, "custom"
    if isinstance(schedule, str):
        if schedule not in BETA_SCHEDULES:
            raise ValueError(f"schedule must be one of {BETA_SCHEDULES} or a NoiseSchedule, got {schedule!r}")
        return NoiseSchedule.from_name(schedule, _positive_int("num_timesteps", num_timesteps)), schedule
    raise TypeError(f"schedule must be a schedule name or a NoiseSchedule, got {type(schedule).__name__}")


def _resume_source(resume, out: Optional[Path]):
    """``(checkpoint path or None, note or None)`` of ``train``'s ``resume`` argument."""
    if resume is False or resume is None:
        return None, None
    if resume is True:
        if out is None:
            raise ValueError("resume=True needs out (the run folder holding checkpoint.safetensors)")
        candidate = out / CHECKPOINT_NAME
        if candidate.exists():
            return candidate, None
        return None, f"note: no {CHECKPOINT_NAME} in {str(out)!r} to resume from; starting at step 0"
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"resume checkpoint {str(path)!r} does not exist")
    return path, None


def _training_data(data, preset: str, data_options, overrides: Dict[str, Any]) -> Dataset:
    """The dataset of ``train``'s ``data``, checked against the preset (and the model's size,
    channels or dimension set in ``overrides`` from it)."""
    architecture = PRESETS[preset]["architecture"]
    options = dict(data_options or {})
    is_array = not isinstance(data, Dataset) and Path(os.fspath(data)).suffix.lower() in (".npy", ".npz")
    if isinstance(data, Dataset):
        dataset = data
    else:
        # Folders of images are resized to the model's size; an array keeps its own size unless
        # told otherwise, and a mismatch with the preset is refused below rather than resized.
        sized = "image_size" in options or "image_size" in overrides
        if architecture == "unet" and "image_size" not in options and data != "digits" and (sized or not is_array):
            options["image_size"] = overrides.get("image_size", PRESETS[preset]["image_size"])
        if architecture == "unet" and "channels" not in options and data != "digits":
            options["channels"] = overrides.get("in_channels", PRESETS[preset]["in_channels"])
        dataset = load_dataset(data, **options)
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    if architecture == "unet":
        if not dataset.is_image:
            raise ValueError(f"preset {preset!r} is an image model but data {dataset.name!r} has sample shape "
                             f"{dataset.sample_shape}; use preset 'toy2d' for points")
        channels, height, width = dataset.sample_shape
        if height != width:
            raise ValueError(f"images must be square, got {height}x{width}")
        if is_array:
            _check_array_fits_preset(preset, dataset, options, overrides)
        overrides.setdefault("in_channels", channels)
        overrides.setdefault("image_size", height)
    else:
        if dataset.is_image or len(dataset.sample_shape) != 1:
            raise ValueError(f"preset {preset!r} is for vectors [N, D], got data of sample shape {dataset.sample_shape}")
        overrides.setdefault("dim", dataset.sample_shape[0])
    return dataset


def train(
    preset: str = "digits",
    data: Union[str, os.PathLike, Dataset, None] = None,
    *,
    steps: Optional[int] = None,
    batch_size: Optional[int] = None,
    lr: Optional[float] = None,
    warmup_steps: Optional[int] = None,
    weight_decay: float = 0.0,
    grad_clip: Optional[float] = 1.0,
    ema_decay: Optional[float] = None,
    lr_schedule: Optional[str] = None,
    ema_start: Optional[int] = None,
    seed: int = 0,
    schedule: Union[str, NoiseSchedule] = "linear",
    num_timesteps: int = 1000,
    prediction_type: str = "epsilon",
    variance_type: Optional[str] = None,
    loss_type: Optional[str] = None,
    vlb_weight: float = 0.001,
    model_overrides: Optional[Dict[str, Any]] = None,
    data_options: Optional[Dict[str, Any]] = None,
    out: Optional[Union[str, os.PathLike]] = None,
    ckpt_every: Optional[int] = None,
    sample_every: Optional[int] = None,
    sample_steps: int = 100,
    num_samples: int = 64,
    log_every: Optional[int] = None,
    resume: Union[bool, str, os.PathLike] = False,
    device: Optional[Union[str, torch.device]] = None,
    precision: str = "auto",
    progress: bool = True,
    callback: Optional[Callable[[int, torch.Tensor], None]] = None,
) -> TrainResult:
    """Train a model of ``preset`` (``digits``, ``ddpm_cifar10``, ``toy2d``) on ``data``.

    The loss is L_simple on the prediction target (``prediction_type`` epsilon / sample /
    v_prediction); with a learned variance (``variance_type`` ``learned_range`` or
    ``learned``, which also switches the model to 2C outputs) the default is the hybrid loss
    ``L_simple + vlb_weight * T * L_t``; ``loss_type="vlb"`` trains on the bound itself. Timesteps
    are uniform; noised inputs come from :func:`fastddpm.ops.q_sample` (the Triton kernel on
    CUDA). AdamW with linear warm-up to ``lr``, then ``lr_schedule`` (constant, or cosine decay to 0
    at the last step: :func:`learning_rate`), and gradient-norm clipping at ``grad_clip``; an EMA
    of the weights (``torch.optim.swa_utils.AveragedModel``) with ``ema_decay``, which copies the
    weights until step ``ema_start``; bf16 autocast on CUDA by default.

    With ``out`` set, writes ``out/checkpoint.safetensors`` (full state, atomically) every
    ``ckpt_every`` steps and at the end, ``out/ema.safetensors`` (EMA weights + config, what
    :func:`fastddpm.load_pretrained` reads) at the end, ``out/log.jsonl``, and a sample grid
    ``out/samples/step_XXXXXXX.png`` every ``sample_every`` steps (``sample_steps``-step DDPM).
    ``resume=True`` continues from ``out/checkpoint.safetensors`` if it exists; a path resumes
    from that file. ``steps`` is the total number of steps, counting those already done.
    ``callback(step, loss)`` runs after every step (``loss`` a detached tensor). Unset
    arguments take the preset's :data:`TRAINING_DEFAULTS`.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
    defaults = TRAINING_DEFAULTS[preset]
    data = defaults["data"] if data is None else data
    if data is None:
        raise ValueError(f"preset {preset!r} has no default data; pass data (a dataset name or path)")
    steps = _positive_int("steps", defaults["steps"] if steps is None else steps)
    batch_size = _positive_int("batch_size", defaults["batch_size"] if batch_size is None else batch_size)
    lr = _positive_float("lr", defaults["lr"] if lr is None else lr)
    warmup_steps = _positive_int("warmup_steps", defaults["warmup_steps"] if warmup_steps is None else warmup_steps,
                                 allow_zero=True)
    weight_decay = _positive_float("weight_decay", weight_decay, allow_zero=True)
    if grad_clip is not None:
        grad_clip = _positive_float("grad_clip", grad_clip)
    ema_decay = defaults["ema_decay"] if ema_decay is None else ema_decay
    if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)) or not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay!r}")
    lr_schedule = defaults["lr_schedule"] if lr_schedule is None else lr_schedule
    check_choice("lr_schedule", lr_schedule, LR_SCHEDULES)
    ema_start = _positive_int("ema_start", defaults["ema_start"] if ema_start is None else ema_start, allow_zero=True)
    check_seed(seed)
    ckpt_every = _positive_int("ckpt_every", defaults["ckpt_every"] if ckpt_every is None else ckpt_every, allow_zero=True)
    sample_every = _positive_int("sample_every", defaults["sample_every"] if sample_every is None else sample_every,
                                 allow_zero=True)
    log_every = _positive_int("log_every", defaults["log_every"] if log_every is None else log_every)
    sample_steps = _positive_int("sample_steps", sample_steps)
    num_samples = _positive_int("num_samples", num_samples)
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    overrides = dict(model_overrides or {})
    variance_type, loss_type = _variance_and_loss(variance_type, loss_type, overrides)
    vlb_weight = _positive_float("vlb_weight", vlb_weight, allow_zero=True)
    check_choice("precision", precision, PRECISIONS)
    noise_schedule, schedule_name = _noise_schedule_of(schedule, num_timesteps)
    noise_schedule.check_prediction_type(prediction_type)
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable")
    if device is not None:
        device = resolve_device(device, argument="device")
    out = Path(out) if out is not None else None
    resume_path, resume_note = _resume_source(resume, out)
    if out is not None:  # before any work: the run folder must take files
        check_writable(out, "out", folder=True)

    dataset = _training_data(data, preset, data_options, overrides)
    rank, world_size, device, created_group = distributed.setup(device)
    try:
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes {world_size}")
        amp_dtype = _amp_dtype(precision, device)
        # Training reseeds the global generator every step (dropout); the caller's state is restored.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return _Trainer(_Settings(
                preset=preset, dataset=dataset, overrides=overrides, noise_schedule=noise_schedule,
                schedule_name=schedule_name, steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                weight_decay=weight_decay, grad_clip=grad_clip, ema_decay=ema_decay, lr_schedule=lr_schedule,
                ema_start=ema_start, seed=seed, prediction_type=prediction_type, variance_type=variance_type,
                loss_type=loss_type, vlb_weight=vlb_weight, out=out, ckpt_every=ckpt_every,
                sample_every=sample_every, sample_steps=sample_steps, num_samples=num_samples, log_every=log_every,
                resume_path=resume_path, resume_note=resume_note, device=device, precision=precision,
                amp_dtype=amp_dtype, progress=progress, callback=callback, rank=rank, world_size=world_size)).run()
    finally:
        if created_group:
            import torch.distributed as dist

            dist.destroy_process_group()


@dataclass
class _Settings:
    """Everything a training run was asked for, checked (:func:`train` builds it)."""

    preset: str
    dataset: Dataset
    overrides: Dict[str, Any]
    noise_schedule: NoiseSchedule
    schedule_name: str
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    weight_decay: float
    grad_clip: Optional[float]
    ema_decay: float
    lr_schedule: str
    ema_start: int
    seed: int
    prediction_type: str
    variance_type: str
    loss_type: str
    vlb_weight: float
    out: Optional[Path]
    ckpt_every: int
    sample_every: int
    sample_steps: int
    num_samples: int
    log_every: int
    resume_path: Optional[Path]
    resume_note: Optional[str]
    device: torch.device
    precision: str
    amp_dtype: Optional[torch.dtype]
    progress: bool
    callback: Optional[Callable[[int, torch.Tensor], None]]
    rank: int
    world_size: int


def _run_config(s: _Settings, model: nn.Module) -> Dict[str, Any]:
    """The config a checkpoint carries: what rebuilds the model, the diffusion and the run."""
    dataset = s.dataset
    return {
        "preset": s.preset,
        "model": model.config,
        "diffusion": dict(schedule=s.schedule_name, num_timesteps=s.noise_schedule.num_timesteps,
                          prediction_type=s.prediction_type, variance_type=s.variance_type, loss_type=s.loss_type,
                          vlb_weight=s.vlb_weight,
                          # x_0 lives in [-1, 1] only for images; 2-D point sets span a wider range.
                          clip_denoised=dataset.is_image),
        "sample_shape": list(dataset.sample_shape),
        "data": dict(name=dataset.name, size=len(dataset), random_flip=dataset.random_flip, **dataset.info),
        "training": dict(seed=s.seed, steps=s.steps, batch_size=s.batch_size, lr=s.lr, warmup_steps=s.warmup_steps,
                         weight_decay=s.weight_decay, grad_clip=s.grad_clip, ema_decay=s.ema_decay,
                         ema_start=s.ema_start, lr_schedule=s.lr_schedule, precision=s.precision,
                         world_size=s.world_size),
    }


class _Trainer:
    """One training run: the state (model, EMA, optimizer, the log window, the counters) and its
    pieces, one method each: resuming, one optimisation step, the log window, the periodic outputs
    (checkpoints, sample grids), stopping on a signal, and the final saves."""

    def __init__(self, s: _Settings):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        from tqdm.auto import tqdm

        self.s = s
        torch.manual_seed(derive_seed(s.seed, _STREAM_INIT))
        raw_model = create_model(s.preset, **s.overrides)
        if tuple(s.dataset.sample_shape)[0] != getattr(raw_model, "in_channels", s.dataset.sample_shape[0]):
            raise ValueError(f"the model takes {raw_model.in_channels} channels but the data has "
                             f"{s.dataset.sample_shape[0]}")
        self.raw_model = raw_model.to(s.device).train()
        self.config = _run_config(s, raw_model)
        self.optimizer = torch.optim.AdamW(raw_model.parameters(), lr=s.lr, betas=(0.9, 0.999),
                                           weight_decay=s.weight_decay)
        self.ema = AveragedModel(raw_model, multi_avg_fn=get_ema_multi_avg_fn(s.ema_decay), use_buffers=True)
        self.scaler = torch.amp.GradScaler("cuda") if s.amp_dtype == torch.float16 else None
        self.is_main = s.rank == 0
        self.start_step, resumed_window = self._resume()
        self.model: nn.Module = raw_model
        if s.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(raw_model,
                                                 device_ids=[s.device.index] if s.device.type == "cuda" else None)
        self.log_file = None
        if s.out is not None and self.is_main:
            s.out.mkdir(parents=True, exist_ok=True)
            self.log_file = RunLog(s.out / LOG_NAME)
        # Under torchrun: a CPU (gloo) group for the small control messages (stop requests, whether
        # rank 0 wrote its checkpoint), so that they need no device sync whatever the main backend.
        self.control_group = None
        if s.world_size > 1 and torch.distributed.get_backend() != "gloo":
            self.control_group = torch.distributed.new_group(backend="gloo")
        self.interrupts = DeferredInterrupts()
        self.order = _DataOrder(len(s.dataset), s.seed)
        local = s.batch_size // s.world_size
        self.local_slice = slice(s.rank * local, (s.rank + 1) * local)
        self.sample_shape = tuple(s.dataset.sample_shape)
        dataset = s.dataset
        if dataset.data.numel() * dataset.data.element_size() < 2**30:
            dataset = Dataset(dataset.data.to(s.device), dataset.name, dataset.labels, dataset.random_flip,
                              dataset.info)
        self.dataset = dataset
        self.losses: List[Tuple[int, float]] = []
        self.running_loss = torch.zeros((), device=s.device)
        self.running_count = 0
        if resumed_window:  # the steps of the log window before the checkpoint (float32: exact round trip)
            self.running_loss.fill_(resumed_window["loss_sum"])
            self.running_count = int(resumed_window["steps"])
        self.last_grad_norm = torch.zeros((), device=s.device)
        self.started = time.perf_counter()
        self.bar = tqdm(total=s.steps, initial=self.start_step, disable=not (s.progress and self.is_main),
                        desc="train", dynamic_ncols=True)
        self.batch_generator = torch.Generator()
        self.noise_generator = torch.Generator(device=s.device)

    # ------------------------------------------------------------------ resume
    def _resume(self):
        """``(start step, the checkpoint's log window or None)``, the state loaded from the checkpoint."""
        s = self.s
        if s.resume_path is None:
            if s.resume_note is not None and self.is_main:
                print(s.resume_note, file=sys.stderr)
            return 0, None
        checkpoint = load_checkpoint(s.resume_path, model=self.raw_model, ema=self.ema.module,
                                     optimizer=self.optimizer, device=s.device)
        _check_resumable(checkpoint.config, self.config, s.resume_path)
        self.ema.n_averaged.fill_(int(checkpoint.extra.get("ema_n_averaged", checkpoint.step)))
        if self.scaler is not None and "grad_scaler" in checkpoint.extra:
            self.scaler.load_state_dict(checkpoint.extra["grad_scaler"])
        if checkpoint.rng_state is not None:
            restore_rng_state(checkpoint.rng_state)
        if self.is_main:
            print(f"resuming from {str(s.resume_path)!r} at step {checkpoint.step}", file=sys.stderr)
        return checkpoint.step, checkpoint.extra.get("log_window")

    # ------------------------------------------------------------------ checkpoints and signals
    def write_checkpoint(self, step: int) -> Optional[Path]:
        """The full state at ``step`` into out/checkpoint.safetensors (rank 0 writes, the others
        wait). If the write fails, a copy goes elsewhere and every rank raises the error naming it."""
        s = self.s
        if s.out is None:
            return None
        failure: Optional[BaseException] = None
        # The loss log's open window (steps since the last log line), so that a resumed run logs the
        # mean over the same steps as an uninterrupted one: the sum's mean over ranks, which every
        # rank takes back (the logged mean over ranks is then the same, up to float rounding).
        window_sum = self.running_loss.detach().clone()
        if s.world_size > 1:
            torch.distributed.all_reduce(window_sum)
            window_sum /= s.world_size
        if self.is_main:
            extra = {"ema_n_averaged": int(self.ema.n_averaged.item()),
                     "log_window": {"loss_sum": float(window_sum), "steps": self.running_count}}
            if self.scaler is not None:
                extra["grad_scaler"] = self.scaler.state_dict()
            try:
                save_or_rescue(lambda path: save_checkpoint(
                    path, config=self.config, schedule=s.noise_schedule, model=self.raw_model, ema=self.ema.module,
                    optimizer=self.optimizer, step=step, rng_state=capture_rng_state(), extra=extra),
                    s.out / CHECKPOINT_NAME, argument="out", what=f"the checkpoint of step {step}")
            except (OSError, NonFiniteError) as error:
                failure = error
        if s.world_size > 1:  # also the barrier: every rank waits for rank 0's write
            status = [failure]
            torch.distributed.broadcast_object_list(status, src=0, group=self.control_group)
            failure = status[0]
        if failure is not None:
            raise failure
        return s.out / CHECKPOINT_NAME

    def stop_signal(self) -> Optional[int]:
        """The signal that asked this run to stop (agreed by all ranks), else None."""
        if self.s.world_size == 1:
            return self.interrupts.signum
        flag = torch.tensor([self.interrupts.signum or 0], dtype=torch.int64)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.control_group)
        return int(flag) or None

    def stopped(self, signum: int, done: int) -> Interrupted:
        """Save what the finished steps earned and say where, for the one line the CLI prints."""
        s = self.s
        if s.out is None:
            return Interrupted(signum, f"stopped after step {done}; nothing saved (no out folder)")
        if done == self.start_step:
            kept = f"; {str(s.resume_path)!r} is unchanged" if s.resume_path is not None else ""
            return Interrupted(signum, f"stopped before step {done + 1} finished; nothing new to save{kept}")
        path = self.write_checkpoint(done)
        if not self.is_main:
            return Interrupted(signum, f"rank {s.rank} stopped at step {done} with rank 0, which saved the checkpoint")
        return Interrupted(signum, f"saved the checkpoint of step {done} to {path}; continue with --resume")

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> torch.Tensor:
        """One optimisation step; returns its loss (a device tensor). Everything random about it
        derives from (seed, step): see the module docstring."""
        s, device = self.s, self.s.device
        self.batch_generator.manual_seed(derive_seed(s.seed, _STREAM_BATCH, step))
        self.noise_generator.manual_seed(derive_seed(s.seed, _STREAM_BATCH, step))
        torch.manual_seed(derive_seed(s.seed, _STREAM_DROPOUT, step, s.rank))
        indices = self.order.indices(step * s.batch_size, s.batch_size)
        x0 = self.dataset.batch(indices, self.batch_generator)[self.local_slice]
        t = torch.randint(0, s.noise_schedule.num_timesteps, (s.batch_size,), generator=self.noise_generator,
                          device=device)[self.local_slice]
        noise = torch.randn((s.batch_size, *self.sample_shape), generator=self.noise_generator,
                            device=device)[self.local_slice]
        x0 = x0.to(device, non_blocking=True)
        x_t = ops.q_sample(x0, t, s.noise_schedule, noise=noise)

        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(step, steps=s.steps, lr=s.lr, warmup_steps=s.warmup_steps,
                                        schedule=s.lr_schedule)
        with torch.autocast(device.type, dtype=s.amp_dtype or torch.float32, enabled=s.amp_dtype is not None):
            model_output = self.model(x_t, s.noise_schedule.timesteps.to(device)[t])
        per_sample, _ = training_losses(model_output.float(), x0, x_t, noise, t, s.noise_schedule,
                                        loss_type=s.loss_type, prediction_type=s.prediction_type,
                                        variance_type=s.variance_type, vlb_weight=s.vlb_weight)
        loss = per_sample.mean()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if s.grad_clip is not None:
            self.last_grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), s.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if step < s.ema_start:  # until ema_start the average is the weights themselves
            self.ema.module.load_state_dict(self.raw_model.state_dict())
        else:
            self.ema.update_parameters(self.raw_model)
        return loss

    # ------------------------------------------------------------------ the log window
    def log(self, done: int) -> None:
        """Close the log window at step ``done``: the mean loss over its steps (and ranks), refused
        if NaN, into the losses, the progress bar and log.jsonl."""
        s = self.s
        mean_loss = (self.running_loss / self.running_count).item()
        if s.world_size > 1:
            reduced = torch.tensor([mean_loss], device=s.device)
            torch.distributed.all_reduce(reduced)
            mean_loss = reduced.item() / s.world_size
        if not math.isfinite(mean_loss) and self.scaler is None:
            # Without a grad scaler to skip it, a NaN loss has made the weights NaN too.
            kept = f"; the last checkpoint in {str(s.out)!r} is kept" if s.out is not None else ""
            first = done - self.running_count + 1
            when = f"at step {done}" if first == done else f"between steps {first} and {done}"
            raise NonFiniteError(f"the training loss became NaN or infinite {when}; stopped without saving{kept}")
        self.losses.append((done, mean_loss))
        self.running_loss.zero_()
        self.running_count = 0
        if self.is_main:
            record = dict(step=done, loss=mean_loss, lr=self.optimizer.param_groups[0]["lr"],
                          grad_norm=float(self.last_grad_norm), seconds=round(time.perf_counter() - self.started, 2))
            self.bar.set_postfix(loss=f"{mean_loss:.4f}")
            if self.log_file is not None:
                self.log_file.append(record)

    # ------------------------------------------------------------------ periodic outputs
    def periodic_outputs(self, done: int, loss: torch.Tensor) -> None:
        """After step ``done``: a checkpoint every ``ckpt_every`` steps, a sample grid every
        ``sample_every``, the caller's callback."""
        from tqdm.auto import tqdm

        s = self.s
        if s.ckpt_every and done % s.ckpt_every == 0 and done != s.steps:
            self.write_checkpoint(done)
        if s.out is not None and self.is_main and s.sample_every and self.dataset.is_image \
                and done % s.sample_every == 0:
            grid = s.out / "samples" / f"step_{done:07d}.png"
            try:
                _save_sample_grid(self.ema.module, s.noise_schedule, self.config, grid, s.seed, s.num_samples,
                                  s.sample_steps, s.device)
            except OSError as error:  # a preview: losing it must not cost the run
                tqdm.write(f"note: could not write the sample grid {str(grid)!r} ({describe_os_error(error)})",
                           file=sys.stderr)
        if s.callback is not None:
            s.callback(done, loss.detach())

    # ------------------------------------------------------------------ the run
    def finish(self) -> int:
        """The final checkpoint and EMA weights; returns the final step."""
        s = self.s
        final_step = max(s.steps, self.start_step)
        if s.out is not None:
            if self.start_step < s.steps or not (s.out / CHECKPOINT_NAME).exists():
                self.write_checkpoint(final_step)
            if self.is_main:
                save_or_rescue(lambda path: save_checkpoint(path, config=self.config, schedule=s.noise_schedule,
                                                            ema=self.ema.module, step=final_step),
                               s.out / EMA_NAME, argument="out", what=f"the EMA weights of step {final_step}")
        if self.interrupts.signum is not None:  # the signal came during the final saves, which finished
            raise Interrupted(self.interrupts.signum, f"the run had finished; its checkpoint of step {final_step} is "
                                                      f"in {s.out}" if s.out is not None else "the run had finished")
        return final_step

    def run(self) -> TrainResult:
        s = self.s
        try:
            self.interrupts.__enter__()  # from here, SIGINT / SIGTERM wait for the end of a step
            for step in range(self.start_step, s.steps):
                loss = self.train_step(step)
                done = step + 1
                self.running_loss += loss.detach()
                self.running_count += 1
                self.bar.update(1)
                if done % s.log_every == 0 or done == s.steps:
                    self.log(done)
                self.periodic_outputs(done, loss)
                signum = self.stop_signal()
                if signum is not None:
                    raise self.stopped(signum, done)
            final_step = self.finish()
        finally:
            self.interrupts.__exit__(None, None, None)
            self.bar.close()
            if self.log_file is not None:
                self.log_file.close()
        ema_model = self.ema.module
        ema_model.eval()
        return TrainResult(model=self.raw_model, ema_model=ema_model, step=final_step, config=self.config,
                           schedule=s.noise_schedule, losses=self.losses, out=s.out,
                           wall_seconds=time.perf_counter() - self.started, start_step=self.start_step)


def _check_array_fits_preset(preset: str, dataset: Dataset, options: Dict[str, Any],
                             overrides: Dict[str, Any]) -> None:
    """Images from an array train the preset's model only at the preset's size and channels,
    unless the caller chose a size or a channel count: never a silent resize or a silent
    change of the model."""
    channels, size = dataset.sample_shape[0], dataset.sample_shape[-1]
    want_size = PRESETS[preset]["image_size"]
    if size != want_size and "image_size" not in options and "image_size" not in overrides:
        raise ValueError(f"data {dataset.name!r} holds {size}x{size} images but preset {preset!r} is for "
                         f"{want_size}x{want_size}; resize them with image_size={want_size} (--image-size "
                         f"{want_size}) or build the model for them with model_overrides image_size={size} "
                         f"(--model-arg image_size={size})")
    want_channels = PRESETS[preset]["in_channels"]
    if channels != want_channels and "in_channels" not in overrides:
        raise ValueError(f"data {dataset.name!r} holds {channels}-channel images but preset {preset!r} takes "
                         f"{want_channels}; for a {channels}-channel model pass model_overrides in_channels={channels} "
                         f"(--model-arg in_channels={channels})")


def _check_resumable(saved: Dict[str, Any], current: Dict[str, Any], path: Path) -> None:
    """A run resumes only with the settings that decide its trajectory (the step count may grow)."""
    checks = [("model", saved.get("model"), current["model"]),
              ("diffusion", saved.get("diffusion"), current["diffusion"]),
              ("sample_shape", saved.get("sample_shape"), current["sample_shape"]),
              ("data", saved.get("data"), current["data"])]
    saved_training = dict(saved.get("training") or {})
    # Checkpoints from before these settings existed trained with their present defaults.
    saved_training.setdefault("lr_schedule", "constant")
    saved_training.setdefault("ema_start", 0)
    keys = ["seed", "batch_size", "lr", "warmup_steps", "weight_decay", "grad_clip", "ema_decay", "lr_schedule",
            "ema_start"]
    if current["training"]["lr_schedule"] != "constant":
        keys.append("steps")  # a decaying learning rate is a function of the total step count
    for key in keys:
        checks.append((f"training.{key}", saved_training.get(key), current["training"][key]))
    for name, old, new in checks:
        if json.loads(json.dumps(old)) != json.loads(json.dumps(new)):
            why = (f" (the {current['training']['lr_schedule']} learning rate decays over the total step count, so "
                   f"the run keeps its steps)" if name == "training.steps" else "")
            raise CheckpointError(f"cannot resume from {str(path)!r}: its {name} is {old!r} but this run has "
                                  f"{new!r}{why}")
