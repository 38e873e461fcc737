"""Model building, pretrained loading, the optimizer/scheduler/step/eval functions, checkpoint
files and the single-process side of dist: small tensors, one process, no launcher."""

from __future__ import annotations

import argparse
import contextlib
import math
import os

import pytest
import torch
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from trainer import checkpoint, dist
from trainer.config import TrainerError
from trainer.engine import (
    evaluate,
    make_optimizer,
    make_scaler,
    make_scheduler,
    param_groups,
    resolve_amp,
    train_step,
)
from trainer.model import (
    build_model,
    check_input_sizes,
    create_model,
    load_pretrained,
    strip_wrapper_prefixes,
    unwrap_model,
)

CPU = torch.device("cpu")


def quiet(_message: str) -> None:
    pass


# ------------------------------------------------------------------------------- model


def test_build_model_head_and_layout():
    model = build_model("resnet18", num_classes=7, device=CPU, log=quiet)
    assert model.fc.out_features == 7
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    other = build_model(
        "mobilenet_v3_small", num_classes=3, device=CPU, channels_last=False, log=quiet
    )
    assert other(torch.randn(2, 3, 32, 32)).shape == (2, 3)  # any torchvision classifier
    with pytest.raises(TrainerError, match="unknown --arch 'resnet9000'"):
        create_model("resnet9000", num_classes=3)


def test_input_sizes_an_arch_cannot_take_are_found_without_computing():
    check_input_sizes("resnet18", [16, 32, 224], num_classes=3)  # any size from 16 px
    check_input_sizes("vit_b_16", [224], num_classes=3)
    with pytest.raises(TrainerError, match=r"--arch vit_b_16 cannot take 64, 96 px images"):
        check_input_sizes("vit_b_16", [96, 224, 64, 96], num_classes=3)
    with pytest.raises(TrainerError, match=r"--arch alexnet cannot take 32 px"):
        check_input_sizes("alexnet", [32, 64], num_classes=3)
    check_input_sizes("regnet_x_400mf", [32], num_classes=3)  # not buildable on meta: no check


def test_pretrained_torchvision_format_keeps_new_head(tmp_path):
    # ImageNet-shaped weights (1000-class head) into a 10-class model.
    source = torchvision.models.resnet18(num_classes=1000)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(source.state_dict(), path)
    model = create_model("resnet18", num_classes=10)
    report = load_pretrained(model, str(path), arch="resnet18", num_classes=10)
    assert sorted(report.skipped_head) == ["fc.bias", "fc.weight"]
    assert len(report.loaded) == len(source.state_dict()) - 2
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert model.fc.out_features == 10
    assert "kept the new head" in report.summary()


def test_pretrained_from_checkpoint_with_wrapper_prefixes(tmp_path):
    source = create_model("resnet18", num_classes=10)
    wrapped = {f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}
    path = tmp_path / "last.pt"
    torch.save({"model": wrapped, "arch": "resnet18", "config": {"arch": "resnet18"}}, path)
    model = create_model("resnet18", num_classes=10)
    report = load_pretrained(model, str(path), arch="resnet18", num_classes=10)
    assert not report.skipped_head
    assert torch.equal(model.fc.weight, source.fc.weight)
    with pytest.raises(TrainerError, match="weights of resnet18, but --arch is resnet34"):
        load_pretrained(
            create_model("resnet34", num_classes=10), str(path), arch="resnet34", num_classes=10
        )


def test_pretrained_wrong_shapes_are_an_error(tmp_path):
    # Same names, other widths (wide_resnet50_2 vs resnet50): never a partial load.
    path = tmp_path / "wide.pth"
    torch.save(torchvision.models.wide_resnet50_2(num_classes=10).state_dict(), path)
    with pytest.raises(TrainerError, match="of another shape"):
        load_pretrained(
            create_model("resnet50", num_classes=10), str(path), arch="resnet50", num_classes=10
        )


