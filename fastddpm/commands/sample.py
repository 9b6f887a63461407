"""``fastddpm sample``: draw samples from a checkpoint, write a PNG grid and the raw ``.npz``.

The checkpoint is a fastddpm checkpoint (default: the shipped digits model) or a diffusers
model directory: a ``UNet2DModel`` saved with ``save_pretrained`` (``config.json`` plus weights,
optionally a ``scheduler_config.json`` beside it or in ``scheduler/``), or a saved
``DDPMPipeline`` (``unet/`` and ``scheduler/``).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

import torch

from ..samplers import SAMPLERS

# Batch b samples with seed (seed + b * golden-ratio constant) mod 2**63: batch 0 uses --seed
# itself, so one batch reproduces fastddpm.sample(..., seed=seed).
_BATCH_SEED_STRIDE = 0x9E3779B97F4A7C15
_SEED_LIMIT = 2**63
# diffusers' variance_type -> fastddpm's. fixed_large_log has fixed_large's standard deviation.
_DIFFUSERS_VARIANCE_TYPES = {
    "fixed_small": "fixed_small",
    "fixed_small_log": "fixed_small_log",
    "fixed_large": "fixed_large",
    "fixed_large_log": "fixed_large",
    "learned_range": "learned_range",
}


class CommandError(Exception):
    """A problem with the command's input, reported as one line and a non-zero exit."""


@dataclass
class LoadedModel:
    """Everything sampling needs from a checkpoint."""

    model: torch.nn.Module
    schedule: object  # fastddpm.NoiseSchedule
    sample_shape: Tuple[int, ...]
    prediction_type: str = "epsilon"
    variance_type: str = "fixed_small"
    clip_denoised: bool = True
    clip_range: float = 1.0
    source: str = ""
    notes: list = field(default_factory=list)


