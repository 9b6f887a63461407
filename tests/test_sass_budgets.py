"""Static budgets of the Triton kernels for sm_90, checked without a GPU (issue 11).

``benchmarks/sass.py`` compiles every kernel variant with Triton's bundled ptxas and cuobjdump;
these tests hold its report to ``benchmarks/sass_budgets.json``: no spills, 128-bit global
accesses where the streamed tensors allow them (or what the kernel does today, where it falls
short), a ceiling on SASS instructions per element, no shared memory where none was used.

The compile runs once, in a subprocess without TRITON_INTERPRET (conftest sets it on CPU
machines, and interpreted kernels cannot be compiled); it is skipped where Triton cannot compile
for CUDA here. The checker and counting tests below it are plain unit tests on fabricated input.
After a deliberate kernel change: ``python benchmarks/sass.py --update-budgets``.
"""
import copy
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("fastddpm_benchmarks_sass", ROOT / "benchmarks" / "sass.py")
sass = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = sass  # dataclasses look their module up by name
_spec.loader.exec_module(sass)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("sass")
    result = sass.run_subprocess(out, timeout=600)
    if result.returncode == sass.EXIT_NO_TOOLCHAIN:
        pytest.skip(f"cannot compile for sm_90 on this machine: {result.stderr.strip().splitlines()[-1]}")
    written = sorted(out.glob("*-sm90.json"))
    assert written, f"sass.py wrote no report (exit {result.returncode}):\n{result.stderr[-4000:]}"
    return json.loads(written[0].read_text())


@pytest.mark.slow
def test_every_variant_compiles(report):
    failed = {row["name"]: row["error"] for row in report["variants"] if "error" in row}
    assert not failed, failed
    assert [row["name"] for row in report["variants"]] == [v.name for v in sass.VARIANTS]


@pytest.mark.slow
def test_no_spills(report):
    spilled = {row["name"]: (row["spill_stores"], row["spill_loads"]) for row in report["variants"]
               if "error" not in row and row["spill_stores"] + row["spill_loads"]}
    assert not spilled, f"spill bytes (stores, loads): {spilled}"


@pytest.mark.slow
def test_budgets_hold(report):
    problems = sass.check_budgets(report, sass.load_budgets())
    assert not problems, "\n".join(problems + ["(after a deliberate change: python benchmarks/sass.py "
                                               "--update-budgets, and review the diff)"])


@pytest.mark.slow
def test_signature_follows_the_launcher(report):
    rows = {row["name"]: row for row in report["variants"] if "error" not in row}
    for dtype in ("fp32", "bf16", "fp16"):
        signature = rows[f"ddpm.philox.{dtype}"]["signature"]
        assert signature["x_ptr"] == signature["model_out_ptr"] == f"*{dtype}"
        assert signature["t_ptr"] == "*i64" and signature["table_ptr"] == "*fp32"
    assert rows["ddpm.noise.bf16"]["constexprs"]["HAS_NOISE"] is True
    assert rows["ddpm.philox.bf16"]["constexprs"]["HAS_NOISE"] is False
    assert rows["q_sample.philox.fp32"]["constexprs"]["T_PER_SAMPLE"] is True


# --- the checker and the counting, on fabricated input (fast, no toolchain needed) ---------------


def _row(name="step.fp32", **changes):
    row = dict(name=name, kernel="_k", dtype="fp32", spill_stores=0, spill_loads=0, instr_per_elem=20.0,
               ldg128=4, stg128=2, ldg128_expected=4, stg128_expected=2, global_accesses=8, shared_bytes=0,
               sass_mem={"LDG": {"128": 4, "32": 2}, "STG": {"128": 2}})
    row.update(changes)
    return row


def _report(*rows, triton="3.9.0"):
    return dict(meta=dict(triton=triton), variants=list(rows))


BUDGETS = dict(max_spill_bytes=0, variants={"step.fp32": {
    "3.9": dict(max_instr_per_elem=23.0, min_ldg128=4, min_stg128=2, max_global_accesses=8, max_shared_bytes=0),
    "3.6": dict(max_instr_per_elem=30.0, min_ldg128=2, min_stg128=2, max_global_accesses=10, max_shared_bytes=0),
}})


def test_checker_passes_a_report_within_budget():
    assert sass.check_budgets(_report(_row()), BUDGETS) == []


@pytest.mark.parametrize("changes, expected", [
    (dict(spill_stores=16, spill_loads=8), "spills 16 B stores / 8 B loads"),
    (dict(instr_per_elem=23.5), "23.5 SASS instructions per element, budget 23.0"),
    (dict(ldg128=2), "2 128-bit global loads per thread, budget >= 4"),
    (dict(stg128=0), "0 128-bit global stores per thread, budget >= 2"),
    (dict(global_accesses=12), "12 global load/store instructions per thread, budget 8"),
    (dict(shared_bytes=3072), "3072 B shared memory, budget 0 B"),
    (dict(error="CompilationError: boom"), "did not compile"),
])
def test_checker_flags_an_over_budget_report(changes, expected):
    problems = sass.check_budgets(_report(_row(**changes)), BUDGETS)
    assert len(problems) == 1 and expected in problems[0], problems


