"""The run's per-epoch records: ``metrics.jsonl`` (one JSON object per epoch, appended and
fsynced), ``metrics.csv`` (the same table for spreadsheets, rewritten from the JSON lines)
and ``metrics.png`` (train/val loss and top-1 per epoch, when matplotlib is installed).

The JSON lines are the record of truth; the CSV and the PNG are views of them, so a resumed
run (which first drops the records after its checkpoint) rewrites both consistently.
"""

from __future__ import annotations

import csv
import io
import json
import os

from pipelines.fileio import atomic_write, atomic_write_text

JSONL = "metrics.jsonl"
CSV = "metrics.csv"
PNG = "metrics.png"


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed; the message says how to get it."""


def read(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, JSONL)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def append(run_dir: str, record: dict) -> None:
    """Add one epoch's record to metrics.jsonl and bring metrics.csv up to date."""
    with open(os.path.join(run_dir, JSONL), "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    write_csv(run_dir, read(run_dir))


def truncate(run_dir: str, *, completed_epochs: int) -> None:
    """Keep the records of the epochs a resumed checkpoint holds; drop any after it."""
    records = read(run_dir)
    if not records:
        return
    kept = [r for r in records if r["epoch"] <= completed_epochs]
    atomic_write_text(os.path.join(run_dir, JSONL), "".join(json.dumps(r) + "\n" for r in kept))
    write_csv(run_dir, kept)


def write_csv(run_dir: str, records: list[dict]) -> None:
    columns: list[str] = []
    for record in records:  # every key of every record, in order of first appearance
        columns += [k for k in record if k not in columns]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: "" if v is None else v for k, v in record.items()})
    atomic_write_text(os.path.join(run_dir, CSV), text.getvalue())


def plot(run_dir: str, out_path: str | None = None) -> str:
    """Draw train/val loss and val top-1 per epoch into a PNG; returns its path.

    Raises PlotUnavailable without matplotlib, FileNotFoundError without records.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable(
            "matplotlib is not installed: pip install -e '.[plot]' to draw metrics.png"
        ) from None
    records = read(run_dir)
    if not records:
        raise FileNotFoundError(f"{os.path.join(run_dir, JSONL)}: no epoch records to plot")
    out_path = out_path or os.path.join(run_dir, PNG)
    epochs = [r["epoch"] for r in records]

    def series(key: str) -> list[float] | None:
        values = [r.get(key) for r in records]
        return values if any(v is not None for v in values) else None

    fig, (loss_ax, top1_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        values = series(key)
        if values:
            loss_ax.plot(epochs, values, marker="o", label=label)
    # Log scale: the first epochs' loss (often far above the rest) would flatten the others.
    loss_ax.set(xlabel="epoch", ylabel="loss (log scale)", title="loss", yscale="log")
    loss_ax.legend()
    for key, label in (("val_top1", "val top-1"), ("val_top1_ema", "val top-1 (EMA)")):
        values = series(key)
        if values:
            top1_ax.plot(epochs, values, marker="o", label=label)
    top1_ax.set(xlabel="epoch", ylabel="%", title="top-1 accuracy")
    if top1_ax.lines:
        top1_ax.legend()
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    atomic_write(out_path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return out_path
