"""Write the demo data set (ten texture-and-colour classes) into OUT and print a summary.

    python tools/make_demo_data.py data/demo [--preset default|tiny] [--seed 0] [--replace]

Reuses OUT when it already holds the same preset and seed (see ``pipelines.demo``). Refuses a
folder holding anything it did not write, and replaces a demo tree of another preset or seed
only with --replace.
"""

from __future__ import annotations

import os
import sys
import time

if __package__ in (None, ""):
    # `python tools/make_demo_data.py` puts tools/ first on sys.path; the project root has to
    # be there for `pipelines` when the project is not installed.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.cli import ArgumentParser, int_at_least  # noqa: E402
from pipelines.demo import PRESETS, DemoDataError, default_demo_root, ensure_demo_data  # noqa: E402
from pipelines.lists import read_classes, read_list  # noqa: E402


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "out", nargs="?", default=None, help=f"output folder (default: {default_demo_root()})"
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="default: 160 train + 40 val photo-sized images per class (about 170 MB); tiny: "
        "12 + 4 per class at 40-96 px, for tests (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int_at_least(0), default=0, help="seed of the images (default: %(default)s)"
    )
    parser.add_argument(
        "--workers",
        type=int_at_least(1),
        default=None,
        help=f"processes drawing the images (default: all CPUs, {os.cpu_count()} here, for the "
        "default preset; one, this process, for the tiny preset)",
    )
    parser.add_argument(
        "--replace",
        action="store_true",
        help="replace a demo tree of another preset or seed in OUT, deleting its train/ and "
        "val/ (files added there too) (default: refuse)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        data = ensure_demo_data(
            args.out,
            preset=args.preset,
            seed=args.seed,
            workers=args.workers,
            replace=args.replace,
        )
    except DemoDataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    classes = read_classes(data.classes_file)
    train = read_list(data.train_list, num_classes=len(classes))
    val = read_list(data.val_list, num_classes=len(classes))
    what = f"demo data ({data.preset} preset, seed {data.seed}) in {data.root}"
    if data.reused:
        print(f"{what}: reused, generated earlier (nothing written)")
    else:
        print(f"{what}: generated [{seconds:.1f} s]")
    print(f"classes: {len(classes)} ({', '.join(classes)})")
    print(f"train: {len(train)} images -> {data.train_list}")
    print(f"val: {len(val)} images -> {data.val_list}")
    print(f"class names -> {data.classes_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
