"""A folder of samples drawn in chunks: what ``fastddpm sample --out DIR`` writes (in one process or
under ``torchrun``), resumes, and ``fastddpm merge DIR`` joins into one ``.npz`` and a grid.

Layout of ``DIR``:

- ``manifest.json``: the run (:func:`run_settings`: the checkpoint's sha256, the schedule's,
  sampler, steps, eta, seed, prediction and variance type, clipping, sample shape, number of
  samples, chunk size, the noise stream) and the index range of every chunk. Written once, when
  the folder is new; a later run in the folder must have the same settings.
- ``chunk-000000.npz``, ``chunk-000001.npz``, ...: chunk ``i`` holds samples ``[i * C, i * C +
  count)`` of the run (``C`` the chunk size) as float32 ``samples [count, ...]``, with
  ``first_index``, ``run_id`` (the fingerprint of the manifest's run) and the batch size,
  device and rank that drew them. Each is written to a temporary file beside it and renamed, so a chunk
  under its name is complete; a half-written one is a temporary file, removed by the next run,
  which draws that chunk again.

Sample ``k`` of a run is drawn with ``first_index`` ``k`` in the seed's sample-indexed noise
stream (:func:`fastddpm.reference.philox_randn`), so a chunk holds the same samples whichever
process, batch size or run drew it, up to the model's own rounding for other batch sizes.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .outputs import atomic_write, save_or_rescue

__all__ = ["FORMAT", "MANIFEST_NAME", "NOISE_STREAM", "FolderError", "Chunk", "Folder", "plan_chunks",
           "run_settings", "run_id", "open_folder", "read_folder", "check_chunk", "write_chunk", "remove_temporaries",
           "count_done",
           "set_aside", "npz_metadata", "describe_problems", "merge"]

FORMAT = "fastddpm-samples"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# What a sample's noise is keyed by; part of a run's settings, so a folder drawn with another
# stream (a future version) is never mixed with this one.
NOISE_STREAM = "philox4x32-10, sample-indexed: (seed, sample index, element, step)"
# Settings a run's folder must agree on, in the order a mismatch is reported.
IDENTITY_KEYS = ("checkpoint_sha256", "schedule_sha256", "num_train_timesteps", "sampler", "num_steps", "eta",
                 "seed", "prediction_type", "variance_type", "clip_denoised", "clip_range", "sample_shape",
                 "num_samples", "chunk_size", "noise_stream")
# Settings that decide the samples too, added later: a manifest without one had its default, and
# the run id leaves a default value out, so folders written before keep their id.
OPTIONAL_IDENTITY = {"model_dtype": "fp32"}


class FolderError(ValueError):
    """A sample folder that belongs to another run, or whose chunks are missing or corrupt."""


@dataclass(frozen=True)
class Chunk:
    """Samples ``[first, first + count)`` of a run, in file ``name``."""

    index: int
    first: int
    count: int

    @property
    def name(self) -> str:
        return f"chunk-{self.index:06d}.npz"


def plan_chunks(num_samples: int, chunk_size: int) -> List[Chunk]:
    """The chunks of a run: ``chunk_size`` samples each, the last one what is left."""
    return [Chunk(index, first, min(chunk_size, num_samples - first))
            for index, first in enumerate(range(0, num_samples, chunk_size))]


def _sha256_of_array(array) -> str:
    return "sha256:" + hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def run_settings(pretrained, *, sampler: str, num_steps: int, eta: float, seed: int, num_samples: int,
                 chunk_size: int, model_dtype: str = "fp32") -> Dict[str, Any]:
    """What decides a run's samples (``IDENTITY_KEYS``), plus the chain's timesteps and the
    checkpoint's path for the reader. ``pretrained`` is a :class:`fastddpm.checkpoint.Pretrained`."""
    from .samplers import SAMPLERS

    schedule = pretrained.schedule
    chain = SAMPLERS[sampler].schedule(schedule, num_steps)
    return dict(
        checkpoint_sha256=pretrained.checksum,
        schedule_sha256=_sha256_of_array(schedule.betas.double().numpy().astype("<f8")),
        num_train_timesteps=int(schedule.num_timesteps),
        sampler=sampler,
        num_steps=int(num_steps),
        eta=float(eta),
        seed=int(seed),
        prediction_type=pretrained.prediction_type,
        variance_type=pretrained.variance_type,
        clip_denoised=bool(pretrained.clip_denoised),
        clip_range=float(pretrained.clip_range),
        sample_shape=[int(size) for size in pretrained.sample_shape],
        num_samples=int(num_samples),
        chunk_size=int(chunk_size),
        noise_stream=NOISE_STREAM,
        model_dtype=model_dtype,
        timesteps=[int(t) for t in chain.timesteps.tolist()],
        checkpoint=pretrained.source,
    )


