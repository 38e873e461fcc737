"""Images/sec per GPU: the DALI pipelines against the PIL DataLoader baseline.

    python benchmarks/throughput.py                       # demo data, every backend and mode
    torchrun --nproc_per_node=8 benchmarks/throughput.py --list /data/Train.txt --json out.json

Three figures per backend, each the median of ``--repeats`` timed windows of ``--iters`` steps
after ``--warmup`` untimed steps, the device synchronized at both ends of every window:

- ``loader``: the input pipeline alone, batches landing on the device;
- ``train``: the trainer's own step (``trainer.engine.train_step``) fed by that loader;
- ``synthetic``: the same step on one batch already on the device: the ceiling. The gap between
  ``train`` and ``synthetic`` is what the loader costs the training.

Every backend gets the same list, batch size, crop size, dtype, layout, device and CPU budget
(PIL workers = DALI threads, printed). The page cache is warmed by one untimed read of every file.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch

if __package__ in (None, ""):
    # `python benchmarks/throughput.py` puts benchmarks/ first on sys.path; the project root
    # must come first so `benchmarks.report` resolves even without the editable install.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import report  # noqa: E402
from pipelines import build_loader  # noqa: E402
from pipelines.lists import classes_beside, read_classes, read_list  # noqa: E402
from trainer import dist  # noqa: E402
from trainer.engine import build_step  # noqa: E402

BACKENDS = ("pil", "pil-gpu", "dali")
MODES = ("loader", "train", "synthetic")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--list",
        default=None,
        help="list file to read (default: the demo data's Train.txt, photo-sized JPEGs, generated once)",
    )
    p.add_argument(
        "--backends",
        default="pil,dali",
        help="comma-separated loaders to measure: pil (torchvision recipe), pil-gpu (uint8 batches normalized on the device), dali [default: pil,dali]",
    )
    p.add_argument(
        "--modes",
        default="loader,train,synthetic",
        help="comma-separated: loader, train, synthetic [default: all three]",
    )
    p.add_argument("--arch", default="resnet50", help="torchvision model name [default: resnet50]")
    p.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classes of the head (default: classes.txt beside the list, else the largest label + 1)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="images per GPU (per rank) per step [default: 64]",
    )
    p.add_argument("--image-size", type=int, default=224, help="crop side, pixels [default: 224]")
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
        "--workers",
        type=int,
        default=None,
        help="PIL workers = DALI threads per GPU (default: usable cores / GPUs on this node)",
    )
    p.add_argument(
        "--dali-decode",
        choices=("auto", "mixed", "cpu"),
        default="auto",
        help="DALI decode: mixed (GPU), cpu, or auto = mixed on CUDA [default: auto]",
    )
    p.add_argument(
        "--warmup", type=int, default=10, help="untimed steps before the windows [default: 10]"
    )
    p.add_argument("--iters", type=int, default=20, help="steps per timed window [default: 20]")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed windows; median, min and max are reported [default: 3]",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of loaders and model [default: 0]")
    p.add_argument(
        "--json",
        default=None,
        help="write every figure and the environment to this JSON file [default: none]",
    )
    p.add_argument(
        "--plot",
        default=None,
        help="write a PNG bar chart here (needs matplotlib: pip install -e '.[plot]') [default: none]",
    )
    p.add_argument(
        "--no-warm-cache",
        dest="warm_cache",
        action="store_false",
        help="skip the untimed read of every file before measuring [default: the cache is warmed]",
    )
    return p


def _split(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise SystemExit(
            f"error: {flag} takes a comma-separated subset of {','.join(allowed)}; got {text!r}"
        )
    return items


def warm_page_cache(paths: list[str]) -> int:
    """Read every file once so no backend pays for the disk and the first one isn't penalized."""
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
    return total


