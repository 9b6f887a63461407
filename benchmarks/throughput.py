"""End-to-end throughput: how long 50,000 samples take, and how close that is to the model's limit.

``python benchmarks/run.py --only throughput`` (``--dry``: the same rows at toy sizes on a CPU).

One model for every row: diffusers' ``UNet2DModel`` in the DDPM CIFAR-10 configuration (35.7M
parameters, 32x32x3, random weights built from a seed: nothing is downloaded), sampled with
DPM-Solver++(2M) at 20 steps. Rows, per batch size (1, 64, 256, 1024 and ``auto``):

* ``fastddpm``: :func:`fastddpm.sample` (fused step, CUDA graph) at each model setting (precision,
  channels-last, ``torch.compile``; see :mod:`fastddpm.acceleration`);
* ``diffusers``: ``DDPMPipeline`` with ``DPMSolverMultistepScheduler`` and the same weights, in
  fp32, and with the settings diffusers documents for speed (the UNet in float16, channels-last,
  ``torch.compile`` of the UNet with ``mode="reduce-overhead"``; diffusers' own docs also use
  ``max-autotune``, whose autotuning takes minutes a batch size), ``output_type="pt"``;
* ``model_only``: the limit, the model alone at that batch and setting, 20 forward passes replayed
  from one CUDA graph (eager on a CPU).

Each row: ``samples_per_s`` (batch / median wall time of one whole call, synchronised),
``projected_50k_s`` (50,000 / samples_per_s), ``model_only_samples_per_s`` and
``outside_model_share`` (1 - model-only time / call time, fastddpm rows), ``peak_memory_bytes``
(``torch.cuda.max_memory_allocated`` during the timed calls; None on a CPU), and the raw times.
``auto`` is :func:`fastddpm.acceleration.auto_batch_size` for that row's model setting.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional

import torch

import common
import workloads

SAMPLER, STEPS = "dpmpp_2m", 20
TARGET_SAMPLES = 50_000
# The GPU issue's goals for this section (issue 22).
GOALS = dict(projected_50k_s=60.0, vs_diffusers_batch1=1.5, vs_diffusers_best_batch=1.1, outside_model_share=0.02)


@dataclasses.dataclass
class Setting:
    """A model setting: ``model_dtype`` in run.py's dtype names, layout, compile (None or kwargs)."""

    name: str
    model_dtype: str = "fp32"
    channels_last: bool = False
    compile: Optional[Dict] = None

    def options(self):
        from fastddpm.acceleration import ModelOptions

        dtype = None if self.model_dtype == "fp32" else self.model_dtype
        return ModelOptions.build(dtype, self.channels_last, False if self.compile is None else dict(self.compile))


def _settings(names, compile_kwargs) -> List[Setting]:
    table = {
        "fp32": Setting("fp32"),
        "bf16": Setting("bf16", "bf16"),
        "fp16": Setting("fp16", "fp16"),
        "bf16+cl": Setting("bf16+cl", "bf16", True),
        "fp16+cl": Setting("fp16+cl", "fp16", True),
        "bf16+cl+compile": Setting("bf16+cl+compile", "bf16", True, compile_kwargs),
        "fp16+cl+compile": Setting("fp16+cl+compile", "fp16", True, compile_kwargs),
        "fp32+compile": Setting("fp32+compile", "fp32", False, compile_kwargs),
    }
    return [table[name] for name in names]


