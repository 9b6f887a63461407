"""The model's options of fastddpm.sample (model_dtype, channels_last, compile), their cache, and
the batch-size search (fastddpm/acceleration.py). CPU tests with small models; the GPU figures
come from benchmarks/run.py --only throughput."""
import gc
import weakref

import pytest
import torch

import fastddpm
from fastddpm.acceleration import (CPU_DEFAULT_BATCH_SIZE, ModelOptions, PreparedModel, auto_batch_size,
                                   prepare_model, search_batch_size)

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def digits():
    return fastddpm.load_pretrained()


def _sample(pretrained, batch=6, steps=8, seed=0, **options):
    return fastddpm.sample(pretrained.model, (batch, *pretrained.sample_shape), schedule=pretrained.schedule,
                           sampler="dpmpp_2m", num_steps=steps, seed=seed, progress=False, device="cpu", **options)


# ---------------------------------------------------------------------------------------------
# precision
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_dtype, tolerance", [
    # bf16 keeps 8 significant bits (relative rounding 2**-9 = 2e-3 a value); over 8 steps of a
    # trained UNet the samples in [-1, 1] moved by at most 0.06 in trials: bound 0.15.
    (torch.bfloat16, 0.15),
    # fp16 keeps 11 bits (4.9e-4 a value): trials moved at most 0.02; bound 0.05.
    ("fp16", 0.05),
])
def test_model_dtype_runs_the_model_in_that_precision_and_keeps_the_sample_in_float32(digits, model_dtype,
                                                                                      tolerance):
    seen = []
    # (The copy carries the hook along: it records which module ran, in which dtype.)
    hook = digits.model.register_forward_pre_hook(
        lambda module, inputs: seen.append((module is digits.model, inputs[0].dtype)))
    try:
        exact = _sample(digits)
        low = _sample(digits, model_dtype=model_dtype)
    finally:
        hook.remove()
    low_dtype = ModelOptions.build(model_dtype).dtype
    # The caller's model ran only in float32, the copy only in the low precision ...
    assert set(seen) == {(True, torch.float32), (False, low_dtype)}
    assert next(digits.model.parameters()).dtype == torch.float32
    # ... and the sample stayed float32, close to the float32 run but not equal to it.
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    difference = (low - exact).abs().max().item()
    assert 0 < difference <= tolerance, difference
    prepared = prepare_model(digits.model, ModelOptions.build(model_dtype), torch.device("cpu"))
    assert {p.dtype for p in prepared.copy.parameters()} == {ModelOptions.build(model_dtype).dtype}


def test_model_dtype_of_a_plain_function_runs_under_autocast():
    weight = torch.randn(16, 16)
    dtypes = []

    def model(x, t):
        y = x.reshape(x.shape[0], -1) @ weight  # autocast runs matmuls in bfloat16 on the CPU
        dtypes.append(y.dtype)
        return (0.1 * y).reshape(x.shape)

    out = fastddpm.sample(model, (2, 1, 4, 4), sampler="ddim", num_steps=3, seed=0, progress=False,
                          model_dtype=torch.bfloat16)
    assert set(dtypes) == {torch.bfloat16}
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_prepared_copy_is_cached_and_follows_in_place_weight_changes():
    torch.manual_seed(0)
    model = fastddpm.create_model("digits", ch=16).eval()
    for p in model.parameters():  # the preset zero-initialises output layers: make it do something
        p.data.normal_(0, 0.05)
    options = ModelOptions.build("bf16")
    first = prepare_model(model, options, torch.device("cpu"))
    assert prepare_model(model, options, torch.device("cpu")) is first  # no second copy
    before = fastddpm.sample(model, (3, 1, 8, 8), sampler="ddim", num_steps=4, seed=0, progress=False,
                             model_dtype="bf16")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)  # an in-place change, as an optimiser step makes
    after = fastddpm.sample(model, (3, 1, 8, 8), sampler="ddim", num_steps=4, seed=0, progress=False,
                            model_dtype="bf16")
    fresh = PreparedModel(model, options)  # a copy made from the changed weights
    for cached, new in zip(first.copy.parameters(), fresh.copy.parameters()):
        assert torch.equal(cached, new)
    assert not torch.equal(before, after)


def test_the_models_own_precision_makes_no_copy(digits):
    assert prepare_model(digits.model, ModelOptions.build("fp32"), torch.device("cpu")) is digits.model
    assert prepare_model(digits.model, ModelOptions.build("bf16"), torch.device("cpu")) is not digits.model


def test_prepared_models_do_not_keep_the_model_alive():
    model = fastddpm.create_model("digits", ch=16).eval()
    fastddpm.sample(model, (2, 1, 8, 8), sampler="ddim", num_steps=2, seed=0, progress=False, model_dtype="bf16")
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


# ---------------------------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------------------------
def test_channels_last_matches_the_default_layout_fastddpm_unet(digits):
    seen = []
    default = _sample(digits)
    prepared = prepare_model(digits.model, ModelOptions.build(channels_last=True), torch.device("cpu"))
    hook = prepared.copy.register_forward_pre_hook(
        lambda module, inputs: seen.append(inputs[0].is_contiguous(memory_format=torch.channels_last)))
    try:
        last = _sample(digits, channels_last=True)
    finally:
        hook.remove()
    assert seen and all(seen)  # the model really ran channels-last
    assert next(digits.model.parameters()).is_contiguous()  # the caller's model did not change layout
    # float32 either way; the convolutions sum in another order: trials differed by <= 5e-6.
    torch.testing.assert_close(last, default, rtol=0, atol=1e-4)