def test_pretrained_head_of_other_class_names_is_not_loaded(tmp_path):
    # A model.pt of the same class count but other classes (here: two swapped): its head's
    # row 0 means 'cat', the data's label 0 'dog'. Loading it scored every image against the
    # wrong class in --eval-only (50% instead of 25% on a 5-class run), without a word.
    source = create_model("resnet18", num_classes=3)
    path = tmp_path / "model.pt"
    checkpoint.export_model(
        str(path), model=source, arch="resnet18", class_names=["cat", "dog", "fox"], image_size=32
    )
    model = create_model("resnet18", num_classes=3)
    report = load_pretrained(
        model, str(path), arch="resnet18", num_classes=3, class_names=["dog", "cat", "fox"]
    )
    assert sorted(report.skipped_head) == ["fc.bias", "fc.weight"]
    assert "other classes: label 0 is 'cat' there, 'dog' here" in report.summary()
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert not torch.equal(model.fc.weight, source.fc.weight)
    with pytest.raises(TrainerError, match="no trained head for the data's 3 classes .*'dog'"):
        build_model(
            "resnet18", num_classes=3, device=CPU, pretrained=str(path), log=quiet,
            class_names=["dog", "cat", "fox"], require_head=True,
        )  # fmt: skip
    # The same names, or none to compare (--num-classes alone): the head loads.
    for names in (["cat", "dog", "fox"], None):
        model = create_model("resnet18", num_classes=3)
        report = load_pretrained(
            model, str(path), arch="resnet18", num_classes=3, class_names=names
        )
        assert not report.skipped_head and torch.equal(model.fc.weight, source.fc.weight)


def test_resume_checkpoint_of_other_class_names_is_refused():
    ckpt = {"config": {"arch": "resnet18"}, "class_names": ["cat", "dog", "fox"]}
    checkpoint.check_compatible(
        ckpt, "last.pt", arch="resnet18", num_classes=3, class_names=["cat", "dog", "fox"]
    )
    checkpoint.check_compatible(ckpt, "last.pt", arch="resnet18", num_classes=3)
    with pytest.raises(TrainerError, match="classes differ .*label 1 is 'dog' there, 'fox' here"):
        checkpoint.check_compatible(
            ckpt, "last.pt", arch="resnet18", num_classes=3, class_names=["cat", "fox", "dog"]
        )
    # A run given only --num-classes records "0", "1", ...: no names to hold a run to.
    numbered = {"config": {"arch": "resnet18"}, "class_names": ["0", "1", "2"]}
    checkpoint.check_compatible(
        numbered, "last.pt", arch="resnet18", num_classes=3, class_names=["cat", "dog", "fox"]
    )


def test_strip_and_unwrap():
    assert strip_wrapper_prefixes({"module._orig_mod.fc.weight": 1, "fc.bias": 2}) == {
        "fc.weight": 1,
        "fc.bias": 2,
    }
    model = nn.Linear(2, 2)
    compiled = torch.compile(model)  # wraps lazily: nothing is compiled until called
    assert unwrap_model(compiled) is model


# ------------------------------------------------------------------------------- engine


def test_no_weight_decay_on_norms_and_biases():
    model = create_model("resnet18", num_classes=10)
    decay, no_decay = param_groups(model, 1e-4)
    norm_params = {
        id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()
    }
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert norm_params <= no_decay_ids
    assert id(model.fc.bias) in no_decay_ids and id(model.fc.weight) not in no_decay_ids
    assert all(p.dim() == 4 or p is model.fc.weight for p in decay["params"])
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (1e-4, 0.0)
    total = sum(1 for _ in model.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == total
    opt = make_optimizer(model, name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert opt.param_groups[0]["nesterov"] is True
    assert isinstance(make_optimizer(model, name="adamw", lr=1e-3), torch.optim.AdamW)
    # On the CPU the fused kernels, not torch's per-tensor Python loop (its CPU default);
    # not under fp16's grad scaler (test_fp16_scaler_skips_overflowed_steps_...).
    assert opt.param_groups[0]["fused"] is True
    assert not make_optimizer(model, name="sgd", lr=0.1, loss_scaling=True).defaults["fused"]
    with pytest.raises(TrainerError):
        make_optimizer(model, name="lamb", lr=1.0)


def test_no_weight_decay_on_attention_in_proj_bias():
    # torchvision's ViTs hold their attention biases in nn.MultiheadAttention.in_proj_bias:
    # a bias, so no decay (it was decayed, unlike every other bias).
    model = nn.Sequential(nn.Linear(4, 8), nn.MultiheadAttention(8, 2), nn.LayerNorm(8))
    attention = model[1]
    decay, no_decay = param_groups(model, 0.05)
    decayed = {id(p) for p in decay["params"]}
    assert id(attention.in_proj_bias) not in decayed
    assert id(attention.out_proj.bias) not in decayed
    assert decayed == {
        id(model[0].weight),
        id(attention.in_proj_weight),
        id(attention.out_proj.weight),
    }


def test_warmup_then_cosine_per_step():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, warmup_steps=4, total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[8] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))  # decays monotonically
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)


