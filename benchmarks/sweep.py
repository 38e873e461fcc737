"""``throughput.py --sweep``: DALI's settings measured on the user's own list and machine.

Train-mode throughput (the trainer's step fed by DALI) over decode placement (mixed = GPU,
cpu) x hw_decoder_load (mixed only) x threads x prefetch, each configuration in short windows,
all in one process (one model, one warmed page cache), plus the synthetic ceiling; then a
ranked table and the winner as trainer flags and as TOML for ``trainer/main.py --config``.

    python benchmarks/throughput.py --sweep --list /data/Train.txt --batch-size 256 \\
        --toml best_loader.toml
"""

from __future__ import annotations

import os
import sys
import time

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import report, throughput  # noqa: E402
from benchmarks.cli import BenchmarkInputError  # noqa: E402
from pipelines.fileio import atomic_write_text  # noqa: E402
from trainer import dist  # noqa: E402
from trainer.config import flag_name, to_toml  # noqa: E402

# The winner's settings under the trainer's Config field names (TOML keys; flags derived).
TOML_KEYS = ("loader", "workers", "dali_decode", "dali_hw_decoder_load", "prefetch")
DEFAULT_HW_DECODER_LOADS = "0.65,0.8,0.99"
DEFAULT_PREFETCH = "2,3"


def _list_of(text: str, kind: type, flag: str, *, low=None, high=None) -> list:
    """Comma-separated values of ``kind`` within [low, high], each once."""
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchmarkInputError(
            f"{flag} takes comma-separated {kind.__name__}s; got {text!r}"
        ) from None
    if not values:
        raise BenchmarkInputError(f"{flag} is empty")
    bad = [v for v in values if (low is not None and v < low) or (high is not None and v > high)]
    if bad:
        bounds = f"at least {low}" if high is None else f"within [{low}, {high}]"
        raise BenchmarkInputError(f"{flag}: every value must be {bounds}; got {bad}")
    return list(dict.fromkeys(values))


