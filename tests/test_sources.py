import errno
import os
import socket
from pathlib import Path

import pytest

from indexer.errors import SourceError
from indexer.sources import (
    WalkReport,
    filesystem_path,
    read_captions_file,
    read_texts_file,
    sidecar_captions,
    walk_images,
)


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def rels(root, **kw):
    return [f.rel for f in walk_images(root, **kw)]


def test_walk_finds_every_extension_in_any_case_sorted_and_recursive(tmp_path):
    for name in ["b.JPG", "a.jpeg", "c.png", "d.WebP", "e.bmp", "f.gif", "g.tif", "h.TIFF", "notes.txt", "x.raw"]:
        touch(tmp_path / name)
    touch(tmp_path / "sub" / "deeper" / "z.jpg")
    assert rels(tmp_path) == ["a.jpeg", "b.JPG", "c.png", "d.WebP", "e.bmp", "f.gif", "g.tif", "h.TIFF",
                              "sub/deeper/z.jpg"]


def test_walk_skips_hidden_unless_asked(tmp_path):
    touch(tmp_path / ".hidden.jpg")
    touch(tmp_path / ".cache" / "a.jpg")
    touch(tmp_path / "seen.jpg")
    assert rels(tmp_path) == ["seen.jpg"]
    assert rels(tmp_path, include_hidden=True) == [".cache/a.jpg", ".hidden.jpg", "seen.jpg"]


def test_walk_exclude_matches_relative_path_and_name(tmp_path):
    touch(tmp_path / "raw" / "a.jpg")
    touch(tmp_path / "keep" / "b.jpg")
    touch(tmp_path / "keep" / "c.gif")
    assert rels(tmp_path, exclude=["raw"]) == ["keep/b.jpg", "keep/c.gif"]
    assert rels(tmp_path, exclude=["*.gif"]) == ["keep/b.jpg", "raw/a.jpg"]
    assert rels(tmp_path, exclude=["keep/*"]) == ["raw/a.jpg"]


def test_walk_reports_size_mtime_and_survives_symlink_loops(tmp_path):
    f = touch(tmp_path / "a.jpg", b"12345")
    (tmp_path / "loop").symlink_to(tmp_path, target_is_directory=True)
    problems = []
    found = list(walk_images(tmp_path, problems=problems))
    assert [x.rel for x in found] == ["a.jpg"]
    assert found[0].size == 5 and found[0].mtime_ns == f.stat().st_mtime_ns
    assert any("symlink loop" in p.message and "visited" in p.message for p in problems)


def test_a_symlink_to_a_folder_walked_elsewhere_is_not_called_a_loop(tmp_path):
    touch(tmp_path / "z_real" / "a.jpg")
    (tmp_path / "a_alias").symlink_to(tmp_path / "z_real", target_is_directory=True)  # sorts before its target
    (tmp_path / "z_real" / "back").symlink_to(tmp_path, target_is_directory=True)  # a real loop
    problems = []
    assert rels(tmp_path, problems=problems) == ["z_real/a.jpg"]  # once, under its real path
    messages = {Path(p.where).name: p.message for p in problems}
    assert set(messages) == {"a_alias", "back"}
    assert "already indexed through 'z_real'" in messages["a_alias"] and "loop" not in messages["a_alias"]
    assert "symlink loop" in messages["back"]


def test_a_symlink_to_a_folder_outside_the_root_is_walked(tmp_path):
    touch(tmp_path / "elsewhere" / "b.jpg")
    root = tmp_path / "root"
    touch(root / "a.jpg")
    (root / "ext").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    problems = []
    assert rels(root, problems=problems) == ["a.jpg", "ext/b.jpg"] and problems == []


def test_non_regular_files_are_reported_never_opened(tmp_path, monkeypatch):
    touch(tmp_path / "real.jpg")
    os.mkfifo(tmp_path / "pipe.jpg")
    os.mkfifo(tmp_path / "pipe.dat")
    (tmp_path / "link.jpg").symlink_to(tmp_path / "pipe.jpg")
    monkeypatch.chdir(tmp_path)  # a relative name: AF_UNIX paths are limited to ~100 bytes
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("sock.png")
        report, problems = WalkReport(), []
        assert rels(tmp_path, report=report, problems=problems) == ["real.jpg"]
    assert [(f.rel, f.kind, f.path) for f in report.special] == [
        ("link.jpg", "FIFO", tmp_path / "link.jpg"), ("pipe.jpg", "FIFO", tmp_path / "pipe.jpg"),
        ("sock.png", "socket", tmp_path / "sock.png")]
    assert report.other_special == {"FIFO": 1} and not report.other_types and problems == []


def test_files_of_other_types_are_counted_but_not_sidecars_hidden_excluded_or_inputs(tmp_path):
    for name in ["a.jpg", "a.txt", "b.txt", "m1.mp4", "m2.MP4", "doc.pdf", "README", ".hidden.mp4",
                 "raw/x.psd", "caps.jsonl", "sub/c.png", "sub/c.txt", "sub/d.xcf"]:
        touch(tmp_path / name)
    report = WalkReport()
    rels(tmp_path, exclude=["raw"], report=report, not_counted=[tmp_path / "caps.jsonl"])
    assert report.other_types == {".mp4": 2, ".txt": 1, ".pdf": 1, "": 1, ".xcf": 1}


