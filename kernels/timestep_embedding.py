"""Sinusoidal timestep embedding [B, dim]: sin/cos of t times a geometric ladder of frequencies.

Columns ``[0, half)`` hold one function of the arguments and ``[half, 2 half)`` the other (sin then
cos, or cos then sin with ``flip_sin_to_cos``). Where the column blocks tile each half exactly
(``SPLIT``: ``half`` a multiple of ``BLOCK_D``), a program covers columns of one half only and
evaluates one function for its elements instead of both.
"""
import math

import torch
import triton
import triton.language as tl


@triton.jit
def _timestep_embedding_kernel(
    t_ptr, out_ptr, batch, dim, half, neg_log_max_period, freq_denominator, scale,
    FLIP_SIN_TO_COS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < batch
    t = tl.load(t_ptr + rows, mask=row_mask, other=0).to(tl.float32)
    in_second_half = cols >= half
    k = tl.where(in_second_half, cols - half, cols)
    # Same operation order as the reference so that float32 rounding agrees.
    freq = tl.exp((k.to(tl.float32) * neg_log_max_period) / freq_denominator)
    args = scale * (t[:, None] * freq[None, :])
    if SPLIT:
        # The program's columns lie in one half (or in the zero pad column of an odd dim).
        if (tl.program_id(1) * BLOCK_D < half) != FLIP_SIN_TO_COS:
            value = tl.sin(args)
        else:
            value = tl.cos(args)
    elif FLIP_SIN_TO_COS:
        value = tl.where(in_second_half[None, :], tl.sin(args), tl.cos(args))
    else:
        value = tl.where(in_second_half[None, :], tl.cos(args), tl.sin(args))
    value = tl.where((cols < 2 * half)[None, :], value, 0.0)  # zero pad of an odd dim
    mask = row_mask[:, None] & (cols < dim)[None, :]
    tl.store(out_ptr + rows[:, None] * dim + cols[None, :], value, mask=mask)


def timestep_embedding(t, dim, *, max_period=10000.0, flip_sin_to_cos=False, downscale_freq_shift=1.0, scale=1.0, out=None):
    """Launch for a contiguous 1-D ``t`` (any real dtype); returns float32 [len(t), dim]."""
    batch = t.numel()
    if out is None:
        out = torch.empty((batch, dim), device=t.device, dtype=torch.float32)
    if batch == 0 or dim == 0:
        return out
    half = dim // 2
    # Column blocks that tile each half exactly when half allows it (a power of two dividing it).
    split_block = min(half & -half, 256) if half else 0
    split = split_block >= 16
    block_d = split_block if split else min(triton.next_power_of_2(dim), 256)
    block_b = max(1, min(triton.next_power_of_2(batch), 4096 // block_d))
    grid = (triton.cdiv(batch, block_b), triton.cdiv(dim, block_d))
    _timestep_embedding_kernel[grid](
        t, out, batch, dim, half, -math.log(max_period), float(half - downscale_freq_shift), float(scale),
        FLIP_SIN_TO_COS=bool(flip_sin_to_cos), SPLIT=split, BLOCK_B=block_b, BLOCK_D=block_d,
    )
    return out
