"""The list-file format (pipelines/lists.py): every error names file:line, round trips hold."""

from __future__ import annotations

import os

import pytest

from pipelines.lists import (
    ListError,
    Sample,
    classes_beside,
    format_line,
    read_classes,
    read_list,
    write_classes,
    write_list,
)


def write_text(path, text: str, encoding: str = "utf-8") -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding=encoding, newline="") as f:
        f.write(text)
    return path


# --- reading lists ---------------------------------------------------------------------------


def test_comments_blank_lines_and_spaces_in_paths(tmp_path):
    lst = write_text(
        tmp_path / "lists" / "Train.txt",
        "# header comment\n\n  a/x.jpg 0\nb c/y z.jpg   1\n   \n# another\n/abs/p.png 2\n",
    )
    samples = read_list(lst, num_classes=3)
    base = str(tmp_path / "lists")
    assert samples == [
        Sample(os.path.join(base, "a", "x.jpg"), 0),
        Sample(os.path.join(base, "b c", "y z.jpg"), 1),
        Sample("/abs/p.png", 2),
    ]


def test_relative_paths_resolve_against_the_list_folder_not_cwd(tmp_path, monkeypatch):
    lst = write_text(tmp_path / "deep" / "L.txt", "../img/a.jpg 0\n./b.jpg 1\n")
    os.makedirs(tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path / "elsewhere")
    paths = [s.path for s in read_list(os.path.relpath(lst))]
    assert paths == [str(tmp_path / "img" / "a.jpg"), str(tmp_path / "deep" / "b.jpg")]
    assert all(os.path.isabs(p) for p in paths)


def test_crlf_and_byte_order_mark_are_tolerated(tmp_path):
    lst = write_text(tmp_path / "L.txt", "\ufeffa.jpg 0\r\nb.jpg 1\r\n")
    assert [s.path for s in read_list(lst)] == [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("a.jpg 0\nno_label_here\n", 2, "expected 'path label'"),
        ("a.jpg 0\n\n# c\nb.jpg cat\n", 4, "is not an integer"),
        ("a.jpg 1.5\n", 1, "is not an integer"),
        ("a.jpg 0\nb.jpg -1\n", 2, "negative label -1"),
        ("a.jpg 0\nb.jpg 3\n", 2, "outside [0, 3)"),
    ],
)
def test_bad_lines_are_named_by_file_and_line(tmp_path, text, line, words):
    lst = write_text(tmp_path / "L.txt", text)
    with pytest.raises(ListError) as info:
        read_list(lst, num_classes=3)
    message = str(info.value)
    assert message.startswith(f"{lst}:{line}: ")
    assert words in message


def test_label_range_is_checked_only_with_num_classes(tmp_path):
    lst = write_text(tmp_path / "L.txt", "a.jpg 7\n")
    assert read_list(lst)[0].label == 7
    with pytest.raises(ListError, match=r"L\.txt:1: label 7 is outside \[0, 7\)"):
        read_list(lst, num_classes=7)


def test_missing_list_is_an_error(tmp_path):
    with pytest.raises(ListError, match="list file not found"):
        read_list(tmp_path / "nope.txt")


def test_a_folder_is_no_list_or_classes_file(tmp_path):
    with pytest.raises(ListError, match="a folder, not a list file .tools/make_lists.py"):
        read_list(tmp_path)
    with pytest.raises(ListError, match="a folder, not a classes file .tools/make_lists.py"):
        read_classes(tmp_path)


@pytest.mark.parametrize("text", ["", "# only a comment\n\n   \n"])
def test_list_without_samples_is_an_error(tmp_path, text):
    lst = write_text(tmp_path / "L.txt", text)
    with pytest.raises(ListError, match="holds no samples"):
        read_list(lst)


def test_non_utf8_list_names_the_line(tmp_path):
    lst = tmp_path / "L.txt"
    lst.write_bytes(b"a.jpg 0\nb.jpg 1\n\xff\xfe.jpg 0\n")
    with pytest.raises(ListError, match=r"L\.txt:3: not UTF-8"):
        read_list(lst)


# --- writing lists ---------------------------------------------------------------------------


