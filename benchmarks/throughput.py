"""Images/sec per GPU: the DALI pipelines against the PIL DataLoader baseline.

    python benchmarks/throughput.py                       # demo data, pil and dali, all modes
    torchrun --nproc_per_node=8 benchmarks/throughput.py --list /data/Train.txt --json out.json
    python benchmarks/throughput.py --backends pil,dali,dali:decode=cpu,dali:hw=0.99:threads=8
    python benchmarks/throughput.py --sweep --list /data/Train.txt   # tune DALI, print flags

Three figures per loader, each the median of ``--repeats`` timed windows of ``--iters`` steps,
the device synchronized at both ends of every window:

- ``loader``: the input pipeline alone, batches landing on the device;
- ``train``: the trainer's own step (``trainer.engine.train_step``) fed by that loader;
- ``synthetic``: the same step on one batch already on the device: the ceiling. The gap between
  ``train`` and ``synthetic`` is what the loader costs the training (the headline figure).

Steady state only: the untimed warm-up is the loader's queue depth (batches it made ahead)
plus ``--warmup`` steps, so no timed window consumes batches prepared during warm-up; warm-up
and windows lie inside one epoch (a short list is repeated in a temporary list file to make it
so); every window's rate is shown, with a flag when the first is >10% above the median. The
cost of an epoch boundary is measured apart, over ``--boundaries`` natural epoch ends.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

if __package__ in (None, ""):
    # `python benchmarks/throughput.py` puts benchmarks/ first on sys.path; the project root
    # must come first so `benchmarks.report` resolves even without the editable install.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import report  # noqa: E402
from benchmarks.cli import (  # noqa: E402
    ArgumentParser,
    BenchmarkInputError,
    error,
    fraction,
    non_negative_int,
    positive_int,
    sigterm_as_exit,
)
from pipelines import build_loader, heap, paths, s3  # noqa: E402
from pipelines.common import check_files_exist  # noqa: E402
from pipelines.fileio import OVERWRITE_HELP, OutputFileError, check_output_file  # noqa: E402
from pipelines.lists import (  # noqa: E402
    ImageError,
    ListError,
    Sample,
    classes_beside,
    missing_file,
    read_classes,
    read_list,
    read_table,
    write_list,
)
from pipelines.shards import ShardTable, check_shards, manifest_path, read_shard_table  # noqa: E402
from pipelines.tuning import LoaderPlan, plan_loader  # noqa: E402
from trainer import dist  # noqa: E402
from trainer import metrics as run_metrics  # noqa: E402
from trainer.config import TrainerError  # noqa: E402
from trainer.engine import build_step  # noqa: E402
from trainer.model import model_gflops  # noqa: E402

BACKENDS = ("pil", "pil-gpu", "dali")
MODES = ("loader", "train", "synthetic")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": torch.float32}
# A first window this much above the median drained batches made before timing began.
FIRST_WINDOW_DRIFT_LIMIT = 0.10
# Settings a --backends item may carry after its name: dali:hw=0.99:threads=8:prefetch=3.
VARIANT_KEYS = {"threads": int, "prefetch": int, "decode": str, "hw": float}
DECODES = ("auto", "mixed", "cpu")
# Flags that mean something only with --sweep, and the ones the sweep decides itself.
SWEEP_ONLY = ("sweep_decode", "sweep_hw_decoder_load", "sweep_threads", "sweep_prefetch", "toml")
NOT_WITH_SWEEP = ("backends", "modes", "plot")
# One loader's settings: the sweep sets them per configuration, so it would ignore these flags.
SWEPT_INSTEAD = {
    "workers": "--sweep-threads",
    "prefetch": "--sweep-prefetch",
    "dali_decode": "--sweep-decode",
    "hw_decoder_load": "--sweep-hw-decoder-load",
}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--list",
        default=None,
        help="list file to read (default: the demo data's Train.txt, photo-sized JPEGs, generated once)",
    )
    p.add_argument(
        "--backends",
        default=None,
        help="comma-separated loaders to measure: pil (torchvision recipe), pil-gpu (uint8 "
        "batches normalized on the device), dali; each may carry its own settings, e.g. "
        "dali:decode=cpu:threads=16 or dali:hw=0.99:threads=8:prefetch=3 (keys: threads, "
        "prefetch, decode, hw), so several DALI settings are compared in one process; each "
        "item once [default: pil,dali]",
    )
    p.add_argument(
        "--modes",
        default=None,
        help="comma-separated: loader, train, synthetic [default: all three]",
    )
    p.add_argument("--arch", default="resnet50", help="torchvision model name [default: resnet50]")
    p.add_argument(
        "--num-classes",
        type=positive_int,
        default=None,
        help="classes of the head (default: classes.txt beside the list, else the largest label + 1)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=64,
        help="images per GPU (per rank) per step [default: 64]",
    )
    p.add_argument(
        "--image-size", type=positive_int, default=224, help="crop side in px [default: 224]"
    )
    p.add_argument(
        "--amp",
        choices=sorted(AMP_DTYPES),
        default="bf16",
        help="mixed precision and the loaders' output dtype [default: bf16]",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="model and batches in channels_last [default: on]",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the model, as the trainer's --compile (compiled during the step "
        "warm-up, before any loader runs) [default: off]",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="PIL workers = DALI threads per GPU (default: the trainer's choice: usable cores / "
        "GPUs on this node, at most 8 with DALI GPU decode)",
    )
    p.add_argument(
        "--cpu-threads",
        type=positive_int,
        default=None,
        help="torch threads per rank without a GPU (default: the trainer's choice: usable cores "
        "/ ranks, one fewer for each core other processes keep busy at start; printed)",
    )
    p.add_argument(
        "--dali-decode",
        choices=DECODES,
        default="auto",
        help="DALI decode: mixed (GPU; needs CUDA), cpu, or auto = the trainer's choice (printed) "
        "[default: auto]",
    )
    p.add_argument(
        "--hw-decoder-load",
        type=fraction,
        default=None,
        help="share of JPEGs for the GPU's hardware decoder, 0-1, DALI mixed decode only "
        "(default: the trainer's, 0.99)",
    )
    p.add_argument(
        "--prefetch",
        type=positive_int,
        default=None,
        help="batches each loader prepares ahead: DALI's queue depth, PIL batches per worker "
        "[default: 2]",
    )
    p.add_argument(
        "--warmup",
        type=non_negative_int,
        default=None,
        help="untimed steps after the loader's queue is drained: the warm-up is queue depth + "
        "this, printed [default: 10; 3 with --sweep]",
    )
    p.add_argument(
        "--iters",
        type=positive_int,
        default=None,
        help="steps per timed window [default: 20; 8 with --sweep]",
    )
    p.add_argument(
        "--repeats",
        type=positive_int,
        default=None,
        help="timed windows; median, min and max are reported [default: 3; 2 with --sweep]",
    )
    p.add_argument(
        "--boundaries",
        type=non_negative_int,
        default=None,
        help="epoch ends to time per loader (train mode, else loader mode); 0 skips "
        "[default: 3; the sweep times none]",
    )
    p.add_argument(
        "--boundary-steps",
        type=positive_int,
        default=8,
        help="steps per epoch of the list the epoch ends are timed on [default: 8]",
    )
    p.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of loaders and model [default: 0]"
    )
    p.add_argument(
        "--json",
        default=None,
        help="write every figure and the environment to this JSON file, rewritten after each "
        "row so a cut run keeps what it measured [default: none]",
    )
    p.add_argument(
        "--plot",
        default=None,
        help="write a bar chart here, its format from the suffix (.png, .svg, .pdf, ...; needs "
        "matplotlib: pip install -e '.[plot]'); not with --sweep [default: none]",
    )
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument(
        "--no-warm-cache",
        dest="warm_cache",
        action="store_false",
        help="skip the untimed read of every file before measuring [default: the cache is warmed]",
    )
    sweep = p.add_argument_group(
        "tuning sweep (--sweep): DALI train-mode throughput over decode x hw_decoder_load x "
        "threads x prefetch, ranked; the best printed as trainer flags and as TOML"
    )
    sweep.add_argument(
        "--sweep", action="store_true", help="run the sweep instead of --backends/--modes"
    )
    sweep.add_argument(
        "--sweep-decode",
        default=None,
        help="decode placements [default: mixed,cpu on a GPU; cpu without]",
    )
    sweep.add_argument(
        "--sweep-hw-decoder-load",
        default=None,
        help="hardware-decoder shares, mixed decode only [default: 0.65,0.8,0.99]",
    )
    sweep.add_argument(
        "--sweep-threads",
        default=None,
        help="DALI threads per GPU [default: 4, 8 (those below the cores per GPU) and the "
        "cores per GPU]",
    )
    sweep.add_argument("--sweep-prefetch", default=None, help="prefetch depths [default: 2,3]")
    sweep.add_argument(
        "--toml",
        default=None,
        help="write the best settings as a TOML file for trainer/main.py --config (with --sweep "
        "only) [default: none]",
    )
    return p


def _split(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items or len(set(items)) != len(items):
        raise BenchmarkInputError(
            f"{flag} takes a comma-separated subset of {','.join(allowed)}, each once; got {text!r}"
        )
    return items


@dataclass(frozen=True)
class Variant:
    """One ``--backends`` item: a backend and the settings it fixes (None: the default)."""

    label: str  # as written on the command line; names the row
    backend: str
    threads: int | None = None
    prefetch: int | None = None
    decode: str | None = None
    hw_decoder_load: float | None = None


def parse_variants(text: str) -> list[Variant]:
    """``pil,dali,dali:decode=cpu:threads=16`` -> Variants; BenchmarkInputError naming a bad
    item (unknown loader or key, a repeated key or item, a value out of range)."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise BenchmarkInputError(f"--backends names no loader: {text!r}")
    repeated = sorted({item for item in items if items.count(item) > 1})
    if repeated:
        raise BenchmarkInputError(
            f"--backends names {', '.join(repeated)} more than once: each item is one row"
        )
    return [_parse_variant(item) for item in items]


