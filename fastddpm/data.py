"""Training data that works offline.

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 17 grey levels), scaled
  to [-1, 1] and kept at 8x8 by default (8 -> 4 -> 2 in the UNet); ``image_size=16`` or ``32``
  resizes bilinearly. A fixed permutation splits them into 1497 training and 300 held-out images.
- ``toy2d``: moons, swiss roll and 8 Gaussians, 2-D points drawn from a seed.
- a folder of images (Pillow: resize the short side, center-crop, optional random flip at batch
  time) or a ``.npy`` / ``.npz`` array.

:func:`load_dataset` is the front door: it returns a :class:`Dataset` whose :meth:`Dataset.batch`
gathers a batch by index (flips drawn from a given generator, so batches are reproducible).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .checks import check_int

__all__ = [
    "Dataset", "load_dataset", "load_digits", "toy2d", "load_image_folder", "load_array",
    "TOY2D_NAMES", "DIGITS_HELD_OUT", "IMAGE_EXTENSIONS",
]

TOY2D_NAMES = ("moons", "swiss_roll", "8gaussians")
_TOY2D_ALIASES = {"moons": "moons", "swiss_roll": "swiss_roll", "swissroll": "swiss_roll",
                  "8gaussians": "8gaussians", "eight_gaussians": "8gaussians"}
DIGITS_HELD_OUT = 300
_DIGITS_SPLIT_SEED = 0  # the permutation behind the train / held-out split; never change it
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class Dataset:
    """An in-memory dataset.

    ``data`` holds float32 values in [-1, 1] (images [N, C, H, W] or points [N, D]) or uint8
    images in [0, 255] (converted per batch, to keep large image sets at a quarter the memory).
    """

    data: torch.Tensor
    name: str
    labels: Optional[torch.Tensor] = None
    random_flip: bool = False
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def sample_shape(self) -> Tuple[int, ...]:
        return tuple(self.data.shape[1:])

    @property
    def is_image(self) -> bool:
        return self.data.ndim == 4

    def batch(self, indices: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Float32 batch of the rows ``indices``; horizontal flips (if enabled) come from ``generator``."""
        x = self.data[indices.to(self.data.device)]
        x = x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float()
        if self.random_flip and self.is_image:
            flip = torch.rand(x.shape[0], generator=generator) < 0.5
            x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
        return x


# ---------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------
def _digits_split_indices(split: str) -> np.ndarray:
    permutation = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(1797)
    if split == "train":
        return np.sort(permutation[DIGITS_HELD_OUT:])
    if split == "test":
        return np.sort(permutation[:DIGITS_HELD_OUT])
    return np.arange(1797)


def _sklearn_digits() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (``images`` [1797, 8, 8] in 0..16, ``target`` [1797]), read
    from the file scikit-learn ships without importing scikit-learn (~2 s of every command's
    start-up); through ``sklearn.datasets.load_digits`` where the file is not found."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            table = np.loadtxt(path, delimiter=",", dtype=np.float64)
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    return bunch.images, bunch.target


def load_digits(split: str = "train", *, image_size: int = 8) -> Tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as ``(images float32 [N, 1, S, S] in [-1, 1], labels int64 [N])``.

    ``split``: ``"train"`` (1497 images), ``"test"`` (the 300 held-out images) or ``"all"``;
    the split is a fixed permutation, the same on every machine. Pixel values 0..16 map linearly
    to [-1, 1] (so there are 17 levels, 0.125 apart). ``image_size`` other than 8 resizes
    bilinearly.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    image_size = check_int("image_size", image_size, 1)
    pixels, targets = _sklearn_digits()
    index = _digits_split_indices(split)
    images = torch.from_numpy(pixels[index].astype(np.float32)).unsqueeze(1) / 8.0 - 1.0
    labels = torch.from_numpy(targets[index].astype(np.int64))
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False,
                               antialias=image_size < 8).clamp(-1.0, 1.0)
    return images.contiguous(), labels


