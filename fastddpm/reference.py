"""Pure-PyTorch reference of every per-step op: the oracle the Triton kernels are tested against,
and the path every CPU tensor takes.

Math runs in float64 for float64 inputs and in float32 otherwise (as the kernels do); results are
cast back to the storage dtype of ``x_t`` / ``x0``. Indices ``t`` are indices into ``schedule``
(``schedule.timesteps[t]`` is what the model sees).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, FrozenSet, Optional, Tuple, Union

import torch

from .checks import check_seed
from .schedule import NoiseSchedule
from .step import LEARNED_VARIANCE_TYPES, PREDICTION_TYPES, VARIANCE_TYPES, StepSpec, check_choice

__all__ = [
    "PREDICTION_TYPES",
    "VARIANCE_TYPES",
    "philox4x32",
    "philox_randn",
    "q_sample",
    "step",
    "dpmpp_2m_step",
    "DPMPP_ROWS",
    "DPMSolver",
    "dpmpp_coefficients",
    "UniPC",
    "UNIPC_ROWS",
    "unipc_step",
    "predict_x0",
    "ddpm_step",
    "ddim_step",
    "timestep_embedding",
]


# ---------------------------------------------------------------------------------------------
# Philox4x32-10 + Box-Muller: the kernels' noise stream (fastddpm/kernels/noise.py)
# ---------------------------------------------------------------------------------------------
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_MASK32 = 0xFFFFFFFF
# Triton's uint -> [0, 1) scale for 32-bit draws: the largest value with MAX_INT * scale < 1.
_UINT32_TO_UNIFORM = 4.6566127342e-10
_MIN_UNIFORM = 1.0e-7  # the smallest uniform fed to Box-Muller's logarithm
_NORMALS_PER_CALL = 4  # one Philox call: four words, two Box-Muller pairs


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """Philox4x32 on int64 tensors holding uint32 values. Returns the four output words.

    int64 multiplication wraps modulo 2**64, and a 32x32-bit product fits in 64 bits, so the
    high and low halves come out exact after masking.
    """
    k0 = torch.as_tensor(k0, dtype=torch.int64)
    k1 = torch.as_tensor(k1, dtype=torch.int64)
    for _ in range(rounds):
        prod_b = c2 * _PHILOX_ROUND_B
        prod_a = c0 * _PHILOX_ROUND_A
        c0, c1, c2, c3 = (
            ((prod_b >> 32) & _MASK32) ^ c1 ^ k0,
            prod_b & _MASK32,
            ((prod_a >> 32) & _MASK32) ^ c3 ^ k1,
            prod_a & _MASK32,
        )
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def _uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    signed = torch.where(x >= 2**31, x - 2**32, x)  # reinterpret as int32
    folded = torch.where(signed < 0, -signed - 1, signed)  # ~x for negatives
    return folded.to(torch.float32) * torch.tensor(_UINT32_TO_UNIFORM, dtype=torch.float32)


def _seed_words(seed: int) -> Tuple[int, int]:
    seed = int(seed)
    check_seed(seed)
    return seed & _MASK32, (seed >> 32) & _MASK32


def _box_muller(u_radius: torch.Tensor, u_angle: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The cosine and sine normals of one uniform pair (float32, as the kernels compute them)."""
    radius = torch.sqrt(-2.0 * torch.log(u_radius.clamp_min(_MIN_UNIFORM)))
    theta = torch.tensor(2 * math.pi, dtype=torch.float32) * u_angle
    return radius * torch.cos(theta), radius * torch.sin(theta)