def test_checker_flags_missing_and_stale_budgets():
    problems = sass.check_budgets(_report(_row(name="new.fp32")), BUDGETS)
    assert any(p.startswith("new.fp32: no budget") for p in problems), problems
    assert any(p.startswith("step.fp32: budget for a variant sass.py does not measure") for p in problems), problems


def test_checker_uses_the_loosest_budget_for_an_unknown_triton():
    # 3.10 has no entry: instructions up to 30 (3.6's) pass, 2 128-bit loads (3.6's floor) pass.
    assert sass.check_budgets(_report(_row(instr_per_elem=29.0, ldg128=2), triton="3.10.0"), BUDGETS) == []
    problems = sass.check_budgets(_report(_row(instr_per_elem=31.0), triton="3.10.0"), BUDGETS)
    assert len(problems) == 1 and "loosest of triton 3.6, 3.9" in problems[0], problems


def test_updated_budgets_add_the_margin_and_record_gaps():
    report = _report(_row(instr_per_elem=20.0), _row(name="step.bf16", ldg128=0, ldg128_expected=2, stg128=0,
                                                     stg128_expected=1), triton="3.9.0")
    budgets = sass.updated_budgets(report, copy.deepcopy(BUDGETS), margin=0.15)
    fp32 = budgets["variants"]["step.fp32"]
    assert fp32["3.9"]["max_instr_per_elem"] == 23.0 and fp32["3.9"]["min_ldg128"] == 4
    assert fp32["3.6"] == BUDGETS["variants"]["step.fp32"]["3.6"]  # other versions kept
    bf16 = budgets["variants"]["step.bf16"]["3.9"]
    assert bf16["min_ldg128"] == 0 and bf16["min_stg128"] == 0 and "0 of the 2 128-bit loads" in bf16["gap"]
    assert sass.check_budgets(report, budgets) == []


SASS_TEXT = """
        Function : _k
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x0 */
        /*0010*/                   ISETP.GE.AND P0, PT, R0, 0x10, PT ;    /* 0x0 */
        /*0020*/              @!P0 BRA 0x60 ;                             /* 0x0 */
        /*0030*/                   LDG.E.CONSTANT R2, desc[UR4][R4.64] ;  /* 0x0 */
        /*0040*/               @P1 BRA 0x30 ;                             /* 0x0 */
        /*0050*/                   NOP ;                                  /* 0x0 */
        /*0060*/                   LDG.E.128 R4, desc[UR4][R2.64] ;       /* 0x0 */
        /*0070*/                   FFMA R4, R4, R5, R6 ;                  /* 0x0 */
        /*0080*/              @!P2 STG.E.128 desc[UR4][R2.64], R4 ;       /* 0x0 */
        /*0090*/                   STG.E.64 desc[UR4][R8.64], R4 ;        /* 0x0 */
        /*00a0*/                   EXIT ;                                 /* 0x0 */
        /*00b0*/                   BRA 0xb0;                              /* 0x0 */
        /*00c0*/                   NOP;                                   /* 0x0 */
"""


def test_count_sass_rules():
    instructions = sass.parse_sass(SASS_TEXT)
    assert len(instructions) == 13
    counts = sass.count_sass(instructions)
    # entry..last EXIT (11) without the NOP: 10; the skipped slow path (0x30, 0x40) is not hot.
    assert (counts["counted"], counts["hot"], counts["conditional"], counts["loops"]) == (10, 8, 2, 0)
    assert counts["hot_opcodes"]["LDG"] == 1 and "NOP" not in counts["hot_opcodes"]
    widths = sass.memory_widths(sass.split_hot(instructions)[1])
    assert widths == {"LDG": {"128": 1}, "STG": {"128": 1, "64": 1}}


def test_expected_128_bit_accesses():
    assert sass.expected_128(2, 8, 4) == 4  # fp32, 8 elements a thread: two 128-bit loads a tensor
    assert sass.expected_128(3, 8, 2) == 3  # bf16: one a tensor
    assert sass.expected_128(1, 4, 2) == 0  # 8 bytes a thread: 128-bit is impossible


def test_ptx_widths():
    ptx = ("\t@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];\n\tld.global.b64 %rd2, [ %rd3 + 0 ];\n"
           "\t@%p2 st.global.v2.b32 [ %rd4 + 0 ], { %r5, %r6 };\n\tld.global.nc.v2.b64 {%rd5, %rd6}, [%rd7];\n")
    assert sass.ptx_widths(ptx) == {"ld": {"128": 2, "64": 1}, "st": {"64": 1}}


def test_cli_reports_a_missing_toolchain_as_skipped(monkeypatch, tmp_path):
    # main() unsets TRITON_INTERPRET for the kernels it imports; monkeypatch puts it back after.
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))

    def unavailable():
        raise sass.ToolchainUnavailable("ptxas not found (test)")

    monkeypatch.setattr(sass, "toolchain", unavailable)
    assert sass.main(["--out", str(tmp_path)]) == sass.EXIT_NO_TOOLCHAIN
    assert not list(tmp_path.iterdir())


def test_budgets_cover_every_variant():
    budgets = sass.load_budgets()
    assert set(budgets["variants"]) == {v.name for v in sass.VARIANTS}, \
        "sass_budgets.json and VARIANTS differ: python benchmarks/sass.py --update-budgets"
    assert budgets["max_spill_bytes"] == 0
