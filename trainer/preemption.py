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
# A stop signal often reaches a worker twice: Ctrl-C goes to the terminal's whole process
# group (torchrun's agent and its workers), a scheduler (Slurm's scancel, a preemption)
# signals every process of the job, and torchrun forwards what it got to its workers within
# about its --monitor-interval (0.1 s). A repeat this soon after the first is that same stop;
# a later one is someone who does not want to wait for the save.
REPEAT_WINDOW_S = 3.0


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
        self.signalled_at = 0.0  # time.monotonic() of the first signal
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
        now = time.monotonic()
        if self.in_training and self.signum is not None:
            if now - self.signalled_at < REPEAT_WINDOW_S:
                return  # the first signal delivered again (see REPEAT_WINDOW_S): save anyway
            raise Stopped(signum)  # a second signal (an impatient Ctrl-C): stop now
        if not self.in_training:
            # Outside the epoch loop (setting up, exporting) nothing is unsaved: stop now.
            raise Stopped(signum)
        self.signum, self.signalled_at = signum, now  # acted on at the next agreed step

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
                # Not signalled itself: the signal another rank got (Ctrl-C on another node).
                raise Stopped(self.signum or signalled, saved=path)
        self._send_flags()  # after the decision, so a save just made is not asked for again

    def _local_flags(self) -> torch.Tensor:
        timed = dist.is_main_process() and 0 < self.every_seconds <= (
            time.monotonic() - self.last_save
        )
        # The signal's number, not a bit: every rank then stops naming the signal that came.
        return torch.tensor([int(self.signum or 0), int(timed)], dtype=torch.int32)

    def _agreed_flags(self) -> tuple[int, bool]:
        """One process: its own flags now. Several: the flags all ranks sent after the
        previous step (finished by now; nothing before a run's first step). The first: the
        signal's number (0 for none; the largest when ranks got different ones)."""
        if self._group is None:
            flags = self._local_flags()
            return int(flags[0]), bool(flags[1])
        if self._pending is None:
            return 0, False
        work, flags = self._pending
        work.wait()
        self._pending = None
        return int(flags[0]), bool(flags[1])

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
            raise Stopped(self.signum or int(flags[0]), saved=saved)

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
