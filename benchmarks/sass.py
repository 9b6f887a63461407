"""Static resource check of the Triton kernels for sm_90 (H100), without a GPU.

Every variant in ``VARIANTS`` is compiled with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``
using Triton's bundled ptxas, disassembled with its bundled cuobjdump, and reported with:

* registers, spill bytes (``ptxas -v``), local memory and shared memory;
* the global loads and stores by width, in SASS (``LDG.E.128`` ...) and PTX (``ld.global.v4`` ...),
  against the number of 128-bit accesses the variant's streamed tensors need;
* SASS instructions per element (how they are counted: ``count_sass``).

    python benchmarks/sass.py                    # compile, write results/static/<triton>-sm90.{json,md}
    python benchmarks/sass.py --check            # ... and hold the budgets in sass_budgets.json
    python benchmarks/sass.py --update-budgets   # set this Triton version's budgets from this run

Exit status: 0 done (and budgets held with --check), 1 a budget broken or a variant failed,
77 no CUDA toolchain here (the caller skips).

Signatures are not written by hand: each variant calls the op's launcher (``kernels/<op>.py``)
on small CPU tensors with the kernel swapped for a recorder, and the recorded launch is
specialised the way Triton's JIT specialises a real one (pointer dtypes, ``tt.divisibility``
16 for 16-byte aligned pointers and multiples of 16, ints equal to 1 as constants). So the
dtypes and constexprs are exactly what the launcher passes, and a changed argument list needs
no edit here; a changed *launcher* call is reported by name (update ``VARIANTS``).

The kernels must be imported with ``TRITON_INTERPRET`` unset: the CLI unsets it before importing
them, and ``run_subprocess`` runs the CLI in a clean environment for callers (pytest's conftest
sets it on CPU machines). Only the standard library is imported at module level, so the budget
checker (``check_budgets``) can be imported anywhere.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
DEFAULT_OUT = HERE / "results" / "static"
BUDGETS_PATH = HERE / "sass_budgets.json"
ARCH = 90
WARP_SIZE = 32
EXIT_NO_TOOLCHAIN = 77  # automake's "skipped"
DEFAULT_MARGIN = 0.15

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


def _dpmpp_2m(torch, dtype, launcher):
    from fastddpm.step import StepSpec

    x = torch.randn(BATCH, CHANNELS, HEIGHT, WIDTH).to(dtype)
    spec = StepSpec("dpmpp_2m", clip_range=None)
    args = (spec, torch.randn(x.shape).to(dtype), torch.tensor(T_STEP, dtype=torch.int64), x,
            torch.randn(x.shape).to(dtype), _schedule_table(torch))
    return args, dict(out=torch.empty_like(x))


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
    *[Variant(f"dpmpp_2m.{d}", "dpm_solver", "_dpmpp_2m_kernel", "dpmpp_2m", d, _dpmpp_2m, 3, 2,
              description="DPM-Solver++(2M) step: epsilon, no clip, scalar t; writes x_prev and x0")
      for d in ("fp32", "bf16")],
    *[Variant(f"unipc.{d}", "unipc", "_unipc_kernel", "unipc", d, _unipc, 4, 3,
              description="UniPC bh2 step (corrector + predictor): epsilon, no clip, scalar t; writes x_prev, "
                          "the corrector's part and x0") for d in ("fp32", "bf16")],
    Variant(f"embedding.dim{EMBED_DIM}", "timestep_embedding", "_timestep_embedding_kernel", "timestep_embedding",
            "fp32", _embedding, 0, 1, per_program=("BLOCK_B", "BLOCK_D"),
            description=f"sinusoidal embedding, {EMBED_BATCH} timesteps x {EMBED_DIM}"),
]

# ---------------------------------------------------------------------------------------------
# toolchain
# ---------------------------------------------------------------------------------------------


class ToolchainUnavailable(RuntimeError):
    """No Triton CUDA backend, ptxas or cuobjdump on this machine."""


def _tool_path(name: str) -> str:
    from triton import knobs

    tool = getattr(knobs.nvidia, name)
    path = getattr(tool, "path", None)
    if not path or not os.path.isfile(path):
        raise ToolchainUnavailable(f"{name} not found (triton.knobs.nvidia.{name}: {path!r})")
    return path


def toolchain() -> Dict:
    """The tools Triton itself uses for ``ARCH``: ptxas (``get_ptxas(arch)``, which Triton 3.9 maps to
    its ``ptxas-blackwell`` for sm_90) and cuobjdump (``knobs.nvidia.cuobjdump``)."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler as nv
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        raise ToolchainUnavailable(f"triton's CUDA backend is not importable: {type(exc).__name__}: {exc}")
    if tuple(int(part) for part in re.findall(r"\d+", triton.__version__)[:2]) < (3, 3):
        raise ToolchainUnavailable(f"triton {triton.__version__}: sass.py needs triton >= 3.3 (ASTSource with "
                                   "named signatures, native_specialize_impl)")
    try:
        get_ptxas = getattr(nv, "get_ptxas", None)
        if get_ptxas is not None:
            try:
                ptxas = get_ptxas(ARCH).path
            except TypeError:  # older Triton: get_ptxas() without the arch
                ptxas = get_ptxas().path
        else:
            ptxas = _tool_path("ptxas")
        if not ptxas or not os.path.isfile(ptxas):
            raise ToolchainUnavailable(f"ptxas not found ({ptxas!r})")
        cuobjdump = _tool_path("cuobjdump")
        version = subprocess.run([ptxas, "--version"], capture_output=True, text=True, check=True).stdout
    except ToolchainUnavailable:
        raise
    except Exception as exc:
        raise ToolchainUnavailable(f"ptxas/cuobjdump unusable: {type(exc).__name__}: {exc}")
    match = re.search(r"release ([\d.]+), V([\d.]+)", version)
    arch_name = nv.sm_arch_from_capability(ARCH) if hasattr(nv, "sm_arch_from_capability") else f"sm_{ARCH}a"
    return dict(triton=triton.__version__, ptxas=ptxas, ptxas_version=match.group(2) if match else version.strip(),
                cuobjdump=cuobjdump, gpu_name=arch_name)


