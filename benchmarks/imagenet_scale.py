"""ImageNet-scale start-up, epoch boundaries and host memory of one rank's DALI loaders.

    python benchmarks/imagenet_scale.py                       # rank 0 of 8, batch 32, 224 px
    python benchmarks/imagenet_scale.py --image-size 64 --json scale.json

No ImageNet needed: the demo data's train files are listed again and again up to ImageNet's
1,281,167 lines (and its val files up to 50,000), a list of ImageNet's length, not a million
files. Then one rank's work (``--rank`` of ``--world-size``) is measured on that list and on
the demo list itself, each case in a fresh process so that its max RSS is its own:

- ``parse_s``: ``read_table`` of the train list; ``check_s``: this rank's share of the file
  check (``check_files_exist``), both timed alone first;
- ``build_train_s``, ``build_val_s``: ``build_loader`` (parse, check, set-up) for each list;
- ``start_to_first_batch_s``: both builds plus the first training batch, what the trainer
  pays before its first step (the parse and check again, with the lists' pages cached);
- per epoch: ``boundary_s`` from ``set_epoch`` to the first batch of the epoch (a new
  pipeline each epoch) and ``step_s``, the median time of the next ``--steps`` batches
  (``steps_timed``: fewer when the epoch holds fewer, as the demo list's 6 steps at 8 x 32);
- ``max_rss_mb``: ``ru_maxrss`` with the train and val loaders alive, each having made
  batches; ``table_mb``: the train loader's compact list (paths and labels).

Only as many steps of each epoch run as are timed, so the script takes about a minute.

``--shards`` measures shard sets too (``tools/make_shards.py``'s format): the demo lists
written as shard sets, and long sets of the same lengths whose shards repeat those shards'
real images (each long shard is a link to a demo shard, its DALI index and manifest entry
listing that shard's members again and again): ``parse_s`` is then ``read_shard_table``
(manifest + indexes) and ``check_s`` ``check_shards`` (a stat a shard).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):
    # `python benchmarks/imagenet_scale.py` puts benchmarks/ first on sys.path; the project
    # root must be there for `pipelines` even without the editable install.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.cli import (  # noqa: E402
    ArgumentParser,
    error,
    non_negative_int,
    positive_int,
    sigterm_as_exit,
)
from pipelines.fileio import (  # noqa: E402
    OVERWRITE_HELP,
    OutputFileError,
    atomic_write_text,
    check_output_file,
)
from pipelines.lists import CLASSES_FILE, TRAIN_LIST, VAL_LIST, format_line  # noqa: E402

IMAGENET_TRAIN = 1_281_167
IMAGENET_VAL = 50_000
# Left in a --work-dir this script writes to: its lists there are its own to replace.
WORK_MARKER = ".imagenet_scale_work"
LIST_FILES = (TRAIN_LIST, VAL_LIST, CLASSES_FILE)


class InputError(ValueError):
    """Bad input, found before any work; the message is one line."""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data",
        help="folder with Train.txt, Test.txt and classes.txt, only read "
        "(default: the demo data, generated once)",
    )
    p.add_argument(
        "--work-dir",
        help="where the long lists go: a new or empty folder, or one this script wrote before "
        f"(it leaves {WORK_MARKER} there); never one holding lists of your own "
        "(default: a temporary folder, removed afterwards)",
    )
    p.add_argument(
        "--train-size",
        type=positive_int,
        default=IMAGENET_TRAIN,
        help="lines of the long train list (default: %(default)s, ImageNet's)",
    )
    p.add_argument(
        "--val-size",
        type=positive_int,
        default=IMAGENET_VAL,
        help="lines of the long val list (default: %(default)s, ImageNet's)",
    )
    p.add_argument(
        "--rank",
        type=non_negative_int,
        default=0,
        help="rank measured, below --world-size (default: %(default)s)",
    )
    p.add_argument(
        "--world-size",
        type=positive_int,
        default=8,
        help="ranks the work is split over (default: %(default)s)",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=32, help="images per rank (default: %(default)s)"
    )
    p.add_argument(
        "--image-size",
        type=positive_int,
        default=224,
        help="crop side in px (default: %(default)s)",
    )
    p.add_argument(
        "--threads", type=positive_int, default=2, help="DALI threads (default: %(default)s)"
    )
    p.add_argument(
        "--epochs",
        type=positive_int,
        default=3,
        help="epochs whose start is timed (default: %(default)s)",
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        default=20,
        help="batches timed per epoch after its first (default: %(default)s)",
    )
    p.add_argument(
        "--json", help="also write the settings and results to this JSON file (default: none)"
    )
    p.add_argument(
        "--shards",
        action="store_true",
        help="also measure shard sets of the same samples (default: lists only)",
    )
    p.add_argument(
        "--shard-samples",
        type=positive_int,
        default=1250,
        help="samples per shard of the long sets, ImageNet's at ~100 KB an image in 128 MB "
        "shards (default: %(default)s)",
    )
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--case", nargs=3, metavar=("NAME", "TRAIN", "VAL"), help=argparse.SUPPRESS)
    return p


def write_long_list(source: str, target: str, lines: int) -> None:
    """``lines`` lines that repeat ``source``'s samples in order, with absolute paths."""
    from pipelines.lists import read_table

    table = read_table(source)
    # Each distinct line is formatted once; the long list is that block repeated.
    block = [
        format_line(path, int(label))
        for path, label in zip(table.paths(), table.labels.tolist(), strict=True)
    ]
    with open(target, "w", encoding="utf-8") as f:
        f.write("".join(block[i % len(block)] for i in range(lines)))


