"""The run's records: metrics.jsonl, its CSV view, the PNG, and tools/plot_metrics.py."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings

import torch

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


def plot_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("plot_metrics_cli", PLOT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_damaged_line_is_named_and_a_torn_tail_is_dropped_on_resume(tmp_path):
    good = "".join(json.dumps(record(e, 10.0 * e)) + "\n" for e in (1, 2))
    path = tmp_path / "metrics.jsonl"
    path.write_text(good + '{"epoch": 3, "train_lo')  # an append cut short by a kill
    try:
        metrics.read(str(tmp_path))
        raise AssertionError("a damaged line was read")
    except metrics.MetricsError as e:
        assert str(e).startswith(f"{path}:3: not an epoch record")
    metrics.truncate(str(tmp_path), completed_epochs=2)  # what a resume does first
    assert path.read_text() == good
    path.write_text('{"epoch": 1}\n[1, 2]\n' + good)  # damage inside: never dropped silently
    try:
        metrics.read(str(tmp_path), drop_torn_tail=True)
        raise AssertionError("a damaged line was read")
    except metrics.MetricsError as e:
        assert f"{path}:2:" in str(e)


def test_plot_tool_refuses_in_one_line_and_writes_the_suffix_format(tmp_path, capsys):
    tool = plot_tool()
    for epoch in (1, 2):
        metrics.append(str(tmp_path), record(epoch, 50.0 + epoch))
    jpg = tmp_path / "x.jpg"
    assert tool.main([str(tmp_path), "--out", str(jpg)]) == 0
    assert jpg.read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG bytes, not a PNG under .jpg
    before = jpg.read_bytes()
    assert tool.main([str(tmp_path), "--out", str(jpg)]) == 2
    assert tool.main([str(tmp_path), "--out", str(tmp_path / "x.doc")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"error: --out {jpg} exists: choose another name or pass --overwrite"
    assert err[1].startswith(f"error: {tmp_path / 'x.doc'}: matplotlib cannot write .doc")
    assert jpg.read_bytes() == before and not (tmp_path / "x.doc").exists()
    assert tool.main([str(tmp_path), "--out", str(jpg), "--overwrite"]) == 0
    assert tool.main([str(tmp_path)]) == 0  # the run's own metrics.png: redrawn freely
    assert tool.main([str(tmp_path)]) == 0
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write("{half a line\n")
    assert tool.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"error: {tmp_path / 'metrics.jsonl'}:3: not an epoch record (a JSON object per line); the file is damaged, e.g. a line cut short: remove or repair that line\n"
    )
    assert "--overwrite" in tool.build_parser().format_help()


def test_worst_classes_line_with_many_classes_and_commas_in_names(tmp_path):
    # 1000 classes: 995 at 0% (some of 1 image, some of 2), 3 right, 2 with no val image.
    names = [f"n{k:08d}, a name with a comma" for k in range(1000)]
    confusion = torch.zeros(1000, 1000, dtype=torch.int64)
    for c in range(995):
        confusion[c, (c + 1) % 1000] = 1 + (c >= 990)  # classes 990-994: 0% of 2
    for c in (995, 996, 997):
        confusion[c, c] = 1
    rows = metrics.write_per_class(str(tmp_path), confusion, names)
    assert [r["class"][:9] for r in rows[:5]] == [f"n{k:08d}" for k in range(990, 995)]
    assert rows[-1]["top1"] is None and rows[-2]["top1"] is None  # no val image: last
    line = metrics.describe_worst(rows)
    assert line.count("; ") == 4 and line.startswith("n00000990, a name with a comma 0.0% of 2")
    assert line.endswith(" (and 990 more classes at 0.0%)")
    # No others tied: nothing added.
    assert "more classes" not in metrics.describe_worst(rows[:5] + rows[-5:])
    # One more at the fifth's top-1 is one class, not "1 more classes".
    assert metrics.describe_worst(rows[:6] + rows[-5:]).endswith(" (and 1 more class at 0.0%)")
    with open(tmp_path / metrics.PER_CLASS, encoding="utf-8", newline="") as f:
        table = list(csv.DictReader(f))
    assert table[0]["class"] == names[0] and table[998]["top1"] == ""


def test_confusion_png_of_names_the_font_cannot_draw_shows_indices_without_warnings(tmp_path):
    # DejaVu Sans (matplotlib's default) has no CJK glyphs: the names would be rows of boxes
    # and a warning per character on stderr; Latin accents and dashes it has.
    names = [f"类别{chr(0x4E00 + 37 * k)} 名称" for k in range(3)]
    assert not metrics._drawable(names)
    assert metrics._drawable(["tench, Tinca tinca", 'naïve café — "quoted"'])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = metrics.plot_confusion(str(tmp_path), torch.eye(3, dtype=torch.int64), names)
    assert os.path.getsize(path) > 1000
