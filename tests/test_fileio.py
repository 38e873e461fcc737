"""pipelines.fileio: the one atomic writer every file of the project goes through."""

from __future__ import annotations

import os

import pytest

from pipelines.fileio import (
    OutputFileError,
    atomic_write,
    atomic_write_text,
    check_output_file,
)


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


def test_check_output_file_refuses_what_would_lose_a_result_or_fail_late(tmp_path):
    new = tmp_path / "deeper" / "still" / "out.json"  # missing folders: created later
    assert check_output_file(new, overwrite=False, flag="--json") == str(new)
    existing = tmp_path / "old.json"
    existing.write_text("{}")
    with pytest.raises(
        OutputFileError,
        match=r"^--json .*old.json exists: choose another name or pass --overwrite$",
    ):
        check_output_file(existing, overwrite=False, flag="--json")
    assert check_output_file(existing, overwrite=True, flag="--json") == str(existing)
    with pytest.raises(OutputFileError, match="is a folder"):
        check_output_file(tmp_path, overwrite=True, flag="--json")
    with pytest.raises(OutputFileError, match="old.json is a file, not a folder"):
        check_output_file(existing / "x.json", overwrite=True, flag="--json")
    assert existing.read_text() == "{}"  # nothing written by a check


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_check_output_file_refuses_an_unwritable_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputFileError, match="not writable"):
            check_output_file(locked / "a" / "out.png", overwrite=False, flag="--plot")
    finally:
        locked.chmod(0o700)
