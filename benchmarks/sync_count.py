"""Host synchronisations per sampling step on a GPU (goal: 0), for fastddpm.sample and the schedulers.

    python benchmarks/sync_count.py [--out FILE.json] [--dry]

Counts the warnings of ``torch.cuda.set_sync_debug_mode("warn")`` (one per synchronising CUDA
call: ``.item()``, a blocking copy, ``torch.tensor(number, device="cuda")``, ...). For
``fastddpm.sample`` it runs the whole call at two step counts and reports the difference per step
(set-up syncs, such as copying the seed once, cancel out); for the schedulers it counts inside a
loop of ``step`` calls after ``set_timesteps``, with in-kernel noise and with a CUDA generator,
beside diffusers' own scheduler as the baseline. ``--dry`` runs the plumbing on a CPU (no counts).
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path


def _count(fn, cuda: bool):
    import torch

    if not cuda:
        fn()
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--dry", action="store_true")
    args = parser.parse_args(argv)

    import torch

    import fastddpm

    cuda = not args.dry
    device = "cuda" if cuda else "cpu"
    class Model(torch.nn.Module):  # a small eps-model(x, t)
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x, t):
            return self.conv(x)

    torch.manual_seed(0)
    model = Model().to(device)
    shape = (4, 3, 16, 16)
    rows = []

    def sample_syncs(steps, **kwargs):
        return _count(lambda: fastddpm.sample(model, shape, num_steps=steps, seed=1, progress=False, **kwargs), cuda)

    for name, kwargs in [("sample ddpm, CUDA graph", dict(cuda_graph=True if cuda else False)),
                         ("sample ddpm, eager", dict(cuda_graph=False)),
                         ("sample ddim eta=0.5, CUDA graph", dict(sampler="ddim", eta=0.5,
                                                                  cuda_graph=True if cuda else False)),
                         ("sample dpmpp_2m, CUDA graph", dict(sampler="dpmpp_2m", cuda_graph=True if cuda else False)),
                         ("sample dpmpp_2m, eager", dict(sampler="dpmpp_2m", cuda_graph=False)),
                         ("sample unipc, CUDA graph", dict(sampler="unipc", cuda_graph=True if cuda else False)),
                         ("sample dpmpp_2m_sde, CUDA graph", dict(sampler="dpmpp_2m_sde",
                                                                  cuda_graph=True if cuda else False))]:
        # Warm-up at both step counts: compile the kernels and, with a CUDA graph, capture and keep the
        # graph of each chain. (Run 3 warmed up 10 steps only, so its 30-step count was a first call,
        # with a capture's fixed syncs, against a replay of the kept 10-step graph: 3 against 1,
        # read as "0.1 a step" though no step synchronised.)
        sample_syncs(10, **kwargs)
        sample_syncs(30, **kwargs)
        few, many = sample_syncs(10, **kwargs), sample_syncs(30, **kwargs)
        per_step = None if few is None else (many - few) / 20
        rows.append(dict(case=f"fastddpm.{name}", syncs_10_steps=few, syncs_30_steps=many, per_step=per_step))

    schedulers = [("fastddpm.DDPMScheduler", fastddpm.DDPMScheduler), ("fastddpm.DDIMScheduler", fastddpm.DDIMScheduler),
                  ("fastddpm.DPMSolverMultistepScheduler", fastddpm.DPMSolverMultistepScheduler),
                  ("fastddpm.UniPCMultistepScheduler", fastddpm.UniPCMultistepScheduler)]
    try:
        import diffusers

        schedulers += [("diffusers.DDPMScheduler", diffusers.DDPMScheduler),
                       ("diffusers.DDIMScheduler", diffusers.DDIMScheduler),
                       ("diffusers.DPMSolverMultistepScheduler", diffusers.DPMSolverMultistepScheduler),
                       ("diffusers.UniPCMultistepScheduler", diffusers.UniPCMultistepScheduler)]
    except ImportError:
        rows.append(dict(case="diffusers", error="not installed"))
    for name, cls in schedulers:
        # UniPC draws no noise (its step takes no generator): one row
        for noise in (("no",) if "UniPC" in name else ("in-kernel", "generator")):
            if noise == "in-kernel" and name.startswith("diffusers"):
                continue
            scheduler = cls(num_train_timesteps=1000)
            scheduler.set_timesteps(50)
            x = torch.randn(shape, device=device)
            output = torch.randn(shape, device=device)
            generator = torch.Generator(device).manual_seed(0) if noise == "generator" else None
            extra = dict(eta=0.5) if "DDIM" in name else {}
            if noise != "no":
                extra["generator"] = generator

            def loop():
                sample = x
                for t in scheduler.timesteps[:20]:
                    sample = scheduler.step(output, t, sample, **extra).prev_sample
                return sample

            try:
                loop()  # warm-up
                count = _count(loop, cuda)
                rows.append(dict(case=f"{name}.step, {noise} noise", syncs_20_steps=count,
                                 per_step=None if count is None else count / 20))
            except Exception as exc:  # a row that fails is recorded; the others still run
                rows.append(dict(case=f"{name}.step, {noise} noise", error=f"{type(exc).__name__}: {exc}"))
    result = dict(device=torch.cuda.get_device_name() if cuda else "cpu (dry run)", torch=torch.__version__, rows=rows)
    for row in rows:
        print(f"{row['case']:55s} per step: {row.get('per_step', row.get('error'))}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
