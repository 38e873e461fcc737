"""The README's commands, read from the README itself (not a copy) and run, with tiny data
and settings where they name your data or would take minutes, so that it cannot drift."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
# Appended to a trainer command: later flags win, so the README's own flags are all parsed
# and checked, and these make the run small.
TINY = ["--image-size", "32", "--batch-size", "8", "--workers", "1", "--log-interval", "5"]


def readme_commands() -> list[str]:
    """Each command of the README's bash blocks (continuations joined, comments dropped)."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def command(prefix: str) -> list[str]:
    """The README's one command starting with ``prefix``, as argv."""
    found = [c for c in readme_commands() if c.startswith(prefix)]
    assert len(found) == 1, (prefix, readme_commands())
    return shlex.split(found[0])


def python_argv(argv: list[str]) -> list[str]:
    """``.venv/bin/python X ...`` with this interpreter and the repository's paths."""
    assert argv[0] == ".venv/bin/python", argv
    return [sys.executable, os.path.join(REPO, argv[1]), *argv[2:]]


def env(**extra) -> dict[str, str]:
    out = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, **extra}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        out.pop(key, None)
    return out


def test_every_command_is_one_this_file_runs():
    """A command added to the README without a test here fails: each has its own below."""
    starts = [
        "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python trainer/main.py",
        "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && .venv/bin/ruff check .",
        ".venv/bin/python tools/make_lists.py",
        ".venv/bin/python trainer/main.py --train-list",
        ".venv/bin/python tools/predict.py",
    ]
    commands = readme_commands()
    assert len(commands) == len(starts)
    for text, start in zip(commands, starts, strict=True):
        assert text.startswith(start), (text, start)


def test_the_readme_is_short_and_its_links_and_picture_exist():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    assert len(text.splitlines()) <= 150
    targets = re.findall(r"\]\(([^)#]+)\)", text)
    assert "docs/h100_throughput.png" in targets
    for target in targets:
        assert os.path.exists(os.path.join(REPO, target)), target
    # The reference pages' links too, relative to each page.
    docs = os.path.join(REPO, "docs")
    for name in os.listdir(docs):
        if name.endswith(".md"):
            with open(os.path.join(docs, name), encoding="utf-8") as f:
                for target in re.findall(r"\]\(([^)#]+)\)", f.read()):
                    if not target.startswith("http"):
                        assert os.path.exists(os.path.join(docs, target)), (name, target)


def test_the_test_command_is_the_one_ci_runs():
    (test_command,) = [c for c in readme_commands() if "pytest" in c]
    with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
        ci = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert ci[-1] == test_command


@pytest.mark.slow
def test_the_quick_start_trains(tiny_data, tmp_path):
    """The first command: its install step is the test command's, and its run is the
    trainer with no flags but the tiny ones (the demo recipe on the tiny data)."""
    steps = readme_commands()[0].split(" && ")
    assert steps[:2] == ["python3 -m venv .venv", ".venv/bin/pip install -e '.[test]'"]
    argv = python_argv(shlex.split(steps[2]))
    out = tmp_path / "demo"
    flags = ["--train-list", tiny_data.train_list, "--epochs", "1", "--output-dir", str(out)]
    done = subprocess.run(
        [*argv, *flags, *TINY], cwd=tmp_path, env=env(), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("config.toml", "metrics.jsonl", "train_batch.png", "model.pt", "per_class.csv"):
        assert (out / name).exists(), name
    # On a CPU it says how many torch threads it chose and why, and keeps the count.
    said = re.search(r"^torch: (\d+) threads? per process \((.+)\)$", done.stdout, re.M)
    assert said, done.stdout[-2000:]
    with open(out / "config.toml", "rb") as f:
        assert tomllib.load(f)["cpu_threads"] == int(said.group(1))


@pytest.mark.slow
def test_your_own_images_in_three_commands(tiny_data, tmp_path):
    """make_lists on a class-folder tree, the fine-tune from torchvision's ResNet50 weights
    (a stand-in file in a pre-filled torch cache: no network here), then predict on a folder."""
    import torch
    import torchvision

    flowers = tmp_path / "flowers"
    for split in ("train", "val"):
        shutil.copytree(os.path.join(tiny_data.root, split), flowers / split)
    new_photos = os.path.join(tiny_data.root, "val", "blue_checkerboard")
    runs = tmp_path / "runs"

    def mapped(argv: list[str]) -> list[str]:
        swap = {"/data/flowers": str(flowers), "/data/new_photos": new_photos, "runs/": f"{runs}/"}
        out = []
        for arg in argv:
            for old, new in swap.items():
                if arg.startswith(old):
                    arg = new + arg[len(old) :]
            out.append(arg)
        return out

    lists = subprocess.run(
        python_argv(mapped(command(".venv/bin/python tools/make_lists.py"))),
        env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert lists.returncode == 0, lists.stderr
    assert "split layout" in lists.stdout and (flowers / "lists" / "Train.txt").exists()

    home = tmp_path / "torch_home"
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    cache = home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50().state_dict(), cache / os.path.basename(weights.url))
    train = python_argv(mapped(command(".venv/bin/python trainer/main.py --train-list")))
    assert "--pretrained" in train and "IMAGENET1K_V2" in train
    done = subprocess.run(
        [*train, "--epochs", "2", *TINY], cwd=tmp_path, env=env(TORCH_HOME=str(home)),
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (runs / "flowers" / "model.pt").exists()

    predicted = subprocess.run(
        python_argv(mapped(command(".venv/bin/python tools/predict.py"))),
        cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr
    rows = [line for line in predicted.stdout.splitlines() if line.startswith(new_photos)]
    assert len(rows) == 4  # the folder's four images, each with its top-5


def test_the_flags_page_is_what_help_prints():
    from trainer.config import FLAGS_END, FLAGS_START, build_parser, flags_markdown

    with open(os.path.join(REPO, "docs", "training.md"), encoding="utf-8") as f:
        page = f.read()
    start, end = page.index(FLAGS_START), page.index(FLAGS_END) + len(FLAGS_END)
    assert page[start:end] == flags_markdown(), "regenerate: trainer.config.flags_markdown()"
    help_text = " ".join(build_parser().format_help().split())
    for action in build_parser()._actions:
        if action.dest == "help":
            continue
        for flag in action.option_strings:
            assert flag in help_text, flag
            assert f"`{flag}" in page or f", {flag}" in page, flag
