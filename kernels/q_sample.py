"""Forward-process noising x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps in one pass."""
import torch
import triton
import triton.language as tl

from fastddpm.schedule import table_row

from .noise import DEFAULT_BLOCK, DEFAULT_NUM_WARPS, batch_position, layout_2d, row_length, sample_noise

_ROW_SQRT_AB = table_row("sqrt_alphas_cumprod")
_ROW_SQRT_1M_AB = table_row("sqrt_one_minus_alphas_cumprod")


@triton.jit
def _q_sample_kernel(
    x0_ptr, t_ptr, table_ptr, noise_ptr, seed_ptr, noise_offset_ptr, index_base_ptr, xt_ptr, noise_out_ptr,
    numel, per_sample, num_timesteps,
    ROW_SQRT_AB: tl.constexpr, ROW_SQRT_1M_AB: tl.constexpr,
    T_PER_SAMPLE: tl.constexpr, HAS_NOISE: tl.constexpr, WRITE_NOISE: tl.constexpr,
    ROW_LEN: tl.constexpr, ALIGNED: tl.constexpr, INDEX_64: tl.constexpr, BLOCK: tl.constexpr,
):
    rows, offs = layout_2d(BLOCK // ROW_LEN, ROW_LEN, INDEX_64)
    mask = offs < numel
    sample = batch_position(rows, offs, per_sample, ROW_LEN, ALIGNED)
    if T_PER_SAMPLE:
        t = tl.load(t_ptr + sample, mask=(sample * per_sample) < numel, other=0).to(tl.int32)
    else:
        t = tl.load(t_ptr).to(tl.int32)
    # Out-of-range t on the device is clamped rather than read out of bounds (checking it on
    # the host would need a synchronisation).
    t = tl.minimum(tl.maximum(t, 0), num_timesteps - 1)
    sqrt_ab = tl.load(table_ptr + ROW_SQRT_AB * num_timesteps + t)
    sqrt_1m_ab = tl.load(table_ptr + ROW_SQRT_1M_AB * num_timesteps + t)
    x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if T_PER_SAMPLE:  # per-row coefficients, anchored to the loads' layout (see the noise store)
        sqrt_ab = tl.where(mask, sqrt_ab, x0)
        sqrt_1m_ab = tl.where(mask, sqrt_1m_ab, x0)
    if HAS_NOISE:
        eps = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        eps = sample_noise(seed_ptr, noise_offset_ptr, index_base_ptr, rows, offs, sample, per_sample,
                           ROW_LEN, ALIGNED)
    tl.store(xt_ptr + offs, sqrt_ab * x0 + sqrt_1m_ab * eps, mask=mask)
    if WRITE_NOISE:
        # (where: anchors eps to the loads' layout; Triton 3.6 would otherwise compute the noise in a
        # layout of its own and convert it through shared memory, ~3x the instructions.)
        tl.store(noise_out_ptr + offs, tl.where(mask, eps, x0), mask=mask)


def q_sample(x0, t, table, *, noise=None, seed=None, noise_offset=None, index_base=None, out=None, noise_out=None,
             block=DEFAULT_BLOCK, num_warps=DEFAULT_NUM_WARPS):
    """Launch on contiguous tensors. ``t``: int tensor [] or [B]; ``table``: the schedule's packed
    float32 table on x0's device; ``seed``/``noise_offset``/``index_base``: int64 tensors [] (used
    when ``noise`` is None). Writes ``out`` (x_t) and, if given, ``noise_out``."""
    numel = x0.numel()
    if out is None:
        out = torch.empty_like(x0)
    if numel == 0:
        return out
    per_sample = max(numel // x0.shape[0] if x0.ndim else numel, 1)
    row = row_length(x0.element_size())
    dummy = out
    in_kernel_noise = noise is None
    grid = (triton.cdiv(numel, block),)
    _q_sample_kernel[grid](
        x0, t, table,
        noise if noise is not None else dummy,
        seed if in_kernel_noise else t, noise_offset if in_kernel_noise else t, index_base if in_kernel_noise else t,
        out, noise_out if noise_out is not None else dummy,
        numel, per_sample, table.shape[1],
        ROW_SQRT_AB=_ROW_SQRT_AB, ROW_SQRT_1M_AB=_ROW_SQRT_1M_AB,
        T_PER_SAMPLE=t.ndim == 1, HAS_NOISE=noise is not None, WRITE_NOISE=noise_out is not None,
        ROW_LEN=row, ALIGNED=per_sample % row == 0,
        INDEX_64=numel + block >= 2**31, BLOCK=block,
        num_warps=num_warps,
    )
    return out