def philox_randn(
    shape,
    seed: int,
    noise_offset: int = 0,
    *,
    index_base: int = 0,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normals identical to what the kernels draw: the sample-indexed Philox stream.

    ``shape[0]`` counts samples. Element ``e`` (row-major, within its sample) of sample ``n``
    (global index ``index_base`` + its position in dim 0) is normal ``e % 4`` of Philox4x32-10
    keyed by the 64-bit ``seed`` on the counter ``(e // 4, n, noise_offset, 0)``: the four words
    make two uniform pairs (Triton's uint -> [0, 1) map) and Box-Muller gives the cosine, then the
    sine normal of each. So sample ``n`` draws the same noise whatever batch it is drawn in, and
    every sampling step uses its own ``noise_offset`` (0 for x_T, ``k + 1`` for step ``k``).
    """
    shape = tuple(shape)
    if len(shape) == 0:
        raise ValueError("shape must have a sample dimension (shape[0])")
    batch = shape[0]
    per_sample = math.prod(shape[1:])
    noise_offset, index_base = int(noise_offset), int(index_base)
    if not (0 <= noise_offset < 2**32):
        raise ValueError(f"noise_offset must be an int in [0, 2**32), got {noise_offset}")
    if not (0 <= index_base and index_base + batch <= 2**32):
        raise ValueError(f"index_base + batch must lie in [0, 2**32] (sample indices are 32-bit), "
                         f"got index_base={index_base}, batch={batch}")
    if per_sample >= 4 * 2**32:
        raise ValueError(f"philox_randn draws at most 4 * 2**32 - 1 values per sample, got {per_sample}")
    k0, k1 = _seed_words(seed)
    groups = -(-per_sample // _NORMALS_PER_CALL)
    group = torch.arange(groups, dtype=torch.int64, device=device)[None, :]
    sample = torch.arange(index_base, index_base + batch, dtype=torch.int64, device=device)[:, None]
    group, sample = torch.broadcast_tensors(group, sample)
    zero = torch.zeros_like(group)
    w0, w1, w2, w3 = philox4x32(group, sample, zero + noise_offset, zero, k0, k1)
    z0, z1 = _box_muller(_uint32_to_uniform(w0), _uint32_to_uniform(w1))
    z2, z3 = _box_muller(_uint32_to_uniform(w2), _uint32_to_uniform(w3))
    normals = torch.stack([z0, z1, z2, z3], dim=-1).reshape(batch, groups * _NORMALS_PER_CALL)
    return normals[:, :per_sample].reshape(shape).to(dtype)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _gather(schedule: NoiseSchedule, name: str, t, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Coefficient ``name`` at index ``t`` (int or [B]/[] tensor), shaped to broadcast against x."""
    row = schedule.coefficient(name, x.device, dtype)
    if isinstance(t, torch.Tensor):
        t = t.to(device=x.device, dtype=torch.int64)
        # index_select, not row[t]: indexing with a 0-d tensor reads it back to the host (a
        # device sync, and a graph break under torch.compile).
        picked = row.index_select(0, t.reshape(-1))
        return picked.reshape(()) if t.ndim == 0 else picked.reshape((-1,) + (1,) * (x.ndim - 1))
    return row[int(t)]


def gather_coefficient(schedule: NoiseSchedule, name: str, t, like: torch.Tensor) -> torch.Tensor:
    """Coefficient ``name`` at index ``t`` in ``like``'s compute dtype, shaped to broadcast against it."""
    return _gather(schedule, name, t, like, _compute_dtype(like))


def _t_positive(t, x: torch.Tensor) -> Union[bool, torch.Tensor]:
    if isinstance(t, torch.Tensor):
        t = t.to(device=x.device)
        mask = (t > 0).to(_compute_dtype(x))
        return mask if t.ndim == 0 else mask.reshape((-1,) + (1,) * (x.ndim - 1))
    return float(int(t) > 0)


def _noise_like(x: torch.Tensor, noise: Optional[torch.Tensor], seed, noise_offset, index_base, dtype) -> torch.Tensor:
    if noise is not None:
        return noise.to(dtype)
    if seed is None:
        raise ValueError("either noise or seed must be given")
    return philox_randn(x.shape, int(seed), int(noise_offset), index_base=int(index_base), device=x.device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# forward process
# ---------------------------------------------------------------------------------------------
def q_sample(
    x0: torch.Tensor,
    t,
    schedule: NoiseSchedule,
    noise: Optional[torch.Tensor] = None,
    *,
    seed=None,
    noise_offset=0,
    index_base=0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps. Returns (x_t, eps)."""
    dtype = _compute_dtype(x0)
    eps = _noise_like(x0, noise, seed, noise_offset, index_base, dtype)
    x_t = _gather(schedule, "sqrt_alphas_cumprod", t, x0, dtype) * x0.to(dtype) + _gather(
        schedule, "sqrt_one_minus_alphas_cumprod", t, x0, dtype
    ) * eps
    return x_t.to(x0.dtype), eps.to(x0.dtype)


# ---------------------------------------------------------------------------------------------
# reverse process
# ---------------------------------------------------------------------------------------------
def _split_model_output(model_output: torch.Tensor, x_t: torch.Tensor, variance_type: str):
    if variance_type in LEARNED_VARIANCE_TYPES:
        channels = x_t.shape[1]
        return model_output[:, :channels], model_output[:, channels:]
    return model_output, None


def predict_x0(model_output, t, x_t, schedule, prediction_type="epsilon", clip_range: Optional[float] = 1.0):
    """x_0 from the model's prediction (in the compute dtype), clipped to [-clip_range, clip_range]."""
    dtype = _compute_dtype(x_t)
    out, x = model_output.to(dtype), x_t.to(dtype)
    if prediction_type == "epsilon":
        x0 = _gather(schedule, "sqrt_recip_alphas_cumprod", t, x, dtype) * x - _gather(
            schedule, "sqrt_recipm1_alphas_cumprod", t, x, dtype) * out
    elif prediction_type == "sample":
        x0 = out
    elif prediction_type == "v_prediction":
        x0 = _gather(schedule, "sqrt_alphas_cumprod", t, x, dtype) * x - _gather(
            schedule, "sqrt_one_minus_alphas_cumprod", t, x, dtype) * out
    else:
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)  # raises
    if clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)
    return x0


def ddpm_std(t, x_t, schedule, variance_type="fixed_small", variance_values: Optional[torch.Tensor] = None):
    """Standard deviation sigma_t of the reverse step p(x_{t-1} | x_t)."""
    dtype = _compute_dtype(x_t)
    if variance_type == "fixed_small":
        return _gather(schedule, "posterior_variance", t, x_t, dtype).sqrt()
    if variance_type == "fixed_small_log":
        return torch.exp(0.5 * _gather(schedule, "posterior_log_variance_clipped", t, x_t, dtype))
    if variance_type == "fixed_large":
        return torch.exp(0.5 * _gather(schedule, "log_betas", t, x_t, dtype))
    if variance_type == "learned":
        return torch.exp(0.5 * variance_values.to(dtype))
    if variance_type == "learned_range":
        min_log = _gather(schedule, "posterior_log_variance_clipped", t, x_t, dtype)
        max_log = _gather(schedule, "log_betas", t, x_t, dtype)
        frac = (variance_values.to(dtype) + 1.0) / 2.0
        return torch.exp(0.5 * (frac * max_log + (1.0 - frac) * min_log))
    check_choice("variance_type", variance_type, VARIANCE_TYPES)  # raises
    raise AssertionError(variance_type)


def step(
    spec: StepSpec,
    model_output: torch.Tensor,
    t,
    x_t: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    noise: Optional[torch.Tensor] = None,
    seed=None,
    noise_offset=0,
    index_base=0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One reverse step x_t -> x_{t-1} of ``spec``; returns (x_{t-1}, predicted x_0).

    DDPM: the posterior q(x_{t-1} | x_t, x_0) at the predicted x_0, with sigma_t from
    ``spec.variance_type``; no noise where t == 0. DDIM (Song et al. eq. 12) on a respaced
    schedule: eps as the model predicted it (converted for ``sample``/``v_prediction``, as diffusers'
    DDIMScheduler with ``use_clipped_model_output=False``) and sigma_t = eta sqrt(beta~_t).
    """
    dtype = _compute_dtype(x_t)
    x = x_t.to(dtype)
    mean_output, variance_values = _split_model_output(model_output, x_t, spec.variance_type)
    out = mean_output.to(dtype)
    x0 = predict_x0(out, t, x, schedule, spec.prediction_type, spec.clip_range)
    if spec.sampler == "ddpm":
        mean = _gather(schedule, "posterior_mean_coef1", t, x, dtype) * x0 + _gather(
            schedule, "posterior_mean_coef2", t, x, dtype) * x
        std = _t_positive(t, x) * ddpm_std(t, x, schedule, spec.variance_type, variance_values)
    else:
        sqrt_ab = _gather(schedule, "sqrt_alphas_cumprod", t, x, dtype)
        sqrt_1m_ab = _gather(schedule, "sqrt_one_minus_alphas_cumprod", t, x, dtype)
        if spec.prediction_type == "epsilon":
            eps = out
        elif spec.prediction_type == "sample":
            eps = (x - sqrt_ab * out) / sqrt_1m_ab
        else:
            eps = sqrt_ab * out + sqrt_1m_ab * x
        std = spec.eta * _gather(schedule, "posterior_variance", t, x, dtype).sqrt()
        direction = (_gather(schedule, "one_minus_alphas_cumprod_prev", t, x, dtype) - std * std).clamp_min(0.0).sqrt()
        mean = _gather(schedule, "sqrt_alphas_cumprod_prev", t, x, dtype) * x0 + direction * eps
    x_prev = mean
    if spec.adds_noise:
        x_prev = mean + std * _noise_like(x_t, noise, seed, noise_offset, index_base, dtype)
    return x_prev.to(x_t.dtype), x0.to(x_t.dtype)


# ---------------------------------------------------------------------------------------------
# DPM-Solver++(2M) (Lu et al. 2022), data prediction, midpoint form; and its SDE variant
# ---------------------------------------------------------------------------------------------
def _solver_column(table: torch.Tensor, t, device) -> Tuple[torch.Tensor, ...]:
    """A solver's coefficients at chain index ``t`` (an int or a one-element tensor): one scalar
    tensor per row of its packed ``table``, gathered on the device (index_select, never a host read)."""
    index = t.to(device=device, dtype=torch.int64).reshape(1) if isinstance(t, torch.Tensor) else torch.tensor(
        [int(t)], device=device)
    return tuple(table.index_select(1, index).reshape(table.shape[0]))


def _half_log_snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha / sigma) = (log alpha_bar - log(1 - alpha_bar)) / 2 (+inf at alpha_bar = 1)."""
    return 0.5 * (alpha_bar.log() - torch.log1p(-alpha_bar))


# Per chain index i: x_{i-1} = ratio x_i + c0 D0 + c1 D0_prev + c2 D0_prev2 + noise z.
DPMPP_ROWS = ("dpmpp_sigma_ratio", "dpmpp_x0_coef", "dpmpp_prev_coef", "dpmpp_prev2_coef", "dpmpp_noise_coef")


@dataclasses.dataclass(frozen=True)
class DPMSolver:
    """The settings of a DPM-Solver++ chain: the SDE variant (``sde``; diffusers'
    "sde-dpmsolver++", order <= 2) and each step's order by chain index (``orders``: 1, 2 or 3 for
    index 0, 1, ...; None: DPM-Solver++(2M)'s, first order at the chain's first and last steps and
    second order between)."""

    sde: bool = False
    orders: Optional[Tuple[int, ...]] = None

    def __post_init__(self):
        if self.orders is not None:
            object.__setattr__(self, "orders", tuple(int(order) for order in self.orders))
            if any(order not in (1, 2, 3) for order in self.orders):
                raise ValueError(f"orders must hold 1, 2 or 3 for each step, got {self.orders}")
            if self.sde and 3 in self.orders:
                raise ValueError("the fused SDE variant is of order 1 or 2 a step")

    def order_at(self, index: int, num_steps: int) -> int:
        if self.orders is not None:
            if len(self.orders) != num_steps:
                raise ValueError(f"orders holds {len(self.orders)} steps for a chain of {num_steps}")
            return self.orders[index]
        return 1 if index in (0, num_steps - 1) else 2

    @property
    def max_order(self) -> int:
        return 2 if self.orders is None else max(self.orders)

    def coefficients(self, schedule: NoiseSchedule) -> Dict[str, torch.Tensor]:
        """The rows of :data:`DPMPP_ROWS` on ``schedule``'s chain (float64, computed once per chain).

        With alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar), lambda = log(alpha / sigma),
        h_i = lambda_{i-1} - lambda_i, r0 = h_{i+1} / h_i and r1 = h_{i+2} / h_i, the step from index
        i to i - 1 with this step's x_0 D0 and the steps before's D0_prev, D0_prev2 (Lu et al. 2022,
        data prediction, diffusers' "midpoint" form):

        * order 1: x_{i-1} = (sigma_{i-1} / sigma_i) x_i + alpha_{i-1} (1 - e^{-h}) D0;
        * order 2: the data term's D0 becomes D0 + D1 / 2, D1 = (D0 - D0_prev) / r0;
        * order 3: + alpha_{i-1} ((e^{-h} - 1) / h + 1) D1 - alpha_{i-1} ((e^{-h} - 1 + h) / h^2 - 1/2) D2
          with D1_0 = (D0 - D0_prev) / r0, D1_1 = (D0_prev - D0_prev2) / r1,
          D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1);
        * the SDE variant: x_i's factor times e^{-h}, alpha_{i-1} (1 - e^{-2h}) in place of
          alpha_{i-1} (1 - e^{-h}), and + sigma_{i-1} sqrt(1 - e^{-2h}) z, z standard normal.

        alpha_bar_{-1} = final_alpha_cumprod (1: the last step, first order, returns D0, no noise)."""
        return schedule.derived(("dpmpp", self), self._derive)

    def table(self, schedule: NoiseSchedule, device, dtype=torch.float32) -> torch.Tensor:
        """:meth:`coefficients` packed for the kernel (``kernels/dpm_solver.py``)."""
        return schedule.derived_table(("dpmpp", self), self._derive, DPMPP_ROWS, device, dtype)

    def _derive(self, schedule: NoiseSchedule) -> Dict[str, torch.Tensor]:
        ab, prev = schedule.alphas_cumprod, schedule.alphas_cumprod_prev
        n = len(ab)
        h = _half_log_snr(prev) - _half_log_snr(ab)  # +inf at index 0 when alpha_bar_{-1} = 1
        alpha_prev = prev.sqrt()
        ratio = ((1.0 - prev) / (1.0 - ab)).sqrt()
        if self.sde:
            decay = -torch.expm1(-2.0 * h)  # 1 - e^{-2h}
            ratio, data, noise = ratio * torch.exp(-h), alpha_prev * decay, (1.0 - prev).sqrt() * decay.sqrt()
        else:
            data, noise = alpha_prev * -torch.expm1(-h), torch.zeros_like(h)
        c0, c1, c2 = data.clone(), torch.zeros_like(h), torch.zeros_like(h)
        for i in range(n):
            order = self.order_at(i, n)
            if order >= 2 and i + order > n:
                raise ValueError(f"a step of order {order} at chain index {i} needs {order - 1} steps before it")
            if order == 2:
                half_over_r0 = 0.5 * h[i] / h[i + 1]
                c0[i], c1[i] = data[i] * (1.0 + half_over_r0), -data[i] * half_over_r0
            elif order == 3:
                r0, r1, hi = h[i + 1] / h[i], h[i + 2] / h[i], h[i]
                e = torch.expm1(-hi)
                p_coef = alpha_prev[i] * (e / hi + 1.0)
                q_coef = -alpha_prev[i] * ((e + hi) / hi ** 2 - 0.5)
                a = p_coef * (1.0 + r0 / (r0 + r1)) + q_coef / (r0 + r1)
                b = -p_coef * r0 / (r0 + r1) - q_coef / (r0 + r1)
                c0[i], c1[i], c2[i] = data[i] + a / r0, -a / r0 + b / r1, -b / r1
        return {"dpmpp_sigma_ratio": ratio, "dpmpp_x0_coef": c0, "dpmpp_prev_coef": c1, "dpmpp_prev2_coef": c2,
                "dpmpp_noise_coef": noise}


def dpmpp_coefficients(schedule: NoiseSchedule, sde: bool = False) -> Dict[str, torch.Tensor]:
    """DPM-Solver++(2M)'s rows (or its SDE variant's) on ``schedule``'s chain: :meth:`DPMSolver.coefficients`."""
    return DPMSolver(sde=bool(sde)).coefficients(schedule)


def dpmpp_2m_step(
    spec: StepSpec,
    model_output: torch.Tensor,
    t,
    x_t: torch.Tensor,
    previous_x0: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    older_x0: Optional[torch.Tensor] = None,
    solver: Optional[DPMSolver] = None,
    noise: Optional[torch.Tensor] = None,
    seed=None,
    noise_offset=0,
    index_base=0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One DPM-Solver++ step (``spec.sampler`` "dpmpp_2m"; deterministic) or one of its SDE variant
    ("dpmpp_2m_sde": noise ``noise``, or the Philox stream of ``seed`` at ``noise_offset``) from
    chain index t to t - 1; returns (x_{t-1}, D0 = this step's predicted x_0). ``solver`` (a
    :class:`DPMSolver`; default: 2M, its variant by ``spec``) has the math and each step's order;
    ``previous_x0`` is D0_prev and ``older_x0`` D0_prev2 (read by third-order steps only)."""
    if solver is None:
        solver = DPMSolver(sde=spec.adds_noise)
    dtype = _compute_dtype(x_t)
    x = x_t.to(dtype)
    mean_output, _ = _split_model_output(model_output, x_t, spec.variance_type)
    d0 = predict_x0(mean_output.to(dtype), t, x, schedule, spec.prediction_type, spec.clip_range)
    ratio, c0, c1, c2, noise_coef = _solver_column(solver.table(schedule, x.device, dtype), t, x.device)
    x_prev = ratio * x + c0 * d0 + c1 * previous_x0.to(dtype)
    if older_x0 is not None:
        x_prev = x_prev + c2 * older_x0.to(dtype)
    if spec.adds_noise:
        x_prev = x_prev + noise_coef * _noise_like(x_t, noise, seed, noise_offset, index_base, dtype)
    return x_prev.to(x_t.dtype), d0.to(x_t.dtype)


# ---------------------------------------------------------------------------------------------
# UniPC (Zhao et al. 2023): the multistep predictor-corrector, data prediction
# ---------------------------------------------------------------------------------------------
# Per chain index i, what one fused step combines (m = this step's x_0, m_prev the step before's,
# C the corrector's part carried from the step before, xc the corrected sample):
#   xc = u x + C + g m,   x_{i-1} = a xc + b m + c m_prev,   C' = ca xc + cb m + cc m_prev.
UNIPC_ROWS = ("unipc_u", "unipc_g", "unipc_a", "unipc_b", "unipc_c", "unipc_ca", "unipc_cb", "unipc_cc")
UNIPC_VARIANTS = ("bh1", "bh2")


@dataclasses.dataclass(frozen=True)
class UniPC:
    """The settings of a UniPC chain (diffusers' ``UniPCMultistepScheduler`` names): the predictor's
    order (1 or 2; the corrector's is the predictor's of the step before, so UniPC-p is of order
    p + 1), B(h) of ``variant`` "bh1" (B(h) = h) or "bh2" (B(h) = e^h - 1), a first-order last step
    (``lower_order_final``), and the steps whose following corrector is skipped
    (``disable_corrector``, diffusers' step numbers, 0 = the chain's first)."""

    order: int = 2
    variant: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: FrozenSet[int] = frozenset()

    def __post_init__(self):
        if self.order not in (1, 2):
            raise ValueError(f"order must be 1 or 2 for the fused UniPC step, got {self.order!r}")
        check_choice("variant", self.variant, UNIPC_VARIANTS)
        object.__setattr__(self, "disable_corrector", frozenset(int(k) for k in self.disable_corrector))

    def coefficients(self, schedule: NoiseSchedule) -> Dict[str, torch.Tensor]:
        """The rows of :data:`UNIPC_ROWS` on ``schedule``'s chain (float64, computed once per chain)."""
        return schedule.derived(("unipc", self), self._derive)

    def table(self, schedule: NoiseSchedule, device, dtype=torch.float32) -> torch.Tensor:
        """:meth:`coefficients` packed for the kernel (``kernels/unipc.py``)."""
        return schedule.derived_table(("unipc", self), self._derive, UNIPC_ROWS, device, dtype)

    def _derive(self, schedule: NoiseSchedule) -> Dict[str, torch.Tensor]:
        """The combined coefficients of the chain's steps, in the order they run (k = 0 is the chain's
        top, index T - 1; level k + 1 is where step k lands, the last one final_alpha_cumprod).

        With alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar), lambda = log(alpha / sigma),
        h_k = lambda_{k+1} - lambda_k, phi = e^{-h_k} - 1, B = phi (bh2) or -h_k (bh1) and
        r_k = (lambda_{k-1} - lambda_k) / h_k, step k from x_k with this step's x_0 m_k:

        * UniC (k > 0, unless step k - 1 is in ``disable_corrector``), of the order p of the step
          before: xc_k = (sigma_k / sigma_{k-1}) xc_{k-1} - alpha_k phi m_{k-1}
          - alpha_k B (rho_0 (m_{k-2} - m_{k-1}) / r_{k-1} + rho_1 (m_k - m_{k-1})), with rho_1 = 1/2,
          rho_0 = 0 where p = 1, and otherwise (rho_0, rho_1) solving [[1, 1], [r, 1]] rho =
          (b_1, b_2), b_1 = (phi / -h - 1) / B, b_2 = 2 ((phi / -h - 1) / -h - 1/2) / B;
        * UniP of order p (1 at the first step, at the last with ``lower_order_final``, 2 between
          for order 2): x_{k+1} = (sigma_{k+1} / sigma_k) xc_k - alpha_{k+1} phi m_k
          - alpha_{k+1} B (1/2) (m_{k-1} - m_k) / r_k where p = 2.

        Everything of the corrector at k + 1 but its m_{k+1} term is known at step k: it is carried
        in C (the ``ca``, ``cb``, ``cc`` rows), so a step reads x, the model output, C and m_prev
        once and writes x, C and m_prev."""
        n = schedule.num_timesteps
        levels = torch.cat([schedule.alphas_cumprod.flip(0),
                            torch.tensor([schedule.final_alpha_cumprod], dtype=torch.float64)])
        alpha, sigma = levels.sqrt(), (1.0 - levels).sqrt()
        lam = _half_log_snr(levels)  # +inf where alpha_bar = 1
        rows = {name: torch.zeros(n, dtype=torch.float64) for name in UNIPC_ROWS}
        u, g = torch.zeros(n + 1, dtype=torch.float64), torch.zeros(n + 1, dtype=torch.float64)
        u[0] = 1.0
        for k in range(n):
            h = (lam[k + 1] - lam[k]).item()
            hh = -h
            phi = math.expm1(hh)
            big_b = phi if self.variant == "bh2" else hh
            order = min(self.order, k + 1, (n - k) if self.lower_order_final else self.order)
            r = (lam[k - 1] - lam[k]).item() / h if order == 2 else None
            a = (sigma[k + 1] / sigma[k]).item()
            to = alpha[k + 1].item()
            base_m = -to * phi
            i = n - 1 - k  # the chain index of step k
            rows["unipc_a"][i] = a
            rows["unipc_b"][i] = base_m + (to * big_b * 0.5 / r if order == 2 else 0.0)
            rows["unipc_c"][i] = -to * big_b * 0.5 / r if order == 2 else 0.0
            if k + 1 < n and k not in self.disable_corrector:  # the corrector of step k + 1
                if order == 1:
                    rho0, rho1 = 0.0, 0.5
                else:
                    phi_k1 = phi / hh - 1.0
                    b1 = phi_k1 / big_b
                    b2 = 2.0 * (phi_k1 / hh - 0.5) / big_b
                    rho0 = (b1 - b2) / (1.0 - r)
                    rho1 = b1 - rho0
                rows["unipc_ca"][i] = a
                rows["unipc_cb"][i] = base_m + to * big_b * ((rho0 / r if order == 2 else 0.0) + rho1)
                rows["unipc_cc"][i] = -to * big_b * rho0 / r if order == 2 else 0.0
                g[k + 1] = -to * big_b * rho1
            else:
                u[k + 1] = 1.0
        rows["unipc_u"] = u[:n].flip(0).clone()
        rows["unipc_g"] = g[:n].flip(0).clone()
        return rows


def unipc_step(
    spec: StepSpec,
    model_output: torch.Tensor,
    t,
    x_t: torch.Tensor,
    corrector: torch.Tensor,
    previous_x0: torch.Tensor,
    schedule: NoiseSchedule,
    solver: UniPC = UniPC(),
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One UniPC step (the corrector of the step before, then the predictor) from chain index t to
    t - 1; returns (x_{t-1}, the corrector's part C for the next step, this step's x_0).
    ``corrector`` and ``previous_x0`` are the step before's (zeros before the first step);
    :meth:`UniPC._derive` has the math. Deterministic: no noise."""
    dtype = _compute_dtype(x_t)
    x = x_t.to(dtype)
    mean_output, _ = _split_model_output(model_output, x_t, spec.variance_type)
    m = predict_x0(mean_output.to(dtype), t, x, schedule, spec.prediction_type, spec.clip_range)
    u, g, a, b, c, ca, cb, cc = _solver_column(solver.table(schedule, x.device, dtype), t, x.device)
    m_prev = previous_x0.to(dtype)
    xc = u * x + corrector.to(dtype) + g * m
    x_prev = a * xc + b * m + c * m_prev
    carried = ca * xc + cb * m + cc * m_prev
    return x_prev.to(x_t.dtype), carried.to(x_t.dtype), m.to(x_t.dtype)


def ddpm_step(model_output, t, x_t, schedule, *, prediction_type="epsilon", variance_type="fixed_small",
              clip_denoised=True, clip_range=1.0, noise=None, seed=None, noise_offset=0, index_base=0):
    """:func:`step` of a DDPM spec; returns (x_{t-1}, predicted x_0)."""
    spec = StepSpec.build("ddpm", prediction_type=prediction_type, variance_type=variance_type,
                          clip_denoised=clip_denoised, clip_range=clip_range)
    return step(spec, model_output, t, x_t, schedule, noise=noise, seed=seed, noise_offset=noise_offset,
                index_base=index_base)


def ddim_step(model_output, t, x_t, schedule, *, eta=0.0, prediction_type="epsilon", clip_denoised=True,
              clip_range=1.0, noise=None, seed=None, noise_offset=0, index_base=0):
    """:func:`step` of a DDIM spec; returns (x_{t-1}, predicted x_0)."""
    spec = StepSpec.build("ddim", prediction_type=prediction_type, clip_denoised=clip_denoised,
                          clip_range=clip_range, eta=eta)
    return step(spec, model_output, t, x_t, schedule, noise=noise, seed=seed, noise_offset=noise_offset,
                index_base=index_base)


# ---------------------------------------------------------------------------------------------
# time embedding
# ---------------------------------------------------------------------------------------------
def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    *,
    max_period: float = 10000.0,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
) -> torch.Tensor:
    """Sinusoidal embedding [len(t), dim] in float32.

    freq_k = exp(-ln(max_period) * k / (dim//2 - downscale_freq_shift)), k < dim//2, output
    [sin(scale t freq), cos(scale t freq)] (cos first with ``flip_sin_to_cos``), zero-padded to an
    odd ``dim``. The defaults are the original DDPM code (and diffusers' get_timestep_embedding);
    improved-diffusion's is ``flip_sin_to_cos=True, downscale_freq_shift=0``.
    """
    half = dim // 2
    t = t.reshape(-1)
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))
    args = scale * (t.to(torch.float32)[:, None] * freqs[None, :])
    first, second = (torch.cos(args), torch.sin(args)) if flip_sin_to_cos else (torch.sin(args), torch.cos(args))
    emb = torch.cat([first, second], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