def test_resume_with_other_epochs_steps_at_the_new_schedules_lr(tmp_path):
    # One epoch of 7 steps of a 2-epoch run, saved at its end, resumed as a 4-epoch run: the
    # cosine is stretched, and the first resumed step must use the stretched schedule's lr,
    # not the one the old schedule had left in the optimizer. Resumed unchanged: bit for bit.
    from trainer.config import Config
    from trainer.main import build_training, resume_training

    def training_for(epochs):
        cfg = Config(epochs=epochs, warmup_epochs=0.5, lr=1.0, weight_decay=0.0, num_classes=3)
        model = linear_setup()[0]
        return build_training(cfg, model, steps_per_epoch=7, amp_dtype=None, device=CPU)

    first = training_for(2)
    for _ in range(7):
        first.optimizer.step()
        first.scheduler.step()
    saved = {
        "model": first.model.state_dict(),
        "optimizer": first.optimizer.state_dict(),
        "scheduler": first.scheduler.state_dict(),
        "epoch": 1,
        "config": {},
        "optimizer_steps_per_epoch": 7,
    }
    for epochs in (2, 4):
        resumed = training_for(epochs)
        resume_training(
            resumed, saved, "last.pt", str(tmp_path), batch_size=64, loader="dali",
            train_digest=tuple,
        )  # fmt: skip
        lr = resumed.optimizer.param_groups[0]["lr"]
        assert lr == resumed.scheduler.lr_lambdas[0](7) == resumed.scheduler.get_last_lr()[0]
        assert (lr == first.optimizer.param_groups[0]["lr"]) == (epochs == 2), epochs


def test_amp_resolution_and_scaler():
    assert resolve_amp("bf16", CPU) == (torch.bfloat16, None)
    assert resolve_amp("off", CPU) == (None, None)
    assert make_scaler(torch.float16, CPU).is_enabled()
    assert not make_scaler(torch.bfloat16, CPU).is_enabled()


@pytest.mark.parametrize("amp", ["bf16", "off"])
def test_train_step_fits_a_fixed_batch(amp):
    torch.manual_seed(0)
    amp_dtype, _ = resolve_amp(amp, CPU)
    model = build_model("resnet18", num_classes=4, device=CPU, log=quiet)
    images = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    images = images.to(amp_dtype or torch.float32)
    labels = torch.arange(8) % 4
    opt = make_optimizer(model, name="adamw", lr=1e-3, weight_decay=0.0)
    sched = make_scheduler(opt, warmup_steps=0, total_steps=100)
    kwargs = dict(
        criterion=nn.CrossEntropyLoss(),
        optimizer=opt,
        scaler=make_scaler(amp_dtype, CPU),
        scheduler=sched,
        amp_dtype=amp_dtype,
    )
    losses = [train_step(model, images, labels, **kwargs) for _ in range(8)]
    assert not losses[0].requires_grad and losses[0].device == CPU
    assert losses[-1].item() < losses[0].item() * 0.5
    assert sched.last_epoch == 8  # stepped once per train_step


def test_models_with_auxiliary_heads_train_every_parameter():
    # GoogLeNet returns its two auxiliary heads' logits too in training mode: the loss took
    # the namedtuple and the first step died with a TypeError. Now the aux losses add in, so
    # every parameter gets a gradient (DDP waits for each); eval mode gives the plain logits.
    torch.manual_seed(0)
    model = build_model("googlenet", num_classes=3, device=CPU, log=quiet)
    images = torch.randn(4, 3, 48, 48).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(4) % 3
    opt = make_optimizer(model, name="sgd", lr=0.01)
    loss = train_step(
        model, images, labels, criterion=nn.CrossEntropyLoss(), optimizer=opt,
        scaler=make_scaler(None, CPU),
    )  # fmt: skip
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
    main = nn.CrossEntropyLoss()(model.eval()(images), labels)
    assert torch.is_tensor(main) and main.ndim == 0
    # Inception v3's auxiliary head needs about 299 px: training below it is refused at
    # start, evaluation (no aux head) from 75 px.
    check_input_sizes("inception_v3", [224], num_classes=3, train_sizes=[299])
    with pytest.raises(TrainerError, match=r"--arch inception_v3 cannot take 224 px"):
        check_input_sizes("inception_v3", [224], num_classes=3, train_sizes=[224])


def test_fp16_scaler_skips_overflowed_steps_and_the_schedule_waits():
    # fp16 with an enabled grad scaler, on the CPU: an overflowing scale makes the scaler
    # skip optimizer.step(); the weights must not move and the schedule must not run ahead.
    # The optimizer and schedule as the trainer builds them for --amp fp16 (not fused).
    from trainer.config import Config
    from trainer.main import build_training

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    cfg = Config(optimizer="sgd", lr=0.1, weight_decay=0.0, epochs=2, warmup_epochs=0.4,
                 amp="fp16", num_classes=3)  # fmt: skip
    training = build_training(cfg, model, steps_per_epoch=5, amp_dtype=torch.float16, device=CPU)
    opt, sched = training.optimizer, training.scheduler
    assert training.scaler.is_enabled()
    # Any gradient times this scale overflows float32.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    images, labels = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    kwargs = dict(
        criterion=nn.CrossEntropyLoss(),
        optimizer=opt,
        scaler=scaler,
        scheduler=sched,
        amp_dtype=torch.float16,
    )
    weights = model[1].weight.detach().clone()
    train_step(model, images, labels, **kwargs)
    assert torch.equal(model[1].weight, weights)  # skipped: gradients were inf
    assert sched.last_epoch == 0 and scaler.get_scale() < 2.0**127
    kwargs["scaler"] = torch.amp.GradScaler("cpu", init_scale=1024.0)
    train_step(model, images, labels, **kwargs)
    assert not torch.equal(model[1].weight, weights)
    assert sched.last_epoch == 1


