"""Running trainer/main.py as a job: as one rank of torchrun (or srun), or as its own launcher.

``python trainer/main.py`` without a launcher starts one process per visible GPU through
torchrun, run inside this process so that a failed worker ends the job with its own
``error:`` line and exit status. Bad input ends a rank with one such line and exit status 2
(``fail``).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from trainer import dist
from trainer.config import Config


def launched_by_torchrun(cfg: Config) -> bool:
    """Started as one rank of a job: by torchrun, the legacy launcher or srun (whose
    variables ``dist.adopt_slurm_step`` has turned into torchrun's)."""
    return "RANK" in os.environ or "LOCAL_RANK" in os.environ or cfg.local_rank is not None


def processes_to_start(cfg: Config) -> tuple[int, str]:
    """Without torchrun: how many processes this machine should run, and why."""
    if cfg.processes is not None:
        return cfg.processes, "--processes"
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus:
        return gpus, f"one per GPU ({gpus} visible)"
    # On a CPU, one process uses every core; measured on 2 cores with the demo, one process
    # trained at 151-175 img/s and two at about 125 in all (DDP over gloo adds its all-reduce).
    return 1, "no GPU: one process uses all cores"


def relaunch_under_torchrun(script: str, nproc: int, argv: list[str]) -> int:
    """Start ``script`` (trainer/main.py) as ``nproc`` torchrun workers on this machine; their
    exit status.

    torchrun runs in this process (``torch.distributed.run.run``, what ``python -m
    torch.distributed.run`` calls), so that a failed worker ends the job with the worker's
    own ``error:`` line and exit status, not torchrun's 40-line report and traceback.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    # --processes is this launcher's flag, not the workers' (under torchrun they refuse it).
    worker_argv, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            worker_argv.append(arg)
    args = parse_args(
        ["--standalone", f"--nproc_per_node={nproc}", os.path.abspath(script), *worker_argv]
    )
    # torchrun would set 1 (and print a 4-line warning saying so): each rank's share of the
    # cores is what its torch ops may use (the loader's threads are sized apart, in dist).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, dist.usable_cpus() // nproc)))
    # Its log lines repeat what the ranks say themselves ("failed (exitcode: 2)" after the
    # rank's error line, "Received 15 death signal" before the ranks' "stopped by SIGTERM").
    # torchelastic's loggers set their own levels when created (imported above), so each is
    # set here; a parent's level would not reach them.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        torchrun(args)
    except ChildFailedError as exc:
        return worker_failure_status(exc.failures)
    except SignalException as exc:  # SIGTERM (a preemption): torchrun stopped the workers,
        return 128 + int(exc.sigval)  # which said where to resume
    except KeyboardInterrupt:  # Ctrl-C: torchrun has forwarded the signal to its workers
        return 130
    return 0


def worker_failure_status(failures: dict) -> int:
    """The exit status of a job whose workers failed (``{rank: ProcessFailure}``): the status
    of the rank that said why (2 bad input, 1 a crash, whose traceback it printed), rather
    than of the ranks torchrun stopped after it (3, or a signal) -- and one line for a rank
    that died by a signal without a word (the kernel's OOM killer, a kill -9)."""
    spoke = {r: f for r, f in failures.items() if f.exitcode > 0 and f.exitcode != 3}
    if spoke:
        return spoke[min(spoke)].exitcode
    # The rank that died first by a signal: torchrun then stops the others with SIGTERM, so
    # another signal (a kill -9, the OOM killer) or else the earliest death is the cause.
    killed = sorted(
        (r for r, f in failures.items() if f.exitcode < 0),
        key=lambda r: (-failures[r].exitcode == 15, getattr(failures[r], "timestamp", 0), r),
    )
    rank = killed[0] if killed else min(failures)
    failure = failures[rank]
    if failure.exitcode < 0:
        import signal

        try:
            name = signal.Signals(-failure.exitcode).name
        except ValueError:
            name = f"signal {-failure.exitcode}"
        print(
            f"error: rank {rank} (pid {failure.pid}) was killed by {name}; the job stopped "
            "(out of host memory? dmesg says whether the OOM killer ran)",
            file=sys.stderr,
            flush=True,
        )
        return 128 - failure.exitcode
    return failure.exitcode


def fail(message: str, *, speak: bool = True) -> int:
    """Print one ``error:`` line (when ``speak``) and return exit status 2.

    Under torchrun the speaking rank also writes the line to torchrun's error file, so the
    job summary shows it, with this rank, as the root cause instead of an empty traceback.
    """
    if speak:
        print(f"error: {message}", file=sys.stderr, flush=True)
        write_error_file(f"error: {message}")
    return 2


def write_error_file(line: str, *, consequence: bool = False) -> None:
    """Under torchrun, ``line`` into its error file: the job summary shows it for this rank.

    torchrun names as the root cause the failure of the smallest timestamp, in whole seconds,
    the lowest rank on a tie; a rank without an error file is stamped when torchrun sees it
    exit. ``consequence``: this rank stops because another failed, and its stamp is a second
    later, so that a rank that failed in the same second (and stopped this one) is named, not
    rank 0."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not error_file:
        return
    record = {"message": line, "extraInfo": {"py_callstack": line}}
    record["extraInfo"]["timestamp"] = str(int(time.time()) + (1 if consequence else 0))
    try:
        with open(error_file, "w", encoding="utf-8") as f:
            json.dump({"message": record}, f)
    except OSError:
        pass  # the report is a courtesy; the line on stderr is what counts