def run_id(settings: Dict[str, Any]) -> str:
    """The fingerprint of a run: sha256 of its identity settings as canonical JSON."""
    identity = {key: settings[key] for key in IDENTITY_KEYS}
    identity.update({key: settings[key] for key, default in OPTIONAL_IDENTITY.items()
                     if settings.get(key, default) != default})
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


@dataclass
class Folder:
    """A sample folder as found: its run settings, chunks, which chunks are done, missing or
    corrupt (chunk -> why), and the temporary files half-written chunks left."""

    path: Path
    settings: Dict[str, Any]
    chunks: List[Chunk]
    done: List[Chunk] = field(default_factory=list)
    missing: List[Chunk] = field(default_factory=list)
    corrupt: Dict[Chunk, str] = field(default_factory=dict)
    temporaries: List[str] = field(default_factory=list)
    created: bool = False

    @property
    def run_id(self) -> str:
        return run_id(self.settings)

    @property
    def done_samples(self) -> int:
        return sum(chunk.count for chunk in self.done)


def _is_ours(name: str) -> bool:
    return name == MANIFEST_NAME or (name.startswith("chunk-") and name.endswith(".npz"))


def _is_our_temporary(name: str) -> bool:
    """A temporary file of :func:`fastddpm.outputs.atomic_write` for the manifest or a chunk."""
    return name.endswith(".tmp") and (name.startswith(f".{MANIFEST_NAME}.") or name.startswith(".chunk-"))


def _describe(value) -> str:
    if isinstance(value, str) and value.startswith("sha256:"):
        return value[:19] + "..."
    return repr(value)


def _read_manifest(path: Path, argument: str) -> Dict[str, Any]:
    file = path / MANIFEST_NAME
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise FolderError(f"{argument} {str(path)!r}: {MANIFEST_NAME} is unreadable ({error}); nothing in the "
                          "folder was changed") from None
    run = manifest.get("run") if isinstance(manifest, dict) else None
    if manifest.get("format") != FORMAT or not isinstance(run, dict) or any(key not in run for key in IDENTITY_KEYS):
        raise FolderError(f"{argument} {str(path)!r}: {MANIFEST_NAME} is not a fastddpm sample manifest; nothing in "
                          "the folder was changed")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FolderError(f"{argument} {str(path)!r} was written in sample-folder format version "
                          f"{manifest.get('format_version')!r}; this fastddpm reads version {FORMAT_VERSION}")
    return manifest