def test_ema_follows_each_optimizer_step_on_the_device():
    from trainer.engine import make_ema

    assert make_ema(nn.Linear(2, 2), 0.0) is None  # off
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    # Built for a grad scaler, as the trainer builds it for fp16: the last step below has one.
    opt = make_optimizer(model, name="sgd", lr=0.5, momentum=0.0, weight_decay=0.0,
                         loss_scaling=True)  # fmt: skip
    decay = 0.75
    ema = make_ema(model, decay)
    kwargs = dict(
        criterion=nn.CrossEntropyLoss(),
        optimizer=opt,
        scaler=make_scaler(None, CPU),
        ema=ema,
    )
    images, labels = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    train_step(model, images, labels, **kwargs)
    after_first = model[1].weight.detach().clone()
    assert torch.equal(ema.module[1].weight, after_first)  # the first update copies
    train_step(model, images, labels, **kwargs)
    expected = decay * after_first + (1 - decay) * model[1].weight.detach()
    assert torch.allclose(ema.module[1].weight, expected, atol=1e-6)
    assert not torch.allclose(ema.module[1].weight, model[1].weight)
    # A step the fp16 scaler skips leaves the average alone too.
    kwargs["scaler"] = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    frozen = ema.module[1].weight.detach().clone()
    train_step(model, images, labels, amp_dtype=torch.float16, **kwargs)
    assert torch.equal(ema.module[1].weight, frozen)


class FixedLogits(nn.Module):
    """Returns the logits stored for each input id (images[:, 0, 0, 0])."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("table", logits)

    def forward(self, images):
        return self.table[images[:, 0, 0, 0].long()]


def test_evaluate_counts_every_image_with_k_capped():
    # 3 classes, so top-5 is top-3 (every image is "correct"); 5 images over 2 batches.
    logits = torch.tensor(
        [[3.0, 1, 0], [0, 2, 1], [1, 0, 2], [2, 1, 0], [0, 1, 2]]
    )  # predictions 0, 1, 2, 0, 2
    labels = torch.tensor([0, 2, 2, 1, 2])  # right: 0, 2, 4
    images = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 3, 2, 2)
    batches = [(images[:3], labels[:3]), (images[3:], labels[3:])]
    result = evaluate(FixedLogits(logits), batches, num_classes=3, amp_dtype=None, device=CPU)
    assert result["val_top1"] == pytest.approx(60.0)
    assert result["val_top5"] == pytest.approx(100.0)
    assert result["val_images"] == 5
    expected = nn.functional.cross_entropy(logits, labels).item()
    assert result["val_loss"] == pytest.approx(expected, rel=1e-6)
    # confusion[true, predicted]: (0, 0), (2, 1), (2, 2), (1, 0), (2, 2)
    matrix = evaluate(
        FixedLogits(logits), batches, num_classes=3, amp_dtype=None, device=CPU, confusion=True
    )["confusion"]
    assert matrix.tolist() == [[1, 0, 0], [1, 0, 0], [0, 1, 2]]


# --------------------------------------------------------------------------- checkpoint


def test_atomic_save_and_resume_resolution(tmp_path):
    path = tmp_path / "sub" / "last.pt"
    checkpoint.atomic_save({"epoch": 3}, str(path))
    checkpoint.atomic_save({"epoch": 4}, str(path))  # replaces, leaves no temp file
    assert torch.load(path, weights_only=True) == {"epoch": 4}
    assert os.listdir(path.parent) == ["last.pt"]
    assert checkpoint.resolve_resume(None, str(tmp_path)) is None
    assert checkpoint.resolve_resume("auto", str(tmp_path)) is None  # nothing there: fresh
    assert checkpoint.resolve_resume("auto", str(path.parent)) == str(path)
    with pytest.raises(TrainerError, match="not found"):
        checkpoint.resolve_resume(str(tmp_path / "gone.pt"), str(tmp_path))
    with pytest.raises(TrainerError, match="not a checkpoint of this trainer"):
        checkpoint.load_checkpoint(str(path))


def test_unloadable_checkpoints_say_why_in_one_line(tmp_path):
    """What a user passes to --resume by mistake: each refused with a reason to act on, never
    torch's paragraph advising weights_only=False (wrong for a damaged file, unsafe else)."""
    weights = tmp_path / "model.pt"
    checkpoint.export_model(
        str(weights), model=create_model("resnet18", num_classes=3), arch="resnet18",
        class_names=["a", "b", "c"], image_size=32,
    )  # fmt: skip
    state_dict = tmp_path / "resnet18.pth"
    torch.save(create_model("resnet18", num_classes=3).state_dict(), state_dict)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 8)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(state_dict.read_bytes()[:5000])
    pickled = tmp_path / "namespace.pt"
    torch.save({"args": argparse.Namespace(lr=0.1)}, pickled)
    expected = {
        weights: "weights without a training state .* --pretrained PATH",
        state_dict: "weights without a training state .* --pretrained PATH",
        garbage: "not a PyTorch weights file, or a damaged one$",
        cut: "not a PyTorch weights file, or a damaged one$",
        pickled: r"holds pickled Python objects \(argparse.Namespace\)",
    }
    for path, message in expected.items():
        with pytest.raises(TrainerError, match=message) as caught:
            checkpoint.load_checkpoint(str(path))
        text = str(caught.value)
        assert "\n" not in text and "\x1b" not in text and "weights_only" not in text, text


