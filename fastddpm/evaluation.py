"""Evaluation: the DDPM variational bound in bits/dim and sample-quality metrics (the command
``fastddpm eval`` is in :mod:`fastddpm.commands.eval`).

The bound is the paper's (Ho et al. 2020, eq. 5) for the discrete data x_0:

    L = L_T + sum_{t>=2} L_{t-1} + L_0
    L_T     = KL(q(x_T | x_0) || N(0, I))
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))     (both Gaussian: closed form)
    L_0     = -log p(x_0 | x_1)                                  (discretized Gaussian, 256 bins)

each in nats summed over dimensions, reported in bits/dim (divided by ``log(2) * dims``). The
expectation over x_t is one Monte Carlo draw per (image, t), from a Philox stream keyed by
``seed`` and t, so the result does not depend on how the work is batched.
"""
from __future__ import annotations

import dataclasses
import math
import time
import statistics
from typing import Any, Dict, Sequence

import torch

from . import reference
from .losses import discretized_gaussian_log_likelihood, normal_kl, p_mean_variance, posterior_mean_variance
from .checks import check_int
from .outputs import require_finite
from .schedule import NoiseSchedule
from .step import PREDICTION_TYPES, VARIANCE_TYPES, check_choice

__all__ = [
    "BoundResult",
    "variational_bound",
    "discretized_gaussian_log_likelihood",
    "snap_to_8bit",
    "evaluate_digit_samples",
    "pool_digit_quality",
    "KID_SUBSETS",
    "evaluate_toy_samples",
]

NUM_BINS = 256  # the decoder's bins: x_0 is treated as 8-bit data scaled to [-1, 1]


# ---------------------------------------------------------------------------------------------
# Gaussian pieces of the bound
# ---------------------------------------------------------------------------------------------
def snap_to_8bit(x: torch.Tensor) -> torch.Tensor:
    """Round values in [-1, 1] to the nearest of the 256 levels the decoder is defined on."""
    return torch.round((x.clamp(-1.0, 1.0) + 1.0) * ((NUM_BINS - 1) / 2.0)) * (2.0 / (NUM_BINS - 1)) - 1.0


# ---------------------------------------------------------------------------------------------
# the bound
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class BoundResult:
    """The variational bound of a set of images, in bits/dim.

    ``terms[i]`` is the mean over images of the term at schedule index ``i`` (model timestep
    ``timesteps[i]``): ``terms[0]`` is the decoder L_0, ``terms[i]`` for i >= 1 is the KL term
    L_i of the paper. ``prior`` is L_T. ``per_image`` is every image's total.
    """

    bits_per_dim: float
    prior: float
    decoder: float
    diffusion: float
    terms: torch.Tensor
    x0_mse: torch.Tensor
    per_image: torch.Tensor
    timesteps: torch.Tensor
    num_images: int
    dims: int
    seconds: float

    def to_dict(self, with_terms: bool = True) -> Dict[str, Any]:
        out: Dict[str, Any] = dict(bits_per_dim=self.bits_per_dim, prior=self.prior, decoder=self.decoder,
                                   diffusion=self.diffusion, num_images=self.num_images, dims=self.dims,
                                   per_image_std=float(self.per_image.std()) if self.num_images > 1 else 0.0,
                                   seconds=self.seconds)
        if with_terms:
            out.update(terms=self.terms.tolist(), x0_mse=self.x0_mse.tolist(), timesteps=self.timesteps.tolist())
        return out


def _model_device_dtype(model, x0: torch.Tensor):
    """Where and in which dtype to call the model: its parameters', else x0's (plain callables)."""
    params = getattr(model, "parameters", None)
    param = next(iter(params()), None) if callable(params) else None
    if param is None:
        return x0.device, x0.dtype
    return param.device, (param.dtype if param.dtype.is_floating_point else torch.float32)


