"""Run every benchmark that applies on this machine and write the results.

    python benchmarks/run.py [--quick] [--device cuda|cpu] [--sizes 64K 1M 16M] [--out DIR]
                             [--dtypes fp32 bf16] [--only copy kernels e2e training]

Writes ``DIR/<device-name>/<date>-<commit>.json`` (every raw timing and the run's metadata), a
Markdown table (``.md``) and a plot (``.png``) beside it, then prints the table. Sections:

1. copy bandwidth of a large device-to-device copy (the roofline every GB/s is compared with);
2. per-step kernels (fused reverse step, q_sample, time embedding) against the eager reference,
   torch.compile of it and diffusers, fp32/bf16, sizes 64K..64M elements;
3. end-to-end sampling: diffusers' UNet2DModel (DDPM CIFAR-10 config, random weights) under
   DDPMPipeline/DDIMPipeline vs fastddpm.sample, and fastddpm's own UNet, with and without CUDA
   graphs, plus the share of each step spent outside the model;
4. training-step throughput with the q_sample kernel vs the reference;
5. throughput: the time to draw 50,000 samples with the 35.7M CIFAR-10 UNet and DPM-Solver++(2M)
   at 20 steps, fastddpm at each model setting against diffusers' pipeline and the model alone
   (``benchmarks/throughput.py``; ``--dry``: toy sizes on a CPU).

Without a GPU the kernel rows that need one say "no GPU" and the CPU paths run instead. A row
that fails records its error and the run goes on. See benchmarks/README.md for the columns.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

# The helper modules beside this file, also under ``python -m benchmarks.run``.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import NO_GPU, OK, error_text, format_size, markdown_table, millis, parse_size, percent, ratio  # noqa: E402

SECTIONS = ("copy", "kernels", "e2e", "training", "throughput")
MiB = 2**20


# ---------------------------------------------------------------------------------------------
# the plan: what runs with which sizes
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Plan:
    device: str
    quick: bool
    sections: Sequence[str]
    sizes: List[int]
    dtypes: List[str]
    embedding_batches: List[int]
    copy_numel: int
    e2e_suites: List[Dict]
    e2e_batches: List[int]
    e2e_steps: Dict[str, int]
    e2e_dtype: str
    model_only_calls: int
    training: Dict

    @classmethod
    def for_machine(cls, args, device: str) -> "Plan":
        gpu, quick = device == "cuda", args.quick
        if args.sizes:
            sizes = list(args.sizes)
        elif gpu:
            sizes = [parse_size(s) for s in (("1M", "16M") if quick else ("64K", "256K", "1M", "4M", "16M", "64M"))]
        else:
            sizes = [parse_size(s) for s in (("64K", "1M") if quick else ("64K", "256K", "1M", "4M"))]
        if gpu:
            suites = [
                dict(name="a: diffusers UNet2DModel, DDPM CIFAR-10 config", kind="diffusers",
                     config="DDPM_CIFAR10_UNET2D", pipeline=True),
                dict(name="b: fastddpm UNet ddpm_cifar10", kind="fastddpm", preset="ddpm_cifar10", pipeline=False),
            ]
            batches = [1, 128] if quick else [1, 16, 128]
            steps = dict(ddpm=100, ddim=20) if quick else dict(ddpm=1000, ddim=50)
            training = dict(preset="ddpm_cifar10", batch=128, steps=10 if quick else 30, warmup=3)
        else:
            # The CIFAR-10 networks take seconds a step on a CPU: small stand-ins keep the run short.
            suites = [
                dict(name="a: tiny diffusers UNet2DModel (16x16, CPU stand-in)", kind="diffusers",
                     config="TINY_UNET2D", pipeline=True),
                dict(name="b: fastddpm UNet digits (8x8, CPU stand-in)", kind="fastddpm", preset="digits",
                     pipeline=False),
            ]
            batches = [1, 4] if quick else [1, 16]
            steps = dict(ddpm=20, ddim=10) if quick else dict(ddpm=100, ddim=50)
            training = dict(preset="digits", batch=64, steps=3 if quick else 10, warmup=1)
        if getattr(args, "e2e_batches", None):
            batches = list(args.e2e_batches)
        if getattr(args, "e2e_steps", None):
            steps = dict(ddpm=args.e2e_steps[0], ddim=args.e2e_steps[1])
        if getattr(args, "e2e_suites", None):
            suites = [suite for suite in suites if suite["name"][0] in args.e2e_suites]
        return cls(
            device=device, quick=quick, sections=args.only or SECTIONS, sizes=sizes, dtypes=list(args.dtypes),
            embedding_batches=[1, 128, 4096] + ([] if (quick or not gpu) else [65536]),
            copy_numel=(2**27 if gpu else 2**24),  # 512 MiB / 64 MiB of float32, far beyond any cache
            e2e_suites=suites, e2e_batches=batches, e2e_steps=steps, e2e_dtype=args.e2e_dtype,
            model_only_calls=100 if gpu else 20, training=training,
        )


# ---------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------
def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def _time_kernel(fn, device: str) -> Dict:
    if device == "cuda":
        timing = common.time_cuda(fn)
        # About 20 ms of back-to-back calls per repeat: enough to amortise the events, short
        # enough for the 64M-element baselines.
        calls = max(5, min(50, int(0.02 / max(timing["median_s"], 1e-7))))
        timing["back_to_back"] = common.time_cuda_back_to_back(fn, calls=calls)
        return timing
    return common.time_cpu(fn)


def measure_copy(plan: Plan) -> Dict:
    import torch
    import workloads

    row = dict(numel=plan.copy_numel, dtype="fp32", bytes=workloads.copy_bytes(plan.copy_numel, torch.float32))
    try:
        timing = _time_kernel(workloads.build_copy(plan.copy_numel, plan.device), plan.device)
        row.update(status=OK, timing=common.sanitize(timing), gbps=row["bytes"] / timing["median_s"] / 1e9)
    except Exception as exc:
        row.update(status=error_text(exc))
    _free(plan.device)
    return row


def measure_kernels(plan: Plan, copy_gbps: Optional[float], log) -> List[Dict]:
    import workloads

    rows = []
    for op in workloads.OPS:
        dtypes = ["fp32"] if op == "timestep_embedding" else plan.dtypes
        sizes = plan.embedding_batches if op == "timestep_embedding" else plan.sizes
        for dtype_name in dtypes:
            dtype = workloads.DTYPES[dtype_name]
            for numel in sizes:
                for impl in workloads.OP_IMPLS[op]:
                    row = dict(op=op, impl=impl, dtype=dtype_name, numel=numel,
                               bytes=workloads.bytes_moved(op, numel, dtype))
                    if impl in workloads.GPU_ONLY_IMPLS and plan.device != "cuda":
                        row["status"] = NO_GPU
                        rows.append(row)
                        continue
                    try:
                        fn = workloads.build_kernel_case(op, impl, numel, dtype, plan.device)
                        if not workloads.finite(fn()):
                            raise RuntimeError("the op produced non-finite values")
                        timing = _time_kernel(fn, plan.device)
                        gbps = row["bytes"] / timing["median_s"] / 1e9
                        row.update(status=OK, timing=common.sanitize(timing), gbps=gbps,
                                   copy_fraction=gbps / copy_gbps if copy_gbps else None)
                        del fn
                    except Exception as exc:
                        row["status"] = error_text(exc)
                    log(f"  {op:18s} {dtype_name} {format_size(numel):>5s} {impl:9s} "
                        f"{millis(row.get('timing', {}).get('median_s'))} ms  {row['status'] if row['status'] != OK else ''}")
                    rows.append(row)
                    _free(plan.device)
    add_kernel_speedups(rows)
    return rows


def add_kernel_speedups(rows: List[Dict]) -> None:
    """fastddpm's speed-up over each baseline row, and every row's speed-up over diffusers."""
    groups: Dict[tuple, Dict[str, Dict]] = {}
    for row in rows:
        groups.setdefault((row["op"], row["dtype"], row["numel"]), {})[row["impl"]] = row

    def median(row):
        return row["timing"]["median_s"] if row and row.get("status") == OK else None

    for impls in groups.values():
        ours, theirs = median(impls.get("fastddpm")), median(impls.get("diffusers"))
        for impl, row in impls.items():
            mine = median(row)
            if mine is None:
                continue
            if impl != "fastddpm" and ours:
                row["fastddpm_speedup"] = mine / ours
            if impl != "diffusers" and theirs:
                row["speedup_vs_diffusers"] = theirs / mine


def _e2e_timesteps(plan: Plan, sampler: str, steps: int, batch: int, pipeline: bool):
    """The timestep arguments the model sees in the first ``model_only_calls`` steps."""
    import torch

    count = min(steps, plan.model_only_calls)
    if pipeline:
        from diffusers import DDIMScheduler, DDPMScheduler

        scheduler = (DDPMScheduler if sampler == "ddpm" else DDIMScheduler)(num_train_timesteps=1000)
        scheduler.set_timesteps(steps)
        return list(scheduler.timesteps[:count])
    values = torch.linspace(999, 0, steps).round().to(torch.int64)[:count]
    return [torch.full((batch,), int(v), dtype=torch.int64, device=plan.device) for v in values]


def _time_e2e(run, plan: Plan, steps: int) -> Dict:
    # A 1000-step run is long enough to time once; shorter ones are repeated.
    return common.time_wall(run, device=plan.device, repeats=1 if steps > 100 else 3, warmup=0)


def measure_e2e(plan: Plan, log) -> List[Dict]:
    import torch
    import workloads

    dtype = workloads.DTYPES[plan.e2e_dtype]
    # (cuda_graph, noise source) of the fastddpm rows: on a GPU the in-kernel Philox noise with
    # and without CUDA graphs; on a CPU (no graphs) the Philox reference vs torch.randn noise.
    variants = [(False, "seed"), (True, "seed")] if plan.device == "cuda" else [(False, "seed"), (False, "generator")]
    rows = []
    for suite in plan.e2e_suites:
        try:
            if suite["kind"] == "diffusers":
                unet = model = workloads.make_diffusers_unet(getattr(workloads, suite["config"]), plan.device, dtype)
            else:
                unet = model = workloads.make_fastddpm_model(suite["preset"], plan.device, dtype)
            params = workloads.params_millions(model)
        except Exception as exc:
            rows.append(dict(suite=suite["name"], status=error_text(exc)))
            log(f"  {suite['name']}: {rows[-1]['status']}")
            continue
        for sampler in ("ddpm", "ddim"):
            steps = plan.e2e_steps[sampler]
            for batch in plan.e2e_batches:
                base = dict(suite=suite["name"], params_m=params, sampler=sampler, steps=steps, batch=batch,
                            dtype=plan.e2e_dtype)
                group = []
                if suite["pipeline"]:
                    group.append(_e2e_row(dict(base, impl=f"{sampler.upper()}Pipeline", cuda_graph=None,
                                               noise="generator"), plan,
                                          lambda n: workloads.pipeline_runner(unet, sampler, n, batch, plan.device),
                                          lambda: workloads.model_only_runner(
                                              lambda x, t: unet(x, t).sample, _shape(model, batch),
                                              _e2e_timesteps(plan, sampler, steps, batch, True), plan.device, dtype),
                                          steps, log))
                for graph, noise in variants:
                    group.append(_e2e_row(
                        dict(base, impl="fastddpm.sample", cuda_graph=graph, noise=noise), plan,
                        lambda n, g=graph, z=noise: workloads.fastddpm_runner(model, _shape(model, batch), sampler,
                                                                              n, plan.device, dtype, g, z),
                        lambda g=graph: workloads.model_only_runner(
                            model, _shape(model, batch), _e2e_timesteps(plan, sampler, steps, batch, False),
                            plan.device, dtype, cuda_graph=g),
                        steps, log))
                add_e2e_ratios(group)
                rows.extend(group)
        del unet, model
        _free(plan.device)
    return rows


def _shape(model, batch):
    import workloads

    return workloads.sample_shape_of(model, batch)


def _e2e_row(row: Dict, plan: Plan, make_runner, make_model_only, steps: int, log) -> Dict:
    try:
        # Warm-up with a short run: cuDNN heuristics, kernel compilation, allocator growth.
        make_runner(min(steps, 3))()
        timing = _time_e2e(make_runner(steps), plan, steps)
        wall = timing["median_s"]
        row.update(status=OK, timing=common.sanitize(timing), samples_per_s=row["batch"] / wall,
                   step_s=wall / steps)
    except Exception as exc:
        row["status"] = error_text(exc)
    if row["status"] == OK:
        try:
            model_only = make_model_only()
            calls = min(steps, plan.model_only_calls)
            model_timing = common.time_wall(model_only, device=plan.device, repeats=3, warmup=1)
            row["model_only"] = common.sanitize(dict(model_timing, calls=calls))
            row["model_step_s"] = model_timing["median_s"] / calls
            row["outside_model_share"] = 1.0 - row["model_step_s"] / row["step_s"]
        except Exception as exc:
            row["model_only_status"] = error_text(exc)
    log(f"  {row['suite'][:40]:40s} {row['sampler']} {row['steps']:4d} steps b{row['batch']:<3d} "
        f"{row['impl']:15s} noise={row['noise']:9s} graph={row['cuda_graph']!s:5s} "
        + (f"{row['samples_per_s']:.2f} samples/s" if row["status"] == OK else row["status"]))
    _free(plan.device)
    return row


def add_e2e_ratios(group: List[Dict]) -> None:
    """Speed-up of each fastddpm row over the pipeline, and of CUDA graphs over no graphs."""
    ok = [r for r in group if r.get("status") == OK]
    pipeline = next((r for r in ok if r["impl"].endswith("Pipeline")), None)
    no_graph = next((r for r in ok if r["impl"] == "fastddpm.sample" and not r["cuda_graph"]
                     and r["noise"] == "seed"), None)
    for row in ok:
        if row["impl"] == "fastddpm.sample" and pipeline:
            row["speedup_vs_pipeline"] = row["samples_per_s"] / pipeline["samples_per_s"]
        if row["impl"] == "fastddpm.sample" and row["cuda_graph"] and no_graph:
            row["cuda_graph_speedup"] = row["samples_per_s"] / no_graph["samples_per_s"]


def measure_training(plan: Plan, log) -> List[Dict]:
    import workloads

    config = plan.training
    rows = []
    for q_impl in workloads.TRAINING_Q_IMPLS:
        row = dict(model=config["preset"], batch=config["batch"], q_sample=q_impl, steps=config["steps"])
        if q_impl != "reference" and plan.device != "cuda":
            rows.append(dict(row, status=NO_GPU))
            continue
        try:
            import torch

            model = workloads.make_fastddpm_model(config["preset"], plan.device, torch.float32)
            shape = workloads.sample_shape_of(model, config["batch"])
            step = workloads.training_step_runner(model, shape, q_impl, plan.device)

            def run_steps():
                for _ in range(config["steps"]):
                    loss = step()
                return loss

            for _ in range(config["warmup"]):
                step()
            timing = common.time_wall(run_steps, device=plan.device, repeats=3, warmup=0)
            steps_per_s = config["steps"] / timing["median_s"]
            row.update(status=OK, timing=common.sanitize(timing), steps_per_s=steps_per_s,
                       samples_per_s=steps_per_s * config["batch"], params_m=workloads.params_millions(model))
            del model, step
        except Exception as exc:
            row["status"] = error_text(exc)
        log(f"  training {row['model']} b{row['batch']} q_sample={q_impl}: "
            + (f"{row['steps_per_s']:.2f} steps/s" if row["status"] == OK else row["status"]))
        rows.append(row)
        _free(plan.device)
    baseline = next((r for r in rows if r["q_sample"] == "reference" and r["status"] == OK), None)
    for row in rows:
        if baseline and row is not baseline and row["status"] == OK:
            row["speedup_vs_reference"] = row["steps_per_s"] / baseline["steps_per_s"]
    return rows


# ---------------------------------------------------------------------------------------------
# goals (GPU figures only)
# ---------------------------------------------------------------------------------------------
# The GPU issue's goals (issue 12): the step's and q_sample's share of the copy bandwidth at >= 16M
# elements; the step against diffusers (fp32: 7.3x is the byte-count ceiling) and torch.compile
# (per dtype); end to end against the pipelines.
GOALS = dict(step_copy_fraction=0.90, q_sample_copy_fraction=0.90, step_vs_diffusers=dict(fp32=6.5),
             step_vs_compile=dict(fp32=1.0, bf16=1.5), e2e_batch128=1.3, e2e_batch1=3.0,
             # the multistep solvers' steps draw no noise: both can reach the copy roofline (issue 21)
             multistep_copy_fraction=0.90, multistep_vs_compile=dict(fp32=0.97))
MULTISTEP_OPS = (("dpmpp_2m", "DPM-Solver++(2M) step"), ("unipc", "UniPC step"))


def _verdict(value: Optional[float], goal: float, unit: str) -> str:
    if value is None:
        return "not measured"
    if value >= goal:
        return "met"
    short = goal - value
    return f"missed by {100 * short:.0f} points" if unit == "%" else f"missed by {short:.2f}x ({value / goal:.0%} of goal)"


def _multistep_goals(results: Dict) -> List[Dict]:
    """The solvers' fused steps: >= 90 % of copy at >= 16M elements, and against torch.compile."""
    goals, kernels = [], results.get("kernels", [])
    for op, name in MULTISTEP_OPS:
        ours = [r for r in kernels if r["op"] == op and r["impl"] == "fastddpm"]
        for dtype in sorted({r["dtype"] for r in ours}):
            large = [r for r in ours if r["dtype"] == dtype and r.get("status") == OK and r["numel"] >= 16 * MiB]
            fraction = min((r["copy_fraction"] for r in large if r.get("copy_fraction")), default=None)
            goals.append(dict(goal=f"{name} >= {GOALS['multistep_copy_fraction']:.0%} of copy bandwidth at >= 16M "
                                   f"elements ({dtype})", value=percent(fraction),
                              where=", ".join(format_size(r["numel"]) for r in large) or "—",
                              verdict=_verdict(fraction, GOALS["multistep_copy_fraction"], "%")))
            if dtype in GOALS["multistep_vs_compile"]:
                speedups = [r for r in kernels if r["op"] == op and r["impl"] == "compile" and r["dtype"] == dtype
                            and r.get("fastddpm_speedup")]
                worst = min(speedups, key=lambda r: r["fastddpm_speedup"], default=None)
                value = worst["fastddpm_speedup"] if worst else None
                goal = GOALS["multistep_vs_compile"][dtype]
                goals.append(dict(goal=f"{name} >= {goal}x torch.compile ({dtype}, worst size)", value=ratio(value),
                                  where=format_size(worst["numel"]) if worst else "—",
                                  verdict=_verdict(value, goal, "x")))
    return goals