def test_channels_last_matches_the_default_layout_diffusers_unet(tiny_unet):
    shape = (3, 1, 8, 8)
    default = fastddpm.sample(tiny_unet, shape, sampler="ddim", num_steps=5, seed=1, progress=False)
    last = fastddpm.sample(tiny_unet, shape, sampler="ddim", num_steps=5, seed=1, progress=False, channels_last=True)
    torch.testing.assert_close(last, default, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------
def test_compile_traces_once_across_steps_and_calls(digits):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    # The eager backend: dynamo's tracing and guards as with inductor, without its C++ build.
    options = dict(compile=dict(backend="eager"))
    first = _sample(digits, seed=0, **options)
    second = _sample(digits, seed=1, **options)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # one graph: no recompile a step
    assert not counters["recompiles"] and not counters["graph_break"], (dict(counters["recompiles"]),
                                                                        dict(counters["graph_break"]))
    torch.testing.assert_close(first, _sample(digits, seed=0), rtol=0, atol=1e-6)
    assert not torch.equal(first, second)


@pytest.mark.slow
def test_compile_with_inductor_gives_the_same_samples(digits):
    torch._dynamo.reset()
    compiled = _sample(digits, compile=True)
    # Inductor fuses and reorders float32 arithmetic: trials differed by <= 5e-6.
    torch.testing.assert_close(compiled, _sample(digits), rtol=0, atol=1e-4)


def test_compile_modes_with_their_own_cuda_graphs_are_refused_inside_ours():
    options = ModelOptions.build(compile=dict(mode="reduce-overhead"))
    with pytest.raises(ValueError, match="captures CUDA graphs of its own"):
        options.check_graph(use_graph=True)
    options.check_graph(use_graph=False)  # eager steps: its graphs are its own business
    ModelOptions.build(compile=dict(mode="max-autotune-no-cudagraphs")).check_graph(use_graph=True)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(model_dtype="fp8"), ValueError, "model_dtype must be one of fp32, bf16, fp16"),
    (dict(model_dtype=torch.int8), ValueError, "model_dtype must be torch.float32"),
    (dict(channels_last="yes"), TypeError, "channels_last must be a bool"),
    (dict(compile="inductor"), TypeError, "compile must be a bool or a dict"),
    (dict(compile=dict(modes="default")), ValueError, "compile takes the torch.compile keywords"),
])
def test_bad_model_options_are_refused_before_sampling(kwargs, error, match):
    calls = []

    def model(x, t):
        calls.append(1)
        return x

    with pytest.raises(error, match=match):
        fastddpm.sample(model, (1, 1, 2, 2), num_steps=2, seed=0, progress=False, **kwargs)
    assert not calls


# ---------------------------------------------------------------------------------------------
# --batch-size auto
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("largest, limit, expected", [
    (1, 4096, 1), (7, 4096, 7), (37, 4096, 32), (1000, 4096, 1000), (1023, 4096, 1016),
    (5000, 4096, 4096), (300, 100, 96), (0, 64, 0),
])
def test_search_finds_the_largest_batch_that_fits(largest, limit, expected):
    tried = []

    def fits(batch):
        tried.append(batch)
        return batch <= largest

    assert search_batch_size(fits, limit) == expected
    assert max(tried) <= limit
    # doubling then bisection: about 2 log2(limit) trial passes, never a scan
    assert len(tried) <= 2 * limit.bit_length() + 1


def test_auto_batch_size_on_a_cpu_is_the_stated_default(digits):
    batch, account = auto_batch_size(digits.model, digits.sample_shape, device="cpu")
    assert batch == CPU_DEFAULT_BATCH_SIZE and "default" in account
    assert auto_batch_size(digits.model, digits.sample_shape, device="cpu", limit=10)[0] == 10


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_batch_size_on_a_gpu_samples_at_the_batch_it_picks():
    model = fastddpm.create_model("digits").cuda().eval()
    batch, account = auto_batch_size(model, (1, 8, 8), device="cuda", limit=256)
    assert 1 <= batch <= 256, account
    samples = fastddpm.sample(model, (batch, 1, 8, 8), sampler="ddim", num_steps=2, seed=0, progress=False)
    assert samples.shape[0] == batch


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_options_inside_the_cuda_graph_give_the_eager_samples_and_compile_traces_once(no_tf32):
    from torch._dynamo.utils import counters

    pretrained = fastddpm.load_pretrained(device="cuda")
    shape = (16, *pretrained.sample_shape)

    def draw(**options):
        return fastddpm.sample(pretrained.model, shape, schedule=pretrained.schedule, sampler="dpmpp_2m",
                               num_steps=10, seed=0, progress=False, **options)

    for options, tolerance in ((dict(model_dtype="bf16", channels_last=True), 1e-5), (dict(compile=True), 1e-4)):
        torch._dynamo.reset()
        counters.clear()
        eager = draw(cuda_graph=False, **options)
        graphed = draw(cuda_graph=True, **options)
        replayed = draw(cuda_graph=True, **options)  # the kept graph, no capture and no compile again
        # The same prepared model either way: the graph replays its kernels (bf16: bitwise up to
        # cuDNN's per-call algorithm choice; inductor: its kernels launched eagerly vs replayed).
        torch.testing.assert_close(graphed, eager, rtol=0, atol=tolerance)
        assert torch.equal(graphed, replayed)
        if "compile" in options:
            assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
