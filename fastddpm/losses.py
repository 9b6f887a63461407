"""Training losses and the pieces of the variational bound.

L_simple (Ho et al. eq. 14) is the mean squared error between the model's prediction and its
target. The bound's per-timestep term L_t is the KL between the true posterior
q(x_{t-1} | x_t, x_0) and the model's reverse step p(x_{t-1} | x_t) for t > 0, and the negative
log-likelihood of x_0 under the discretized Gaussian decoder for t = 0 (Ho et al. section 3.3).
``normal_kl`` and ``discretized_gaussian_log_likelihood`` are the building blocks; ``vlb_term``
puts them together per sample in bits per dimension.

``t`` everywhere is an int64 tensor [B] of indices into ``schedule``.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from . import reference
from .reference import predict_x0
from .step import LEARNED_VARIANCE_TYPES, PREDICTION_TYPES, VARIANCE_TYPES, check_choice
from .schedule import NoiseSchedule

__all__ = [
    "LOSS_TYPES", "normal_kl", "discretized_gaussian_log_likelihood", "extract", "posterior_mean_variance",
    "p_mean_variance", "vlb_term", "training_target", "training_losses",
]

# simple: L_simple; hybrid: L_simple + vlb_weight * T * L_t with the mean frozen in the L_t term
# (Nichol & Dhariwal, learned variance); vlb: T * L_t, an unbiased estimate of the bound.
LOSS_TYPES = ("simple", "hybrid", "vlb")


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats (broadcasts)."""
    tensor = next(x for x in (mean1, logvar1, mean2, logvar2) if isinstance(x, torch.Tensor))
    logvar1, logvar2 = (torch.as_tensor(v, dtype=tensor.dtype, device=tensor.device) for v in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def log_normal_cdf_difference(upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """log(Phi(upper) - Phi(lower)) for upper > lower, accurate in both tails.

    In the upper tail both CDFs round to 1, so the reflection Phi(b) - Phi(a) = Phi(-a) - Phi(-b)
    is used there; the difference itself is taken in log space so tiny bin masses keep their
    relative precision.
    """
    flip = lower > 0
    a = torch.where(flip, -upper, lower)
    b = torch.where(flip, -lower, upper)
    log_b = torch.special.log_ndtr(b)
    log_a = torch.special.log_ndtr(a)
    # log(e^log_b - e^log_a) = log_b + log(-expm1(log_a - log_b)), with log_a <= log_b.
    return log_b + torch.log(-torch.expm1((log_a - log_b).clamp_max(0.0)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor, *, num_bins: int = 256
) -> torch.Tensor:
    """Elementwise log-probability (nats) of data ``x`` in [-1, 1] under a Gaussian discretized
    into ``num_bins`` equal bins (bin width 2 / (num_bins - 1), the outer bins reaching to
    +-infinity, so the probabilities of the levels sum to one), with mean ``means`` and standard
    deviation ``exp(log_scales)``.

    ``x`` should sit on the bin centres (e.g. 8-bit images scaled to [-1, 1]).
    """
    if not isinstance(num_bins, int) or num_bins < 2:
        raise ValueError(f"num_bins must be an int >= 2, got {num_bins!r}")
    try:
        x, means, log_scales = torch.broadcast_tensors(x, means, log_scales)
    except RuntimeError as error:
        raise ValueError(f"x, means and log_scales must broadcast together, got shapes {tuple(x.shape)}, "
                         f"{tuple(means.shape)} and {tuple(log_scales.shape)}") from error
    half_bin = 1.0 / (num_bins - 1)
    inv_std = torch.exp(-log_scales)
    upper = (x - means + half_bin) * inv_std
    lower = (x - means - half_bin) * inv_std
    infinity = torch.full_like(upper, math.inf)
    upper = torch.where(x > 1.0 - half_bin, infinity, upper)  # the last level reaches +inf
    lower = torch.where(x < -1.0 + half_bin, -infinity, lower)  # the first level from -inf
    return log_normal_cdf_difference(upper, lower)


def extract(schedule: NoiseSchedule, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Coefficient ``name`` of ``schedule`` at indices ``t`` [B], shaped to broadcast against ``like``."""
    return reference.gather_coefficient(schedule, name, t, like)


def posterior_mean_variance(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
    mean = extract(schedule, "posterior_mean_coef1", t, x_t) * x0 + extract(schedule, "posterior_mean_coef2", t, x_t) * x_t
    variance = extract(schedule, "posterior_variance", t, x_t)
    log_variance = extract(schedule, "posterior_log_variance_clipped", t, x_t)
    return mean, variance.expand_as(x_t), log_variance.expand_as(x_t)


def _split(model_output: torch.Tensor, x_t: torch.Tensor, variance_type: str):
    if variance_type in LEARNED_VARIANCE_TYPES:
        if model_output.shape[1] != 2 * x_t.shape[1]:
            raise ValueError(f"with variance_type={variance_type!r} the model output needs {2 * x_t.shape[1]} "
                             f"channels, got {model_output.shape[1]}")
        return model_output[:, : x_t.shape[1]], model_output[:, x_t.shape[1]:]
    if model_output.shape != x_t.shape:
        raise ValueError(f"model output must have the shape of x_t {tuple(x_t.shape)}, got {tuple(model_output.shape)}")
    return model_output, None


def p_mean_variance(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
    clip_denoised: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, log-variance and predicted x_0 of the model's reverse step p(x_{t-1} | x_t).

    Fixed variances use the schedule's clipped posterior log-variance (``fixed_small``,
    ``fixed_small_log``) or log beta_t (``fixed_large``); ``learned`` outputs the log-variance;
    ``learned_range`` interpolates between the two with the model's value v in [-1, 1].
    """
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    check_choice("variance_type", variance_type, VARIANCE_TYPES)
    prediction, variance_values = _split(model_output, x_t, variance_type)
    min_log = extract(schedule, "posterior_log_variance_clipped", t, x_t)
    max_log = extract(schedule, "log_betas", t, x_t)
    if variance_type in ("fixed_small", "fixed_small_log"):
        log_variance = min_log.expand_as(x_t)
    elif variance_type == "fixed_large":
        log_variance = max_log.expand_as(x_t)
    elif variance_type == "learned":
        log_variance = variance_values
    else:
        fraction = (variance_values + 1.0) / 2.0
        log_variance = fraction * max_log + (1.0 - fraction) * min_log
    pred_x0 = predict_x0(prediction, t, x_t, schedule, prediction_type, 1.0 if clip_denoised else None)
    mean, _, _ = posterior_mean_variance(schedule, pred_x0, x_t, t)
    return mean, log_variance, pred_x0


def vlb_term(
    model_output: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
    num_bins: int = 256,
) -> torch.Tensor:
    """L_t per sample [B] in bits per dimension: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) where
    t > 0, the decoder's -log p(x_0 | x_1) where t == 0 (mean over all non-batch dimensions)."""
    true_mean, _, true_log_variance = posterior_mean_variance(schedule, x0, x_t, t)
    mean, log_variance, _ = p_mean_variance(model_output, x_t, t, schedule, prediction_type=prediction_type,
                                            variance_type=variance_type)
    reduce_dims = tuple(range(1, x0.ndim))
    kl = normal_kl(true_mean, true_log_variance, mean, log_variance).mean(dim=reduce_dims) / math.log(2.0)
    decoder_nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_variance, num_bins=num_bins)
    decoder_nll = decoder_nll.mean(dim=reduce_dims) / math.log(2.0)
    return torch.where(t.to(kl.device) == 0, decoder_nll, kl)


def training_target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule,
                    prediction_type: str) -> torch.Tensor:
    """What the model learns to output: the noise, x_0, or v = sqrt(a) eps - sqrt(1 - a) x_0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return (extract(schedule, "sqrt_alphas_cumprod", t, x0) * noise
                - extract(schedule, "sqrt_one_minus_alphas_cumprod", t, x0) * x0)
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)  # raises
    raise AssertionError(prediction_type)


def training_losses(
    model_output: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    loss_type: str = "simple",
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
    vlb_weight: float = 0.001,
    num_bins: int = 256,
) -> Tuple[torch.Tensor, dict]:
    """Per-sample loss [B] and its parts (``mse``, ``vlb`` in bits/dim, detached).

    ``simple``: the MSE of the prediction. ``hybrid`` (learned variance): MSE plus
    ``vlb_weight * T * L_t`` with the predicted mean frozen, so L_t trains only the variance
    (lambda = 0.001 at T = 1000 is Nichol & Dhariwal's setting). ``vlb``: ``T * L_t`` with
    gradients through mean and variance, an unbiased estimate of the bound in bits/dim.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    learned = variance_type in LEARNED_VARIANCE_TYPES
    if loss_type == "simple" and learned:
        raise ValueError(f"variance_type={variance_type!r} needs loss_type 'hybrid' or 'vlb': "
                         "L_simple does not train the variance")
    if loss_type == "hybrid" and not learned:
        raise ValueError("loss_type='hybrid' needs a learned variance (variance_type 'learned' or 'learned_range')")
    model_output = model_output.float()
    prediction, variance_values = _split(model_output, x_t, variance_type)
    reduce_dims = tuple(range(1, x0.ndim))
    parts = {}
    mse = (prediction - training_target(x0, noise, t, schedule, prediction_type)).pow(2).mean(dim=reduce_dims)
    parts["mse"] = mse.detach()
    if loss_type == "simple":
        return mse, parts
    if loss_type == "hybrid":
        frozen = torch.cat([prediction.detach(), variance_values], dim=1)
    else:
        frozen = model_output
    vlb = vlb_term(frozen, x0, x_t, t, schedule, prediction_type=prediction_type, variance_type=variance_type,
                   num_bins=num_bins)
    parts["vlb"] = vlb.detach()
    scaled = schedule.num_timesteps * vlb
    if loss_type == "hybrid":
        return mse + vlb_weight * scaled, parts
    return scaled, parts
