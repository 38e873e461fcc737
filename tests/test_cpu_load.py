"""torch threads on a busy machine: other processes' busy cores are seen, the job's own are
not, and a CPU rank runs one thread fewer for each core another process keeps busy."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from trainer import cpu_load, dist
from trainer.config import Config, TrainerError, parse_config

SPIN = [sys.executable, "-c", "while True: pass"]
two_cores = pytest.mark.skipif(dist.usable_cpus() < 2, reason="a busy core needs a second one")


def start_foreign_spinner() -> int:
    """A process that keeps a core busy and is not this one's descendant (its parent shell
    exits at once, so it is handed to init): a neighbour, as a browser is."""
    shell = subprocess.run(
        ["sh", "-c", f"{shlex.join(SPIN)} >/dev/null 2>&1 & echo $!"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(shell.stdout.strip())
    time.sleep(0.3)  # running before the sample starts
    return pid


@pytest.fixture
def foreign_spinner():
    pid = start_foreign_spinner()
    yield pid
    os.kill(pid, signal.SIGKILL)


def test_the_rule_takes_a_thread_off_for_each_busy_core():
    def choose(busy, share=2, usable=2, ranks=1):
        return cpu_load.choose_torch_threads(
            share=share, usable=usable, local_world_size=ranks, busy_others=busy
        )

    assert choose(0.0).threads == 2
    assert choose(0.3).threads == 2  # a little background work: noise, not a busy core
    assert choose(1.0).threads == 1
    assert choose(0.7).threads == 1
    assert choose(2.0).threads == 1  # never 0
    reduced = choose(1.0)
    assert reduced.reason.startswith("not 2: other processes kept 1.0 of 2 cores busy at start")
    assert "--cpu-threads 2" in reduced.reason
    assert reduced.describe().startswith("1 thread per process (not 2: ")
    assert reduced.cut and not choose(0.3).cut
    assert choose(None).threads == 2 and "could not be read" in choose(None).reason
    # Ranks share what is free: 16 cores, 4 busy, 2 ranks of 8 -> 6 each.
    assert choose(4.0, share=8, usable=16, ranks=2).threads == 6
    # Never more than the share (OMP_NUM_THREADS may have cut it below the free cores).
    assert choose(0.0, share=3, usable=16).threads == 3


def test_asked_threads_are_used_as_given_and_a_share_of_one_is_not_sampled(monkeypatch):
    assert dist.choose_torch_threads(1, 3).threads == 3
    monkeypatch.setattr(cpu_load, "busy_cores_of_others", lambda *_: pytest.fail("sampled"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert dist.choose_torch_threads(1).threads == 1


@two_cores
def test_a_neighbours_busy_core_is_seen_and_the_jobs_own_are_not():
    # Whatever else runs (another test, the machine's own work), all the time a spinning
    # neighbour got counts as others' load. On a loaded machine (CI) it may get well under a
    # core: the figure is held to what it did get, from its own /proc counters.
    pid = start_foreign_spinner()
    try:
        spun, start = cpu_load._process_table()[pid][1], time.monotonic()
        foreign = cpu_load.busy_cores_of_others(1, 0.5)
        spinner = spinner_cores(pid, spun, start)
        assert pid not in descendants(cpu_load.job_root(1))
    finally:
        os.kill(pid, signal.SIGKILL)
    assert spinner > 0.1, spinner  # it ran, so there was something to see
    assert foreign >= spinner - 0.15, (foreign, spinner)  # 0.15: clock ticks and the /proc reads
    # The job's own work (here a child of this process, as a PIL worker is a rank's) is
    # counted as the job's, so it is taken off the busy time, not added to others' load.
    child = subprocess.Popen(SPIN)
    try:
        time.sleep(0.3)
        table = cpu_load._process_table()
        assert child.pid in descendants(cpu_load.job_root(1))
        before, child_before = cpu_load._job_ticks(table, os.getpid()), table[child.pid][1]
        time.sleep(0.5)
        table = cpu_load._process_table()
        after, child_after = cpu_load._job_ticks(table, os.getpid()), table[child.pid][1]
    finally:
        child.kill()
        child.wait()
    assert child_after > child_before  # it ran, and every tick of it is the job's
    assert after - before >= child_after - child_before


def spinner_cores(pid: int, ticks_before: int, start: float) -> float:
    """Cores process ``pid`` kept busy since ``start``, when it had used ``ticks_before``."""
    ticks = cpu_load._process_table()[pid][1] - ticks_before
    return ticks / os.sysconf("SC_CLK_TCK") / (time.monotonic() - start)


def descendants(root: int) -> set[int]:
    table = cpu_load._process_table()
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(p for p, (ppid, _) in table.items() if ppid == pid)
    return found


def test_under_torchrun_the_job_is_the_launchers_children(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cpu_load.job_root(2) == os.getppid()  # the sibling ranks are the job too
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert cpu_load.job_root(2) == os.getpid()


@two_cores
def test_a_cpu_rank_beside_a_busy_process_runs_a_thread_fewer(foreign_spinner, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    share = dist.torch_threads_per_rank(1)
    chosen = dist.choose_torch_threads(1)
    assert chosen.threads <= share - 1, chosen  # fewer still if more is busy
    assert chosen.reason.startswith(f"not {share}: other processes kept ")


def test_cpu_threads_must_be_positive():
    with pytest.raises(TrainerError, match="--cpu-threads must be > 0, got 0"):
        parse_config(["--cpu-threads", "0"])
    assert parse_config(["--cpu-threads", "3"]).cpu_threads == 3


def test_a_resumed_cpu_run_keeps_the_threads_it_started_with():
    from trainer.main import keep_run_cpu_threads

    chosen = cpu_load.TorchThreads(2, "busy now")
    info = dist.DistInfo(0, 1, 0, 1, torch.device("cpu"), True, torch_threads=chosen)
    before = torch.get_num_threads()
    try:
        cfg, kept = keep_run_cpu_threads(
            Config(cpu_threads=2), info, {"config": {"cpu_threads": 1}}
        )
        assert cfg.cpu_threads == 1 and torch.get_num_threads() == 1 and kept.threads == 1
        assert kept.reason.startswith("the run's own, for a bit for bit continuation; this start ")
        # More than this machine's share (moved to a smaller one): this start's count.
        many = dist.torch_threads_per_rank(1) + 1
        cfg, ran = keep_run_cpu_threads(
            Config(cpu_threads=2), info, {"config": {"cpu_threads": many}}
        )
        assert cfg.cpu_threads == 2 and ran == chosen
        # A checkpoint from before the setting existed: nothing to keep.
        assert keep_run_cpu_threads(Config(cpu_threads=2), info, {"config": {}}) == (
            Config(cpu_threads=2),
            chosen,
        )
    finally:
        torch.set_num_threads(before)


def test_busy_machine_benchmark_tables_its_runs_side_by_side(capsys, tmp_path):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import busy_machine

    runs = [
        {"tool": "trainer", "variant": v, "load": load, "images_per_sec": rate, "torch_threads": t}
        for v, load, rate, t in [
            ("auto", "quiet", 120.0, 2), ("auto", "busy", 84.0, 1), ("auto", "busy", 90.0, 1),
            ("fixed 2", "quiet", 126.0, 2), ("fixed 2", "busy", 30.0, 2),
        ]
    ]  # fmt: skip
    auto, fixed = busy_machine.table_rows(runs, ["trainer"], ["auto", "fixed 2"])
    assert auto["busy"] == 87.0 and auto["busy_over_quiet"] == pytest.approx(87 / 120)
    assert fixed["quiet_over_first"] == pytest.approx(126 / 120)
    table = busy_machine.markdown([auto, fixed], busy=1).splitlines()
    assert table[2] == "| trainer | auto | 120.0 | 87.0 | 0.72 | 1.00 | 2; 1 |"
    assert busy_machine.torch_threads_of("x\ntorch: 3 threads per process (...)") == 3
    assert busy_machine.torch_threads_of("img/s (pil on cpu, batch 64, 2 workers, torch 1, amp")
    # A wrong --tools is one line, before any run.
    assert busy_machine.main(["--tools", "trainer,nope"]) == 2
    assert "error: --tools 'trainer,nope': choose from trainer, throughput, predict" in (
        capsys.readouterr().err
    )
    # An existing --json is refused in one line, before any run, unless --overwrite.
    existing = tmp_path / "busy.json"
    existing.write_text("{}")
    assert busy_machine.main(["--json", str(existing)]) == 2
    assert capsys.readouterr().err == (
        f"error: --json {existing} exists: choose another name or pass --overwrite\n"
    )
