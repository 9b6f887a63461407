"""Checkpoints: one safetensors file per checkpoint, written atomically.

Tensors: ``model.*`` (weights), ``ema.*`` (EMA weights), ``optimizer.<param>.<name>`` (optimizer
state), ``rng.*`` (torch CPU / CUDA and numpy generator states), ``schedule.betas`` (the noise
schedule, float64). The safetensors header metadata holds JSON: ``config`` (model, diffusion,
data and training settings), ``step``, the optimizer's param groups and non-tensor state, the
Python ``random`` state and ``extra``. The file is written to a temporary file in the same
folder, synced and renamed over the target, so a crash never leaves a partial checkpoint.

A *pretrained* checkpoint (what ships in ``fastddpm/assets/``) holds only ``ema.*``,
``schedule.betas`` and the config.

:func:`load_pretrained` is the one loader of a model to sample from, used by every command: it
reads a fastddpm checkpoint or a diffusers folder (a ``UNet2DModel`` saved with
``save_pretrained``, or a saved ``DDPMPipeline``) into one :class:`Pretrained`.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from contextlib import ExitStack
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from .checks import check_int
from .outputs import NonFiniteError, atomic_write
from .schedule import NoiseSchedule

__all__ = [
    "CheckpointError", "Checkpoint", "Pretrained", "save_checkpoint", "load_checkpoint", "load_pretrained",
    "load_state_into", "capture_rng_state", "restore_rng_state", "default_pretrained_path", "checksum_files",
    "FORMAT",
]

FORMAT = "fastddpm-checkpoint"
FORMAT_VERSION = 1
DEFAULT_ASSET = "digits.safetensors"

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, corrupt, or does not fit the model."""


@dataclass
class Checkpoint:
    """Everything read from a checkpoint file (tensors on the requested device)."""

    path: Path
    config: Dict[str, Any]
    step: int
    model_state: Optional[Dict[str, torch.Tensor]] = None
    ema_state: Optional[Dict[str, torch.Tensor]] = None
    optimizer_state: Optional[Dict[str, Any]] = None
    rng_state: Optional[Dict[str, Any]] = None
    schedule: Optional[NoiseSchedule] = None
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Pretrained:
    """A model ready to sample from, with what a sampler needs to know about it.

    The same type for a fastddpm checkpoint (``kind="fastddpm"``) and a diffusers folder
    (``kind="diffusers"``). ``source`` is the checkpoint's path as a string (the shipped file's
    path for the default); ``notes`` are things a command should tell its user (e.g. that a
    diffusers folder had no scheduler config); ``checksum`` is ``"sha256:<hex>"`` of the files the
    model was read from (:func:`checksum_files`); ``config`` is the fastddpm checkpoint's config,
    or ``{"unet": ..., "scheduler": ...}`` for a diffusers folder."""

    model: nn.Module
    schedule: NoiseSchedule
    sample_shape: Tuple[int, ...]
    prediction_type: str = "epsilon"
    variance_type: str = "fixed_small"
    clip_denoised: bool = True
    clip_range: float = 1.0
    config: Dict[str, Any] = field(default_factory=dict)
    source: str = ""
    kind: str = "fastddpm"
    notes: List[str] = field(default_factory=list)
    step: int = 0
    path: Optional[Path] = None
    checksum: str = ""


