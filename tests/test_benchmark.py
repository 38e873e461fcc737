"""The benchmark end to end in CPU mode: real DALI, real PIL workers, real training steps."""

import json
import os
import statistics
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "throughput.py")
TINY_FLAGS = [
    "--arch", "resnet18", "--batch-size", "4", "--image-size", "32", "--amp", "bf16",
    "--workers", "1", "--warmup", "1", "--iters", "2", "--repeats", "2",
    "--boundaries", "2", "--boundary-steps", "2",
]  # fmt: skip
RESULT_FIELDS = {
    "variant", "backend", "mode", "images_per_sec_per_gpu", "images_per_sec_per_gpu_min",
    "images_per_sec_per_gpu_max", "images_per_sec_total", "window_images_per_sec_per_gpu",
    "window_images_per_sec_per_rank", "first_window_above_median_percent",
    "first_window_drift", "host_data_wait_fraction", "gpu_idle_fraction",
    "gap_to_ceiling_percent", "epoch_boundary_seconds", "epoch_boundary_seconds_each",
    "workers", "prefetch", "dali_decode", "hw_decoder_load", "queue_depth_batches",
    "warmup_steps",
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
    assert payload["complete"] is True
    assert isinstance(payload["notes"], list)  # plausibility notes travel with the figures
    assert payload["settings"]["world_size"] == world_size
    assert payload["settings"]["list"] == os.path.abspath(tiny_data.train_list)
    assert payload["environment"].keys() >= ENV_FIELDS
    assert payload["environment"]["dali"]
    rows = {(r["variant"], r["mode"]): r for r in payload["results"]}
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
        assert row["gpu_idle_fraction"] is None  # CPU: no CUDA events, reported as n/a
    ceiling = rows[("synthetic", "synthetic")]["images_per_sec_per_gpu"]
    for backend in ("pil", "dali"):
        train, loader = rows[(backend, "train")], rows[(backend, "loader")]
        assert train["workers"] == 1 and train["prefetch"] == 2
        # Warm-up = the loader's queue (1 PIL worker x prefetch 2; DALI's depth 2) + --warmup 1.
        assert train["queue_depth_batches"] == 2
        assert train["warmup_steps"] == 3
        assert 0.0 <= train["host_data_wait_fraction"] <= 1.0
        assert loader["host_data_wait_fraction"] is None
        assert train["gap_to_ceiling_percent"] == pytest.approx(
            100 * (1 - train["images_per_sec_per_gpu"] / ceiling)
        )
        # Epoch ends timed in train mode: one figure per --boundaries, median reported.
        assert len(train["epoch_boundary_seconds_each"]) == 2
        assert train["epoch_boundary_seconds"] == pytest.approx(
            statistics.median(train["epoch_boundary_seconds_each"])
        )
        assert loader["epoch_boundary_seconds"] is None
    assert rows[("dali", "train")]["dali_decode"] == "cpu"  # auto = cpu without a GPU


@pytest.mark.slow
def test_benchmark_single_process_json_and_table(tiny_data, tmp_path):
    out = tmp_path / "bench.json"
    proc = _run(
        [
            sys.executable,
            SCRIPT,
            "--list",
            tiny_data.train_list,
            *TINY_FLAGS,
            "--json",
            str(out),
            "--cpu-threads",
            "1",
        ],
        tmp_path,
    )
    assert "| loader | mode |" in proc.stdout
    assert "  torch: 1 thread per process (as asked by --cpu-threads)" in proc.stdout
    assert "| gap to ceiling | GPU idle | host data wait |" in proc.stdout
    assert "epoch boundary" in proc.stdout
    assert "warm-up 3 steps = queue 2 batches + --warmup 1" in proc.stdout
    payload = json.loads(out.read_text())
    _check_payload(payload, world_size=1, tiny_data=tiny_data)
    # 120 images at batch 4: 30 steps per epoch, more than the 7 warm-up + windows need.
    assert payload["settings"]["list_repeated"] is False
    assert payload["settings"]["torch_threads_per_rank"] == 1


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


@pytest.mark.slow
def test_benchmark_repeats_a_short_list_so_windows_stay_in_one_epoch(tiny_data, tmp_path):
    """120 images at batch 16 give 7 steps per epoch; warm-up + windows need 2+1+3x2 = 9."""
    out = tmp_path / "bench.json"
    proc = _run(
        [sys.executable, SCRIPT, "--list", tiny_data.train_list, "--backends", "dali",
         "--modes", "loader", "--batch-size", "16", "--image-size", "32", "--workers", "1",
         "--warmup", "1", "--iters", "2", "--repeats", "3", "--boundaries", "0",
         "--json", str(out)],
        tmp_path,
    )  # fmt: skip
    payload = json.loads(out.read_text())
    assert payload["settings"]["list_repeated"] is True
    assert payload["settings"]["measured_list_entries"] == 9 * 16
    assert "same images repeated to 144 entries" in proc.stdout
    (row,) = payload["results"]
    assert len(row["window_images_per_sec_per_gpu"]) == 3
    assert row["epoch_boundary_seconds"] is None  # --boundaries 0


@pytest.mark.slow
def test_benchmark_rejects_unknown_backend(tmp_path):
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--backends", "pil,ffcv", "--list", "unused"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2  # bad input, as every tool of the project
    assert proc.stderr.splitlines() == [
        "error: --backends: unknown loader 'ffcv' in 'ffcv'; choose from pil,pil-gpu,dali"
    ]


@pytest.mark.slow
def test_benchmark_under_broken_srun_variables_is_one_line(tmp_path):
    # The trainer said one line for these; the benchmark, which reads the same variables,
    # ended in a DistSetupError traceback.
    env = {**_env(), "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "n1",
           "SLURM_STEP_TASKS_PER_NODE": "two", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--modes", "loader", "--list", "unused"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: SLURM_STEP_TASKS_PER_NODE='two' is not Slurm's format"
    ]


@pytest.mark.slow
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


@pytest.mark.slow
def test_sweep_ranks_configurations_and_prints_settings_the_trainer_reads(tiny_data, tmp_path):
    """On CPU the sweep is cpu decode x threads x prefetch; its TOML and flags parse as the
    trainer's own settings, equal to the best row."""
    from trainer.config import parse_config

    out, toml = tmp_path / "sweep.json", tmp_path / "best.toml"
    proc = _run(
        [sys.executable, SCRIPT, "--sweep", "--list", tiny_data.train_list, "--arch", "resnet18",
         "--batch-size", "4", "--image-size", "32", "--sweep-threads", "1,2",
         "--sweep-prefetch", "1,2", "--warmup", "1", "--iters", "2", "--repeats", "2",
         "--json", str(out), "--toml", str(toml)],
        tmp_path,
    )  # fmt: skip
    payload = json.loads(out.read_text())
    trained = {r["variant"]: r for r in payload["results"] if r["mode"] == "train"}
    assert sorted(trained) == sorted(
        f"dali:decode=cpu:threads={t}:prefetch={p}" for t in (1, 2) for p in (1, 2)
    )
    assert all(r["dali_decode"] == "cpu" and r["hw_decoder_load"] is None for r in trained.values())
    ranked = [trained[v]["images_per_sec_per_gpu"] for v in payload["sweep"]["ranked"]]
    assert ranked == sorted(ranked, reverse=True)
    best_row = trained[payload["sweep"]["ranked"][0]]
    assert "| rank | decode | threads | hw_decoder_load | prefetch |" in proc.stdout
    assert "best: trainer flags" in proc.stdout
    assert toml.read_text().startswith("# Loader settings measured best")
    assert all(f"# {note}" in toml.read_text() for note in payload["notes"])  # busy machine

    expected = {"loader": "dali", "workers": best_row["workers"], "dali_decode": "cpu",
                "prefetch": best_row["prefetch"], "dali_hw_decoder_load": None}  # fmt: skip
    from_toml = parse_config(["--config", str(toml), "--train-list", tiny_data.train_list])
    flags = payload["sweep"]["best_trainer_flags"].split()
    from_flags = parse_config([*flags, "--train-list", tiny_data.train_list])
    for cfg in (from_toml, from_flags):
        assert {k: getattr(cfg, k) for k in expected} == expected
