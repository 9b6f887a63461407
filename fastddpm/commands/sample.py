"""``fastddpm sample``: draw samples from a checkpoint, write a PNG grid and the raw ``.npz``.

The checkpoint is anything :func:`fastddpm.checkpoint.load_pretrained` reads: a fastddpm
checkpoint (default: the shipped digits model) or a diffusers model or pipeline folder.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from ..samplers import SAMPLERS

# Batch b samples with seed (seed + b * golden-ratio constant) mod 2**63: batch 0 uses --seed
# itself, so one batch reproduces fastddpm.sample(..., seed=seed).
_BATCH_SEED_STRIDE = 0x9E3779B97F4A7C15
_SEED_LIMIT = 2**63


class CommandError(Exception):
    """A problem with the command's input, reported as one line and a non-zero exit."""


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

    from .common import load_checkpoint_argument

    _check_args(args)
    out_path = _image_path(args.out)
    npz_path = out_path.with_suffix(".npz")
    device = _resolve_device(args.device)
    # Before any work: both outputs must be writable (a temporary file is created and removed).
    check_writable(out_path, "--out")
    check_writable(npz_path, "--out")

    start = time.perf_counter()
    try:
        loaded = load_checkpoint_argument(args.checkpoint, device)
    except ValueError as error:
        raise CommandError(str(error)) from None
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
