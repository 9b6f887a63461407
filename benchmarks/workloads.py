"""What the benchmarks measure: per-step kernels and their baselines, end-to-end sampling and
training steps, each as a zero-argument callable built once (inputs allocated up front).

Kernel implementations, for every op:

* ``fastddpm``  -- :mod:`fastddpm.ops` with ``backend="triton"`` (GPU only). Noise is drawn
  in-kernel from a Philox seed held in a device tensor, so nothing is synchronised or copied.
* ``reference`` -- :mod:`fastddpm.reference` in eager PyTorch, noise from ``torch.randn_like``
  (what a plain PyTorch step costs; the reference's bit-exact Philox noise is a test oracle,
  not a baseline anyone would run). This is the ``backend="reference"`` math without the
  argument checks of :mod:`fastddpm.ops`.
* ``compile``   -- ``torch.compile`` (default mode, static shapes) of that same function (GPU only).
* ``diffusers`` -- diffusers doing the same work: ``DDPMScheduler.step`` (epsilon prediction,
  clipped x_0, fixed_small variance, variance noise drawn by the scheduler), ``add_noise`` after
  ``torch.randn_like``, ``get_timestep_embedding``.

fastddpm's package modules (sampling, models, training) are imported lazily inside functions:
they may be missing in a partial checkout, and the runner records that as the row's error.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch

OPS = ("ddpm_step", "dpmpp_2m", "unipc", "q_sample", "timestep_embedding")
IMPLS = ("fastddpm", "reference", "compile", "diffusers")
# Implementations the runners measure on a GPU only: the Triton kernels need one, and
# torch.compile on a CPU would spend minutes compiling every (size, dtype) for a CPU figure
# nobody asked for.
GPU_ONLY_IMPLS = ("fastddpm", "compile")
# Implementations per op: the time embedding has no torch.compile baseline in the issue.
OP_IMPLS = {
    "ddpm_step": IMPLS,
    "dpmpp_2m": IMPLS,
    "unipc": IMPLS,
    "q_sample": IMPLS,
    "timestep_embedding": ("fastddpm", "reference", "diffusers"),
}
STEP_TIMESTEP = 500  # mid-chain: noise is added, nothing is special-cased
EMBEDDING_DIM = 128  # the DDPM CIFAR-10 UNet's base width
SEED = 1234
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------
# byte models: the traffic an op MUST move, whoever implements it
# ---------------------------------------------------------------------------------------------
def bytes_moved(op: str, numel: int, dtype: torch.dtype) -> int:
    """Minimum bytes read + written by one call, the numerator of every GB/s figure.

    * ddpm_step: read x_t and the model output, write x_{t-1}: 3 * N * itemsize. The noise is
      not counted: it can be generated in registers (fastddpm does), so a baseline that writes
      it to memory and reads it back pays for that in time, not in this byte count.
      (Writing the predicted x_0 too would make it 4 * N; the sampling loop does not need it.)
    * dpmpp_2m: read x_t, the model output and the previous x_0, write x_{t-1} and this step's
      x_0 (the next step's previous one): 5 * N * itemsize.
    * unipc: read x_t, the model output, the corrector's part carried from the step before and the
      previous x_0, write x_{t-1}, the next corrector's part and this step's x_0: 7 * N * itemsize
      (diffusers' layout, the last sample and two x_0s, needs as many).
    * q_sample: read x_0, write x_t and eps (the training loss needs eps): 3 * N * itemsize.
    * timestep_embedding: read N int64 timesteps, write N x dim float32.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    if op in ("ddpm_step", "q_sample"):
        return 3 * numel * itemsize
    if op == "dpmpp_2m":
        return 5 * numel * itemsize
    if op == "unipc":
        return 7 * numel * itemsize
    if op == "timestep_embedding":
        return numel * 8 + numel * EMBEDDING_DIM * 4
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


def copy_bytes(numel: int, dtype: torch.dtype) -> int:
    """A copy reads and writes every byte once."""
    return 2 * numel * torch.empty((), dtype=dtype).element_size()


def image_shape(numel: int) -> Tuple[int, ...]:
    """An image-batch shape [B, 4, 32, 32] holding ``numel`` elements (flat [1, N] otherwise)."""
    per_sample = 4 * 32 * 32
    if numel % per_sample == 0:
        return (numel // per_sample, 4, 32, 32)
    return (1, numel)


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
def reference_step_with_randn(model_output, t, x_t, schedule):
    """The reference DDPM step with torch.randn noise; returns x_{t-1} only (so that a compiled
    version need not write x_0)."""
    from fastddpm import reference

    noise = torch.randn_like(x_t)
    return reference.ddpm_step(model_output, t, x_t, schedule, noise=noise)[0]


def reference_dpmpp_2m(model_output, t, x_t, previous_x0, schedule):
    """The reference DPM-Solver++(2M) step (epsilon, no clipping, as diffusers' default)."""
    from fastddpm import reference
    from fastddpm.step import StepSpec

    return reference.dpmpp_2m_step(StepSpec("dpmpp_2m", clip_range=None), model_output, t, x_t, previous_x0, schedule)


def reference_unipc(model_output, t, x_t, corrector, previous_x0, schedule):
    """The reference UniPC step (bh2, order 2, epsilon, no clipping, as diffusers' default)."""
    from fastddpm import reference
    from fastddpm.step import StepSpec

    return reference.unipc_step(StepSpec("unipc", clip_range=None), model_output, t, x_t, corrector, previous_x0,
                                schedule)


def reference_q_sample_with_randn(x0, t, schedule):
    """The reference forward noising with torch.randn noise; returns (x_t, eps)."""
    from fastddpm import reference

    return reference.q_sample(x0, t, schedule, noise=torch.randn_like(x0))


def _compiled(fn):
    # A fresh dynamo cache per case: every (size, dtype) recompiles anyway, and a shared cache
    # would hit dynamo's recompile limit and silently fall back to eager.
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def build_kernel_case(op: str, impl: str, numel: int, dtype: torch.dtype, device: str) -> Callable[[], object]:
    """A zero-argument callable running one call of ``op`` by ``impl`` on fresh inputs.

    For ``timestep_embedding`` ``numel`` is the number of timesteps (the batch) and ``dtype``
    is ignored (timesteps are int64, the embedding float32).
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if impl not in OP_IMPLS[op]:
        raise ValueError(f"impl for {op} must be one of {OP_IMPLS[op]}, got {impl!r}")
    if impl == "fastddpm" and device != "cuda":
        raise ValueError(f"impl 'fastddpm' (the Triton kernels) needs device 'cuda', got {device!r}")
    generator = torch.Generator(device=device).manual_seed(SEED)
    if op == "timestep_embedding":
        return _embedding_case(impl, numel, device, generator)
    shape = image_shape(numel)
    if op == "ddpm_step":
        return _step_case(impl, shape, dtype, device, generator)
    if op == "dpmpp_2m":
        return _dpmpp_case(impl, shape, dtype, device, generator)
    if op == "unipc":
        return _unipc_case(impl, shape, dtype, device, generator)
    return _q_sample_case(impl, shape, dtype, device, generator)


def _device_int(value: int, device: str) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int64, device=device)


def _step_case(impl, shape, dtype, device, generator):
    from fastddpm import NoiseSchedule, ops

    x_t = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    model_output = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if impl == "diffusers":
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True,
                                  variance_type="fixed_small", prediction_type="epsilon")
        scheduler.set_timesteps(1000)
        return lambda: scheduler.step(model_output, STEP_TIMESTEP, x_t).prev_sample
    schedule = NoiseSchedule.linear(1000)
    # Indices and seeds live on the device: a Python int would be copied host-to-device each call.
    t = _device_int(STEP_TIMESTEP, device)
    if impl == "fastddpm":
        seed, offset = _device_int(SEED, device), _device_int(0, device)
        out = torch.empty_like(x_t)
        schedule.table(device, torch.float32)  # build the cached coefficient table outside the timing
        base = _device_int(0, device)
        return lambda: ops.ddpm_step(model_output, t, x_t, schedule, seed=seed, noise_offset=offset, index_base=base,
                                     out=out, return_pred_x0=False, backend="triton")[0]
    fn = _compiled(reference_step_with_randn) if impl == "compile" else reference_step_with_randn
    # Shape [1], not []: indexing the coefficient row with a 0-d tensor becomes .item(), which
    # inductor cannot compile (it would fall back to eager around it); a [1] index is a gather.
    t_vector = t.reshape(1)
    return lambda: fn(model_output, t_vector, x_t, schedule)


def _dpmpp_case(impl, shape, dtype, device, generator):
    """A mid-chain second-order step of a 20-step chain (diffusers' default spacing)."""
    from fastddpm import NoiseSchedule, ops, reference
    from fastddpm.samplers import SAMPLERS
    from fastddpm.step import StepSpec

    x_t = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    model_output = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    previous = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if impl == "diffusers":
        from diffusers import DPMSolverMultistepScheduler

        scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                                algorithm_type="dpmsolver++", solver_order=2)
        scheduler.set_timesteps(20)
        middle = scheduler.timesteps[10]

        def diffusers_step():
            # The scheduler keeps the previous x_0 itself; hold it at a mid-chain second-order step.
            scheduler._step_index = 10
            scheduler.model_outputs = [None, previous]  # shifted by step(): [previous, this step's]
            scheduler.lower_order_nums = 2
            return scheduler.step(model_output, middle, x_t).prev_sample

        return diffusers_step
    chain = SAMPLERS["dpmpp_2m"].schedule(NoiseSchedule.linear(1000), 20)
    index = _device_int(9, device)
    if impl == "fastddpm":
        spec = StepSpec("dpmpp_2m", clip_range=None)
        kernels = ops.kernel_module("dpm_solver", interpret=False)
        table, solver_table = chain.table(device, torch.float32), reference.DPMSolver().table(chain, device)
        out = torch.empty_like(x_t)
        return lambda: kernels.dpmpp_2m(spec, model_output, index, x_t, previous, table, solver_table, out=out)
    fn = _compiled(reference_dpmpp_2m) if impl == "compile" else reference_dpmpp_2m
    index_vector = index.reshape(1)
    return lambda: fn(model_output, index_vector, x_t, previous, chain)


def _unipc_case(impl, shape, dtype, device, generator):
    """A mid-chain step of a 20-step chain (diffusers' default spacing) with the corrector of the
    step before and a second-order predictor."""
    from fastddpm import NoiseSchedule, ops, reference
    from fastddpm.samplers import SAMPLERS
    from fastddpm.step import StepSpec

    x_t, model_output, corrector, previous = (
        torch.randn(shape, generator=generator, device=device, dtype=dtype) for _ in range(4))
    if impl == "diffusers":
        from diffusers import UniPCMultistepScheduler

        scheduler = UniPCMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear")
        scheduler.set_timesteps(20)
        middle = scheduler.timesteps[10]
        before = torch.randn(shape, generator=generator, device=device, dtype=dtype)

        def diffusers_step():
            # Hold the scheduler at a mid-chain step: the last sample, two x_0s, order 2 both ways.
            scheduler._step_index = 10
            scheduler.model_outputs = [before, previous]
            scheduler.last_sample = corrector
            scheduler.this_order = 2
            scheduler.lower_order_nums = 2
            return scheduler.step(model_output, middle, x_t).prev_sample

        return diffusers_step
    chain = SAMPLERS["unipc"].schedule(NoiseSchedule.linear(1000), 20)
    index = _device_int(9, device)
    if impl == "fastddpm":
        spec = StepSpec("unipc", clip_range=None)
        kernels = ops.kernel_module("unipc", interpret=False)
        table, solver_table = chain.table(device, torch.float32), reference.UniPC().table(chain, device)
        out = torch.empty_like(x_t)
        # the buffers are overwritten each call; the values stay of the same size over repeats
        return lambda: kernels.unipc(spec, model_output, index, x_t, corrector, previous, table, solver_table,
                                     out=out)
    fn = _compiled(reference_unipc) if impl == "compile" else reference_unipc
    index_vector = index.reshape(1)
    return lambda: fn(model_output, index_vector, x_t, corrector, previous, chain)


def _q_sample_case(impl, shape, dtype, device, generator):
    from fastddpm import NoiseSchedule, ops

    x0 = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    # One timestep per sample, as in training.
    t = torch.randint(0, 1000, (shape[0],), generator=generator, device=device)
    if impl == "diffusers":
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")

        def diffusers_q_sample():
            noise = torch.randn_like(x0)
            return scheduler.add_noise(x0, noise, t), noise

        return diffusers_q_sample
    schedule = NoiseSchedule.linear(1000)
    if impl == "fastddpm":
        seed, offset = _device_int(SEED, device), _device_int(0, device)
        out = torch.empty_like(x0)
        schedule.table(device, torch.float32)
        base = _device_int(0, device)
        return lambda: ops.q_sample(x0, t, schedule, seed=seed, noise_offset=offset, index_base=base,
                                    return_noise=True, out=out, backend="triton")
    fn = _compiled(reference_q_sample_with_randn) if impl == "compile" else reference_q_sample_with_randn
    return lambda: fn(x0, t, schedule)


def _embedding_case(impl, batch, device, generator):
    from fastddpm import ops

    t = torch.randint(0, 1000, (batch,), generator=generator, device=device)
    if impl == "diffusers":
        from diffusers.models.embeddings import get_timestep_embedding

        return lambda: get_timestep_embedding(t, EMBEDDING_DIM, flip_sin_to_cos=False, downscale_freq_shift=1)
    backend = "triton" if impl == "fastddpm" else "reference"
    return lambda: ops.timestep_embedding(t, EMBEDDING_DIM, backend=backend)


def build_copy(numel: int, device: str) -> Callable[[], object]:
    """A device-to-device copy of ``numel`` float32 elements (the roofline)."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


# ---------------------------------------------------------------------------------------------
# models for the end-to-end runs
# ---------------------------------------------------------------------------------------------
# The UNet2DModel configuration of the DDPM CIFAR-10 checkpoint (google/ddpm-cifar10-32), built
# with random weights: nothing is downloaded.
DDPM_CIFAR10_UNET2D = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    act_fn="silu", attention_head_dim=None, center_input_sample=False, downsample_padding=0,
    flip_sin_to_cos=False, freq_shift=1, mid_block_scale_factor=1, norm_eps=1e-6, norm_num_groups=32,
    time_embedding_type="positional",
)
# A tiny UNet2DModel for CPU runs: same block kinds, two levels, 16x16.
TINY_UNET2D = dict(
    sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
)


def make_diffusers_unet(config: Dict, device: str, dtype: torch.dtype, seed: int = SEED):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(**config).to(device)
    # .to(dtype) only when needed: diffusers warns on every dtype cast of a UNet2DModel.
    return (unet if dtype == torch.float32 else unet.to(dtype)).eval()


def make_fastddpm_model(preset: str, device: str, dtype: torch.dtype, seed: int = SEED):
    from fastddpm.models import create_model

    torch.manual_seed(seed)
    return create_model(preset).to(device=device, dtype=dtype).eval()


def sample_shape_of(model, batch: int) -> Tuple[int, ...]:
    """[batch, C, H, W] a model samples: from a UNet2DModel's config or fastddpm's model config."""
    unet = getattr(model, "unet", model)
    config = getattr(unet, "config", None)
    if config is not None and hasattr(config, "sample_size"):
        side = config.sample_size
        return (batch, config.in_channels, side, side)
    if isinstance(config, dict) and "image_size" in config:
        return (batch, config["in_channels"], config["image_size"], config["image_size"])
    size = getattr(unet, "image_size", None)
    channels = getattr(unet, "in_channels", None)
    if size is None or channels is None:
        raise ValueError("cannot tell the sample shape of this model (no config with image_size/in_channels)")
    return (batch, channels, size, size)


def pipeline_runner(unet, sampler: str, steps: int, batch: int, device: str) -> Callable[[], object]:
    """diffusers DDPMPipeline / DDIMPipeline (default schedulers: linear betas, clipped x_0)."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

    if sampler == "ddpm":
        pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))
    else:
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=device).manual_seed(SEED)
    options = dict(batch_size=batch, num_inference_steps=steps, output_type="pt", generator=generator)
    if sampler == "ddim":
        options["eta"] = 0.0
    return lambda: pipe(**options)


