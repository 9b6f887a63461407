"""``fastddpm sample``: draw samples from a checkpoint.

``--out`` decides what is written:

- an image file (``samples.png``, any suffix Pillow writes): a grid there and every sample in the
  same name with ``.npz``;
- a folder (a path ending in ``/``, an existing folder, or a name without a suffix): the samples in
  resumable chunks with a manifest (:mod:`fastddpm.shards`). Run the same command again to
  finish an interrupted run; under ``torchrun`` every process draws its share of the chunks.

Sample ``k`` (its global index, from 0) draws its noise from the seed's sample-indexed stream at
index ``k`` (``fastddpm.sample(..., seed=, first_index=)``), so the samples do not depend on the
batch size, the batch a sample falls in or the number of processes, up to the model's own
rounding for other batch sizes.

The checkpoint is anything :func:`fastddpm.checkpoint.load_pretrained` reads: a fastddpm
checkpoint (default: the shipped digits model) or a diffusers model or pipeline folder.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from ..acceleration import CPU_DEFAULT_BATCH_SIZE
from ..checks import SAMPLE_INDEX_LIMIT, check_seed
from ..samplers import DEFAULT_SAMPLER, SAMPLERS, default_steps, takes_eta_samplers
from ..samplers import describe as describe_samplers
from .common import (CommandError, add_device_argument, add_model_arguments, model_dtype_name, model_options_of,
                     report_bad_input)

# Sample indices are 32-bit in the noise stream (the Philox counter's sample word).
# Batch size when none is given (image or folder --out): the samples do not depend on it.
DEFAULT_BATCH_SIZE = 64
# An image --out holds every sample in host memory at once: the batches, their concatenation and
# the .npz writer's copy.
_IMAGE_OUT_COPIES = 3
# How often rank 0 looks at the folder to count the other processes' chunks while it waits.
_POLL_SECONDS = 0.25


def configure_parser(parser) -> None:
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="fastddpm checkpoint or diffusers model / pipeline folder (default: the shipped digits "
                             "model)")
    parser.add_argument("--num-samples", type=int, default=64, metavar="N", help="samples to draw (default 64)")
    parser.add_argument("--steps", type=int, default=None,
                        help="reverse steps; fewer than the trained T respace the chain (default: the sampler's, see "
                             "--sampler)")
    parser.add_argument("--sampler", choices=tuple(SAMPLERS), default=DEFAULT_SAMPLER,
                        help=f"{describe_samplers()}; default {DEFAULT_SAMPLER}, as fastddpm.sample")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale, 0 = deterministic (default 0)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the Philox noise; sample k draws the noise of index k (default 0)")
    parser.add_argument("--batch-size", type=_batch_size_argument, default=None, metavar="B|auto",
                        help="samples per model call; does not change the samples (beyond the model's rounding); "
                             "auto: the largest batch whose trial forward passes fit in the GPU's free memory "
                             f"({CPU_DEFAULT_BATCH_SIZE} on a CPU) (default {DEFAULT_BATCH_SIZE})")
    add_device_argument(parser, "under torchrun cuda means cuda:LOCAL_RANK")
    parser.add_argument("--out", default="samples.png", metavar="PATH",
                        help="an image file (the grid; the samples go to the same name with .npz), or a folder (a "
                             "path ending in /, an existing folder or a name without a suffix) for resumable "
                             "chunks and a manifest, the layout torchrun writes (default samples.png)")
    parser.add_argument("--overwrite", action="store_true",
                        help="an image --out: replace the grid and .npz of an earlier run (without it, existing "
                             "outputs are refused)")
    parser.add_argument("--chunk-size", type=int, default=None, metavar="C",
                        help="samples per chunk file of a folder --out (default: the batch size; a folder keeps "
                             "the chunk size it was started with)")
    parser.add_argument("--redo-corrupt", action="store_true",
                        help="a folder --out: draw corrupt chunks again (they are kept as NAME.corrupt); without "
                             "it they are reported and the run stops")
    parser.add_argument("--cuda-graph", choices=("auto", "on", "off"), default="auto",
                        help="replay each step from a CUDA graph on GPU (default auto: fall back if capture fails)")
    add_model_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _batch_size_argument(text: str):
    """``--batch-size``: a positive int, or ``auto``."""
    import argparse

    if text == "auto":
        return text
    try:
        return int(text)  # a number below 1 is refused with the other checks (_check_args)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive int or auto, got {text!r}") from None


def run(args) -> int:
    try:
        return _run(args)
    except CommandError as error:
        return report_bad_input("sample", error)


def _run(args) -> int:
    _check_args(args)
    folder = _folder_of(args.out)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if folder is None:
        if world_size > 1:
            raise CommandError(f"--out must be a folder under torchrun (WORLD_SIZE={world_size}): every process "
                               f"writes its chunks there, got the image {args.out!r}")
        return _sample_to_image(args, _image_path(args.out))
    return _sample_to_folder(args, folder)


# ---------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------
def _check_args(args) -> None:
    if not 1 <= args.num_samples <= SAMPLE_INDEX_LIMIT:
        raise CommandError(f"--num-samples must lie in [1, 2**32], got {args.num_samples}")
    if args.steps is not None and args.steps < 1:
        raise CommandError(f"--steps must be >= 1, got {args.steps}")
    if isinstance(args.batch_size, int) and args.batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.chunk_size is not None and args.chunk_size < 1:
        raise CommandError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    if not args.eta >= 0:
        raise CommandError(f"--eta must be >= 0, got {args.eta}")
    if args.eta != 0 and not SAMPLERS[args.sampler].rule.takes_eta:
        raise CommandError(f"--eta applies to --sampler {' or '.join(takes_eta_samplers())} only")
    try:
        check_seed(args.seed, "--seed")
    except ValueError as error:
        raise CommandError(str(error)) from None
    args.model_options = model_options_of(args)


def _folder_of(out: str) -> Optional[Path]:
    """The folder an ``--out`` names (a trailing separator, an existing folder, no suffix), else None."""
    path = Path(out)
    if out.endswith(("/", os.sep)) or path.is_dir() or path.suffix == "":
        return path
    return None


def _image_path(out: str) -> Path:
    from PIL import Image

    path = Path(out)
    if path.suffix.lower() == ".npz":
        raise CommandError("--out names the image; the .npz is written beside it")
    if path.suffix.lower() not in Image.registered_extensions():
        raise CommandError(f"--out must name an image file such as samples.png, or a folder (end it with /), "
                           f"got {out!r}")
    return path


def _resolve_device(name: str) -> torch.device:
    from fastddpm.devices import resolve_device

    try:
        return resolve_device(name, argument="--device")
    except ValueError as error:
        raise CommandError(str(error)) from None


def _load(args, device: torch.device, show_notes: bool = True):
    """The checkpoint and the number of steps, checked against its T."""
    from .common import load_checkpoint_argument

    try:
        loaded = load_checkpoint_argument(args.checkpoint, device)
    except ValueError as error:
        raise CommandError(str(error)) from None
    if show_notes:
        for note in loaded.notes:
            print(f"note: {note}", file=sys.stderr)
    total_steps = loaded.schedule.num_timesteps
    steps = args.steps if args.steps is not None else default_steps(args.sampler, total_steps)
    if steps > total_steps:
        raise CommandError(f"--steps must be at most the checkpoint's T={total_steps}, got {steps}")
    return loaded, steps


def available_memory_bytes() -> Optional[int]:
    """Host memory this process can still take: the kernel's MemAvailable, lowered to the address
    space limit (ulimit -v) where one is set; None where neither is known."""
    import resource

    limits = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(soft)
    return min(limits) if limits else None


def _check_fits_in_memory(num_samples: int, sample_shape) -> None:
    """Before sampling: an image ``--out`` keeps every sample in memory; refuse a count that cannot
    fit, with what to do instead."""
    import math

    needed = _IMAGE_OUT_COPIES * num_samples * math.prod(sample_shape) * 4
    available = available_memory_bytes()
    if available is not None and needed > available:
        raise CommandError(f"--num-samples {num_samples}: an image --out holds every sample in memory, about "
                           f"{needed / 2**30:.1f} GiB, and {available / 2**30:.1f} GiB is available; draw them into "
                           "a folder instead (--out DIR/ --batch-size 256: resumable chunks, then fastddpm merge DIR)")


def _batch_size(args, loaded, device: torch.device, default: int) -> int:
    """``--batch-size`` as a number: given, ``auto`` (measured, :func:`fastddpm.acceleration.auto_batch_size`;
    at most the samples to draw), or ``default``."""
    if args.batch_size is None:
        return default
    if args.batch_size != "auto":
        return args.batch_size
    from fastddpm.acceleration import auto_batch_size

    try:
        batch, account = auto_batch_size(loaded.model, loaded.sample_shape, device=device,
                                         options=args.model_options, limit=args.num_samples)
    except RuntimeError as error:
        raise CommandError(f"--batch-size auto: {error}") from None
    print(f"--batch-size auto: {account}", file=sys.stderr)
    return batch


def _draw(loaded, args, steps: int, device: torch.device, first: int, count: int, batch_size: int,
          progress: bool, after_batch: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """Samples ``[first, first + count)`` of the run, in batches of ``batch_size``: batch position
    ``b`` of a batch starting at sample ``i`` draws as sample ``i + b`` of the seed's stream."""
    from fastddpm.sampling import sample

    parts = []
    for start in range(first, first + count, batch_size):
        size = min(batch_size, first + count - start)
        try:
            samples = sample(
                loaded.model, (size, *loaded.sample_shape), schedule=loaded.schedule, num_steps=steps,
                sampler=args.sampler, eta=args.eta, prediction_type=loaded.prediction_type,
                variance_type=loaded.variance_type, clip_denoised=loaded.clip_denoised,
                clip_range=loaded.clip_range, seed=args.seed, first_index=start, device=device, progress=progress,
                cuda_graph={"auto": "auto", "on": True, "off": False}[args.cuda_graph],
                **args.model_options.sample_kwargs(),
            )
        except ValueError as error:  # e.g. the model's output does not fit the sample shape
            raise CommandError(f"sampling failed: {error}") from error
        parts.append(samples.float().cpu())
        if after_batch is not None:
            after_batch(start + size - first)
    return torch.cat(parts)


