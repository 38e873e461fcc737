"""Turn class-per-folder image trees into Train.txt / Test.txt / classes.txt.

    python tools/make_lists.py ROOT --out-dir DIR [--val-fraction F] [--seed S]
                               [--verify] [--workers N] [--absolute]

ROOT is either ROOT/<class>/... (split into train and val by --val-fraction, stratified and
deterministic per --seed) or ROOT/train/<class>/... with ROOT/val/ (or ROOT/test/), each its own
list with the class map from train/. Label = position of the class in the sorted folder names.
Exit status: 0 when the lists were written, 2 for bad input (the error on one line), 130 for
Ctrl-C (nothing written).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if __package__ in (None, ""):
    # `python tools/make_lists.py` puts tools/ first on sys.path; the project root has to be
    # there for `pipelines` when the project is not installed.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.cli import positive_int  # noqa: E402
from pipelines.lists import ListError  # noqa: E402
from pipelines.scan import ScanError, format_summary, make_lists  # noqa: E402

DEFAULT_VAL_FRACTION = 0.1
# --verify decodes every image: at a few hundred images/s per core an ImageNet-sized tree
# takes an hour or more, so it says how far it is this often (seconds); a small tree, never.
PROGRESS_INTERVAL_S = 30.0


class VerifyProgress:
    """``on_progress`` for ``verify_images``: one line on stderr per PROGRESS_INTERVAL_S."""

    def __init__(self, interval_s: float = PROGRESS_INTERVAL_S):
        self.interval_s = interval_s
        self.start = self.last = time.monotonic()

    def __call__(self, checked: int, total: int, failed: int) -> None:
        now = time.monotonic()
        if now - self.last < self.interval_s or checked == total:
            return
        self.last = now
        images_per_s = checked / max(now - self.start, 1e-9)
        minutes_left = (total - checked) / max(images_per_s, 1e-9) / 60
        left = "under a minute" if minutes_left < 1 else f"about {minutes_left:,.0f} min"
        print(
            f"--verify: {checked:,} of {total:,} images checked ({checked / total:.0%}), "
            f"{failed:,} excluded so far, {images_per_s:,.0f} images/s, {left} left",
            file=sys.stderr,
            flush=True,
        )


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=(
            "Val count per class (flat layout): round(n * F), halves up; at least 1 when the "
            "class has 2+ images and F > 0; never the whole class. With F = 0 (or no val "
            "images) Test.txt holds only a '#' comment. Hidden (dot) files and folders and "
            "non-image files are skipped and counted; an empty class folder keeps its label."
        ),
    )
    parser.add_argument("root", help="folder of class folders, or of train/ and val/ (or test/)")
    parser.add_argument("--out-dir", required=True, help="where the three files are written")
    parser.add_argument(
        "--val-fraction",
        type=_fraction,
        default=None,
        help=f"share of each class for val, flat layout only (default {DEFAULT_VAL_FRACTION})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="decode every image fully and leave out the ones that fail, naming each",
    )
    parser.add_argument(
        "--workers", type=positive_int, default=None, help="processes for --verify (default: CPUs)"
    )
    parser.add_argument(
        "--absolute", action="store_true", help="absolute paths (default: relative to DIR)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    val_fraction = DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction
    try:
        report = make_lists(
            args.root,
            out_dir=args.out_dir,
            val_fraction=val_fraction,
            seed=args.seed,
            verify=args.verify,
            workers=args.workers,
            absolute=args.absolute,
            on_excluded=lambda path, reason: print(f"excluded: {path}: {reason}"),
            on_verify_progress=VerifyProgress(),
        )
    except (ScanError, ListError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C, most likely mid --verify: one line, not a traceback
        print("interrupted: no lists written", file=sys.stderr)
        return 130
    if report.layout == "split" and args.val_fraction is not None:
        print("note: --val-fraction ignored: ROOT has its own train/ and val/ folders")
    print(format_summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