def fastddpm_runner(model, shape, sampler: str, steps: int, device: str, dtype: torch.dtype,
                    cuda_graph, noise: str = "seed") -> Callable[[], object]:
    """fastddpm.sample with the same model and precision. ``noise="seed"``: Philox noise keyed by
    a seed (in-kernel on a GPU, the pure-PyTorch Philox on a CPU); ``"generator"``: noise from
    torch.randn with a torch.Generator, as diffusers draws it. A diffusers UNet2DModel is passed
    as is (fastddpm.sample reads its ``.sample`` output)."""
    from fastddpm.sampling import sample

    if noise not in ("seed", "generator"):
        raise ValueError(f"noise must be 'seed' or 'generator', got {noise!r}")

    def run():
        source = dict(seed=SEED) if noise == "seed" else dict(generator=torch.Generator(device=device).manual_seed(SEED))
        return sample(model, shape, sampler=sampler, num_steps=steps, eta=0.0, device=device, dtype=dtype,
                      progress=False, cuda_graph=cuda_graph, **source)

    return run


def model_only_runner(model_call: Callable, shape, timesteps, device: str, dtype: torch.dtype,
                      cuda_graph: bool = False) -> Callable[[], object]:
    """The model alone, once per timestep, on a fixed input: the loop minus the sampler's work.

    ``model_call(x, t)`` gets ``t`` as produced by ``timesteps`` (the exact objects the full loop
    passes). With ``cuda_graph`` one call is captured (the last timestep's) and replayed.
    """
    x = torch.randn(shape, device=device, dtype=dtype)
    if not cuda_graph:
        def run():
            with torch.no_grad():
                for t in timesteps:
                    model_call(x, t)
        return run
    t_static = timesteps[-1]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad():
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up on a side stream, as capture requires
                model_call(x, t_static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model_call(x, t_static)
    count = len(timesteps)

    def replay():
        for _ in range(count):
            graph.replay()

    return replay


# ---------------------------------------------------------------------------------------------
# training step
# ---------------------------------------------------------------------------------------------
TRAINING_Q_IMPLS = ("fastddpm", "fastddpm+randn", "reference")


def training_step_runner(model, shape, q_impl: str, device: str, *, lr: float = 2e-4) -> Callable[[], torch.Tensor]:
    """One optimisation step of the DDPM simple loss (fastddpm.losses.training_losses): noise
    x_0, predict eps, loss, backward, Adam. ``q_impl``:

    * ``fastddpm``: the q_sample kernel drawing eps in-kernel (and writing it for the loss);
    * ``fastddpm+randn``: eps from torch.randn, then the kernel (what fastddpm.train does, so
      that its noise comes from a torch.Generator);
    * ``reference``: eps from torch.randn, then the eager reference.
    """
    from fastddpm import NoiseSchedule, ops
    from fastddpm.losses import training_losses

    if q_impl not in TRAINING_Q_IMPLS:
        raise ValueError(f"q_impl must be one of {TRAINING_Q_IMPLS}, got {q_impl!r}")
    if q_impl != "reference" and device != "cuda":
        raise ValueError(f"q_impl {q_impl!r} uses the Triton kernel and needs device 'cuda', got {device!r}")
    schedule = NoiseSchedule.linear(1000)
    schedule.table(device, torch.float32)
    x0 = torch.randn(shape, device=device).clamp_(-1, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    seed = _device_int(SEED, device)
    # Advanced on the device each step, so every step draws fresh noise without a host copy.
    noise_offset = _device_int(0, device)
    model.train()

    def step():
        t = torch.randint(0, 1000, (shape[0],), device=device)
        if q_impl == "fastddpm":
            x_t, eps = ops.q_sample(x0, t, schedule, seed=seed, noise_offset=noise_offset, return_noise=True,
                                    backend="triton")
            noise_offset.add_(1)
        elif q_impl == "fastddpm+randn":
            eps = torch.randn_like(x0)
            x_t = ops.q_sample(x0, t, schedule, noise=eps, backend="triton")
        else:
            x_t, eps = reference_q_sample_with_randn(x0, t, schedule)
        per_sample, _ = training_losses(model(x_t, t), x0, x_t, eps, t, schedule)
        loss = per_sample.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def finite(value) -> bool:
    """Whether every tensor in ``value`` (tensor, tuple, output object) is finite: a cheap check
    that a timed call computed something."""
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value.float()).all())
    if isinstance(value, (tuple, list)):
        return all(finite(v) for v in value if v is not None)
    for attr in ("prev_sample", "images", "sample"):
        inner = getattr(value, attr, None)
        if isinstance(inner, torch.Tensor):
            return finite(inner)
    return True


def params_millions(model) -> float:
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
