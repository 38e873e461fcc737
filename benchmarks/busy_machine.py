"""CPU runs on a busy machine: the trainer, throughput.py and predict.py, quiet and beside busy
processes, with the automatic torch threads and with a fixed count, side by side.

    python benchmarks/busy_machine.py                    # 1 busy process, 1 round
    python benchmarks/busy_machine.py --busy 1 --rounds 2 --json busy.json

A busy process is ``python -c "while True: pass"``: one core kept busy, as a browser tab, a
compile or a CI runner's neighbour keeps one. Each tool runs as a user runs it, in a process
of its own, on the demo data (generated once, as by the README's first command):

- trainer: the README's first command with ``--epochs 1``; figure: the epoch's img/s;
- throughput: ``throughput.py --backends dali --modes train`` at the demo's sizes; the train
  row's median img/s;
- predict: ``predict.py`` of the trainer's model over the demo's val folder; its img/s.

Each variant appends its flags to all three: ``auto`` none (the threads the tools choose),
``fixed`` ``--cpu-threads`` = the usable cores (every core, what they ran before they looked
at the load). The runs go round tool x variant x (quiet, busy) ``--rounds`` times, so the
machine's own noise falls on all alike; the median of each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.cli import ArgumentParser, error, non_negative_int, positive_int  # noqa: E402
from pipelines.fileio import (  # noqa: E402
    OVERWRITE_HELP,
    OutputFileError,
    atomic_write_text,
    check_output_file,
)
from trainer.dist import usable_cpus  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = ("trainer", "throughput", "predict")
BUSY_CODE = "while True: pass"
# Seconds a tool may take; a run past it is a failure, not a figure.
RUN_LIMIT_S = 900


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--busy",
        type=positive_int,
        default=1,
        help="busy processes beside the busy runs, one core each (default: %(default)s)",
    )
    p.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        help="rounds of every tool x variant x load; the median is reported (default: %(default)s)",
    )
    p.add_argument(
        "--tools",
        default=",".join(TOOLS),
        help=f"which of {', '.join(TOOLS)} to run, comma-separated (default: all)",
    )
    p.add_argument(
        "--fixed-threads",
        type=non_negative_int,
        default=None,
        help="the 'fixed' variant's --cpu-threads; 0 leaves that variant out (default: the "
        "usable cores, what the tools ran before they looked at the load)",
    )
    p.add_argument("--json", default=None, help="write every run and the table to this file")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    return p


@contextlib.contextmanager
def busy_processes(count: int):
    """``count`` processes spinning on a core each, for the length of the block."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_CODE]) for _ in range(count)]
    try:
        time.sleep(0.5)  # running, and seen by the scheduler, before the tool starts
        yield
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def run_tool(argv: list[str], label: str) -> str:
    """Run one tool to the end; its output, or an error naming the run and its last lines."""
    done = subprocess.run(
        [sys.executable, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_LIMIT_S,
    )
    output = done.stdout + done.stderr
    if done.returncode != 0:
        tail = " | ".join(output.strip().splitlines()[-3:])
        raise RuntimeError(f"{label} exited with {done.returncode}: {tail}")
    return output


def torch_threads_of(output: str) -> int | None:
    """The torch threads a tool said it ran: 'torch: N thread(s)' or '..., torch N, ...'."""
    found = re.search(r"torch:? (\d+)\b", output)
    return int(found.group(1)) if found else None


def measure(tool: str, flags: list[str], workdir: str, label: str) -> dict:
    """One run of ``tool`` with ``flags``: its img/s and torch threads."""
    out = tempfile.mkdtemp(dir=workdir)
    if tool == "trainer":
        run_dir = os.path.join(out, "run")
        argv = ["trainer/main.py", "--epochs", "1", "--output-dir", run_dir, *flags]
        output = run_tool(argv, label)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            rate = json.loads(f.readline())["images_per_sec_per_gpu"]
        # The model predict.py reads: any trained run will do.
        model = os.path.join(workdir, "model")
        if not os.path.exists(model):
            shutil.copytree(run_dir, model)
    elif tool == "throughput":
        record = os.path.join(out, "throughput.json")
        argv = [
            "benchmarks/throughput.py", "--backends", "dali", "--modes", "train",
            "--arch", "resnet18", "--batch-size", "32", "--image-size", "64", "--warmup", "3",
            "--iters", "6", "--repeats", "3", "--boundaries", "0", "--json", record, *flags,
        ]  # fmt: skip
        output = run_tool(argv, label)
        with open(record) as f:
            rows = json.load(f)["results"]
        rate = next(r["images_per_sec_per_gpu"] for r in rows if r["mode"] == "train")
    else:
        model = os.path.join(workdir, "model")
        val = os.path.join(ROOT, "data", "demo", "val")
        output = run_tool(["tools/predict.py", "--model", model, val, *flags], label)
        rate = float(re.search(r"images in [\d.]+ s: (\d+) img/s", output).group(1))
    return {"images_per_sec": float(rate), "torch_threads": torch_threads_of(output)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tools = [t for t in args.tools.split(",") if t]
    unknown = [t for t in tools if t not in TOOLS]
    if unknown or not tools:
        return error(f"--tools {args.tools!r}: choose from {', '.join(TOOLS)}")
    if "predict" in tools and "trainer" not in tools:
        tools.insert(0, "trainer")  # predict reads the model the trainer's run writes
    if args.json:
        try:
            check_output_file(args.json, overwrite=args.overwrite, flag="--json")
        except OutputFileError as exc:
            return error(str(exc))
    fixed = usable_cpus() if args.fixed_threads is None else args.fixed_threads
    variants = {"auto": []}
    if fixed:
        variants[f"fixed {fixed}"] = ["--cpu-threads", str(fixed)]
    print(
        f"busy_machine: {', '.join(tools)} x {', '.join(variants)} x quiet / {args.busy} busy "
        f"process(es), {args.rounds} round(s), on {usable_cpus()} usable cores",
        flush=True,
    )
    runs: list[dict] = []
    workdir = tempfile.mkdtemp(prefix="busy-machine-")
    try:
        for round_index in range(args.rounds):
            for tool in tools:
                for variant, flags in variants.items():
                    for load in ("quiet", "busy"):
                        label = f"{tool} {variant} {load}"
                        busy = args.busy if load == "busy" else 0
                        with busy_processes(busy):
                            result = measure(tool, flags, workdir, label)
                        result.update(round=round_index, tool=tool, variant=variant, load=load)
                        runs.append(result)
                        print(
                            f"  {label}: {result['images_per_sec']:.1f} img/s "
                            f"(torch threads: {result['torch_threads']})",
                            flush=True,
                        )
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
        return error(str(exc))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = table_rows(runs, tools, list(variants))
    print("\n" + markdown(rows, args.busy))
    if args.json:
        payload = {
            "command": " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
            "usable_cores": usable_cpus(),
            "busy_processes": args.busy,
            "rounds": args.rounds,
            "rows": rows,
            "runs": runs,
        }
        atomic_write_text(args.json, json.dumps(payload, indent=2) + "\n")
    return 0


def table_rows(runs: list[dict], tools: list[str], variants: list[str]) -> list[dict]:
    """Per tool and variant: median quiet and busy img/s, busy / quiet, and quiet against
    the first variant's quiet (what the automatic choice costs or saves on a quiet machine)."""
    rows = []
    for tool in tools:
        first_quiet = None
        for variant in variants:
            mine = [r for r in runs if r["tool"] == tool and r["variant"] == variant]
            quiet = statistics.median(r["images_per_sec"] for r in mine if r["load"] == "quiet")
            busy = statistics.median(r["images_per_sec"] for r in mine if r["load"] == "busy")
            first_quiet = quiet if first_quiet is None else first_quiet
            threads = {
                load: sorted({r["torch_threads"] for r in mine if r["load"] == load})
                for load in ("quiet", "busy")
            }
            rows.append({
                "tool": tool, "variant": variant, "quiet": quiet, "busy": busy,
                "busy_over_quiet": busy / quiet, "quiet_over_first": quiet / first_quiet,
                "torch_threads": threads,
            })  # fmt: skip
    return rows


def markdown(rows: list[dict], busy: int) -> str:
    lines = [
        f"| tool | torch threads | quiet img/s | {busy} busy: img/s | busy / quiet | quiet / "
        "auto's quiet | threads run (quiet; busy) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        threads = "; ".join(
            "/".join(str(t) for t in row["torch_threads"][load]) for load in ("quiet", "busy")
        )
        lines.append(
            f"| {row['tool']} | {row['variant']} | {row['quiet']:.1f} | {row['busy']:.1f} | "
            f"{row['busy_over_quiet']:.2f} | {row['quiet_over_first']:.2f} | {threads} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
