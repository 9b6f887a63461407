"""DPM-Solver++(2M) (Lu et al. 2022, data prediction, midpoint form) as one fused step.

One pass reads x_t, the model output and the previous step's predicted x_0 (D0_prev), and writes
x_{t-1} and this step's x_0 (D0, over D0_prev: every element is read before the same program
writes it):

    x_{t-1} = (sigma_{t-1} / sigma_t) x_t + alpha_{t-1} (1 - e^{-h}) (D0 + (D0 - D0_prev) / (2 r))

with the three coefficients from the schedule's table (``dpmpp_*`` rows, computed once in
float64 by ``fastddpm.schedule.NoiseSchedule``; the last one is 0 on first-order steps).
"""
import torch
import triton
import triton.language as tl

from fastddpm.schedule import table_row
from fastddpm.step import PREDICTION_TYPES

from .noise import DEFAULT_BLOCK, DEFAULT_NUM_WARPS
from .common import _coef, predict_x0

ROW_RATIO, ROW_DATA, ROW_DIFF = (
    tl.constexpr(table_row(name)) for name in ("dpmpp_sigma_ratio", "dpmpp_data_coef", "dpmpp_diff_coef"))


@triton.jit
def _dpmpp_2m_kernel(
    x_ptr, model_out_ptr, prev_x0_ptr, t_ptr, table_ptr, x_prev_ptr,
    numel, per_sample, out_sample_stride, num_timesteps, clip_range,
    PREDICTION: tl.constexpr, CLIP: tl.constexpr, SAME_LAYOUT: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if INDEX_64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    t = tl.load(t_ptr).to(tl.int32)
    t = tl.minimum(tl.maximum(t, 0), num_timesteps - 1)
    if SAME_LAYOUT:
        out_offs = offs
    else:  # variance channels after each sample's mean channels: read the mean ones
        out_offs = offs + (offs // per_sample) * (out_sample_stride - per_sample)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = tl.load(model_out_ptr + out_offs, mask=mask, other=0.0).to(tl.float32)
    d0_prev = tl.load(prev_x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d0 = predict_x0(table_ptr, num_timesteps, t, x, out, PREDICTION, CLIP, clip_range)
    x_prev = _coef(table_ptr, ROW_RATIO, num_timesteps, t) * x + _coef(table_ptr, ROW_DATA, num_timesteps, t) * (
        d0 + _coef(table_ptr, ROW_DIFF, num_timesteps, t) * (d0 - d0_prev))
    tl.store(prev_x0_ptr + offs, d0, mask=mask)
    tl.store(x_prev_ptr + offs, x_prev, mask=mask)


def dpmpp_2m(spec, model_output, t, x_t, prev_x0, table, *, out=None, block=DEFAULT_BLOCK,
             num_warps=DEFAULT_NUM_WARPS):
    """Launch one step on contiguous tensors: ``t`` an int64 tensor [] (the chain index),
    ``prev_x0`` D0_prev in x_t's shape (overwritten with this step's D0), ``out`` x_{t-1} (may be
    ``x_t``)."""
    numel = x_t.numel()
    if out is None:
        out = torch.empty_like(x_t)
    if numel == 0:
        return out
    per_sample = numel // x_t.shape[0]
    out_sample_stride = model_output.numel() // x_t.shape[0]
    _dpmpp_2m_kernel[(triton.cdiv(numel, block),)](
        x_t, model_output, prev_x0, t, table, out,
        numel, per_sample, out_sample_stride, table.shape[1],
        spec.clip_range if spec.clip_range is not None else 0.0,
        PREDICTION=PREDICTION_TYPES.index(spec.prediction_type), CLIP=spec.clip_range is not None,
        SAME_LAYOUT=out_sample_stride == per_sample, INDEX_64=max(numel, model_output.numel()) + block >= 2**31,
        BLOCK=block, num_warps=num_warps,
    )
    return out
