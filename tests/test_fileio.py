"""pipelines.fileio: the one atomic writer every file of the project goes through."""

from __future__ import annotations

import os

import pytest

from pipelines.fileio import atomic_write, atomic_write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_no_debris(tmp_path):
    target = tmp_path / "sub" / "metrics.csv"
    atomic_write_text(target, "old\n")  # creates the folder too
    assert target.read_text() == "old\n"

    def half_then_fail(f):
        f.write(b"new, half written")
        raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError, match="disk went away"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old\n"
    assert os.listdir(target.parent) == ["metrics.csv"]  # no temporary file left
    atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n"


def test_every_writer_of_the_project_uses_it():
    # A new file writer should not invent its own temp-and-rename: one helper, one behaviour.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    offenders = []
    for folder in ("pipelines", "trainer", "benchmarks", "tools"):
        for name in os.listdir(os.path.join(repo, folder)):
            if name.endswith(".py") and name != "fileio.py":
                with open(os.path.join(repo, folder, name), encoding="utf-8") as f:
                    if "os.replace(" in f.read():
                        offenders.append(f"{folder}/{name}")
    assert offenders == []
