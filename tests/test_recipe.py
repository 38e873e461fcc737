"""Behaviours of the training recipe that a user relies on and a log line would not show:
what the loss is given under mixup and CutMix, how CutMix weighs its labels, how often
gradient accumulation talks to the other ranks, per-class precision and recall, a checkpoint
write that fails half-way, validation under progressive resizing, and an exact mid-epoch
resume with mixup and CutMix on. (Each was once broken on purpose while the suite passed.)"""

from __future__ import annotations

import os
import re
import signal
import sys

import pytest
import torch
from torch import nn

from trainer import dist
from trainer.config import Config
from trainer.engine import make_optimizer, make_scaler, train_step
from trainer.main import make_batch_transform


def recording_criterion(seen: list):
    loss = nn.CrossEntropyLoss()

    def criterion(logits, targets):
        seen.append(targets.detach().clone())
        return loss(logits, targets)

    return criterion


@pytest.mark.parametrize("which", ["mixup", "cutmix"])
def test_the_loss_gets_the_mixed_soft_targets_and_the_model_the_mixed_images(which):
    cfg = Config(mixup_alpha=0.4 if which == "mixup" else 0.0,
                 cutmix_alpha=1.0 if which == "cutmix" else 0.0, num_classes=5)  # fmt: skip
    mix = make_batch_transform(cfg)
    images = torch.rand(6, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    torch.manual_seed(11)
    want_images, want_targets = mix(images.clone(), labels.clone())
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 5))
    seen_inputs: list = []
    model.register_forward_pre_hook(lambda _m, args: seen_inputs.append(args[0].clone()))
    seen_targets: list = []
    torch.manual_seed(11)  # the same draw as above
    train_step(
        model, images, labels, criterion=recording_criterion(seen_targets),
        optimizer=make_optimizer(model, name="sgd", lr=0.1), scaler=make_scaler(None, images.device),
        batch_transform=mix,
    )  # fmt: skip
    (targets,) = seen_targets
    assert targets.dtype.is_floating_point and targets.shape == (6, 5)  # soft, not the labels
    assert torch.equal(targets, want_targets)
    assert torch.equal(seen_inputs[0], want_images)
    assert (targets.max(1).values < 1).any()


def test_cutmix_weighs_each_label_by_the_share_of_its_own_pixels_left():
    mix = make_batch_transform(Config(cutmix_alpha=1.0, num_classes=8))
    count = 8
    # Image i is one value, i + 1, everywhere: a pixel's value says whose it is.
    images = (
        torch.arange(1, count + 1, dtype=torch.float32)
        .view(count, 1, 1, 1)
        .expand(count, 3, 20, 30)
    )
    labels = torch.arange(count)
    checked = 0
    for seed in range(20):
        torch.manual_seed(seed)
        mixed, targets = mix(images.clone(), labels.clone())
        for i in range(count):
            own = (mixed[i, 0] == i + 1).float().mean().item()
            assert targets[i, i].item() == pytest.approx(own, abs=1e-6), (seed, i)
            others = targets[i].sum().item() - targets[i, i].item()
            assert others == pytest.approx(1 - own, abs=1e-6)
            checked += 0 < own < 1
    assert checked > 0  # some draws cut a box that neither covers nor misses the image


def test_gradient_accumulation_all_reduces_once_per_optimizer_step(tmp_path):
    """DDP over gloo (one rank, a real process group): the all-reduce hook runs for the last
    micro-step of each optimizer step only (no_sync on the others)."""
    import torch.distributed as dist
    from conftest import free_port
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)))
        calls: list[int] = []

        def counting_hook(state, bucket):
            calls.append(bucket.index())
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        model.register_comm_hook(None, counting_hook)
        opt = make_optimizer(model, name="sgd", lr=0.1)
        micro_steps, optimizer_steps = 4, 3
        for step in range(micro_steps * optimizer_steps):
            train_step(
                model, torch.rand(2, 3, 2, 2), torch.tensor([0, 2]),
                criterion=nn.CrossEntropyLoss(), optimizer=opt,
                scaler=make_scaler(None, torch.device("cpu")),
                micro_step=step % micro_steps, micro_steps=micro_steps,
            )  # fmt: skip
        buckets = len(set(calls))
        assert len(calls) == optimizer_steps * buckets, calls
    finally:
        dist.destroy_process_group()