# ---------------------------------------------------------------------------------------------
# 2-D toy sets
# ---------------------------------------------------------------------------------------------
def toy2d(name: str, n: int = 10000, seed: int = 0) -> torch.Tensor:
    """``n`` points float32 [n, 2] of a 2-D toy distribution, scaled to roughly [-2.5, 2.5]^2.

    ``name``: ``moons`` (two interleaved half circles, noise 0.05), ``swiss_roll`` (a 2-D spiral,
    noise 0.5 before scaling) or ``8gaussians`` (std 0.1 around 8 points on a circle of radius 2).
    Same ``seed``, same points; scaling uses fixed constants so fresh draws share the scale.
    """
    canonical = _TOY2D_ALIASES.get(name) if isinstance(name, str) else None
    if canonical is None:
        raise ValueError(f"name must be one of {TOY2D_NAMES}, got {name!r}")
    n = check_int("n", n, 1)
    seed = check_int("seed", seed, 0)
    if canonical == "moons":
        from sklearn.datasets import make_moons

        points, _ = make_moons(n, noise=0.05, random_state=seed)
        points = (points - np.array([0.5, 0.25])) * 1.6
    elif canonical == "swiss_roll":
        from sklearn.datasets import make_swiss_roll

        points, _ = make_swiss_roll(n, noise=0.5, random_state=seed)
        points = points[:, [0, 2]] / 5.0
    else:
        rng = np.random.default_rng(seed)
        angles = 2 * math.pi * rng.integers(0, 8, size=n) / 8
        centers = 2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        points = centers + 0.1 * rng.standard_normal((n, 2))
    return torch.from_numpy(points.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# folders and arrays
# ---------------------------------------------------------------------------------------------
def _check_image_size(image_size) -> None:
    image_size = check_int("image_size", image_size, 1)


def load_image_folder(path: Union[str, os.PathLike], image_size: int = 32, *, channels: int = 3) -> torch.Tensor:
    """All images under ``path`` (recursively, sorted by path) as uint8 [N, C, S, S]: the short
    side resized to ``image_size`` (bicubic), then a center crop. ``channels``: 3 (RGB) or 1."""
    from PIL import Image, UnidentifiedImageError

    _check_image_size(image_size)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise ValueError(f"data path {str(root)!r} is not a folder, a .npy or a .npz file")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"data folder {str(root)!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
    mode = "RGB" if channels == 3 else "L"
    images = np.empty((len(files), image_size, image_size, channels), dtype=np.uint8)
    for i, file in enumerate(files):
        try:
            with Image.open(file) as image:
                image = image.convert(mode)
                scale = image_size / min(image.size)
                width, height = max(image_size, round(image.width * scale)), max(image_size, round(image.height * scale))
                image = image.resize((width, height), Image.BICUBIC)
                left, top = (width - image_size) // 2, (height - image_size) // 2
                image = image.crop((left, top, left + image_size, top + image_size))
                images[i] = np.asarray(image, dtype=np.uint8).reshape(image_size, image_size, channels)
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"cannot read image {str(file)!r}: {error}") from None
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def _array_from_file(path: Path, key: Optional[str]) -> np.ndarray:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ValueError(f"cannot read array file {str(path)!r}: {error}") from None
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded:
        names = list(loaded.files)
        if key is None:
            preferred = [k for k in ("images", "x", "data", "arr_0") if k in names]
            if preferred:
                key = preferred[0]
            elif len(names) == 1:
                key = names[0]
            else:
                raise ValueError(f"{str(path)!r} holds several arrays {names}; choose one with key=")
        if key not in names:
            raise ValueError(f"{str(path)!r} has no array {key!r}; it holds {names}")
        return loaded[key]


