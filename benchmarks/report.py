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
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "gpu_name": torch.cuda.get_device_name(0) if gpu else None,
        "gpu_count": torch.cuda.device_count() if gpu else 0,
        "cuda": torch.version.cuda if gpu else None,
        "gpu_driver": _gpu_driver() if gpu else None,
        "hostname": platform.node(),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown_table(rows: list[dict]) -> str:
    header = (
        "| backend | mode | img/s per GPU (median) | min | max | img/s total "
        "| gap to ceiling | data wait |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for row in rows:
        gap = row.get("gap_to_ceiling_percent")
        wait = row.get("data_wait_fraction")
        lines.append(
            f"| {row['backend']} | {row['mode']} "
            f"| {_fmt(row['images_per_sec_per_gpu'])} "
            f"| {_fmt(row['images_per_sec_per_gpu_min'])} "
            f"| {_fmt(row['images_per_sec_per_gpu_max'])} "
            f"| {_fmt(row['images_per_sec_total'])} "
            f"| {'-' if gap is None else f'{gap:.1f}%'} "
            f"| {'-' if wait is None else f'{100 * wait:.0f}%'} |"
        )
    return header + "\n".join(lines) + "\n"


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def check_plot_available() -> None:
    """Fail before any measuring when --plot cannot be honoured."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(
            "error: --plot needs matplotlib, an optional extra: pip install -e '.[plot]'"
        ) from None


def plot(path: str, rows: list[dict], *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    labels = [f"{r['backend']}\n{r['mode']}" for r in rows]
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