def test_per_class_precision_and_recall_on_an_asymmetric_confusion_matrix(tmp_path):
    import csv

    from trainer.metrics import PER_CLASS, write_per_class

    # confusion[true, predicted]: column sums (predictions) differ from row sums (images).
    confusion = torch.tensor([[5, 1, 0], [3, 2, 0], [0, 4, 1]])
    write_per_class(str(tmp_path), confusion, ["a", "b", "c"])
    with open(tmp_path / PER_CLASS, newline="") as f:
        rows = {row["class"]: row for row in csv.DictReader(f)}
    want = {  # precision = correct / predicted as it; recall = correct / its images
        "a": (6, 5 / 8, 5 / 6), "b": (5, 2 / 7, 2 / 5), "c": (5, 1 / 1, 1 / 5),
    }  # fmt: skip
    for name, (images, precision, recall) in want.items():
        row = rows[name]
        assert int(row["images"]) == images
        assert float(row["precision"]) == pytest.approx(100 * precision, abs=0.006)
        assert float(row["recall"]) == pytest.approx(100 * recall, abs=0.006)
        assert row["top1"] == row["recall"]


class FailsHalfway:
    """Pickling it fails after torch.save has written part of the file."""

    def __reduce__(self):
        raise OSError(28, "No space left on device")


def test_a_checkpoint_write_that_fails_half_way_keeps_the_previous_one(tmp_path):
    from trainer import checkpoint as ckpt_io
    from trainer.config import TrainerError

    path = tmp_path / ckpt_io.LAST
    first = {"epoch": 1, "model": {"w": torch.arange(1000.0)}}
    ckpt_io.atomic_save(first, str(path))
    before = path.read_bytes()
    # A large tensor first, so the failure comes after bytes were written.
    second = {"epoch": 2, "model": {"w": torch.ones(200_000)}, "extra": FailsHalfway()}
    with pytest.raises(
        TrainerError, match=r"could not write .*last.pt .*the previous one is intact"
    ):
        ckpt_io.atomic_save(second, str(path))
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == [ckpt_io.LAST]  # no partial file, under any name


# --- whole runs -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["dali", "pil"])
def test_progressive_resize_validates_at_the_image_size(
    tiny_data, tmp_path, loader, monkeypatch, capsys
):
    """Training crops grow 24 -> 32 px (with --auto-augment, both reaching the loader);
    validation runs at --image-size 32 every epoch: the last epoch's val figures are those of
    --eval-only on the saved weights at 32 px. Both runs in this process (no bit-for-bit
    comparison with another process here)."""
    import json

    from test_trainer import read_metrics, tiny_flags

    from trainer.main import main

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    out = tmp_path / "run"
    # Not 16 px: with 16 px crops resnet18's layer4 sees a 1x1 input, and torch's CPU bf16
    # convolution backward then intermittently (2 runs in 6) writes NaN into the weight
    # gradient of a kernel tap that sees only padding (layer4.0.conv1, [:, 1, 1, 2], step 1);
    # float32, and 24 px (a 2x2 input), never did in 6 and 8 runs. The divergence check
    # stopped those runs with its one line.
    flags = tiny_flags(
        tiny_data, out, "--epochs", "2", "--progressive-resize", "24:32:1", "--loader", loader,
        "--ema-decay", "0", "--auto-augment", "trivial",
    )  # fmt: skip
    assert main(flags) in (0, None)
    assert "epoch 2: training crops of 32 px (--progressive-resize)" in capsys.readouterr().out
    last = read_metrics(out)[-1]
    assert [m["train_image_size"] for m in read_metrics(out)] == [24, 32]
    saved = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["config"]
    assert saved["auto_augment"] == "trivial" and saved["image_size"] == 32  # val size
    evaluated = tmp_path / "eval"
    eval_flags = tiny_flags(
        tiny_data, evaluated, "--eval-only", "--resume", str(out / "last.pt"), "--loader", loader
    )
    assert main(eval_flags) in (0, None)
    with open(evaluated / "eval.json") as f:
        one = json.load(f)
    assert one["val_top1"] == pytest.approx(last["val_top1"], abs=1e-6)
    assert one["val_loss"] == pytest.approx(last["val_loss"], rel=1e-5)


@pytest.mark.slow
def test_a_mid_epoch_resume_with_mixup_and_cutmix_is_exact(tiny_data, tmp_path):
    from test_trainer import MAIN, assert_same_weights, run, start, tiny_flags, wait_for_line

    extra = [
        "--epochs",
        "1",
        "--log-interval",
        "1",
        "--mixup-alpha",
        "0.4",
        "--cutmix-alpha",
        "1.0",
    ]
    # One torch thread, asked for and saved with the run; the resume leaves the count to the
    # trainer with every core allowed (not OMP_NUM_THREADS=1): on a quiet machine this start
    # alone would run more threads, which sum in another order, but the run keeps its own and
    # ends on the same bits. (On a busy one this start would choose 1 by itself.)
    cores = str(dist.usable_cpus())
    reference = tmp_path / "reference"
    run(
        [sys.executable, MAIN, *tiny_flags(tiny_data, reference, *extra, "--cpu-threads", "1")],
        cwd=tmp_path,
    )
    out = tmp_path / "stopped"
    proc = start(
        [sys.executable, MAIN, *tiny_flags(tiny_data, out, *extra, "--cpu-threads", "1")],
        cwd=tmp_path,
    )
    wait_for_line(proc, "epoch 1/1 step 8/15")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    resumed = run(
        [sys.executable, MAIN, *tiny_flags(tiny_data, out, *extra, "--resume", "auto")],
        cwd=tmp_path,
        OMP_NUM_THREADS=cores,
    )
    assert "resuming epoch 1 at step" in resumed.stdout
    said = re.search(r"^torch: 1 thread per process \((.*)\)$", resumed.stdout, re.M)
    assert said, resumed.stdout
    assert said.group(1).startswith(("the run's own, for a bit for bit continuation", "not "))
    assert_same_weights(out, reference)


