"""--tensorboard: event files a user can watch, continued without duplicates after a resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(REPO, "trainer", "main.py")


def flags(tiny_data, out, *extra) -> list[str]:
    return [
        "--train-list", tiny_data.train_list, "--arch", "resnet18", "--image-size", "32",
        "--batch-size", "8", "--epochs", "2", "--workers", "1", "--log-interval", "1",
        "--ema-decay", "0.9", "--tensorboard", "--no-plots", "--output-dir", str(out), *extra,
    ]  # fmt: skip


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


@pytest.mark.slow
def test_without_tensorboard_one_error_line(tiny_data, tmp_path):
    # A tensorboard that cannot be imported, first on the path: a machine without it.
    shim = tmp_path / "shim" / "tensorboard"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('no tensorboard here')\n")
    env = {**os.environ, "PYTHONPATH": f"{shim.parent}{os.pathsep}{REPO}"}
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, MAIN, *flags(tiny_data, out)], capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: --tensorboard needs the tensorboard package: pip install "
        "'dali-resnet-trainer[tensorboard]' (or pip install tensorboard)"
    ], proc.stderr
    assert not (out / "last.pt").exists()


@pytest.mark.slow
def test_curves_of_a_run_stopped_and_resumed_have_every_step_once(tiny_data, tmp_path):
    from test_trainer import read_metrics, run, start, wait_for_line

    out = tmp_path / "run"
    proc = start([sys.executable, MAIN, *flags(tiny_data, out)], cwd=tmp_path)
    wait_for_line(proc, "epoch 2/2 step 4/15")
    proc.send_signal(signal.SIGTERM)  # saves at an agreed step a little later
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    run([sys.executable, MAIN, *flags(tiny_data, out, "--resume", "auto")], cwd=tmp_path)
    curves = scalars(out / "tensorboard")
    # Every training step once, in order, across the two runs' files: 2 epochs of 15.
    for tag in ("train/loss", "train/lr", "train/images_per_sec_per_gpu", "train/data_wait"):
        assert [step for step, _ in curves[tag]] == list(range(1, 31)), tag
    # Per epoch, at the epoch's last step: what metrics.jsonl says.
    metrics = read_metrics(out)
    assert [step for step, _ in curves["val/top1"]] == [15, 30]
    for (_, value), record in zip(curves["val/top1"], metrics, strict=True):
        assert value == pytest.approx(record["val_top1"])
    for (_, value), record in zip(curves["val_ema/top1"], metrics, strict=True):
        assert value == pytest.approx(record["val_top1_ema"])
    assert [round(v, 6) for _, v in curves["train/epoch_loss"]] == [
        round(r["train_loss"], 6) for r in metrics
    ]
    # The lr curve is the one the run applied (the last step's lr is what the epoch logs).
    assert curves["train/lr"][14][1] == pytest.approx(metrics[0]["lr"])
