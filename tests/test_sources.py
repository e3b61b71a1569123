from pathlib import Path

import pytest

from indexer.errors import SourceError
from indexer.sources import filesystem_path, read_captions_file, read_texts_file, sidecar_captions, walk_images


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
    assert any("visited" in p.message for p in problems)


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