def evaluate_goals(results: Dict) -> List[Dict]:
    """Each goal of the issue against the measured numbers; "not measured" without them."""
    goals = []
    steps = [r for r in results.get("kernels", []) if r["op"] == "ddpm_step" and r["impl"] == "fastddpm"]
    for dtype in sorted({r["dtype"] for r in steps}):
        for op, name, key in (("ddpm_step", "fused step", "step_copy_fraction"),
                              ("q_sample", "q_sample", "q_sample_copy_fraction")):
            large = [r for r in results.get("kernels", []) if r["op"] == op and r["impl"] == "fastddpm"
                     and r["dtype"] == dtype and r.get("status") == OK and r["numel"] >= 16 * MiB]
            fraction = min((r["copy_fraction"] for r in large if r.get("copy_fraction")), default=None)
            goals.append(dict(goal=f"{name} >= {GOALS[key]:.0%} of copy bandwidth at >= 16M elements ({dtype})",
                              value=percent(fraction), where=", ".join(format_size(r["numel"]) for r in large) or "—",
                              verdict=_verdict(fraction, GOALS[key], "%")))
        for baseline, key in (("diffusers", "step_vs_diffusers"), ("compile", "step_vs_compile")):
            if dtype not in GOALS[key]:
                continue
            speedups = [(r["numel"], r) for r in results["kernels"]
                        if r["op"] == "ddpm_step" and r["impl"] == baseline and r["dtype"] == dtype
                        and r.get("fastddpm_speedup")]
            worst = min(speedups, key=lambda item: item[1]["fastddpm_speedup"], default=None)
            value = worst[1]["fastddpm_speedup"] if worst else None
            goals.append(dict(goal=f"fused step >= {GOALS[key][dtype]}x {baseline} ({dtype}, worst size)",
                              value=ratio(value), where=format_size(worst[0]) if worst else "—",
                              verdict=_verdict(value, GOALS[key][dtype], "x")))
    goals += _multistep_goals(results)
    for batch, key in ((128, "e2e_batch128"), (1, "e2e_batch1")):
        for sampler in ("ddpm", "ddim"):
            candidates = [r for r in results.get("e2e", []) if r.get("status") == OK and r.get("batch") == batch
                          and r.get("sampler") == sampler and r.get("speedup_vs_pipeline")]
            best = max(candidates, key=lambda r: r["speedup_vs_pipeline"], default=None)
            value = best["speedup_vs_pipeline"] if best else None
            goals.append(dict(goal=f"e2e {sampler.upper()} >= {GOALS[key]}x {sampler.upper()}Pipeline at batch {batch}",
                              value=ratio(value),
                              where=(f"{best['steps']} steps, cuda_graph={best['cuda_graph']}" if best else "—"),
                              verdict=_verdict(value, GOALS[key], "x")))
    return goals


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def _spread(row: Dict) -> str:
    timing = row.get("timing")
    if not timing:
        return "—"
    return f"{millis(timing['p20_s'])}–{millis(timing['p80_s'])}"