def _parse_variant(item: str) -> Variant:
    name, *settings = item.split(":")
    if name not in BACKENDS:
        raise BenchmarkInputError(
            f"--backends: unknown loader {name!r} in {item!r}; choose from {','.join(BACKENDS)}"
        )
    values: dict = {}
    for setting in settings:
        key, _, text = setting.partition("=")
        if key not in VARIANT_KEYS or not text:
            raise BenchmarkInputError(
                f"--backends: {setting!r} in {item!r} is not key=value with a key among "
                f"{','.join(VARIANT_KEYS)}"
            )
        if key in values:
            raise BenchmarkInputError(f"--backends: {key} is set twice in {item!r}")
        values[key] = _variant_value(key, text, item)
    if name != "dali" and ("decode" in values or "hw" in values):
        raise BenchmarkInputError(f"--backends: decode and hw apply to dali only ({item!r})")
    return Variant(
        item,
        name,
        values.get("threads"),
        values.get("prefetch"),
        values.get("decode"),
        values.get("hw"),
    )


def _variant_value(key: str, text: str, item: str):
    """One setting's value, in range: threads and prefetch >= 1, hw in [0, 1], a decode."""
    try:
        value = VARIANT_KEYS[key](text)
    except ValueError:
        raise BenchmarkInputError(f"--backends: {key}={text} in {item!r} is not a number") from None
    if key in ("threads", "prefetch") and value < 1:
        raise BenchmarkInputError(f"--backends: {key} is at least 1, got {value} in {item!r}")
    if key == "hw" and not 0.0 <= value <= 1.0:
        raise BenchmarkInputError(f"--backends: hw is a share in [0, 1], got {value} in {item!r}")
    if key == "decode" and value not in DECODES:
        raise BenchmarkInputError(f"--backends: decode is auto, mixed or cpu ({item!r})")
    return value


