"""Launch-shape sweep of the elementwise kernels on a GPU, against a copy measured in the same run.

    python benchmarks/tune.py [--sizes 16M 64M] [--dtypes fp32 bf16 fp16] [--out FILE.json] [--dry]

For the fused DDPM step (in-kernel noise, the sampling loop's variant) and q_sample, times every
(BLOCK, num_warps) pair and a given noise tensor at the default shape, and a copy of the same bytes, with
``triton.testing.do_bench`` (L2 flushed, median), and reports GB/s over the bytes each op must
move (3 N itemsize for both) and the fraction of the copy bandwidth. It also checks that every
launch shape writes bitwise the same output (the noise stream does not depend on the launch).
``--dry`` runs the same plumbing in Triton's interpreter on a CPU at a tiny size (no timings).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import parse_size  # noqa: E402

from fastddpm.kernels.noise import DEFAULT_BLOCK, DEFAULT_NUM_WARPS  # noqa: E402

BLOCKS = (1024, 2048, 4096)
WARPS = (4, 8)
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=None)
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=["fp32", "bf16", "fp16"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--dry", action="store_true", help="interpreter on a CPU, tiny size, no timing")
    args = parser.parse_args(argv)

    import torch

    from fastddpm import NoiseSchedule, ops
    from fastddpm.step import StepSpec

    spec = StepSpec("ddpm", "epsilon", "fixed_small", clip_range=1.0)  # the sampling loop's step
    device = "cpu" if args.dry else "cuda"
    kernels = ops._load_kernels(interpret=args.dry)
    sizes = args.sizes or ([4096] if args.dry else [parse_size("16M"), parse_size("64M")])
    blocks, warps = ((1024,), (4,)) if args.dry else (BLOCKS, WARPS)
    schedule = NoiseSchedule.linear(1000)
    table = schedule.table(device, torch.float32)

    def scalar(value):
        return torch.tensor(value, dtype=torch.int64, device=device)

    seed, offset, base, t = scalar(1234), scalar(3), scalar(0), scalar(500)

    def bench(fn):
        if args.dry:
            fn()
            return None
        import triton

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3

    results = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter, dry run)",
                   torch=torch.__version__, rows=[])
    import triton

    results["triton"] = triton.__version__
    copy_numel = 2**27 if not args.dry else 4096
    src = torch.randn(copy_numel, device=device)
    dst = torch.empty_like(src)
    copy_s = bench(lambda: dst.copy_(src))
    results["copy"] = dict(numel=copy_numel, bytes=8 * copy_numel, seconds=copy_s,
                           gbps=None if copy_s is None else 8 * copy_numel / copy_s / 1e9)
    del src, dst
    copy_gbps = results["copy"]["gbps"]
    print(f"copy: {copy_gbps and round(copy_gbps, 1)} GB/s", flush=True)

    for numel in sizes:
        shape = (numel // 4096, 4, 32, 32)
        for dtype_name in args.dtypes:
            dtype = getattr(torch, DTYPES[dtype_name])
            generator = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(shape, device=device, dtype=dtype, generator=generator)
            model_output = torch.randn(shape, device=device, dtype=dtype, generator=generator)
            noise = torch.randn(shape, device=device, dtype=dtype, generator=generator)
            out = torch.empty_like(x)
            noise_out = torch.empty_like(x)
            nbytes = 3 * numel * x.element_size()
            # A copy moving the same bytes (1.5 N elements read and written): what the op's size
            # allows, launch and tail effects included, beside the large copy's roofline.
            same_src = torch.empty(3 * numel // 2, device=device, dtype=dtype).normal_(generator=generator)
            same_dst = torch.empty_like(same_src)
            seconds = bench(lambda: same_dst.copy_(same_src))
            results["rows"].append(dict(op="copy", variant="same bytes", dtype=dtype_name, numel=numel, bytes=nbytes,
                                        seconds=seconds, gbps=None if seconds is None else nbytes / seconds / 1e9,
                                        all_written=True, same_as_first_shape=None))
            if seconds is not None:
                print(f"copy      {dtype_name} {numel:>9d} same bytes   {seconds * 1e3:8.4f} ms "
                      f"{nbytes / seconds / 1e9:7.1f} GB/s", flush=True)
            del same_src, same_dst
            first = {}
            variants = []
            for block in blocks:
                for num_warps in warps:
                    variants.append((f"b{block}w{num_warps}", block, num_warps, None, False))
            variants += [("given-noise", DEFAULT_BLOCK, DEFAULT_NUM_WARPS, True, True)]
            for op in ("ddpm_step", "q_sample"):
                for name, block, num_warps, _, given in variants:
                    if op == "ddpm_step":
                        def run(block=block, num_warps=num_warps, given=given):
                            return kernels.reverse_step(
                                spec, model_output, t, x, table, noise=noise if given else None,
                                seed=seed, noise_offset=offset, index_base=base, out=out,
                                block=block, num_warps=num_warps)
                    else:
                        def run(block=block, num_warps=num_warps, given=given):
                            return kernels.q_sample(
                                x, t, table, noise=noise if given else None, seed=seed, noise_offset=offset,
                                index_base=base, out=out, noise_out=None if given else noise_out,
                                block=block, num_warps=num_warps)
                    out.fill_(float("nan"))
                    run()
                    written = not torch.isnan(out).any().item()
                    same = None
                    if not given:
                        if op not in first:
                            first[op] = out.clone()
                        same = torch.equal(out, first[op])
                    seconds = bench(run)
                    gbps = None if seconds is None else nbytes / seconds / 1e9
                    row = dict(op=op, variant=name, block=block, num_warps=num_warps, given_noise=given, dtype=dtype_name, numel=numel, bytes=nbytes, seconds=seconds,
                               gbps=gbps, copy_fraction=None if gbps is None or not copy_gbps else gbps / copy_gbps,
                               all_written=written, same_as_first_shape=same)
                    results["rows"].append(row)
                    print(f"{op:9s} {dtype_name} {numel:>9d} {name:12s} "
                          + ("-" if seconds is None else f"{seconds * 1e3:8.4f} ms {gbps:7.1f} GB/s "
                             f"{100 * row['copy_fraction']:5.1f}% copy")
                          + ("" if written else " UNWRITTEN") + ("" if same in (None, True) else " STREAM DIFFERS"),
                          flush=True)
            del x, model_output, noise, out, noise_out, first
            if device == "cuda":
                torch.cuda.empty_cache()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    bad = [r for r in results["rows"] if not r["all_written"] or r["same_as_first_shape"] is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
