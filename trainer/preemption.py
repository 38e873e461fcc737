"""Stopping and saving inside an epoch: signals, step checkpoints, and the ranks' agreement.

SIGTERM (a scheduler's preemption; torchrun forwards it to every worker) and SIGINT (Ctrl-C)
set a flag. After every training step ``StepControl.after_step`` decides, the same way on
every rank, whether to write a step checkpoint (every ``--checkpoint-every`` steps, every
``--checkpoint-minutes`` by rank 0's clock, or on a signal) and whether to stop after it.

Agreement without a per-step device sync: each rank's flags go into a tiny all-reduce (max)
on a separate gloo group, on the host, started asynchronously after step s and waited for
after step s+1, by when it has long finished. Every rank acts on the same reduced flags at
the same step, so a signal seen by one rank, or by the ranks at different moments, stops all
of them at one step: at most two steps after the signal (plus an evaluation in progress).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import torch
import torch.distributed as torch_dist

from trainer import dist

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    """The run stopped on a signal (after saving, when inside training)."""

    def __init__(self, signum: int, saved: str | None = None):
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.saved = saved  # where the step checkpoint went, if one was written
        super().__init__(self.signal_name)


class StepControl:
    """Per-step decisions: save a step checkpoint? stop? Same answer on every rank."""

    def __init__(self, *, every_steps: int, every_minutes: float):
        self.every_steps = every_steps
        self.every_seconds = every_minutes * 60.0
        # save(epoch=, next_step=, progress=) -> the path written; every rank calls it. Set
        # by the trainer once the model and the loaders exist.
        self.save: Callable[..., str] | None = None
        self.signum: int | None = None
        self.in_training = False
        self.last_save = time.monotonic()
        self._previous: dict = {}
        self._group = None
        self._pending = None  # (work, flags tensor) started after the previous step
        if dist.is_distributed():
            # Host-side, apart from the training group: never waits on the GPU or on DDP.
            self._group = torch_dist.new_group(backend="gloo")

    # --- signals -------------------------------------------------------------------------
    def install(self) -> None:
        for signum in _SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum, _frame) -> None:
        if self.signum is not None or not self.in_training:
            # A second signal (an impatient Ctrl-C), or one outside the epoch loop (setting
            # up, exporting), where there is nothing unsaved: stop now.
            raise Stopped(signum)
        self.signum = signum  # acted on at the next agreed step

    # --- the per-step decision ----------------------------------------------------------
    def after_step(
        self,
        *,
        epoch: int,
        next_step: int,
        steps: int,
        progress: dict,
        group_start: int,
    ) -> None:
        """Called after each optimizer step; may save a step checkpoint, may raise Stopped.

        ``group_start``: the first batch of this optimizer step (with --grad-accum-steps K it
        is K batches back): a multiple of ``every_steps`` crossed inside the group is due now,
        at the first boundary after it, not only when the boundary lands on it exactly.
        """
        signalled, timed = self._agreed_flags()
        periodic = (
            self.every_steps > 0 and next_step // self.every_steps > group_start // self.every_steps
        )
        # The epoch's last step is followed by evaluation and the epoch checkpoint anyway.
        due = (periodic or timed) and next_step < steps
        if signalled or due:
            path = self.save(epoch=epoch, next_step=next_step, progress=progress)
            self.last_save = time.monotonic()
            if signalled:
                raise Stopped(self.signum or signal.SIGTERM, saved=path)
        self._send_flags()  # after the decision, so a save just made is not asked for again

    def _local_flags(self) -> torch.Tensor:
        timed = dist.is_main_process() and 0 < self.every_seconds <= (
            time.monotonic() - self.last_save
        )
        return torch.tensor([int(self.signum is not None), int(timed)], dtype=torch.int32)

    def _agreed_flags(self) -> tuple[bool, bool]:
        """One process: its own flags now. Several: the flags all ranks sent after the
        previous step (finished by now; nothing before a run's first step)."""
        if self._group is None:
            flags = self._local_flags()
            return bool(flags[0]), bool(flags[1])
        if self._pending is None:
            return False, False
        work, flags = self._pending
        work.wait()
        self._pending = None
        return bool(flags[0]), bool(flags[1])

    def _send_flags(self) -> None:
        if self._group is None:
            return
        flags = self._local_flags()
        work = torch_dist.all_reduce(
            flags, op=torch_dist.ReduceOp.MAX, group=self._group, async_op=True
        )
        self._pending = (work, flags)

    def after_epoch(self, *, saved: str | None) -> None:
        """At an epoch's end (its checkpoint written): stop here if any rank was signalled
        during the epoch's last steps or its evaluation. One blocking flag exchange an epoch."""
        self.drain()
        flags = self._local_flags()
        if self._group is not None:
            torch_dist.all_reduce(flags, op=torch_dist.ReduceOp.MAX, group=self._group)
        if flags[0]:
            raise Stopped(self.signum or signal.SIGTERM, saved=saved)

    def drain(self, *, quiet: bool = False) -> None:
        """Wait for the flags still in flight (before the group goes away). ``quiet``: on the
        way out, where a peer that died makes the wait fail, and that was reported already."""
        if self._pending is not None:
            work, self._pending = self._pending[0], None
            try:
                work.wait()
            except Exception:
                if not quiet:
                    raise
