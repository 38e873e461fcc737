"""Turn a list file into WebDataset tar shards, with DALI's index beside each and a manifest.

    python tools/make_shards.py LIST --out-dir DIR [--shard-size 256MB] [--seed S]
                                [--workers N] [--verify] [--overwrite]

Each sample is the image file's own bytes (never re-encoded) and its label; the samples are
spread over the shards in a random order of --seed, so every shard mixes the classes. Shards
hold about --shard-size each. The folder gets shard-NNNNNN.tar and .idx files, classes.txt and
manifest.json (written last: a run cut short leaves no manifest, and no shard that looks whole;
the same command again keeps the shards already written and writes the rest).
Exit status: 0 when the set was written, 2 for bad input (the error on one line), 130 for
Ctrl-C (the shards written so far stay, whole; no manifest).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if __package__ in (None, ""):
    # `python tools/make_shards.py` puts tools/ first on sys.path; the project root has to be
    # there for `pipelines` when the project is not installed.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.cli import positive_int  # noqa: E402
from pipelines.lists import ListError  # noqa: E402
from pipelines.shards import DEFAULT_SHARD_SIZE, ShardError, make_shards, parse_size  # noqa: E402

PROGRESS_INTERVAL_S = 10.0  # a line on stderr this often while shards are written


class WriteProgress:
    """``on_progress`` for ``make_shards``: shards and bytes done, the rate and the time left,
    on stderr at most once per PROGRESS_INTERVAL_S (a small set says nothing before its end)."""

    def __init__(self, interval_s: float = PROGRESS_INTERVAL_S):
        self.interval_s = interval_s
        self.start = self.last = time.monotonic()
        self.first_done: int | None = None  # bytes already there (kept from a cut run)

    def __call__(self, shards_done: int, shards: int, bytes_done: int, total: int) -> None:
        now = time.monotonic()
        if self.first_done is None:
            self.first_done = bytes_done
        if now - self.last < self.interval_s or shards_done == shards:
            return
        self.last = now
        rate = (bytes_done - self.first_done) / max(now - self.start, 1e-9)
        left = (total - bytes_done) / max(rate, 1e-9)
        eta = "under a minute" if left < 60 else f"about {left / 60:,.0f} min"
        print(
            f"{shards_done:,} of {shards:,} shards written ({bytes_done / 1e9:.2f} of "
            f"{total / 1e9:.2f} GB, {bytes_done / total:.0%}), {rate / 1e6:,.1f} MB/s, {eta} left",
            file=sys.stderr,
            flush=True,
        )


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("list", help="a list file (make_lists.py's Train.txt / Test.txt)")
    parser.add_argument("--out-dir", required=True, help="the folder of the shard set")
    parser.add_argument(
        "--shard-size",
        type=_size,
        default=parse_size(DEFAULT_SHARD_SIZE),
        metavar="SIZE",
        help=f"bytes per shard, e.g. 64MB, 1GB, 512MiB (default {DEFAULT_SHARD_SIZE})",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the order of samples (default 0)"
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="processes writing shards (default: CPUs)",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="decode every image first, as make_lists.py --verify, and leave out the ones "
        "that fail, naming each",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a shard set already in --out-dir"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.monotonic()
    try:
        report = make_shards(
            args.list,
            out_dir=args.out_dir,
            shard_bytes=args.shard_size,
            seed=args.seed,
            workers=args.workers,
            verify=args.verify,
            overwrite=args.overwrite,
            on_excluded=lambda path, reason: print(f"excluded: {path}: {reason}"),
            on_progress=WriteProgress(),
        )
    except (ShardError, ListError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: the shards written so far are whole and kept; no manifest yet: run "
            "the same command again to write the rest",
            file=sys.stderr,
        )
        return 130
    kept = f" ({report.kept} kept from an earlier, cut run)" if report.kept else ""
    excluded = f"; {len(report.excluded)} excluded by --verify" if report.excluded else ""
    print(
        f"wrote {report.shards} shard{'s' if report.shards != 1 else ''}{kept} of "
        f"{report.samples:,} images ({report.bytes / 1e6:,.1f} MB, {report.classes} classes) "
        f"to {report.out_dir} in {time.monotonic() - start:.1f} s{excluded}; manifest: "
        f"{report.manifest}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