def endless(loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches across epoch ends, so a window never stops at the end of a small list."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_windows(
    step: Callable[[], float],
    *,
    device: torch.device,
    batch_size: int,
    warmup: int,
    iters: int,
    repeats: int,
) -> tuple[list[float], float]:
    """Images/sec of each window and the fraction of host time spent waiting for data.

    ``step`` runs one step and returns the seconds it spent waiting for its batch.
    """
    for _ in range(warmup):
        step()
    sync(device)
    rates, waited, elapsed_total = [], 0.0, 0.0
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            waited += step()
        sync(device)  # the window ends when the device has done the work, not when it was queued
        elapsed = time.perf_counter() - start
        elapsed_total += elapsed
        rates.append(iters * batch_size / elapsed)
    return rates, waited / elapsed_total


def measure(batches: Iterator, *, train_step=None, device, args) -> tuple[list[float], float]:
    """Window rates of pulling batches (loader mode) or of training on them (train_step)."""

    def step() -> float:
        start = time.perf_counter()
        images, labels = next(batches)
        waited = time.perf_counter() - start
        if train_step is not None:
            train_step(images, labels)
        return waited

    return timed_windows(
        step,
        device=device,
        batch_size=args.batch_size,
        warmup=args.warmup,
        iters=args.iters,
        repeats=args.repeats,
    )


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


def gather_rates(rates: list[float], info: dist.DistInfo) -> list[list[float]]:
    """Every rank's window rates, on every rank (small: repeats floats per rank)."""
    if info.world_size == 1:
        return [rates]
    gathered: list[list[float] | None] = [None] * info.world_size
    torch.distributed.all_gather_object(gathered, rates)
    return [list(r) for r in gathered]


def summarize(
    backend: str, mode: str, rates_per_rank: list[list[float]], data_wait: float | None, extra: dict
) -> dict:
    # Per-GPU figures: each window's rate averaged over ranks, then median/min/max over windows;
    # total = per-GPU x ranks, since every rank processes its own batch in each step.
    world = len(rates_per_rank)
    per_window = [
        statistics.fmean(r[i] for r in rates_per_rank) for i in range(len(rates_per_rank[0]))
    ]
    per_gpu = statistics.median(per_window)
    return {
        "backend": backend,
        "mode": mode,
        "images_per_sec_per_gpu": per_gpu,
        "images_per_sec_per_gpu_min": min(per_window),
        "images_per_sec_per_gpu_max": max(per_window),
        "images_per_sec_total": per_gpu * world,
        "window_images_per_sec_per_gpu": per_window,
        "window_images_per_sec_per_rank": rates_per_rank,
        "data_wait_fraction": data_wait,
        "gap_to_ceiling_percent": None,
        **extra,
    }


def run(args: argparse.Namespace) -> dict:
    backends = _split(args.backends, BACKENDS, "--backends")
    modes = _split(args.modes, MODES, "--modes")
    if args.plot:
        report.check_plot_available()
    info = dist.setup_distributed()
    try:
        return _run(args, info, backends, modes)
    finally:
        dist.cleanup_distributed()


