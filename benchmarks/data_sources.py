"""Where the data lives, side by side: files, local shards, shards in a bucket, files in a bucket.

    python benchmarks/data_sources.py                  # the demo data, a local S3 server
    python benchmarks/data_sources.py --list /data/Train.txt --s3-url s3://my-bucket/bench

The same images four ways, each read by one rank's DALI loader with the same settings:

- ``files``: the list file, one file per image on the local disk;
- ``local shards``: the list written as a shard set (``tools/make_shards.py``);
- ``s3 shards``: that set uploaded to ``--s3-url``, read as the trainer reads a set in a
  bucket: copied once into the node's cache (the copy's time and rate are reported apart),
  then read there;
- ``s3 files``: the images uploaded too, and a list of their s3:// URLs, each image one GET
  by DALI's own S3 client (what a list of URLs costs).

Without ``--s3-url`` a local S3-compatible server is started on 127.0.0.1 (moto's, from the
test extra: ``pip install 'moto[server]'``) and the standard AWS variables point at it; with
it, the bucket and credentials come from the standard AWS environment. Then, for every
source, loader-only images/s (and with ``--train`` a full training step): windows of
``--iters`` steps, taken in turn round the sources ``--repeats`` times so that the machine's
noise falls on all of them alike; the median window of each. And each source's start-up
(``build_loader`` to first batch).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.cli import ArgumentParser, error, positive_int  # noqa: E402
from pipelines.fileio import OVERWRITE_HELP, atomic_write_text, check_output_file  # noqa: E402

SOURCES = ("files", "local shards", "s3 shards", "s3 files")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--list", help="list file of the images (default: the demo data's Train.txt)")
    p.add_argument(
        "--s3-url",
        help="s3://bucket/prefix to upload the images and shards to (default: a local "
        "S3 server started for the run, on 127.0.0.1)",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=32, help="images per step (default: %(default)s)"
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
        "--iters", type=positive_int, default=10, help="steps per window (default: %(default)s)"
    )
    p.add_argument(
        "--repeats", type=positive_int, default=5, help="windows per source (default: %(default)s)"
    )
    p.add_argument(
        "--warmup", type=positive_int, default=3, help="untimed steps first (default: %(default)s)"
    )
    p.add_argument(
        "--shard-size", default="16MB", help="shard size of the set written (default: %(default)s)"
    )
    p.add_argument(
        "--train", action="store_true", help="also time a full training step (default: loader only)"
    )
    p.add_argument("--arch", default="resnet18", help="model of --train (default: %(default)s)")
    p.add_argument("--json", help="also write settings and results here (default: none)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    return p


def local_s3_server() -> subprocess.Popen:
    """moto's S3 server on a free port of 127.0.0.1; the AWS variables of this process point
    boto3 and DALI's client at it."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or "moto_server"
    try:
        server = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    except FileNotFoundError:
        raise SystemExit(
            "error: no --s3-url, and no moto_server to start a local one: pip install "
            "'moto[server]', or give --s3-url s3://bucket/prefix"
        ) from None
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )  # fmt: skip
    return server


def prepare(args, work: str) -> dict:
    """The four sources of the same images: {name: what build_loader takes}, and the
    copy's figures."""
    from pipelines import s3
    from pipelines.lists import read_table, write_list
    from pipelines.shards import make_shards, parse_size, read_shard_table

    table = read_table(args.list)
    local_set = os.path.join(work, "shards")
    make_shards(
        args.list, out_dir=local_set, shard_bytes=parse_size(args.shard_size), workers=args.threads
    )
    url = args.s3_url.rstrip("/")
    bucket, _ = s3.split(url)
    client = s3.client()
    with contextlib.suppress(Exception):  # there already: a real bucket of the user's
        client.create_bucket(Bucket=bucket)

    paths = table.paths()
    urls = [s3.join(url, "images", f"{i:08d}{os.path.splitext(p)[1]}") for i, p in enumerate(paths)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda pair: s3.upload(*pair), zip(paths, urls, strict=True)))
        names = os.listdir(local_set)
        list(
            pool.map(
                lambda n: s3.upload(os.path.join(local_set, n), s3.join(url, "shards", n)), names
            )
        )
    url_list = os.path.join(work, "urls.txt")
    write_list(url_list, zip(urls, table.labels.tolist(), strict=True), absolute=True)
    os.environ["DALI_RESNET_TRAINER_CACHE"] = os.path.join(work, "cache")
    start = time.perf_counter()
    read_shard_table(s3.join(url, "shards"))  # the one copy into the node's cache
    copy_s = time.perf_counter() - start
    set_bytes = sum(os.path.getsize(os.path.join(local_set, n)) for n in os.listdir(local_set))
    return {
        "sources": {
            "files": args.list,
            "local shards": local_set,
            "s3 shards": s3.join(url, "shards"),
            "s3 files": url_list,
        },
        "copy_s": copy_s,
        "set_mb": set_bytes / 1e6,
    }


