"""Offline sample-quality metrics: Frechet distance on a small digit classifier's features, and
sliced Wasserstein / energy distances for 2-D toy data.

FID needs Inception weights that cannot be downloaded here, so digit quality is measured with
a classifier the project trains itself (seconds on CPU, deterministic, cached on disk). Its
penultimate features stand in for Inception's pool features; the numbers are only comparable
with other numbers from the same classifier (same config, same data), which is why every report
also gives the real-vs-real floor measured the same way.

Everything here runs on CPU with torch alone (no scipy at run time).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch

from .checks import check_int
from torch import nn

__all__ = [
    "sqrtm_psd",
    "gaussian_statistics",
    "frechet_distance",
    "frechet_distance_from_statistics",
    "KernelDistance",
    "kernel_distance",
    "sliced_wasserstein_distance",
    "energy_distance",
    "ClassifierConfig",
    "DigitClassifier",
    "train_digit_classifier",
    "load_digit_classifier",
    "digit_classifier_cache_path",
    "default_cache_dir",
    "classifier_statistics",
]


def _as_float64_matrix(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except Exception as exc:  # pragma: no cover - depends on the input type
            raise TypeError(f"{name} must be a tensor or array, got {type(x).__name__}") from exc
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [num_samples, num_features], got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples to estimate a covariance, got {x.shape[0]}")
    x = x.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


# ---------------------------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------------------------
def sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix through its eigendecomposition.

    The matrix is symmetrised first and negative eigenvalues (round-off of a PSD matrix) are
    clipped to zero, so the result is symmetric PSD and real.
    """
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"matrix must be square, got shape {tuple(matrix.shape)}")
    sym = 0.5 * (matrix + matrix.T)
    eigenvalues, eigenvectors = torch.linalg.eigh(sym)
    return (eigenvectors * eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T


def gaussian_statistics(features) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (float64) of ``features`` [num_samples, num_features]."""
    x = _as_float64_matrix(features, "features")
    mean = x.mean(dim=0)
    centered = x - mean
    cov = centered.T @ centered / (x.shape[0] - 1)
    return mean, cov


def frechet_distance_from_statistics(mean_a, cov_a, mean_b, cov_b) -> float:
    """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)).

    tr((S_a S_b)^(1/2)) is computed as tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)): the inner matrix is
    symmetric PSD and has the same eigenvalues as S_a S_b, so two symmetric eigendecompositions
    replace a general (complex) matrix square root.
    """
    mean_a, mean_b = (torch.as_tensor(m, dtype=torch.float64) for m in (mean_a, mean_b))
    cov_a, cov_b = (torch.as_tensor(c, dtype=torch.float64) for c in (cov_a, cov_b))
    if mean_a.shape != mean_b.shape or mean_a.ndim != 1:
        raise ValueError(f"means must be 1-D of equal length, got {tuple(mean_a.shape)} and {tuple(mean_b.shape)}")
    dim = mean_a.shape[0]
    for name, cov in (("cov_a", cov_a), ("cov_b", cov_b)):
        if cov.shape != (dim, dim):
            raise ValueError(f"{name} must have shape ({dim}, {dim}), got {tuple(cov.shape)}")
    root_a = sqrtm_psd(cov_a)
    inner = root_a @ cov_b @ root_a
    inner_eigenvalues = torch.linalg.eigvalsh(0.5 * (inner + inner.T))
    trace_sqrt = inner_eigenvalues.clamp_min(0).sqrt().sum()
    diff = mean_a - mean_b
    distance = diff.dot(diff) + torch.trace(cov_a) + torch.trace(cov_b) - 2.0 * trace_sqrt
    # Round-off can leave a tiny negative number for identical statistics.
    return max(float(distance), 0.0)


def frechet_distance(features_a, features_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [n, d] and [m, d]."""
    a = _as_float64_matrix(features_a, "features_a")
    b = _as_float64_matrix(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"features_a and features_b must have the same width, got {a.shape[1]} and {b.shape[1]}")
    return frechet_distance_from_statistics(*gaussian_statistics(a), *gaussian_statistics(b))


# ---------------------------------------------------------------------------------------------
# kernel distance (KID)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KernelDistance:
    """An unbiased estimate of the squared MMD (``value``) with its ``standard_error``."""

    value: float
    standard_error: float
    num_subsets: int


