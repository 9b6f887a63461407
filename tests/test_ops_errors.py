"""Bad arguments to the public ops raise a ValueError / TypeError naming the argument, before
anything is written (a NaN-poisoned ``out`` buffer must come back untouched)."""
import pytest
import torch
from conftest import KERNEL_BACKEND, KERNEL_DEVICE

from fastddpm import ops
from fastddpm.schedule import NoiseSchedule

SCHEDULE = NoiseSchedule.linear()
RESPACED = SCHEDULE.respace_evenly(10)
BACKENDS = ["reference", KERNEL_BACKEND]
SHAPE = (2, 3, 4)


def tensor(shape=SHAPE, dtype=torch.float32, device=None):
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype=dtype, device=device or KERNEL_DEVICE)


def nan_buffer():
    return torch.full(SHAPE, float("nan"), device=KERNEL_DEVICE)


def step_args(**overrides):
    args = dict(model_output=tensor(), t=torch.tensor([1, 2]), x_t=tensor(), schedule=SCHEDULE, seed=0)
    args.update(overrides)
    return args


def call_step(op, args, backend, out, pred_x0_out):
    args = dict(args)
    positional = [args.pop(name) for name in ("model_output", "t", "x_t", "schedule")]
    return op(*positional, out=out, pred_x0_out=pred_x0_out, backend=backend, **args)


STEP_CASES = [
    # (id, overrides, exception, the argument the message must name)
    ("model_output shape", dict(model_output=tensor((2, 3, 5))), ValueError, "model_output"),
    ("learned needs 2C channels", dict(variance_type="learned"), ValueError, "model_output"),
    ("learned_range needs 2C channels", dict(variance_type="learned_range", model_output=tensor((2, 4, 4))),
     ValueError, "model_output"),
    ("t too large", dict(t=1000), ValueError, "t must"),
    ("t negative", dict(t=-1), ValueError, "t must"),
    ("t tensor out of range", dict(t=torch.tensor([0, 1000])), ValueError, "t must"),
    ("t float", dict(t=1.5), TypeError, "t must"),
    ("t float tensor", dict(t=torch.tensor([1.0, 2.0])), TypeError, "t must"),
    ("t bool", dict(t=True), TypeError, "t must"),
    ("t per-sample length", dict(t=torch.tensor([1, 2, 3])), ValueError, "t must"),
    ("t 2-D", dict(t=torch.tensor([[1, 2]])), ValueError, "t must"),
    ("prediction_type", dict(prediction_type="score"), ValueError, "prediction_type"),
    ("variance_type", dict(variance_type="fixed_medium"), ValueError, "variance_type"),
    ("backend name", dict(backend="cuda"), ValueError, "backend"),
    ("int x_t", dict(x_t=tensor(dtype=torch.int32)), TypeError, "x_t"),
    ("int model_output", dict(model_output=tensor(dtype=torch.int64)), TypeError, "model_output"),
    ("x_t not a tensor", dict(x_t=[[0.0]]), TypeError, "x_t"),
    ("x_t without batch dim", dict(x_t=torch.tensor(1.0, device=KERNEL_DEVICE)), ValueError, "x_t"),
    ("model_output on another device", dict(model_output=torch.empty(SHAPE, device="meta")), ValueError, "model_output"),
    ("schedule type", dict(schedule=[0.1, 0.2]), TypeError, "schedule"),
    ("clip_range", dict(clip_range=0.0), ValueError, "clip_range"),
    ("neither seed nor noise", dict(seed=None), ValueError, "seed"),
    ("noise shape", dict(noise=tensor((2, 3))), ValueError, "noise"),
    ("noise dtype", dict(noise=tensor(dtype=torch.int32)), TypeError, "noise"),
    ("noise on another device", dict(noise=torch.empty(SHAPE, device="meta")), ValueError, "noise"),
    ("seed negative", dict(seed=-1), ValueError, "seed"),
    ("seed too large", dict(seed=2**63), ValueError, "seed"),
    ("seed float", dict(seed=1.0), TypeError, "seed"),
    ("seed float tensor", dict(seed=torch.tensor(1.0)), TypeError, "seed"),
    ("seed tensor out of range", dict(seed=torch.tensor(-5)), ValueError, "seed"),
    ("noise_offset negative", dict(noise_offset=-1), ValueError, "noise_offset"),
    ("noise_offset too large", dict(noise_offset=2**32), ValueError, "noise_offset"),
]