def load_array(path: Union[str, os.PathLike], *, key: Optional[str] = None,
               image_size: Optional[int] = None) -> torch.Tensor:
    """A ``.npy`` / ``.npz`` array as a dataset tensor.

    uint8 arrays are images in [0, 255]; float arrays must already lie in [-1, 1]. Shapes:
    [N, D] (points), [N, H, W] (grey images), [N, C, H, W] or [N, H, W, C] with C in 1, 3, 4.
    ``image_size`` resizes images (bilinear). Returns uint8 [N, C, H, W] images, else float32.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    array = _array_from_file(path, key)
    # Shape first: a wrong shape makes every later message beside the point.
    if array.ndim < 2 or array.ndim > 4 or array.shape[0] == 0:
        raise ValueError(f"array in {str(path)!r} must have shape [N, D], [N, H, W], [N, C, H, W] or [N, H, W, C] "
                         f"with N > 0, got {array.shape}")
    if array.dtype == np.uint8:
        pass
    elif np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        if array.size and (not np.isfinite(array).all() or np.abs(array).max() > 1.0 + 1e-6):
            raise ValueError(f"float data in {str(path)!r} must lie in [-1, 1] (give uint8 for 0..255 images)")
    else:
        raise ValueError(f"array in {str(path)!r} must be uint8 or floating point, got {array.dtype}")
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.ndim == 2:
        return tensor.float()
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(1)
    elif tensor.shape[1] not in (1, 3, 4) and tensor.shape[3] in (1, 3, 4):  # 4-D: [N, H, W, C] -> [N, C, H, W]
        tensor = tensor.permute(0, 3, 1, 2)
    if image_size is not None:
        _check_image_size(image_size)
        if tensor.shape[-2:] != (image_size, image_size):
            resized = F.interpolate(tensor.float(), size=(image_size, image_size), mode="bilinear",
                                    align_corners=False, antialias=True)
            tensor = resized.round().clamp(0, 255).to(torch.uint8) if tensor.dtype == torch.uint8 else resized.clamp(-1, 1)
    return tensor.contiguous()


# ---------------------------------------------------------------------------------------------
# front door
# ---------------------------------------------------------------------------------------------
def load_dataset(
    name_or_path: Union[str, os.PathLike],
    *,
    split: str = "train",
    image_size: Optional[int] = None,
    channels: int = 3,
    random_flip: Optional[bool] = None,
    num_points: int = 10000,
    seed: int = 0,
    key: Optional[str] = None,
) -> Dataset:
    """A :class:`Dataset` by name or path.

    Names: ``digits`` (``split`` train/test/all; ``image_size`` default 8), ``moons``,
    ``swiss_roll``, ``8gaussians`` (also ``toy2d:<name>``; ``num_points`` points from ``seed``).
    Paths: a folder of images (``image_size`` default 32, ``channels`` 3 or 1, random flips on
    by default) or a ``.npy`` / ``.npz`` file (flips off by default).
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"data must be a dataset name or a path, got {type(name_or_path).__name__}")
    name = os.fspath(name_or_path)
    toy_name = name[len("toy2d:"):] if name.startswith("toy2d:") else name
    if name == "digits":
        images, labels = load_digits(split, image_size=8 if image_size is None else image_size)
        return Dataset(images, "digits", labels=labels, random_flip=bool(random_flip),
                       info=dict(split=split, image_size=images.shape[-1]))
    if toy_name in _TOY2D_ALIASES:
        points = toy2d(toy_name, num_points, seed)
        return Dataset(points, _TOY2D_ALIASES[toy_name], info=dict(num_points=num_points, seed=seed))
    path = Path(name)
    if path.is_dir():
        images = load_image_folder(path, 32 if image_size is None else image_size, channels=channels)
        return Dataset(images, str(path), random_flip=True if random_flip is None else bool(random_flip),
                       info=dict(image_size=images.shape[-1], num_files=images.shape[0]))
    if path.suffix.lower() in (".npy", ".npz"):
        data = load_array(path, key=key, image_size=image_size)
        return Dataset(data, str(path), random_flip=bool(random_flip) and data.ndim == 4)
    if not path.exists():
        raise FileNotFoundError(
            f"data {name!r} is neither a dataset name (digits, {', '.join(TOY2D_NAMES)}) nor an existing path")
    raise ValueError(f"data path {name!r} must be a folder of images or a .npy / .npz file")
