"""The fused reverse step: one pass over x_t and the model output computes x_0 (clipped), the
posterior mean or the DDIM update, the standard deviation and the noise, and writes x_{t-1}
(in place allowed: every element is read before it is written by the same program) and, when
asked, x_0. DDPM and DDIM share the kernel through the ``SAMPLER`` constexpr.

Each program covers ``BLOCK`` elements as rows of four (``noise.layout_2d``): one Philox call
draws a row's four normals, and the row's loads stay 128-bit wide in float32.
"""
import torch
import triton
import triton.language as tl

from fastddpm.schedule import table_row
from fastddpm.step import PREDICTION_TYPES, VARIANCE_TYPES

from .common import EPSILON, ROW_SQRT_1M_AB, ROW_SQRT_AB, SAMPLE, _coef, predict_x0
from .noise import DEFAULT_BLOCK, DEFAULT_NUM_WARPS, batch_position, layout_2d, row_length, sample_noise

# The kernel's constexpr codes: positions in the vocabularies of fastddpm.step.
FIXED_SMALL, FIXED_SMALL_LOG, FIXED_LARGE, LEARNED, LEARNED_RANGE = (
    tl.constexpr(VARIANCE_TYPES.index(name))
    for name in ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"))
SAMPLERS = ("ddpm", "ddim")  # the update rules this kernel implements (fastddpm.step.STEP_RULES)
DDPM, DDIM = (tl.constexpr(SAMPLERS.index(name)) for name in SAMPLERS)
# Rows of the schedule's packed table (fastddpm.schedule.TABLE_ROWS) the step gathers from, beside
# the x_0 rows of .common.
(ROW_COEF1, ROW_COEF2, ROW_POST_VAR, ROW_POST_LOGVAR, ROW_LOG_BETA, ROW_SQRT_AB_PREV, ROW_1M_AB_PREV) = (
    tl.constexpr(table_row(name)) for name in (
        "posterior_mean_coef1", "posterior_mean_coef2", "posterior_variance", "posterior_log_variance_clipped",
        "log_betas", "sqrt_alphas_cumprod_prev", "one_minus_alphas_cumprod_prev"))


@triton.jit
def _reverse_step_kernel(
    x_ptr, model_out_ptr, t_ptr, table_ptr, noise_ptr, seed_ptr, noise_offset_ptr, index_base_ptr, x_prev_ptr, x0_ptr,
    numel, per_sample, out_sample_stride, num_timesteps, clip_range, eta,
    SAMPLER: tl.constexpr, PREDICTION: tl.constexpr, VARIANCE: tl.constexpr, CLIP: tl.constexpr,
    ADD_NOISE: tl.constexpr, HAS_NOISE: tl.constexpr, WRITE_X0: tl.constexpr, T_PER_SAMPLE: tl.constexpr,
    SAME_LAYOUT: tl.constexpr, ROW_LEN: tl.constexpr, ALIGNED: tl.constexpr,
    INDEX_64: tl.constexpr, BLOCK: tl.constexpr,
):
    rows, offs = layout_2d(BLOCK // ROW_LEN, ROW_LEN, INDEX_64)
    mask = offs < numel
    sample = batch_position(rows, offs, per_sample, ROW_LEN, ALIGNED)
    if T_PER_SAMPLE:
        t = tl.load(t_ptr + sample, mask=(sample * per_sample) < numel, other=0).to(tl.int32)
    else:
        t = tl.load(t_ptr).to(tl.int32)
    t = tl.minimum(tl.maximum(t, 0), num_timesteps - 1)

    # The model output may carry variance channels after the mean channels of each sample.
    if SAME_LAYOUT:
        out_offs = offs
    else:
        out_offs = offs + sample * (out_sample_stride - per_sample)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = tl.load(model_out_ptr + out_offs, mask=mask, other=0.0).to(tl.float32)

    sqrt_ab = _coef(table_ptr, ROW_SQRT_AB, num_timesteps, t)
    sqrt_1m_ab = _coef(table_ptr, ROW_SQRT_1M_AB, num_timesteps, t)
    x0_unclipped = predict_x0(table_ptr, num_timesteps, t, x, out, PREDICTION, False, 0.0)
    x0 = predict_x0(table_ptr, num_timesteps, t, x, out, PREDICTION, CLIP, clip_range)

    if SAMPLER == DDPM:  # the posterior at the predicted x_0
        mean = _coef(table_ptr, ROW_COEF1, num_timesteps, t) * x0 + _coef(table_ptr, ROW_COEF2, num_timesteps, t) * x
        if VARIANCE == FIXED_SMALL:
            std = tl.sqrt(_coef(table_ptr, ROW_POST_VAR, num_timesteps, t))
        elif VARIANCE == FIXED_SMALL_LOG:
            std = tl.exp(0.5 * _coef(table_ptr, ROW_POST_LOGVAR, num_timesteps, t))
        elif VARIANCE == FIXED_LARGE:
            std = tl.exp(0.5 * _coef(table_ptr, ROW_LOG_BETA, num_timesteps, t))
        else:
            var_values = tl.load(model_out_ptr + out_offs + per_sample, mask=mask, other=0.0).to(tl.float32)
            if VARIANCE == LEARNED:
                std = tl.exp(0.5 * var_values)
            else:
                frac = (var_values + 1.0) * 0.5
                min_log = _coef(table_ptr, ROW_POST_LOGVAR, num_timesteps, t)
                max_log = _coef(table_ptr, ROW_LOG_BETA, num_timesteps, t)
                std = tl.exp(0.5 * (frac * max_log + (1.0 - frac) * min_log))
        std = tl.where(t > 0, std, 0.0)
    else:  # DDIM (Song et al. eq. 12) with eps as the model predicted it
        if PREDICTION == EPSILON:
            eps = out
        elif PREDICTION == SAMPLE:
            eps = (x - sqrt_ab * x0_unclipped) / sqrt_1m_ab
        else:
            eps = sqrt_ab * out + sqrt_1m_ab * x
        std = eta * tl.sqrt(_coef(table_ptr, ROW_POST_VAR, num_timesteps, t))
        direction = tl.sqrt(tl.maximum(_coef(table_ptr, ROW_1M_AB_PREV, num_timesteps, t) - std * std, 0.0))
        mean = _coef(table_ptr, ROW_SQRT_AB_PREV, num_timesteps, t) * x0 + direction * eps

    x_prev = mean
    if ADD_NOISE:
        if HAS_NOISE:
            z = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            z = sample_noise(seed_ptr, noise_offset_ptr, index_base_ptr, rows, offs, sample, per_sample,
                             ROW_LEN, ALIGNED)
        x_prev = mean + std * z
    if WRITE_X0:
        tl.store(x0_ptr + offs, x0, mask=mask)
    tl.store(x_prev_ptr + offs, x_prev, mask=mask)


def reverse_step(spec, model_output, t, x_t, table, *, noise=None, seed=None, noise_offset=None, index_base=None,
                 out=None, pred_x0_out=None, block=DEFAULT_BLOCK, num_warps=DEFAULT_NUM_WARPS):
    """Launch one step of ``spec`` (a validated :class:`fastddpm.step.StepSpec`) on contiguous
    tensors. ``model_output`` is x_t's shape, or has twice its channels (dim 1) for learned
    variances; ``t``: int tensor [] or [B]; ``table``: the schedule's packed float32 table on x_t's
    device; ``seed``/``noise_offset``/``index_base``: int64 tensors [] (used when the step adds
    noise and ``noise`` is None; ``index_base`` is the global index of the batch's first sample).
    Writes ``out`` (may be ``x_t``) and, if given, ``pred_x0_out``."""
    numel = x_t.numel()
    if out is None:
        out = torch.empty_like(x_t)
    if numel == 0:
        return out
    per_sample = numel // x_t.shape[0]
    out_sample_stride = model_output.numel() // x_t.shape[0]
    row = row_length(x_t.element_size())
    in_kernel_noise = spec.adds_noise and noise is None
    grid = (triton.cdiv(numel, block),)
    _reverse_step_kernel[grid](
        x_t, model_output, t, table,
        noise if noise is not None else out,
        seed if in_kernel_noise else t, noise_offset if in_kernel_noise else t, index_base if in_kernel_noise else t,
        out, pred_x0_out if pred_x0_out is not None else out,
        numel, per_sample, out_sample_stride, table.shape[1],
        spec.clip_range if spec.clip_range is not None else 0.0, spec.eta,
        SAMPLER=SAMPLERS.index(spec.sampler), PREDICTION=PREDICTION_TYPES.index(spec.prediction_type),
        VARIANCE=VARIANCE_TYPES.index(spec.variance_type) if spec.rule.reads_model_variance else 0,
        CLIP=spec.clip_range is not None, ADD_NOISE=spec.adds_noise, HAS_NOISE=noise is not None,
        WRITE_X0=pred_x0_out is not None, T_PER_SAMPLE=t.ndim == 1,
        SAME_LAYOUT=out_sample_stride == per_sample, ROW_LEN=row, ALIGNED=per_sample % row == 0,
        INDEX_64=max(numel, model_output.numel()) + block >= 2**31, BLOCK=block,
        num_warps=num_warps,
    )
    return out
