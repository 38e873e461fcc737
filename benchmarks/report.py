"""What a benchmark figure needs beside it: the environment it was measured in, a markdown
table a person reads, the JSON a later comparison reads, and an optional bar chart."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata

import torch

from pipelines.fileio import atomic_write_text
from trainer.dist import usable_cpus
from trainer.metrics import PlotUnavailable


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_driver() -> str | None:
    # torch does not expose the driver version; nvidia-smi ships with every driver.
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def environment() -> dict:
    """Versions and hardware, so every figure says what produced it."""
    import PIL
    import PIL.features

    try:
        import nvidia.dali

        dali_version = nvidia.dali.__version__
    except ImportError:
        dali_version = None
    gpu = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "dali": dali_version,
        "pillow": PIL.__version__,
        "libjpeg_turbo": PIL.features.version("libjpeg_turbo"),
        "pillow_simd": "post" in PIL.__version__,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable_cpus(),
        "gpu_name": torch.cuda.get_device_name(0) if gpu else None,
        "gpu_count": torch.cuda.device_count() if gpu else 0,
        "cuda": torch.version.cuda if gpu else None,
        "gpu_driver": _gpu_driver() if gpu else None,
        "hostname": platform.node(),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _percent(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.1f}%"


def windows_cell(row: dict) -> str:
    """Every window's rate, first to last, flagged when the first ran ahead of the median."""
    cell = " / ".join(f"{rate:,.0f}" for rate in row["window_images_per_sec_per_gpu"])
    if row.get("first_window_drift"):
        cell += f" (first +{row['first_window_above_median_percent']:.0f}%: not steady)"
    return cell


def progress_line(row: dict) -> str:
    """One line per measured row, printed as it lands (a cut run still shows it)."""
    line = (
        f"{row['variant']:>12} {row['mode']:<9} {row['images_per_sec_per_gpu']:10.1f} img/s "
        f"per GPU, windows {windows_cell(row)}"
    )
    if row.get("epoch_boundary_seconds") is not None:
        line += f", epoch boundary {row['epoch_boundary_seconds']:.3f} s"
    return line


def header_line(payload: dict) -> str:
    settings, env = payload["settings"], payload["environment"]
    repeated = (
        f", list repeated to {settings['measured_list_entries']:,} entries so warm-up and "
        "windows lie in one epoch"
        if settings["list_repeated"]
        else ""
    )
    same = "".join(
        f"; {label}: the same settings as {earlier}, measured once"
        for label, earlier in settings.get("same_settings", {}).items()
    )
    return (
        f"{settings['arch']}, batch {settings['batch_size_per_gpu']}/GPU, crop "
        f"{settings['image_size']}, amp {settings['amp']}, compile {settings['compile']}, "
        f"{settings['world_size']} x {env['gpu_name'] or 'CPU'} ({env['cpu_count']} CPUs: "
        f"{env['cpu_model']}), {settings['num_images']:,} images{repeated}; median of "
        f"{settings['repeats']} windows x {settings['iters']} steps after a warm-up of each "
        f"loader's queue depth + {settings['warmup_beyond_queue']} steps{same}"
    )


def ceiling_last(rows: list[dict]) -> list[dict]:
    """Rows in measuring order, but the synthetic ceiling (measured first) shown last."""
    return sorted(rows, key=lambda row: row["mode"] == "synthetic")


def markdown_table(rows: list[dict]) -> str:
    """The figures. Headline: gap to ceiling, what the loader costs the training. GPU idle:
    the share of window time the GPU had no training work queued (CUDA only). Host data wait:
    host time blocked in next(loader); high whenever the host merely runs ahead of the GPU,
    so it is no measure of what the GPU lost."""
    header = (
        "| loader | mode | img/s per GPU (median) | windows, first to last | img/s total "
        "| gap to ceiling | GPU idle | host data wait |\n"
        "|---|---|---:|---|---:|---:|---:|---:|\n"
    )
    lines = []
    for row in ceiling_last(rows):
        gap = row.get("gap_to_ceiling_percent")
        loader_row = row["mode"] == "loader"
        no_loader = row["mode"] != "train"  # loader mode waits on nothing else; synthetic has none
        lines.append(
            f"| {row['variant']} | {row['mode']} "
            f"| {_fmt(row['images_per_sec_per_gpu'])} "
            f"| {windows_cell(row)} "
            f"| {_fmt(row['images_per_sec_total'])} "
            f"| {'-' if gap is None else f'{gap:.1f}%'} "
            f"| {'-' if loader_row else _percent(row.get('gpu_idle_fraction'))} "
            f"| {'-' if no_loader else _percent(row.get('host_data_wait_fraction'))} |"
        )
    return header + "\n".join(lines) + "\n"


