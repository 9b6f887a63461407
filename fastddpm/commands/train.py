"""``fastddpm train``: train a model with L_simple (or the hybrid / bound losses); see
:func:`fastddpm.training.train`, which does the work. Under ``torchrun`` it trains data-parallel."""
from __future__ import annotations

import json
import os
from typing import Any, Tuple

from ..losses import LOSS_TYPES
from ..models import PRESETS
from ..schedule import BETA_SCHEDULES
from ..step import PREDICTION_TYPES, VARIANCE_TYPES
from ..training import CHECKPOINT_NAME, EMA_NAME, LR_SCHEDULES, PRECISIONS, TRAINING_DEFAULTS
from .common import add_deprecated_alias, add_device_argument, flag_names, in_flag_terms, report_bad_input


def _parse_model_arg(text: str) -> Tuple[str, Any]:
    if "=" not in text:
        raise ValueError(f"--model-arg takes KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def _preset_defaults(key: str) -> str:
    """``"default by --preset: ddpm_cifar10 800000, digits 16000, toy2d 5000"``, from :data:`TRAINING_DEFAULTS`."""
    values = ", ".join(f"{name} {'(none: required)' if settings[key] is None else settings[key]}"
                       for name, settings in TRAINING_DEFAULTS.items())
    return f"default by --preset: {values}"


def configure_parser(parser) -> None:
    parser.add_argument("--preset", default="digits", choices=tuple(PRESETS), help="model preset (default digits)")
    parser.add_argument("--data", default=None,
                        help="digits, moons, swiss_roll, 8gaussians, a folder of images or a .npy/.npz file "
                             f"({_preset_defaults('data')})")
    parser.add_argument("--out", default=None, help="run folder for checkpoints, log and sample grids "
                                                    "(default runs/<preset>)")
    parser.add_argument("--train-steps", dest="steps", type=int, default=None,
                        help=f"total optimisation steps ({_preset_defaults('steps')})")
    add_deprecated_alias(parser, "--steps", "--train-steps (--steps is a sampling step count elsewhere)", "steps",
                         type=int)
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"global batch size, split over processes ({_preset_defaults('batch_size')})")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"AdamW learning rate after warm-up ({_preset_defaults('lr')})")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help=f"linear learning-rate warm-up steps ({_preset_defaults('warmup_steps')})")
    parser.add_argument("--lr-schedule", default=None, choices=LR_SCHEDULES,
                        help=f"after warm-up: constant, or cosine decay to 0 at the last step "
                             f"({_preset_defaults('lr_schedule')})")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip, 0 disables (default 1)")
    parser.add_argument("--ema-decay", type=float, default=None,
                        help=f"decay of the EMA of the weights ({_preset_defaults('ema_decay')})")
    parser.add_argument("--ema-start", type=int, default=None,
                        help=f"step from which the EMA averages; before it, it copies the weights "
                             f"({_preset_defaults('ema_start')})")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything random in the run (default 0)")
    parser.add_argument("--schedule", default="linear", choices=BETA_SCHEDULES, help="beta schedule (default linear)")
    parser.add_argument("--num-timesteps", type=int, default=1000, help="T, diffusion steps (default 1000)")
    parser.add_argument("--prediction-type", default="epsilon", choices=PREDICTION_TYPES,
                        help="what the model predicts (default epsilon)")
    parser.add_argument("--variance-type", default=None, choices=VARIANCE_TYPES,
                        help="fixed_small (default) or learned_range (hybrid loss, 2C outputs)")
    parser.add_argument("--loss", dest="loss_type", default=None, choices=LOSS_TYPES,
                        help="default simple, or hybrid with a learned variance")
    parser.add_argument("--vlb-weight", type=float, default=0.001, help="lambda of the hybrid loss (default 0.001)")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model preset argument, e.g. --model-arg ch=64 --model-arg dropout=0.1")
    parser.add_argument("--image-size", type=int, default=None,
                        help="image side to resize folder / array data to (default: a folder is resized to the "
                             "preset's size; an array keeps its own, which must then match the preset's)")
    parser.add_argument("--channels", type=int, default=None, choices=(1, 3), help="channels for folder data")
    parser.add_argument("--flip", dest="random_flip", action="store_true", default=None, help="random horizontal flips")
    parser.add_argument("--no-flip", dest="random_flip", action="store_false")
    parser.add_argument("--ckpt-every", type=int, default=None,
                        help=f"checkpoint every N steps, 0: only at the end ({_preset_defaults('ckpt_every')})")
    parser.add_argument("--sample-every", type=int, default=None,
                        help=f"sample grid every N steps, 0: never ({_preset_defaults('sample_every')})")
    parser.add_argument("--sample-steps", type=int, default=100, help="DDPM steps for the sample grids (default 100)")
    parser.add_argument("--log-every", type=int, default=None,
                        help=f"log the mean loss every N steps ({_preset_defaults('log_every')})")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                        help="continue from OUT/checkpoint.safetensors (or the given file); prints the step it "
                             "resumes from, or that there is no checkpoint and training starts at step 0")
    add_device_argument(parser, "under torchrun cuda means cuda:LOCAL_RANK")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="auto: bf16 autocast on CUDA, fp32 on CPU")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    # The library names its arguments (steps, lr, out); the messages name the flags instead.
    parser.set_defaults(flag_names=flag_names(parser))


def run(args) -> int:
    try:
        overrides = dict(_parse_model_arg(text) for text in args.model_arg)
        data_options = {}
        if args.image_size is not None:
            data_options["image_size"] = args.image_size
        if args.channels is not None:
            data_options["channels"] = args.channels
        if args.random_flip is not None:
            data_options["random_flip"] = args.random_flip
        out = args.out if args.out is not None else os.path.join("runs", args.preset)
        from fastddpm.devices import resolve_device
        from fastddpm.outputs import check_writable
        from fastddpm.training import train

        # The CLI's own names in the messages: --device, --out (train() checks them again).
        device = resolve_device(args.device, argument="--device") if args.device not in (None, "auto") else None
        check_writable(out, "--out", folder=True)
        result = train(
            args.preset, args.data, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
            warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
            grad_clip=args.grad_clip if args.grad_clip and args.grad_clip > 0 else None, ema_decay=args.ema_decay,
            lr_schedule=args.lr_schedule, ema_start=args.ema_start, seed=args.seed, schedule=args.schedule,
            num_timesteps=args.num_timesteps,
            prediction_type=args.prediction_type, variance_type=args.variance_type, loss_type=args.loss_type,
            vlb_weight=args.vlb_weight, model_overrides=overrides, data_options=data_options, out=out,
            ckpt_every=args.ckpt_every, sample_every=args.sample_every, sample_steps=args.sample_steps,
            log_every=args.log_every, resume=args.resume, device=device, precision=args.precision,
            progress=args.progress,
        )
    except (ValueError, TypeError, FileNotFoundError) as error:
        return report_bad_input("train", in_flag_terms(str(error), args.flag_names))
    if int(os.environ.get("RANK", "0")) == 0:
        last = f", final loss {result.losses[-1][1]:.4f}" if result.losses else ""
        done = result.step - result.start_step
        what = (f"trained {done} steps ({result.start_step + 1}..{result.step}, resumed at step {result.start_step})"
                if result.start_step else f"trained {result.step} steps")
        print(f"{what} in {result.wall_seconds:.1f} s{last}; "
              f"checkpoint {result.out / CHECKPOINT_NAME}, EMA weights {result.out / EMA_NAME}")
    return 0
