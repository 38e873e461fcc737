"""How many torch threads a CPU rank should run: its share of the cores, less the cores that
other processes keep busy.

torch's CPU ops run as OpenMP parallel regions, and each region ends in a barrier that waits
for its slowest thread. On a machine where another process keeps a core busy (a browser, a
compile, a CI runner's neighbour), the scheduler takes turns between it and one of our
threads, and every op waits out that turn: measured on 2 cores with one busy process beside
the demo run, 2 torch threads trained at 31 img/s against 135 quiet, 1 thread at 92
(benchmarks/busy_machine.py). So a rank counts, over a short sample at start, the busy time of
the CPUs it may run on that is not its own job's (itself, its sibling ranks, their loader
processes), and runs one thread fewer for each such core.

The count is chosen once, at start: torch's thread count changes its CPU arithmetic (the
order of sums), so a count that followed the load mid-run would make a seeded run's result
depend on what else ran on the machine. A resumed run keeps the count it started with.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

# Long enough for a core's clock ticks (100 a second) to tell a busy core from a quiet one,
# short enough not to be noticed at start.
SAMPLE_S = 0.3


def _cpu_busy_ticks(cpus: set[int]) -> int | None:
    """Busy clock ticks of these CPUs since boot, from /proc/stat (user, nice, system, irq,
    softirq and steal: a vCPU the hypervisor gives to another guest stalls a barrier alike)."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    busy = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit():
            continue
        if int(name[3:]) in cpus:
            fields = [int(x) for x in rest.split()]
            # user nice system idle iowait irq softirq steal (guest time is inside user)
            busy += sum(fields[i] for i in (0, 1, 2, 5, 6, 7) if i < len(fields))
    return busy


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, user + system clock ticks of all its threads)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # exited while we looked
            continue
        # The command name (field 2) may hold spaces and parentheses: split after its last ")".
        fields = stat[stat.rfind(")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return table


def _job_ticks(table: dict[int, tuple[int, int]], root: int) -> int:
    """Clock ticks of ``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            total += table[pid][1]
        todo.extend(children.get(pid, ()))
    return total


def job_root(local_world_size: int) -> int:
    """The process whose descendants are this job on this node: the launcher that started the
    ranks (torchrun's agent, Slurm's step daemon), or this process when it runs alone."""
    launched = "TORCHELASTIC_RUN_ID" in os.environ or "SLURM_STEP_NUM_TASKS" in os.environ
    return os.getppid() if launched and local_world_size > 1 else os.getpid()


def busy_cores_of_others(local_world_size: int, sample_s: float = SAMPLE_S) -> float | None:
    """Cores that processes outside this job kept busy, on average over ``sample_s``, among
    the CPUs this process may run on; None where /proc cannot tell (not Linux)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    root = job_root(local_world_size)
    try:
        busy0, job0 = _cpu_busy_ticks(cpus), _job_ticks(_process_table(), root)
        start = time.monotonic()
        time.sleep(sample_s)
        busy1, job1 = _cpu_busy_ticks(cpus), _job_ticks(_process_table(), root)
        elapsed = time.monotonic() - start
    except (OSError, ValueError, IndexError):
        return None
    if busy0 is None or busy1 is None or not cpus:
        return None
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    others = (busy1 - busy0) - (job1 - job0)
    return min(float(len(cpus)), max(0.0, others / ticks_per_s / elapsed))


@dataclass(frozen=True)
class TorchThreads:
    threads: int
    reason: str  # why that many: the start-up line's parenthesis
    cut: bool = False  # fewer than the rank's share, for the load other processes put on it

    def describe(self) -> str:
        return (
            f"{self.threads} thread{'s' if self.threads != 1 else ''} per process ({self.reason})"
        )


def choose_torch_threads(
    *,
    share: int,
    usable: int,
    local_world_size: int,
    busy_others: float | None,
    share_reason: str = "the rank's share of the cores",
) -> TorchThreads:
    """``share`` (the rank's part of the cores) less this rank's part of the cores other
    processes keep busy, rounded to the nearest core; at least 1."""
    if busy_others is None:
        return TorchThreads(share, f"{share_reason}; the machine's load could not be read")
    free = max(0.0, usable - busy_others) / max(1, local_world_size)
    threads = max(1, min(share, int(free + 0.5)))
    said = f"other processes kept {busy_others:.1f} of {usable} cores busy at start"
    if threads < share:
        return TorchThreads(
            threads,
            f"not {share}: {said}, and a thread waiting for a core stalls every op; "
            f"--cpu-threads {share} to use {share} anyway",
            cut=True,
        )
    return TorchThreads(threads, f"{share_reason}; {said}")
