"""Writing outputs without losing them: the one home of these checks for every command.

- :func:`check_writable` runs before any long work: it creates (then removes) a small file where
  an output will go, so a read-only folder, a path under a file or a completely full disk fails
  in seconds, not after an hour of sampling or training.
- :func:`atomic_write` writes to a temporary file beside the target, syncs it and renames it over
  the target: a crash or a full disk never leaves a partial file under the target's name.
- :func:`save_or_rescue` writes an output atomically and, when that fails, writes the same data
  to a rescue file in another folder and raises an :class:`OutputError` that names it.
- :func:`require_finite` refuses NaN / infinite values instead of writing them.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Union

__all__ = ["OutputError", "NonFiniteError", "check_writable", "atomic_write", "save_or_rescue", "rescue_folders",
           "require_finite", "describe_os_error"]

PathLike = Union[str, os.PathLike]


class OutputError(OSError):
    """An output that cannot be written. The message names the argument that chose it and, after
    a failed write, where the data were kept instead."""


class NonFiniteError(FloatingPointError):
    """Values that are NaN or infinite where finite ones are needed (samples, weights, a loss)."""


def describe_os_error(error: OSError) -> str:
    """``"Not a directory: 'a/b'"`` rather than ``"[Errno 20] Not a directory: 'a/b'"``."""
    reason = error.strerror or str(error) or type(error).__name__
    if error.filename is not None:
        reason += f": {os.fsdecode(error.filename)!r}"
    return reason


def check_writable(path: PathLike, argument: str, *, folder: bool = False) -> Path:
    """Raise :class:`OutputError` (naming ``argument``) unless files can be written at ``path``.

    ``path`` is the output file (or, with ``folder=True``, the folder outputs go into). A one-byte
    file is created in the nearest folder on the way that exists, and removed again; missing folders
    are not created here (the write creates them, :func:`atomic_write`), so a command that fails
    before it writes leaves no empty folder behind. Returns ``path`` as a :class:`Path`.
    """
    path = Path(path)
    directory = path if folder else path.parent
    if not folder and path.is_dir():
        raise OutputError(f"{argument} {str(path)!r} is a folder; expected a file name")
    if folder and path.exists() and not path.is_dir():
        raise OutputError(f"{argument} {str(path)!r} is a file; expected a folder")
    for parent in directory.parents if folder else [directory, *directory.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{argument} {str(path)!r}: {str(parent)!r} is a file, not a folder; "
                                  "expected a path in a writable folder")
            break
    existing = directory
    while not existing.is_dir():
        existing = existing.parent
    try:
        handle, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=existing)
        try:
            os.write(handle, b"\0")
        finally:
            os.close(handle)
            os.unlink(probe)
    except OSError as error:
        if error.filename is not None and ".probe" in os.fsdecode(error.filename):
            error.filename = None  # the probe's random name would only confuse
        raise OutputError(f"{argument} {str(path)!r}: cannot write there ({describe_os_error(error)}); "
                          f"expected a writable {'folder' if folder else 'file path'}") from None
    return path


def refuse_existing(paths: Iterable[PathLike], argument: str, *, overwrite: bool) -> None:
    """Raise :class:`OutputError` naming ``argument`` if any of ``paths`` exists, unless
    ``overwrite``: an earlier run's output is never replaced without being asked (``--overwrite``)."""
    if overwrite:
        return
    for path in paths:
        if Path(path).exists():
            raise OutputError(f"{argument}: {str(path)!r} already exists (an earlier run's output); pass --overwrite "
                              f"to replace it, or choose another {argument}")


def atomic_write(path: PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(temporary_path)``, fsync, then rename over ``path``; clean up on failure.

    The temporary file lies in ``path``'s folder (created if missing), so the rename is atomic:
    ``path`` either keeps its old content or gets the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; outputs are ordinary files
        descriptor = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable where the platform allows it
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError:
        pass
    return path


def rescue_folders() -> List[Path]:
    """Where a failed output is kept instead, in order: the temporary folder, the current
    folder, the home folder."""
    folders: List[Path] = []
    for folder in (tempfile.gettempdir(), os.getcwd(), os.path.expanduser("~")):
        folder = Path(folder).resolve()
        if folder not in folders:
            folders.append(folder)
    return folders


def save_or_rescue(save: Callable[[Path], object], path: PathLike, *, argument: str, what: str,
                   folders: Optional[Iterable[PathLike]] = None) -> Path:
    """``save(path)`` (which should write atomically); if it raises ``OSError``, ``save`` a
    rescue copy named ``<stem>-rescued-XXXX<suffix>`` in the first of :func:`rescue_folders`
    that takes it, then raise :class:`OutputError` naming ``argument``, the failure and the copy.

    ``what`` says what the file holds, e.g. ``"the samples"``. Returns ``path`` on success.
    """
    path = Path(path)
    try:
        save(path)
        return path
    except OSError as error:
        failure = f"{argument}: could not write {str(path)!r} ({describe_os_error(error)})"
        cause = error
    tried = []
    for folder in (rescue_folders() if folders is None else [Path(f) for f in folders]):
        try:
            handle, name = tempfile.mkstemp(prefix=f"{path.stem}-rescued-", suffix=path.suffix, dir=folder)
            os.close(handle)
        except OSError:
            tried.append(str(folder))
            continue
        try:
            save(Path(name))
        except OSError:
            tried.append(str(folder))
            try:
                os.unlink(name)
            except OSError:
                pass
            continue
        raise OutputError(f"{failure}; kept {what} in {name} instead") from cause
    raise OutputError(f"{failure}; could not keep {what} anywhere else either (tried {', '.join(tried)})") from cause


def require_finite(tensor, what: str) -> None:
    """Raise :class:`NonFiniteError` ("``what`` contain NaN or infinite values") unless every
    value of ``tensor`` (a torch tensor or numpy array) is finite. Reads the result on the host."""
    if hasattr(tensor, "detach"):
        import torch

        finite = bool(torch.isfinite(tensor.detach()).all()) if tensor.is_floating_point() else True
    else:
        import numpy as np

        array = np.asarray(tensor)
        finite = bool(np.isfinite(array).all()) if np.issubdtype(array.dtype, np.inexact) else True
    if not finite:
        raise NonFiniteError(f"{what} contain NaN or infinite values")