def configure_parser(parser) -> None:
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="fastddpm checkpoint or diffusers model directory (default: the shipped digits model)")
    parser.add_argument("--num-samples", type=int, default=64, metavar="N", help="samples to draw (default 64)")
    parser.add_argument("--steps", type=int, default=None,
                        help="reverse steps; fewer than the trained T respaces the chain evenly (default: T)")
    parser.add_argument("--sampler", choices=tuple(SAMPLERS), default="ddpm", help="default ddpm")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale, 0 = deterministic (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Philox noise (default 0)")
    parser.add_argument("--batch-size", type=int, default=None, metavar="B",
                        help="samples per batch (default: all in one batch)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--out", default="samples.png", metavar="PATH",
                        help="PNG grid to write; the raw samples go to the same name with .npz (default samples.png)")
    parser.add_argument("--cuda-graph", choices=("auto", "on", "off"), default="auto",
                        help="replay each step from a CUDA graph on GPU (default auto: fall back if capture fails)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args) -> int:
    try:
        return _run(args)
    except CommandError as error:
        print(f"fastddpm sample: error: {error}", file=sys.stderr)
        return 1


def _run(args) -> int:
    from fastddpm.imaging import save_image_grid, save_samples_npz
    from fastddpm.interrupts import Interrupted
    from fastddpm.outputs import OutputError, check_writable, save_or_rescue
    from fastddpm.sampling import sample

    _check_args(args)
    out_path = _image_path(args.out)
    npz_path = out_path.with_suffix(".npz")
    device = _resolve_device(args.device)
    # Before any work: both outputs must be writable (a temporary file is created and removed).
    check_writable(out_path, "--out")
    check_writable(npz_path, "--out")

    start = time.perf_counter()
    loaded = load_model(args.checkpoint, device)
    load_seconds = time.perf_counter() - start
    for note in loaded.notes:
        print(f"note: {note}", file=sys.stderr)
    total_steps = loaded.schedule.num_timesteps
    steps = args.steps if args.steps is not None else total_steps
    if steps > total_steps:
        raise CommandError(f"--steps must be at most the checkpoint's T={total_steps}, got {steps}")

    batch_size = args.batch_size or args.num_samples
    batches = []
    num_batches = -(-args.num_samples // batch_size)
    for batch, first in enumerate(range(0, args.num_samples, batch_size)):
        count = min(batch_size, args.num_samples - first)
        batch_seed = (args.seed + batch * _BATCH_SEED_STRIDE) % _SEED_LIMIT
        try:
            samples = sample(
                loaded.model, (count, *loaded.sample_shape), schedule=loaded.schedule, num_steps=steps,
                sampler=args.sampler, eta=args.eta, prediction_type=loaded.prediction_type,
                variance_type=loaded.variance_type, clip_denoised=loaded.clip_denoised,
                clip_range=loaded.clip_range, seed=batch_seed, device=device, progress=not args.no_progress,
                cuda_graph={"auto": "auto", "on": True, "off": False}[args.cuda_graph],
            )
        except ValueError as error:  # e.g. the model's output does not fit the sample shape
            raise CommandError(f"sampling failed: {error}") from error
        except Interrupted as stop:
            raise Interrupted(stop.signum, f"stopped in batch {batch + 1} of {num_batches}; nothing written") from None
        batches.append(samples.float().cpu())
    samples = torch.cat(batches)
    sample_seconds = time.perf_counter() - start - load_seconds

    schedule_timesteps = loaded.schedule.respace_evenly(steps).timesteps
    metadata = dict(
        seed=args.seed, sampler=args.sampler, num_steps=steps, eta=args.eta,
        batch_size=batch_size, checkpoint=loaded.source, prediction_type=loaded.prediction_type,
        variance_type=loaded.variance_type, num_train_timesteps=total_steps,
        timesteps=schedule_timesteps.numpy(), value_range=[-1.0, 1.0],
    )
    # The raw samples first; if they cannot be written, they are kept elsewhere and the error says where.
    save_or_rescue(lambda path: save_samples_npz(path, samples, **metadata), npz_path, argument="--out",
                   what="the samples")
    written = [f"{npz_path} (raw samples, float32 [N, C, H, W])"]
    try:
        save_image_grid(samples, out_path)
        written.insert(0, f"{out_path} (grid)")
    except ValueError as error:  # e.g. 2 channels: no image mode; the .npz holds the samples
        print(f"note: no image grid written: {error}", file=sys.stderr)
    except OSError as error:
        from fastddpm.outputs import describe_os_error

        raise OutputError(f"--out: could not write the grid {str(out_path)!r} ({describe_os_error(error)}); "
                          f"the samples are in {npz_path}") from error
    print(f"wrote {args.num_samples} samples of shape {tuple(loaded.sample_shape)} to {' and '.join(written)}")
    print(f"{args.sampler}, {steps} steps, seed {args.seed}, device {device}: loaded in {load_seconds:.2f} s, "
          f"sampled in {sample_seconds:.2f} s")
    return 0


# ---------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------
def _check_args(args) -> None:
    if args.num_samples < 1:
        raise CommandError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.steps is not None and args.steps < 1:
        raise CommandError(f"--steps must be >= 1, got {args.steps}")
    if args.batch_size is not None and args.batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.eta >= 0:
        raise CommandError(f"--eta must be >= 0, got {args.eta}")
    if args.sampler == "ddpm" and args.eta != 0:
        raise CommandError("--eta applies to --sampler ddim only")
    if not 0 <= args.seed < _SEED_LIMIT:
        raise CommandError(f"--seed must lie in [0, 2**63), got {args.seed}")


def _image_path(out: str) -> Path:
    from PIL import Image

    path = Path(out)
    if path.suffix == "":
        path = path.with_suffix(".png")
    if path.suffix.lower() not in Image.registered_extensions():
        raise CommandError(f"--out must name an image file such as samples.png, got {out!r}")
    if path.suffix.lower() == ".npz":
        raise CommandError("--out names the image; the .npz is written beside it")
    return path


def _resolve_device(name: str) -> torch.device:
    from fastddpm.devices import resolve_device

    try:
        return resolve_device(name, argument="--device")
    except ValueError as error:
        raise CommandError(str(error)) from None


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def load_model(checkpoint: Optional[str], device: torch.device) -> LoadedModel:
    """Load a fastddpm checkpoint (None: the shipped default) or a diffusers model directory."""
    if checkpoint is None:
        return _load_fastddpm(None, device)
    path = Path(checkpoint)
    if not path.exists():
        raise CommandError(f"--checkpoint {checkpoint}: no such file or directory")
    if path.is_dir() and _diffusers_unet_dir(path) is not None:
        return _load_diffusers(path, device)
    return _load_fastddpm(path, device)


def _load_fastddpm(path: Optional[Path], device: torch.device) -> LoadedModel:
    try:
        from fastddpm.checkpoint import load_pretrained
    except ImportError as error:
        raise CommandError(f"loading fastddpm checkpoints needs fastddpm.checkpoint, which failed to import: "
                           f"{error}") from error
    try:
        pretrained = load_pretrained(None if path is None else str(path), device=device)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        what = "the shipped default checkpoint" if path is None else f"--checkpoint {path}"
        raise CommandError(f"could not load {what}: {error}") from error
    # Clipping x_0 is a sampling choice; a checkpoint may record one in its diffusion config, else
    # images are clipped to [-1, 1] and 2-D point sets (which span a wider range) are not.
    diffusion = (getattr(pretrained, "config", None) or {}).get("diffusion") or {}
    return LoadedModel(
        model=pretrained.model, schedule=pretrained.schedule, sample_shape=tuple(pretrained.sample_shape),
        prediction_type=pretrained.prediction_type, variance_type=pretrained.variance_type,
        clip_denoised=bool(diffusion.get("clip_denoised", len(pretrained.sample_shape) > 1)), clip_range=float(diffusion.get("clip_range", 1.0)),
        source="default" if path is None else str(path),
    )


def _diffusers_unet_dir(path: Path) -> Optional[Path]:
    """The folder holding the UNet's config.json: ``path`` itself or a pipeline's ``unet/``."""
    for folder in (path, path / "unet"):
        if (folder / "config.json").is_file():
            return folder
    return None


def _load_diffusers(path: Path, device: torch.device) -> LoadedModel:
    unet_dir = _diffusers_unet_dir(path)
    try:
        config = json.loads((unet_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CommandError(f"{unet_dir / 'config.json'} is not a readable JSON config: {error}") from error
    class_name = config.get("_class_name", "UNet2DModel")
    if class_name != "UNet2DModel":
        raise CommandError(f"{unet_dir} holds a diffusers {class_name}; only UNet2DModel (unconditional) is supported")
    try:
        import diffusers
    except ImportError as error:
        raise CommandError("reading a diffusers-format model needs the diffusers package "
                           "(pip install diffusers)") from error
    try:
        # low_cpu_mem_usage=False: the default needs the accelerate package and warns without it.
        model = diffusers.UNet2DModel.from_pretrained(str(unet_dir), low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as error:
        raise CommandError(f"could not load the UNet2DModel in {unet_dir}: {error}") from error
    model = model.to(device).eval()

    sample_size = config.get("sample_size")
    if isinstance(sample_size, int):
        spatial = (sample_size, sample_size)
    elif isinstance(sample_size, (list, tuple)) and len(sample_size) == 2:
        spatial = tuple(int(size) for size in sample_size)
    else:
        raise CommandError(f"{unet_dir / 'config.json'} needs sample_size (an int or [H, W]), got {sample_size!r}")
    loaded = LoadedModel(model=model, schedule=None, sample_shape=(int(config.get("in_channels", 3)), *spatial),
                         source=str(path))

    scheduler_file = _scheduler_config_file(path, unet_dir)
    if scheduler_file is None:
        loaded.notes.append(f"no scheduler config in {path}: using the DDPM defaults (linear betas 1e-4..0.02, "
                            "T=1000, epsilon prediction, fixed_small variance, clipping)")
        scheduler_config = {}
    else:
        try:
            scheduler_config = json.loads(scheduler_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise CommandError(f"{scheduler_file} is not a readable JSON config: {error}") from error
    _apply_scheduler_config(loaded, scheduler_config, scheduler_file)
    return loaded


def _scheduler_config_file(path: Path, unet_dir: Path) -> Optional[Path]:
    for candidate in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json",
                      unet_dir / "scheduler_config.json"):
        if candidate.is_file():
            return candidate
    return None


def _apply_scheduler_config(loaded: LoadedModel, config: dict, source: Optional[Path]) -> None:
    """Schedule, prediction and variance type, clipping from a diffusers DDPM/DDIM scheduler config."""
    from fastddpm.schedule import NoiseSchedule, make_betas

    where = str(source) if source is not None else "the scheduler defaults"
    for unsupported in ("thresholding", "rescale_betas_zero_snr"):
        if config.get(unsupported):
            raise CommandError(f"{where}: {unsupported}=True is not supported by fastddpm")
    try:
        if config.get("trained_betas") is not None:
            schedule = NoiseSchedule(config["trained_betas"])
        else:
            betas = make_betas(config.get("beta_schedule", "linear"), int(config.get("num_train_timesteps", 1000)),
                               float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02)))
            schedule = NoiseSchedule(betas)
    except (ValueError, TypeError) as error:
        raise CommandError(f"{where}: {error}") from error
    variance_type = config.get("variance_type") or "fixed_small"
    if variance_type not in _DIFFUSERS_VARIANCE_TYPES:
        raise CommandError(f"{where}: variance_type {variance_type!r} is not supported; use one of "
                           f"{tuple(_DIFFUSERS_VARIANCE_TYPES)}")
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "sample", "v_prediction"):
        raise CommandError(f"{where}: prediction_type {prediction_type!r} is not supported")
    loaded.schedule = schedule
    loaded.prediction_type = prediction_type
    loaded.variance_type = _DIFFUSERS_VARIANCE_TYPES[variance_type]
    loaded.clip_denoised = bool(config.get("clip_sample", True))
    loaded.clip_range = float(config.get("clip_sample_range", 1.0))
