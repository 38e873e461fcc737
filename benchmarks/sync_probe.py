"""One trainer rank, instrumented: benchmarks/trainer_check.py starts it under torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node 1 \
        benchmarks/sync_probe.py REPORT.json -- [trainer/main.py flags]

It runs ``trainer.main.main`` unchanged in this process and writes REPORT.json when the run
ends, however it ends (a SIGTERM stop included):

- ``host_syncs``: on CUDA, under ``torch.cuda.set_sync_debug_mode("warn")``, every operation
  that made the host wait for the GPU, counted by the innermost line of this repository's code
  that called it, and whether it ran inside ``train_one_epoch``'s loop (``in_training_loop``).
  ``syncs_per_step`` = the loop's syncs / ``train_steps`` (the calls of ``engine.train_step``).
  On a CPU nothing is counted (the mode needs CUDA), and the report says so.
- ``pipeline_builds``: each DALI pipeline build (the first epoch's, each epoch boundary's, the
  val pipeline's) to its first batch, in seconds, with the device memory in use before and
  after it (``cudaMemGetInfo``: DALI's allocations too, which torch's counters miss).
- ``device_memory``: the peak of the device memory in use (sampled every 0.2 s) and torch's
  own peak (``max_memory_allocated``); ``handoff_waits``: times a DALI loader's hand-off made
  the host wait for the GPU (pipelines.dali.DeviceHandoff).

The instrumentation wraps functions (counts, times); it changes nothing the run computes.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

SYNC_WARNING = "called a synchronizing CUDA operation"


class Probe:
    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self.train_steps = 0
        self.syncs: dict[str, dict] = {}
        self.builds: list[dict] = []
        self.handoffs: list = []
        self.peak_used = 0
        self._stop = threading.Event()

    # -- host syncs ---------------------------------------------------------------------
    def where(self) -> tuple[str, bool]:
        """The innermost frame of this repository's code (not this file) on the stack, and
        whether train_one_epoch is on it."""
        frame, place, in_loop = sys._getframe(2), None, False
        while frame is not None:
            path = os.path.abspath(frame.f_code.co_filename)
            if path.startswith(REPO + os.sep) and path != os.path.abspath(__file__):
                if place is None:
                    place = (
                        f"{os.path.relpath(path, REPO)}:{frame.f_lineno} ({frame.f_code.co_name})"
                    )
                if frame.f_code.co_name == "train_one_epoch":
                    in_loop = True
            frame = frame.f_back
        return place or "outside this repository", in_loop

    def install(self) -> None:
        original = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            if SYNC_WARNING not in str(message):
                return original(message, category, filename, lineno, file, line)
            place, in_loop = self.where()
            entry = self.syncs.setdefault(place, {"count": 0, "in_training_loop": in_loop})
            entry["count"] += 1

        warnings.showwarning = showwarning
        if self.cuda:
            # Every occurrence, not once per place (Python's default filter).
            warnings.filterwarnings("always", message=f".*{SYNC_WARNING}")
            torch.cuda.set_sync_debug_mode("warn")
            threading.Thread(target=self._sample_memory, daemon=True).start()

        from trainer import engine

        train_step = engine.train_step

        @functools.wraps(train_step)
        def counted_train_step(*args, **kwargs):
            self.train_steps += 1
            return train_step(*args, **kwargs)

        engine.train_step = counted_train_step  # train_one_epoch calls it by this name
        try:
            from pipelines import dali
        except ImportError:  # no DALI here: PIL runs only
            return
        build = dali.DaliLoader._build

        @functools.wraps(build)
        def timed_build(loader, *args, **kwargs):
            before = self.device_used()
            start = time.perf_counter()
            iterator = build(loader, *args, **kwargs)  # DALI prefetches: to the first batch
            self.builds.append(
                {
                    "train": loader.train,
                    "decode": loader.decode_device,
                    "batch_size": loader.batch_size,
                    "image_size": loader.image_size,
                    "seconds": round(time.perf_counter() - start, 4),
                    "device_used_before_mib": before,
                    "device_used_after_mib": self.device_used(),
                }
            )
            return iterator

        dali.DaliLoader._build = timed_build
        handoff_init = dali.DeviceHandoff.__init__

        @functools.wraps(handoff_init)
        def registered(handoff, *args, **kwargs):
            handoff_init(handoff, *args, **kwargs)
            self.handoffs.append(handoff)

        dali.DeviceHandoff.__init__ = registered

    # -- device memory -----------------------------------------------------------------
    def device_used(self) -> int | None:
        if not self.cuda:
            return None
        free, total = torch.cuda.mem_get_info()
        return (total - free) >> 20

    def _sample_memory(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.peak_used = max(self.peak_used, self.device_used() or 0)
            except RuntimeError:  # the context is going away at the end
                return

    # -- the report --------------------------------------------------------------------
    def report(self, status) -> dict:
        self._stop.set()
        in_loop = sum(e["count"] for e in self.syncs.values() if e["in_training_loop"])
        return {
            "cuda": self.cuda,
            "device": torch.cuda.get_device_name() if self.cuda else "cpu",
            "exit_status": status,
            "train_steps": self.train_steps,
            "host_syncs": (
                dict(sorted(self.syncs.items(), key=lambda kv: -kv[1]["count"]))
                if self.cuda
                else "not counted: torch's sync debug mode needs CUDA"
            ),
            "host_syncs_in_training_loop": in_loop if self.cuda else None,
            "syncs_per_step": (
                round(in_loop / self.train_steps, 3) if self.cuda and self.train_steps else None
            ),
            "pipeline_builds": self.builds,
            "handoff_waits": sum(h.waits for h in self.handoffs) if self.handoffs else None,
            "device_memory": {
                "peak_used_mib": self.peak_used,
                "torch_peak_allocated_mib": torch.cuda.max_memory_allocated() >> 20,
            }
            if self.cuda
            else None,
        }


def main() -> int:
    args = sys.argv[1:]
    if len(args) < 2 or args[1] != "--":
        print("usage: sync_probe.py REPORT.json -- [trainer/main.py flags]", file=sys.stderr)
        return 2
    report_path, trainer_argv = args[0], args[2:]
    probe = Probe()
    probe.install()
    from trainer.main import main as trainer_main

    status = None
    try:
        status = trainer_main(trainer_argv)
        return status
    except SystemExit as exc:
        status = exc.code
        raise
    finally:
        with open(report_path, "w", encoding="utf-8") as f:
            json.dump(probe.report(status), f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
