"""Draw a run's loss and top-1 per epoch (metrics.jsonl) into a picture.

    python tools/plot_metrics.py RUN_DIR [--out FILE] [--overwrite]

Needs matplotlib (pip install -e '.[plot]'); without it, one line says so and the exit
status is 2. The trainer draws the same RUN_DIR/metrics.png at the end of a run; without
--out that picture is redrawn, while an existing --out FILE is refused without --overwrite.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    # `python tools/plot_metrics.py` puts tools/ first on sys.path; the project root has to be
    # there for `trainer` when the project is not installed.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines.fileio import OVERWRITE_HELP, OutputFileError, check_output_file  # noqa: E402
from trainer import metrics  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a training run's --output-dir (holds metrics.jsonl)")
    parser.add_argument(
        "--out",
        default=None,
        help="picture to write, its format from its suffix (.png, .svg, .pdf, .jpg, ...); an "
        "existing one is refused without --overwrite (default: RUN_DIR/metrics.png, redrawn)",
    )
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.path.basename(args.run_dir) == metrics.JSONL and os.path.isfile(args.run_dir):
        args.run_dir = os.path.dirname(args.run_dir) or "."  # the run's metrics file: its run
    try:
        if not os.path.isdir(args.run_dir):
            raise FileNotFoundError(f"{args.run_dir}: no such run folder")
        if args.out:  # the default, RUN_DIR/metrics.png, is the run's own picture: redrawn
            check_output_file(args.out, overwrite=args.overwrite, flag="--out")
        path = metrics.plot(args.run_dir, args.out)
    except (
        metrics.PlotUnavailable,
        metrics.PlotFormatError,
        metrics.MetricsError,
        OutputFileError,
        FileNotFoundError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