# ---------------------------------------------------------------------------------------------
# from a launcher call to triton.compile's arguments
# ---------------------------------------------------------------------------------------------


class VariantError(RuntimeError):
    pass


class _Recorder:
    """Stands in for a @triton.jit kernel in its module while the launcher runs: records
    ``kernel[grid](*args, **kwargs)`` instead of launching."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, args, kwargs))

        return launch

    def __getattr__(self, name):  # anything else the launcher reads off the kernel
        return getattr(self.kernel, name)


def import_kernel_module(name: str):
    """``fastddpm.kernels.<name>`` (kernels/<name>.py) as this interpreter imports it, else from
    this checkout."""
    try:
        return importlib.import_module(f"fastddpm.kernels.{name}")
    except ModuleNotFoundError as exc:
        if exc.name not in ("fastddpm", "fastddpm.kernels"):
            raise
    sys.path.insert(0, str(REPO_ROOT))
    try:
        return importlib.import_module(f"fastddpm.kernels.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != "fastddpm.kernels":
            raise
        return importlib.import_module(f"kernels.{name}")  # fastddpm not installed: the source tree


def record_launch(variant: Variant):
    """Run the variant's launcher with its kernel swapped for a recorder; returns
    (kernel, args, kwargs, launcher keywords)."""
    import torch
    from triton.runtime.jit import JITFunction

    module = import_kernel_module(variant.module)
    where = f"kernels/{variant.module}.py"
    kernel = getattr(module, variant.kernel, None)
    launcher = getattr(module, variant.launcher, None)
    if kernel is None or launcher is None:
        raise VariantError(f"{where} has no {variant.kernel if kernel is None else variant.launcher}: "
                           "update VARIANTS in benchmarks/sass.py")
    if not isinstance(kernel, JITFunction):
        raise VariantError(f"{where}:{variant.kernel} is a {type(kernel).__name__}, not a JITFunction: the kernels "
                           "were imported with TRITON_INTERPRET set; run sass.py in a fresh process without it")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[variant.dtype]
    args, kwargs = variant.build(torch, dtype, launcher)
    taken = inspect.signature(launcher).parameters
    dropped = sorted(k for k in OPS_KWARGS if k not in taken)
    kwargs = dict(kwargs, **{k: v for k, v in OPS_KWARGS.items() if k in taken})
    recorder = _Recorder(kernel)
    setattr(module, variant.kernel, recorder)
    try:
        launcher(*args, **kwargs)
    except Exception as exc:
        raise VariantError(f"calling {where}:{variant.launcher} for {variant.name} failed ({type(exc).__name__}: "
                           f"{exc}); the launcher's arguments changed: update VARIANTS in benchmarks/sass.py") from exc
    finally:
        setattr(module, variant.kernel, kernel)
    if len(recorder.launches) != 1:
        raise VariantError(f"{where}:{variant.launcher} launched {variant.kernel} {len(recorder.launches)} times "
                           "for one call (expected once): update VARIANTS in benchmarks/sass.py")
    _, launch_args, launch_kwargs = recorder.launches[0]
    launcher_kwargs = {k: _describe(v) for k, v in kwargs.items()}
    return kernel, launch_args, launch_kwargs, dict(source=_shown_path(module.__file__),
                                                   launcher_kwargs=launcher_kwargs, dropped_kwargs=dropped)


def _shown_path(path: str) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT)) if REPO_ROOT in path.parents else str(path)


def _describe(value):
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        return f"tensor{list(value.shape)} {str(value.dtype).replace('torch.', '')}"
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)


def _specialize(backend, value, is_const, specialize, align):
    """(type, attribute) of one runtime argument, as Triton's JIT computes it."""
    try:
        from triton._C.libtriton import native_specialize_impl
    except ImportError:  # pragma: no cover - Triton < 3.3: the same rules, written out
        native_specialize_impl = None
    if native_specialize_impl is not None:
        return native_specialize_impl(backend, value, is_const, specialize, align)
    if value is None:
        return ("constexpr", None)
    if isinstance(value, bool):
        return ("u1", None)
    if isinstance(value, int):
        if specialize and value == 1:
            return ("constexpr", 1)
        kind = "i32" if -2**31 <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
        return (kind, "D" if specialize and align and value % 16 == 0 else "")
    if isinstance(value, float):
        return ("fp32", None)
    if hasattr(value, "data_ptr"):
        names = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int64": "i64",
                 "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}
        kind = "*" + names[str(value.dtype).replace("torch.", "")]
        return (kind, "D" if align and value.data_ptr() % 16 == 0 else "")
    raise VariantError(f"cannot specialise an argument of type {type(value).__name__}")


