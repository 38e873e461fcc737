"""The trainer on this machine with every feature on, stopped by SIGTERM mid-epoch and resumed
to the end: gpu_suite.sh's first stage, the one check of trainer/main.py on a GPU.

    python benchmarks/trainer_check.py --list LIST --out DIR [--arch resnet50 --batch-size 256]

One process under torchrun (``benchmarks/sync_probe.py``, which counts the host syncs under
``torch.cuda.set_sync_debug_mode("warn")`` and times each DALI pipeline build), two epochs of
``--steps-per-epoch`` batches from LIST (a seeded sample of it, repeated if short) with: DALI
(mixed decode on a GPU, auto otherwise), ``--auto-augment``, mixup + cutmix, EMA, gradient
accumulation (2), clipping, progressive resize (epoch 1 at 3/4 of the size), step checkpoints
(4 an epoch), 4 log lines an epoch, validation on ``--val-images`` of the list. Run 1 gets
SIGTERM at epoch 2's second log line, half-way; run 2 is the same command with
``--resume auto``.

Checked (exit 1 if not): run 1 stops with 128+15 and a step checkpoint; run 2 resumes inside
epoch 2, ends with 0, and its metrics.jsonl has both epochs with finite losses and an EMA
score. DIR/trainer.json holds the checks, both probe reports (host syncs per step and where,
pipeline build seconds and device memory, the hand-off's waits) and the logs' paths.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.cli import positive_int  # noqa: E402
from benchmarks.report import trainer_summary  # noqa: E402
from pipelines.fileio import atomic_write_text  # noqa: E402
from pipelines.lists import read_list, write_list  # noqa: E402

GRAD_ACCUM_STEPS = 2
CHECKPOINTS_PER_EPOCH = 4


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--list", required=True, help="training list to take images from")
    p.add_argument("--out", required=True, help="folder for the run, logs and trainer.json")
    p.add_argument("--arch", default="resnet50", help="model [default: resnet50]")
    p.add_argument("--batch-size", type=positive_int, default=256, help="per step [default: 256]")
    p.add_argument("--image-size", type=positive_int, default=224, help="pixels [default: 224]")
    p.add_argument(
        "--steps-per-epoch", type=positive_int, default=40, help="batches an epoch [default: 40]"
    )
    p.add_argument(
        "--val-images", type=positive_int, default=1024, help="validation images [default: 1024]"
    )
    p.add_argument("--amp", default="bf16", help="--amp of the trainer [default: bf16]")
    p.add_argument(
        "--auto-augment", default="rand", help="--auto-augment of the trainer [default: rand]"
    )
    p.add_argument(
        "--timeout", type=positive_int, default=600, help="seconds a run may take [default: 600]"
    )
    return p.parse_args(argv)


def write_lists(args, out: str) -> tuple[str, str]:
    samples = read_list(args.list)
    # A seeded shuffle first: a list in class order would give its first lines one class.
    order = np.random.default_rng(0).permutation(len(samples))
    wanted = args.steps_per_epoch * args.batch_size
    train, val = os.path.join(out, "train.txt"), os.path.join(out, "val.txt")
    for path, count in ((train, wanted), (val, args.val_images)):
        write_list(path, (samples[order[i % len(order)]] for i in range(count)), absolute=True)
    classes = os.path.join(os.path.dirname(os.path.abspath(args.list)), "classes.txt")
    if os.path.isfile(classes):
        shutil.copy(classes, out)
    return train, val


def log_interval(args) -> int:
    # 4 log lines an epoch: each costs one host sync (the window's loss), and the check stops
    # run 1 at epoch 2's second line, half-way through it.
    return max(1, args.steps_per_epoch // 4)


def trainer_flags(args, train: str, val: str, run_dir: str, cuda: bool) -> list[str]:
    start_size = max(16, int(args.image_size * 0.75) // 8 * 8)
    return [
        "--train-list", train, "--val-list", val, "--output-dir", run_dir,
        "--arch", args.arch, "--batch-size", str(args.batch_size),
        "--image-size", str(args.image_size), "--amp", args.amp, "--epochs", "2",
        "--loader", "dali", "--dali-decode", "mixed" if cuda else "auto",
        "--auto-augment", args.auto_augment, "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0",
        "--ema-decay", "0.99", "--grad-accum-steps", str(GRAD_ACCUM_STEPS),
        "--clip-grad-norm", "1.0", "--warmup-epochs", "0.5",
        "--progressive-resize", f"{start_size}:{args.image_size}:1",
        "--checkpoint-every",
        str(max(1, args.steps_per_epoch // GRAD_ACCUM_STEPS // CHECKPOINTS_PER_EPOCH)),
        "--log-interval", str(log_interval(args)), "--no-plots",
    ]  # fmt: skip


def run_trainer(flags, report: str, log: str, *, stop_at: str | None, timeout: float) -> dict:
    """One torchrun job of one process; with ``stop_at``, SIGTERM once a line starts so."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
        os.path.join(REPO, "benchmarks", "sync_probe.py"), report, "--", *flags,
    ]  # fmt: skip
    # Prepended: the GPU machine's DALI comes on PYTHONPATH (../shared/gpu's kit, /tmp/site).
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    signalled_at = None
    with open(log, "w", encoding="utf-8") as log_file:
        # A session of its own: a timeout, or this check stopped (the suite's `timeout`),
        # ends torchrun and its worker together, not torchrun alone.
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            start_new_session=True,
        )  # fmt: skip

        def kill_all() -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        watchdog = threading.Timer(timeout, kill_all)
        watchdog.start()
        try:
            for line in proc.stdout:
                log_file.write(line)
                log_file.flush()
                if stop_at and signalled_at is None and line.startswith(stop_at):
                    proc.send_signal(signal.SIGTERM)  # torchrun passes it to its worker
                    signalled_at = line.strip()
            proc.wait()
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                kill_all()
                proc.wait()
    try:
        with open(report, encoding="utf-8") as f:
            probe = json.load(f)
    except (OSError, ValueError):
        probe = None
    return {
        "command": command,
        "log": log,
        "torchrun_exit": proc.returncode,
        "seconds": round(time.perf_counter() - start, 1),
        "signalled_at": signalled_at,
        "probe": probe,
    }


