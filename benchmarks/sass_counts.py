"""What ``benchmarks/sass.py`` reads off a compiled kernel: SASS instructions and how they are counted,
global memory access widths (SASS and PTX), registers and spills. Standard library only."""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple


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