@dataclasses.dataclass
class ThroughputPlan:
    device: str
    dry: bool
    model_config: Dict
    model_name: str
    batches: List  # ints and "auto"
    compile_batches: List  # the batches compiled settings run at (each batch compiles anew)
    fastddpm: List[Setting]
    diffusers: List[Setting]
    repeats: int
    steps: int
    auto_limit: int

    @classmethod
    def build(cls, device: str, dry: bool, batches=None, settings=None) -> "ThroughputPlan":
        if device == "cuda" and not dry:
            config, name = workloads.DDPM_CIFAR10_UNET2D, "UNet2DModel DDPM CIFAR-10 (35.7M)"
            # batch 1 and auto first: the goals read them, and a stage cut short keeps the rows before
            default_batches, compile_batches = [1, "auto", 256, 64, 1024], [1, "auto"]
            fast = ["fp32", "bf16", "fp16", "bf16+cl", "bf16+cl+compile"]
            theirs = ["fp32", "fp16+cl+compile"]
            compile_kwargs, their_compile = {}, dict(mode="reduce-overhead", fullgraph=True)
            repeats, steps, auto_limit = 3, STEPS, 2048
        else:
            # A CPU: the plumbing with a tiny UNet2DModel (the CIFAR-10 UNet takes seconds a sample
            # step there); compiled rows use dynamo's eager backend (no C++ build in the dry run).
            config, name = workloads.TINY_UNET2D, "tiny UNet2DModel (16x16, CPU stand-in)"
            default_batches, compile_batches = ([1, 2, "auto"], [1]) if dry else ([1, 16, 64, "auto"], [1, 16])
            fast = ["fp32", "bf16", "bf16+cl", "bf16+cl+compile"]
            theirs = ["fp32", "bf16+cl+compile"]
            compile_kwargs = their_compile = dict(backend="eager")
            repeats, steps, auto_limit = (1, 2, 4) if dry else (3, STEPS, 64)
        return cls(device=device, dry=dry, model_config=config, model_name=name,
                   batches=list(batches or default_batches), compile_batches=compile_batches,
                   fastddpm=_settings(settings or fast, compile_kwargs),
                   diffusers=_settings(theirs, their_compile), repeats=repeats, steps=steps, auto_limit=auto_limit)


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def _peak_reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> Optional[int]:
    return int(torch.cuda.max_memory_allocated()) if device == "cuda" else None


def _time_calls(run: Callable[[], object], plan: ThroughputPlan) -> Dict:
    """One warm-up call (compilation, cuDNN's choices, the graph capture), then ``repeats`` timed
    whole calls, each synchronised."""
    run()
    _peak_reset(plan.device)
    timing = common.time_wall(run, device=plan.device, repeats=plan.repeats, warmup=0)
    timing["peak_memory_bytes"] = _peak(plan.device)
    return timing


def _fastddpm_runner(unet, shape, setting: Setting, plan: ThroughputPlan):
    from fastddpm.sampling import sample

    options = setting.options().sample_kwargs()

    def run():
        return sample(unet, shape, sampler=SAMPLER, num_steps=plan.steps, seed=workloads.SEED, device=plan.device,
                      progress=False, **options)

    return run


def _diffusers_runner(unet, batch: int, setting: Setting, plan: ThroughputPlan):
    """DDPMPipeline + DPMSolverMultistepScheduler, the user's way: the UNet cast / re-laid-out /
    compiled in place (on a copy of ours, so that every row starts from the same weights)."""
    import copy

    from diffusers import DDPMPipeline, DPMSolverMultistepScheduler

    model = copy.deepcopy(unet)
    if setting.model_dtype != "fp32":
        model = model.to(workloads.DTYPES[setting.model_dtype])
    if setting.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if setting.compile is not None:
        torch._dynamo.reset()
        model.compile(**setting.compile)  # nn.Module.compile: in place, the module keeps its attributes
    pipe = DDPMPipeline(unet=model, scheduler=DPMSolverMultistepScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)

    def run():
        generator = torch.Generator(device=plan.device).manual_seed(workloads.SEED)
        return pipe(batch_size=batch, generator=generator, num_inference_steps=plan.steps, output_type="pt")

    return run


def _model_only_runner(unet, shape, setting: Setting, plan: ThroughputPlan):
    """The model alone, ``steps`` calls on a fixed input through the same prepared model
    (cast copy, layout, compile) as the fastddpm row; replayed from one CUDA graph on a GPU."""
    from fastddpm.acceleration import prepare_model

    forward = prepare_model(unet, setting.options(), torch.device(plan.device))
    x = torch.randn(shape, device=plan.device)
    t = torch.full((shape[0],), 500, dtype=torch.int64, device=plan.device)
    if plan.device != "cuda":
        def run():
            with torch.no_grad():
                for _ in range(plan.steps):
                    forward(x, t)
        return run
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad():
        with torch.cuda.stream(stream):
            for _ in range(3):
                forward(x, t)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            forward(x, t)

    def replay():
        for _ in range(plan.steps):
            graph.replay()

    return replay