def test_export_preprocessing_matches_the_loaders(tmp_path):
    from pipelines import common

    model = create_model("resnet18", num_classes=3)
    path = tmp_path / "model.pt"
    checkpoint.export_model(
        str(path), model=model, arch="resnet18", class_names="abc", image_size=64
    )
    saved = torch.load(path, weights_only=True)
    pre = saved["preprocessing"]
    assert pre["resize_size"] == common.val_resize_size(64)
    assert tuple(pre["mean"]) == common.IMAGENET_MEAN and tuple(pre["std"]) == common.IMAGENET_STD
    assert saved["class_names"] == ["a", "b", "c"] and saved["arch"] == "resnet18"
    fresh = torchvision.models.get_model("resnet18", num_classes=3)
    fresh.load_state_dict(saved["model"])  # bare names, strict


# --------------------------------------------------------------------------------- dist


def test_single_process_dist(monkeypatch, capsys):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    info = dist.setup_distributed(local_rank=0, device="cpu")
    try:
        assert (info.rank, info.world_size, info.local_rank, info.is_main) == (0, 1, 0, True)
        assert not info.distributed and info.device == CPU
        values = torch.tensor([1.0, 2.0])
        assert torch.equal(dist.all_reduce_sum(values), torch.tensor([1.0, 2.0]))
        dist.barrier()  # no process group: nothing to wait for
        dist.print0("hello from rank 0")
        assert capsys.readouterr().out == "hello from rank 0\n"
    finally:
        dist.cleanup_distributed()


