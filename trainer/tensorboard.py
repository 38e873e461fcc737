"""``--tensorboard``: the run's curves as TensorBoard event files in its output folder.

Rank 0 writes, into ``OUTPUT_DIR/tensorboard/``: per log interval (x: the global step, batches
since the run began) ``train/loss``, ``train/lr``, ``train/images_per_sec_per_gpu`` and
``train/data_wait``; per epoch (x: the global step at the epoch's end) ``train/epoch_loss``,
``val/top1``, ``val/top5``, ``val/loss``, the EMA's ``val_ema/top1`` and ``val_ema/loss``, and
``time/epoch_seconds``; the resolved config as text and, at the end, as hparams with the best
top-1. A resumed run writes a new event file with ``purge_step`` at the step it resumes
from: TensorBoard drops what the stopped run logged from that step on, so the curves continue
without duplicate steps. ``tensorboard`` (the ``tensorboard`` extra) is needed only with the flag.
"""

from __future__ import annotations

import os

from trainer.config import Config, TrainerError

FOLDER = "tensorboard"


def check_available(cfg: Config) -> None:
    """One line before any work when --tensorboard cannot write."""
    if not cfg.tensorboard:
        return
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard writes through it)
    except ImportError:
        raise TrainerError(
            "--tensorboard needs the tensorboard package: pip install "
            "'dali-resnet-trainer[tensorboard]' (or pip install tensorboard)"
        ) from None


class Curves:
    """The event-file writer of rank 0 (every method a no-op elsewhere, or without the flag)."""

    def __init__(self, cfg: Config, *, is_main: bool, first_step: int, steps_per_epoch: int):
        """``first_step``: training steps done before this run (a resumed run's position)."""
        self.steps_per_epoch = steps_per_epoch
        self.writer = None
        if not (cfg.tensorboard and is_main):
            return
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run's first point is step first_step + 1 (steps count batches done):
        # what the stopped run logged from there on is dropped, what it logged up to its
        # checkpoint stays.
        self.writer = SummaryWriter(
            os.path.join(cfg.output_dir, FOLDER), purge_step=first_step + 1 if first_step else None
        )
        if not first_step:
            self.writer.add_text("config", _config_text(cfg), 0)

    def log_window(self, *, epoch: int, step: int, figures: dict[str, float]) -> None:
        """A log interval's figures, ``step`` batches into 0-based ``epoch``."""
        if self.writer is None:
            return
        global_step = epoch * self.steps_per_epoch + step
        for name, value in figures.items():
            self.writer.add_scalar(f"train/{name}", value, global_step)

    def log_epoch(self, record: dict) -> None:
        """What metrics.jsonl gets for the epoch (``record``'s 1-based ``epoch``)."""
        if self.writer is None:
            return
        global_step = record["epoch"] * self.steps_per_epoch
        tags = {
            "train/epoch_loss": "train_loss", "val/top1": "val_top1", "val/top5": "val_top5",
            "val/loss": "val_loss", "val_ema/top1": "val_top1_ema", "val_ema/loss": "val_loss_ema",
            "time/epoch_seconds": "epoch_seconds",
        }  # fmt: skip
        for tag, key in tags.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], global_step)
        self.writer.flush()

    def close(self, cfg: Config | None = None, *, best_top1: float | None = None) -> None:
        """Close the files; with ``cfg`` (a finished run) add it as hparams first."""
        if self.writer is None:
            return
        if cfg is None:
            self.writer.close()
            self.writer = None
            return
        hparams = {
            k: v if isinstance(v, int | float | str | bool) else str(v)
            for k, v in vars(cfg).items()
            if v is not None
        }
        metrics = {"hparam/best_top1": best_top1} if best_top1 is not None else {}
        self.writer.add_hparams(hparams, metrics, run_name=".")
        self.writer.close()
        self.writer = None


def _config_text(cfg: Config) -> str:
    rows = [f"    {key} = {value!r}" for key, value in sorted(vars(cfg).items())]
    return "\n".join(rows)  # indented: TensorBoard's markdown shows it as code
