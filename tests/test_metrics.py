"""The run's records: metrics.jsonl, its CSV view, the PNG, and tools/plot_metrics.py."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

from trainer import metrics
from trainer.engine import format_duration

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLOT = os.path.join(REPO, "tools", "plot_metrics.py")


def record(epoch: int, top1: float | None) -> dict:
    return {"epoch": epoch, "train_loss": 2.0 / epoch, "val_top1": top1, "val_loss": 1.0 / epoch}


def test_append_keeps_csv_in_step_and_truncate_drops_later_epochs(tmp_path):
    for epoch in (1, 2, 3):
        metrics.append(str(tmp_path), record(epoch, 10.0 * epoch))
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert float(rows[2]["val_top1"]) == 30.0
    metrics.truncate(str(tmp_path), completed_epochs=1)  # a resume from epoch 1's checkpoint
    assert [r["epoch"] for r in metrics.read(str(tmp_path))] == [1]
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1"]
    # No validation: empty cells, not the word None.
    metrics.append(str(tmp_path), record(2, None))
    with open(tmp_path / "metrics.csv") as f:
        assert f.read().splitlines()[-1] == "2,1.0,,0.5"


def test_plot_writes_a_png(tmp_path):
    for epoch in (1, 2):
        metrics.append(str(tmp_path), record(epoch, 50.0 + epoch))
    path = metrics.plot(str(tmp_path))
    assert path == str(tmp_path / "metrics.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    proc = subprocess.run(
        [sys.executable, PLOT, str(tmp_path), "--out", str(tmp_path / "other.png")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and (tmp_path / "other.png").stat().st_size > 1000


def test_plot_tool_without_matplotlib_or_records_is_one_line(tmp_path):
    # A matplotlib that cannot be imported, first on the path: what a machine without it sees.
    shim = tmp_path / "shim" / "matplotlib"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps(record(1, 20.0)) + "\n")
    env = {**os.environ, "PYTHONPATH": f"{shim.parent}{os.pathsep}{REPO}"}
    proc = subprocess.run(
        [sys.executable, PLOT, str(run_dir)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: matplotlib is not installed: pip install -e '.[plot]' to draw metrics.png"
    ]
    proc = subprocess.run([sys.executable, PLOT, str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "no epoch records" in proc.stderr


def test_format_duration():
    assert [format_duration(s) for s in (0, 4.4, 65, 3599, 7620)] == [
        "0s", "4s", "1m05s", "59m59s", "2h07m",
    ]  # fmt: skip
