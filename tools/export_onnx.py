"""Export a trained model.pt to ONNX, checked against PyTorch on real images.

    python tools/export_onnx.py RUN/model.pt|WEIGHTS OUT.onnx [--arch NAME] [--check-images PATH...]
                                [--tolerance X]

The ONNX graph takes ``images`` (float32, (batch, 3, S, S), normalized as model.pt's
preprocessing says; the batch axis is dynamic) and returns ``logits``; its metadata_props hold
``preprocessing`` and ``class_names`` (JSON), ``arch`` and ``weights``. Before OUT.onnx is
written, onnxruntime runs it on a few real images and its logits must match PyTorch's within
the tolerance. Needs the ``export`` extra (onnx, onnxruntime, onnxscript).
Exit status: 0 when written, 1 when the check failed (nothing written), 2 for bad input or
a missing package (the error on one line).
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    # `python tools/export_onnx.py` puts tools/ first on sys.path; the project root has to be
    # there for `trainer` and `pipelines` when the project is not installed.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.cli import positive_float  # noqa: E402
from pipelines import heap  # noqa: E402
from pipelines.fileio import OVERWRITE_HELP, OutputFileError, check_output_file  # noqa: E402
from pipelines.lists import ListError  # noqa: E402
from trainer import inference  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "model",
        help="a run's model.pt, or the run folder holding it; or torchvision's ImageNet "
        "weights by name (ResNet50_Weights.IMAGENET1K_V2, or IMAGENET1K_V2 with --arch)",
    )
    parser.add_argument(
        "--arch",
        default=None,
        metavar="NAME",
        help="the architecture of a model given as a weights name without its enum (default: none)",
    )
    parser.add_argument(
        "out", help="the .onnx file to write (an existing one is refused without --overwrite)"
    )
    parser.add_argument(
        "--check-images",
        nargs="+",
        metavar="PATH",
        default=None,
        help="image files, folders or list files to check the export on (the first "
        f"{inference.ONNX_CHECK_IMAGES} readable images; default: the val list, else the "
        "train list, of the run's config.toml beside model.pt)",
    )
    parser.add_argument(
        "--tolerance",
        type=positive_float,
        default=inference.ONNX_TOLERANCE,
        help=f"largest allowed |logit difference| (default {inference.ONNX_TOLERANCE:g})",
    )
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # First, so that a machine without the packages hears it before any work is done.
        inference.import_onnx_modules()
        check_output_file(args.out, overwrite=args.overwrite, flag="")
        # The model before the check images: a wrong model path is the first thing to hear.
        model = inference.load_model(args.model, arch=args.arch)
        check_paths = args.check_images or (
            inference.run_config_lists(args.model) if model.from_run else []
        )
        if not check_paths:
            where = (
                f"no config.toml with a val or train list beside {args.model}"
                if model.from_run
                else f"{args.model} names weights, not a run with lists"
            )
            raise inference.InferenceError(
                f"no images to check the export with: {where}; pass --check-images PATH..."
            )
        report = inference.export_onnx(
            args.model,
            args.out,
            check_paths=check_paths,
            tolerance=args.tolerance,
            on_skip=lambda path, reason: print(
                f"skipped: {path}: {reason}", file=sys.stderr, flush=True
            ),
            model=model,
        )
    except inference.ExportCheckError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (inference.InferenceError, ListError, OutputFileError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    size_mib = os.path.getsize(report.path) / 2**20
    print(
        f"wrote {report.path} ({size_mib:.1f} MiB, {report.metadata['arch']}, "
        f"{report.num_classes} classes) in "
        f"{report.seconds:.1f} s"
    )
    print(
        f"checked with onnxruntime on {report.checked_images} "
        f"{'image' if report.checked_images == 1 else 'images'} (batches of "
        f"{' and '.join(map(str, report.batch_sizes))}): max abs logit difference "
        f"{report.max_abs_difference:.2e} (tolerance {report.tolerance:g})"
    )
    return 0


if __name__ == "__main__":
    heap.freeze_startup_objects()  # pipelines/heap.py: ends sooner
    sys.exit(main())
