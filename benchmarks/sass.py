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
from typing import Dict, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
DEFAULT_OUT = HERE / "results" / "static"
ARCH = 90
WARP_SIZE = 32
EXIT_NO_TOOLCHAIN = 77  # automake's "skipped"


# The pieces, each a module beside this one: the variants compiled, what is counted in a compiled
# kernel, and the budgets held. Their names are this module's too (tests and callers read them here).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sass_budgets import (BUDGET_DOC, BUDGETS_PATH, DEFAULT_MARGIN, check_budgets, load_budgets,  # noqa: E402,F401
                          minor_version, updated_budgets)
from sass_counts import (count_sass, expected_128, memory_widths, parse_sass, ptx_widths,  # noqa: E402,F401
                         ptxas_verbose, resource_usage, split_hot)
from sass_variants import OPS_KWARGS, VARIANTS, Variant  # noqa: E402,F401

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
                           "update VARIANTS in benchmarks/sass_variants.py")
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
                           f"{exc}); the launcher's arguments changed: update VARIANTS in benchmarks/sass_variants.py") from exc
    finally:
        setattr(module, variant.kernel, kernel)
    if len(recorder.launches) != 1:
        raise VariantError(f"{where}:{variant.launcher} launched {variant.kernel} {len(recorder.launches)} times "
                           "for one call (expected once): update VARIANTS in benchmarks/sass_variants.py")
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
                               "update VARIANTS in benchmarks/sass_variants.py")
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