def step_params():
    """Every case for ddpm_step, and for ddim_step every case but variance_type (DDIM has none)."""
    for case_id, overrides, exception, name in STEP_CASES:
        yield pytest.param(ops.ddpm_step, overrides, exception, name, id=f"ddpm-{case_id}")
        if "variance_type" not in overrides:
            yield pytest.param(ops.ddim_step, overrides, exception, name, id=f"ddim-{case_id}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op, overrides, exception, name", list(step_params()))
def test_bad_step_arguments(op, overrides, exception, name, backend):
    if op is ops.ddim_step:
        overrides = dict(overrides, eta=0.5, schedule=overrides.get("schedule", RESPACED))
        if isinstance(overrides.get("t"), int) and overrides["t"] >= 10:
            overrides["t"] = 10  # out of range of the 10-step schedule
    overrides = dict(overrides)
    backend = overrides.pop("backend", backend)
    args = step_args(**overrides)
    out, pred_x0_out = nan_buffer(), nan_buffer()
    x_t_before = args["x_t"].clone() if isinstance(args["x_t"], torch.Tensor) else None
    with pytest.raises(exception, match=name):
        call_step(op, args, backend, out, pred_x0_out)
    assert out.isnan().all() and pred_x0_out.isnan().all()  # nothing written
    if x_t_before is not None:
        assert torch.equal(args["x_t"], x_t_before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_out_buffers(backend):
    x_t = tensor()
    for bad in (torch.full((2, 3, 5), float("nan"), device=KERNEL_DEVICE),
                torch.full(SHAPE, float("nan"), dtype=torch.float16, device=KERNEL_DEVICE)):
        other = nan_buffer()
        with pytest.raises(ValueError, match="out"):
            ops.ddpm_step(tensor(), 3, x_t, SCHEDULE, seed=0, out=bad, pred_x0_out=other, backend=backend)
        with pytest.raises(ValueError, match="pred_x0_out"):
            ops.ddpm_step(tensor(), 3, x_t, SCHEDULE, seed=0, out=other, pred_x0_out=bad, backend=backend)
        assert bad.isnan().all() and other.isnan().all()
    with pytest.raises(TypeError, match="out"):
        ops.ddpm_step(tensor(), 3, x_t, SCHEDULE, seed=0, out=[0.0], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_step_untouched_on_error(backend):
    x_t = tensor()
    before = x_t.clone()
    with pytest.raises(ValueError, match="model_output"):
        ops.ddpm_step(tensor((2, 6, 4)), 3, x_t, SCHEDULE, seed=0, out=x_t, backend=backend)
    assert torch.equal(x_t, before)


@pytest.mark.parametrize("eta", [-0.1, float("nan"), True, "0.5"])
def test_bad_eta(eta):
    out = nan_buffer()
    with pytest.raises(ValueError, match="eta"):
        ops.ddim_step(tensor(), 3, tensor(), RESPACED, eta=eta, seed=0, out=out)
    assert out.isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddim_eta_zero_needs_no_noise(backend):
    x_prev, _ = ops.ddim_step(tensor(), 3, tensor(), RESPACED, eta=0.0, backend=backend)
    assert x_prev.shape == SHAPE and torch.isfinite(x_prev).all()
    with pytest.raises(ValueError, match="seed"):
        ops.ddim_step(tensor(), 3, tensor(), RESPACED, eta=0.3, backend=backend)


def test_triton_backend_needs_cuda_tensors():
    out = torch.full(SHAPE, float("nan"))
    with pytest.raises(ValueError, match="backend='triton'"):
        ops.ddpm_step(tensor(device="cpu"), 3, tensor(device="cpu"), SCHEDULE, seed=0, out=out, backend="triton")
    with pytest.raises(ValueError, match="backend='triton'"):
        ops.q_sample(tensor(device="cpu"), 3, SCHEDULE, seed=0, out=out, backend="triton")
    with pytest.raises(ValueError, match="backend='triton'"):
        ops.timestep_embedding(torch.arange(3), 8, backend="triton")
    assert out.isnan().all()


def test_forcing_triton_on_cpu_tensors_is_one_line_in_every_path(monkeypatch):
    """What 23 tests hit on a GPU host (GPU run 3): FASTDDPM_BACKEND=triton while the tensors are
    on the CPU. The scheduler's step and sample() say so in one line, before any model call."""
    pytest.importorskip("triton")
    pytest.importorskip("diffusers")
    import fastddpm

    monkeypatch.setenv("FASTDDPM_BACKEND", "triton")
    scheduler = fastddpm.DDPMScheduler(num_train_timesteps=10)
    scheduler.set_timesteps(10)
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError) as error:
        scheduler.step(torch.randn_like(x), scheduler.timesteps[0], x)
    assert str(error.value).startswith("backend='triton' needs CUDA tensors, got device cpu")
    assert "\n" not in str(error.value)
    calls = []
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        fastddpm.sample(lambda x, t: calls.append(1) or x, (1, 1, 2, 2), num_steps=2, seed=0, progress=False,
                        device="cpu")
    assert not calls


def test_kernels_reject_float64():
    with pytest.raises(TypeError, match="float64"):
        ops.ddpm_step(tensor(dtype=torch.float64), 3, tensor(dtype=torch.float64), SCHEDULE, seed=0,
                      backend=KERNEL_BACKEND)


def test_backend_environment_variable(monkeypatch):
    monkeypatch.setenv("FASTDDPM_BACKEND", "fastest")
    with pytest.raises(ValueError, match="backend"):
        ops.q_sample(tensor(), 3, SCHEDULE, seed=0)
    monkeypatch.setenv("FASTDDPM_BACKEND", "reference")
    assert ops.q_sample(tensor(), 3, SCHEDULE, seed=0).shape == SHAPE


Q_CASES = [
    ("int x0", dict(x0=tensor(dtype=torch.int64)), TypeError, "x0"),
    ("x0 without batch dim", dict(x0=torch.tensor(1.0, device=KERNEL_DEVICE)), ValueError, "x0"),
    ("t out of range", dict(t=1000), ValueError, "t must"),
    ("t float", dict(t=torch.tensor([0.5, 1.0])), TypeError, "t must"),
    ("t shape", dict(t=torch.tensor([1, 2, 3])), ValueError, "t must"),
    ("noise shape", dict(noise=tensor((2, 3, 5))), ValueError, "noise"),
    ("neither seed nor noise", dict(seed=None), ValueError, "seed"),
    ("noise_offset", dict(noise_offset=2**32), ValueError, "noise_offset"),
    ("schedule", dict(schedule="linear"), TypeError, "schedule"),
    ("backend", dict(backend="gpu"), ValueError, "backend"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("overrides, exception, name", [case[1:] for case in Q_CASES], ids=[case[0] for case in Q_CASES])
def test_bad_q_sample_arguments(overrides, exception, name, backend):
    args = dict(x0=tensor(), t=torch.tensor([1, 2]), schedule=SCHEDULE, seed=0, backend=backend)
    args.update(overrides)
    out = nan_buffer()
    with pytest.raises(exception, match=name):
        ops.q_sample(args.pop("x0"), args.pop("t"), args.pop("schedule"), out=out, **args)
    assert out.isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t, dim, kwargs, exception, name", [
    (torch.arange(3), 1, {}, ValueError, "dim"),
    (torch.arange(3), 0, {}, ValueError, "dim"),
    (torch.arange(3), 8.0, {}, (TypeError, ValueError), "dim"),
    (torch.arange(3), True, {}, (TypeError, ValueError), "dim"),
    (torch.arange(3), 2, dict(downscale_freq_shift=1), ValueError, "dim"),  # dim // 2 - shift = 0
    (torch.arange(3), 3, dict(downscale_freq_shift=1), ValueError, "dim"),
    (torch.arange(3), 8, dict(max_period=1.0), ValueError, "max_period"),
    (torch.arange(6).reshape(2, 3), 8, {}, ValueError, "t must"),
    (torch.tensor([True, False]), 8, {}, TypeError, "t must"),
    ("12", 8, {}, TypeError, "t must"),
])
def test_bad_timestep_embedding_arguments(t, dim, kwargs, exception, name, backend):
    if isinstance(t, torch.Tensor):
        t = t.to(KERNEL_DEVICE)
    with pytest.raises(exception, match=name):
        ops.timestep_embedding(t, dim, backend=backend, **kwargs)


# ---------------------------------------------------------------------------------------------
# The kernels' flavour is read off the kernel objects, in a fresh process, in either import order
# ---------------------------------------------------------------------------------------------
_FLAVOURS = """
import os, sys, torch
from fastddpm import ops, reference
from fastddpm.schedule import NoiseSchedule
x0 = torch.randn(2, 3, 4, 4)
_, eps = ops.q_sample(x0, 5, NoiseSchedule.linear(), seed=7, noise_offset=2, return_noise=True, backend="interpret")
assert torch.allclose(eps, reference.philox_randn(x0.shape, 7, 2), rtol=1e-6, atol=1e-5)
interpreted, compiled = ops._load_kernels(True), ops._load_kernels(False)
assert interpreted.is_interpreted() and not compiled.is_interpreted()
import fastddpm.kernels as plain
assert plain.is_interpreted() == (os.environ.get("TRITON_INTERPRET") == "1")
assert str(os.environ.get("TRITON_INTERPRET")) == sys.argv[1], "the library changed TRITON_INTERPRET"
print("ok")
"""


@pytest.mark.parametrize("interpret_env", [None, "1"])
def test_interpret_backend_in_a_fresh_process_in_either_flavour(interpret_env):
    """backend='interpret' works in a process that imported Triton without TRITON_INTERPRET (it
    used to raise "Cannot call @triton.jit'd outside of the scope of a kernel"), and the compiled
    flavour is importable beside interpreted kernels; the environment is left as it was."""
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    if interpret_env is not None:
        env["TRITON_INTERPRET"] = interpret_env
    done = subprocess.run([sys.executable, "-c", _FLAVOURS, interpret_env or "None"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# the multistep solvers' ops: their buffers and settings
# ---------------------------------------------------------------------------------------------
def _multistep_call(op_name, backend, out=None, **overrides):
    from fastddpm.reference import UniPC
    from fastddpm.step import StepSpec

    sampler = "unipc" if op_name == "unipc_step" else "dpmpp_2m"
    args = dict(spec=StepSpec(sampler, "epsilon", "fixed_small", 1.0), model_output=tensor(), t=3, x_t=tensor(),
                corrector=torch.zeros(SHAPE, device=KERNEL_DEVICE),
                previous_x0=torch.zeros(SHAPE, device=KERNEL_DEVICE), schedule=RESPACED, solver=UniPC())
    args.update(overrides)
    if op_name == "dpmpp_2m_step":
        args.pop("corrector")
        if "solver" not in overrides:  # the UniPC default above is not DPM-Solver++'s
            args.pop("solver")
    out = nan_buffer() if out is None else out
    names = ["spec", "model_output", "t", "x_t"] + (["corrector"] if op_name == "unipc_step" else []) + [
        "previous_x0", "schedule"]
    positional = [args.pop(name) for name in names]
    return getattr(ops, op_name)(*positional, out=out, backend=backend, **args), out


MULTISTEP_CASES = [
    ("previous_x0 shape", dict(previous_x0=tensor((2, 3, 5))), ValueError, "previous_x0"),
    ("previous_x0 dtype", dict(previous_x0=tensor(dtype=torch.float64)), ValueError, "previous_x0"),
    ("t a batch", dict(t=torch.tensor([1, 2])), ValueError, "t must be one chain index"),
    ("t past the chain", dict(t=10), ValueError, "t"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op_name", ["dpmpp_2m_step", "unipc_step"])
@pytest.mark.parametrize("case, overrides, error, names", MULTISTEP_CASES, ids=[c[0] for c in MULTISTEP_CASES])
def test_multistep_ops_refuse_bad_buffers_before_writing(op_name, backend, case, overrides, error, names):
    overrides = dict(overrides)  # the parameter is shared by every run of the test
    out, previous = nan_buffer(), overrides.pop("previous_x0", tensor())
    before = previous.clone()
    with pytest.raises(error, match=names):
        _multistep_call(op_name, backend, out=out, previous_x0=previous, **overrides)
    assert out.isnan().all() and torch.equal(previous, before)  # nothing written


@pytest.mark.parametrize("backend", BACKENDS)
def test_unipc_step_refuses_its_own_bad_arguments(backend):
    from fastddpm.step import StepSpec

    with pytest.raises(ValueError, match="corrector must match x_t"):
        _multistep_call("unipc_step", backend, corrector=tensor((3, 3, 4)))
    with pytest.raises(ValueError, match="spec.sampler must be 'unipc'"):
        _multistep_call("unipc_step", backend, spec=StepSpec("dpmpp_2m", "epsilon", "fixed_small", 1.0))
    with pytest.raises(TypeError, match="solver must be a fastddpm.reference.UniPC"):
        _multistep_call("unipc_step", backend, solver="bh2")
    if backend != "reference":
        strided = torch.zeros((2, 4, 3), device=KERNEL_DEVICE).transpose(1, 2)
        with pytest.raises(ValueError, match="corrector must be contiguous"):
            _multistep_call("unipc_step", backend, corrector=strided)


def test_unipc_settings_are_checked_when_made():
    from fastddpm.reference import UniPC

    with pytest.raises(ValueError, match="order must be 1 or 2"):
        UniPC(order=3)
    with pytest.raises(ValueError, match="variant"):
        UniPC(variant="bh3")
    assert UniPC(disable_corrector=[2, 1]) == UniPC(disable_corrector=frozenset({1, 2}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dpmpp_step_refuses_a_solver_it_cannot_run(backend):
    from fastddpm.reference import DPMSolver
    from fastddpm.step import StepSpec

    third = DPMSolver(orders=(1, 2, 3, 3, 3, 3, 3, 3, 2, 1))
    with pytest.raises(ValueError, match="older_x0"):
        _multistep_call("dpmpp_2m_step", backend, solver=third)
    with pytest.raises(ValueError, match="solver.sde"):
        _multistep_call("dpmpp_2m_step", backend, solver=DPMSolver(sde=True))
    with pytest.raises(TypeError, match="solver must be a fastddpm.reference.DPMSolver"):
        _multistep_call("dpmpp_2m_step", backend, solver="3m")
    with pytest.raises(ValueError, match="give either noise"):  # the SDE variant needs its noise
        _multistep_call("dpmpp_2m_step", backend, spec=StepSpec("dpmpp_2m_sde", "epsilon", "fixed_small", 1.0))
    with pytest.raises(ValueError, match="orders must hold 1, 2 or 3"):
        DPMSolver(orders=(1, 4))
    with pytest.raises(ValueError, match="SDE variant is of order 1 or 2"):
        DPMSolver(sde=True, orders=(1, 2, 3))
