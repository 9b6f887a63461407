"""DPM-Solver++ (Lu et al. 2022, data prediction, midpoint form; 2M, 3M and the 2M SDE variant) as
one fused step.

One pass reads x_t, the model output and the previous steps' predicted x_0 (D0_prev, and D0_prev2
for a chain with third-order steps), and writes x_{t-1} and this step's x_0 (D0 over D0_prev, and
D0_prev over D0_prev2: every element is read before the same program writes it):

    x_{t-1} = ratio x_t + c0 D0 + c1 D0_prev [+ c2 D0_prev2] [+ noise z]

with the coefficients at the chain index from the solver's table
(:meth:`fastddpm.reference.DPMSolver.coefficients`, derived once in float64; rows
:data:`fastddpm.reference.DPMPP_ROWS`; c1 and c2 are 0 where a step's order does not read them).
The SDE variant adds ``noise z``: z from a given tensor, or the in-kernel Philox stream of the
DDPM step (``noise.sample_noise``), in the same 2-D layout of 128-bit rows.
"""
import torch
import triton
import triton.language as tl

from fastddpm.reference import DPMPP_ROWS
from fastddpm.step import PREDICTION_TYPES

from .common import _coef, predict_x0
from .noise import DEFAULT_BLOCK, DEFAULT_NUM_WARPS, batch_position, layout_2d, row_length, sample_noise

ROW_RATIO, ROW_C0, ROW_C1, ROW_C2, ROW_NOISE = (tl.constexpr(DPMPP_ROWS.index(name)) for name in DPMPP_ROWS)


@triton.jit
def _dpmpp_2m_kernel(
    x_ptr, model_out_ptr, prev_x0_ptr, older_x0_ptr, t_ptr, table_ptr, solver_ptr, noise_ptr, seed_ptr, noise_offset_ptr,
    index_base_ptr, x_prev_ptr,
    numel, per_sample, out_sample_stride, num_timesteps, clip_range,
    PREDICTION: tl.constexpr, CLIP: tl.constexpr, THIRD: tl.constexpr, ADD_NOISE: tl.constexpr, HAS_NOISE: tl.constexpr,
    SAME_LAYOUT: tl.constexpr, ROW_LEN: tl.constexpr, ALIGNED: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows, offs = layout_2d(BLOCK // ROW_LEN, ROW_LEN, INDEX_64)
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
    x_prev = (_coef(solver_ptr, ROW_RATIO, num_timesteps, t) * x + _coef(solver_ptr, ROW_C0, num_timesteps, t) * d0
              + _coef(solver_ptr, ROW_C1, num_timesteps, t) * d0_prev)
    if THIRD:
        d0_older = tl.load(older_x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x_prev = x_prev + _coef(solver_ptr, ROW_C2, num_timesteps, t) * d0_older
        tl.store(older_x0_ptr + offs, d0_prev, mask=mask)
    if ADD_NOISE:
        if HAS_NOISE:
            z = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            sample = batch_position(rows, offs, per_sample, ROW_LEN, ALIGNED)
            z = sample_noise(seed_ptr, noise_offset_ptr, index_base_ptr, rows, offs, sample, per_sample,
                             ROW_LEN, ALIGNED)
        x_prev = x_prev + _coef(solver_ptr, ROW_NOISE, num_timesteps, t) * z
    tl.store(prev_x0_ptr + offs, d0, mask=mask)
    tl.store(x_prev_ptr + offs, x_prev, mask=mask)


def dpmpp_2m(spec, model_output, t, x_t, prev_x0, table, solver_table, *, older_x0=None, noise=None, seed=None,
             noise_offset=None, index_base=None, out=None, block=DEFAULT_BLOCK, num_warps=DEFAULT_NUM_WARPS):
    """Launch one step on contiguous tensors: ``t`` an int64 tensor [] (the chain index),
    ``prev_x0`` D0_prev in x_t's shape (overwritten with this step's D0), ``older_x0`` D0_prev2 for
    a chain with third-order steps (overwritten with D0_prev), ``table`` the schedule's,
    ``solver_table`` the DPM-Solver++ rows (the SDE ones for a noisy ``spec``), ``noise`` or
    ``seed``/``noise_offset``/``index_base`` (int64 tensors []) for a step that adds noise, ``out``
    x_{t-1} (may be ``x_t``)."""
    numel = x_t.numel()
    if out is None:
        out = torch.empty_like(x_t)
    if numel == 0:
        return out
    per_sample = numel // x_t.shape[0]
    out_sample_stride = model_output.numel() // x_t.shape[0]
    row = row_length(x_t.element_size())
    in_kernel_noise = spec.adds_noise and noise is None
    _dpmpp_2m_kernel[(triton.cdiv(numel, block),)](
        x_t, model_output, prev_x0, older_x0 if older_x0 is not None else prev_x0, t, table, solver_table,
        noise if noise is not None else out,
        seed if in_kernel_noise else t, noise_offset if in_kernel_noise else t, index_base if in_kernel_noise else t,
        out,
        numel, per_sample, out_sample_stride, table.shape[1],
        spec.clip_range if spec.clip_range is not None else 0.0,
        PREDICTION=PREDICTION_TYPES.index(spec.prediction_type), CLIP=spec.clip_range is not None,
        THIRD=older_x0 is not None, ADD_NOISE=spec.adds_noise, HAS_NOISE=noise is not None,
        SAME_LAYOUT=out_sample_stride == per_sample, ROW_LEN=row, ALIGNED=per_sample % row == 0,
        INDEX_64=max(numel, model_output.numel()) + block >= 2**31, BLOCK=block, num_warps=num_warps,
    )
    return out
