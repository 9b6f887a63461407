"""``fastddpm eval``: sample-quality metrics and the bits/dim bound of a checkpoint; prints a table.

The checkpoint is anything :func:`fastddpm.checkpoint.load_pretrained` reads: a fastddpm
checkpoint (default: the shipped digits model) or a diffusers model or pipeline folder. The
measurements themselves are library functions in :mod:`fastddpm.evaluation`.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..evaluation import evaluate_digit_samples, evaluate_toy_samples, pool_digit_quality, variational_bound
from .common import report_bad_input
from ..samplers import DEFAULT_SAMPLER, SAMPLERS, default_steps, takes_eta_samplers
from ..samplers import describe as describe_samplers

_DIGITS = "digits"


def configure_parser(parser) -> None:
    import argparse

    from .common import add_deprecated_alias, add_device_argument, add_model_arguments

    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="fastddpm checkpoint or diffusers model / pipeline folder (default: the shipped digits "
                             "model)")
    parser.add_argument("--data", default=None,
                        help="digits, moons, swiss_roll or 8gaussians (default: the checkpoint's training data)")
    parser.add_argument("--num-samples", type=int, default=300,
                        help="samples to draw for the quality metrics; 0 skips them (default 300)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the sampler's, see --sampler)")
    parser.add_argument("--sampler", choices=tuple(SAMPLERS), default=DEFAULT_SAMPLER,
                        help=f"{describe_samplers()}; default {DEFAULT_SAMPLER}, as fastddpm.sample")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale (default 0)")
    parser.add_argument("--seed", dest="seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED",
                        help="seeds of sampling and of the floors; quality is reported per seed and pooled, the "
                             "bound uses the first (default 0 1 2)")
    parser.add_argument("--clip-denoised", action=argparse.BooleanOptionalAction, default=None,
                        help="clip the predicted x_0 to [-1, 1] (default: the checkpoint's diffusion config, else "
                             "on for images and off for 2-D points, whose data extend beyond [-1, 1])")
    parser.add_argument("--bound", action=argparse.BooleanOptionalAction, default=True,
                        help="compute the bits/dim bound on the held-out digits (default on; images only)")
    parser.add_argument("--bound-images", type=int, default=None,
                        help="held-out images in the bound (default all 300)")
    parser.add_argument("--batch-size", type=int, default=2048, help="(image, t) pairs per model call in the bound")
    add_device_argument(parser)
    parser.add_argument("--classifier-cache", default=None,
                        help="folder caching the digit classifier (default $FASTDDPM_CACHE or ~/.cache/fastddpm)")
    parser.add_argument("--out", dest="json_path", default=None, metavar="PATH.json",
                        help="write every number to this JSON file")
    add_deprecated_alias(parser, "--json", "--out", "json_path")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_model_arguments(parser)
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")


def _data_name(config: Dict[str, Any]) -> Optional[str]:
    data = config.get("data")
    if isinstance(data, dict):
        data = data.get("name") or data.get("data") or data.get("dataset")
    return data if isinstance(data, str) else None


def _check_args(args) -> None:
    from fastddpm.data import TOY2D_NAMES

    if args.data is not None and args.data not in (_DIGITS,) + tuple(TOY2D_NAMES):
        raise ValueError(f"--data must be one of {(_DIGITS,) + tuple(TOY2D_NAMES)}, got {args.data!r}")
    if args.num_samples < 0 or args.num_samples == 1:
        raise ValueError(f"--num-samples must be 0 (skip) or >= 2, got {args.num_samples}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.eta < 0:
        raise ValueError(f"--eta must be >= 0, got {args.eta}")
    if args.eta > 0 and not SAMPLERS[args.sampler].rule.takes_eta:
        raise ValueError(f"--eta applies to --sampler {' or '.join(takes_eta_samplers())} only")
    if any(seed < 0 for seed in args.seeds) or len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seed takes distinct seeds >= 0, got {' '.join(map(str, args.seeds))}")
    if args.bound_images is not None and args.bound_images < 1:
        raise ValueError(f"--bound-images must be >= 1, got {args.bound_images}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")


def _print_report(report: Dict[str, Any]) -> None:
    rows: List[tuple] = [("checkpoint", report["checkpoint"]), ("data", report["data"])]
    quality = report.get("quality")
    if quality is not None:
        seeds = report["seeds"]
        rows.append(("sampler", f"{report['sampler']}, {report['steps']} steps"
                     + (f", eta {report['eta']}" if report["sampler"] == "ddim" else "")
                     + (f", model in {report['model_dtype']}" if report.get("model_dtype", "fp32") != "fp32" else "")
                     + f", seeds {' '.join(map(str, seeds))}, {report['sample_seconds']:.1f} s"))
        per_seed = report["quality_per_seed"]

        def each(key, digits):
            return " / ".join(f"{result[key]:.{digits}f}" for result in per_seed)

        if report["data"] == _DIGITS:
            rows += [
                ("FD (samples vs held-out)", f"{quality['fd']:.2f} ± {quality['fd_sd']:.2f}  (seeds: "
                                             f"{each('fd', 2)}; {quality['num_samples']} vs "
                                             f"{per_seed[0]['num_heldout']})"),
                ("FD floor (train vs held-out)", f"{quality['fd_floor']:.2f} ± {quality['fd_floor_sd']:.2f}  "
                                                 f"(seeds: {each('fd_floor', 2)}; {per_seed[0]['fd_floor_method']})"),
                ("FD / floor (pooled)", f"{quality['fd_ratio']:.3f}  (per seed {quality['fd_ratio_mean']:.3f} ± "
                                        f"{quality['fd_ratio_sd']:.3f})"),
                ("FD / floor with replacement", f"{quality['fd_ratio_with_replacement']:.3f}  (the floor of a model "
                                                "that reproduces training digits; reported before)"),
                ("KID x 1000 (samples vs held-out)", f"{1000 * quality['kid']:.2f} ± {1000 * quality['kid_se']:.2f}"),
                ("KID x 1000 floor", f"{1000 * quality['kid_floor']:.2f} ± {1000 * quality['kid_floor_se']:.2f}  "
                                     f"(excess {quality['kid_excess_in_se']:+.2f} standard errors)"),
                ("class histogram 0..9", " ".join(str(c) for c in quality["class_histogram"])
                 + f"  (largest deviation from uniform {100 * quality['class_deviation']:.0f} %)"),
                ("mean max-probability", f"{quality['mean_max_probability']:.3f}  (held-out: "
                                         f"{quality['heldout_mean_max_probability']:.3f})"),
                ("classifier held-out accuracy", f"{quality['heldout_accuracy']:.3f}"),
                ("nearest training digit", f"median distance {quality['nearest_train_distance']:.2f} (held-out: "
                                           f"{quality['heldout_nearest_train_distance']:.2f}); near copies "
                                           f"{100 * quality['near_copy_fraction']:.1f} % (held-out: 1 %)"),
            ]
        else:
            rows += [
                ("sliced Wasserstein-2", f"{quality['sliced_wasserstein']:.4f}  (floor "
                                         f"{quality['sliced_wasserstein_floor']:.4f}; seeds: "
                                         f"{each('sliced_wasserstein', 4)})"),
                ("energy distance", f"{quality['energy_distance']:.5f}  (floor {quality['energy_distance_floor']:.5f}; "
                                    f"seeds: {each('energy_distance', 5)})"),
            ]
    bound = report.get("bound")
    if bound is not None:
        rows += [
            ("bits/dim (bound)", f"{bound['bits_per_dim']:.4f}  ({bound['num_images']} held-out images, "
                                 f"{bound['seconds']:.0f} s)"),
            ("  L_T (prior)", f"{bound['prior']:.6f}"),
            ("  sum of L_1..L_{T-1}", f"{bound['diffusion']:.4f}"),
            ("  L_0 (decoder)", f"{bound['decoder']:.4f}"),
        ]
    elif report.get("bound_note"):
        rows.append(("bits/dim (bound)", report["bound_note"]))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def run(args) -> int:
    """``fastddpm eval``: sample-quality metrics and the bound of a checkpoint; prints a table.

    Returns 0, or 2 after printing the error for bad arguments or an unusable checkpoint.
    """
    try:
        return _run(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        return report_bad_input("eval", error)


def _run(args) -> int:
    _check_args(args)
    import fastddpm
    from fastddpm.devices import resolve_device
    from fastddpm.outputs import check_writable, refuse_existing

    from .common import load_checkpoint_argument, model_dtype_name, model_options_of

    options = model_options_of(args)
    device = resolve_device(args.device, argument="--device")
    if args.json_path:  # before any work: the report must have somewhere new to go
        refuse_existing([args.json_path], "--out", overwrite=args.overwrite)
        check_writable(args.json_path, "--out")
    pretrained = load_checkpoint_argument(args.checkpoint, device)
    for note in pretrained.notes:
        print(f"note: {note}", file=sys.stderr)
    data = args.data or _data_name(pretrained.config) or _DIGITS
    is_image = len(pretrained.sample_shape) == 3
    if data == _DIGITS and not (is_image and pretrained.sample_shape[0] == 1):
        raise ValueError(f"--data digits needs a model of 1-channel images, this one makes {pretrained.sample_shape}")
    if data != _DIGITS and tuple(pretrained.sample_shape) != (2,):
        raise ValueError(f"--data {data} needs a model of 2-D points, this one makes {pretrained.sample_shape}")
    steps = args.steps if args.steps is not None else default_steps(args.sampler, pretrained.schedule.num_timesteps)
    clip_denoised = pretrained.clip_denoised if args.clip_denoised is None else args.clip_denoised
    clip_range = pretrained.clip_range
    report: Dict[str, Any] = dict(
        checkpoint=pretrained.source, checkpoint_sha256=pretrained.checksum or None,
        data=data, sampler=args.sampler, steps=steps, eta=args.eta, seeds=list(args.seeds),
        prediction_type=pretrained.prediction_type, variance_type=pretrained.variance_type,
        clip_denoised=clip_denoised, num_timesteps=pretrained.schedule.num_timesteps, device=str(device),
        model_dtype=model_dtype_name(options, pretrained.model), channels_last=options.channels_last,
        compile=options.compile is not None,
        command="fastddpm eval " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["eval"] else None,
    )

    if args.num_samples > 0 and data == _DIGITS:
        _check_classifier_cache(args.classifier_cache, pretrained.sample_shape[-1])
    if args.num_samples > 0:
        classifier = None
        if data == _DIGITS:
            from fastddpm.metrics import load_digit_classifier

            classifier = load_digit_classifier(args.classifier_cache)
        started = time.perf_counter()
        per_seed = []
        for seed in args.seeds:
            samples = fastddpm.sample(
                pretrained.model, (args.num_samples,) + tuple(pretrained.sample_shape), schedule=pretrained.schedule,
                num_steps=steps, sampler=args.sampler, eta=args.eta, prediction_type=pretrained.prediction_type,
                variance_type=pretrained.variance_type, clip_denoised=clip_denoised, clip_range=clip_range,
                seed=seed, device=device, progress=args.progress, **options.sample_kwargs())
            if data == _DIGITS:
                per_seed.append(evaluate_digit_samples(samples, seed=seed, classifier=classifier))
            else:
                per_seed.append(evaluate_toy_samples(samples, data, seed=seed))
        report["sample_seconds"] = time.perf_counter() - started  # sampling and scoring, all seeds
        report["quality_per_seed"] = per_seed
        report["quality"] = pool_digit_quality(per_seed) if data == _DIGITS else _mean_over_seeds(per_seed)

    if args.bound and data == _DIGITS:
        from fastddpm.data import load_digits

        heldout, _ = load_digits("test", image_size=pretrained.sample_shape[-1])
        if args.bound_images is not None:
            heldout = heldout[: args.bound_images]
        from fastddpm.acceleration import prepare_model

        # The bound's model calls run as the samples' do (--dtype, --channels-last, --compile).
        result = variational_bound(
            prepare_model(pretrained.model, options, device), heldout.to(device), pretrained.schedule, prediction_type=pretrained.prediction_type,
            variance_type=pretrained.variance_type, clip_denoised=clip_denoised, seed=args.seeds[0],
            batch_size=args.batch_size, progress=args.progress)
        report["bound"] = result.to_dict()
    elif args.bound:
        report["bound_note"] = "n/a: the discretized decoder needs 8-bit image data"

    _print_report(report)
    if args.json_path:
        from fastddpm.outputs import atomic_write, save_or_rescue

        text = json.dumps(report, indent=1)

        def write(path):
            return atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))

        save_or_rescue(write, args.json_path, argument="--out", what="the report")
        print(f"wrote {args.json_path}")
    return 0


def _mean_over_seeds(per_seed: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Each number of the per-seed toy results as its mean over the seeds."""
    return {key: sum(result[key] for result in per_seed) / len(per_seed) for key in per_seed[0]}


def _check_classifier_cache(cache_dir, image_size: int) -> None:
    """Before sampling: the digit classifier is either cached already or its cache can be written."""
    from fastddpm.data import load_digits
    from fastddpm.metrics import digit_classifier_cache_path
    from fastddpm.outputs import check_writable

    images, labels = load_digits("train", image_size=image_size)
    path = digit_classifier_cache_path(cache_dir, images=images, labels=labels)
    if not path.is_file():
        default = " (default $FASTDDPM_CACHE or ~/.cache/fastddpm)" if cache_dir is None else ""
        check_writable(path, f"--classifier-cache{default}")