def _write_manifest(path: Path, settings: Dict[str, Any], chunks: Sequence[Chunk]) -> None:
    from . import __version__

    manifest = dict(
        format=FORMAT, format_version=FORMAT_VERSION, fastddpm_version=__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), run_id=run_id(settings), run=settings,
        chunks=[dict(file=chunk.name, first=chunk.first, count=chunk.count) for chunk in chunks],
    )
    text = json.dumps(manifest, indent=1)
    atomic_write(path / MANIFEST_NAME, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def open_folder(path, settings: Dict[str, Any], *, chunk_size_given: bool = True, argument: str = "--out",
                create: bool = True) -> Folder:
    """The sample folder ``path`` for a run of ``settings`` (:func:`run_settings`).

    A new folder (no manifest, none of our files) gets its manifest now (with ``create``). An
    existing one must hold a run of the same settings, else :class:`FolderError` names the first
    settings that differ and nothing in the folder is touched; without ``chunk_size_given`` the
    folder's own chunk size is taken. Every chunk present is checked (:func:`check_chunk`); the
    temporary files of half-written chunks are listed (:func:`remove_temporaries` removes them).
    Call it in one process only (rank 0), before the others write.
    """
    path = Path(path)
    names = sorted(os.listdir(path)) if path.is_dir() else []
    if MANIFEST_NAME in names:
        manifest = _read_manifest(path, argument)
        stored = manifest["run"]
        settings = dict(settings)
        if not chunk_size_given:
            settings["chunk_size"] = stored["chunk_size"]
        stored = dict(OPTIONAL_IDENTITY, **stored)  # a manifest from before a key existed had its default
        differences = [f"{key} {_describe(stored[key])} there, {_describe(settings[key])} here"
                       for key in (*IDENTITY_KEYS, *OPTIONAL_IDENTITY)
                       if json.loads(json.dumps(stored[key])) != settings.get(key, OPTIONAL_IDENTITY.get(key))]
        if differences:
            hint = (" (leave --chunk-size out to take the folder's)" if differences[0].startswith("chunk_size")
                    else "")
            raise FolderError(f"{argument} {str(path)!r} holds samples of another run: {'; '.join(differences[:3])}"
                              f"{hint}; nothing in it was changed. Use another {argument}, or the same settings "
                              "to resume this one")
        settings = dict(stored, checkpoint=settings.get("checkpoint", stored.get("checkpoint")))
        created = False
    else:
        strays = [name for name in names if _is_ours(name)]
        if strays:
            raise FolderError(f"{argument} {str(path)!r} holds {strays[0]} but no {MANIFEST_NAME}: not a folder "
                              "this fastddpm can resume; nothing in it was changed")
        created = True
    chunks = plan_chunks(settings["num_samples"], settings["chunk_size"])
    if created and create:
        _write_manifest(path, settings, chunks)
    folder = Folder(path=path, settings=settings, chunks=chunks, created=created,
                    temporaries=[name for name in names if _is_our_temporary(name)])
    present = set(names)
    for chunk in chunks:
        if chunk.name not in present:
            folder.missing.append(chunk)
            continue
        problem = check_chunk(path, chunk, folder.run_id, settings["sample_shape"])
        if problem is None:
            folder.done.append(chunk)
        else:
            folder.corrupt[chunk] = problem
    return folder


def read_folder(path, *, argument: str = "DIR") -> Folder:
    """An existing sample folder as its manifest describes it, every chunk checked."""
    path = Path(path)
    if not (path / MANIFEST_NAME).is_file():
        raise FolderError(f"{argument} {str(path)!r} has no {MANIFEST_NAME}: not a folder written by "
                          "fastddpm sample --out DIR")
    settings = _read_manifest(path, argument)["run"]
    return open_folder(path, settings, argument=argument, create=False)


def check_chunk(path, chunk: Chunk, expected_run_id: str, sample_shape) -> Optional[str]:
    """Why chunk file ``path/chunk.name`` is unusable (unreadable, another run's, the wrong
    samples, NaN), or None when it is fine. Reads the whole file (the zip CRCs are checked)."""
    try:
        with np.load(Path(path) / chunk.name, allow_pickle=False) as data:
            samples = data["samples"]
            first, found_id = int(data["first_index"]), str(data["run_id"])
    except KeyError as error:  # an .npz, but without a chunk's arrays
        return f"not a chunk written by fastddpm (no {error} array)"
    except ValueError as error:
        if "allow_pickle" in str(error):  # object arrays: nothing fastddpm writes
            return "not a chunk written by fastddpm (it holds pickled Python objects)"
        return f"unreadable ({type(error).__name__}: {error})"
    except Exception as error:  # zipfile, numpy and OS errors alike: the file cannot be read
        return f"unreadable ({type(error).__name__}: {error})"
    if found_id != expected_run_id:
        return "written by another run"
    want = (chunk.count, *sample_shape)
    if first != chunk.first or samples.shape != want or samples.dtype != np.float32:
        return (f"holds {samples.dtype} {tuple(samples.shape)} from index {first}, expected float32 {want} from "
                f"index {chunk.first}")
    if not np.isfinite(samples).all():
        return "holds NaN or infinite values"
    return None


def write_chunk(path, chunk: Chunk, samples, expected_run_id: str, *, argument: str = "--out", **info) -> Path:
    """Write ``samples`` as ``path/chunk.name`` atomically (or keep them elsewhere and raise
    :class:`fastddpm.outputs.OutputError` naming the copy); ``info`` (batch size, device, rank) goes in too."""
    from .imaging import save_samples_npz

    return save_or_rescue(
        lambda target: save_samples_npz(target, samples, first_index=chunk.first, run_id=expected_run_id, **info),
        Path(path) / chunk.name, argument=argument,
        what=f"samples {chunk.first}..{chunk.first + chunk.count - 1} ({chunk.name})")


def remove_temporaries(folder: Folder) -> List[str]:
    """Remove the temporary files half-written chunks (or a half-written manifest) left; their
    chunks are missing, so they are drawn again. Returns the names removed."""
    removed = []
    for name in folder.temporaries:
        try:
            (folder.path / name).unlink()
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed


def count_done(path, chunks: Sequence[Chunk]) -> int:
    """Samples in the chunk files present now (a directory listing; the files are not read)."""
    try:
        present = set(os.listdir(path))
    except OSError:
        return 0
    return sum(chunk.count for chunk in chunks if chunk.name in present)


def set_aside(path, chunk: Chunk) -> Path:
    """Rename a corrupt chunk to ``<name>.corrupt`` (kept for a look), so that it can be redone."""
    source = Path(path) / chunk.name
    target = source.with_name(chunk.name + ".corrupt")
    os.replace(source, target)
    return target


def discard_unused(path, *, remove_folder: bool) -> bool:
    """After a run that failed: if ``path`` holds nothing but this run's manifest (no chunk was
    written), remove the manifest, and the folder too with ``remove_folder`` (it did not exist
    before the run). Returns whether anything was removed; a folder with chunks is left as it is."""
    path = Path(path)
    try:
        names = os.listdir(path)
    except OSError:
        return False
    if names != [MANIFEST_NAME]:
        return False
    (path / MANIFEST_NAME).unlink()
    if remove_folder:
        try:
            path.rmdir()
        except OSError:
            pass
    return True


def npz_metadata(settings: Dict[str, Any]) -> Dict[str, Any]:
    """The metadata a samples ``.npz`` carries (the one image ``--out`` writes, and a merged folder)."""
    return dict(
        seed=settings["seed"], sampler=settings["sampler"], num_steps=settings["num_steps"], eta=settings["eta"],
        checkpoint=settings.get("checkpoint") or None, checkpoint_sha256=settings["checkpoint_sha256"] or None,
        prediction_type=settings["prediction_type"], variance_type=settings["variance_type"],
        clip_denoised=settings["clip_denoised"], num_train_timesteps=settings["num_train_timesteps"],
        timesteps=np.asarray(settings["timesteps"], dtype=np.int64), value_range=[-1.0, 1.0],
        model_dtype=settings.get("model_dtype", OPTIONAL_IDENTITY["model_dtype"]),
    )


def describe_problems(folder: Folder, *, missing: bool = True, limit: int = 3) -> str:
    """The missing chunks (with ``missing``) and each corrupt chunk, by name, in one phrase."""
    phrases = []
    if missing and folder.missing:
        names = ", ".join(chunk.name for chunk in folder.missing[:limit])
        more = f" and {len(folder.missing) - limit} more" if len(folder.missing) > limit else ""
        phrases.append(f"{len(folder.missing)} of {len(folder.chunks)} chunks missing ({names}{more})")
    for chunk, why in list(folder.corrupt.items())[:limit]:
        phrases.append(f"{chunk.name} is corrupt: {why}")
    if len(folder.corrupt) > limit:
        phrases.append(f"{len(folder.corrupt) - limit} more corrupt chunks")
    return "; ".join(phrases)


def merge(folder: Folder, npz_path, *, argument: str = "--npz"):
    """All samples of a finished folder in index order, written to ``npz_path`` with the run's
    metadata (atomically, or rescued). Returns the samples (float32 numpy)."""
    from .imaging import save_samples_npz

    if folder.missing or folder.corrupt:
        raise FolderError(f"{str(folder.path)!r} is not complete: {describe_problems(folder)}")
    parts = []
    for chunk in folder.chunks:
        with np.load(folder.path / chunk.name, allow_pickle=False) as data:
            parts.append(data["samples"])
    samples = np.concatenate(parts)
    metadata = npz_metadata(folder.settings)
    save_or_rescue(lambda target: save_samples_npz(target, samples, **metadata), npz_path, argument=argument,
                   what="the merged samples")
    return samples