# ---------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------
def _auto_batch(unet, shape, setting: Setting, plan: ThroughputPlan, cache: Dict) -> int:
    from fastddpm.acceleration import auto_batch_size

    key = (setting.model_dtype, setting.channels_last)
    if key not in cache:
        cache[key] = auto_batch_size(unet, shape[1:], device=plan.device, options=setting.options(),
                                     limit=plan.auto_limit)
    return cache[key][0]


def measure(plan: ThroughputPlan, log, checkpoint: Optional[Callable[[List[Dict]], None]] = None) -> List[Dict]:
    """Every row of the plan; ``checkpoint(rows)`` after each (a run cut short keeps its rows)."""
    torch.manual_seed(workloads.SEED)
    unet = workloads.make_diffusers_unet(plan.model_config, plan.device, torch.float32)
    params = workloads.params_millions(unet)
    sample_shape = workloads.sample_shape_of(unet, 1)[1:]
    rows: List[Dict] = []
    autos: Dict = {}

    def add(row: Dict) -> None:
        rows.append(row)
        status = row["status"] if row["status"] != common.OK else (
            f"{row['samples_per_s']:.1f} samples/s, 50k in {row['projected_50k_s']:.0f} s"
            + (f", outside model {row['outside_model_share']:.1%}" if row.get("outside_model_share") is not None
               else ""))
        log(f"  {row['system']:9s} {row['setting']:18s} batch {row['batch_label']!s:>4} ({row.get('batch_size')}): "
            f"{status}")
        if checkpoint is not None:
            checkpoint(rows)

    for batch_label in plan.batches:
        for system, settings in (("fastddpm", plan.fastddpm), ("diffusers", plan.diffusers)):
            for setting in settings:
                if setting.compile is not None and batch_label not in plan.compile_batches:
                    continue
                row = dict(system=system, setting=setting.name, batch_label=batch_label, model=plan.model_name,
                           params_m=params, sampler=SAMPLER, steps=plan.steps, model_dtype=setting.model_dtype,
                           channels_last=setting.channels_last, compile=setting.compile)
                try:
                    batch = (_auto_batch(unet, (1, *sample_shape), setting, plan, autos) if batch_label == "auto"
                             else int(batch_label))
                    row["batch_size"] = batch
                    if batch_label == "auto":
                        row["auto_account"] = autos[(setting.model_dtype, setting.channels_last)][1]
                    shape = (batch, *sample_shape)
                    runner = (_fastddpm_runner(unet, shape, setting, plan) if system == "fastddpm"
                              else _diffusers_runner(unet, batch, setting, plan))
                    timing = _time_calls(runner, plan)
                    del runner
                    wall = timing["median_s"]
                    row.update(status=common.OK, timing=timing, samples_per_s=batch / wall,
                               projected_50k_s=TARGET_SAMPLES * wall / batch, step_s=wall / plan.steps,
                               peak_memory_bytes=timing["peak_memory_bytes"])
                    if system == "fastddpm":
                        model_only = common.time_wall(_model_only_runner(unet, shape, setting, plan),
                                                      device=plan.device, repeats=plan.repeats, warmup=1)
                        row["model_only"] = model_only
                        row["model_only_samples_per_s"] = batch / model_only["median_s"]
                        row["outside_model_share"] = 1.0 - model_only["median_s"] / wall
                except Exception as exc:  # a row that fails records why; the others go on
                    row["status"] = common.error_text(exc)
                add(row)
                _free(plan.device)
    add_ratios(rows)
    if checkpoint is not None:
        checkpoint(rows)
    return rows


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def add_ratios(rows: List[Dict]) -> None:
    """Each fastddpm row's samples/s over diffusers' fastest setting at the same batch label."""
    fastest: Dict = {}
    for row in rows:
        if row["system"] == "diffusers" and row.get("status") == common.OK:
            best = fastest.get(row["batch_label"])
            if best is None or row["samples_per_s"] > best["samples_per_s"]:
                fastest[row["batch_label"]] = row
    for row in rows:
        best = fastest.get(row["batch_label"])
        if row["system"] == "fastddpm" and row.get("status") == common.OK and best is not None:
            row["vs_fastest_diffusers"] = row["samples_per_s"] / best["samples_per_s"]
            row["fastest_diffusers_setting"] = best["setting"]