def repeated(source: str, entries: int):
    """``source`` read as a table, its samples repeated to ``entries`` (windows inside one
    epoch: an epoch's end would be timed, not the steady state)."""
    import numpy as np

    from pipelines.lists import read_table
    from pipelines.shards import manifest_path, read_shard_table

    table = read_shard_table(source) if manifest_path(source) is not None else read_table(source)
    order = np.arange(entries) % len(table)
    if hasattr(table, "subset"):
        return table.subset(order)
    from pipelines.lists import SampleTable

    paths = table.paths()
    return SampleTable.from_pairs([paths[i] for i in order], table.labels[order].tolist())


def measure(args, sources: dict) -> dict:
    import torch

    from benchmarks.throughput import timed_windows
    from pipelines import build_loader
    from trainer import dist
    from trainer.engine import build_step

    modes = ["loader"] + (["train"] if args.train else [])
    # Every window of every mode inside one pass: an epoch's end would be timed too.
    steps = len(modes) * (args.warmup + 1 + args.iters * args.repeats) + 2
    loaders, batches, startup = {}, {}, {}
    for name, source in sources.items():
        table = repeated(source, steps * args.batch_size)
        start = time.perf_counter()
        loader = build_loader(
            table, train=True, backend="dali", batch_size=args.batch_size,
            image_size=args.image_size, num_threads=args.threads, seed=0,
        )  # fmt: skip
        loader.set_epoch(0)
        batches[name] = iter(loader)
        next(batches[name])
        startup[name] = time.perf_counter() - start
        loaders[name] = loader
    info = dist.DistInfo(
        rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"),
        is_main=True,
    )  # fmt: skip
    results: dict = {name: {"startup_s": startup[name]} for name in sources}
    for mode in modes:
        step = None
        if mode == "train":
            num_classes = max(int(loader.table.labels.max()) for loader in loaders.values()) + 1
            step = build_step(
                arch=args.arch, num_classes=num_classes, amp="bf16", channels_last=True,
                device=torch.device("cpu"), seed=0, info=info,
            )  # fmt: skip
        rates: dict[str, list[float]] = {name: [] for name in sources}
        for name in sources:  # warm-up, each source once
            timed_windows(batches[name], train_step=step, device=torch.device("cpu"),
                          batch_size=args.batch_size, warmup=args.warmup, iters=1, repeats=1)  # fmt: skip
        for _ in range(args.repeats):  # round the sources: the noise falls on each alike
            for name in sources:
                window = timed_windows(
                    batches[name], train_step=step, device=torch.device("cpu"),
                    batch_size=args.batch_size, warmup=0, iters=args.iters, repeats=1,
                )  # fmt: skip
                rates[name] += window.rates
        for name in sources:
            results[name][f"{mode}_images_per_sec"] = statistics.median(rates[name])
            results[name][f"{mode}_windows"] = rates[name]
    return results


def markdown(results: dict, prepared: dict, args) -> str:
    base = results["files"]
    lines = [
        f"DALI loader, batch {args.batch_size}, {args.image_size} px, {args.threads} threads, CPU; "
        f"median of {args.repeats} windows of {args.iters} steps, taken in turn",
        "",
        "| source | loader img/s | vs files | "
        + ("train step img/s | " if args.train else "")
        + "build_loader to first batch (s) |",
        "|---|---:|---:|" + ("---:|" if args.train else "") + "---:|",
    ]
    for name, row in results.items():
        cells = [
            f"{row['loader_images_per_sec']:,.0f}",
            f"{row['loader_images_per_sec'] / base['loader_images_per_sec']:.2f}",
        ]
        if args.train:
            cells.append(f"{row['train_images_per_sec']:,.1f}")
        cells.append(f"{row['startup_s']:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"s3 shards: the set ({prepared['set_mb']:,.0f} MB) copied into the node's cache once, "
        f"in {prepared['copy_s']:.1f} s ({prepared['set_mb'] / max(prepared['copy_s'], 1e-9):,.0f} "
        "MB/s), before the figures above",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.json:
        try:
            check_output_file(args.json, overwrite=args.overwrite, flag="--json")
        except ValueError as e:
            return error(str(e))
    if args.list is None:
        from pipelines.demo import default_demo_root, ensure_demo_data

        args.list = ensure_demo_data(default_demo_root(), preset="default").train_list
    server = None
    if args.s3_url is None:
        server = local_s3_server()
        args.s3_url = "s3://data-sources-bench"
    work = tempfile.mkdtemp(prefix="data_sources_")
    cache = os.environ.get("DALI_RESNET_TRAINER_CACHE")
    try:
        prepared = prepare(args, work)
        results = measure(args, prepared["sources"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if server is not None:
            server.terminate()
        if cache is None:  # the run's own cache, in its work folder, is gone
            os.environ.pop("DALI_RESNET_TRAINER_CACHE", None)
        else:
            os.environ["DALI_RESNET_TRAINER_CACHE"] = cache
    print(markdown(results, prepared, args))
    if args.json:
        settings = vars(args)
        payload = {
            "settings": settings,
            "copy_s": prepared["copy_s"],
            "set_mb": prepared["set_mb"],
            "results": results,
        }
        atomic_write_text(args.json, json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
