"""The budgets of ``benchmarks/sass.py`` (``sass_budgets.json``): check a report against them, and set
them from one. Pure functions of the report: no triton, no torch."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
BUDGETS_PATH = HERE / "sass_budgets.json"
DEFAULT_MARGIN = 0.15


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