def evaluate_goals(rows: List[Dict]) -> List[Dict]:
    """The issue's goals from the rows (GPU runs only mean anything)."""
    ok = [r for r in rows if r.get("status") == common.OK]
    ours = [r for r in ok if r["system"] == "fastddpm"]
    theirs = [r for r in ok if r["system"] == "diffusers"]
    goals = []
    best = min(ours, key=lambda r: r["projected_50k_s"], default=None)
    goals.append(dict(goal=f"50,000 samples in <= {GOALS['projected_50k_s']:.0f} s",
                      value=f"{best['projected_50k_s']:.1f} s" if best else "—",
                      where=f"{best['setting']}, batch {best['batch_size']}" if best else "—",
                      met=None if best is None else best["projected_50k_s"] <= GOALS["projected_50k_s"]))
    at_one = [r for r in ours if r["batch_label"] == 1 and r.get("vs_fastest_diffusers")]
    top = max(at_one, key=lambda r: r["vs_fastest_diffusers"], default=None)
    goals.append(dict(goal=f">= {GOALS['vs_diffusers_batch1']}x diffusers' fastest documented settings at batch 1",
                      value=f"{top['vs_fastest_diffusers']:.2f}x" if top else "—",
                      where=f"{top['setting']} vs {top['fastest_diffusers_setting']}" if top else "—",
                      met=None if top is None else top["vs_fastest_diffusers"] >= GOALS["vs_diffusers_batch1"]))
    best_theirs = max(theirs, key=lambda r: r["samples_per_s"], default=None)
    ratio = best["samples_per_s"] / best_theirs["samples_per_s"] if best and best_theirs else None
    goals.append(dict(goal=f">= {GOALS['vs_diffusers_best_batch']}x diffusers at each side's best batch",
                      value=f"{ratio:.2f}x" if ratio else "—",
                      where=(f"{best['setting']} b{best['batch_size']} vs {best_theirs['setting']} "
                             f"b{best_theirs['batch_size']}") if ratio else "—",
                      met=None if ratio is None else ratio >= GOALS["vs_diffusers_best_batch"]))
    share = best.get("outside_model_share") if best else None
    goals.append(dict(goal=f"time outside the model <= {GOALS['outside_model_share']:.0%} of a step at the best batch",
                      value=f"{share:.1%}" if share is not None else "—",
                      where=f"{best['setting']}, batch {best['batch_size']}" if best else "—",
                      met=None if share is None else share <= GOALS["outside_model_share"]))
    return goals


def render_markdown(rows: List[Dict], goals: Optional[List[Dict]]) -> str:
    headers = ["system", "setting", "batch", "samples/s", "50k in s", "model-only samples/s", "outside model",
               "vs fastest diffusers", "peak GiB", "status"]
    table = []
    for r in rows:
        ok = r.get("status") == common.OK
        peak = r.get("peak_memory_bytes")
        table.append([r["system"], r["setting"],
                      f"{r['batch_label']}" + (f" ({r['batch_size']})" if r["batch_label"] == "auto" and "batch_size" in r
                                               else ""),
                      f"{r['samples_per_s']:.1f}" if ok else "—", f"{r['projected_50k_s']:.1f}" if ok else "—",
                      f"{r['model_only_samples_per_s']:.1f}" if r.get("model_only_samples_per_s") else "—",
                      common.percent(r.get("outside_model_share")), common.ratio(r.get("vs_fastest_diffusers")),
                      f"{peak / 2**30:.2f}" if peak else "—", "" if ok else r.get("status", "")])
    parts = [common.markdown_table(headers, table)]
    if goals:
        parts += ["", common.markdown_table(["goal", "measured", "where", "verdict"],
                                            [[g["goal"], g["value"], g["where"],
                                              "not measured" if g["met"] is None else "met" if g["met"] else "missed"]
                                             for g in goals])]
    return "\n".join(parts)

