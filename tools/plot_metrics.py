"""Draw a run's loss and top-1 per epoch (metrics.jsonl) into a PNG.

    python tools/plot_metrics.py RUN_DIR [--out FILE]

Needs matplotlib (pip install -e '.[plot]'); without it, one line says so and the exit
status is 2. The trainer draws the same RUN_DIR/metrics.png at the end of a run.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    # `python tools/plot_metrics.py` puts tools/ first on sys.path; the project root has to be
    # there for `trainer` when the project is not installed.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer import metrics  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a training run's --output-dir (holds metrics.jsonl)")
    parser.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/metrics.png)")
    args = parser.parse_args(argv)
    try:
        path = metrics.plot(args.run_dir, args.out)
    except (metrics.PlotUnavailable, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