def loader_table(rows: list[dict]) -> str:
    """What each loader ran with, its warm-up, and what one epoch end costs it."""
    header = (
        "| loader | decode | threads | prefetch | hw_decoder_load | queue (batches) "
        "| warm-up steps | epoch boundary, s (each) |\n"
        "|---|---|---:|---:|---:|---:|---:|---|\n"
    )
    lines, seen = [], set()
    for row in rows:
        if row["backend"] == "synthetic" or row["variant"] in seen:
            continue
        seen.add(row["variant"])
        boundary = next(
            (
                r
                for r in rows
                if r["variant"] == row["variant"] and r.get("epoch_boundary_seconds") is not None
            ),
            None,
        )
        boundary_cell = (
            "-"
            if boundary is None
            else f"{boundary['epoch_boundary_seconds']:.3f} "
            f"({', '.join(f'{c:.3f}' for c in boundary['epoch_boundary_seconds_each'])}; "
            f"{boundary['mode']})"
        )
        hw = row.get("hw_decoder_load")
        lines.append(
            f"| {row['variant']} | {row.get('dali_decode') or '-'} | {row['workers']} "
            f"| {row['prefetch']} | {'-' if hw is None else f'{hw:g}'} "
            f"| {row['queue_depth_batches']} | {row['warmup_steps']} | {boundary_cell} |"
        )
    return header + "\n".join(lines) + "\n"


# Beyond these, a figure says more about the machine's other work than about the loader.
WINDOW_SPREAD_LIMIT = 1.5  # slowest window to fastest, one row
ABOVE_CEILING_LIMIT = 3.0  # percent a train row may exceed the synthetic ceiling (noise)
BUSY_MACHINE_NOTE = (
    "note: these figures look implausible: the machine looks busy or noisy (other processes, "
    "frequency changes); re-measure them on a quiet machine, with more --iters and --repeats"
)


def notes(rows: list[dict]) -> list[str]:
    """Warnings a reader must not miss: a first window not in steady state, and figures that
    cannot be right (windows far apart, training faster than the ceiling)."""
    out = []
    for row in rows:
        if row.get("first_window_drift"):
            out.append(
                f"note: {row['variant']} {row['mode']}: the first window ran "
                f"{row['first_window_above_median_percent']:.0f}% above the median: not steady "
                "state (batches made before timing began, or the machine's load changed); "
                "raise --warmup or rerun"
            )
    implausible = spread_notes(rows) + above_ceiling_notes(rows)
    if implausible:
        out += implausible + [BUSY_MACHINE_NOTE]
    return out


def spread_notes(rows: list[dict]) -> list[str]:
    out = []
    for row in rows:
        rates = row["window_images_per_sec_per_gpu"]
        if min(rates) > 0 and max(rates) / min(rates) > WINDOW_SPREAD_LIMIT:
            out.append(
                f"note: {row['variant']} {row['mode']}: its windows differ "
                # Two decimals: 1.518 is over the 1.5x limit, and "1.5x ... more than the
                # 1.5x" would read as no reason at all.
                f"{max(rates) / min(rates):.2f}x ({min(rates):,.0f} to {max(rates):,.0f} img/s), "
                f"more than the {WINDOW_SPREAD_LIMIT:g}x a steady measurement allows"
            )
    return out