def _polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x . y / d + 1)^3, the kernel of Binkowski et al. (2018) that KID uses."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def kernel_distance(features_a, features_b, *, num_subsets: int = 10, seed: int = 0) -> KernelDistance:
    """KID: the squared maximum mean discrepancy under the cubic polynomial kernel, unbiased.

    ``value`` is the U-statistic over all pairs (Binkowski et al. 2018, eq. 3: the diagonals
    k(x_i, x_i) left out), whose mean is the MMD^2 itself: 0 for two samples of one distribution
    at any sample size, where the Frechet distance has a size-dependent bias. ``standard_error``
    is the delete-a-group jackknife over ``num_subsets`` disjoint subsets (each set shuffled with
    ``seed`` and dealt into the subsets; the statistic recomputed without subset j of both sets):
    the error of ``value`` itself. Common implementations instead average the estimator over
    overlapping random subsets and report the spread of those subset values, which is neither
    the error of their mean nor the error of the all-pairs value.
    """
    a = _as_float64_matrix(features_a, "features_a")
    b = _as_float64_matrix(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"features_a and features_b must have the same width, got {a.shape[1]} and {b.shape[1]}")
    num_subsets = check_int("num_subsets", num_subsets, 2)
    if min(a.shape[0], b.shape[0]) < 2 * num_subsets:
        raise ValueError(f"num_subsets={num_subsets} needs at least {2 * num_subsets} samples in each set, got "
                         f"{a.shape[0]} and {b.shape[0]}")
    k_aa = _polynomial_kernel(a, a).fill_diagonal_(0.0)
    k_bb = _polynomial_kernel(b, b).fill_diagonal_(0.0)
    k_ab = _polynomial_kernel(a, b)

    def statistic(keep_a: torch.Tensor, keep_b: torch.Tensor) -> float:
        n, m = keep_a.sum(), keep_b.sum()
        within_a = keep_a @ k_aa @ keep_a / (n * (n - 1))
        within_b = keep_b @ k_bb @ keep_b / (m * (m - 1))
        return float(within_a + within_b - 2.0 * (keep_a @ k_ab @ keep_b) / (n * m))

    generator = torch.Generator().manual_seed(seed)
    group_a = torch.randperm(a.shape[0], generator=generator) % num_subsets
    group_b = torch.randperm(b.shape[0], generator=generator) % num_subsets
    value = statistic(torch.ones(a.shape[0], dtype=torch.float64), torch.ones(b.shape[0], dtype=torch.float64))
    left_out = torch.tensor([statistic((group_a != j).double(), (group_b != j).double())
                             for j in range(num_subsets)], dtype=torch.float64)
    variance = (num_subsets - 1) / num_subsets * ((left_out - left_out.mean()) ** 2).sum()
    return KernelDistance(value=value, standard_error=float(variance.sqrt()), num_subsets=num_subsets)


