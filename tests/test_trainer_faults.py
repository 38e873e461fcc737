"""Bad input fails before training with one ``error: ...`` line and exit status 2.

Most cases call ``trainer.main.main(argv)`` in this process (the same code path as the
command line, minus the interpreter start); one runs the real thing under torchrun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision

from pipelines.lists import read_classes
from trainer.main import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base_flags(tiny_data, out) -> list[str]:
    # --no-plots: about a second of matplotlib a run, drawn where a test looks at them.
    # --output-dir last: tests swap it for another folder with flags[:-1].
    return [
        "--train-list", tiny_data.train_list, "--arch", "resnet18", "--image-size", "32",
        "--batch-size", "8", "--epochs", "1", "--workers", "1", "--no-plots",
        "--output-dir", str(out),
    ]  # fmt: skip


def fails(capsys, argv: list[str], *must_mention: str) -> str:
    """Run main(argv); it must return 2 and print exactly one error line naming the fault."""
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 2, captured.out + captured.err
    assert "Traceback" not in captured.err + captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, captured.err
    for text in must_mention:
        assert text in errors[0], errors[0]
    return errors[0]


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)


def test_missing_train_list(capsys, tmp_path):
    missing = str(tmp_path / "nowhere" / "Train.txt")
    fails(capsys, ["--train-list", missing, "--num-classes", "3"], missing)


def test_empty_train_list(capsys, tmp_path, tiny_data):
    empty = tmp_path / "Train.txt"
    empty.write_text("# nothing here\n\n")
    flags = base_flags(tiny_data, tmp_path / "out")
    flags[1] = str(empty)
    fails(capsys, [*flags, "--classes", tiny_data.classes_file], str(empty), "no samples")


def test_class_count_mismatch(capsys, tmp_path, tiny_data):
    flags = base_flags(tiny_data, tmp_path / "out")
    fails(capsys, [*flags, "--num-classes", "5"], tiny_data.classes_file, "10", "5")


def test_labels_beyond_given_classes(capsys, tmp_path, tiny_data):
    classes = tmp_path / "classes" / "classes.txt"
    classes.parent.mkdir()
    classes.write_text("a\nb\nc\n")
    lonely = tmp_path / "Train.txt"  # no classes.txt beside it: --classes numbers its labels
    with open(tiny_data.train_list) as src:
        lonely.write_text(src.read().replace("train/", os.path.join(tiny_data.root, "train/")))
    flags = base_flags(tiny_data, tmp_path / "out")
    flags[1] = str(lonely)
    # The first label >= 3 is named with its file and line.
    fails(capsys, [*flags, "--classes", str(classes)], f"{lonely}:")


def test_classes_other_than_those_beside_the_train_list_are_refused(capsys, tmp_path, tiny_data):
    # The classes.txt beside Train.txt numbered its labels; a --classes of the same count in
    # another order trained and saved every class under another's name (model.pt, predict).
    names = read_classes(tiny_data.classes_file)
    reordered = tmp_path / "classes.txt"
    reordered.write_text("".join(f"{name}\n" for name in reversed(names)))
    flags = base_flags(tiny_data, tmp_path / "out")
    fails(
        capsys,
        [*flags, "--classes", str(reordered)],
        f"{reordered}: --classes names other classes than {tiny_data.classes_file}",
        f"label 0 is {names[0]!r} there, {names[-1]!r} here",
        "to rename classes, edit it",  # the one way to rename, which every list shares
    )
    assert not (tmp_path / "out").exists()


def test_no_class_count_at_all(capsys, tmp_path, tiny_data):
    lonely = tmp_path / "Train.txt"
    with open(tiny_data.train_list) as src:
        lonely.write_text(src.read().replace("train/", os.path.join(tiny_data.root, "train/")))
    flags = base_flags(tiny_data, tmp_path / "out")
    flags[1] = str(lonely)
    fails(capsys, flags, str(lonely), "--num-classes")


def test_pretrained_missing(capsys, tmp_path, tiny_data):
    out = tmp_path / "out"
    missing = str(tmp_path / "weights.pth")
    fails(capsys, [*base_flags(tiny_data, out), "--pretrained", missing], missing, "not found")
    assert not out.exists()  # failed before anything was written


def test_pretrained_not_a_state_dict(capsys, tmp_path, tiny_data):
    listed = tmp_path / "list.pth"
    torch.save([1, 2, 3], listed)
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    flags = base_flags(tiny_data, tmp_path / "out")
    fails(capsys, [*flags, "--pretrained", str(listed)], str(listed), "not a state dict")
    fails(capsys, [*flags, "--pretrained", str(text)], str(text), "not a PyTorch weights file")
    # torch.save(model): a torch file, but of pickled objects, which weights_only refuses.
    # It read "not a PyTorch weights file (Weights only load failed. ... \x1b[1m...".
    whole = tmp_path / "whole.pth"
    torch.save(torchvision.models.resnet18(num_classes=10), whole)
    line = fails(
        capsys,
        [*flags, "--pretrained", str(whole)],
        f"{whole}: holds pickled Python objects (torchvision.models.resnet.ResNet)",
        "torch.save(model.state_dict(), PATH)",
    )
    assert "\x1b" not in line


def test_pretrained_of_another_arch(capsys, tmp_path, tiny_data):
    other = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(num_classes=10).state_dict(), other)
    flags = base_flags(tiny_data, tmp_path / "out")
    fails(capsys, [*flags, "--pretrained", str(other)], str(other), "does not fit --arch resnet18")


def test_resume_file_missing(capsys, tmp_path, tiny_data):
    missing = str(tmp_path / "last.pt")
    fails(capsys, [*base_flags(tiny_data, tmp_path), "--resume", missing], missing, "not found")


def test_config_file_unknown_key(capsys, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('arch = "resnet18"\nlearning_rate = 0.1\nbatchsize = 4\n')
    fails(capsys, ["--config", str(config)], str(config), "batchsize", "learning_rate")


def test_eval_only_without_weights(capsys, tmp_path, tiny_data):
    fails(capsys, [*base_flags(tiny_data, tmp_path), "--eval-only"], "--eval-only needs weights")


def test_unknown_arch(capsys, tmp_path, tiny_data):
    flags = base_flags(tiny_data, tmp_path)
    flags[3] = "resnet1000"
    fails(capsys, flags, "resnet1000")


@pytest.mark.parametrize(
    "arch, size, extra, words",
    [
        ("vit_b_16", "32", [], ["--arch vit_b_16 cannot take 32 px", "Expected 224"]),
        # AlexNet takes 64 px (the last epoch, validation), not epochs 1 and 2's 32 and 48.
        ("alexnet", "64", ["--progressive-resize", "32:64:2", "--epochs", "3"], ["32, 48 px"]),
        # Inception v3 evaluates at 224 px, but trains (its auxiliary head) from about 299.
        ("inception_v3", "224", [], ["--arch inception_v3 cannot take 224 px"]),
    ],
)
def test_an_image_size_the_arch_cannot_take_is_refused_at_start(
    capsys, tmp_path, tiny_data, arch, size, extra, words
):
    # It was a torchvision traceback at the first step, after the loaders had started.
    flags = base_flags(tiny_data, tmp_path / "out")
    flags[3], flags[5] = arch, size
    fails(capsys, [*flags, *extra], *words)
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.slow
def test_fault_under_torchrun_exits_promptly(tmp_path):
    missing = str(tmp_path / "Train.txt")
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone",
        "--nproc_per_node=2", os.path.join(REPO, "trainer", "main.py"),
        "--train-list", missing, "--num-classes", "3",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = (proc.stdout + proc.stderr).splitlines()
    # Rank 0 alone prints it; torchrun's summary quotes it once more from the error file.
    assert lines.count(f"error: --train-list {missing}: no such file") == 1
    assert any(line.endswith(f"error: --train-list {missing}: no such file") for line in lines)


@pytest.mark.slow
def test_missing_file_found_by_one_rank_stops_every_rank(tmp_path, tiny_data):
    from pipelines.lists import read_list, write_list

    # Each rank stats its own half of the list: the missing last file is rank 1's to find.
    samples = read_list(tiny_data.train_list)
    missing = tmp_path / "gone.jpg"
    train_list = tmp_path / "Train.txt"
    write_list(train_list, [(s.path, s.label) for s in samples[:-1]] + [(str(missing), 0)])
    flags = base_flags(tiny_data, tmp_path / "out")
    flags[1] = str(train_list)
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone",
        "--nproc_per_node=2", os.path.join(REPO, "trainer", "main.py"), *flags,
        "--classes", tiny_data.classes_file,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("error: ")]
    assert errors == [
        f"error: rank 1: {missing}: image file listed at {train_list}:{len(samples)} cannot "
        "be read (No such file or directory)"
    ]
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr


@pytest.mark.slow
def test_torchrun_names_the_rank_that_met_a_bad_image(tmp_path, tiny_data):
    from pipelines.lists import read_list, write_list

    # The last val image is garbage: it is in rank 1's half of the list, met in evaluation.
    samples = read_list(tiny_data.val_list)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image " * 50)
    val_list = tmp_path / "Test.txt"
    write_list(val_list, [(s.path, s.label) for s in samples[:-1]] + [(str(bad), 0)])
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone",
        "--nproc_per_node=2", os.path.join(REPO, "trainer", "main.py"),
        *base_flags(tiny_data, tmp_path / "out"), "--val-list", str(val_list),
        "--classes", tiny_data.classes_file,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    errors = [ln for ln in output.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: rank 1: {bad}"), errors
    # The rank that did not fail stops with one line, not a "Connection closed" traceback.
    assert "rank 0: stopping: another rank failed (its error line" in output
    assert "[rank0]: Traceback" not in output and "Connection closed by peer" not in output
    root_cause = output.split("Root Cause (first observed failure):")[1]
    assert "rank      : 1 (local_rank: 1)" in root_cause
    assert f"error: rank 1: {bad}" in root_cause


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["dali", "pil"])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_bad_image_mid_training_is_named(capsys, tmp_path, tiny_data, loader, damage):
    """A file that passes the up-front checks but fails to decode stops the run, named."""
    from pipelines.lists import read_list, write_list

    samples = read_list(tiny_data.train_list)
    bad = tmp_path / "bad image.jpg"
    with open(samples[0].path, "rb") as f:
        good_bytes = f.read()
    if damage == "truncated":
        bad.write_bytes(good_bytes[: len(good_bytes) // 3])
    else:
        bad.write_bytes(b"this is not an image at all " * 40)
    listed = [(s.path, s.label) for s in samples]
    listed[5] = (str(bad), listed[5][1])
    train_list = tmp_path / "Train.txt"
    write_list(train_list, listed)
    flags = base_flags(tiny_data, tmp_path / "out")
    flags[1] = str(train_list)
    # Batch 8 over 120 images: one epoch reads every file, so the bad one is met.
    line = fails(
        capsys, [*flags, "--classes", tiny_data.classes_file, "--loader", loader], str(bad)
    )
    assert "rank 0" in line
    assert "make_lists.py ROOT --out-dir DIR --verify" in line  # how to find them all first


def test_one_class_is_refused(capsys, tmp_path, tiny_data):
    one = tmp_path / "classes.txt"
    one.write_text("cat\n")
    flags = [*base_flags(tiny_data, tmp_path / "out"), "--classes", str(one)]
    fails(capsys, flags, str(one), "needs at least 2")


def test_earlier_results_are_never_replaced(capsys, tmp_path, tiny_data):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (out / "best.pt").write_bytes(b"an earlier run's best weights")
    line = fails(capsys, base_flags(tiny_data, out), str(out), "--resume auto", "--overwrite")
    assert "best.pt" in line and "metrics.jsonl" in line
    assert (out / "metrics.jsonl").read_text() == '{"epoch": 1}\n'
    assert (out / "best.pt").read_bytes() == b"an earlier run's best weights"
    # --resume auto with no last.pt to continue from is no licence to replace them either.
    # It says that there is nothing to continue, rather than "continue it with --resume auto".
    line = fails(capsys, [*base_flags(tiny_data, out), "--resume", "auto"], "already holds a run")
    assert "no last.pt to continue it from" in line and "--overwrite" in line


def test_unwritable_output_folder_found_at_start(capsys, tmp_path, tiny_data):
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    fails(capsys, base_flags(tiny_data, blocker / "out"), "output folder is not writable")


def test_failed_checkpoint_write_says_what_and_how_much(tmp_path):
    import errno

    from trainer import checkpoint
    from trainer.config import TrainerError

    state = {"model": {"w": torch.zeros(1024, 256)}}  # 1 MiB of float32
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    with pytest.raises(TrainerError, match=r"could not write .*last\.pt .*no earlier one"):
        checkpoint.atomic_save(state, str(blocker / "last.pt"))
    # A full disk: the message gives the space needed and what to do.
    (tmp_path / "last.pt").write_bytes(b"previous")
    full = OSError(errno.ENOSPC, "No space left on device")
    message = checkpoint._save_failure(str(tmp_path / "last.pt"), str(tmp_path), state, full)
    assert "No space left on device" in message and "previous one is intact" in message
    assert "needs about 1 MiB" in message and "--resume auto" in message
    # The first epoch's saves: no last.pt to resume from, so not "then --resume auto".
    (tmp_path / "last.pt").unlink()
    message = checkpoint._save_failure(str(tmp_path / "best.pt"), str(tmp_path), state, full)
    assert "then start over" in message and "--resume auto" not in message


def start_training(flags, *, until: str, stderr=subprocess.PIPE) -> subprocess.Popen:
    """trainer/main.py in a process of its own, returned once it has printed ``until``."""
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "trainer", "main.py"), *flags],
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO},
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    for line in proc.stdout:
        if until in line:
            return proc
    proc.wait()
    raise AssertionError(f"the run ended (status {proc.returncode}) before printing {until!r}")


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_sigterm_and_ctrl_c_end_with_one_line(tmp_path, tiny_data, signame):
    import signal

    flags = [*base_flags(tiny_data, tmp_path / "out"), "--epochs", "3", "--log-interval", "1"]
    proc = start_training(flags, until="step 2/")  # under way, then stopped
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + getattr(signal, signame)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"stopped by {signame}"), err


@pytest.mark.slow
def test_val_fraction_zero_trains_without_validation(capsys, tmp_path, tiny_data):
    from pipelines.scan import make_lists

    # A flat class-folder tree split with --val-fraction 0: Test.txt holds only a comment.
    report = make_lists(os.path.join(tiny_data.root, "train"), out_dir=tmp_path / "lists",
                        val_fraction=0.0)  # fmt: skip
    assert report.val == []
    out = tmp_path / "out"
    flags = base_flags(tiny_data, out)
    flags[1] = report.train_list
    assert main(flags) == 0
    captured = capsys.readouterr()
    assert f"{report.val_list} holds no samples: training without validation" in captured.out
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["val_top1"] is None and record["train_loss"] > 0
    assert (out / "best.pt").is_file() and (out / "model.pt").is_file()
    assert "done: no validation;" in captured.out  # not "best val top-1 0.00%"
    # Evaluating needs images, though.
    fails(capsys, [*flags, "--eval-only", "--resume", str(out / "last.pt"),
                   "--output-dir", str(tmp_path / "eval")], "holds no samples")  # fmt: skip
    # Resuming with other settings would go on as another run under this one's name; the
    # refusal leaves the run's config.toml as it was.
    saved_config = (out / "config.toml").read_bytes()
    line = fails(capsys, [*flags, "--resume", "auto", "--epochs", "2", "--optimizer", "adamw"],
                 "resuming with other settings", "--optimizer 'sgd' there, 'adamw' now")  # fmt: skip
    assert "--epochs" not in line.split("settings than the run's:")[1].split(";")[0]
    assert (out / "config.toml").read_bytes() == saved_config
    # Another batch moves the default lr with it: the line says from what.
    fails(capsys, [*flags, "--resume", "auto", "--batch-size", "4"],
          "--batch-size 8 there, 4 now",
          "the default lr follows the global batch, now 4 = batch 4 x 1 rank x 1 accumulated")  # fmt: skip
    # Another run's checkpoint into a folder holding a run: refused, nothing touched.
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text('{"epoch": 1}\n')
    flags_other = [*flags[:-1], str(other), "--resume", str(out / "last.pt")]
    fails(capsys, flags_other, "is another run's checkpoint")
    assert (other / "metrics.jsonl").read_text() == '{"epoch": 1}\n'
    # --eval-only --resume auto where there is nothing: no random-weights score.
    empty = [*flags[:-1], str(tmp_path / "empty"), "--eval-only", "--resume", "auto",
             "--val-list", tiny_data.val_list]  # fmt: skip
    fails(capsys, empty, "nothing to evaluate")


@pytest.mark.slow
def test_recipe_options_reach_the_run(capsys, tmp_path, tiny_data):
    # Accumulation, clipping, mixup and cutmix through the command line, one epoch in-process.
    out = tmp_path / "out"
    flags = [*base_flags(tiny_data, out), "--grad-accum-steps", "2", "--clip-grad-norm", "1.0",
             "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0"]  # fmt: skip
    assert main(flags) == 0
    capsys.readouterr()
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    # 120 images / batch 8 = 15 batches: 8 optimizer steps (the last one of a single batch).
    assert last["scheduler"]["last_epoch"] == 8
    config = last["config"]
    assert config["lr"] == pytest.approx(0.1 * 8 * 2 / 256)  # global batch per optimizer step
    assert (config["grad_accum_steps"], config["clip_grad_norm"]) == (2, 1.0)
    assert (config["mixup_alpha"], config["cutmix_alpha"]) == (0.2, 1.0)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["train_loss"] > 0 and record["val_top1"] is not None


def test_train_list_of_one_label_is_refused(capsys, tmp_path, tiny_data):
    from pipelines.lists import read_list, write_list

    # classes.txt names 10 classes, but every sample is a "0": top-1 would read 100%.
    samples = [s for s in read_list(tiny_data.train_list) if s.label == 0]
    one = tmp_path / "one.txt"
    write_list(one, samples, absolute=True)
    flags = base_flags(tiny_data, tmp_path / "out")
    flags[1] = str(one)
    fails(capsys, [*flags, "--classes", tiny_data.classes_file], "every sample has label 0")


def test_val_list_with_another_class_map_is_refused(capsys, tmp_path, tiny_data):
    from pipelines.lists import read_classes, read_list, write_classes, write_list

    # make_lists run on the val tree alone numbers its classes its own way (here: one class
    # fewer, so every label after the first is shifted).
    names = read_classes(tiny_data.classes_file)
    val_dir = tmp_path / "val"
    val = [(s.path, s.label - 1) for s in read_list(tiny_data.val_list) if s.label > 0]
    write_list(val_dir / "Test.txt", val, absolute=True)
    write_classes(val_dir / "classes.txt", names[1:])
    flags = [*base_flags(tiny_data, tmp_path / "out"), "--val-list", str(val_dir / "Test.txt")]
    fails(capsys, flags, "the val list's classes differ from the train list's", "label 0")
    # --classes names the run's classes; it does not make the val list's own map agree.
    fails(capsys, [*flags, "--classes", tiny_data.classes_file], "the val list's classes differ")


def test_resume_from_a_folder_says_what_to_pass(capsys, tmp_path, tiny_data):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    flags = [*base_flags(tiny_data, tmp_path / "out"), "--resume", str(run_dir)]
    fails(capsys, flags, f"{run_dir}: a folder; pass its checkpoint", "--resume auto")


@pytest.mark.parametrize(("accum", "expected"), [(1, [4, 8, 12]), (3, [6, 9, 12])])
def test_checkpoint_every_n_steps_with_grad_accumulation(accum, expected):
    # --checkpoint-every 4 over 14 steps: due after steps 4, 8, 12, at the first optimizer
    # step boundary at or after each (with 3 batches a step: 6, 9, 12), never skipped.
    from trainer.preemption import StepControl

    control = StepControl(every_steps=4, every_minutes=0)
    saved = []
    control.save = lambda *, epoch, next_step, progress: saved.append(next_step) or "p"
    steps = 14
    for group_start in range(0, steps, accum):
        next_step = min(group_start + accum, steps)
        control.after_step(
            epoch=0, next_step=next_step, steps=steps, progress=dict, group_start=group_start
        )
    assert saved == expected


def test_a_signal_delivered_twice_still_saves_and_a_later_one_stops_at_once():
    # Ctrl-C reaches torchrun's agent and its workers, a scheduler signals every process of
    # the job, and torchrun forwards the signal too: a worker gets it twice within a fraction
    # of a second. That repeat must not skip the save; a second signal seconds later does.
    import signal

    from trainer import preemption

    control = preemption.StepControl(every_steps=0, every_minutes=0)
    saved = []
    control.save = lambda *, epoch, next_step, progress: saved.append(next_step) or "last.pt"
    control.install()
    try:
        control.in_training = True
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the agent's copy: still saves at the next step
        with pytest.raises(preemption.Stopped) as stopped:
            control.after_step(epoch=0, next_step=3, steps=10, progress=dict, group_start=2)
        assert (stopped.value.signal_name, stopped.value.saved, saved) == ("SIGINT", "last.pt", [3])
        control.signalled_at -= preemption.REPEAT_WINDOW_S  # an impatient second Ctrl-C
        with pytest.raises(preemption.Stopped) as stopped:
            os.kill(os.getpid(), signal.SIGINT)
        assert stopped.value.saved is None
    finally:
        control.uninstall()


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--lr", "nan", "--lr must be a finite number"),
        ("--warmup-epochs", "inf", "--warmup-epochs must be a finite number"),
        ("--mixup-alpha", "nan", "--mixup-alpha must be a finite number"),
        ("--momentum", "-1", "--momentum must be in [0, 1)"),
        ("--image-size", "8", "--image-size must be at least 16 px"),
    ],
)
def test_non_finite_and_out_of_range_values(capsys, tmp_path, tiny_data, flag, value, words):
    fails(capsys, [*base_flags(tiny_data, tmp_path / "out"), flag, value], words)


def test_a_diverging_run_stops_with_one_line(capsys, tmp_path, tiny_data):
    out = tmp_path / "out"
    flags = [*base_flags(tiny_data, out), "--lr", "1e6", "--log-interval", "1",
             "--warmup-epochs", "0"]  # fmt: skip
    fails(capsys, flags, "training diverged at epoch 1", "lower --lr")
    assert not (out / "model.pt").exists() and not (out / "best.pt").exists()


def test_overwrite_removes_every_file_of_the_earlier_run(tmp_path, tiny_data):
    from trainer.config import parse_config
    from trainer.run_dir import check_output_dir

    out = tmp_path / "out"
    (out / "eval-1").mkdir(parents=True)
    old = ["last.pt", "metrics.csv", "metrics.png", "per_class.csv", "confusion_matrix.png",
           "config.toml", "eval.json", "eval-1/eval.json"]  # fmt: skip
    for name in old:
        (out / name).write_text("the earlier run's")
    (out / "notes.txt").write_text("the user's own")
    check_output_dir(parse_config([*base_flags(tiny_data, out), "--overwrite"]))
    assert sorted(os.listdir(out)) == ["notes.txt"]


@pytest.mark.slow
def test_resume_on_epochs_of_another_length_keeps_the_schedule_in_step(capsys, tmp_path, tiny_data):
    # One epoch on the whole list, then a second on half of it (epochs of another length,
    # as another world size gives): the lr schedule goes on from the start of epoch 2, so
    # the run ends exactly at its end, not past it at lr 0 with steps still to go.
    from pipelines.lists import read_list, write_list
    from trainer.engine import make_scheduler, set_schedule_position

    run = tmp_path / "run"
    flags = [*base_flags(tiny_data, run), "--classes", tiny_data.classes_file]
    assert main([*flags, "--epochs", "1"]) == 0
    capsys.readouterr()
    half = tmp_path / "half.txt"
    write_list(half, read_list(tiny_data.train_list)[::2], absolute=True)
    resumed = [*flags, "--epochs", "2", "--resume", "auto", "--train-list", str(half)]
    assert main(resumed) == 0
    printed = capsys.readouterr().out
    assert "lr schedule set to the start of epoch 2" in printed
    assert f"note: --train-list {half} is not the run's" in printed
    last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    steps_now = last["optimizer_steps_per_epoch"]
    assert last["scheduler"]["last_epoch"] == 2 * steps_now
    # set_schedule_position puts a scheduler where stepping would have.
    weights = torch.nn.Parameter(torch.zeros(1))
    stepped = make_scheduler(torch.optim.SGD([weights], lr=1.0), warmup_steps=3, total_steps=20)
    for _ in range(7):
        stepped.optimizer.step()
        stepped.step()
    placed = make_scheduler(torch.optim.SGD([weights], lr=1.0), warmup_steps=3, total_steps=20)
    set_schedule_position(placed, 7)
    assert placed.get_last_lr() == stepped.get_last_lr()
    assert placed.optimizer.param_groups[0]["lr"] == stepped.optimizer.param_groups[0]["lr"]


@pytest.mark.slow
def test_run_stopped_after_its_last_checkpoint_resumes_to_every_result(capsys, tmp_path, tiny_data):
    # A signal during the final evaluation (or a kill during the export) stops the run after
    # last.pt of its last epoch: model.pt, per_class.csv and the confusion matrix are missing.
    # --resume auto has no epoch left to train and must still write them all, as they were.
    run = tmp_path / "run"
    assert main([*base_flags(tiny_data, run), "--plots"]) == 0
    finals = ["model.pt", "per_class.csv", "confusion_matrix.csv", "metrics.png"]
    before = {name: (run / name).read_bytes() for name in ("per_class.csv", "confusion_matrix.csv")}
    for name in finals:
        (run / name).unlink()
    assert ", 1 epoch, amp bf16" in capsys.readouterr().out  # the start line: not '1 epochs'
    assert main([*base_flags(tiny_data, run), "--plots", "--resume", "auto"]) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert all((run / name).exists() for name in finals)
    assert {name: (run / name).read_bytes() for name in before} == before
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    # Another folder's finished run resumed into a new one: no epoch runs there, no metrics
    # to plot; that is said in a line, not a traceback.
    other = tmp_path / "other"
    assert main([*base_flags(tiny_data, other), "--plots", "--resume", str(run / "last.pt")]) == 0
    assert "no metrics.png: no epochs were trained" in capsys.readouterr().out
    assert (other / "model.pt").exists() and (other / "per_class.csv").read_bytes() == before[
        "per_class.csv"
    ]


@pytest.mark.slow
def test_a_failed_best_pt_write_is_redone_on_resume(capsys, tmp_path, tiny_data):
    # best.pt of a new best epoch cannot be written (a full disk; here a folder in its way):
    # the run stops, and --resume auto once the space is there must redo that epoch and save
    # it as best.pt, not find its score already in last.pt and never write best.pt again.
    run = tmp_path / "run"
    flags = [*base_flags(tiny_data, run), "--classes", tiny_data.classes_file]
    assert main(flags) == 0
    (run / "best.pt").unlink()
    (run / "best.pt").mkdir()  # in the way of best.pt's write
    line = fails(capsys, [*flags, "--epochs", "2", "--resume", "auto"], "could not write")
    assert str(run / "best.pt") in line  # epoch 2 was a new best
    (run / "best.pt").rmdir()  # the space is freed
    assert main([*flags, "--epochs", "2", "--resume", "auto"]) == 0
    best = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert best["epoch"] == last["epoch"] == 2 and best["best_top1"] == last["best_top1"]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]


@pytest.mark.slow
def test_a_second_run_into_a_folder_in_use_is_refused(capsys, tmp_path, tiny_data):
    # Until its first checkpoint a run's folder holds only config.toml, which marks nothing:
    # a second run started there trained too, the two appending their epochs to one
    # metrics.jsonl (1, 1, 2, 2) and saving over each other's checkpoints; with --overwrite it
    # deleted the running one's files.
    out = tmp_path / "out"
    flags = [*base_flags(tiny_data, out), "--epochs", "1", "--log-interval", "1"]
    # The first run is training, before its first checkpoint.
    first = start_training(flags, until="step 1/", stderr=subprocess.STDOUT)
    for extra in ([], ["--overwrite"]):
        fails(capsys, [*flags, "--seed", "1", *extra], str(out), "another run is writing")
    first.communicate(timeout=120)
    assert first.returncode == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]  # the refused runs wrote none
    # Once it has ended the folder is free again: --resume auto continues it.
    assert main([*flags, "--epochs", "2", "--resume", "auto"]) == 0


def test_a_failed_write_into_the_output_folder_is_one_line(capsys, tmp_path, tiny_data):
    # config.toml, metrics and per-class files are written outside the checkpoints' own error
    # handling: a full disk there (here a folder in config.toml's way) ended in a traceback
    # naming a temp file, or none.
    out = tmp_path / "out"
    (out / "config.toml").mkdir(parents=True)
    fails(capsys, base_flags(tiny_data, out), f"could not write {out / 'config.toml'}")


@pytest.mark.slow
def test_a_step_checkpoint_resumes_mid_epoch_only_on_its_own_list_and_epochs(
    capsys, tmp_path, tiny_data
):
    # A step checkpoint's position is a step into the epoch's permutation of the list's
    # lines. On a list of the same length but other lines (reordered here) it resumed "at
    # step N" all the same, skipping some images of the epoch and repeating others; and
    # --epochs cut below the epoch it was saved in exported its mid-epoch weights as model.pt
    # of the shorter run.
    import shutil
    import signal

    from pipelines.lists import read_list, write_list

    run = tmp_path / "run"
    flags = [*base_flags(tiny_data, run), "--classes", tiny_data.classes_file]
    flags += ["--val-list", tiny_data.val_list, "--epochs", "2", "--checkpoint-every", "2"]
    flags += ["--log-interval", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "trainer", "main.py"), *flags],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first_run = []
    for line in proc.stdout:
        first_run.append(line)
        if "epoch 2/2 step 3/" in line:
            break
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    saved = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    step = saved["position"]["step"]
    assert saved["epoch"] == 1 and 3 <= step < 15
    before = (run / "last.pt").read_bytes()
    fails(capsys, [*flags, "--epochs", "1", "--resume", "auto"], f"in epoch 2 (step {step})")
    fails(capsys, [*flags, "--arch", "resnet34", "--resume", "auto"], "resume with --arch resnet18")
    assert (run / "last.pt").read_bytes() == before and not (run / "model.pt").exists()

    samples = read_list(tiny_data.train_list)
    moved, reordered = tmp_path / "moved.txt", tmp_path / "reordered.txt"
    write_list(moved, samples, absolute=True)  # the same lines, from another folder
    write_list(reordered, samples[::-1], absolute=True)
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    # The position saved by a graph that this start does not build (a rank whose
    # --dali-decode auto resolved to GPU decode on the machine that saved it): never restored
    # into the CPU-decode graph here; the epoch restarts.
    other_graph = tmp_path / "other_graph"
    shutil.copytree(run, other_graph)
    edited = torch.load(other_graph / "last.pt", map_location="cpu", weights_only=True)
    assert edited["ranks"][0]["loader_graph"]["decode"] == "cpu"
    edited["ranks"][0]["loader_graph"]["decode"] = "mixed"
    torch.save(edited, other_graph / "last.pt")
    assert main([*flags, "--output-dir", str(other_graph), "--resume", "auto"]) == 0
    printed = capsys.readouterr().out
    assert "with another loader graph on rank 0" in printed, printed
    assert "epoch 2 restarts from its first step" in printed
    assert "resuming epoch 2 at step" not in printed
    resumed = [*flags, "--output-dir", str(copy), "--resume", "auto", "--train-list", str(moved)]
    assert main(resumed) == 0
    assert f"resuming epoch 2 at step {step + 1}" in capsys.readouterr().out
    assert main([*flags, "--resume", "auto", "--train-list", str(reordered)]) == 0
    printed = capsys.readouterr().out
    assert "resuming epoch 2 at step" not in printed
    assert "on a train list of other images, labels or order: epoch 2 restarts" in printed
    assert "lr schedule set to the start of epoch 2" in printed

    # The restarted epoch's first step applies the lr of the epoch's first step, as the first
    # run's did: not the lr of the step the checkpoint was saved at.
    def first_step_lr(lines) -> str:
        line = next(x for x in lines if x.startswith("epoch 2/2 step 1/"))
        return line.split(" lr ")[1].split()[0]

    assert first_step_lr(printed.splitlines()) == first_step_lr(first_run)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]


def test_evaluations_beside_a_run_each_get_their_own_folder(tmp_path):
    from trainer import run_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')  # a training run's folder
    # Two evaluations deciding one after the other, before either has written anything (as
    # two started at once): each gets its own eval-N, made as it is handed out.
    first = run_dir.eval_results_dir(str(run))
    second = run_dir.eval_results_dir(str(run))
    assert (first, second) == (str(run / "eval-1"), str(run / "eval-2"))
    assert os.path.isdir(first) and os.path.isdir(second)