def resolve_plan(variant: Variant, args, info: dist.DistInfo) -> LoaderPlan:
    """Concrete settings for one variant: its own, else the flags, else the trainer's defaults.

    The trainer's own planner fills the gaps, so "dali" with no settings measures what
    ``trainer/main.py`` would run on this machine. A plan this machine cannot run (GPU decode
    without CUDA) is refused here, before anything is measured.
    """
    plan = _plan(variant, args, info)
    if plan.decode == "mixed" and info.device.type != "cuda":
        raise BenchmarkInputError(
            f"{variant.label}: mixed decode runs on the GPU and there is no CUDA device here: "
            "use decode=cpu (or --dali-decode cpu / auto)"
        )
    return plan


def _plan(variant: Variant, args, info: dist.DistInfo) -> LoaderPlan:
    return plan_loader(
        backend=variant.backend,
        device_type=info.device.type,
        cores_per_rank=dist.cpu_threads_per_rank(info.local_world_size),
        cores_reason=dist.loader_threads_reason(info.local_world_size),
        dali_decode=variant.decode or args.dali_decode,
        threads=variant.threads if variant.threads is not None else args.workers,
        hw_decoder_load=(
            variant.hw_decoder_load if variant.hw_decoder_load is not None else args.hw_decoder_load
        ),
        prefetch=variant.prefetch if variant.prefetch is not None else args.prefetch,
        physical_cores_per_rank=dist.physical_cores_per_rank(info.local_world_size),
        model_gflops=model_gflops(args.arch),
    )