# ---------------------------------------------------------------------------------------------
# distances between point clouds (2-D toy data)
# ---------------------------------------------------------------------------------------------
def _quantiles(sorted_values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Linear-interpolated quantiles along dim 0 of sorted columns (for unequal sample sizes)."""
    n = sorted_values.shape[0]
    position = levels * (n - 1)
    low = position.floor().long().clamp(0, n - 1)
    high = (low + 1).clamp(max=n - 1)
    frac = (position - low).unsqueeze(1)
    return sorted_values[low] * (1 - frac) + sorted_values[high] * frac


def sliced_wasserstein_distance(x, y, *, num_projections: int = 512, seed: int = 0, p: int = 2) -> float:
    """Sliced p-Wasserstein distance between point clouds x [n, d] and y [m, d].

    Averages W_p^p of the 1-D projections on ``num_projections`` random unit directions (drawn
    from ``seed``) and returns its p-th root. Equal sizes compare sorted projections directly;
    unequal sizes compare 1-D quantile functions on a common grid.
    """
    x = _as_float64_matrix(x, "x")
    y = _as_float64_matrix(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    if not isinstance(num_projections, int) or num_projections < 1:
        raise ValueError(f"num_projections must be a positive int, got {num_projections!r}")
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p!r}")
    generator = torch.Generator().manual_seed(int(seed))
    directions = torch.randn(x.shape[1], num_projections, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)
    proj_x = (x @ directions).sort(dim=0).values
    proj_y = (y @ directions).sort(dim=0).values
    if proj_x.shape[0] != proj_y.shape[0]:
        levels = (torch.arange(max(x.shape[0], y.shape[0]), dtype=torch.float64) + 0.5) / max(x.shape[0], y.shape[0])
        proj_x, proj_y = _quantiles(proj_x, levels), _quantiles(proj_y, levels)
    gap = (proj_x - proj_y).abs() ** p
    return float(gap.mean() ** (1.0 / p))


def energy_distance(x, y) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (V-statistic: zero for identical sets)."""
    x = _as_float64_matrix(x, "x")
    y = _as_float64_matrix(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    cross = _mean_pairwise_distance(x, y)
    within_x = _mean_pairwise_distance(x, x)
    within_y = _mean_pairwise_distance(y, y)
    return max(2 * cross - within_x - within_y, 0.0)


def _mean_pairwise_distance(x: torch.Tensor, y: torch.Tensor, rows_per_chunk: int = 1024) -> float:
    """Mean Euclidean distance over all pairs, in row chunks so 10^4-point sets fit in memory."""
    # the matmul shortcut of cdist loses digits to cancellation; the direct form keeps d(x, x) = 0
    total = sum(float(torch.cdist(chunk, y, compute_mode="donot_use_mm_for_euclid_dist").sum())
                for chunk in x.split(rows_per_chunk))
    return total / (x.shape[0] * y.shape[0])


# ---------------------------------------------------------------------------------------------
# digit classifier
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Everything that determines the trained classifier (hashed into its cache key)."""

    width: int = 32
    feature_dim: int = 64
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    max_shift: int = 1  # random translation (pixels) used as augmentation
    seed: int = 0
    version: int = 1  # bump when the architecture or training loop changes

    def key(self, data_digest: str) -> str:
        payload = json.dumps({"config": dataclasses.asdict(self), "data": data_digest}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


class DigitClassifier(nn.Module):
    """Small CNN: two strided convolutions, one feature layer, a linear head.

    ``features(x)`` is the penultimate activation the Frechet distance is computed on.
    """

    def __init__(self, image_size: int, channels: int = 1, width: int = 32, feature_dim: int = 64,
                 num_classes: int = 10):
        super().__init__()
        self.image_size, self.channels = int(image_size), int(channels)
        self.trunk = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(),
        )
        spatial = math.ceil(math.ceil(image_size / 2) / 2)
        self.feature_layer = nn.Sequential(nn.Linear(2 * width * spatial * spatial, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_layer(self.trunk(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            images = torch.as_tensor(images)
        if images.ndim != 4 or tuple(images.shape[1:]) != (self.channels, self.image_size, self.image_size):
            raise ValueError(f"images must have shape [N, {self.channels}, {self.image_size}, {self.image_size}], "
                             f"got {tuple(images.shape)}")
        return images.detach().to(device="cpu", dtype=torch.float32)

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 512) -> Tuple[torch.Tensor, torch.Tensor]:
        """(features [N, feature_dim], class probabilities [N, 10]) of images in [-1, 1]."""
        images = self._check_images(images)
        was_training = self.training
        self.eval()
        feats, probs = [], []
        for chunk in images.split(batch_size):
            f = self.features(chunk)
            feats.append(f)
            probs.append(torch.softmax(self.head(f), dim=1))
        self.train(was_training)
        return torch.cat(feats), torch.cat(probs)


def _random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with the background (-1)."""
    if max_shift <= 0:
        return images
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (max_shift,) * 4, value=-1.0)
    shifts = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    rows = shifts[:, 0, None] + torch.arange(h)  # [n, h]
    cols = shifts[:, 1, None] + torch.arange(w)  # [n, w]
    batch = torch.arange(n)[:, None, None]
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def train_digit_classifier(images: torch.Tensor, labels: torch.Tensor, config: ClassifierConfig = ClassifierConfig()
                           ) -> DigitClassifier:
    """Train a :class:`DigitClassifier` on images [N, C, H, H] in [-1, 1] and int labels [N].

    Deterministic for a given config and data: initialisation, shuffling and augmentation all
    draw from generators seeded by ``config.seed``, and training runs on one CPU thread, so the
    order of floating-point reductions does not depend on the machine's core count (one thread
    is also the fastest setting for a network this small on a busy machine).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_classifier(images, labels, config)
    finally:
        torch.set_num_threads(threads)


def _train_classifier(images, labels, config: ClassifierConfig) -> DigitClassifier:
    images = torch.as_tensor(images, dtype=torch.float32)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if images.ndim != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"images must have shape [N, C, H, H], got {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape [{images.shape[0]}], got {tuple(labels.shape)}")
    num_classes = int(labels.max()) + 1
    # The global RNG seeds layer initialisation; fork it so the caller's stream is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = DigitClassifier(images.shape[2], images.shape[1], config.width, config.feature_dim,
                                max(num_classes, 10))
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(images.shape[0] / config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(images.shape[0], generator=generator)
        for batch in order.split(config.batch_size):
            x = _random_shift(images[batch], config.max_shift, generator)
            loss = nn.functional.cross_entropy(model(x), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    return model


def default_cache_dir() -> Path:
    """``$FASTDDPM_CACHE``, else ``$XDG_CACHE_HOME/fastddpm``, else ``~/.cache/fastddpm``."""
    explicit = os.environ.get("FASTDDPM_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastddpm"


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _training_digits(images, labels) -> Tuple[torch.Tensor, torch.Tensor]:
    if (images is None) != (labels is None):
        raise ValueError("images and labels must be given together")
    if images is None:
        from .data import load_digits

        images, labels = load_digits("train")
    return torch.as_tensor(images, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.int64)


def digit_classifier_cache_path(
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    *,
    config: ClassifierConfig = ClassifierConfig(),
    images: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
) -> Path:
    """The file :func:`load_digit_classifier` reads or writes for these arguments."""
    if not isinstance(config, ClassifierConfig):
        raise TypeError(f"config must be a ClassifierConfig, got {type(config).__name__}")
    images, labels = _training_digits(images, labels)
    key = config.key(_digest(images, labels))
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"digit_classifier_{key}.pt"


def load_digit_classifier(
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    *,
    config: ClassifierConfig = ClassifierConfig(),
    images: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    retrain: bool = False,
) -> DigitClassifier:
    """The digit classifier for ``config``, trained on first use and cached on disk.

    Trains on ``images``/``labels`` when given, else on ``fastddpm.data.load_digits("train")``.
    The cache file name hashes the config and the training data, so a change to either trains a
    fresh classifier. ``cache_dir=False`` disables caching. The cache is written atomically; if
    writing it fails, a warning says so and the freshly trained classifier is returned anyway.
    """
    if not isinstance(config, ClassifierConfig):
        raise TypeError(f"config must be a ClassifierConfig, got {type(config).__name__}")
    images, labels = _training_digits(images, labels)
    path = None
    if cache_dir is not False:
        path = digit_classifier_cache_path(cache_dir, config=config, images=images, labels=labels)
    if path is not None and path.is_file() and not retrain:
        model = DigitClassifier(images.shape[2], images.shape[1], config.width, config.feature_dim,
                                max(int(labels.max()) + 1, 10))
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    model = train_digit_classifier(images, labels, config)
    if path is not None:
        from .outputs import atomic_write, describe_os_error

        state = model.state_dict()
        try:  # atomically: concurrent evaluations never read a half-written file
            atomic_write(path, lambda temporary: torch.save(state, temporary))
        except OSError as error:  # a cache only saves time: keep the classifier, say so
            warnings.warn(f"could not cache the digit classifier in {str(path)!r} ({describe_os_error(error)}); "
                          "continuing without the cache", RuntimeWarning, stacklevel=2)
    return model


def classifier_statistics(probabilities: torch.Tensor, labels: Optional[torch.Tensor] = None) -> Dict[str, object]:
    """Class histogram, mean max-probability and (with ``labels``) accuracy of softmax outputs."""
    if probabilities.ndim != 2:
        raise ValueError(f"probabilities must be [N, num_classes], got shape {tuple(probabilities.shape)}")
    predicted = probabilities.argmax(dim=1)
    stats: Dict[str, object] = {
        "class_histogram": torch.bincount(predicted, minlength=probabilities.shape[1]).tolist(),
        "mean_max_probability": float(probabilities.max(dim=1).values.mean()),
    }
    if labels is not None:
        stats["accuracy"] = float((predicted == torch.as_tensor(labels)).double().mean())
    return stats
