"""The launches ``benchmarks/sass.py`` compiles: one ``Variant`` a row (which kernel, launcher, dtype, and
the tensors it streams). A new kernel gets its rows here."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, List, Tuple


# ---------------------------------------------------------------------------------------------
# variants
# ---------------------------------------------------------------------------------------------
# One representative launch per row. ``build(torch, dtype, launcher)`` returns the launcher's (args, kwargs)
# on CPU tensors; ``reads``/``writes`` count the per-element tensors the launch streams (the
# byte model of benchmarks/README.md) and give the number of 128-bit accesses to expect.
# ``per_program`` names the constexprs whose product is the elements one program handles.

BATCH, CHANNELS, HEIGHT, WIDTH = 16, 4, 32, 32  # 64K elements, 4096 a sample: every size a multiple of 16
T_STEP = 500
EMBED_BATCH, EMBED_DIM = 128, 128  # the DDPM CIFAR-10 UNet's time-embedding width

# Launcher keywords the compiled path of fastddpm.ops passes (fastddpm.ops: fast_math=True on the
# triton backend); a keyword the launcher does not take is left out and the report says so.
OPS_KWARGS = {"fast_math": True}
# Launcher keywords for in-kernel noise: int64 scalar tensors, passed where the launcher takes them.
NOISE_SCALARS = {"seed": 1234, "noise_offset": 7, "index_base": 0}


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    module: str  # kernels/<module>.py
    kernel: str  # the @triton.jit function the launcher starts
    launcher: str
    dtype: str  # storage dtype of the streamed tensors
    build: Callable  # (torch, torch dtype, launcher) -> (args, kwargs) of the launcher
    reads: int
    writes: int
    per_program: Tuple[str, ...] = ("BLOCK",)
    description: str = ""


def _schedule_table(torch):
    from fastddpm.schedule import NoiseSchedule

    return NoiseSchedule.linear(1000).table("cpu", torch.float32)


def _noise_kwargs(torch, launcher):
    taken = inspect.signature(launcher).parameters
    return {name: torch.tensor(value, dtype=torch.int64) for name, value in NOISE_SCALARS.items() if name in taken}


def _step(sampler="ddpm", variance_type="fixed_small", eta=0.0, given_noise=False, learned=False):
    def build(torch, dtype, launcher):
        x = torch.randn(BATCH, CHANNELS, HEIGHT, WIDTH).to(dtype)
        model_output = torch.randn(BATCH, 2 * CHANNELS if learned else CHANNELS, HEIGHT, WIDTH).to(dtype)
        t = torch.tensor(T_STEP, dtype=torch.int64)
        from fastddpm.step import StepSpec

        spec = StepSpec(sampler, "epsilon", variance_type, clip_range=1.0, eta=eta)
        kwargs = dict(out=torch.empty_like(x), pred_x0_out=None)
        if spec.adds_noise and given_noise:
            kwargs["noise"] = torch.randn(x.shape).to(dtype)
        elif spec.adds_noise:
            kwargs.update(_noise_kwargs(torch, launcher))
        return (spec, model_output, t, x, _schedule_table(torch)), kwargs

    return build


def _q_sample(given_noise=False):
    def build(torch, dtype, launcher):
        x0 = torch.randn(BATCH, CHANNELS, HEIGHT, WIDTH).to(dtype)
        t = torch.arange(BATCH, dtype=torch.int64) * 50  # one timestep per sample, as in training
        kwargs = dict(out=torch.empty_like(x0))
        if given_noise:
            kwargs["noise"] = torch.randn(x0.shape).to(dtype)
        else:  # fastddpm.ops returns eps, so the kernel writes it
            kwargs.update(_noise_kwargs(torch, launcher), noise_out=torch.empty_like(x0))
        return (x0, t, _schedule_table(torch)), kwargs

    return build


def _dpmpp_2m(sde=False, third=False):
    def build(torch, dtype, launcher):
        from fastddpm.reference import DPMSolver
        from fastddpm.schedule import NoiseSchedule
        from fastddpm.step import StepSpec

        x = torch.randn(BATCH, CHANNELS, HEIGHT, WIDTH).to(dtype)
        chain = NoiseSchedule.linear(1000).respace_evenly(20)
        spec = StepSpec("dpmpp_2m_sde" if sde else "dpmpp_2m", clip_range=None)
        solver = DPMSolver(sde=sde, orders=(1, 2) + (3,) * 16 + (2, 1) if third else None)
        args = (spec, torch.randn(x.shape).to(dtype), torch.tensor(10, dtype=torch.int64), x,
                torch.randn(x.shape).to(dtype), chain.table("cpu", torch.float32), solver.table(chain, "cpu"))
        kwargs = dict(out=torch.empty_like(x))
        if third:
            kwargs["older_x0"] = torch.randn(x.shape).to(dtype)
        if sde:
            kwargs.update(_noise_kwargs(torch, launcher))
        return args, kwargs

    return build


def _unipc(torch, dtype, launcher):
    from fastddpm.reference import UniPC
    from fastddpm.schedule import NoiseSchedule
    from fastddpm.step import StepSpec

    x = torch.randn(BATCH, CHANNELS, HEIGHT, WIDTH).to(dtype)
    chain = NoiseSchedule.linear(1000).respace_evenly(20)
    spec = StepSpec("unipc", clip_range=None)
    args = (spec, torch.randn(x.shape).to(dtype), torch.tensor(10, dtype=torch.int64), x,
            torch.randn(x.shape).to(dtype), torch.randn(x.shape).to(dtype), chain.table("cpu", torch.float32),
            UniPC().table(chain, "cpu"))
    return args, dict(out=torch.empty_like(x))


def _embedding(torch, dtype, launcher):
    return (torch.arange(EMBED_BATCH, dtype=torch.int64) * 7, EMBED_DIM), {}


def _step_variants(prefix, description, build, dtypes, reads=2, writes=1):
    return [Variant(f"{prefix}.{d}", "reverse_step", "_reverse_step_kernel", "reverse_step", d, build, reads, writes,
                    description=description) for d in dtypes]


ALL_DTYPES = ("fp32", "bf16", "fp16")
VARIANTS: List[Variant] = [
    *_step_variants("ddpm.philox", "sampling-loop step: DDPM, epsilon, fixed_small, clip, in-kernel noise, "
                    "no x0 write, scalar t", _step(), ALL_DTYPES),
    *_step_variants("ddpm.noise", "the same with a given noise tensor", _step(given_noise=True), ALL_DTYPES,
                    reads=3),
    *_step_variants("ddim.eta0", "DDIM eta=0 (no noise), epsilon, clip, scalar t", _step(sampler="ddim"),
                    ("fp32", "bf16")),
    *_step_variants("ddpm.learned_range.philox", "DDPM learned_range (model output has 2C channels), "
                    "in-kernel noise", _step(variance_type="learned_range", learned=True), ("fp32",), reads=3),
    *[Variant(f"q_sample.philox.{d}", "q_sample", "_q_sample_kernel", "q_sample", d, _q_sample(), 1, 2,
              description="training q_sample: t per sample, in-kernel noise, eps written") for d in ("fp32", "bf16")],
    Variant("q_sample.noise.fp32", "q_sample", "_q_sample_kernel", "q_sample", "fp32", _q_sample(given_noise=True),
            2, 1, description="training q_sample: t per sample, given noise"),
    *[Variant(f"dpmpp_2m.{d}", "dpm_solver", "_dpmpp_2m_kernel", "dpmpp_2m", d, _dpmpp_2m(), 3, 2,
              description="DPM-Solver++(2M) step: epsilon, no clip, scalar t; writes x_prev and x0")
      for d in ("fp32", "bf16")],
    Variant("dpmpp_3m.fp32", "dpm_solver", "_dpmpp_2m_kernel", "dpmpp_2m", "fp32", _dpmpp_2m(third=True), 4, 3,
            description="DPM-Solver++(3M) step: epsilon, no clip, scalar t; writes x_prev and both x0 buffers"),
    *[Variant(f"dpmpp_2m_sde.philox.{d}", "dpm_solver", "_dpmpp_2m_kernel", "dpmpp_2m", d, _dpmpp_2m(sde=True), 3, 2,
              description="DPM-Solver++(2M) SDE step: epsilon, no clip, scalar t, in-kernel noise; writes x_prev "
                          "and x0") for d in ("fp32", "bf16")],
    *[Variant(f"unipc.{d}", "unipc", "_unipc_kernel", "unipc", d, _unipc, 4, 3,
              description="UniPC bh2 step (corrector + predictor): epsilon, no clip, scalar t; writes x_prev, "
                          "the corrector's part and x0") for d in ("fp32", "bf16")],
    Variant(f"embedding.dim{EMBED_DIM}", "timestep_embedding", "_timestep_embedding_kernel", "timestep_embedding",
            "fp32", _embedding, 0, 1, per_program=("BLOCK_B", "BLOCK_D"),
            description=f"sinusoidal embedding, {EMBED_BATCH} timesteps x {EMBED_DIM}"),
]