def test_threads_split_among_local_ranks(monkeypatch):
    monkeypatch.setattr(dist, "usable_cpus", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert dist.cpu_threads_per_rank(4) == 4
    assert dist.cpu_threads_per_rank(32) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as torchrun sets it for every worker
    assert dist.cpu_threads_per_rank(4) == 4  # the loader's share is not cut by it
    assert dist.loader_threads_reason(4) == "16 usable cores / 4 ranks on this node"
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert dist.torch_threads_per_rank(4) == 2  # torch's intra-op threads honour it


def epoch_record(epoch: int, top1: float) -> dict:
    return {
        "epoch": epoch, "train_loss": 1.0, "val_top1": top1, "val_top5": 100.0,
        "val_loss": 1.0, "val_top1_ema": None, "val_loss_ema": None,
        "images_per_sec_per_gpu": 1.0, "data_wait_fraction": 0.0, "lr": 0.1,
        "epoch_seconds": 1.0, "elapsed": float(epoch),
    }  # fmt: skip


def test_best_pt_keeps_the_best_epoch_when_the_score_falls(tmp_path):
    from trainer.config import Config
    from trainer.data import DataSpec
    from trainer.main import Training, end_epoch

    model = nn.Linear(2, 2)
    opt = make_optimizer(model, name="sgd", lr=0.1)
    training = Training(
        model=model,
        optimizer=opt,
        scheduler=make_scheduler(opt, warmup_steps=0, total_steps=10),
        scaler=make_scaler(None, CPU),
        criterion=nn.CrossEntropyLoss(),
        amp_dtype=None,
    )
    cfg = Config(output_dir=str(tmp_path), epochs=3)
    data = DataSpec("train.txt", "val.txt", ["a", "b"], None, False)
    for epoch, top1 in ((1, 50.0), (2, 80.0), (3, 60.0)):
        with torch.no_grad():
            model.weight.fill_(epoch)  # weights that say which epoch they are from
        end_epoch(cfg, training, data, epoch_record(epoch, top1))
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert (best["epoch"], best["best_top1"], float(best["model"]["weight"][0, 0])) == (2, 80.0, 2)
    assert (last["epoch"], last["best_top1"], float(last["model"]["weight"][0, 0])) == (3, 80.0, 3)


def _two_rank_epoch(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as torch_dist

    from trainer.engine import train_one_epoch

    torch_dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    try:
        # lr 0: the weights stay put, so each rank's loss is fixed by its own data alone.
        model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        with torch.no_grad():
            model[1].weight.zero_()
            model[1].bias.copy_(torch.tensor([0.0, 2.0 * (rank + 1)]))
        opt = make_optimizer(model, name="sgd", lr=0.0, momentum=0.0, weight_decay=0.0)
        batches = [(torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long))] * 2
        stats = train_one_epoch(
            model,
            batches,
            epoch=0,
            epochs=1,
            criterion=nn.CrossEntropyLoss(),
            optimizer=opt,
            scaler=make_scaler(None, CPU),
            scheduler=None,
            amp_dtype=None,
            device=CPU,
            log_interval=100,
        )
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(repr(stats["train_loss"]))
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.slow
def test_epoch_train_loss_is_the_mean_over_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_rank_epoch, args=(port, str(tmp_path)), nprocs=2, join=True)
    # Rank r predicts class 0 with logits (0, 2(r+1)): its loss is log(1 + e^(2(r+1))).
    own = [math.log1p(math.exp(2.0 * (r + 1))) for r in (0, 1)]
    for rank in (0, 1):
        got = float((tmp_path / f"rank{rank}.txt").read_text())
        assert got == pytest.approx(sum(own) / 2, rel=1e-6), (rank, got, own)


def linear_setup(seed: int = 0, *, loss_scaling: bool = False):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    opt = make_optimizer(model, name="sgd", lr=0.5, momentum=0.0, weight_decay=0.0,
                         loss_scaling=loss_scaling)  # fmt: skip
    return model, opt


def test_accumulated_micro_batches_equal_one_big_batch():
    torch.manual_seed(1)
    images, labels = torch.randn(8, 3, 2, 2), torch.randint(0, 3, (8,))
    whole, opt = linear_setup()
    sched = make_scheduler(opt, warmup_steps=0, total_steps=10)
    kwargs = dict(criterion=nn.CrossEntropyLoss(), scaler=make_scaler(None, CPU))
    train_step(whole, images, labels, optimizer=opt, scheduler=sched, **kwargs)
    parts, opt2 = linear_setup()
    sched2 = make_scheduler(opt2, warmup_steps=0, total_steps=10)
    for micro in (0, 1):
        train_step(
            parts, images[4 * micro : 4 * micro + 4], labels[4 * micro : 4 * micro + 4],
            optimizer=opt2, scheduler=sched2, micro_step=micro, micro_steps=2, **kwargs,
        )  # fmt: skip
        # One optimizer step (and one schedule step) for the two micro-batches.
        assert sched2.last_epoch == micro
    assert torch.allclose(parts[1].weight, whole[1].weight, atol=1e-6)
    assert not torch.allclose(parts[1].weight, linear_setup()[0][1].weight)


def test_logged_and_recorded_lr_is_the_one_the_step_applied(monkeypatch):
    # 7 batches, 3 accumulated: optimizer steps after batches 3, 6 and 7 (a short last one).
    # The log lines and the epoch's record name the lr those steps used, not the next one's
    # (the scheduler has moved the group's lr by the time they are written).
    from trainer.engine import train_one_epoch

    printed = []
    monkeypatch.setattr(dist, "print0", printed.append)
    torch.manual_seed(5)
    model, opt = linear_setup()
    sched = make_scheduler(opt, warmup_steps=2, total_steps=6)
    applied = []
    opt.register_step_pre_hook(lambda o, *_: applied.append(o.param_groups[0]["lr"]))
    batches = [(torch.randn(4, 3, 2, 2), torch.randint(0, 3, (4,))) for _ in range(7)]
    records = []
    for epoch in range(2):
        records.append(
            train_one_epoch(
                model, batches, epoch=epoch, epochs=2, criterion=nn.CrossEntropyLoss(),
                optimizer=opt, scaler=make_scaler(None, CPU), scheduler=sched, amp_dtype=None,
                device=CPU, log_interval=3, grad_accum_steps=3,
            )
        )  # fmt: skip
    assert len(applied) == 6 and applied[0] == pytest.approx(0.25)  # warmup's first step
    logged = [float(line.split(" lr ")[1].split()[0]) for line in printed]
    assert logged == pytest.approx(applied, rel=1e-3)  # one line per optimizer step here
    assert [r["lr"] for r in records] == [applied[2], applied[5]]
    assert records[-1]["lr"] > 0.0  # the cosine's last step, one step short of 0