def same_settings(plans: dict[str, LoaderPlan]) -> dict[str, str]:
    """Label -> the earlier label whose loader runs with exactly the same settings, measured
    once rather than twice: e.g. on a 16-core GPU machine ``dali`` (the trainer's choice) is
    ``dali:decode=cpu:threads=16``, and with 8-15 cores ``dali:decode=mixed:hw=0.99:threads=8``."""
    first: dict[tuple, str] = {}
    same = {}
    for label, plan in plans.items():
        key = (plan.backend, plan.decode, plan.threads, plan.hw_decoder_load, plan.prefetch)
        if key in first:
            same[label] = first[key]
        else:
            first[key] = label
    return same


def queue_depth(plan: LoaderPlan) -> int:
    """Batches a loader holds ready ahead of the consumer when it runs ahead of it.

    PIL: the DataLoader keeps ``prefetch_factor`` batches in flight per worker (16 workers x 2
    = 32 batches, more than a 10-step warm-up); pil-gpu holds one more on the device. DALI:
    its prefetch queue depth.
    """
    if plan.backend == "dali":
        return plan.prefetch
    return plan.threads * plan.prefetch + (1 if plan.backend == "pil-gpu" else 0)


def warm_page_cache(paths: list[str]) -> int:
    """Read every file once so no backend pays for the disk and the first one isn't penalized."""
    total = 0
    for path in dict.fromkeys(paths):  # a repeated entry is one file
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
    return total