def compile_args(kernel, args, kwargs, backend):
    """(signature, constexprs, attrs, options) for ``triton.compile`` from one recorded launch:
    the binding and specialisation of ``JITFunction.run`` (Triton 3.3 to 3.9)."""
    name = kernel.__name__
    names = list(kernel.arg_names)
    option_kwargs = {k: v for k, v in kwargs.items() if k not in names}
    try:
        bound = kernel.signature.bind(*args, **{k: v for k, v in kwargs.items() if k in names})
    except TypeError as exc:
        raise VariantError(f"the launch of {name} does not bind to its parameters {names}: {exc}") from exc
    bound.apply_defaults()
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        value = bound.arguments[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
            continue
        specialize = not param.do_not_specialize
        align = not param.do_not_specialize_on_alignment
        annotation = getattr(param, "annotation_type", None)
        try:
            kind, attr = _specialize(backend, value, param.is_const, specialize, align)
        except Exception as exc:
            raise VariantError(f"{name}: argument {param.name}={_describe(value)}: {exc}") from exc
        if annotation and isinstance(annotation, str) and kind != "constexpr":
            if annotation == "u1" or annotation[:2] in ("fp", "bf"):
                attr = None
            kind = annotation
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = attr if attr is not None else value
        elif isinstance(attr, str):
            attrs[(index, )] = backend.parse_attr(attr)
    return signature, constexprs, attrs, option_kwargs


# ---------------------------------------------------------------------------------------------
# what the compiled kernel holds
# ---------------------------------------------------------------------------------------------
_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", re.MULTILINE)
_PTX_MEM = re.compile(r"^\s*(?:@!?%?\w+\s+)?(ld|st)\.global((?:\.\w+)*)\s", re.MULTILINE)


def parse_sass(text: str) -> List[Tuple[int, bool, str]]:
    """(address, predicated, instruction without its predicate) of every SASS instruction in
    ``cuobjdump -sass`` output of one function."""
    out = []
    for address, body in _SASS_LINE.findall(text):
        body = body.strip()
        predicate = re.match(r"@!?U?P[T\d]+\s+", body)
        out.append((int(address, 16), predicate is not None, body[predicate.end():] if predicate else body))
    return out


def _opcode(instruction: str) -> str:
    parts = instruction.split()
    return parts[0].split(".")[0] if parts else ""


def split_hot(instructions: List[Tuple[int, bool, str]]):
    """(counted, hot) instruction lists of one function: see ``count_sass``."""
    exits = [i for i, (_, _, ins) in enumerate(instructions) if _opcode(ins) == "EXIT"]
    body = instructions[: exits[-1] + 1] if exits else instructions
    body = [(a, p, ins) for a, p, ins in body if _opcode(ins) != "NOP"]
    conditional = set()
    for address, predicated, ins in body:
        target = re.search(r"0x([0-9a-f]+)", ins) if _opcode(ins) == "BRA" else None
        conditional_branch = predicated or re.search(r"\s!?U?P[0-6]\b", ins)
        if target and conditional_branch and int(target.group(1), 16) > address:
            end = int(target.group(1), 16)
            conditional.update(a for a, _, _ in body if address < a < end)
    return body, [(a, p, ins) for a, p, ins in body if a not in conditional]


def count_sass(instructions: List[Tuple[int, bool, str]]) -> Dict:
    """How instructions are counted (static count of the cubin's SASS, per thread).

    ``counted``: every instruction of the function from its entry up to and including its last
    ``EXIT``, without ``NOP`` (alignment padding); the ``BRA`` to itself that ptxas puts after the
    last ``EXIT`` is never executed. ``hot``: ``counted`` without the instructions a predicated
    forward ``BRA`` can jump over (conditional code: in these kernels only the slow paths of
    libdevice functions, such as sin/cos's Payne-Hanek reduction for |x| >= 105615, which sits
    between a ``BSSY`` and the ``BSYNC`` the branch targets). The elementwise kernels have no
    branches at all (masks become predicates), so ``hot`` = ``counted`` is what every thread
    executes once. ``loops``: backward branches outside conditional code (a loop on the hot path,
    counted once: there are none today). ``instr_per_elem`` = ``hot`` / elements per thread
    (elements per program / (num_warps * 32)).
    """
    body, hot = split_hot(instructions)
    loops = sum(1 for a, _, ins in hot if _opcode(ins) == "BRA"
                and (t := re.search(r"0x([0-9a-f]+)", ins)) and int(t.group(1), 16) < a)
    histogram: Dict[str, int] = {}
    for _, _, ins in hot:
        histogram[_opcode(ins)] = histogram.get(_opcode(ins), 0) + 1
    return dict(counted=len(body), hot=len(hot), conditional=len(body) - len(hot),
                branches=sum(1 for _, _, ins in body if _opcode(ins) == "BRA"), loops=loops,
                hot_opcodes=dict(sorted(histogram.items(), key=lambda kv: (-kv[1], kv[0]))))


def memory_widths(instructions: List[Tuple[int, str]]) -> Dict[str, Dict[str, int]]:
    """Global loads (LDG) and stores (STG) by access width in bits."""
    result = {"LDG": {}, "STG": {}}
    for _, _, ins in instructions:
        parts = ins.split()[0].split(".") if ins.split() else [""]
        if parts[0] not in result:
            continue
        bits = 32
        for part in parts[1:]:
            if part in ("128", "64", "256"):
                bits = int(part)
            elif part in ("U16", "S16"):
                bits = 16
            elif part in ("U8", "S8"):
                bits = 8
        key = str(bits)
        result[parts[0]][key] = result[parts[0]].get(key, 0) + 1
    return result


def ptx_widths(ptx: str) -> Dict[str, Dict[str, int]]:
    """``ld.global`` / ``st.global`` in the PTX by access width in bits (vector x element)."""
    result = {"ld": {}, "st": {}}
    for op, suffix in _PTX_MEM.findall(ptx):
        parts = suffix.strip(".").split(".")
        vector = 1
        bits = 32
        for part in parts:
            if part in ("v2", "v4", "v8"):
                vector = int(part[1:])
            elif re.fullmatch(r"[bsuf](8|16|32|64)", part):
                bits = int(part[1:])
        key = str(vector * bits)
        result[op][key] = result[op].get(key, 0) + 1
    return result


def resource_usage(cuobjdump: str, cubin_path: str) -> Dict[str, int]:
    text = subprocess.run([cuobjdump, "-res-usage", cubin_path], capture_output=True, text=True, check=True).stdout
    usage = {}
    for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text):
        usage[key.lower()] = int(value)
    return usage