def test_awkward_names_round_trip(tmp_path):
    names = [
        "plain.jpg",
        "with space.jpg",
        "  leading blanks.jpg",
        "#looks like a comment.jpg",
        "ñandú café/日本 語.png",
        "tab\tinside.jpg",
        "ends with digits 12.jpg",
    ]
    samples = [Sample(str(tmp_path / "img" / n), k) for k, n in enumerate(names)]
    lst = tmp_path / "lists" / "Train.txt"
    assert write_list(lst, samples) == len(names)
    text = lst.read_text(encoding="utf-8")
    assert "../img/plain.jpg 0\n" in text  # relative to the list's folder
    assert read_list(lst) == samples
    # Beside the images, the relative paths start with the names themselves.
    beside = tmp_path / "img" / "Train.txt"
    write_list(beside, samples)
    text = beside.read_text(encoding="utf-8")
    assert "./  leading blanks.jpg 2\n" in text and "./#looks like a comment.jpg 3\n" in text
    assert read_list(beside) == samples
    write_list(lst, samples, absolute=True)
    assert lst.read_text(encoding="utf-8").startswith(f"{tmp_path}/img/plain.jpg 0\n")
    assert read_list(lst) == samples


def test_tuples_are_accepted_and_labels_cast(tmp_path):
    lst = tmp_path / "L.txt"
    write_list(lst, [(str(tmp_path / "a.jpg"), 2)])
    assert lst.read_text() == "a.jpg 2\n"


@pytest.mark.parametrize("absolute", [False, True])
def test_write_list_resolves_each_folder_once_and_agrees_with_relpath(
    tmp_path, monkeypatch, absolute
):
    # ImageNet: 1.28M files in 1000 folders; a relpath per file was half of make_lists' time.
    monkeypatch.chdir(tmp_path)
    lst = tmp_path / "out" / "lists" / "L.txt"
    base = str(lst.parent)
    names = ["a.jpg", "#b.jpg", " c.png", "d e.jpg"]
    folders = [str(tmp_path / "img" / "cls"), "rel/x", "rel/x/../y", str(lst.parent), "/"]
    odd = [base, str(tmp_path / "out"), "rel/x/..", "rel/x/.", "lists", "out/lists"]
    paths = [os.path.join(f, n) for f in folders for n in names] + odd
    want = [
        os.path.abspath(p) if absolute else os.path.relpath(os.path.abspath(p), base) for p in paths
    ]
    real_relpath, calls = os.path.relpath, []

    def counting_relpath(*args):
        calls.append(args)
        return real_relpath(*args)

    monkeypatch.setattr(os.path, "relpath", counting_relpath)
    write_list(lst, [(p, 0) for p in paths], absolute=absolute)
    assert lst.read_text() == "".join(format_line(p, 0) for p in want)
    # one call per folder, and one for each odd path (a folder, or a name in base's path)
    assert len(calls) == (0 if absolute else len(folders) + len(odd))


def test_unwritable_paths_are_refused_without_leaving_debris(tmp_path):
    lst = tmp_path / "L.txt"
    write_list(lst, [(str(tmp_path / "ok.jpg"), 0)])
    with pytest.raises(ListError, match="line break"):
        write_list(lst, [(str(tmp_path / "ok.jpg"), 0), (str(tmp_path / "a\nb.jpg"), 1)])
    with pytest.raises(ListError, match="ends in a blank"):
        format_line("a.jpg ", 0)
    assert sorted(os.listdir(tmp_path)) == ["L.txt"]  # no temp file left behind
    assert lst.read_text() == "ok.jpg 0\n"  # and the old list is intact


# --- classes.txt -----------------------------------------------------------------------------


def test_classes_round_trip_and_classes_beside(tmp_path):
    names = ["cat", "dog house", "ñandú", " padded "]
    write_classes(tmp_path / "classes.txt", names)
    assert read_classes(tmp_path / "classes.txt") == names
    write_text(tmp_path / "Train.txt", "a.jpg 0\n")
    assert classes_beside(tmp_path / "Train.txt") == str(tmp_path / "classes.txt")
    write_text(tmp_path / "other" / "Train.txt", "a.jpg 0\n")
    assert classes_beside(tmp_path / "other" / "Train.txt") is None


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("cat\n\ndog\n", r"classes\.txt:2: empty class name"),
        ("cat\n   \ndog\n", r"classes\.txt:2: empty class name"),
        ("# only a comment\n\n", r"classes\.txt: no class names"),
        ("cat\ndog\ncat\n", r"classes\.txt:3: class 'cat' repeats line 1"),
        ("", r"classes\.txt: no class names"),
    ],
)
def test_bad_classes_files(tmp_path, text, pattern):
    path = write_text(tmp_path / "classes.txt", text)
    with pytest.raises(ListError, match=pattern):
        read_classes(path)