def write_repeated_list(samples: list[Sample], entries: int, folder: str, name: str) -> str:
    """A list of exactly ``entries`` lines cycling through ``samples``: the same images."""
    path = os.path.join(folder, name)
    write_list(path, (samples[i % len(samples)] for i in range(entries)), absolute=True)
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_epoch(loader, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``steps`` batches of epoch 0; an error if the epoch is shorter (a window
    that crossed an epoch end would time the boundary, not the steady state)."""
    loader.set_epoch(0)
    batches = iter(loader)
    for taken in range(steps):
        try:
            yield next(batches)
        except StopIteration:
            raise RuntimeError(
                f"the epoch ended after {taken} of the {steps} steps warm-up and windows need"
            ) from None


@dataclass
class Windows:
    rates: list[float]  # images/sec of each timed window, this rank
    host_data_wait_fraction: float | None  # host time blocked in next(loader) / window time
    gpu_idle_fraction: float | None  # GPU time between steps with no step queued / window time


def timed_windows(
    batches: Iterator,
    *,
    train_step: Callable | None,
    device: torch.device,
    batch_size: int,
    warmup: int,
    iters: int,
    repeats: int,
) -> Windows:
    """``warmup`` untimed steps, then ``repeats`` windows of ``iters`` steps each.

    A step pulls one batch and, given ``train_step``, trains on it. On CUDA, events recorded
    just before and just after each step's work is queued give the GPU's idle time: from the
    end of step k's work (or the window's start) to the start of step k+1's, the stream had
    nothing of the training to run. Events are read after the window's closing sync, so the
    timed loop never waits on the device.
    """

    def step() -> None:
        images, labels = next(batches)
        if train_step is not None:
            train_step(images, labels)

    for _ in range(warmup):
        step()
    use_events = device.type == "cuda" and train_step is not None
    if use_events:
        window_start = torch.cuda.Event(enable_timing=True)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    rates, waited, idle_ms, elapsed_total = [], 0.0, 0.0, 0.0
    for _ in range(repeats):
        sync(device)
        if use_events:
            window_start.record()
        start = time.perf_counter()
        for i in range(iters):
            fetch_start = time.perf_counter()
            images, labels = next(batches)
            waited += time.perf_counter() - fetch_start
            if train_step is not None:
                if use_events:
                    starts[i].record()
                train_step(images, labels)
                if use_events:
                    ends[i].record()
        sync(device)  # the window ends when the device has done the work, not when it was queued
        elapsed = time.perf_counter() - start
        elapsed_total += elapsed
        rates.append(iters * batch_size / elapsed)
        if use_events:
            idle_ms += window_start.elapsed_time(starts[0])
            idle_ms += sum(ends[i - 1].elapsed_time(starts[i]) for i in range(1, iters))
    return Windows(
        rates,
        waited / elapsed_total if train_step is not None else None,
        idle_ms / 1000.0 / elapsed_total if use_events else None,
    )


def epoch_boundaries(
    loader,
    *,
    train_step: Callable | None,
    device: torch.device,
    boundaries: int,
    steady_step_seconds: float,
) -> list[float]:
    """Seconds each epoch end costs beyond a steady step, over ``boundaries`` natural ends.

    Epoch 0 runs through untimed (the cold start is not a boundary). At each end the device
    is synchronized (as the trainer's end-of-epoch metrics do), then timed: the last
    ``next()`` that ends the epoch (DALI drops its pipeline there), ``set_epoch``, the first
    batch of the next epoch and its step, to the device's finish; minus a steady step.
    """
    steps = len(loader)
    costs = []

    def run_steps(count: int) -> None:
        for _ in range(count):
            images, labels = next(batches)
            if train_step is not None:
                train_step(images, labels)

    loader.set_epoch(0)
    batches = iter(loader)
    run_steps(steps)
    for epoch in range(1, boundaries + 1):
        sync(device)
        start = time.perf_counter()
        if next(batches, None) is not None:
            raise RuntimeError(f"the loader yielded more than len(loader) = {steps} batches")
        loader.set_epoch(epoch)
        batches = iter(loader)
        images, labels = next(batches)
        if train_step is not None:
            train_step(images, labels)
        sync(device)
        # Below zero only by noise (this step ran faster than the median steady one): 0.
        costs.append(max(0.0, time.perf_counter() - start - steady_step_seconds))
        run_steps(steps - 1)  # the rest of the epoch, so the next end is a natural one
    next(batches, None)  # ends the last epoch cleanly (DALI releases its pipeline)
    return costs


def synthetic_batches(*, args, num_classes, device, dtype) -> Iterator:
    """One fixed batch, shaped, typed and laid out exactly as the loaders deliver theirs."""
    generator = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator)
    images = images.to(device=device, dtype=dtype)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (args.batch_size,), generator=generator).to(device)
    while True:
        yield images, labels


def gather(value, info: dist.DistInfo) -> list:
    """Every rank's ``value``, on every rank (small: a few floats per rank)."""
    if info.world_size == 1:
        return [value]
    gathered: list = [None] * info.world_size
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def _mean_or_none(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else statistics.fmean(values)


def summarize(label: str, mode: str, windows_per_rank: list[Windows], extra: dict) -> dict:
    # Per-GPU figures: each window's rate averaged over ranks, then median/min/max over windows;
    # total = per-GPU x ranks, since every rank processes its own batch in each step.
    world = len(windows_per_rank)
    rates_per_rank = [w.rates for w in windows_per_rank]
    per_window = [
        statistics.fmean(r[i] for r in rates_per_rank) for i in range(len(rates_per_rank[0]))
    ]
    per_gpu = statistics.median(per_window)
    first_excess = per_window[0] / per_gpu - 1.0
    return {
        "variant": label,
        "mode": mode,
        "images_per_sec_per_gpu": per_gpu,
        "images_per_sec_per_gpu_min": min(per_window),
        "images_per_sec_per_gpu_max": max(per_window),
        "images_per_sec_total": per_gpu * world,
        "window_images_per_sec_per_gpu": per_window,
        "window_images_per_sec_per_rank": rates_per_rank,
        "first_window_above_median_percent": 100.0 * first_excess,
        "first_window_drift": first_excess > FIRST_WINDOW_DRIFT_LIMIT,
        "gap_to_ceiling_percent": None,
        "gpu_idle_fraction": _mean_or_none([w.gpu_idle_fraction for w in windows_per_rank]),
        "host_data_wait_fraction": _mean_or_none(
            [w.host_data_wait_fraction for w in windows_per_rank]
        ),
        "epoch_boundary_seconds": None,
        "epoch_boundary_seconds_each": None,
        **extra,
    }


def run(args: argparse.Namespace) -> dict:
    variants = parse_variants(args.backends)
    modes = _split(args.modes, MODES, "--modes")
    info = dist.setup_distributed(cpu_threads=args.cpu_threads)
    workdir = tempfile.mkdtemp(prefix="throughput-lists-")
    try:
        return _run(args, info, variants, modes, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        dist.cleanup_distributed()


def _resolve_list(args) -> list[Sample] | ShardTable:
    """The user's list, parsed against the class count and every file checked, before it is
    repeated or measured: a bad line or a missing image is named at its ``--list`` line.
    A shard set (``--list`` its folder, manifest or s3:// prefix) is its table, checked."""
    if args.list is None:
        from pipelines.demo import default_demo_root, ensure_demo_data

        # Generated once; ensure_demo_data holds a file lock while writing, so the other ranks
        # wait there and then find the finished tree.
        demo = ensure_demo_data(default_demo_root(), preset="default")
        args.list = demo.train_list
        dist.print0(f"no --list: using the demo data's {args.list} (photo-sized JPEGs)")
    if manifest_path(args.list) is not None:  # a shard set: its folder, manifest or prefix
        table = read_shard_table(args.list, num_classes=args.num_classes)
        if args.num_classes is None:
            args.num_classes = table.num_classes or int(table.labels.max()) + 1
        check_shards(table)
        return table
    if not paths.is_file(args.list):
        why = missing_file(args.list, "list", "no such file")
        raise BenchmarkInputError(f"--list {args.list}: {why}")
    if args.num_classes is None:
        classes_file = classes_beside(args.list)
        if classes_file:
            args.num_classes = len(read_classes(classes_file))
    samples = read_list(args.list, num_classes=args.num_classes)
    if args.num_classes is None:
        args.num_classes = max(s.label for s in samples) + 1
    # Every rank checks the whole list (one stat a file): a rank alone failing would leave
    # the others waiting at the next collective.
    check_files_exist(read_table(args.list), list_file=args.list)
    return samples


def fill_defaults(args) -> None:
    """Window defaults: long for the comparison, short for the sweep's many configurations."""
    defaults = (3, 8, 2, 0) if args.sweep else (10, 20, 3, 3)
    for name, value in zip(("warmup", "iters", "repeats", "boundaries"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)


def _run(args, info: dist.DistInfo, variants: list[Variant], modes: list[str], workdir) -> dict:
    fill_defaults(args)
    device = info.device
    plans = {v.label: resolve_plan(v, args, info) for v in variants}  # refusals first
    same = same_settings(plans)
    samples = _resolve_list(args)
    dtype = AMP_DTYPES[args.amp]
    env = report.environment()
    warmups = {label: queue_depth(plan) + args.warmup for label, plan in plans.items()}
    loader_modes = [m for m in modes if m != "synthetic"]

    # Warm-up and windows must lie inside one epoch: a window that crossed an epoch end would
    # time the boundary (queues drained, pipelines rebuilt), not the steady state.
    needed_steps = (max(warmups.values()) if loader_modes else 0) + args.repeats * args.iters
    step_samples = info.world_size * args.batch_size
    steps_per_epoch = len(samples) // step_samples
    measured_list, list_note = args.list, f"{steps_per_epoch} steps per epoch"
    entries = len(samples)

    def repeated(entries: int, name: str):
        """The same images repeated to ``entries``: a list file, or a shard set's subset."""
        if isinstance(samples, ShardTable):
            return samples.subset(np.arange(entries) % len(samples))
        return write_repeated_list(samples, entries, workdir, name)

    if loader_modes and steps_per_epoch < needed_steps:
        entries = needed_steps * step_samples
        measured_list = repeated(entries, "repeated.txt")
        list_note = (
            f"{len(samples)} entries give {steps_per_epoch} steps per epoch, fewer than the "
            f"{needed_steps} warm-up + windows need: measured on "
            f"{measured_list if isinstance(measured_list, str) else 'its samples'}, the same "
            f"images repeated to {entries} entries ({needed_steps} steps, one epoch)"
        )
    boundary_mode = "train" if "train" in modes else "loader"
    boundary_list = None
    if loader_modes and args.boundaries > 0:
        # A short epoch, so several natural epoch ends cost few steps; the images are the same.
        boundary_list = repeated(args.boundary_steps * step_samples, "boundary.txt")

    if isinstance(samples, ShardTable):
        files = [samples.shard_path(k) for k in range(len(samples.shard_names))]
    else:  # objects in a bucket have no page cache to warm (a shard set's copy does)
        files = [s.path for s in samples if not s3.is_url(s.path)]
    if args.warm_cache and info.local_rank == 0:
        warm_page_cache(files)
    dist.barrier()
    dist.print0(
        f"benchmark: {len(samples)} images from {args.list} ({list_note}), {info.world_size} "
        f"rank(s) on {device}, batch {args.batch_size}/GPU, crop {args.image_size}, amp "
        f"{args.amp}, channels_last {args.channels_last}, compile {args.compile}; page cache "
        f"{'warmed by one untimed read of every file' if args.warm_cache else 'not warmed (--no-warm-cache)'}"
    )
    if info.torch_threads is not None:
        dist.print0(f"  torch: {info.torch_threads.describe()}")
    for label, plan in plans.items():
        if label in same:
            dist.print0(f"  {label}: the same settings as {same[label]}: measured once, as that")
            continue
        dist.print0(
            f"  {label}: {plan.describe()}; warm-up {warmups[label]} steps = queue "
            f"{queue_depth(plan)} batches + --warmup {args.warmup}"
        )

    train_step = None
    if "train" in modes or "synthetic" in modes:
        train_step = build_step(
            arch=args.arch,
            num_classes=args.num_classes,
            amp=args.amp,
            channels_last=args.channels_last,
            device=device,
            seed=args.seed,
            info=info,
            compile=args.compile,
        )
        # cuDNN autotuning, the allocator's first growth and torch.compile happen here, not
        # in the first loader's warm-up (where its workers would fill their queue meanwhile).
        synthetic = synthetic_batches(
            args=args, num_classes=args.num_classes, device=device, dtype=dtype
        )
        for _ in range(max(1, args.warmup)):
            train_step(*next(synthetic))
        sync(device)

    settings = {
        "list": paths.abspath(args.list),
        "num_images": len(samples),
        "measured_list_entries": entries,
        "list_repeated": measured_list is not args.list,
        "arch": args.arch,
        "num_classes": args.num_classes,
        "batch_size_per_gpu": args.batch_size,
        "image_size": args.image_size,
        "amp": args.amp,
        "dtype": str(dtype).replace("torch.", ""),
        "channels_last": args.channels_last,
        "compile": args.compile,
        "warmup_beyond_queue": args.warmup,
        "iters": args.iters,
        "repeats": args.repeats,
        "boundaries": args.boundaries if boundary_list else 0,
        "boundary_steps_per_epoch": args.boundary_steps if boundary_list else None,
        "boundary_mode": boundary_mode if boundary_list else None,
        "world_size": info.world_size,
        "torch_threads_per_rank": info.torch_threads.threads if info.torch_threads else None,
        "device": str(device) if info.world_size == 1 else device.type,
        "page_cache_warmed": bool(args.warm_cache),
        "same_settings": same,  # items not measured: their loader is that of another item
    }
    rows: list[dict] = []
    payload = {
        "settings": settings,
        "environment": env,
        "results": rows,
        "notes": [],
        "complete": False,
    }

    def add_row(row: dict) -> None:
        rows.append(row)
        dist.print0(f"  {report.progress_line(row)}")
        if args.json and info.is_main:
            report.write_json(args.json, payload)  # after every row: a cut run keeps its rows

    # The ceiling first, right after the step's warm-up: every train row's gap (the headline)
    # needs it, and a run cut short (gpu_suite.sh's time limits) keeps it with its rows.
    ceiling = None
    if "synthetic" in modes:
        batches = synthetic_batches(
            args=args, num_classes=args.num_classes, device=device, dtype=dtype
        )
        windows = timed_windows(
            batches,
            train_step=train_step,
            device=device,
            batch_size=args.batch_size,
            warmup=args.warmup,
            iters=args.iters,
            repeats=args.repeats,
        )
        no_loader = dict.fromkeys(
            ("workers", "prefetch", "dali_decode", "hw_decoder_load", "queue_depth_batches")
        )
        ceiling_row = summarize(
            "synthetic",
            "synthetic",
            gather(windows, info),
            {"backend": "synthetic", **no_loader, "warmup_steps": args.warmup},
        )
        ceiling = ceiling_row["images_per_sec_per_gpu"]
        add_row(ceiling_row)

    loader_kwargs = dict(
        batch_size=args.batch_size,
        image_size=args.image_size,
        rank=info.rank,
        world_size=info.world_size,
        device=device,
        seed=args.seed,
        dtype=dtype,
        num_classes=args.num_classes,
    )
    for variant in variants:
        if variant.label in same:
            continue
        plan = plans[variant.label]
        options = dict(
            backend=plan.backend,
            num_threads=plan.threads,
            prefetch=plan.prefetch,
            dali_decode=plan.decode or "auto",
            dali_options=plan.dali_options(),
        )
        extra = {
            "backend": plan.backend,
            "workers": plan.threads,
            "prefetch": plan.prefetch,
            "dali_decode": plan.decode,
            "hw_decoder_load": plan.hw_decoder_load,
            "queue_depth_batches": queue_depth(plan),
            "warmup_steps": warmups[variant.label],
        }
        for mode in loader_modes:
            loader = build_loader(measured_list, train=True, **loader_kwargs, **options)
            batches = one_epoch(loader, warmups[variant.label] + args.repeats * args.iters)
            windows = timed_windows(
                batches,
                train_step=train_step if mode == "train" else None,
                device=device,
                batch_size=args.batch_size,
                warmup=warmups[variant.label],
                iters=args.iters,
                repeats=args.repeats,
            )
            batches.close()
            del batches, loader
            gc.collect()  # stop this loader's workers/pipeline before the next one starts
            row = summarize(variant.label, mode, gather(windows, info), extra)
            if mode == boundary_mode and boundary_list:
                loader = build_loader(boundary_list, train=True, **loader_kwargs, **options)
                costs = epoch_boundaries(
                    loader,
                    train_step=train_step if mode == "train" else None,
                    device=device,
                    boundaries=args.boundaries,
                    steady_step_seconds=args.batch_size / statistics.median(windows.rates),
                )
                del loader
                gc.collect()
                per_rank = gather(costs, info)
                each = [statistics.fmean(c[i] for c in per_rank) for i in range(len(costs))]
                row["epoch_boundary_seconds"] = statistics.median(each)
                row["epoch_boundary_seconds_each"] = each
            if mode == "train" and ceiling is not None:
                row["gap_to_ceiling_percent"] = 100.0 * (
                    1.0 - row["images_per_sec_per_gpu"] / ceiling
                )
            add_row(row)
    payload["notes"] = report.notes(rows)
    payload["complete"] = True
    return payload


# Bad input the project's own code reports (lists, images, values, files, outputs): one line.
BAD_INPUT = (
    BenchmarkInputError,
    OutputFileError,
    ListError,
    ImageError,
    TrainerError,
    dist.DistSetupError,  # the launch: srun's variables, the rendezvous address
    run_metrics.PlotUnavailable,
    ValueError,
    OSError,
)


def check_flags(args) -> None:
    """Everything the flags alone can refuse, before a loader or model is built: flags that
    would be ignored, outputs that exist or cannot be written, an unknown model."""
    if args.sweep:
        for name in NOT_WITH_SWEEP:
            if getattr(args, name) is not None:
                raise BenchmarkInputError(
                    f"--{name} does not apply to --sweep (the sweep chooses its own DALI "
                    "configurations and prints a ranked table): leave it out"
                )
        for name, instead in SWEPT_INSTEAD.items():
            if getattr(args, name) not in (None, "auto"):
                flag = f"--{name.replace('_', '-')}"
                raise BenchmarkInputError(
                    f"{flag} does not apply to --sweep (each configuration sets its own): "
                    f"use {instead} to choose the values swept"
                )
        if args.boundaries:
            raise BenchmarkInputError(
                "--boundaries does not apply to --sweep (it times no epoch ends): leave it out"
            )
    else:
        for name in SWEEP_ONLY:
            if getattr(args, name) is not None:
                flag = f"--{name.replace('_', '-')}"
                raise BenchmarkInputError(
                    f"{flag} applies to --sweep only: add --sweep or leave it out"
                )
        args.backends = args.backends or "pil,dali"
        args.modes = args.modes or ",".join(MODES)
        variants = parse_variants(args.backends)
        _split(args.modes, MODES, "--modes")
        # DALI's settings with no DALI row to apply to would be dropped without a word.
        dali_rows = [v for v in variants if v.backend == "dali"]
        for flag, given in (
            ("--dali-decode", args.dali_decode != "auto"),
            ("--hw-decoder-load", args.hw_decoder_load is not None),
        ):
            if given and not dali_rows:
                raise BenchmarkInputError(
                    f"{flag} sets the DALI loader, and --backends {args.backends} has no dali "
                    "item: add one, or leave the flag out"
                )
    for flag in ("json", "plot", "toml"):
        if getattr(args, flag):
            check_output_file(getattr(args, flag), overwrite=args.overwrite, flag=f"--{flag}")
    if args.plot:
        report.check_plot_available()
        run_metrics.figure_format(args.plot)
    from pipelines.torchvision_import import torchvision

    if args.arch not in torchvision.models.list_models():
        raise BenchmarkInputError(
            f"--arch {args.arch}: not a torchvision model (e.g. resnet18, resnet50, "
            "efficientnet_b0; torchvision.models.list_models() has them all)"
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with sigterm_as_exit():  # a killed run still removes its temporary lists
            check_flags(args)
            if args.sweep:
                from benchmarks import sweep  # imports this module: loaded only when asked for

                return sweep.main(args)
            return measure_and_report(args)
    except BAD_INPUT as exc:
        return error(str(exc))


def measure_and_report(args) -> int:
    payload = run(args)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print()
    print(report.header_line(payload))
    print()
    print(report.markdown_table(payload["results"]))
    print(report.loader_table(payload["results"]))
    for note in payload["notes"]:
        print(note)
    if args.json:
        report.write_json(args.json, payload)
        print(f"wrote {args.json}")
    if args.plot:
        settings, env = payload["settings"], payload["environment"]
        title = f"{settings['arch']} bs{settings['batch_size_per_gpu']} {settings['image_size']}px {settings['amp']} on {env['gpu_name'] or env['cpu_model']}"
        report.plot(args.plot, payload["results"], title=title)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    heap.freeze_startup_objects(with_dynamo=True)  # pipelines/heap.py; the optimizer wants Dynamo
    sys.exit(main())