def _call_model(model, x_t: torch.Tensor, model_t: torch.Tensor, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The model's outputs for (x_t, t) in calls of ``batch_size``; a diffusers output's ``.sample``."""
    outputs = []
    for x, t in zip(x_t.split(batch_size), model_t.split(batch_size)):
        output = model(x.to(dtype), t)
        outputs.append(output if isinstance(output, torch.Tensor) else output.sample)
    return torch.cat(outputs).to(torch.float64)


@torch.no_grad()
def variational_bound(
    model,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
    clip_denoised: bool = True,
    seed: int = 0,
    batch_size: int = 2048,
    progress: bool = False,
) -> BoundResult:
    """Negative ELBO of ``x0`` (images [N, ...] in [-1, 1]) under a DDPM, in bits/dim.

    ``model(x_t, t)`` is called with the trained timesteps ``schedule.timesteps[i]`` (so a
    respaced schedule gives the bound of the shorter chain); it returns the prediction named by
    ``prediction_type`` (a tensor, or an object with a ``.sample`` tensor such as a diffusers
    ``UNet2DModel``'s output), followed along dim 1 by the variance channels for learned variances.
    The reverse mean is the posterior mean at the predicted x_0 (clipped to [-1, 1] with
    ``clip_denoised``, as in sampling). Mean and variance of every reverse step come from
    :func:`fastddpm.losses.p_mean_variance`, the decoder's included: for ``fixed_small`` its
    variance is the clipped posterior variance (beta~_1 is 0, so beta~_2 stands in, as in the DDPM
    code), for ``fixed_large`` it is beta_1, for learned variances the model's output at t = 1.

    ``x0`` is snapped to the 256 levels the decoder is defined on. Each model call evaluates
    up to ``batch_size`` (image, t) pairs, stacking many t per call. Returns a
    :class:`BoundResult` with the total, L_T, L_0, the sum of the KL terms and the per-t terms.
    """
    if not callable(model):
        raise TypeError(f"model must be callable as model(x_t, t), got {type(model).__name__}")
    if not isinstance(x0, torch.Tensor):
        raise TypeError(f"x0 must be a tensor, got {type(x0).__name__}")
    if x0.ndim < 2 or x0.shape[0] < 1 or not x0.dtype.is_floating_point:
        raise ValueError(f"x0 must be a floating tensor [N, ...] with N >= 1, got {x0.dtype} {tuple(x0.shape)}")
    if not torch.isfinite(x0).all() or x0.abs().max() > 1.0 + 1e-6:
        raise ValueError("x0 must hold finite values in [-1, 1]")
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    check_choice("variance_type", variance_type, VARIANCE_TYPES)
    schedule.check_prediction_type(prediction_type)
    check_int("batch_size", batch_size, 1)
    check_int("seed", seed, 0)

    start_time = time.perf_counter()
    device, model_dtype = _model_device_dtype(model, x0)
    was_training = getattr(model, "training", None)
    if was_training:
        model.eval()
    x0 = snap_to_8bit(x0.detach().to(device=device, dtype=torch.float64))
    num_images = x0.shape[0]
    dims = x0[0].numel()
    nats_to_bpd = 1.0 / (math.log(2.0) * dims)
    num_steps = schedule.num_timesteps

    terms = torch.zeros(num_images, num_steps, dtype=torch.float64, device=device)
    x0_mse = torch.zeros(num_images, num_steps, dtype=torch.float64, device=device)
    steps_per_chunk = max(1, batch_size // num_images)
    chunks = range(0, num_steps, steps_per_chunk)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="bound", unit="chunk")
    try:
        for first in chunks:
            index = torch.arange(first, min(first + steps_per_chunk, num_steps), device=device)
            t = index.repeat_interleave(num_images)  # pairs ordered (t, image)
            x_start = x0.repeat((index.numel(),) + (1,) * (x0.ndim - 1))
            noise = torch.cat([reference.philox_randn(x0.shape, seed, int(i), device=device, dtype=torch.float64)
                               for i in index.tolist()])
            x_t, _ = reference.q_sample(x_start, t, schedule, noise)
            output = _call_model(model, x_t, schedule.timesteps.to(device)[t], batch_size, model_dtype)
            model_mean, model_logvar, x0_pred = p_mean_variance(
                output, x_t, t, schedule, prediction_type=prediction_type, variance_type=variance_type,
                clip_denoised=clip_denoised)
            posterior_mean, _, posterior_logvar = posterior_mean_variance(schedule, x_start, x_t, t)
            nats = normal_kl(posterior_mean, posterior_logvar, model_mean, model_logvar).flatten(1).sum(1)
            at_zero = t == 0
            if at_zero.any():
                log_likelihood = discretized_gaussian_log_likelihood(
                    x_start[at_zero], model_mean[at_zero], 0.5 * model_logvar[at_zero])
                nats[at_zero] = -log_likelihood.flatten(1).sum(1)
            terms[:, index] = (nats * nats_to_bpd).reshape(index.numel(), num_images).T
            x0_mse[:, index] = ((x0_pred - x_start) ** 2).flatten(1).mean(1).reshape(index.numel(), num_images).T
    finally:
        if was_training:
            model.train()

    # L_T: q(x_T | x_0) = N(sqrt(alpha_bar_T) x_0, 1 - alpha_bar_T) against N(0, I).
    prior_nats = normal_kl(float(schedule.sqrt_alphas_cumprod[-1]) * x0,
                           float(schedule.log_one_minus_alphas_cumprod[-1]) * torch.ones_like(x0),
                           torch.zeros_like(x0), torch.zeros_like(x0)).flatten(1).sum(1)
    prior = prior_nats * nats_to_bpd
    per_image = terms.sum(1) + prior
    require_finite(per_image, "the bound's terms (the model's outputs?)")
    mean_terms = terms.mean(0)
    return BoundResult(
        bits_per_dim=float(per_image.mean()),
        prior=float(prior.mean()),
        decoder=float(mean_terms[0]),
        diffusion=float(mean_terms[1:].sum()),
        terms=mean_terms.cpu(),
        x0_mse=x0_mse.mean(0).cpu(),
        per_image=per_image.cpu(),
        timesteps=schedule.timesteps.clone(),
        num_images=num_images,
        dims=dims,
        seconds=time.perf_counter() - start_time,
    )


# ---------------------------------------------------------------------------------------------
# sample quality
# ---------------------------------------------------------------------------------------------
# Subsets of the jackknife behind the KID's standard error (fastddpm.metrics.kernel_distance).
KID_SUBSETS = 10
# Draws of training digits averaged into one seed's FD floor.
FLOOR_DRAWS = 8

# Seeds of the "fresh" toy draws, far from the small seeds training uses.
_TOY_REFERENCE_SEED = 1_000_000


def digit_fd_floors(train_features: torch.Tensor, heldout_features: torch.Tensor, n: int,
                    generator: torch.Generator):
    """The FD floors of ``n`` samples: ``(floor, floor_with_replacement, method)``, each the mean over
    :data:`FLOOR_DRAWS` draws of training features against the held-out ones; ``floor`` from N
    distinct training digits (N i.i.d. draws of the data distribution, as a model that generalises
    gives), with replacement only where N exceeds the training digits. The first use of
    ``generator`` in :func:`evaluate_digit_samples`, so that a seed's floors can be recomputed
    alone (``benchmarks/refloor.py``)."""
    from .metrics import frechet_distance

    n_train = train_features.shape[0]
    with_replacement = torch.randint(n_train, (FLOOR_DRAWS, n), generator=generator)
    def mean_fd(index_sets):
        return sum(frechet_distance(train_features[index], heldout_features) for index in index_sets) / FLOOR_DRAWS

    replaced = mean_fd(with_replacement)
    if n > n_train:  # no N distinct digits: the same draws serve both floors
        return replaced, replaced, "with replacement (more samples than training digits)"
    distinct = [torch.randperm(n_train, generator=generator)[:n] for _ in range(FLOOR_DRAWS)]
    return mean_fd(distinct), replaced, "without replacement"


def evaluate_digit_samples(
    samples: torch.Tensor,
    *,
    seed: int = 0,
    classifier=None,
    cache_dir=None,
) -> Dict[str, Any]:
    """Quality of digit samples [N, 1, S, S] in [-1, 1] measured with the project's classifier.

    ``fd``: Frechet distance between the classifier features of the samples and of the 300
    held-out digits; ``fd_floor``: the same for N distinct training digits (a random subset drawn
    with ``seed``, without replacement; the mean of :data:`FLOOR_DRAWS` subsets) against the
    held-out digits, i.e. what a model whose samples are fresh draws of the data distribution
    scores at that size (docs/evaluation.md, "Which real-data floor"); where N exceeds the 1497
    training digits the draws are with replacement (``fd_floor_method`` says which).
    ``fd_floor_with_replacement``: N training digits drawn with replacement, the floor reported
    before, beside it: duplicates raise FD, so it is what a model that reproduces training digits
    scores, and it sits above the fresh-draw floor (by ~13 % at N = 1000). ``kid`` /
    ``kid_se`` and ``kid_floor`` / ``kid_floor_se``: the kernel distance
    (:func:`fastddpm.metrics.kernel_distance`, :data:`KID_SUBSETS` disjoint subsets drawn with
    ``seed``) of the samples and of ``min(N, 1497)`` distinct training digits against the held-out
    digits, with standard errors. Also the classifier's accuracy on the
    held-out digits, the class histogram and mean max-probability of the samples (and, for
    reference, of the held-out digits). Memorisation: ``nearest_train_distance``, the median L2
    distance (pixels in [-1, 1]) of a sample to its nearest training digit, beside
    ``heldout_nearest_train_distance``, the same for the held-out digits, and
    ``near_copy_fraction``, the fraction of samples closer to a training digit than 99 % of the
    held-out digits are (about 0.01 for a model that does not copy). :func:`pool_digit_quality`
    pools several seeds.
    """
    from .data import load_digits
    from .metrics import classifier_statistics, frechet_distance, kernel_distance, load_digit_classifier

    if not isinstance(samples, torch.Tensor) or samples.ndim != 4 or samples.shape[1] != 1 \
            or samples.shape[2] != samples.shape[3]:
        got = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise ValueError(f"samples must be digit images [N, 1, S, S], got {got}")
    if samples.shape[0] < 2:
        raise ValueError(f"samples must hold at least 2 images, got {samples.shape[0]}")
    require_finite(samples, "samples")
    check_int("seed", seed, 0)
    image_size = samples.shape[-1]
    train_images, train_labels = load_digits("train", image_size=image_size)
    heldout_images, heldout_labels = load_digits("test", image_size=image_size)
    if classifier is None:
        classifier = load_digit_classifier(cache_dir, images=train_images, labels=train_labels)
    heldout_features, heldout_probs = classifier.embed(heldout_images)
    sample_features, sample_probs = classifier.embed(samples.float().cpu())
    all_train_features, _ = classifier.embed(train_images)
    generator = torch.Generator().manual_seed(seed)
    # The FD floor: N distinct training digits against the held-out ones. The training digits are
    # an i.i.d. sample of the data distribution, so a random subset of them is N i.i.d. draws too
    # (averaged over the training set's own draw), exactly what a model that generalises produces;
    # drawing with replacement adds duplicates, which is what a model that memorises produces, and
    # raises FD at the same N. A Gaussian simulation where the answer is known agrees
    # (benchmarks/floor_simulation.py, docs/evaluation.md). The mean over FLOOR_DRAWS subsets.
    # KID's floor takes a subset without replacement too (repeated digits would bias its unbiased
    # estimator).
    fd_floor, fd_floor_replaced, floor_method = digit_fd_floors(all_train_features, heldout_features,
                                                                samples.shape[0], generator)
    kid_floor_size = min(samples.shape[0], train_images.shape[0])
    subset = torch.randperm(train_images.shape[0], generator=generator)[:kid_floor_size]
    train_features = all_train_features[subset]
    heldout_stats = classifier_statistics(heldout_probs, heldout_labels)
    sample_stats = classifier_statistics(sample_probs)
    # KID on features scaled to unit mean square on the training digits (a constant of the
    # classifier), so that x.y/d is O(1) as for the Inception features KID was defined on; the raw
    # ReLU features have a mean square of about 35, where the cubic kernel is all noise.
    scale = all_train_features.double().pow(2).mean().sqrt()
    subsets = min(KID_SUBSETS, samples.shape[0] // 2)
    kid = kernel_distance(sample_features.double() / scale, heldout_features.double() / scale,
                          num_subsets=subsets, seed=seed)
    kid_floor = kernel_distance(train_features.double() / scale, heldout_features.double() / scale,
                                num_subsets=subsets, seed=seed)
    # Memorisation: a model that copies training digits would score the FD floor exactly, so the
    # pixel distance of each sample to its nearest training digit is compared with that of the
    # held-out digits (real digits the model never saw).
    train_flat = train_images.flatten(1).double()
    nearest_sample = torch.cdist(samples.detach().cpu().double().flatten(1), train_flat).min(dim=1).values
    nearest_heldout = torch.cdist(heldout_images.flatten(1).double(), train_flat).min(dim=1).values
    near_copy = torch.quantile(nearest_heldout, 0.01)
    return dict(
        fd=frechet_distance(sample_features, heldout_features),
        fd_floor=fd_floor,
        fd_floor_method=floor_method,
        fd_floor_with_replacement=fd_floor_replaced,
        kid=kid.value,
        kid_se=kid.standard_error,
        kid_floor=kid_floor.value,
        kid_floor_se=kid_floor.standard_error,
        kid_subsets=subsets,
        num_samples=int(samples.shape[0]),
        num_heldout=int(heldout_images.shape[0]),
        floor_size=int(samples.shape[0]),
        kid_floor_size=int(kid_floor_size),
        class_histogram=sample_stats["class_histogram"],
        mean_max_probability=sample_stats["mean_max_probability"],
        heldout_accuracy=heldout_stats["accuracy"],
        heldout_class_histogram=heldout_stats["class_histogram"],
        heldout_mean_max_probability=heldout_stats["mean_max_probability"],
        fraction_outside_unit_range=float((samples.abs() > 1.0).double().mean()),
        nearest_train_distance=float(nearest_sample.median()),
        heldout_nearest_train_distance=float(nearest_heldout.median()),
        near_copy_fraction=float((nearest_sample < near_copy).double().mean()),
    )


def pool_digit_quality(per_seed: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Pool :func:`evaluate_digit_samples` results of several seeds (same sampler, same sample
    count) into the figures decisions are made on.

    - ``fd_ratio``: mean FD over mean floor (the floors drawn with the same seeds), with the
      per-seed ratios' mean and standard deviation (``fd_ratio_mean``, ``fd_ratio_sd``); ``fd`` and
      ``fd_floor`` as mean and sd too.
    - ``kid`` / ``kid_floor``: means over seeds with standard errors sqrt(sum se^2) / k;
      ``kid_excess`` = kid - kid_floor and ``kid_excess_se`` (the two errors in quadrature: they
      share the held-out digits, so this treats them as independent, a slight over-estimate where
      that shared part is positively correlated); ``kid_excess_in_se`` = the excess in those errors.
    - ``mean_max_probability`` (mean, sd); ``class_histogram`` summed over seeds and
      ``class_deviation``, the largest relative deviation of a class count from uniform;
      ``nearest_train_distance`` and ``near_copy_fraction`` averaged over seeds.
    """
    if not per_seed:
        raise ValueError("per_seed must hold at least one result")
    k = len(per_seed)

    def mean_sd(key):
        values = [float(result[key]) for result in per_seed]
        return statistics.fmean(values), (statistics.stdev(values) if k > 1 else 0.0)

    def pooled_se(key):
        return math.sqrt(sum(float(result[key]) ** 2 for result in per_seed)) / k

    fd, fd_sd = mean_sd("fd")
    floor, floor_sd = mean_sd("fd_floor")
    ratios = [result["fd"] / result["fd_floor"] for result in per_seed]
    # the floor reported before (with replacement), beside the headline one; absent in old results
    replaced = [result.get("fd_floor_with_replacement") for result in per_seed]
    floor_replaced = statistics.fmean(replaced) if all(value is not None for value in replaced) else None
    kid, kid_se = mean_sd("kid")[0], pooled_se("kid_se")
    kid_floor, kid_floor_se = mean_sd("kid_floor")[0], pooled_se("kid_floor_se")
    excess_se = math.hypot(kid_se, kid_floor_se)
    histogram = [sum(counts) for counts in zip(*(result["class_histogram"] for result in per_seed))]
    expected = sum(histogram) / len(histogram)
    confidence, confidence_sd = mean_sd("mean_max_probability")
    return dict(
        seeds=k, num_samples=int(per_seed[0]["num_samples"]),
        fd=fd, fd_sd=fd_sd, fd_floor=floor, fd_floor_sd=floor_sd, fd_ratio=fd / floor,
        fd_floor_with_replacement=floor_replaced,
        fd_ratio_with_replacement=fd / floor_replaced if floor_replaced else None,
        fd_ratio_mean=statistics.fmean(ratios), fd_ratio_sd=statistics.stdev(ratios) if k > 1 else 0.0,
        kid=kid, kid_se=kid_se, kid_floor=kid_floor, kid_floor_se=kid_floor_se,
        kid_excess=kid - kid_floor, kid_excess_se=excess_se,
        kid_excess_in_se=(kid - kid_floor) / excess_se if excess_se > 0 else float("inf"),
        mean_max_probability=confidence, mean_max_probability_sd=confidence_sd,
        class_histogram=histogram, class_deviation=max(abs(count / expected - 1.0) for count in histogram),
        heldout_mean_max_probability=per_seed[0]["heldout_mean_max_probability"],
        heldout_accuracy=per_seed[0]["heldout_accuracy"],
        fraction_outside_unit_range=mean_sd("fraction_outside_unit_range")[0],
        nearest_train_distance=mean_sd("nearest_train_distance")[0],
        heldout_nearest_train_distance=per_seed[0]["heldout_nearest_train_distance"],
        near_copy_fraction=mean_sd("near_copy_fraction")[0],
    )


def evaluate_toy_samples(samples: torch.Tensor, name: str, *, seed: int = 0,
                         num_projections: int = 512) -> Dict[str, Any]:
    """Distance of 2-D samples [N, 2] to a fresh draw of ``name`` (``fastddpm.data.toy2d``).

    Sliced Wasserstein-2 and energy distance to N fresh points; the floors are the same
    distances between two independent fresh draws of N points (what a perfect sampler scores).
    """
    from .data import toy2d
    from .metrics import energy_distance, sliced_wasserstein_distance

    if not isinstance(samples, torch.Tensor) or samples.ndim != 2 or samples.shape[1] != 2 or samples.shape[0] < 2:
        got = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise ValueError(f"samples must be 2-D points [N, 2] with N >= 2, got {got}")
    check_int("seed", seed, 0)
    n = samples.shape[0]
    reference_points = toy2d(name, n, seed=_TOY_REFERENCE_SEED + 2 * seed)
    other_points = toy2d(name, n, seed=_TOY_REFERENCE_SEED + 2 * seed + 1)
    samples = samples.detach().cpu().double()
    projections = dict(num_projections=num_projections, seed=seed)
    return dict(
        sliced_wasserstein=sliced_wasserstein_distance(samples, reference_points, **projections),
        sliced_wasserstein_floor=sliced_wasserstein_distance(other_points, reference_points, **projections),
        energy_distance=energy_distance(samples, reference_points),
        energy_distance_floor=energy_distance(other_points, reference_points),
        num_samples=int(n),
    )
