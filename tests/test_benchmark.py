"""The benchmark end to end in CPU mode: real DALI, real PIL workers, real training steps."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "throughput.py")
TINY_FLAGS = [
    "--arch", "resnet18", "--batch-size", "4", "--image-size", "32", "--amp", "bf16",
    "--workers", "1", "--warmup", "1", "--iters", "2", "--repeats", "2",
]  # fmt: skip
RESULT_FIELDS = {
    "backend", "mode", "images_per_sec_per_gpu", "images_per_sec_per_gpu_min",
    "images_per_sec_per_gpu_max", "images_per_sec_total", "window_images_per_sec_per_gpu",
    "window_images_per_sec_per_rank", "data_wait_fraction", "gap_to_ceiling_percent",
    "workers", "dali_decode",
}  # fmt: skip
ENV_FIELDS = {
    "python", "torch", "torchvision", "dali", "pillow", "libjpeg_turbo", "cpu_model",
    "cpu_count", "gpu_name", "gpu_driver", "command",
}  # fmt: skip


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}


def _run(cmd, tmp_path):
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _check_payload(payload, *, world_size, tiny_data):
    assert payload["settings"]["world_size"] == world_size
    assert payload["settings"]["list"] == os.path.abspath(tiny_data.train_list)
    assert payload["settings"]["workers_per_gpu"] == 1
    assert payload["environment"].keys() >= ENV_FIELDS
    assert payload["environment"]["dali"]
    rows = {(r["backend"], r["mode"]): r for r in payload["results"]}
    assert set(rows) == {
        ("pil", "loader"), ("pil", "train"), ("dali", "loader"), ("dali", "train"),
        ("synthetic", "synthetic"),
    }  # fmt: skip
    for row in rows.values():
        assert row.keys() >= RESULT_FIELDS
        windows = row["window_images_per_sec_per_gpu"]
        assert len(windows) == 2 and all(w > 0 for w in windows)
        assert len(row["window_images_per_sec_per_rank"]) == world_size
        assert row["images_per_sec_per_gpu_min"] <= row["images_per_sec_per_gpu"]
        assert row["images_per_sec_per_gpu"] <= row["images_per_sec_per_gpu_max"]
        assert row["images_per_sec_total"] == pytest.approx(
            row["images_per_sec_per_gpu"] * world_size
        )
    for backend in ("pil", "dali"):
        train = rows[(backend, "train")]
        assert 0.0 <= train["data_wait_fraction"] <= 1.0
        ceiling = rows[("synthetic", "synthetic")]["images_per_sec_per_gpu"]
        assert train["gap_to_ceiling_percent"] == pytest.approx(
            100 * (1 - train["images_per_sec_per_gpu"] / ceiling)
        )


def test_benchmark_single_process_json_and_table(tiny_data, tmp_path):
    out = tmp_path / "bench.json"
    proc = _run(
        [sys.executable, SCRIPT, "--list", tiny_data.train_list, *TINY_FLAGS, "--json", str(out)],
        tmp_path,
    )
    assert "| backend | mode |" in proc.stdout
    assert "PIL workers = DALI threads" in proc.stdout
    _check_payload(json.loads(out.read_text()), world_size=1, tiny_data=tiny_data)


@pytest.mark.slow
def test_benchmark_under_torchrun_totals_are_per_gpu_times_ranks(tiny_data, tmp_path):
    out = tmp_path / "bench.json"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    _run(
        [torchrun, "--standalone", "--nproc_per_node=2", SCRIPT, "--list", tiny_data.train_list,
         *TINY_FLAGS, "--json", str(out)],
        tmp_path,
    )  # fmt: skip
    _check_payload(json.loads(out.read_text()), world_size=2, tiny_data=tiny_data)


def test_benchmark_rejects_unknown_backend(tmp_path):
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--backends", "pil,ffcv", "--list", "unused"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "--backends" in proc.stderr and "ffcv" in proc.stderr


def test_benchmark_plot_or_clear_message(tiny_data, tmp_path):
    """--plot writes a PNG with matplotlib (an optional extra), else fails before measuring."""
    import importlib.util

    png = tmp_path / "bench.png"
    cmd = [sys.executable, SCRIPT, "--list", tiny_data.train_list, *TINY_FLAGS]
    cmd += ["--backends", "dali", "--modes", "loader", "--plot", str(png)]
    if importlib.util.find_spec("matplotlib") is None:
        proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True)
        assert proc.returncode != 0
        assert "matplotlib" in proc.stderr and "pip install" in proc.stderr
        assert "img/s" not in proc.stdout  # refused before any measuring
    else:
        _run(cmd, tmp_path)
        assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