@pytest.mark.parametrize("amp", ["off", "fp16"])
def test_clip_grad_norm_bounds_the_true_gradient(amp):
    # SGD without momentum: the update is lr x gradient, so its norm shows the clipped norm.
    # Under fp16 the scaler's gradients are 2^10 times too large until unscaled: clipping
    # them unscaled would bound the update at lr x clip / 2^10 instead.
    torch.manual_seed(2)
    images, labels = torch.randn(8, 3, 2, 2) * 10, torch.randint(0, 3, (8,))
    amp_dtype = torch.float16 if amp == "fp16" else None

    def update_norm(clip):
        model, opt = linear_setup(loss_scaling=amp == "fp16")
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        train_step(
            model, images, labels, criterion=nn.CrossEntropyLoss(), optimizer=opt,
            scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=amp == "fp16"),
            amp_dtype=amp_dtype, clip_grad_norm=clip,
        )  # fmt: skip
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        return float((after - before).norm()) / 0.5  # / lr: the gradient's norm

    free = update_norm(None)
    assert free > 0.5
    assert update_norm(0.1) == pytest.approx(0.1, rel=2e-2)
    assert update_norm(free * 10) == pytest.approx(free, rel=2e-2)  # under the bound: as is


@pytest.mark.parametrize("which", ["mixup", "cutmix", "both"])
def test_mixup_cutmix_make_soft_targets_on_the_device(which):
    from trainer.config import Config
    from trainer.main import make_batch_transform

    alphas = {"mixup": (0.4, 0.0), "cutmix": (0.0, 1.0), "both": (0.4, 1.0)}[which]
    cfg = Config(mixup_alpha=alphas[0], cutmix_alpha=alphas[1], num_classes=4)
    mix = make_batch_transform(cfg)
    assert make_batch_transform(Config(num_classes=4)) is None  # off by default
    torch.manual_seed(3)
    images = (
        torch.rand(8, 3, 16, 16).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    )
    labels = torch.arange(8) % 4
    mixed, targets = mix(images, labels)
    assert mixed.dtype == torch.bfloat16 and mixed.is_contiguous(memory_format=torch.channels_last)
    assert targets.shape == (8, 4) and torch.allclose(targets.sum(1), torch.ones(8))
    assert not torch.equal(mixed, images)  # the option does something to the pixels...
    assert (targets.max(1).values < 1).any()  # ...and to the labels
    # The label-smoothed loss takes the soft targets.
    loss = nn.CrossEntropyLoss(label_smoothing=0.1)(torch.randn(8, 4), targets)
    assert torch.isfinite(loss)
    # On the meta device roll(1, 0), MixUp's mixing, returns NCHW as CUDA's kernel does (the
    # CPU's keeps channels_last): the batch the model gets is channels_last all the same.
    meta = torch.device("meta")
    mixed, _ = mix(images.to(meta), labels.to(meta))
    assert mixed.is_contiguous(memory_format=torch.channels_last)


class HostDeviceTraffic(TorchDispatchMode):
    """Records the ops that make the host wait for an accelerator: a copy between the CPU and
    another device (blocking unless pinned and non_blocking: a stream synchronize on CUDA),
    and reading a device tensor's value (``.item()``, ``bool()``, ``float()``)."""

    def __init__(self):
        super().__init__()
        self.events: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if name == "_local_scalar_dense" and tensors[0].device.type != "cpu":
            self.events.append(f"read of a {tensors[0].device.type} tensor")
        out = func(*args, **(kwargs or {}))
        if name in ("_to_copy", "copy_"):
            devices = {t.device.type for t in [*tensors, out] if isinstance(t, torch.Tensor)}
            if "cpu" in devices and len(devices) > 1:
                self.events.append(f"{name} between {' and '.join(sorted(devices))}")
        return out