def above_ceiling_notes(rows: list[dict]) -> list[str]:
    out = []
    for row in rows:
        gap = row.get("gap_to_ceiling_percent")
        if row["mode"] == "train" and gap is not None and -gap > ABOVE_CEILING_LIMIT:
            out.append(
                f"note: {row['variant']} train: {row['images_per_sec_per_gpu']:,.1f} img/s is "
                f"{-gap:.0f}% above the synthetic ceiling, which a loader cannot beat"
            )
    return out


def write_json(path: str, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def check_plot_available() -> None:
    """Fail before any measuring when --plot cannot be honoured."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable(
            "--plot needs matplotlib, an optional extra: pip install -e '.[plot]'"
        ) from None


def plot(path: str, rows: list[dict], *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    rows = ceiling_last(rows)

    labels = [f"{r['variant']}\n{r['mode']}" for r in rows]
    medians = [r["images_per_sec_per_gpu"] for r in rows]
    lows = [r["images_per_sec_per_gpu"] - r["images_per_sec_per_gpu_min"] for r in rows]
    highs = [r["images_per_sec_per_gpu_max"] - r["images_per_sec_per_gpu"] for r in rows]
    colors = {"loader": "#4C72B0", "train": "#DD8452", "synthetic": "#55A868"}
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    ax.bar(
        labels,
        medians,
        yerr=[lows, highs],
        capsize=4,
        color=[colors.get(r["mode"], "gray") for r in rows],
    )
    ax.set_ylabel("images/sec per GPU (median, min-max)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _load(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def suite_summary(outdir: str) -> str:
    """gpu_suite.sh's figures in one page, from whatever JSON its stages left (a stage cut by
    its time limit leaves the rows it finished; its file says complete: false)."""
    parts = [f"# Benchmark suite: {os.path.abspath(outdir)}\n"]
    parts.append(trainer_summary(os.path.join(outdir, "trainer", "trainer.json")))
    table = _load(os.path.join(outdir, "table.json"))
    if table:
        parts.append(f"## Table{'' if table.get('complete') else ' (cut: partial)'}\n")
        parts.append(header_line(table) + "\n")
        parts.append(markdown_table(table["results"]) + "\n")  # two tables, not one
        parts.append(loader_table(table["results"]))
        parts.extend(note + "\n" for note in notes(table["results"]))
    else:
        parts.append("table: no results\n")
    for name, title in (
        ("shards", "the list as a tar shard set, DALI defaults"),
        ("small", "mixed against cpu decode"),
    ):
        run = _load(os.path.join(outdir, f"{name}.json"))
        if run:
            parts.append(
                f"\n## {run['settings']['arch']}: {title}"
                f"{'' if run.get('complete') else ' (cut: partial)'}\n"
            )
            parts.append(header_line(run) + "\n")
            parts.append(markdown_table(run["results"]))
    sweep = _load(os.path.join(outdir, "sweep.json"))
    if sweep:
        trained = [r for r in sweep["results"] if r["mode"] == "train"]
        ranked = sorted(trained, key=lambda r: r["images_per_sec_per_gpu"], reverse=True)
        parts.append(f"\n## Sweep{'' if 'sweep' in sweep else ' (cut: partial)'}\n")
        parts.extend(
            f"{i}. {r['variant']}: {r['images_per_sec_per_gpu']:,.1f} img/s per GPU, gap "
            f"{_fmt(r['gap_to_ceiling_percent'])}%\n"
            for i, r in enumerate(ranked, 1)
        )
        parts.extend(note + "\n" for note in notes(sweep["results"]))
        if "sweep" in sweep:
            parts.append(f"\nbest: {sweep['sweep']['best_trainer_flags']}\n")
    else:
        parts.append("\nsweep: no results\n")
    compiled = _load(os.path.join(outdir, "compile.json"))
    parts.append("\n## torch.compile, DALI defaults, train\n")
    plain = {r["mode"]: r for r in (table or {}).get("results", []) if r["variant"] == "dali"}
    plain_ceiling = next(
        (r for r in (table or {}).get("results", []) if r["mode"] == "synthetic"), None
    )
    on = {r["mode"]: r for r in (compiled or {}).get("results", [])}
    for label, rows, ceiling in (
        ("off", plain, plain_ceiling),
        ("on", {k: v for k, v in on.items() if v["variant"] == "dali"}, on.get("synthetic")),
    ):
        train = rows.get("train")
        parts.append(
            f"- compile {label}: train "
            f"{_fmt(train['images_per_sec_per_gpu']) if train else 'not measured'}, ceiling "
            f"{_fmt(ceiling['images_per_sec_per_gpu']) if ceiling else 'not measured'} "
            "img/s per GPU\n"
        )
    parts.append(stages_summary(os.path.join(outdir, STAGES_FILE)))
    return "".join(parts)


def syncs_per_step_text(probe: dict) -> str:
    """A sync_probe report's host syncs per training step, or why there is no figure."""
    if not probe:
        return "no report"
    if not probe.get("cuda"):
        return "not counted (no CUDA)"
    return str(probe.get("syncs_per_step"))


