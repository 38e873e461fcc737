"""Start-up's objects frozen out of the garbage collector's walk (pipelines/heap.py): in the
trainer's own process, and never in a caller's."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import pytest
from test_trainer import MAIN, REPO

# Runs a command's script as its own program, then says, as the interpreter exits, what the
# collector still walks: its atexit hook runs after the script's own exit.
AT_EXIT = r"""
import atexit, gc, json, runpy, sys
def said():
    print(json.dumps({"frozen": gc.get_freeze_count(), "walked": len(gc.get_objects()),
                      "dynamo": "torch._dynamo" in sys.modules}), file=sys.stderr)
atexit.register(said)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow  # a trainer process of its own
def test_the_trainers_process_freezes_its_start_up_and_a_caller_keeps_its_own(tmp_path):
    missing = tmp_path / "nowhere" / "Train.txt"
    proc = subprocess.run(
        [sys.executable, "-c", AT_EXIT, MAIN, "--train-list", str(missing),
         "--output-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": REPO},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    error, counts = proc.stderr.strip().splitlines()[-2:]
    assert error.startswith("error: ") and str(missing) in error  # the bad input, one line
    counts = json.loads(counts)
    # torch's, torch._dynamo's and the trainer's modules: frozen, so the two collections at
    # exit (DALI's atexit hook, the interpreter's) and any on the way skip them.
    assert counts["dynamo"] and counts["frozen"] > 200_000, counts
    assert counts["walked"] < counts["frozen"] / 5, counts

    # Called in-process (as the tests do), main() leaves the caller's collector as it was.
    from trainer import main as trainer_main

    before = gc.get_freeze_count()
    assert trainer_main.main(["--train-list", str(missing)]) == 2
    assert gc.get_freeze_count() == before
