"""``fastddpm merge DIR``: the samples of a finished folder run (``fastddpm sample --out DIR``, one
process or torchrun) in one ``.npz``, in index order, and a grid of the first ones."""
from __future__ import annotations

import sys
from pathlib import Path


def configure_parser(parser) -> None:
    parser.add_argument("folder", metavar="DIR", help="a folder written by fastddpm sample --out DIR")
    parser.add_argument("--npz", default=None, metavar="PATH",
                        help="the merged samples, float32 [N, ...] with the run's settings (default DIR/samples.npz)")
    parser.add_argument("--grid", default=None, metavar="PATH",
                        help="image grid of the first --grid-samples samples (default DIR/samples.png)")
    parser.add_argument("--grid-samples", type=int, default=64, metavar="N",
                        help="samples in the grid, 0 for no grid (default 64)")


def run(args) -> int:
    try:
        return _run(args)
    except ValueError as error:
        from .common import report_bad_input

        return report_bad_input("merge", error)


def _run(args) -> int:
    from PIL import Image

    from fastddpm import shards
    from fastddpm.imaging import save_image_grid
    from fastddpm.outputs import check_writable

    folder = Path(args.folder)
    npz_path = Path(args.npz) if args.npz else folder / "samples.npz"
    grid_path = Path(args.grid) if args.grid else folder / "samples.png"
    if args.grid_samples < 0:
        raise ValueError(f"--grid-samples must be >= 0, got {args.grid_samples}")
    if npz_path.suffix.lower() != ".npz":
        raise ValueError(f"--npz must end in .npz, got {str(npz_path)!r}")
    if args.grid_samples and grid_path.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--grid must name an image file such as samples.png, got {str(grid_path)!r}")
    if not folder.is_dir():
        raise ValueError(f"DIR {str(folder)!r} is not a folder")
    # Before reading the chunks: the outputs must be writable.
    check_writable(npz_path, "--npz")
    if args.grid_samples:
        check_writable(grid_path, "--grid")
    state = shards.read_folder(folder)
    samples = shards.merge(state, npz_path)
    written = [f"{npz_path} ({samples.shape[0]} samples, float32 {list(samples.shape)})"]
    if args.grid_samples:
        try:
            save_image_grid(samples[: args.grid_samples], grid_path)
            written.append(f"{grid_path} (grid of the first {min(args.grid_samples, samples.shape[0])})")
        except ValueError as error:  # e.g. 2-D points: no image
            print(f"note: no image grid written: {error}", file=sys.stderr)
    print(f"wrote {' and '.join(written)}")
    return 0