def _run(args, info: dist.DistInfo, backends: list[str], modes: list[str]) -> dict:
    device = info.device
    if args.list is None:
        from pipelines.demo import default_demo_root, ensure_demo_data

        # Generated once; ensure_demo_data holds a file lock while writing, so the other ranks
        # wait there and then find the finished tree.
        demo = ensure_demo_data(default_demo_root(), preset="default")
        args.list = demo.train_list
        dist.print0(f"no --list: using the demo data's {args.list} (photo-sized JPEGs)")
    samples = read_list(args.list)
    if args.num_classes is None:
        classes_file = classes_beside(args.list)
        args.num_classes = (
            len(read_classes(classes_file)) if classes_file else max(s.label for s in samples) + 1
        )
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = args.workers or max(1, cores // local_world)
    dtype = AMP_DTYPES[args.amp]

    if args.warm_cache and info.local_rank == 0:
        warm_page_cache([s.path for s in samples])
    dist.barrier()
    dist.print0(
        f"benchmark: {len(samples)} images from {args.list}, {info.world_size} rank(s) on {device}, "
        f"batch {args.batch_size}/GPU, crop {args.image_size}, amp {args.amp}, channels_last "
        f"{args.channels_last}; PIL workers = DALI threads = {workers} per GPU; page cache "
        f"{'warmed by one untimed read of every file' if args.warm_cache else 'not warmed (--no-warm-cache)'}"
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
        )

    rows: list[dict] = []
    loader_kwargs = dict(
        batch_size=args.batch_size,
        image_size=args.image_size,
        rank=info.rank,
        world_size=info.world_size,
        device=device,
        num_threads=workers,
        seed=args.seed,
        dtype=dtype,
        num_classes=args.num_classes,
        dali_decode=args.dali_decode,
    )
    for backend in backends:
        extra = {"workers": workers, "dali_decode": args.dali_decode if backend == "dali" else None}
        for mode in [m for m in modes if m != "synthetic"]:
            loader = build_loader(args.list, train=True, backend=backend, **loader_kwargs)
            if mode == "loader":
                rates, wait = measure(endless(loader), device=device, args=args)
                wait = None  # waiting is all a loader-only window does
            else:
                rates, wait = measure(
                    endless(loader), train_step=train_step, device=device, args=args
                )
            rows.append(summarize(backend, mode, gather_rates(rates, info), wait, extra))
            dist.print0(
                f"  {backend:>5} {mode:<9} {rows[-1]['images_per_sec_per_gpu']:10.1f} img/s per GPU"
            )
            del loader
    if "synthetic" in modes:
        batches = synthetic_batches(
            args=args, num_classes=args.num_classes, device=device, dtype=dtype
        )
        rates, wait = measure(batches, train_step=train_step, device=device, args=args)
        rows.append(
            summarize(
                "synthetic",
                "synthetic",
                gather_rates(rates, info),
                None,
                {"workers": None, "dali_decode": None},
            )
        )
        dist.print0(
            f"  {'-':>5} {'synthetic':<9} {rows[-1]['images_per_sec_per_gpu']:10.1f} img/s per GPU"
        )
        ceiling = rows[-1]["images_per_sec_per_gpu"]
        for row in rows:
            if row["mode"] == "train":
                row["gap_to_ceiling_percent"] = 100.0 * (
                    1.0 - row["images_per_sec_per_gpu"] / ceiling
                )

    settings = {
        "list": os.path.abspath(args.list),
        "num_images": len(samples),
        "arch": args.arch,
        "num_classes": args.num_classes,
        "batch_size_per_gpu": args.batch_size,
        "image_size": args.image_size,
        "amp": args.amp,
        "dtype": str(dtype).replace("torch.", ""),
        "channels_last": args.channels_last,
        "workers_per_gpu": workers,
        "dali_decode": args.dali_decode,
        "warmup": args.warmup,
        "iters": args.iters,
        "repeats": args.repeats,
        "world_size": info.world_size,
        "device": str(device) if info.world_size == 1 else device.type,
        "page_cache_warmed": bool(args.warm_cache),
    }
    return {"settings": settings, "environment": report.environment(), "results": rows}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    payload = run(args)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    settings, env = payload["settings"], payload["environment"]
    print()
    print(
        f"{settings['arch']}, batch {settings['batch_size_per_gpu']}/GPU, crop {settings['image_size']}, "
        f"amp {settings['amp']}, {settings['world_size']} x {env['gpu_name'] or 'CPU'} "
        f"({env['cpu_count']} CPUs: {env['cpu_model']}), {settings['workers_per_gpu']} PIL workers = DALI threads per GPU, "
        f"median of {settings['repeats']} windows x {settings['iters']} steps after {settings['warmup']} warm-up"
    )
    print()
    print(report.markdown_table(payload["results"]))
    if args.json:
        report.write_json(args.json, payload)
        print(f"wrote {args.json}")
    if args.plot:
        title = f"{settings['arch']} bs{settings['batch_size_per_gpu']} {settings['image_size']}px {settings['amp']} on {env['gpu_name'] or env['cpu_model']}"
        report.plot(args.plot, payload["results"], title=title)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