@pytest.mark.parametrize(
    "raw, ema, want",
    [
        (40.0, 40.0, "ema"),  # a tie: the average, which is the smoother of the two
        (45.0, 40.0, "raw"),
        (40.0, 45.0, "ema"),
        (None, None, "ema"),  # no validation: the EMA's weights
    ],
)
def test_model_pt_holds_the_weights_that_scored_better_on_the_last_epoch(raw, ema, want):
    from trainer.engine import make_ema
    from trainer.main import Training, final_weights

    model = nn.Linear(2, 2)
    averaged = make_ema(model, 0.9)
    training = Training(
        model=model, optimizer=None, scheduler=None, scaler=None, criterion=None,
        amp_dtype=None, ema=averaged,
    )  # fmt: skip
    records = [
        {"epoch": 1, "val_top1": 90.0, "val_top1_ema": 10.0},  # earlier epochs do not count
        {"epoch": 2, "val_top1": raw, "val_top1_ema": ema},
    ]
    weights, which = final_weights(training, records)
    assert which == want
    assert weights is (model if want == "raw" else averaged.module)
    # Without an EMA, always the raw weights.
    training.ema = None
    assert final_weights(training, records) == (model, "raw")


def test_best_pt_is_the_first_epoch_of_the_best_score_raw_or_ema(tmp_path, monkeypatch):
    """best.pt follows the better of the two scores (raw or EMA) and is replaced only by a
    strictly better one: a later tie keeps the earlier epoch."""
    import torchvision

    from trainer import checkpoint as ckpt_io
    from trainer.data import DataSpec
    from trainer.main import build_training, end_epoch

    cfg = Config(
        arch="resnet18", num_classes=3, epochs=5, lr=0.1, ema_decay=0.9,
        output_dir=str(tmp_path),
    )  # fmt: skip
    model = torchvision.models.resnet18(num_classes=3)
    training = build_training(
        cfg, model, steps_per_epoch=2, amp_dtype=None, device=torch.device("cpu")
    )
    data = DataSpec("train.txt", "val.txt", ["a", "b", "c"], None, False)

    def epoch_end(epoch: int, raw: float, ema: float) -> None:
        record = {
            "epoch": epoch, "train_loss": 1.0, "val_top1": raw, "val_top5": 100.0,
            "val_loss": 1.0, "val_top1_ema": ema, "val_loss_ema": 1.0,
            "images_per_sec_per_gpu": 1.0, "data_wait_fraction": 0.0, "lr": 0.1,
            "epoch_seconds": 1.0, "elapsed": float(epoch),
        }  # fmt: skip
        end_epoch(cfg, training, data, record)

    def epoch_of(name: str) -> int:
        return torch.load(tmp_path / name, map_location="cpu", weights_only=True)["epoch"]

    def best_epoch(latest: int) -> int:
        assert epoch_of(ckpt_io.LAST) == latest  # last.pt: always the latest epoch
        return epoch_of(ckpt_io.BEST)

    def one_file() -> bool:  # a new best's last.pt is best.pt's file: its bytes written once
        return os.path.samefile(tmp_path / ckpt_io.LAST, tmp_path / ckpt_io.BEST)

    epoch_end(1, raw=40.0, ema=30.0)
    assert best_epoch(1) == 1 and training.best_top1 == 40.0 and one_file()
    epoch_end(2, raw=35.0, ema=40.0)  # the EMA's 40 ties the best so far: kept
    assert best_epoch(2) == 1 and not one_file()
    epoch_end(3, raw=20.0, ema=45.0)  # the EMA's score is the epoch's
    assert best_epoch(3) == 3 and training.best_top1 == 45.0 and one_file()
    epoch_end(4, raw=44.0, ema=10.0)
    assert best_epoch(4) == 3 and not one_file()

    # Where the filesystem has no hard links, a new best writes last.pt as a file of its own.
    def no_hard_links(*_):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_hard_links)
    epoch_end(5, raw=50.0, ema=10.0)
    assert best_epoch(5) == 5 and not one_file()
    assert [name for name in os.listdir(tmp_path) if name.startswith(".")] == []  # no debris
