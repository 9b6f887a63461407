"""pytest-benchmark groups of whole sampling runs and training steps.

On a GPU: diffusers' UNet2DModel in the DDPM CIFAR-10 configuration (random weights) under
DDPMPipeline / DDIMPipeline vs fastddpm.sample with the same model and precision, with and
without CUDA graphs, and training steps with the q_sample kernel vs the reference. On a CPU the
same comparisons with tiny models and a few steps (they double as a smoke test).
"""
import pytest
import torch

import workloads
from common import BENCH_DEVICE as DEVICE
from common import HAS_CUDA, synchronized, triton_interpreted

requires_gpu = pytest.mark.skipif(not HAS_CUDA or triton_interpreted(),
                                  reason="needs a CUDA device (and TRITON_INTERPRET unset)")

if HAS_CUDA:
    UNET_CONFIG, BATCHES, STEPS = workloads.DDPM_CIFAR10_UNET2D, [1, 128], dict(ddpm=100, ddim=50)
    TRAIN_PRESET, TRAIN_BATCH = "ddpm_cifar10", 128
else:
    UNET_CONFIG, BATCHES, STEPS = workloads.TINY_UNET2D, [2], dict(ddpm=4, ddim=4)
    TRAIN_PRESET, TRAIN_BATCH = "digits", 16
ROUNDS = 3

# (label, cuda_graph, noise source) of the fastddpm variants.
FASTDDPM_VARIANTS = [
    pytest.param(("fastddpm-seed", False, "seed"), id="fastddpm-seed"),
    pytest.param(("fastddpm-generator", False, "generator"), id="fastddpm-generator"),
    pytest.param(("fastddpm-seed-graph", True, "seed"), id="fastddpm-seed-graph", marks=requires_gpu),
]


@pytest.fixture(scope="module")
def unet():
    return workloads.make_diffusers_unet(UNET_CONFIG, DEVICE, torch.float32)


def _assert_samples(result, batch):
    images = getattr(result, "images", result)
    assert images.shape[0] == batch
    assert workloads.finite(images)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_pipeline(benchmark, unet, sampler, batch):
    benchmark.group = f"e2e {sampler} {STEPS[sampler]} steps b{batch}"
    run = workloads.pipeline_runner(unet, sampler, STEPS[sampler], batch, DEVICE)
    run()  # warm-up
    _assert_samples(benchmark.pedantic(synchronized(run), rounds=ROUNDS), batch)


@pytest.mark.parametrize("variant", FASTDDPM_VARIANTS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_fastddpm_sample(benchmark, unet, sampler, batch, variant):
    pytest.importorskip("fastddpm.sampling", reason="fastddpm.sampling is not there yet")
    _, cuda_graph, noise = variant
    benchmark.group = f"e2e {sampler} {STEPS[sampler]} steps b{batch}"
    shape = workloads.sample_shape_of(unet, batch)
    run = workloads.fastddpm_runner(unet, shape, sampler, STEPS[sampler], DEVICE, torch.float32, cuda_graph, noise)
    run()  # warm-up (and the CUDA-graph capture)
    _assert_samples(benchmark.pedantic(synchronized(run), rounds=ROUNDS), batch)


@pytest.mark.parametrize("q_impl", [q if q == "reference" else pytest.param(q, marks=requires_gpu)
                                    for q in workloads.TRAINING_Q_IMPLS])
def test_training_step(benchmark, q_impl):
    pytest.importorskip("fastddpm.losses", reason="fastddpm.losses is not there yet")
    benchmark.group = f"training step {TRAIN_PRESET} b{TRAIN_BATCH}"
    model = workloads.make_fastddpm_model(TRAIN_PRESET, DEVICE, torch.float32)
    step = workloads.training_step_runner(model, workloads.sample_shape_of(model, TRAIN_BATCH), q_impl, DEVICE)
    step()  # warm-up
    loss = benchmark.pedantic(synchronized(step), rounds=ROUNDS)
    assert torch.isfinite(loss)