def write_long_shard_set(source: str, target: str, samples: int, per_shard: int) -> None:
    """A shard set of ``samples`` samples in shards of ``per_shard`` that repeat the real
    images of the shard set ``source``: long shard k is a link to source shard k mod n, and
    its index and manifest entry list that shard's members (offsets, sizes, labels) again and
    again. What start-up reads (manifest, indexes) is a real set's size; no image is copied."""
    from pipelines import shards

    manifest = shards.read_manifest(source)
    small = manifest["shards"]
    os.makedirs(target, exist_ok=True)
    entries = []
    for number, start in enumerate(range(0, samples, per_shard)):
        count = min(per_shard, samples - start)
        origin = small[number % len(small)]
        with open(os.path.join(source, origin["index"]), encoding="utf-8") as f:
            lines = f.read().splitlines()[1:]
        name = shards.shard_name(number)
        link = os.path.join(target, name)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.join(os.path.abspath(source), origin["name"]), link)
        rows = [lines[i % len(lines)] for i in range(count)]
        with open(os.path.join(target, shards.index_name(name)), "w", encoding="utf-8") as f:
            f.write(f"{shards.INDEX_VERSION} {count}\n" + "\n".join(rows) + "\n")
        labels = [origin["labels"][i % len(lines)] for i in range(count)]
        entries.append(
            {"name": name, "index": shards.index_name(name), "samples": count,
             "bytes": origin["bytes"], "labels": labels}
        )  # fmt: skip
    shards.write_manifest(
        target, shards=entries, class_names=shards.read_classes(os.path.join(source, CLASSES_FILE)),
        num_classes=manifest["num_classes"], seed=0, source=source,
    )  # fmt: skip


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_case(args, train_list: str, val_list: str) -> dict:
    """One rank's figures for one pair of lists (run in a fresh process)."""
    import torch

    from pipelines import build_loader, common
    from pipelines.lists import read_table
    from trainer.nodes import list_digest  # the trainer's modules, imported as a run does

    loader_args = dict(
        backend="dali",
        batch_size=args.batch_size,
        image_size=args.image_size,
        rank=args.rank,
        world_size=args.world_size,
        device="cpu",
        num_threads=args.threads,
        seed=0,
        dtype=torch.float32,
    )
    from pipelines import shards

    out: dict = {"rss_after_imports_mb": round(max_rss_mb())}
    shard_set = shards.manifest_path(train_list) is not None
    start = time.perf_counter()
    table = shards.read_shard_table(train_list) if shard_set else read_table(train_list)
    out["parse_s"] = time.perf_counter() - start
    out["train_samples"] = len(table)
    start = time.perf_counter()
    if shard_set:  # a stat a shard, every rank all of them
        shards.check_shards(table)
        out["files_checked"] = len(table.shard_names)
    else:
        checked = common.check_files_exist(
            table, list_file=train_list, rank=args.rank, world_size=args.world_size
        )
        out["files_checked"] = len(checked)
    out["check_s"] = time.perf_counter() - start
    del table

    start = time.perf_counter()
    train = build_loader(train_list, train=True, **loader_args)
    out["build_train_s"] = time.perf_counter() - start
    start = time.perf_counter()
    val = build_loader(val_list, train=False, **loader_args)
    out["build_val_s"] = time.perf_counter() - start
    # What a multi-rank trainer adds before its first step: every rank digests both lists so
    # that a node holding another copy stops the job at start (trainer/nodes.py).
    start = time.perf_counter()
    list_digest(train)
    list_digest(val)
    out["digest_s"] = time.perf_counter() - start
    start = time.perf_counter()
    train.set_epoch(0)
    batches = iter(train)
    next(batches)
    out["first_batch_s"] = time.perf_counter() - start
    out["start_to_first_batch_s"] = (
        out["build_train_s"] + out["build_val_s"] + out["digest_s"] + out["first_batch_s"]
    )
    out["steps_per_epoch"] = len(train)
    # A list shorter than --steps + 1 steps per epoch times what its epochs hold: say so.
    out["steps_timed"] = min(args.steps, len(train) - 1)
    out["table_mb"] = train.table.nbytes / 1e6

    epochs = []
    for epoch in range(args.epochs):
        if epoch > 0:  # epoch 0's first batch is the one above
            start = time.perf_counter()
            train.set_epoch(epoch)
            batches = iter(train)
            next(batches)
            boundary = time.perf_counter() - start
        else:
            boundary = out["first_batch_s"]
        times = []
        for _ in range(out["steps_timed"]):
            start = time.perf_counter()
            next(batches)
            times.append(time.perf_counter() - start)
        epochs.append({"epoch": epoch, "boundary_s": boundary, "step_s": statistics.median(times)})
    batches.close()  # the pass stops here; the next one would start a new pipeline
    out["epochs"] = epochs
    val_batches = iter(val)
    next(val_batches)  # the val pipeline alive and its buffers allocated, as in a run
    out["max_rss_mb"] = round(max_rss_mb())
    val_batches.close()
    return out