def ptxas_verbose(tools: Dict, ptx: str, fp_fusion: bool, ptx_options: Optional[str]) -> Dict[str, int]:
    """Registers and spill bytes from ``ptxas -v`` on the kernel's PTX, with the flags Triton's
    make_cubin passes (``--fmad=false`` without FP fusion, ``--regAllocOptLevel=2`` where that
    Triton passes it, ``ptx_options``)."""
    from triton.backends.nvidia import compiler as nv

    try:
        extra = ["--regAllocOptLevel=2"] if "--regAllocOptLevel=2" in inspect.getsource(nv.CUDABackend.make_cubin) \
            else []
    except (OSError, TypeError):  # pragma: no cover
        extra = []
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        Path(src).write_text(ptx)
        cmd = [tools["ptxas"], "-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v", *extra,
               *(ptx_options.split() if ptx_options else []), f"--gpu-name={tools['gpu_name']}", src,
               "-o", os.path.join(tmp, "kernel.o")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    info = {}
    match = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if match:
        info.update(stack_frame=int(match.group(1)), spill_stores=int(match.group(2)), spill_loads=int(match.group(3)))
    match = re.search(r"Used (\d+) registers", log)
    if match:
        info["registers"] = int(match.group(1))
    if "spill_stores" not in info or "registers" not in info:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    return info


def expected_128(streams: int, elements_per_thread: int, itemsize: int) -> int:
    """128-bit accesses ``streams`` contiguous tensors need per thread (0: a thread's share is
    smaller than 16 bytes, so 128-bit accesses are impossible)."""
    per_thread = elements_per_thread * itemsize
    return streams * (per_thread // 16) if per_thread >= 16 and per_thread % 16 == 0 else 0


# ---------------------------------------------------------------------------------------------
# one variant
# ---------------------------------------------------------------------------------------------
_ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2}


def measure(variant: Variant, tools: Dict, cache: Dict) -> Dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    row = dict(name=variant.name, kernel=variant.kernel, module=f"kernels/{variant.module}.py", dtype=variant.dtype,
               description=variant.description, reads=variant.reads, writes=variant.writes)
    started = time.perf_counter()
    target = GPUTarget("cuda", ARCH, WARP_SIZE)
    backend = make_backend(target)
    kernel, args, kwargs, launch_info = record_launch(variant)
    row.update(launch_info)
    signature, constexprs, attrs, options = compile_args(kernel, args, kwargs, backend)
    row.update(signature=signature, constexprs={k: _describe(v) for k, v in constexprs.items()},
               divisible_by_16=sorted(kernel.arg_names[k[0]] for k, v in attrs.items() if v), options=options)
    key = hashlib.sha256(repr((kernel.cache_key, sorted(signature.items()), sorted(row["constexprs"].items()),
                               sorted(attrs.items()), sorted(options.items()))).encode()).hexdigest()
    if key not in cache:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*FP_FUSION.*")
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                      options=options)
        cache[key] = analyse(compiled, tools)
    row.update(cache[key])
    per_program = 1
    for name in variant.per_program:
        if name not in constexprs:
            raise VariantError(f"{variant.kernel} has no constexpr {name} (per_program of {variant.name}): "
                               "update VARIANTS in benchmarks/sass.py")
        per_program *= int(constexprs[name])
    threads = row["num_warps"] * WARP_SIZE
    elements = max(per_program // threads, 1)
    itemsize = _ITEMSIZE[variant.dtype]
    row.update(elements_per_program=per_program, threads=threads, elements_per_thread=elements,
               instr_per_elem=round(row["sass"]["hot"] / elements, 2),
               ldg128=row["sass_mem"]["LDG"].get("128", 0), stg128=row["sass_mem"]["STG"].get("128", 0),
               global_accesses=sum(row["sass_mem"]["LDG"].values()) + sum(row["sass_mem"]["STG"].values()),
               ldg128_expected=expected_128(variant.reads, elements, itemsize),
               stg128_expected=expected_128(variant.writes, elements, itemsize),
               seconds=round(time.perf_counter() - started, 2))
    return row


def analyse(compiled, tools: Dict) -> Dict:
    meta = compiled.metadata
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        Path(cubin).write_bytes(compiled.asm["cubin"])
        usage = resource_usage(tools["cuobjdump"], cubin)
        sass_text = subprocess.run([tools["cuobjdump"], "-sass", cubin], capture_output=True, text=True,
                                   check=True).stdout
    verbose = ptxas_verbose(tools, ptx, bool(getattr(meta, "enable_fp_fusion", True)),
                            getattr(meta, "ptx_options", None))
    instructions = parse_sass(sass_text)
    registers = usage.get("reg", verbose["registers"])
    sass_sha = hashlib.sha256("\n".join(ins for _, _, ins in instructions).encode()).hexdigest()[:16]
    result = dict(
        num_warps=int(meta.num_warps), registers=registers, spill_stores=verbose["spill_stores"],
        spill_loads=verbose["spill_loads"], stack_frame=verbose["stack_frame"], local_bytes=usage.get("local", 0),
        # Triton's dynamic shared memory (what a launch requests); cuobjdump's SHARED adds the 1 KiB
        # sm_90 reserves for the system in any block that uses shared memory.
        shared_bytes=int(getattr(meta, "shared", 0)), static_shared_bytes=usage.get("shared", 0),
        enable_fp_fusion=bool(getattr(meta, "enable_fp_fusion", True)),
        sass=count_sass(instructions), sass_mem=memory_widths(split_hot(instructions)[1]),
        sass_mem_all=memory_widths(instructions), ptx_mem=ptx_widths(ptx), sass_sha=sass_sha,
    )
    if verbose["registers"] != registers:
        result["note"] = (f"ptxas -v rerun used {verbose['registers']} registers, the cubin {registers}: "
                          "spill figures are from the rerun")
    return result


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def verify_jit(variant: Variant, row: Dict, tools: Dict) -> Dict:
    """On a CUDA machine: launch the variant for real (its launcher, CUDA copies of the same
    tensors) and compare the kernel Triton's JIT compiled with the static compile: the same SASS,
    registers and spills mean the recorded signature and specialisation are what a launch uses."""
    import torch

    module = import_kernel_module(variant.module)
    kernel, launcher = getattr(module, variant.kernel), getattr(module, variant.launcher)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[variant.dtype]
    args, kwargs = variant.build(torch, dtype, launcher)
    taken = inspect.signature(launcher).parameters
    kwargs = dict(kwargs, **{k: v for k, v in OPS_KWARGS.items() if k in taken})
    cuda = lambda v: v.cuda() if isinstance(v, torch.Tensor) else v  # noqa: E731
    kernel.device_caches.clear()  # so that this launch's kernel is the only one held
    launcher(*map(cuda, args), **{k: cuda(v) for k, v in kwargs.items()})
    torch.cuda.synchronize()
    compiled = [k for caches in kernel.device_caches.values() for k in caches[0].values()]
    if len(compiled) != 1:
        return dict(jit_match=False, jit_error=f"{len(compiled)} compiled kernels after one launch")
    jit = compiled[0]
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        Path(cubin).write_bytes(jit.asm["cubin"])
        text = subprocess.run([tools["cuobjdump"], "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
    sha = hashlib.sha256("\n".join(ins for _, _, ins in parse_sass(text)).encode()).hexdigest()[:16]
    result = dict(jit_sass_sha=sha, jit_registers=int(jit.n_regs), jit_spills=int(jit.n_spills),
                  jit_shared=int(jit.metadata.shared))
    # (n_spills is the driver's local memory size / 4, stack frames included: recorded, not compared)
    result["jit_match"] = (sha == row["sass_sha"] and result["jit_registers"] == row["registers"]
                           and result["jit_shared"] == row["shared_bytes"])
    return result


def collect(variants: Sequence[Variant] = VARIANTS, log=None, jit: bool = False) -> Dict:
    """Compile and measure every variant (TRITON_INTERPRET must be unset before the kernels are
    imported). Raises ToolchainUnavailable where nothing can be compiled."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise VariantError("TRITON_INTERPRET is set: the kernels would be interpreted; run sass.py in a "
                           "process without it (run_subprocess does)")
    tools = toolchain()
    started = time.perf_counter()
    rows, cache = [], {}
    for variant in variants:
        try:
            row = measure(variant, tools, cache)
            if jit:
                try:
                    row.update(verify_jit(variant, row, tools))
                except Exception as exc:
                    row.update(jit_match=False, jit_error=f"{type(exc).__name__}: {exc}")
        except ToolchainUnavailable:
            raise
        except Exception as exc:
            row = dict(name=variant.name, kernel=variant.kernel, module=f"kernels/{variant.module}.py",
                       dtype=variant.dtype, error=f"{type(exc).__name__}: {exc}")
        if log:
            log(f"{variant.name}: " + (row["error"] if "error" in row else f"{row['seconds']} s"))
        rows.append(row)
    meta = dict(triton=tools["triton"], ptxas=tools["ptxas_version"], gpu_name=tools["gpu_name"],
                target=f"cuda:{ARCH}", warp_size=WARP_SIZE, seconds=round(time.perf_counter() - started, 1),
                command="python benchmarks/sass.py " + " ".join(sys.argv[1:]))
    try:
        sys.path.insert(0, str(HERE))
        from common import git_state

        meta.update({f"git_{k}": v for k, v in git_state().items()})
    except Exception:  # pragma: no cover - git or torch missing
        pass
    return dict(meta=meta, counting=count_sass.__doc__.strip(), variants=rows)


def _widths(counts: Dict[str, int]) -> str:
    return " ".join(f"{k}x{v}" for k, v in sorted(counts.items(), key=lambda kv: -int(kv[0]))) or "-"


def _jit_figures(row: Dict) -> str:
    return (f"JIT: {row.get('jit_registers')} registers, {row.get('jit_shared')} B shared, SASS "
            f"{row.get('jit_sass_sha')}; static: {row['registers']}, {row['shared_bytes']} B, {row['sass_sha']}")


def markdown(report: Dict) -> str:
    meta = report["meta"]
    lines = [
        f"# Static SASS check, sm_{ARCH} (Triton {meta['triton']}, ptxas {meta['ptxas']}, {meta['gpu_name']})",
        "",
        f"Commit {meta.get('git_commit', '?')}{' (dirty tree)' if meta.get('git_dirty') else ''}; "
        f"`{meta['command']}`; {meta['seconds']} s. Compiled without a GPU by `benchmarks/sass.py`.",
        "",
        "| variant | dtype | regs | spill st/ld B | smem B | elem/thread | LDG bits x n | LDG.128 / need "
        "| STG bits x n | STG.128 / need | SASS hot / all | branches | instr/elem |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["variants"]:
        if "error" in row:
            lines.append(f"| {row['name']} | {row['dtype']} | {row['error']} |" + " |" * 10)
            continue
        lines.append(
            f"| {row['name']} | {row['dtype']} | {row['registers']} | {row['spill_stores']}/{row['spill_loads']} "
            f"| {row['shared_bytes']} | {row['elements_per_thread']} | {_widths(row['sass_mem']['LDG'])} "
            f"| {row['ldg128']} / {row['ldg128_expected']} | {_widths(row['sass_mem']['STG'])} "
            f"| {row['stg128']} / {row['stg128_expected']} | {row['sass']['hot']} / {row['sass']['counted']} "
            f"| {row['sass']['branches']} | {row['instr_per_elem']} |")
    lines += [
        "",
        "- **need**: 128-bit accesses the variant's streamed tensors need per thread (reads/writes of "
        "`elem/thread` contiguous elements each); LDG/STG counts are SASS instructions per thread.",
        "- **instr/elem**: " + " ".join(report["counting"].split()),
    ]
    notes = [f"- {row['name']}: {row['note']}" for row in report["variants"] if row.get("note")]
    checked = [row for row in report["variants"] if "jit_match" in row]
    if checked:
        differ = [f"{row['name']} ({row.get('jit_error') or _jit_figures(row)})" for row in checked
                  if not row["jit_match"]]
        notes.append(f"- `--verify-jit` on {meta.get('device', 'a GPU')}: the kernel Triton's JIT compiled for a "
                     f"real launch has the same SASS, registers and shared memory as the static compile for "
                     f"{len(checked) - len(differ)} of {len(checked)} variants"
                     + (f"; differ: {', '.join(differ)}" if differ else "."))
    return "\n".join(lines + notes) + "\n"


def write_report(report: Dict, out_dir: Path) -> Tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{report['meta']['triton']}-sm{ARCH}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=1, sort_keys=False) + "\n")
    md_path.write_text(markdown(report))
    return json_path, md_path


# ---------------------------------------------------------------------------------------------
# budgets (pure functions: no triton, no torch)
# ---------------------------------------------------------------------------------------------


BUDGET_DOC = (
    "Budgets of benchmarks/sass.py, held by tests/test_sass_budgets.py and `sass.py --check`. Per variant and "
    "Triton minor version: max_instr_per_elem = measured hot-path SASS instructions per element + margin; "
    "min_ldg128/min_stg128 = 128-bit global loads/stores per thread (what the streamed tensors need, or what "
    "the kernel does where it falls short: then 'gap' says so); max_global_accesses = LDG+STG instructions "
    "per thread on the hot path (catches narrower or extra accesses); max_shared_bytes = shared memory as "
    "measured (an elementwise kernel that needs any is converting layouts through it). max_spill_bytes "
    "holds everywhere. A "
    "Triton version without an entry is held to the loosest recorded version. Regenerate with "
    "`python benchmarks/sass.py --update-budgets` after a deliberate kernel change and review the diff."
)
_LOOSEST = dict(max_instr_per_elem=max, min_ldg128=min, min_stg128=min, max_global_accesses=max,
                max_shared_bytes=max)


def minor_version(version: str) -> str:
    return ".".join(version.split(".")[:2])


def _budget_for(entry: Dict, version: str) -> Tuple[Optional[Dict], str]:
    """This Triton version's budget of one variant, else the loosest of the recorded versions."""
    versions = {k: v for k, v in entry.items() if isinstance(v, dict)}
    if minor_version(version) in versions:
        return versions[minor_version(version)], f"triton {minor_version(version)}"
    if not versions:
        return None, ""
    loosest = {key: pick(v[key] for v in versions.values() if key in v) for key, pick in _LOOSEST.items()
               if any(key in v for v in versions.values())}
    return loosest, "loosest of triton " + ", ".join(sorted(versions))


def check_budgets(report: Dict, budgets: Dict) -> List[str]:
    """Every way ``report`` breaks ``budgets``, one line each (empty: all held)."""
    problems = []
    version = report["meta"]["triton"]
    entries = budgets.get("variants", {})
    max_spill = budgets.get("max_spill_bytes", 0)
    names = set()
    for row in report["variants"]:
        name = row["name"]
        names.add(name)
        if "error" in row:
            problems.append(f"{name}: did not compile: {row['error']}")
            continue
        spilled = row["spill_stores"] + row["spill_loads"]
        if spilled > max_spill:
            problems.append(f"{name}: spills {row['spill_stores']} B stores / {row['spill_loads']} B loads "
                            f"(budget {max_spill} B)")
        budget, source = _budget_for(entries.get(name, {}), version)
        if budget is None:
            problems.append(f"{name}: no budget in sass_budgets.json (python benchmarks/sass.py --update-budgets)")
            continue
        if "max_instr_per_elem" in budget and row["instr_per_elem"] > budget["max_instr_per_elem"]:
            problems.append(f"{name}: {row['instr_per_elem']} SASS instructions per element, budget "
                            f"{budget['max_instr_per_elem']} ({source})")
        if row["ldg128"] < budget.get("min_ldg128", 0):
            problems.append(f"{name}: {row['ldg128']} 128-bit global loads per thread, budget >= "
                            f"{budget['min_ldg128']} ({source}; loads by width in bits: {row['sass_mem']['LDG']})")
        if row["stg128"] < budget.get("min_stg128", 0):
            problems.append(f"{name}: {row['stg128']} 128-bit global stores per thread, budget >= "
                            f"{budget['min_stg128']} ({source}; stores by width in bits: {row['sass_mem']['STG']})")
        if "max_global_accesses" in budget and row["global_accesses"] > budget["max_global_accesses"]:
            problems.append(f"{name}: {row['global_accesses']} global load/store instructions per thread, budget "
                            f"{budget['max_global_accesses']} ({source}; loads {row['sass_mem']['LDG']}, "
                            f"stores {row['sass_mem']['STG']})")
        if "max_shared_bytes" in budget and row["shared_bytes"] > budget["max_shared_bytes"]:
            problems.append(f"{name}: {row['shared_bytes']} B shared memory, budget {budget['max_shared_bytes']} B "
                            f"({source}; in an elementwise kernel that is a layout conversion through shared memory)")
    for name in sorted(set(entries) - names):
        problems.append(f"{name}: budget for a variant sass.py does not measure (remove it from sass_budgets.json)")
    return problems


def updated_budgets(report: Dict, budgets: Optional[Dict], margin: float = DEFAULT_MARGIN) -> Dict:
    """``budgets`` with this report's Triton version set from its measurements (other versions
    kept): instructions per element + ``margin``; 128-bit loads/stores as many as the streamed
    tensors need, or what the kernel does where it falls short (``gap`` says so); global
    accesses as measured. Variants that no longer exist are dropped."""
    budgets = json.loads(json.dumps(budgets or {}))
    budgets["_doc"] = BUDGET_DOC
    budgets.setdefault("max_spill_bytes", 0)
    budgets["margin"] = margin
    version = minor_version(report["meta"]["triton"])
    entries = budgets.get("variants", {})
    entries = {name: entry for name, entry in entries.items() if name in {row["name"] for row in report["variants"]}}
    for row in report["variants"]:
        if "error" in row:
            continue
        gaps = [f"{row[kind]} of the {row[f'{kind}_expected']} 128-bit {what} the streamed tensors need"
                for kind, what in (("ldg128", "loads"), ("stg128", "stores")) if row[kind] < row[f"{kind}_expected"]]
        if row["shared_bytes"]:
            gaps.append(f"{row['shared_bytes']} B shared memory (a layout conversion through shared memory)")
        budget = dict(
            max_instr_per_elem=round(row["instr_per_elem"] * (1 + margin), 1),
            min_ldg128=min(row["ldg128"], row["ldg128_expected"]),
            min_stg128=min(row["stg128"], row["stg128_expected"]),
            max_global_accesses=row["global_accesses"],
            max_shared_bytes=row["shared_bytes"],
            measured_instr_per_elem=row["instr_per_elem"],
        )
        if gaps:
            budget["gap"] = "; ".join(gaps) + f" (triton {report['meta']['triton']})"
        entries.setdefault(row["name"], {})[version] = budget
    budgets["variants"] = {name: dict(sorted(entries[name].items())) for name in sorted(entries)}
    return {key: budgets[key] for key in ("_doc", "max_spill_bytes", "margin", "variants")} | {
        k: v for k, v in budgets.items() if k not in ("_doc", "max_spill_bytes", "margin", "variants")}


def load_budgets(path: Path = BUDGETS_PATH) -> Dict:
    return json.loads(Path(path).read_text()) if Path(path).exists() else {}


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------


def clean_env() -> Dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def run_subprocess(out_dir: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """This script in a fresh interpreter without TRITON_INTERPRET (for callers whose process has
    interpreted kernels loaded, such as the test suite)."""
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), "--out", str(out_dir), *extra],
                          env=clean_env(), cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=timeout)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument("--check", action="store_true", help="hold the budgets in sass_budgets.json (exit 1 if not)")
    parser.add_argument("--budgets", type=Path, default=BUDGETS_PATH, help="budgets file (default %(default)s)")
    parser.add_argument("--update-budgets", action="store_true",
                        help="set this Triton version's budgets from this run (margin --margin)")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                        help="headroom of the instructions-per-element budget (default %(default)s)")
    parser.add_argument("--only", nargs="*", default=None, help="variant names (or prefixes) to compile")
    parser.add_argument("--verify-jit", action="store_true",
                        help="(CUDA machine) also launch each variant and compare the JIT's kernel with the static one")
    args = parser.parse_args(argv)

    os.environ.pop("TRITON_INTERPRET", None)  # before anything imports the kernels
    variants = VARIANTS
    if args.only:
        variants = [v for v in VARIANTS if any(v.name == o or v.name.startswith(o + ".") for o in args.only)]
        if not variants:
            parser.error(f"no variant matches {args.only}; variants: {[v.name for v in VARIANTS]}")
    try:
        report = collect(variants, log=lambda line: print(line, file=sys.stderr), jit=args.verify_jit)
        if args.verify_jit:
            import torch

            report["meta"]["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    except ToolchainUnavailable as exc:
        print(f"sass.py: cannot compile for sm_{ARCH} here: {exc}", file=sys.stderr)
        return EXIT_NO_TOOLCHAIN
    json_path, md_path = write_report(report, args.out)
    print(markdown(report))
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    status = 0 if all("error" not in row for row in report["variants"]) else 1
    if args.update_budgets:
        if args.only:
            parser.error("--update-budgets needs every variant (drop --only)")
        budgets = updated_budgets(report, load_budgets(args.budgets), args.margin)
        args.budgets.write_text(json.dumps(budgets, indent=1) + "\n")
        print(f"updated {args.budgets} for triton {minor_version(report['meta']['triton'])}", file=sys.stderr)
    if args.check:
        budgets = load_budgets(args.budgets)
        if args.only:
            budgets = dict(budgets, variants={k: v for k, v in budgets.get("variants", {}).items()
                                              if k in {row["name"] for row in report["variants"]}})
        problems = check_budgets(report, budgets)
        for line in problems:
            print(f"BUDGET: {line}", file=sys.stderr)
        print(f"budgets: {'all held' if not problems else f'{len(problems)} broken'}", file=sys.stderr)
        status = status or (1 if problems else 0)
    return status


if __name__ == "__main__":
    sys.exit(main())