def read_log(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def main(argv=None) -> int:
    args = parse_args(argv)
    # Stopped (the suite's time limit): the finally clauses end the trainer's processes.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    import torch

    cuda = torch.cuda.is_available()
    out = os.path.abspath(args.out)
    run_dir = os.path.join(out, "run")
    if os.path.isdir(run_dir):  # a rerun into the same folder: this run's figures only
        shutil.rmtree(run_dir)
    os.makedirs(out, exist_ok=True)
    train, val = write_lists(args, out)
    flags = trainer_flags(args, train, val, run_dir, cuda)
    stopped = run_trainer(
        flags, os.path.join(out, "probe_stopped.json"), os.path.join(out, "stopped.log"),
        stop_at=f"epoch 2/2 step {2 * log_interval(args)}/", timeout=args.timeout,
    )  # fmt: skip
    resumed = run_trainer(
        [*flags, "--resume", "auto"], os.path.join(out, "probe_resumed.json"),
        os.path.join(out, "resumed.log"), stop_at=None, timeout=args.timeout,
    )  # fmt: skip
    stopped_log, resumed_log = read_log(stopped["log"]), read_log(resumed["log"])
    records = []
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(metrics):
        with open(metrics, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    epochs = [r for r in records if "train_loss" in r]
    resumed_line = next((ln for ln in resumed_log.splitlines() if "resumed from" in ln), "")
    checks = {
        "run 1 stopped by SIGTERM (exit 143) in epoch 2": stopped["signalled_at"] is not None
        and stopped["probe"] is not None
        and stopped["probe"]["exit_status"] == 128 + signal.SIGTERM,
        "run 1 saved a step checkpoint": "at this step: continue with --resume auto" in stopped_log,
        "run 2 resumed inside epoch 2": "resuming epoch 2 at step" in resumed_line,
        "run 2 ended with exit 0": resumed["torchrun_exit"] == 0,
        "metrics.jsonl: 2 epochs, finite losses, an EMA score": len(epochs) == 2
        and all(math.isfinite(r["train_loss"]) for r in epochs)
        and all(r.get("val_top1_ema") is not None for r in epochs),
    }
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "settings": vars(args),
        "trainer_flags": flags,
        "checks": checks,
        "resumed_line": resumed_line,
        "epochs": epochs,
        "stopped": stopped,
        "resumed": resumed,
    }
    path = os.path.join(out, "trainer.json")
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    print(trainer_summary(path), end="")  # what summary.md will say of it
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