def test_classes_file_comments_trailing_blanks_and_hash_names(tmp_path):
    # A comment line shifts no label, trailing blank lines are nothing, and a class named
    # "#..." survives the round trip (written as "\\#...").
    path = write_text(tmp_path / "classes.txt", "# my classes\ncat\n# dogs next\ndog\n\n \n")
    assert read_classes(path) == ["cat", "dog"]
    write_classes(tmp_path / "out.txt", ["#hash", "cat", "\\plain"])
    assert (tmp_path / "out.txt").read_text() == "\\#hash\ncat\n\\plain\n"
    assert read_classes(tmp_path / "out.txt") == ["#hash", "cat", "\\plain"]


def test_missing_classes_file_is_a_list_error(tmp_path):
    with pytest.raises(ListError, match="classes file not found"):
        read_classes(tmp_path / "classes.txt")


def test_unwritable_class_names_are_refused(tmp_path):
    with pytest.raises(ListError, match="cannot write class name"):
        write_classes(tmp_path / "classes.txt", ["ok", "two\nlines"])
    assert not os.path.exists(tmp_path / "classes.txt")


# --- the compact table -----------------------------------------------------------------------


def test_fast_parser_agrees_with_the_line_by_line_one(tmp_path):
    """read_table's whole-chunk passes against the reference parser, on every path shape that
    needs joining or normalizing, with CRLF, a byte-order mark, tabs and Unicode."""
    from pipelines.lists import _read_lines_checked, read_table

    text = (
        "\ufeff# header\r\n"
        "a/x.jpg 0\r\n"
        "  ./b.jpg\t1  \r\n"
        "../up/c.jpg 2\r\n"
        "d//e/./f.jpg 3\r\n"
        "/abs/./g/../h.jpg 4\r\n"
        "//net/share.jpg 5\r\n"
        "dir/ 6\r\n"
        "ñandú café/日本 語.png 7\r\n"
        ".hidden/i.jpg 8\r\n"
        "\r\n"
        "with\u3000ideographic space.jpg 9\r\n"
    )
    lst = write_text(tmp_path / "lists" / "L.txt", text)
    table = read_table(lst, num_classes=10)
    expected = [Sample(p, k) for p, k in _read_lines_checked(lst, 10)]
    assert table.samples() == expected
    assert len(table) == 10
    assert table.path(2) == str(tmp_path / "up" / "c.jpg")
    assert table.path(4) == "/abs/h.jpg" and table.path(5) == "//net/share.jpg"


def test_fast_parser_errors_still_name_the_line(tmp_path):
    """A bad line in a later chunk of a long list: the careful parser takes over, names it."""
    from pipelines import lists

    good = "".join(f"img/{i:06d}.jpg {i % 3}\n" for i in range(100_000))  # > one chunk
    assert len(good) > lists._PARSE_CHUNK_CHARS
    lst = write_text(tmp_path / "L.txt", good + "last.jpg 3\n")
    with pytest.raises(ListError, match=r"L\.txt:100001: label 3 is outside \[0, 3\)"):
        lists.read_table(lst, num_classes=3)
    assert len(lists.read_table(lst)) == 100_001


def test_sample_table_round_trips_unicode_paths():
    from pipelines.lists import SampleTable

    paths = ["/a/plain.jpg", "/b/ñandú café.jpg", "/c/日本 語.png", "/d/x"]
    table = SampleTable.from_pairs(paths, [3, 1, 4, 1])
    assert len(table) == 4 and table.labels.tolist() == [3, 1, 4, 1]
    assert [table.path(i) for i in range(4)] == paths
    assert table.paths() == paths and table.paths(1, 3) == paths[1:3] and table.paths(2, 2) == []
    view = table.path_bytes(2)
    assert view.base is not None and bytes(view) == paths[2].encode()  # a view, no NUL
    assert table.nbytes == sum(len(p.encode()) + 1 for p in paths) + 8 * 5 + 8 * 4
    assert table.samples() == [Sample(p, k) for p, k in zip(paths, [3, 1, 4, 1], strict=True)]


def test_read_table_pauses_garbage_collection_only_while_parsing(tmp_path):
    # Collection is paused for the parse (3.3 s -> 0.8 s for 1.28M lines with the trainer's
    # imports loaded) and must be back on afterwards, also when the list is refused.
    import gc

    from pipelines.lists import read_table

    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("a.jpg 0\nb.jpg 1\n", encoding="utf-8")
    bad.write_text("a.jpg 0\nb.jpg -1\n", encoding="utf-8")
    assert gc.isenabled()
    assert len(read_table(str(good))) == 2
    assert gc.isenabled()
    with pytest.raises(ListError, match=r"bad\.txt:2"):
        read_table(str(bad))
    assert gc.isenabled()
    gc.disable()  # a caller's own choice is left as it was
    try:
        read_table(str(good))
        assert not gc.isenabled()
    finally:
        gc.enable()