def default_threads(cores_per_gpu: int) -> list[int]:
    """4 and 8 where the cores allow, and every core the GPU gets; two choices at least."""
    threads = [t for t in (4, 8) if t < cores_per_gpu] + [cores_per_gpu]
    if len(threads) == 1 and cores_per_gpu > 1:
        threads.insert(0, max(1, cores_per_gpu // 2))
    return threads


def configurations(args, *, cuda: bool, cores_per_gpu: int) -> list[str]:
    """The grid as ``--backends`` items, e.g. ``dali:decode=mixed:hw=0.99:threads=8:prefetch=2``."""
    decodes = _list_of(args.sweep_decode or ("mixed,cpu" if cuda else "cpu"), str, "--sweep-decode")
    bad = [d for d in decodes if d not in ("mixed", "cpu")]
    if bad:
        raise BenchmarkInputError(f"--sweep-decode takes mixed and/or cpu; got {bad}")
    if "mixed" in decodes and not cuda:
        raise BenchmarkInputError("--sweep-decode mixed decodes on the GPU: no CUDA device here")
    loads = _list_of(
        args.sweep_hw_decoder_load or DEFAULT_HW_DECODER_LOADS,
        float,
        "--sweep-hw-decoder-load",
        low=0.0,
        high=1.0,
    )
    threads = (
        _list_of(args.sweep_threads, int, "--sweep-threads", low=1)
        if args.sweep_threads
        else default_threads(cores_per_gpu)
    )
    prefetches = _list_of(args.sweep_prefetch or DEFAULT_PREFETCH, int, "--sweep-prefetch", low=1)
    specs = []
    for decode in decodes:
        # The hardware decoder's share means nothing to CPU decode: one value, not a grid.
        for load in loads if decode == "mixed" else [None]:
            for thread_count in threads:
                for prefetch in prefetches:
                    spec = f"dali:decode={decode}"
                    spec += f":hw={load:g}" if load is not None else ""
                    spec += f":threads={thread_count}:prefetch={prefetch}"
                    specs.append(spec)
    return specs


def best_settings(row: dict) -> dict:
    """The winner under the trainer's Config field names."""
    values = {
        "loader": "dali",
        "workers": row["workers"],
        "dali_decode": row["dali_decode"],
        "dali_hw_decoder_load": row["hw_decoder_load"],
        "prefetch": row["prefetch"],
    }
    return {key: values[key] for key in TOML_KEYS if values[key] is not None}


def as_flags(settings: dict) -> str:
    return " ".join(f"{flag_name(key)} {value}" for key, value in settings.items())


def ranked_table(ranked: list[dict]) -> str:
    header = (
        "| rank | decode | threads | hw_decoder_load | prefetch | train img/s per GPU "
        "| windows | gap to ceiling | GPU idle |\n"
        "|---:|---|---:|---:|---:|---:|---|---:|---:|\n"
    )
    lines = []
    for rank, row in enumerate(ranked, 1):
        gap = row["gap_to_ceiling_percent"]
        hw = row["hw_decoder_load"]
        idle = row["gpu_idle_fraction"]
        lines.append(
            f"| {rank} | {row['dali_decode']} | {row['workers']} "
            f"| {'-' if hw is None else f'{hw:g}'} | {row['prefetch']} "
            f"| {row['images_per_sec_per_gpu']:,.1f} | {report.windows_cell(row)} "
            f"| {'-' if gap is None else f'{gap:.1f}%'} "
            f"| {'n/a' if idle is None else f'{100 * idle:.1f}%'} |"
        )
    return header + "\n".join(lines) + "\n"


def main(args) -> int:
    cuda = torch.cuda.is_available()
    cores_per_gpu = dist.cpu_threads_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    specs = configurations(args, cuda=cuda, cores_per_gpu=cores_per_gpu)
    args.backends = ",".join(specs)
    args.modes = "train,synthetic"
    throughput.fill_defaults(args)
    dist.print0(
        f"sweep: {len(specs)} DALI configurations, train mode, each: queue depth + "
        f"{args.warmup} warm-up steps, then {args.repeats} windows x {args.iters} steps"
    )
    start = time.perf_counter()
    payload = throughput.run(args)
    elapsed = time.perf_counter() - start
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    trained = [r for r in payload["results"] if r["mode"] == "train"]
    ranked = sorted(trained, key=lambda r: r["images_per_sec_per_gpu"], reverse=True)
    ceiling = next(r for r in payload["results"] if r["mode"] == "synthetic")
    best = best_settings(ranked[0])
    toml = to_toml(best)
    flags = as_flags(best)
    print()
    print(report.header_line(payload))
    print()
    print(ranked_table(ranked))
    print(
        f"synthetic ceiling: {ceiling['images_per_sec_per_gpu']:,.1f} img/s per GPU. "
        f"{len(specs)} configurations in {elapsed:.0f} s ({elapsed / len(specs):.1f} s each, "
        "model build and ceiling included)."
    )
    for note in payload["notes"]:  # the ceiling row included: a rank above it is noise
        print(note)
    top_three = ",".join(r["variant"] for r in ranked[:3])
    print(
        "Short windows: differences of a few percent are noise. To confirm, compare the top "
        "three with full windows:\n"
        f"  python benchmarks/throughput.py --modes train,synthetic --backends {top_three} "
        f"--list {payload['settings']['list']} --arch {args.arch} --batch-size {args.batch_size} "
        f"--image-size {args.image_size} --amp {args.amp}"
    )
    print()
    print(f"best: trainer flags   {flags}")
    print("best: TOML for trainer/main.py --config:")
    print(toml)
    payload["sweep"] = {
        "configurations": len(specs),
        "seconds": elapsed,
        "ranked": [r["variant"] for r in ranked],
        "best": best,
        "best_trainer_flags": flags,
        "best_toml": toml,
    }
    if args.toml:
        text = toml_file_text(report.header_line(payload), payload["notes"], toml)
        atomic_write_text(args.toml, text)
        print(f"wrote {args.toml}")
    if args.json:
        report.write_json(args.json, payload)
        print(f"wrote {args.json}")
    return 0


def toml_file_text(header_line: str, notes: list[str], toml: str) -> str:
    """The --toml file: how it was measured, and the notes of the run (a busy machine's
    figures, a first window not in steady state) as comments, so a file read weeks later
    still says when its choice rests on figures that cannot be trusted."""
    lines = [
        "# Loader settings measured best by benchmarks/throughput.py --sweep",
        f"# {header_line}",
    ]
    lines += [f"# {note}" for note in notes]
    return "\n".join(lines) + "\n" + toml


if __name__ == "__main__":
    sys.exit(throughput.main([*sys.argv[1:], "--sweep"]))