# ---------------------------------------------------------------------------------------------
# RNG states
# ---------------------------------------------------------------------------------------------
def capture_rng_state() -> Dict[str, Any]:
    """The torch (CPU and every CUDA device), numpy and Python ``random`` generator states."""
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": numpy_state[0], "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
                  "pos": int(numpy_state[2]), "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])},
        "python": random.getstate(),
    }


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` captured (CUDA states only where devices exist)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        for index, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    if "python" in state:
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))


def _rng_to_file(state: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    tensors["rng.torch"] = state["torch"]
    for index, cuda_state in enumerate(state.get("cuda") or []):
        tensors[f"rng.cuda.{index}"] = cuda_state
    numpy_state = dict(state["numpy"])
    tensors["rng.numpy.keys"] = numpy_state.pop("keys")
    return {"numpy": numpy_state, "python": list(state["python"]), "num_cuda": len(state.get("cuda") or [])}


def _rng_from_file(meta: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    numpy_state = dict(meta["numpy"])
    numpy_state["keys"] = tensors["rng.numpy.keys"]
    return {
        "torch": tensors["rng.torch"],
        "cuda": [tensors[f"rng.cuda.{i}"] for i in range(meta.get("num_cuda", 0))],
        "numpy": numpy_state,
        "python": meta["python"],
    }


# ---------------------------------------------------------------------------------------------
# optimizer state <-> flat tensors + JSON
# ---------------------------------------------------------------------------------------------
def _optimizer_to_file(state_dict: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    plain_state = {}
    for param_id, param_state in state_dict["state"].items():
        kept = {}
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{param_id}.{name}"] = value
            else:
                kept[name] = value
        plain_state[str(param_id)] = kept
    return {"param_groups": state_dict["param_groups"], "state": plain_state}


def _optimizer_from_file(meta: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    state: Dict[int, Dict[str, Any]] = {int(k): dict(v) for k, v in meta["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, param_id, name = key.split(".", 2)
            state.setdefault(int(param_id), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------
def _state_of(obj, name: str) -> Dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        module = obj.module if hasattr(obj, "module") and isinstance(obj.module, nn.Module) else obj
        return module.state_dict()
    if isinstance(obj, dict):
        return obj
    raise TypeError(f"{name} must be an nn.Module or a state dict, got {type(obj).__name__}")


def _first_non_finite(state: Dict[str, torch.Tensor]) -> Optional[str]:
    """The first key of ``state`` whose floating-point tensor holds a NaN or infinity, else None."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return key
    return None


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint's JSON metadata")


def save_checkpoint(
    path: PathLike,
    *,
    config: Dict[str, Any],
    schedule: NoiseSchedule,
    model=None,
    ema=None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    step: int = 0,
    rng_state: Optional[Dict[str, Any]] = None,
    extra: Optional[Dict[str, Any]] = None,
    dtype: Optional[torch.dtype] = None,
) -> Path:
    """Write a checkpoint atomically and return its path.

    ``model`` / ``ema``: modules (a DDP or AveragedModel wrapper is unwrapped) or state dicts;
    ``optimizer``: its state is stored in full; ``rng_state``: from :func:`capture_rng_state`;
    ``config``: JSON-serialisable settings (``config["model"]`` should be ``model.config``);
    ``dtype``: cast floating weights (e.g. ``torch.float16`` for a smaller pretrained file).
    """
    from safetensors.torch import save_file

    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a fastddpm.NoiseSchedule, got {type(schedule).__name__}")
    step = check_int("step", step, 0)
    if model is None and ema is None:
        raise ValueError("give model and/or ema: a checkpoint without weights is useless")
    tensors: Dict[str, torch.Tensor] = {"schedule.betas": schedule.betas}
    for prefix, obj in (("model", model), ("ema", ema)):
        if obj is None:
            continue
        state = _state_of(obj, prefix)
        bad = _first_non_finite(state)
        if bad is not None:  # a checkpoint of NaN weights is worse than none: refuse to write it
            raise NonFiniteError(f"not writing {str(path)!r}: {prefix} weight {bad!r} holds NaN or infinite values")
        for key, value in state.items():
            value = value.detach()
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            tensors[f"{prefix}.{key}"] = value
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(config, default=_json_default, sort_keys=True),
        "step": str(step),
    }
    if optimizer is not None:
        metadata["optimizer"] = json.dumps(_optimizer_to_file(optimizer.state_dict(), tensors), default=_json_default)
    if rng_state is not None:
        metadata["rng"] = json.dumps(_rng_to_file(rng_state, tensors), default=_json_default)
    if extra:
        metadata["extra"] = json.dumps(extra, default=_json_default, sort_keys=True)
    # safetensors wants contiguous CPU tensors that share no storage.
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in tensors.items()}
    path = Path(path)
    atomic_write(path, lambda temporary: save_file(tensors, temporary, metadata=metadata))
    return path


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------
def _read(path: Path, device) -> Tuple[Dict[str, str], Dict[str, torch.Tensor]]:
    from safetensors import safe_open

    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path {str(path)!r} is a folder; give the .safetensors file")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as reader:
            metadata = reader.metadata() or {}
            tensors = {key: reader.get_tensor(key) for key in reader.keys()}
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"checkpoint {str(path)!r} is not a readable safetensors file "
                              f"(truncated or corrupt?): {error}") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is a safetensors file but not a fastddpm checkpoint "
                              "(its metadata has no format='fastddpm-checkpoint')")
    version = metadata.get("format_version", "")
    if version != str(FORMAT_VERSION):
        raise CheckpointError(f"checkpoint {str(path)!r} has format version {version!r}; "
                              f"this fastddpm reads version {FORMAT_VERSION}")
    return metadata, tensors


def _json_field(metadata: Dict[str, str], name: str, path: Path):
    try:
        return json.loads(metadata[name])
    except (KeyError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r} has a missing or damaged {name!r} entry: {error}") from None


def load_checkpoint(
    path: PathLike,
    *,
    model: Optional[nn.Module] = None,
    ema: Optional[nn.Module] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    device: Union[str, torch.device] = "cpu",
    restore_rng: bool = False,
) -> Checkpoint:
    """Read a checkpoint; load its weights into ``model`` / ``ema`` and its state into
    ``optimizer`` where given (raising :class:`CheckpointError` on any mismatch), and restore the
    RNG states with ``restore_rng=True``. Returns the :class:`Checkpoint`."""
    path = Path(path)
    metadata, tensors = _read(path, device)
    config = _json_field(metadata, "config", path)
    try:
        step = int(metadata.get("step", "0"))
    except ValueError:
        raise CheckpointError(f"checkpoint {str(path)!r} has a damaged step entry {metadata.get('step')!r}") from None
    if "schedule.betas" not in tensors:
        raise CheckpointError(f"checkpoint {str(path)!r} holds no schedule.betas")
    try:
        schedule = NoiseSchedule(tensors["schedule.betas"].cpu())
    except ValueError as error:
        raise CheckpointError(f"checkpoint {str(path)!r} holds invalid betas: {error}") from None

    def prefixed(prefix: str) -> Optional[Dict[str, torch.Tensor]]:
        found = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        return found or None

    checkpoint = Checkpoint(path=path, config=config, step=step, model_state=prefixed("model"),
                            ema_state=prefixed("ema"), schedule=schedule)
    if "optimizer" in metadata:
        checkpoint.optimizer_state = _optimizer_from_file(_json_field(metadata, "optimizer", path), tensors)
    if "rng" in metadata:
        checkpoint.rng_state = _rng_from_file(_json_field(metadata, "rng", path), tensors)
    if "extra" in metadata:
        checkpoint.extra = _json_field(metadata, "extra", path)

    if model is not None:
        if checkpoint.model_state is None:
            raise CheckpointError(f"checkpoint {str(path)!r} holds no model weights (only EMA weights?)")
        load_state_into(model, checkpoint.model_state, path, "model")
    if ema is not None:
        if checkpoint.ema_state is None:
            raise CheckpointError(f"checkpoint {str(path)!r} holds no EMA weights")
        load_state_into(ema, checkpoint.ema_state, path, "ema")
    if optimizer is not None:
        if checkpoint.optimizer_state is None:
            raise CheckpointError(f"checkpoint {str(path)!r} holds no optimizer state")
        try:
            optimizer.load_state_dict(checkpoint.optimizer_state)
        except (ValueError, KeyError, RuntimeError) as error:
            raise CheckpointError(f"optimizer state in {str(path)!r} does not fit this optimizer: {error}") from None
    if restore_rng:
        if checkpoint.rng_state is None:
            raise CheckpointError(f"checkpoint {str(path)!r} holds no RNG states")
        restore_rng_state(checkpoint.rng_state)
    return checkpoint


def load_state_into(module: nn.Module, state: Dict[str, torch.Tensor], path: PathLike = "<memory>",
                    what: str = "model") -> None:
    """``module.load_state_dict(state)`` with every mismatch reported in one clear error."""
    if hasattr(module, "module") and isinstance(module.module, nn.Module):  # DDP / AveragedModel
        module = module.module
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                   for k in sorted(set(expected) & set(state)) if state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        lines = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if items:
                shown = ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
                lines.append(f"{label}: {shown}")
        raise CheckpointError(f"{what} weights in {str(path)!r} do not fit {type(module).__name__} "
                              f"(was it built with the checkpoint's config?); " + "; ".join(lines))
    bad = _first_non_finite(state)
    if bad is not None:
        raise CheckpointError(f"{what} weights in {str(path)!r} are unusable: {bad!r} holds NaN or infinite values")
    with torch.no_grad():
        module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


# ---------------------------------------------------------------------------------------------
# pretrained
# ---------------------------------------------------------------------------------------------
def default_pretrained_path() -> Path:
    """Where the shipped digits checkpoint lives inside the installed package."""
    return Path(str(resources.files("fastddpm").joinpath("assets", DEFAULT_ASSET)))


def load_pretrained(path: Optional[PathLike] = None, *, device: Union[str, torch.device] = "cpu") -> Pretrained:
    """The one loader of a model to sample from: a model in eval mode on ``device`` with its
    schedule, sample shape, prediction / variance type and clipping (:class:`Pretrained`).

    ``path`` is a fastddpm checkpoint file (its EMA weights, or its model weights if it has no
    EMA), a folder holding a diffusers ``UNet2DModel`` (``config.json`` plus weights, optionally
    a ``scheduler_config.json`` beside it or in ``scheduler/``) or a saved ``DDPMPipeline``
    (``unet/`` and ``scheduler/``); ``None`` loads the digits model shipped in
    ``fastddpm/assets/``. Raises ``FileNotFoundError`` for a missing path and
    :class:`CheckpointError` for anything it cannot use.
    """
    from .devices import resolve_device

    device = resolve_device(device, argument="device")
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {str(path)!r}: no such file or directory")
        if path.is_dir():
            unet_dir = _diffusers_unet_dir(path)
            if unet_dir is None:
                raise CheckpointError(f"checkpoint {str(path)!r} is a folder without a diffusers model in it "
                                      "(config.json or unet/config.json); give a fastddpm .safetensors file or a "
                                      "diffusers UNet2DModel / DDPMPipeline folder")
            return _load_diffusers(path, unet_dir, device)
    with ExitStack() as stack:
        if path is None:
            path = stack.enter_context(resources.as_file(resources.files("fastddpm").joinpath("assets", DEFAULT_ASSET)))
        pretrained = _load_fastddpm(Path(path))
        pretrained.checksum = checksum_files([Path(path)], Path(path).parent)
    pretrained.model.to(device)
    return pretrained


def checksum_files(files, root: Path) -> str:
    """``"sha256:<hex>"`` over ``files`` in order: each one's path relative to ``root``, its size
    and its bytes. Identifies the checkpoint a run of samples came from."""
    digest = hashlib.sha256()
    for file in files:
        file = Path(file)
        name = file.relative_to(root).as_posix().encode()
        digest.update(len(name).to_bytes(8, "little") + name + file.stat().st_size.to_bytes(8, "little"))
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def _load_fastddpm(path: Path) -> Pretrained:
    from .models import model_from_config

    checkpoint = load_checkpoint(path, device="cpu")
    config = checkpoint.config
    for key in ("model", "diffusion", "sample_shape"):
        if key not in config:
            raise CheckpointError(f"checkpoint {str(path)!r} config has no {key!r} entry")
    try:
        model = model_from_config(config["model"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r} has an unusable model config: {error}") from None
    state = checkpoint.ema_state if checkpoint.ema_state is not None else checkpoint.model_state
    if state is None:
        raise CheckpointError(f"checkpoint {str(path)!r} holds no weights")
    load_state_into(model, state, path, "EMA" if checkpoint.ema_state is not None else "model")
    model.eval().requires_grad_(False)
    diffusion = config["diffusion"]
    sample_shape = tuple(int(s) for s in config["sample_shape"])
    # Clipping x_0 is a sampling choice; a checkpoint may record one in its diffusion config, else
    # images are clipped to [-1, 1] and 2-D point sets (which span a wider range) are not.
    return Pretrained(
        model=model,
        schedule=checkpoint.schedule,
        sample_shape=sample_shape,
        prediction_type=diffusion.get("prediction_type", "epsilon"),
        variance_type=diffusion.get("variance_type", "fixed_small"),
        clip_denoised=bool(diffusion.get("clip_denoised", len(sample_shape) > 1)),
        clip_range=float(diffusion.get("clip_range", 1.0)),
        config=config,
        source=str(path),
        kind="fastddpm",
        step=checkpoint.step,
        path=path,
    )


# ---------------------------------------------------------------------------------------------
# diffusers folders
# ---------------------------------------------------------------------------------------------
def _diffusers_unet_dir(path: Path) -> Optional[Path]:
    """The folder holding the UNet's config.json: ``path`` itself or a pipeline's ``unet/``."""
    for folder in (path, path / "unet"):
        if (folder / "config.json").is_file():
            return folder
    return None


def _scheduler_config_file(path: Path, unet_dir: Path) -> Optional[Path]:
    for candidate in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json",
                      unet_dir / "scheduler_config.json"):
        if candidate.is_file():
            return candidate
    return None


def _read_json(file: Path) -> Dict[str, Any]:
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{str(file)!r} is not a readable JSON config: {error}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{str(file)!r} is not a JSON object")
    return config


def _load_diffusers(path: Path, unet_dir: Path, device: torch.device) -> Pretrained:
    config = _read_json(unet_dir / "config.json")
    class_name = config.get("_class_name", "UNet2DModel")
    if class_name != "UNet2DModel":
        raise CheckpointError(f"{str(unet_dir)!r} holds a diffusers {class_name}; only UNet2DModel "
                              "(unconditional) is supported")
    sample_size = config.get("sample_size")
    if isinstance(sample_size, int) and not isinstance(sample_size, bool):
        spatial = (sample_size, sample_size)
    elif isinstance(sample_size, (list, tuple)) and len(sample_size) == 2:
        spatial = tuple(int(size) for size in sample_size)
    else:
        raise CheckpointError(f"{str(unet_dir / 'config.json')!r} needs sample_size (an int or [H, W]), "
                              f"got {sample_size!r}")
    scheduler_file = _scheduler_config_file(path, unet_dir)
    notes = []
    if scheduler_file is None:
        notes.append(f"no scheduler config in {path}: using the DDPM defaults (linear betas 1e-4..0.02, "
                     "T=1000, epsilon prediction, fixed_small variance, clipping)")
        scheduler_config: Dict[str, Any] = {}
    else:
        scheduler_config = _read_json(scheduler_file)
    # The scheduler config first: it is small, and an unsupported one should fail before the weights load.
    sampling = _sampling_from_diffusers_scheduler_config(
        scheduler_config, str(scheduler_file) if scheduler_file is not None else "the scheduler defaults")
    try:
        import diffusers
    except ImportError:
        raise CheckpointError("reading a diffusers-format model needs the diffusers package "
                              "(pip install diffusers)") from None
    try:
        # low_cpu_mem_usage=False: the default needs the accelerate package and warns without it.
        model = diffusers.UNet2DModel.from_pretrained(str(unet_dir), low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"could not load the UNet2DModel in {str(unet_dir)!r}: {error}") from None
    model = model.to(device).eval().requires_grad_(False)
    files = sorted(file for file in unet_dir.iterdir() if file.is_file() and not file.name.startswith("."))
    if scheduler_file is not None and scheduler_file not in files:
        files.append(scheduler_file)
    return Pretrained(
        model=model,
        sample_shape=(int(config.get("in_channels", 3)), *spatial),
        config={"unet": config, "scheduler": scheduler_config},
        source=str(path),
        kind="diffusers",
        notes=notes,
        path=path,
        checksum=checksum_files(files, path),
        **sampling,
    )


# diffusers' variance_type -> fastddpm's. fixed_large_log has fixed_large's standard deviation.
_DIFFUSERS_VARIANCE_TYPES = {
    "fixed_small": "fixed_small",
    "fixed_small_log": "fixed_small_log",
    "fixed_large": "fixed_large",
    "fixed_large_log": "fixed_large",
    "learned_range": "learned_range",
}


def _sampling_from_diffusers_scheduler_config(config: Dict[str, Any], where: str) -> Dict[str, Any]:
    """Schedule, prediction and variance type and clipping from a diffusers DDPM/DDIM scheduler
    config, as :class:`Pretrained` fields; refuses what fastddpm does not support.

    The one place that reads a diffusers scheduler config. The branch that makes
    ``fastddpm/schedulers/`` subclasses of diffusers' schedulers will provide the diffusers
    config -> NoiseSchedule conversion; this function should then call it instead.
    """
    from .schedule import make_betas
    from .step import PREDICTION_TYPES

    for unsupported in ("thresholding", "rescale_betas_zero_snr"):
        if config.get(unsupported):
            raise CheckpointError(f"{where}: {unsupported}=True is not supported by fastddpm")
    try:
        if config.get("trained_betas") is not None:
            schedule = NoiseSchedule(config["trained_betas"])
        else:
            betas = make_betas(config.get("beta_schedule", "linear"), int(config.get("num_train_timesteps", 1000)),
                               float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02)))
            schedule = NoiseSchedule(betas)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{where}: {error}") from None
    variance_type = config.get("variance_type") or "fixed_small"
    if variance_type not in _DIFFUSERS_VARIANCE_TYPES:
        raise CheckpointError(f"{where}: variance_type {variance_type!r} is not supported; use one of "
                              f"{tuple(_DIFFUSERS_VARIANCE_TYPES)}")
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise CheckpointError(f"{where}: prediction_type {prediction_type!r} is not supported")
    return dict(schedule=schedule, prediction_type=prediction_type,
                variance_type=_DIFFUSERS_VARIANCE_TYPES[variance_type],
                clip_denoised=bool(config.get("clip_sample", True)),
                clip_range=float(config.get("clip_sample_range", 1.0)))
