"""Top-k class predictions of a trained model.pt for image files, folders and list files.

    python tools/predict.py --model RUN/model.pt|WEIGHTS PATH... [--arch NAME] [--top-k K] [--batch-size N]
                            [--backend auto|dali|pil] [--workers N] [--amp off|bf16|fp16]
                            [--csv FILE]

PATH: an image file; a folder (its image files, recursively); or a list file (.txt, the
project's "path label" format), whose labels give a top-1 accuracy. Images get the model's
validation preprocessing through the project's loaders (DALI on the GPU when CUDA is
available, PIL otherwise). A bad image (missing, empty, corrupt, truncated, not an image) is
named on stderr and skipped; the others are still predicted.
Exit status: 0 when every image was predicted, 1 when some were skipped (the rest were
predicted), 2 for bad input or when no image could be predicted (the error on one line), 130
for Ctrl-C (one line: how many were predicted; no --csv file), 141 (128 + SIGPIPE), quietly,
when the reader of its output goes away (`| head`).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import signal
import sys

if __package__ in (None, ""):
    # `python tools/predict.py` puts tools/ first on sys.path; the project root has to be
    # there for `trainer` and `pipelines` when the project is not installed.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.cli import non_negative_int, positive_int  # noqa: E402
from pipelines import heap  # noqa: E402
from pipelines.fileio import (  # noqa: E402
    OVERWRITE_HELP,
    OutputFileError,
    atomic_write_text,
    check_output_file,
)
from pipelines.lists import ListError  # noqa: E402
from pipelines.scan import IMAGE_EXTENSIONS  # noqa: E402
from trainer import dist, inference  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders, lists")
    parser.add_argument(
        "--model",
        required=True,
        help="a run's model.pt, or the run folder holding it; or torchvision's ImageNet weights "
        "by name (ResNet50_Weights.IMAGENET1K_V2, or IMAGENET1K_V2 with --arch), downloaded "
        "once into torch's hub cache (required)",
    )
    parser.add_argument(
        "--arch",
        default=None,
        metavar="NAME",
        help="the architecture of a --model given as a weights name without its enum "
        "(--model IMAGENET1K_V2 --arch resnet50; default: none)",
    )
    parser.add_argument(
        "--top-k",
        type=positive_int,
        default=inference.DEFAULT_TOP_K,
        help=f"classes per image (default {inference.DEFAULT_TOP_K}, at most the class count)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=inference.DEFAULT_BATCH_SIZE,
        help=f"images per batch (default {inference.DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--backend",
        choices=inference.BACKENDS,
        default="auto",
        help="auto (default): dali on the GPU when CUDA is available, else pil",
    )
    parser.add_argument(
        "--workers",
        type=non_negative_int,
        default=None,
        help="DALI threads or PIL worker processes (default: usable cores, at most "
        f"{inference.GPU_DECODE_MAX_THREADS} with DALI on a GPU; 0 = PIL in this process)",
    )
    parser.add_argument(
        "--cpu-threads",
        type=positive_int,
        default=None,
        help="torch threads for the model without a GPU (default: usable cores, one fewer for "
        "each core other processes keep busy at start, as the trainer's --cpu-threads)",
    )
    parser.add_argument(
        "--amp",
        choices=inference.AMP_CHOICES,
        default="off",
        help="autocast dtype, as the trainer's --amp (default off: float32)",
    )
    parser.add_argument(
        "--csv",
        metavar="FILE",
        default=None,
        help="write path, label, top-k classes and probabilities to FILE instead of stdout; "
        "an existing FILE is refused without --overwrite (default: stdout)",
    )
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    return parser


def format_line(prediction: inference.Prediction, class_names: list[str]) -> str:
    ranked = "\t".join(
        f"{class_names[c]} {p:.4f}"
        for c, p in zip(prediction.classes, prediction.probabilities, strict=True)
    )
    return f"{prediction.path}\t{ranked}"


def csv_text(predictions: list[inference.Prediction], class_names: list[str], top_k: int) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    header = ["path", "label"]
    for rank in range(1, top_k + 1):
        header += [f"class_{rank}", f"probability_{rank}"]
    writer.writerow(header)
    for p in predictions:
        row = [p.path, "" if p.label is None else class_names[p.label]]
        for c, prob in zip(p.classes, p.probabilities, strict=True):
            row += [class_names[c], f"{prob:.6f}"]
        writer.writerow(row)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    try:
        return predict(argv)
    except BrokenPipeError:
        # The reader went away (`predict.py ... | head`): stop quietly, as a writer that
        # SIGPIPE ends does; it was a traceback, or 'error: [Errno 32] Broken pipe' and status
        # 2. Python's recipe: stdout onto /dev/null, so the flush at exit succeeds.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE


def predict(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    skipped: list[str] = []  # every path left out, whichever stage found it
    predicted = [0]  # predictions made, for the line a Ctrl-C prints
    folder_notes: list[str] = []  # files of folders that are not images, counted

    def report_skip(path: str, reason: str) -> None:
        skipped.append(path)
        print(f"skipped: {path}: {reason}", file=sys.stderr, flush=True)

    try:
        if args.csv:  # before any work: a refused CSV must not cost a whole prediction run
            check_output_file(args.csv, overwrite=args.overwrite, flag="--csv")
        backend, device = inference.resolve_backend(args.backend)
        threads = (
            args.workers if args.workers is not None else inference.default_threads(backend, device)
        )
        torch_threads = None
        if device.type == "cpu":
            # A descheduled thread stalls every op: not more threads than free cores.
            torch_threads = dist.choose_torch_threads(1, args.cpu_threads)
            torch.set_num_threads(torch_threads.threads)
        model = inference.load_model(args.model, device=device, arch=args.arch)
        predictor = inference.Predictor(
            model,
            backend=backend,
            device=device,
            batch_size=args.batch_size,
            top_k=args.top_k,
            threads=threads,
            amp=args.amp,
        )
        items = inference.collect_inputs(
            args.paths, class_names=model.class_names, on_skip=report_skip, notes=folder_notes
        )
        if not items:
            raise inference.InferenceError(
                "no images to predict in "
                + " ".join(args.paths)
                + " (folders are searched for "
                + "/".join(sorted(IMAGE_EXTENSIONS))
                + " files)"
            )
        collected: list[inference.Prediction] = []

        def on_prediction(prediction: inference.Prediction) -> None:
            predicted[0] += 1
            if args.csv:
                collected.append(prediction)
            else:
                print(format_line(prediction, model.class_names), flush=False)

        summary = predictor.run(items, on_prediction=on_prediction, on_skip=report_skip)
        if summary.predicted == 0:
            raise inference.InferenceError(
                f"none of the {len(items)} images could be predicted (each named above)"
            )
        if args.csv:
            atomic_write_text(args.csv, csv_text(collected, model.class_names, predictor.top_k))
    except BrokenPipeError:  # stdout's reader gone: main's, not an input error
        raise
    except (inference.InferenceError, ListError, OutputFileError, OSError) as error:
        sys.stdout.flush()
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, not torch's traceback
        sys.stdout.flush()  # the predictions printed so far stay whole lines
        written = f"; {args.csv} not written" if args.csv else ""
        print(f"interrupted after {predicted[0]} predictions{written}", file=sys.stderr)
        return 130
    if torch_threads is not None and torch_threads.cut:
        folder_notes.append(f"torch ran {torch_threads.describe()}")
    for note in [*folder_notes, *summary.notes]:
        print(f"note: {note}")
    if summary.top1 is not None:
        for list_file in inference.lists_without_classes(args.paths):
            print(
                f"note: {list_file} has no classes.txt beside it: its labels were scored as the "
                f"model's class indices (0 = {model.class_names[0]}, 1 = "
                f"{model.class_names[1] if len(model.class_names) > 1 else '-'}, ...)"
            )
        print(f"top-1 {summary.top1:.2f}% over {summary.labelled} labelled images")
    workers = f"{threads} {'threads' if backend == 'dali' else 'workers'}"
    if torch_threads is not None:
        workers += f", torch {torch_threads.threads}"
    print(
        f"predicted {summary.predicted} images in {summary.seconds:.1f} s: "
        f"{summary.images_per_second:.0f} img/s ({backend} on {device.type}, batch "
        f"{args.batch_size}, {workers}, amp {args.amp})"
        + (f"; wrote {args.csv}" if args.csv else "")
    )
    if skipped:
        print(f"skipped {len(skipped)} images (named on stderr)")
        return 1
    return 0


if __name__ == "__main__":
    heap.freeze_startup_objects()  # pipelines/heap.py: ends sooner
    sys.exit(main())
