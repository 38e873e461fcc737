"""Draw one batch exactly as the loader hands it to the model, to check it before training.

    python tools/show_batch.py --list FILE --out batch.png [--loader dali|pil|pil-gpu]
                               [--train | --val] [--image-size 224] [--batch-size 32]
                               [--auto-augment none|auto|rand|trivial] [--seed S] [--epoch E]

A grid of the batch's images, de-normalized, each titled with its class name (from the
classes.txt beside the list): the crops, flips, automatic augmentation, EXIF rotation and
crop size the model will see. LIST may be a list file or a shard set, local or s3://. Bad
input is one ``error:`` line and exit status 2; an existing --out is refused without
--overwrite. Needs matplotlib (the plot extra).
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.cli import positive_int  # noqa: E402
from pipelines.fileio import OVERWRITE_HELP, OutputFileError, check_output_file  # noqa: E402
from pipelines.lists import ImageError, ListError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", required=True, help="list file or shard set (local or s3://)")
    parser.add_argument("--out", required=True, help="picture to write (.png, .svg, .pdf, .jpg)")
    parser.add_argument(
        "--loader", default="dali", choices=("dali", "pil", "pil-gpu"), help="default: dali"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--train", dest="train", action="store_true", default=True,
        help="training augmentation: random-resized crop, flip (the default)",
    )  # fmt: skip
    mode.add_argument(
        "--val", dest="train", action="store_false", help="validation: resize, center crop"
    )
    parser.add_argument(
        "--image-size", type=positive_int, default=224, help="crop side in px (default 224)"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=32, help="images drawn (default 32)"
    )
    parser.add_argument(
        "--auto-augment", default="none", choices=("none", "auto", "rand", "trivial"),
        help="automatic augmentation of training batches, as the trainer's flag (default none)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="the trainer's --seed (default 0)")
    parser.add_argument("--epoch", type=int, default=0, help="0-based epoch drawn (default 0)")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipelines import build_loader
    from pipelines.lists import classes_beside, read_classes
    from pipelines.s3 import S3Error
    from pipelines.shards import ShardError
    from trainer.batch_picture import draw_batch
    from trainer.metrics import PlotFormatError, PlotUnavailable, figure_format

    try:
        check_output_file(args.out, overwrite=args.overwrite, flag="--out")
        figure_format(args.out)  # an unknown suffix or no matplotlib: before any loading
        loader = build_loader(
            args.list, train=args.train, backend=args.loader, batch_size=args.batch_size,
            image_size=args.image_size, num_threads=2, seed=args.seed,
            auto_augment=args.auto_augment if args.train else "none",
        )  # fmt: skip
        if args.train:
            loader.set_epoch(args.epoch)
        images, labels = next(iter(loader))
        classes_file = classes_beside(args.list)
        names = read_classes(classes_file) if classes_file else []
        mode = "train" if args.train else "val"
        title = f"{args.list}: {mode}, {args.loader}, {args.image_size} px, epoch {args.epoch}"
        draw_batch(images, labels, names, args.out, title=title)
    except (
        OutputFileError, PlotUnavailable, PlotFormatError, ListError, ShardError, ImageError,
        S3Error, OSError, ValueError,
    ) as exc:  # fmt: skip
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {len(labels)} {mode} images as the model sees them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