@pytest.mark.parametrize("option", ["ema", "clip", "mixup", "accumulate"])
def test_train_step_makes_no_host_sync(monkeypatch, option):
    # The model on the meta device stands in for a GPU: any copy to or from the host, or
    # any read of a value, is an op the recorder sees (on a CPU run they cost nothing, so
    # other tests cannot notice them). torch's AveragedModel.update_parameters copied its
    # update count to the device twice a step (a stream synchronize each on CUDA).
    from torchvision.transforms import v2

    from trainer.engine import make_ema

    monkeypatch.setattr(torch, "autocast", lambda *a, **k: contextlib.nullcontext())  # no meta
    meta = torch.device("meta")
    model = torchvision.models.resnet18(num_classes=4).to(meta)  # BatchNorm: int buffers too
    opt = make_optimizer(model, name="sgd", lr=0.1)
    kwargs = dict(
        criterion=nn.CrossEntropyLoss(label_smoothing=0.1),
        optimizer=opt,
        scaler=make_scaler(None, meta),
        scheduler=make_scheduler(opt, warmup_steps=2, total_steps=10),
        ema=make_ema(model, 0.9) if option == "ema" else None,
        clip_grad_norm=1.0 if option == "clip" else None,
        batch_transform=v2.MixUp(alpha=0.2, num_classes=4) if option == "mixup" else None,
    )
    micro_steps = 2 if option == "accumulate" else 1
    images = torch.empty(2, 3, 32, 32, device=meta)
    labels = torch.zeros(2, dtype=torch.long, device=meta)
    for step in range(3):  # the EMA's first update copies; its later ones average
        with HostDeviceTraffic() as traffic:
            train_step(
                model, images, labels, micro_step=step % micro_steps, micro_steps=micro_steps,
                **kwargs,
            )  # fmt: skip
        assert traffic.events == [], (step, traffic.events)


def test_weight_ema_matches_torch_averaged_model():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from trainer.engine import make_ema

    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2))
    ours = make_ema(model, 0.8)
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=True)
    for _ in range(4):
        model(torch.randn(5, 3, 4, 4))  # moves the BatchNorm statistics and counter
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ours.update_parameters(model)
        reference.update_parameters(model)
    assert ours.state_dict().keys() == reference.state_dict().keys()  # checkpoints unchanged
    for name, value in reference.state_dict().items():
        if value.is_floating_point() or name == "n_averaged":
            assert torch.equal(ours.state_dict()[name], value), name
        else:  # BatchNorm's counter is copied (torch "averages" it, truncated to int64)
            assert name.endswith("num_batches_tracked")
            assert int(ours.state_dict()[name]) == int(model[1].num_batches_tracked) == 4


def test_evaluate_makes_no_host_sync_between_batches(monkeypatch):
    # As above, the meta device stands in for a GPU. Only the end of evaluate (the
    # all-reduced sums read once) may wait for the device; its batches, confusion matrix
    # included, must not (CUDA's bincount read its input's min and max: two syncs a batch).
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: contextlib.nullcontext())
    meta = torch.device("meta")
    model = torchvision.models.resnet18(num_classes=4).to(meta)
    traffic = HostDeviceTraffic()

    class AllBatchesSeen(Exception):
        pass

    def batches():
        for _ in range(3):
            yield (
                torch.empty(2, 3, 32, 32, device=meta),
                torch.zeros(2, 4, device=meta).long()[:, 0],
            )
            assert traffic.events == [], traffic.events  # that batch, counted
        raise AllBatchesSeen  # before the final read, which meta tensors cannot do

    with traffic, pytest.raises(AllBatchesSeen):
        evaluate(model, batches(), num_classes=4, amp_dtype=None, device=meta, confusion=True)


IMPORTS_WITHOUT_DYNAMO = r"""
import json, sys
import trainer.main, pipelines.pil, trainer.inference  # every module that uses torchvision
import torch, torchvision
print(json.dumps({
    "dynamo_at_start": "torch._dynamo" in sys.modules,
    "resnet": type(torchvision.models.resnet18()).__name__,
    # roi_align's own call of the function that was stood in for while torchvision imported
    "roi_align": list(torchvision.ops.roi_align(
        torch.rand(1, 3, 8, 8), [torch.tensor([[0.0, 0.0, 4.0, 4.0]])], 2, aligned=True
    ).shape),
    "compile": torch.compile(lambda x: x * 2 + 1, backend="eager")(torch.ones(2)).tolist(),
    "dynamo_after_compile": "torch._dynamo.eval_frame" in sys.modules,
}))
"""


def test_the_trainer_starts_without_importing_dynamo_and_compile_still_works():
    # torchvision's roi_align imports torch._dynamo at module level (1.5 s and 150 MB per
    # process here); pipelines/torchvision_import.py keeps it out until something asks for it.
    import json
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", IMPORTS_WITHOUT_DYNAMO],
        capture_output=True, text=True, timeout=120, cwd=repo,
        env={**os.environ, "PYTHONPATH": repo},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["dynamo_at_start"] is False
    assert result["resnet"] == "ResNet" and result["roi_align"] == [1, 3, 2, 2]
    assert result["compile"] == [3.0, 3.0] and result["dynamo_after_compile"] is True