# ---------------------------------------------------------------------------------------------
# --out IMAGE: a grid and one .npz
# ---------------------------------------------------------------------------------------------
def _sample_to_image(args, out_path: Path) -> int:
    from fastddpm.imaging import save_image_grid, save_samples_npz
    from fastddpm.interrupts import Interrupted
    from fastddpm.outputs import OutputError, check_writable, describe_os_error, refuse_existing, save_or_rescue
    from fastddpm.shards import npz_metadata, run_settings

    npz_path = out_path.with_suffix(".npz")
    device = _resolve_device(args.device)
    # Before any work: both outputs must be new (or --overwrite) and writable (a temporary file is
    # created and removed).
    refuse_existing([out_path, npz_path], "--out", overwrite=args.overwrite)
    check_writable(out_path, "--out")
    check_writable(npz_path, "--out")

    start = time.perf_counter()
    loaded, steps = _load(args, device)
    load_seconds = time.perf_counter() - start
    _check_fits_in_memory(args.num_samples, loaded.sample_shape)
    batch_size = _batch_size(args, loaded, device, min(args.num_samples, DEFAULT_BATCH_SIZE))
    num_batches = -(-args.num_samples // batch_size)
    done = [0]
    try:
        samples = _draw(loaded, args, steps, device, 0, args.num_samples, batch_size, not args.no_progress,
                        after_batch=lambda count: done.__setitem__(0, count))
    except Interrupted as stop:
        batch = done[0] // batch_size + 1
        raise Interrupted(stop.signum, f"stopped in batch {batch} of {num_batches}; nothing written (a folder "
                                       "--out keeps finished chunks)") from None
    sample_seconds = time.perf_counter() - start - load_seconds

    settings = run_settings(loaded, sampler=args.sampler, num_steps=steps, eta=args.eta, seed=args.seed,
                            num_samples=args.num_samples, chunk_size=args.num_samples,
                            model_dtype=model_dtype_name(args.model_options, loaded.model))
    metadata = dict(npz_metadata(settings), batch_size=batch_size)
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
        raise OutputError(f"--out: could not write the grid {str(out_path)!r} ({describe_os_error(error)}); "
                          f"the samples are in {npz_path}") from error
    print(f"wrote {args.num_samples} samples of shape {tuple(loaded.sample_shape)} to {' and '.join(written)}")
    print(f"{args.sampler}, {steps} steps, seed {args.seed}, device {device}: loaded in {load_seconds:.2f} s, "
          f"sampled in {sample_seconds:.2f} s")
    return 0


# ---------------------------------------------------------------------------------------------
# --out DIR: resumable chunks, one process or torchrun
# ---------------------------------------------------------------------------------------------
def _sample_to_folder(args, folder: Path) -> int:
    from fastddpm import distributed
    from fastddpm.outputs import check_writable

    device = _resolve_device(args.device)
    existed = folder.exists()
    check_writable(folder, "--out", folder=True)  # before loading anything
    try:
        rank, world_size, device, created_group = distributed.setup(device)
    except (RuntimeError, ValueError) as error:
        raise CommandError(f"could not join the torchrun process group: {error}") from error
    run = {}  # _folder_run notes there whether this run wrote the folder's manifest
    try:
        return _folder_run(args, folder, rank, world_size, device, run)
    except BaseException:
        # A run that created the folder's manifest and failed before its first chunk leaves nothing
        # behind (another run's folder, refused, is never touched).
        if world_size == 1 and run.get("created"):
            from fastddpm import shards

            shards.discard_unused(folder, remove_folder=not existed)
        raise
    finally:
        if created_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _broadcast(value, world_size: int):
    """Rank 0's ``value`` on every rank."""
    if world_size == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _open_on_rank0(args, folder: Path, settings: dict, rank: int, world_size: int) -> dict:
    """Rank 0 checks the folder (manifest, chunks, half-written ones) and every rank gets the plan:
    the run's settings and the chunks still to draw, or the error every rank stops with."""
    from fastddpm import shards

    plan = None
    if rank == 0:
        try:
            state = shards.open_folder(folder, settings, chunk_size_given=args.chunk_size is not None)
            if state.corrupt and not args.redo_corrupt:
                raise shards.FolderError(f"--out {str(folder)!r}: {shards.describe_problems(state, missing=False)}; "
                                         "nothing was changed: rerun with --redo-corrupt to draw them again")
            for chunk in state.corrupt:
                kept = shards.set_aside(folder, chunk)
                print(f"note: {chunk.name} was corrupt ({state.corrupt[chunk]}); kept as {kept.name}, drawing it "
                      "again", file=sys.stderr)
            removed = shards.remove_temporaries(state)
            if removed:
                print(f"note: removed {len(removed)} half-written file(s) ({', '.join(removed[:3])}); their chunks "
                      "are drawn again", file=sys.stderr)
            pending = sorted([chunk.index for chunk in state.missing] + [chunk.index for chunk in state.corrupt])
            plan = dict(settings=state.settings, pending=pending, done=state.done_samples, created=state.created)
        except (shards.FolderError, OSError) as error:
            plan = dict(error=str(error))
    plan = _broadcast(plan, world_size)
    if "error" in plan:
        raise CommandError(plan["error"])
    return plan


def _folder_run(args, folder: Path, rank: int, world_size: int, device: torch.device, run: dict) -> int:
    from tqdm import tqdm

    from fastddpm import shards
    from fastddpm.interrupts import Interrupted

    start = time.perf_counter()
    loaded, steps = _load(args, device, show_notes=rank == 0)
    batch_size = _batch_size(args, loaded, device, min(args.num_samples, DEFAULT_BATCH_SIZE))
    settings = shards.run_settings(loaded, sampler=args.sampler, num_steps=steps, eta=args.eta, seed=args.seed,
                                   num_samples=args.num_samples, chunk_size=args.chunk_size or batch_size,
                                   model_dtype=model_dtype_name(args.model_options, loaded.model))
    plan = _open_on_rank0(args, folder, settings, rank, world_size)
    run["created"] = plan["created"]
    settings = plan["settings"]
    chunks = shards.plan_chunks(settings["num_samples"], settings["chunk_size"])
    expected_id = shards.run_id(settings)
    batch_size = min(batch_size, settings["chunk_size"])  # a batch never spans two chunks
    mine = [chunks[index] for index in plan["pending"][rank::world_size]]
    total, done_before = settings["num_samples"], plan["done"]
    if rank == 0 and not plan["created"]:
        print(f"resuming {folder}: {done_before} of {total} samples were drawn, {len(plan['pending'])} chunk(s) to "
              f"go over {world_size} process(es)", file=sys.stderr)

    bar = tqdm(total=total, initial=done_before, unit="sample", desc=f"sampling ({world_size} proc)",
               disable=args.no_progress or rank != 0, smoothing=0, dynamic_ncols=True)
    sampling_started = time.perf_counter()

    def refresh(drawn_in_chunk: int = 0) -> None:  # rank 0: the chunks on disk, plus its own chunk so far
        if rank == 0:
            bar.n = shards.count_done(folder, chunks) + drawn_in_chunk
            bar.refresh()

    written = 0
    chunk = None
    try:
        for chunk in mine:
            samples = _draw(loaded, args, steps, device, chunk.first, chunk.count, batch_size, progress=False,
                            after_batch=refresh)
            shards.write_chunk(folder, chunk, samples, expected_id, batch_size=batch_size, device=str(device),
                               rank=rank)
            written += 1
            refresh()
        chunk = None
        _wait_for_the_others(world_size, poll=refresh if rank == 0 else None)
    except Interrupted as stop:
        where = f"in {chunk.name}" if chunk is not None else "after its last chunk"
        raise Interrupted(stop.signum, f"stopped {where}; the {written} chunk(s) this process wrote and those "
                                       f"before are kept in {folder}: run the same command again to resume") from None
    finally:
        bar.close()
    seconds = time.perf_counter() - sampling_started
    if rank == 0:
        drawn = shards.count_done(folder, chunks) - done_before
        rate = drawn / seconds if seconds > 0 else 0.0
        print(f"drew {drawn} samples in {seconds:.2f} s ({rate:.2f} samples/s, {world_size} process(es), batch "
              f"{batch_size}, device {device}; loaded in {sampling_started - start:.2f} s); {folder} holds "
              f"{shards.count_done(folder, chunks)} of {total} samples")
        print(f"merge them into one .npz and a grid with: fastddpm merge {folder}")
    return 0


def _wait_for_the_others(world_size: int, poll: Optional[Callable[[], None]]) -> None:
    """Wait until every process has written its chunks; rank 0 updates the progress bar meanwhile."""
    if world_size == 1:
        return
    import torch.distributed as dist

    work = dist.barrier(async_op=True)
    if poll is not None:
        while not work.is_completed():
            poll()
            time.sleep(_POLL_SECONDS)
    work.wait()
    if poll is not None:
        poll()
