"""The output folder of a run (--output-dir): what marks it as used, the lock that keeps two
runs out of it, and where an evaluation of its weights writes.

Rank 0 alone looks into and writes the folder: main.py calls these through ``decided_by_main``
(``unlock_output_dir``, a no-op where nothing is locked, on every rank at the end).
"""

from __future__ import annotations

import fcntl
import os
import shutil

from trainer import checkpoint as ckpt_io
from trainer import metrics as run_metrics
from trainer.batch_picture import TRAIN_BATCH
from trainer.config import Config, TrainerError
from trainer.tensorboard import FOLDER as TENSORBOARD_DIR

CONFIG_FILE = "config.toml"
EVAL_FILE = "eval.json"


# What a run or an evaluation leaves in its folder: what marks the folder as used (config.toml
# alone does not: a run that failed at start leaves only it), and what --overwrite removes.
RESULT_FILES = (
    *ckpt_io.RESULT_FILES,
    run_metrics.CSV,
    run_metrics.PNG,
    *run_metrics.PER_CLASS_FILES,
    EVAL_FILE,
)


def results_in(folder: str) -> list[str]:
    """The RESULT_FILES that ``folder`` holds."""
    return [name for name in RESULT_FILES if os.path.exists(os.path.join(folder, name))]


# The folder this process trains into, locked (flock) from its check to the process's end:
# (its real path, the descriptor holding the lock).
_output_lock: tuple[str, int] | None = None


def lock_output_dir(output_dir: str) -> None:
    """Rank 0: hold an exclusive lock on ``output_dir`` (an existing folder) for this run.

    Two runs started into one folder (before the first one's first checkpoint, which alone
    marks the folder as used, or one with --overwrite) would interleave their epoch records
    and checkpoints, or delete the running one's files. The lock is on the folder itself, so
    nothing is left behind; it ends with the process, however that ends (kill -9 included).
    """
    global _output_lock
    folder = os.path.realpath(output_dir)
    if _output_lock is not None:
        if _output_lock[0] == folder:
            return
        unlock_output_dir()  # main() called again in one process, for another folder
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise TrainerError(
            f"{output_dir}: another run is writing into this folder now; wait for it to end, "
            "or use another --output-dir"
        ) from None
    except OSError:  # a filesystem without flock on folders (some NFS): go on unguarded
        os.close(fd)
        return
    _output_lock = (folder, fd)


def unlock_output_dir() -> None:
    global _output_lock
    if _output_lock is not None:
        os.close(_output_lock[1])  # closing releases the flock
        _output_lock = None


def check_output_dir(cfg: Config) -> None:
    """Before any work: never replace an earlier run's results by accident, and find a
    folder that cannot be written now rather than at the first checkpoint."""
    if not cfg.eval_only and os.path.isdir(cfg.output_dir):
        # Before looking at (or, with --overwrite, removing) what the folder holds.
        lock_output_dir(cfg.output_dir)
    if not cfg.eval_only:  # an evaluation writes beside a run (eval_results_dir), never over
        found = results_in(cfg.output_dir)
        resume_path = ckpt_io.resolve_resume(cfg.resume, cfg.output_dir)
        # Only this folder's own checkpoint continues the run in it; another run's would
        # splice two runs' weights and metrics into one folder.
        own = (
            resume_path is not None
            and os.path.isdir(cfg.output_dir)
            and os.path.samefile(os.path.dirname(os.path.abspath(resume_path)), cfg.output_dir)
        )
        if own:  # its metrics are continued: a damaged line is found now, in one line
            try:
                run_metrics.read(cfg.output_dir, drop_torn_tail=True)
            except run_metrics.MetricsError as exc:
                raise TrainerError(f"{exc} (the run resumes once it is)") from None
        if found and not own and not cfg.overwrite:
            if cfg.resume == "auto" and resume_path is None:
                # A run stopped before its first last.pt (killed, or that write failed) left
                # records but nothing to continue from: saying "continue it with --resume
                # auto" here would send the user round in a circle.
                raise TrainerError(
                    f"{cfg.output_dir} already holds a run ({', '.join(found)}) but no "
                    f"{ckpt_io.LAST} to continue it from (it stopped before its first "
                    "checkpoint): start it over with --overwrite, or use --output-dir NEW_DIR"
                )
            if resume_path is not None:
                raise TrainerError(
                    f"{cfg.output_dir} already holds a run ({', '.join(found)}), and --resume "
                    f"{resume_path} is another run's checkpoint: resume into a new "
                    "--output-dir, or replace this folder's run with --overwrite"
                )
            raise TrainerError(
                f"{cfg.output_dir} already holds a run ({', '.join(found)}): continue it with "
                "--resume auto, start a new one with --output-dir NEW_DIR, or replace it "
                "with --overwrite"
            )
        if found and cfg.overwrite and not own:
            for name in (*found, CONFIG_FILE):
                if os.path.exists(os.path.join(cfg.output_dir, name)):
                    os.remove(os.path.join(cfg.output_dir, name))
            for name in os.listdir(cfg.output_dir):  # the old run's evaluations and curves
                old = os.path.join(cfg.output_dir, name)
                if (name.startswith("eval-") or name == TENSORBOARD_DIR) and os.path.isdir(old):
                    shutil.rmtree(old)
            if os.path.exists(os.path.join(cfg.output_dir, TRAIN_BATCH)):
                os.remove(os.path.join(cfg.output_dir, TRAIN_BATCH))
    ckpt_io.check_writable(cfg.output_dir)


def eval_results_dir(output_dir: str) -> str:
    """Where ``--eval-only`` writes: ``output_dir`` if it holds no earlier results (of a
    training run or an evaluation) and no run is writing into it, else its first free
    ``eval-N`` subfolder.

    ``output_dir`` itself is made and locked for the evaluation (rank 0: main.py calls this
    through ``decided_by_main``): a run holds the lock from its start but writes config.toml
    only once its data and loaders are ready, and an evaluation that looked in between wrote
    its config.toml, eval.json and per-class files in among the run's; a run started while
    the evaluation writes there is refused, as beside another run."""

    if not results_in(output_dir) and not os.path.exists(os.path.join(output_dir, CONFIG_FILE)):
        os.makedirs(output_dir, exist_ok=True)
        try:
            lock_output_dir(output_dir)
            return output_dir
        except TrainerError:  # a run is starting there: write beside it
            pass
    k = 1
    while True:
        folder = os.path.join(output_dir, f"eval-{k}")
        try:
            # Made here, atomically: two evaluations started at once each get their own (a
            # look for the first free name would have given both the same one).
            os.mkdir(folder)
            return folder
        except FileExistsError:
            k += 1
