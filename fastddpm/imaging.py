"""Writing samples to disk: a PNG grid to look at and an ``.npz`` of the raw values.

Samples are ``[N, C, H, W]`` arrays in the model's data scale (``[-1, 1]``), torch tensors or
numpy arrays. Grids are upscaled with nearest-neighbour pixels so that small images (8x8 or
16x16 digits) are visible without blurring.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

from .checks import check_int
from .outputs import atomic_write, require_finite

__all__ = ["to_numpy", "images_to_uint8", "default_scale", "make_grid", "save_image_grid", "save_samples_npz"]

# Grids upscale small images until a tile is at least this many pixels on its longer side.
MIN_TILE_PIXELS = 64
_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA


def to_numpy(samples) -> np.ndarray:
    """A float32 numpy copy of a tensor or array (detached and moved to the CPU)."""
    if hasattr(samples, "detach"):  # torch.Tensor, without importing torch here
        samples = samples.detach().to("cpu").float().numpy()
    return np.asarray(samples, dtype=np.float32)


def _check_images(images: np.ndarray) -> np.ndarray:
    if images.ndim != 4:
        raise ValueError(f"images must have shape [N, C, H, W], got shape {tuple(images.shape)}")
    if images.shape[1] not in _CHANNELS:
        raise ValueError(f"images must have 1, 3 or 4 channels (dim 1), got {images.shape[1]}")
    if images.shape[0] < 1:
        raise ValueError("images must hold at least one image")
    return images


def images_to_uint8(images, value_range: Tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """Map ``[N, C, H, W]`` images from ``value_range`` to uint8 ``[N, H, W, C]`` (clipped)."""
    low, high = (float(v) for v in value_range)
    if not high > low:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    images = _check_images(to_numpy(images))
    scaled = (images - low) * (255.0 / (high - low))
    scaled = np.nan_to_num(scaled, nan=0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def default_scale(height: int, width: int) -> int:
    """Integer upscale factor that brings the longer side of a tile to ``MIN_TILE_PIXELS``."""
    return max(1, math.ceil(MIN_TILE_PIXELS / max(height, width)))


def make_grid(
    images,
    *,
    nrow: Optional[int] = None,
    scale: Optional[int] = None,
    padding: int = 2,
    pad_value: int = 255,
    value_range: Tuple[float, float] = (-1.0, 1.0),
) -> np.ndarray:
    """Tile ``[N, C, H, W]`` images into one uint8 image ``[rows, cols, C]``.

    ``nrow`` images per row (default ``ceil(sqrt(N))``, a near-square grid); each image is
    upscaled ``scale`` times (default :func:`default_scale`) and separated by ``padding`` pixels
    of ``pad_value``.
    """
    tiles = images_to_uint8(images, value_range)
    count, height, width, channels = tiles.shape
    if nrow is None:
        nrow = math.ceil(math.sqrt(count))
    nrow = check_int("nrow", nrow, 1)
    if scale is None:
        scale = default_scale(height, width)
    scale = check_int("scale", scale, 1)
    padding = check_int("padding", padding, 0)
    tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
    tile_h, tile_w = height * scale, width * scale
    columns = min(nrow, count)
    rows = math.ceil(count / columns)
    grid = np.full((rows * (tile_h + padding) + padding, columns * (tile_w + padding) + padding, channels),
                   pad_value, dtype=np.uint8)
    for index in range(count):
        row, column = divmod(index, columns)
        top = padding + row * (tile_h + padding)
        left = padding + column * (tile_w + padding)
        grid[top:top + tile_h, left:left + tile_w] = tiles[index]
    return grid


def save_image_grid(images, path: Union[str, Path], **grid_options) -> Path:
    """Write :func:`make_grid` of ``images`` to ``path`` (format from the suffix, e.g. ``.png``).

    Refuses NaN / infinite values (:class:`fastddpm.outputs.NonFiniteError`) rather than drawing
    them black. Creates missing parent folders and writes atomically; returns the path written.
    """
    from PIL import Image

    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise ValueError(f"path must end in an image suffix such as .png, got {str(path)!r}")
    require_finite(to_numpy(images), "images")
    grid = make_grid(images, **grid_options)
    # uint8 [H, W] -> "L", [H, W, 3] -> "RGB", [H, W, 4] -> "RGBA"
    picture = Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid)
    return atomic_write(path, lambda temporary: picture.save(temporary, format=image_format))


def save_samples_npz(path: Union[str, Path], samples, **metadata) -> Path:
    """Write ``samples`` (float32 ``[N, C, H, W]``) and scalar/array ``metadata`` to an ``.npz``,
    atomically; refuses NaN / infinite samples (:class:`fastddpm.outputs.NonFiniteError`).

    Metadata values become numpy arrays (strings as unicode arrays, so the file loads without
    ``allow_pickle``); ``None`` values are left out.
    """
    path = Path(path)
    if "samples" in metadata:
        raise ValueError("metadata must not use the key 'samples'")
    arrays = {"samples": to_numpy(samples)}
    require_finite(arrays["samples"], "samples")
    for key, value in metadata.items():
        if value is None:
            continue
        array = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
        if array.dtype == object:
            raise TypeError(f"metadata {key!r} must be a number, string or array, got {type(value).__name__}")
        arrays[key] = array

    def write(temporary: str) -> None:
        with open(temporary, "wb") as handle:  # a file object: np.savez would append .npz to a name
            np.savez(handle, **arrays)

    return atomic_write(path, write)
