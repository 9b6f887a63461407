"""UniPC (Zhao et al. 2023; bh1 / bh2, order 1 or 2, data prediction) as one fused step.

One pass reads x_t, the model output, the corrector's part C carried from the step before and the
step before's x_0 (m_prev); it corrects x_t (UniC), predicts x_{t-1} (UniP) and writes x_{t-1},
the next step's C and this step's x_0 (over C and m_prev: every element is read before the same
program writes it):

    m = x_0(x_t, output),  xc = u x_t + C + g m,
    x_{t-1} = a xc + b m + c m_prev,  C' = ca xc + cb m + cc m_prev,

with the eight coefficients at the chain index from the solver's table
(:meth:`fastddpm.reference.UniPC.table`, derived once in float64; rows
:data:`fastddpm.reference.UNIPC_ROWS`). Seven tensors move per element, against DPM-Solver++(2M)'s
five: the corrector costs two, never a model call.
"""
import torch
import triton
import triton.language as tl

from fastddpm.reference import UNIPC_ROWS
from fastddpm.step import PREDICTION_TYPES

from .noise import DEFAULT_BLOCK, DEFAULT_NUM_WARPS
from .common import _coef, predict_x0

ROW_U, ROW_G, ROW_A, ROW_B, ROW_C, ROW_CA, ROW_CB, ROW_CC = (
    tl.constexpr(UNIPC_ROWS.index(name)) for name in UNIPC_ROWS)


@triton.jit
def _unipc_kernel(
    x_ptr, model_out_ptr, corrector_ptr, prev_x0_ptr, t_ptr, table_ptr, solver_ptr, x_prev_ptr,
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
    carried = tl.load(corrector_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m_prev = tl.load(prev_x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = predict_x0(table_ptr, num_timesteps, t, x, out, PREDICTION, CLIP, clip_range)
    xc = _coef(solver_ptr, ROW_U, num_timesteps, t) * x + carried + _coef(solver_ptr, ROW_G, num_timesteps, t) * m
    x_prev = (_coef(solver_ptr, ROW_A, num_timesteps, t) * xc + _coef(solver_ptr, ROW_B, num_timesteps, t) * m
              + _coef(solver_ptr, ROW_C, num_timesteps, t) * m_prev)
    carried = (_coef(solver_ptr, ROW_CA, num_timesteps, t) * xc + _coef(solver_ptr, ROW_CB, num_timesteps, t) * m
               + _coef(solver_ptr, ROW_CC, num_timesteps, t) * m_prev)
    tl.store(corrector_ptr + offs, carried, mask=mask)
    tl.store(prev_x0_ptr + offs, m, mask=mask)
    tl.store(x_prev_ptr + offs, x_prev, mask=mask)


def unipc(spec, model_output, t, x_t, corrector, prev_x0, table, solver_table, *, out=None, block=DEFAULT_BLOCK,
          num_warps=DEFAULT_NUM_WARPS):
    """Launch one step on contiguous tensors: ``t`` an int64 tensor [] (the chain index),
    ``corrector`` and ``prev_x0`` in x_t's shape (overwritten with the next step's C and this step's
    x_0), ``table`` the schedule's, ``solver_table`` the UniPC rows, ``out`` x_{t-1} (may be ``x_t``)."""
    numel = x_t.numel()
    if out is None:
        out = torch.empty_like(x_t)
    if numel == 0:
        return out
    per_sample = numel // x_t.shape[0]
    out_sample_stride = model_output.numel() // x_t.shape[0]
    _unipc_kernel[(triton.cdiv(numel, block),)](
        x_t, model_output, corrector, prev_x0, t, table, solver_table, out,
        numel, per_sample, out_sample_stride, table.shape[1],
        spec.clip_range if spec.clip_range is not None else 0.0,
        PREDICTION=PREDICTION_TYPES.index(spec.prediction_type), CLIP=spec.clip_range is not None,
        SAME_LAYOUT=out_sample_stride == per_sample, INDEX_64=max(numel, model_output.numel()) + block >= 2**31,
        BLOCK=block, num_warps=num_warps,
    )
    return out