def trainer_summary(path: str) -> str:
    """benchmarks/trainer_check.py's checks and figures: the trainer, stopped and resumed."""
    check = _load(path)
    if check is None:
        return "## Trainer: no results\n\n"
    lines = [f"## Trainer, every feature on, stopped by SIGTERM and resumed ({check['device']})\n"]
    lines += [f"- {'ok' if ok else 'FAILED'}: {name}\n" for name, ok in check["checks"].items()]
    for label in ("stopped", "resumed"):
        run = check[label]
        probe = run.get("probe") or {}
        lines.append(
            f"- run {label}: {run['seconds']} s, {probe.get('train_steps')} steps, host syncs "
            f"per step in the training loop: {syncs_per_step_text(probe)}, hand-off "
            f"waits: {probe.get('handoff_waits', 'n/a') if probe.get('cuda') else 'n/a (no CUDA)'}\n"
        )
        syncs = probe.get("host_syncs")
        if isinstance(syncs, dict):
            lines += [
                f"  - {entry['count']} x {place}"
                f"{' (training loop)' if entry['in_training_loop'] else ''}\n"
                for place, entry in list(syncs.items())[:8]
            ]
        for build in probe.get("pipeline_builds", []):
            memory = (
                f", device memory {build['device_used_before_mib']} -> "
                f"{build['device_used_after_mib']} MiB"
                if build.get("device_used_after_mib") is not None
                else ""
            )
            lines.append(
                f"  - {'train' if build['train'] else 'val'} pipeline build ({build['decode']} "
                f"decode, batch {build['batch_size']}, {build['image_size']} px) to its first "
                f"batch: {build['seconds']:.2f} s{memory}\n"
            )
        if probe.get("device_memory"):
            memory = probe["device_memory"]
            lines.append(
                f"  - device memory: peak in use {memory['peak_used_mib']} MiB, torch's peak "
                f"allocated {memory['torch_peak_allocated_mib']} MiB\n"
            )
    for record in check.get("epochs", []):
        lines.append(
            f"- epoch {record.get('epoch')}: train loss {_fmt(record.get('train_loss'), 4)}, "
            f"val top-1 {_fmt(record.get('val_top1'), 2)}% (EMA "
            f"{_fmt(record.get('val_top1_ema'), 2)}%), "
            f"{_fmt(record.get('images_per_sec_per_gpu'))} img/s per GPU\n"
        )
    return "".join(lines) + "\n"


STAGES_FILE = "stages.tsv"  # gpu_suite.sh: one line per stage, "name<TAB>exit<TAB>seconds"


def stages_summary(path: str) -> str:
    """How each stage of the suite ended: a figure missing above is explained here."""
    if not os.path.isfile(path):
        return ""
    lines = ["\n## Stages\n"]
    with open(path, encoding="utf-8") as f:
        for row in f:
            name, status, seconds, *why = row.rstrip("\n").split("\t")
            if status == "0":
                how = "done"
            elif status == "124":
                how = "cut by its time limit (figures above are partial)"
            elif status == "skipped":
                how = f"skipped: {why[0] if why else 'see the suite output'}"
            else:
                how = f"failed, exit {status} (see {name}.log)"
            lines.append(f"- {name}: {how}, {seconds} s\n")
    return "".join(lines)


if __name__ == "__main__":
    print(suite_summary(sys.argv[1]))