def _status_cell(row: Dict) -> str:
    return "" if row.get("status") == OK else row.get("status", "")


def render_markdown(results: Dict) -> str:
    meta = results["meta"]
    parts = [
        f"# fastddpm benchmarks: {meta['device_name']}",
        "",
        f"- date: {meta['date']}; commit {meta['git_commit']}" + (" (dirty tree)" if meta.get("git_dirty") else ""),
        f"- torch {meta['torch']}, triton {meta['triton']}, diffusers {meta['diffusers']}; "
        f"{meta['torch_threads']} CPU threads",
        f"- command: `{meta['command']}`",
    ]
    if meta.get("triton_interpret_unset"):
        parts.append("- TRITON_INTERPRET was set in the environment and was unset: nothing ran interpreted")
    copy = results.get("copy")
    if copy:
        parts += ["", "## Copy bandwidth (roofline)", ""]
        if copy.get("status") == OK:
            parts.append(f"{format_size(copy['numel'])} float32 elements copied, {copy['bytes'] / MiB:.0f} MiB moved "
                         f"(read + write): median {millis(copy['timing']['median_s'])} ms, "
                         f"**{copy['gbps']:.1f} GB/s**")
        else:
            parts.append(copy.get("status", ""))
    if results.get("kernels"):
        parts += ["", "## Per-step kernels", "",
                  "GB/s = the op's byte model / median time; % copy = GB/s over the copy bandwidth above; "
                  "fastddpm x = this row's time / fastddpm's; vs diffusers = diffusers' time / this row's.", ""]
        headers = ["op", "dtype", "elements", "impl", "median ms", "p20–p80 ms", "n", "back-to-back ms", "GB/s",
                   "% copy", "fastddpm x", "vs diffusers", "status"]
        table = []
        for row in results["kernels"]:
            timing = row.get("timing") or {}
            b2b = timing.get("back_to_back") or {}
            table.append([row["op"], row["dtype"], format_size(row["numel"]), row["impl"],
                          millis(timing.get("median_s")), _spread(row), timing.get("count", "—"),
                          millis(b2b.get("median_s")), f"{row['gbps']:.3g}" if row.get("gbps") else "—",
                          percent(row.get("copy_fraction")), ratio(row.get("fastddpm_speedup")),
                          ratio(row.get("speedup_vs_diffusers")), _status_cell(row)])
        parts.append(markdown_table(headers, table))
    if results.get("e2e"):
        parts += ["", "## End to end", "",
                  "outside model = 1 - (model-only time per step) / (full loop time per step); "
                  "vs pipeline = samples/s over the diffusers pipeline's with the same model; "
                  "graph x = samples/s with cuda_graph=True over cuda_graph=False.", ""]
        headers = ["model", "sampler", "steps", "batch", "impl", "noise", "cuda graph", "wall s", "samples/s", "ms/step",
                   "model ms/step", "outside model", "vs pipeline", "graph x", "status"]
        table = []
        for row in results["e2e"]:
            if "sampler" not in row:
                table.append([row["suite"]] + ["—"] * 13 + [row.get("status", "")])
                continue
            timing = row.get("timing") or {}
            table.append([row["suite"], row["sampler"], row["steps"], row["batch"], row["impl"], row["noise"],
                          "—" if row["cuda_graph"] is None else str(row["cuda_graph"]),
                          f"{timing['median_s']:.2f}" if timing else "—",
                          f"{row['samples_per_s']:.2f}" if row.get("samples_per_s") else "—",
                          millis(row.get("step_s")), millis(row.get("model_step_s")),
                          percent(row.get("outside_model_share")), ratio(row.get("speedup_vs_pipeline")),
                          ratio(row.get("cuda_graph_speedup")),
                          _status_cell(row) or row.get("model_only_status", "")])
        parts.append(markdown_table(headers, table))
    if results.get("training"):
        parts += ["", "## Training step", ""]
        headers = ["model", "batch", "q_sample", "steps/s", "samples/s", "vs reference", "status"]
        table = [[r["model"], r["batch"], r["q_sample"], f"{r['steps_per_s']:.2f}" if r.get("steps_per_s") else "—",
                  f"{r['samples_per_s']:.1f}" if r.get("samples_per_s") else "—",
                  ratio(r.get("speedup_vs_reference")), _status_cell(r)] for r in results["training"]]
        parts.append(markdown_table(headers, table))
    if results.get("throughput"):
        import throughput

        plan = results.get("throughput_plan", {})
        parts += ["", "## Throughput: 50,000 samples", "",
                  f"{plan.get('model_name', '')}, DPM-Solver++(2M) {plan.get('steps', '')} steps; samples/s = batch / "
                  "median wall time of one call; 50k in s = 50,000 / samples/s; model-only = the model alone, "
                  "graphed on a GPU; outside model = 1 - model-only / call time; vs fastest diffusers = samples/s "
                  "over diffusers' fastest setting at that batch.", "",
                  throughput.render_markdown(results["throughput"], results.get("throughput_goals"))]
    parts += ["", "## Goals", ""]
    if meta["device"] != "cuda":
        parts.append("The goals are about GPU figures: not measured on this CPU-only machine.")
    else:
        parts.append(markdown_table(["goal", "measured", "where", "verdict"],
                                    [[g["goal"], g["value"], g["where"], g["verdict"]] for g in results["goals"]]))
    return "\n".join(parts) + "\n"


