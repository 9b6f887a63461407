"""``fastddpm demo``: one pass of every per-step op on random data, checked against the reference."""
from __future__ import annotations

import time

import torch


def configure_parser(parser) -> None:
    from .common import add_deprecated_alias, add_device_argument

    parser.add_argument("--batch-size", dest="batch", type=int, default=16, help="batch size (default 16)")
    add_deprecated_alias(parser, "--batch", "--batch-size", "batch", type=int)
    parser.add_argument("--size", type=int, default=32, help="image side (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the in-kernel noise (default 0)")
    add_device_argument(parser)


def _check_args(args) -> torch.device:
    from fastddpm.devices import resolve_device

    if args.batch < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch}")
    if args.size < 1:
        raise ValueError(f"--size must be >= 1, got {args.size}")
    from fastddpm.checks import check_seed

    check_seed(args.seed, "--seed")
    return resolve_device(args.device, argument="--device")


def run(args) -> int:
    from fastddpm import NoiseSchedule, ops

    try:
        device = _check_args(args)
    except ValueError as error:
        from .common import report_bad_input

        return report_bad_input("demo", error)
    schedule = NoiseSchedule.linear()
    shape = (args.batch, 3, args.size, args.size)
    generator = torch.Generator().manual_seed(args.seed)
    x0 = (torch.rand(shape, generator=generator) * 2 - 1).to(device)
    eps_model = torch.randn(shape, generator=generator).to(device)
    t = torch.randint(0, schedule.num_timesteps, (args.batch,), generator=generator).to(device)
    backend = ops.resolve_backend(None, device, torch.float32)
    print(f"device {device}, backend {backend}, sample shape {tuple(shape)}")
    rows = []
    start = time.perf_counter()
    x_t = ops.q_sample(x0, t, schedule, seed=args.seed)
    x_t_ref = ops.q_sample(x0.double(), t, schedule, seed=args.seed, backend="reference")
    rows.append(("q_sample", (x_t.double() - x_t_ref).abs().max().item()))
    x_prev, x0_pred = ops.ddpm_step(eps_model, t, x_t, schedule, seed=args.seed, noise_offset=1)
    x_prev_ref, _ = ops.ddpm_step(eps_model.double(), t, x_t.double(), schedule, seed=args.seed, noise_offset=1,
                                  backend="reference")
    rows.append(("ddpm_step", (x_prev.double() - x_prev_ref).abs().max().item()))
    emb = ops.timestep_embedding(t, 128)
    emb_ref = ops.timestep_embedding(t.cpu(), 128, backend="reference")
    rows.append(("timestep_embedding", (emb.cpu() - emb_ref).abs().max().item()))
    elapsed = time.perf_counter() - start
    for name, err in rows:
        print(f"  {name:<20s} max |op - float64 reference| = {err:.2e}")
    print(f"done in {elapsed:.2f} s (untimed demo; see benchmarks/run.py for timings)")
    return 0