def run_case(args, name: str, train_list: str, val_list: str) -> dict:
    """``measure_case`` in a fresh interpreter: its own max RSS, nothing cached in-process."""
    command = [sys.executable, os.path.abspath(__file__), "--case", name, train_list, val_list]
    for flag in ("rank", "world_size", "batch_size", "image_size", "threads", "epochs", "steps"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"case {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(results: dict, args) -> str:
    names = list(results)
    rows = [
        ("train samples", "train_samples", "{:,}"),
        ("list parse, or manifest + indexes (s)", "parse_s", "{:.2f}"),
        ("file check, this rank's share, or every shard (s)", "check_s", "{:.2f}"),
        ("files (or shards) checked by this rank", "files_checked", "{:,}"),
        ("build_loader train (s)", "build_train_s", "{:.2f}"),
        ("build_loader val (s)", "build_val_s", "{:.2f}"),
        ("lists' digests for the node check (s)", "digest_s", "{:.2f}"),
        ("first training batch (s)", "first_batch_s", "{:.2f}"),
        ("start to first batch (s)", "start_to_first_batch_s", "{:.2f}"),
        ("max RSS, train + val alive (MB)", "max_rss_mb", "{:,}"),
        ("RSS after imports (MB)", "rss_after_imports_mb", "{:,}"),
        ("compact train list (MB)", "table_mb", "{:.1f}"),
        ("steps timed per epoch (median below)", "steps_timed", "{:,}"),
    ]
    lines = [
        f"rank {args.rank} of {args.world_size}, batch {args.batch_size}, {args.image_size} px, "
        f"{args.threads} DALI threads, CPU",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for label, key, fmt in rows:
        lines.append(
            f"| {label} | " + " | ".join(fmt.format(results[n][key]) for n in names) + " |"
        )
    for i in range(args.epochs):
        for label, key in (("set_epoch to first batch (s)", "boundary_s"), ("step (s)", "step_s")):
            cells = " | ".join(f"{results[n]['epochs'][i][key]:.3f}" for n in names)
            lines.append(f"| epoch {i}: {label} | {cells} |")
    return "\n".join(lines)


def check_work_dir(work_dir: str, data: str) -> None:
    """Refuse a --work-dir whose list files the script did not write, and --data itself."""
    if os.path.realpath(work_dir) == os.path.realpath(data):
        raise InputError(
            f"--work-dir {work_dir} is the --data folder: the long lists would replace its "
            "lists; choose another folder"
        )
    if os.path.exists(work_dir) and not os.path.isdir(work_dir):
        raise InputError(f"--work-dir {work_dir} is a file, not a folder")
    if not os.path.isdir(work_dir) or os.path.exists(os.path.join(work_dir, WORK_MARKER)):
        return
    foreign = [name for name in LIST_FILES if os.path.exists(os.path.join(work_dir, name))]
    if foreign:
        raise InputError(
            f"--work-dir {work_dir} holds {', '.join(foreign)} that this script did not write "
            f"(no {WORK_MARKER}): choose an empty or new folder"
        )


def check_data(args) -> int:
    """The --data lists must exist, parse, name existing files, and give every rank at least
    two training steps and one val image; returns the train list's length."""
    from pipelines import common
    from pipelines.lists import read_classes, read_table

    if not os.path.isdir(args.data):
        raise InputError(f"--data {args.data} is not a folder")
    for name in LIST_FILES:
        if not os.path.isfile(os.path.join(args.data, name)):
            raise InputError(f"--data {args.data} has no {name}")
    num_classes = len(read_classes(os.path.join(args.data, CLASSES_FILE)))
    sizes = {}
    for name in (TRAIN_LIST, VAL_LIST):
        list_file = os.path.join(args.data, name)
        table = read_table(list_file, num_classes=num_classes)
        common.check_files_exist(table, list_file=list_file)  # names file:line
        sizes[name] = len(table)
    check_list_length(f"{args.data}/{TRAIN_LIST}", sizes[TRAIN_LIST], sizes[VAL_LIST], args)
    check_list_length(
        "the long list (--train-size, --val-size)", args.train_size, args.val_size, args
    )
    return sizes[TRAIN_LIST]


def check_list_length(what: str, train_lines: int, val_lines: int, args) -> None:
    # Two steps per epoch at least: the first one's time is the boundary, the rest the steps.
    need = 2 * args.world_size * args.batch_size
    if train_lines < need:
        raise InputError(
            f"{what}: {train_lines:,} train lines are too few for {args.world_size} ranks x "
            f"batch {args.batch_size}: each rank needs 2 steps, {need:,} lines"
        )
    if val_lines < args.world_size:
        raise InputError(
            f"{what}: {val_lines:,} val lines leave some of the {args.world_size} ranks none"
        )


def check_args(args) -> None:
    """Everything that can be refused before the lists are written and the cases run."""
    if args.rank >= args.world_size:
        raise InputError(f"--rank {args.rank} is outside [0, --world-size {args.world_size})")
    if args.json:
        check_output_file(args.json, overwrite=args.overwrite, flag="--json")
    if args.data is not None:
        if not os.path.isdir(args.data):
            raise InputError(f"--data {args.data} is not a folder")
        if args.work_dir:
            check_work_dir(args.work_dir, args.data)


def write_work_lists(args, work: str) -> tuple[str, str]:
    """The long lists (and classes.txt) in ``work``, marked as this script's own."""
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(work, WORK_MARKER), "w") as f:
        f.write("long lists written by benchmarks/imagenet_scale.py; safe to delete\n")
    big_train, big_val = os.path.join(work, TRAIN_LIST), os.path.join(work, VAL_LIST)
    write_long_list(os.path.join(args.data, TRAIN_LIST), big_train, args.train_size)
    write_long_list(os.path.join(args.data, VAL_LIST), big_val, args.val_size)
    with open(os.path.join(args.data, CLASSES_FILE), "rb") as f:
        classes = f.read()
    with open(os.path.join(work, CLASSES_FILE), "wb") as f:
        f.write(classes)
    return big_train, big_val


def prepare(args) -> str:
    """Check everything before any work (the demo data may be generated first); returns the
    name of the --data list's column."""
    check_args(args)
    source = "--data list"
    if args.data is None:
        from pipelines.demo import default_demo_root, ensure_demo_data

        args.data = os.path.dirname(ensure_demo_data(default_demo_root()).train_list)
        source = "demo list"
        if args.work_dir:
            check_work_dir(args.work_dir, args.data)
    return f"{source} ({check_data(args):,} lines)"


def measure(args, data_column: str) -> dict:
    small_train = os.path.join(args.data, TRAIN_LIST)
    small_val = os.path.join(args.data, VAL_LIST)
    with tempfile.TemporaryDirectory(prefix="imagenet_scale_") as scratch:
        work = args.work_dir or scratch
        start = time.perf_counter()
        big_train, big_val = write_work_lists(args, work)
        print(
            f"wrote {args.train_size:,} + {args.val_size:,} lines to {work} "
            f"in {time.perf_counter() - start:.1f} s",
            flush=True,
        )
        results = {
            data_column: run_case(args, "data", small_train, small_val),
            f"{args.train_size:,}-line list": run_case(args, "long", big_train, big_val),
        }
        if args.shards:
            sets = write_work_shards(args, work, small_train, small_val)
            results["shards of the --data list" if "--data" in data_column else "demo shards"] = (
                run_case(args, "data-shards", sets["small_train"], sets["small_val"])
            )
            results[f"{args.train_size:,}-sample shard set"] = run_case(
                args, "long-shards", sets["big_train"], sets["big_val"]
            )
        return results


def write_work_shards(args, work: str, small_train: str, small_val: str) -> dict[str, str]:
    """Shard sets of the --data lists (make_shards, shards of ~1 MB so that each holds a few
    dozen images), and long sets repeating them (``write_long_shard_set``)."""
    from pipelines.shards import make_shards

    start = time.perf_counter()
    sets = {}
    for name, source, lines in (
        ("train", small_train, args.train_size),
        ("val", small_val, args.val_size),
    ):
        small = os.path.join(work, f"shards-{name}")
        make_shards(
            source, out_dir=small, shard_bytes=1_000_000, workers=args.threads, overwrite=True
        )
        big = os.path.join(work, f"long-shards-{name}")
        write_long_shard_set(small, big, lines, args.shard_samples)
        sets[f"small_{name}"], sets[f"big_{name}"] = small, big
    print(f"wrote the shard sets to {work} in {time.perf_counter() - start:.1f} s", flush=True)
    return sets


def main(argv: list[str] | None = None) -> int:
    from pipelines.demo import DemoDataError
    from pipelines.lists import ImageError, ListError

    args = build_parser().parse_args(argv)
    if args.case:
        name, train_list, val_list = args.case
        print(json.dumps({"case": name, **measure_case(args, train_list, val_list)}))
        return 0
    try:
        data_column = prepare(args)
    except (
        InputError,
        OutputFileError,
        ListError,
        ImageError,
        DemoDataError,
        OSError,
        ValueError,
    ) as e:
        return error(str(e))
    with sigterm_as_exit():  # a killed run still removes its temporary lists
        results = measure(args, data_column)
    print(markdown(results, args))
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "case"}
        text = json.dumps({"settings": settings, "results": results}, indent=2)
        atomic_write_text(args.json, text + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