def render_plot(results: Dict, path: Path) -> Optional[str]:
    """A 2x2 figure: GB/s of the step and of q_sample per size, e2e samples/s, training steps/s."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        return error_text(exc)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    copy = results.get("copy") or {}
    for ax, op in zip(axes[0], ("ddpm_step", "q_sample")):
        rows = [r for r in results.get("kernels", []) if r["op"] == op and r.get("status") == OK]
        for (impl, dtype) in sorted({(r["impl"], r["dtype"]) for r in rows}):
            series = sorted((r["numel"], r["gbps"]) for r in rows if r["impl"] == impl and r["dtype"] == dtype)
            ax.plot([s[0] for s in series], [s[1] for s in series], marker="o",
                    linestyle="-" if dtype == "fp32" else "--", label=f"{impl} {dtype}")
        if copy.get("gbps"):
            ax.axhline(copy["gbps"], color="black", linewidth=1, label="copy bandwidth")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("elements")
        ax.set_ylabel("effective GB/s (byte model)")
        ax.set_title(op)
        if rows:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    e2e = [r for r in results.get("e2e", []) if r.get("status") == OK]
    ax = axes[1][0]
    if e2e:
        labels = [f"{r['suite'][:1]} {r['sampler']} b{r['batch']}\n{r['impl'].replace('fastddpm.sample', 'fastddpm')}"
                  + (" graph" if r["cuda_graph"] else "")
                  + (" gen" if r["impl"] == "fastddpm.sample" and r["noise"] == "generator" else "") for r in e2e]
        colors = ["tab:gray" if r["impl"].endswith("Pipeline") else "tab:green" if r["cuda_graph"]
                  else "tab:blue" for r in e2e]
        ax.bar(range(len(e2e)), [r["samples_per_s"] for r in e2e], color=colors)
        ax.set_xticks(range(len(e2e)))
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("samples/s")
    ax.set_title("end to end")
    training = [r for r in results.get("training", []) if r.get("status") == OK]
    ax = axes[1][1]
    if training:
        ax.bar([f"{r['model']} b{r['batch']}\n{r['q_sample']}" for r in training], [r["steps_per_s"] for r in training])
    else:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("training steps/s")
    ax.set_title("training step")
    meta = results["meta"]
    fig.suptitle(f"fastddpm on {meta['device_name']} ({meta['git_commit']}, {meta['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def _size_argument(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _batch_argument(text: str):
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int or auto, got {text!r}")
    return value


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sizes, steps and batches")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--sizes", nargs="+", metavar="N", type=_size_argument,
                        help="kernel sizes in elements, e.g. 64K 1M 16M")
    parser.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16", "fp16"), default=["fp32", "bf16"],
                        help="storage dtypes of the kernel rows (default fp32 bf16)")
    parser.add_argument("--e2e-dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="precision of both sides of the end-to-end runs (default fp32)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--tag", default="", help="appended to the results' file names")
    parser.add_argument("--e2e-batches", nargs="+", type=int, metavar="B",
                        help="end-to-end batch sizes (default: see benchmarks/README.md)")
    parser.add_argument("--e2e-steps", nargs=2, type=int, metavar=("DDPM", "DDIM"),
                        help="end-to-end step counts of the DDPM and DDIM runs")
    parser.add_argument("--e2e-suites", nargs="+", choices=("a", "b"),
                        help="end-to-end model suites: a (diffusers UNet2DModel), b (fastddpm UNet)")
    parser.add_argument("--dry", action="store_true",
                        help="throughput: the same rows at toy sizes (a tiny UNet, 2 steps), to check the plumbing")
    parser.add_argument("--throughput-batches", nargs="+", type=_batch_argument, metavar="B|auto",
                        help="throughput batch sizes (default 1 64 256 1024 auto on a GPU)")
    parser.add_argument("--throughput-settings", nargs="+", metavar="SETTING",
                        help="fastddpm model settings of the throughput rows, e.g. fp32 bf16 bf16+cl bf16+cl+compile")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (torch.set_num_threads); default torch's choice")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="results root; files go to OUT/<device-name>/ (default benchmarks/results)")
    return parser.parse_args(argv)


def _write_json(path: Path, results: Dict) -> None:
    """``results`` as JSON at ``path``, written to a temporary file and renamed into place."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(results, indent=1, default=str) + "\n")
    temporary.replace(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    interpreter_was_set = common.drop_triton_interpreter()
    import torch

    if args.threads is not None:
        if args.threads < 1:
            print(f"--threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    plan = Plan.for_machine(args, device)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    argv_used = [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)
    meta = common.run_metadata(device, argv_used)
    meta.update(triton_interpret_unset=interpreter_was_set, quick=plan.quick, sections=list(plan.sections))
    results: Dict = dict(meta=meta, plan=dataclasses.asdict(plan))
    log(f"fastddpm benchmarks on {meta['device_name']} ({device}), commit {meta['git_commit']}")

    copy_gbps = None
    if "copy" in plan.sections or "kernels" in plan.sections:
        log("copy bandwidth ...")
        results["copy"] = measure_copy(plan)
        copy_gbps = results["copy"].get("gbps")
    if "kernels" in plan.sections:
        log("per-step kernels ...")
        results["kernels"] = measure_kernels(plan, copy_gbps, log)
    if "e2e" in plan.sections:
        log("end to end ...")
        results["e2e"] = measure_e2e(plan, log)
    if "training" in plan.sections:
        log("training step ...")
        results["training"] = measure_training(plan, log)
    results["goals"] = evaluate_goals(results) if device == "cuda" else []

    out_dir = args.out / common.device_slug(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.date.today().isoformat()}-{meta['git_commit']}"
    if args.only:  # a partial run must not overwrite the full one of the same day and commit
        stem += "-" + "-".join(plan.sections)
    if args.tag:
        stem += "-" + args.tag
    if "throughput" in plan.sections:
        import throughput

        log("throughput (50,000 samples) ...")
        tplan = throughput.ThroughputPlan.build(device, args.dry, args.throughput_batches, args.throughput_settings)
        results["throughput_plan"] = dataclasses.asdict(tplan)

        def checkpoint(rows):  # every finished row on disk: a stage cut short keeps them
            _write_json(out_dir / f"{stem}.partial.json", dict(results, throughput=rows))

        results["throughput"] = throughput.measure(tplan, log, checkpoint)
        results["throughput_goals"] = (throughput.evaluate_goals(results["throughput"])
                                       if device == "cuda" and not args.dry else [])
        (out_dir / f"{stem}.partial.json").unlink(missing_ok=True)

    markdown = render_markdown(results)
    _write_json(out_dir / f"{stem}.json", results)
    (out_dir / f"{stem}.md").write_text(markdown)
    plot_error = render_plot(results, out_dir / f"{stem}.png")
    if plot_error:
        log(f"plot not written: {plot_error}")
    log(f"wrote {out_dir / stem}.json / .md / .png")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