@pytest.mark.parametrize("code", [errno.EACCES, errno.EIO])
def test_a_folder_that_cannot_be_listed_is_reported_and_nothing_under_it_counts_as_missing(
        tmp_path, monkeypatch, code):
    touch(tmp_path / "top.jpg")
    touch(tmp_path / "sub" / "inner.jpg")
    scandir = os.scandir

    def failing(path):
        if Path(path).name == "sub":
            raise OSError(code, os.strerror(code), str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", failing)
    report, problems = WalkReport(), []
    assert rels(tmp_path, report=report, problems=problems) == ["top.jpg"]
    assert report.unread_dirs == {"sub/"}
    assert report.unseen("sub/inner.jpg") and report.unseen("sub/deeper/x.jpg")
    assert not report.unseen("top.jpg") and not report.unseen("subway.jpg")
    assert [p.message for p in problems] == [f"cannot read directory: {os.strerror(code)}; "
                                             "what was indexed under it is kept"]


def test_a_broken_symlink_keeps_what_was_indexed_under_its_name(tmp_path):
    (tmp_path / "disk").symlink_to(tmp_path / "unmounted", target_is_directory=True)
    (tmp_path / "one.jpg").symlink_to(tmp_path / "unmounted.jpg")
    report, problems = WalkReport(), []
    assert rels(tmp_path, report=report, problems=problems) == []
    assert report.unseen("disk/a/b.jpg") and report.unseen("one.jpg") and not report.unseen("other.jpg")
    assert [p.message for p in problems] == ["broken symlink, its target is missing; what was indexed under this "
                                             "name is kept"] * 2


def test_sidecar_captions_one_per_nonempty_line(tmp_path):
    touch(tmp_path / "sub" / "cat.jpg")
    (tmp_path / "sub" / "cat.txt").write_text("a cat\n\n  on a mat  \n")
    image = next(walk_images(tmp_path))
    records = sidecar_captions(image, [])
    assert [(r.text, r.image, r.line) for r in records] == [("a cat", "sub/cat.jpg", 1), ("on a mat", "sub/cat.jpg", 3)]
    assert records[0].origin == "sidecar:sub/cat.txt"


def test_jsonl_captions_both_shapes_and_bad_lines_reported(tmp_path):
    f = tmp_path / "caps.jsonl"
    f.write_text('{"image": "./a.jpg", "caption": "one"}\n'
                 '\n'
                 '{"image": "b.jpg", "captions": ["two", "three"]}\n'
                 'not json\n'
                 '{"caption": "no image"}\n')
    problems = []
    records = read_captions_file(f, problems)
    assert [(r.image, r.text, r.line) for r in records] == [("a.jpg", "one", 1), ("b.jpg", "two", 3),
                                                              ("b.jpg", "three", 3)]
    assert [p.where for p in problems] == [f"{f}:4", f"{f}:5"]


@pytest.mark.parametrize("suffix,sep", [(".csv", ","), (".tsv", "\t")])
def test_table_captions(tmp_path, suffix, sep):
    f = tmp_path / f"caps{suffix}"
    f.write_text(f"image{sep}caption\na.jpg{sep}a dog\nb.jpg{sep}\n")
    records = read_captions_file(f, [])
    assert [(r.image, r.text) for r in records] == [("a.jpg", "a dog")]


def test_table_without_columns_is_a_clear_error(tmp_path):
    f = tmp_path / "caps.csv"
    f.write_text("file,text\na.jpg,x\n")
    with pytest.raises(SourceError, match="needs 'image' and 'caption' columns"):
        read_captions_file(f, [])


def test_missing_or_unknown_captions_file(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        read_captions_file(tmp_path / "nope.jsonl", [])
    (tmp_path / "caps.xml").write_text("<x/>")
    with pytest.raises(SourceError, match="unknown captions format"):
        read_captions_file(tmp_path / "caps.xml", [])


def test_texts_plain_and_jsonl(tmp_path):
    plain = tmp_path / "t.txt"
    plain.write_text("first\n\nsecond\n")
    assert [(r.text, r.image, r.line) for r in read_texts_file(plain, [])] == [("first", None, 1), ("second", None, 3)]
    jl = tmp_path / "t.jsonl"
    jl.write_text('{"text": "hello"}\n{"nope": 1}\n')
    problems = []
    assert [r.text for r in read_texts_file(jl, problems)] == ["hello"]
    assert problems[0].where == f"{jl}:2"


def test_bad_utf8_is_decoded_with_a_warning(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(b"caf\xe9 au lait\n")
    problems = []
    assert read_texts_file(f, problems)[0].text == "caf\ufffd au lait"
    assert "UTF-8" in problems[0].message


def test_names_that_are_not_utf8_are_indexed_under_an_escaped_name(tmp_path):
    touch(tmp_path / "good.jpg")
    (tmp_path / b"d\xfe".decode("utf-8", "surrogateescape")).mkdir()
    with open(bytes(tmp_path) + b"/d\xfe/bad\xff.jpg", "wb") as fh:
        fh.write(b"x")
    problems = []
    files = list(walk_images(tmp_path, problems=problems))
    assert [f.rel for f in files] == ["d\\xfe/bad\\xff.jpg", "good.jpg"]
    assert files[0].path.read_bytes() == b"x"  # the real file, for decoding
    assert filesystem_path(str(tmp_path / files[0].rel)) == files[0].path
    assert "not valid UTF-8" in problems[0].message and "indexed as 'd\\xfe'" in problems[0].message
