"""What every step kernel shares: the prediction codes, the coefficient gather from the schedule's
packed table, and x_0 from the model's output (clipped, NaN kept)."""
import triton
import triton.language as tl

from fastddpm.schedule import table_row
from fastddpm.step import PREDICTION_TYPES

# The kernels' constexpr codes of the prediction types: positions in fastddpm.step's vocabulary.
EPSILON, SAMPLE, V_PREDICTION = (tl.constexpr(PREDICTION_TYPES.index(name)) for name in ("epsilon", "sample", "v_prediction"))
# Rows of the schedule's packed table (fastddpm.schedule.TABLE_ROWS) x_0 is predicted from.
ROW_SQRT_AB, ROW_SQRT_1M_AB, ROW_SQRT_RECIP_AB, ROW_SQRT_RECIPM1_AB = (tl.constexpr(table_row(name)) for name in (
    "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"))


@triton.jit
def _coef(table_ptr, row, num_timesteps, t):
    return tl.load(table_ptr + row * num_timesteps + t)


@triton.jit
def predict_x0(table_ptr, num_timesteps, t, x, out, PREDICTION: tl.constexpr, CLIP: tl.constexpr, clip_range):
    """x_0 from the model's output ``out`` at x_t = ``x`` (float32), clipped to +-clip_range when
    ``CLIP``. NaN stays NaN (as in torch.clamp): plain min/max would turn it into +-clip_range on a
    GPU. Shared by every step kernel."""
    if PREDICTION == EPSILON:
        x0 = _coef(table_ptr, ROW_SQRT_RECIP_AB, num_timesteps, t) * x - _coef(
            table_ptr, ROW_SQRT_RECIPM1_AB, num_timesteps, t) * out
    elif PREDICTION == SAMPLE:
        x0 = out
    else:  # V_PREDICTION
        x0 = _coef(table_ptr, ROW_SQRT_AB, num_timesteps, t) * x - _coef(table_ptr, ROW_SQRT_1M_AB, num_timesteps, t) * out
    if CLIP:
        x0 = tl.clamp(x0, -clip_range, clip_range, propagate_nan=tl.PropagateNan.ALL)
    return x0
