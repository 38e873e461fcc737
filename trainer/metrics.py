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


class MetricsError(ValueError):
    """metrics.jsonl holds a line that is not an epoch record; the message names file:line."""


class PlotFormatError(ValueError):
    """A picture path whose suffix matplotlib cannot write."""


def read(run_dir: str, *, drop_torn_tail: bool = False) -> list[dict]:
    """The epoch records of ``run_dir/metrics.jsonl`` ([] without the file).

    A line that is not a JSON object raises MetricsError naming ``file:line``. With
    ``drop_torn_tail``, a bad last line without its newline (an append cut short by a kill)
    is left out instead: what a resumed run expects to find.
    """
    path = os.path.join(run_dir, JSONL)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = _record(line)
        if record is None:
            if drop_torn_tail and number == len(lines) and not line.endswith("\n"):
                break
            raise MetricsError(
                f"{path}:{number}: not an epoch record (a JSON object per line); the file is "
                "damaged, e.g. a line cut short: remove or repair that line"
            )
        records.append(record)
    return records


def _record(line: str) -> dict | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def append(run_dir: str, record: dict) -> None:
    """Add one epoch's record to metrics.jsonl and bring metrics.csv up to date."""
    with open(os.path.join(run_dir, JSONL), "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    write_csv(run_dir, read(run_dir))


def truncate(run_dir: str, *, completed_epochs: int) -> None:
    """Keep the records of the epochs a resumed checkpoint holds; drop any after it, and a
    last line cut short by the kill the run is resumed from."""
    records = read(run_dir, drop_torn_tail=True)
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


def figure_format(path: str) -> str:
    """The picture format matplotlib writes for ``path``: its suffix (png without one).

    Checked before drawing, so ``x.jpg`` gets JPEG bytes (not PNG ones under a .jpg name) and
    ``x.doc`` is refused at once. PlotUnavailable without matplotlib.
    """
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise PlotUnavailable(
            "matplotlib is not installed: pip install -e '.[plot]' to draw pictures"
        ) from None
    suffix = os.path.splitext(path)[1].lower().lstrip(".")
    if not suffix:
        return "png"
    supported = FigureCanvasBase.get_supported_filetypes()
    if suffix not in supported:
        raise PlotFormatError(
            f"{path}: matplotlib cannot write .{suffix} pictures; use one of "
            + ", ".join(f".{s}" for s in sorted(supported))
        )
    return suffix


def plot(run_dir: str, out_path: str | None = None) -> str:
    """Draw train/val loss and val top-1 per epoch into a picture (PNG by default, else the
    format ``out_path``'s suffix names); returns its path.

    Raises PlotUnavailable without matplotlib, PlotFormatError for a suffix it cannot write,
    FileNotFoundError without records, MetricsError for a damaged metrics.jsonl.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable(
            "matplotlib is not installed: pip install -e '.[plot]' to draw metrics.png"
        ) from None
    out_path = out_path or os.path.join(run_dir, PNG)
    picture_format = figure_format(out_path)
    records = read(run_dir)
    if not records:
        raise FileNotFoundError(f"{os.path.join(run_dir, JSONL)}: no epoch records to plot")
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
    atomic_write(out_path, lambda f: fig.savefig(f, format=picture_format, dpi=100))
    plt.close(fig)
    return out_path


PER_CLASS = "per_class.csv"
CONFUSION_CSV = "confusion_matrix.csv"
CONFUSION_PNG = "confusion_matrix.png"
PER_CLASS_FILES = (PER_CLASS, CONFUSION_CSV, CONFUSION_PNG)


def per_class_rows(confusion, class_names: list[str]) -> list[dict]:
    """Per class: images, top-1 accuracy (= recall), precision and recall, in percent.

    ``confusion[t, p]`` counts the images of true class t predicted as p. A class with no
    val image has no accuracy (empty), one never predicted has no precision.
    """
    matrix = confusion.tolist()
    rows = []
    for c, name in enumerate(class_names):
        images = sum(matrix[c])
        predicted = sum(row[c] for row in matrix)
        correct = matrix[c][c]
        recall = 100.0 * correct / images if images else None
        rows.append(
            {
                "class": name,
                "images": images,
                "top1": recall,
                "precision": 100.0 * correct / predicted if predicted else None,
                "recall": recall,
            }
        )
    return rows


def write_per_class(run_dir: str, confusion, class_names: list[str]) -> list[dict]:
    """per_class.csv and confusion_matrix.csv (rows: true class, columns: predicted) in
    ``run_dir``; returns the rows, worst top-1 first (classes without images last)."""
    rows = per_class_rows(confusion, class_names)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else (f"{v:.2f}" if isinstance(v, float) else v)
                         for k, v in row.items()})  # fmt: skip
    atomic_write_text(os.path.join(run_dir, PER_CLASS), text.getvalue())
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["true \\ predicted", *class_names])
    for name, counts in zip(class_names, confusion.tolist(), strict=True):
        writer.writerow([name, *counts])
    atomic_write_text(os.path.join(run_dir, CONFUSION_CSV), text.getvalue())
    # Among classes of equal top-1, the one with more images first: more evidence.
    return sorted(rows, key=lambda r: (r["top1"] is None, r["top1"] or 0.0, -r["images"]))


def describe_worst(rows: list[dict], n: int = 5) -> str:
    """The ``n`` worst classes of ``write_per_class``'s rows, for one log line.

    Classes are separated by "; ", as names may hold commas (ImageNet's "tench, Tinca
    tinca"). When more classes share the last one's top-1 (with many classes, hundreds may
    be at 0%), their count is added, so the five shown do not read as the only ones there.
    """
    scored = [r for r in rows if r["top1"] is not None]
    worst = scored[:n]
    text = "; ".join(f"{r['class']} {r['top1']:.1f}% of {r['images']}" for r in worst)
    tied = sum(r["top1"] == worst[-1]["top1"] for r in scored[n:]) if worst else 0
    if tied:
        more = "1 more class" if tied == 1 else f"{tied} more classes"
        text += f" (and {more} at {worst[-1]['top1']:.1f}%)"
    return text


def _drawable(names: list[str]) -> bool:
    """Whether matplotlib's default font has a glyph for every character of ``names``."""
    from matplotlib import font_manager, ft2font

    font = ft2font.FT2Font(font_manager.findfont(font_manager.FontProperties()))
    glyphs = font.get_charmap()
    return all(ord(c) in glyphs for name in names for c in name if not c.isspace())


def plot_confusion(run_dir: str, confusion, class_names: list[str]) -> str:
    """confusion_matrix.png: each row (true class) as shares of its images. PlotUnavailable
    without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable(
            f"matplotlib is not installed: pip install -e '.[plot]' to draw {CONFUSION_PNG}"
        ) from None
    shares = confusion.double()
    shares = shares / shares.sum(1, keepdim=True).clamp(min=1)
    n = len(class_names)
    side = min(4 + 0.35 * n, 40)
    fig, ax = plt.subplots(figsize=(side, side))
    image = ax.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 50:  # beyond that, names would be unreadable
        # Names the font cannot draw (CJK in DejaVu Sans) would be rows of identical boxes,
        # and a warning per missing character on stderr: label k is shown as k instead.
        labels = class_names if _drawable(class_names) else [str(k) for k in range(n)]
        ax.set_xticks(range(n), labels, rotation=90)
        ax.set_yticks(range(n), labels)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (share of each true class)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = os.path.join(run_dir, CONFUSION_PNG)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path
