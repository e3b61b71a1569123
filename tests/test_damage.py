"""A damaged catalog or vector file ends every command with one line that says which file and what to do.

The catalog is damaged for real (garbage, another kind of file, truncated, pages overwritten in the
middle), and the real commands run on it through the CLI.
"""

import contextlib
import json
import os
import random
import sqlite3

import pytest

CATALOG_COMMANDS = [
    ("index", "{photos}", "--workers", "0", "--no-progress"),
    ("search", "a first caption", "--to", "text"),  # texts fill the middle of the catalog
    ("info",),
    ("eval",),
    ("reindex", "--index-type", "hnsw"),
    ("export", "{out}"),
]


def connected(path):
    return contextlib.closing(sqlite3.connect(path))  # closed at once: no lock is left to the commands under test


@pytest.fixture
def indexed(invoke, photo_dir, tmp_path):
    """An index with thousands of rows (standalone texts), so that its catalog spans many pages."""
    notes = tmp_path / "notes.txt"
    notes.write_text("".join(f"standalone note number {i} about nothing in particular\n" for i in range(3000)))
    invoke("index", photo_dir, "--texts", notes, "--workers", "0", "--no-progress", ok=True)
    index = tmp_path / "idx"
    with connected(index / "catalog.sqlite") as db:  # everything in the main file, as after a clean exit
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return index


def overwrite_pages(catalog, count: int = 8, seed: int = 7) -> None:
    """Random bytes over ``count`` pages near the middle of the file, among them pages of items and of vectors.

    SQLite interleaves the tables' pages as rows arrive, so the window is the one nearest the middle that holds both.
    """
    with connected(catalog) as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        middle = db.execute("PRAGMA page_count").fetchone()[0] // 2
        owner = dict(db.execute("SELECT pageno, name FROM dbstat"))
    windows = sorted(range(2, 2 * middle - count), key=lambda start: abs(start - middle))
    first = next(start for start in windows
                 if {"items", "vectors"} <= {owner.get(page) for page in range(start, start + count)})
    assert first > 50, first  # a catalog of many pages, damaged in its body rather than its schema
    with open(catalog, "r+b") as f:
        f.seek((first - 1) * page_size)
        f.write(random.Random(seed).randbytes(count * page_size))


def overwrite_leaf(catalog, btree: str, seed: int = 7) -> None:
    """Random bytes over the middle leaf page of one b-tree (a table or an SQL index)."""
    with connected(catalog) as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        leaves = [page for (page,) in db.execute("SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf' "
                                                 "ORDER BY pageno", (btree,))]
        page = leaves[len(leaves) // 2]
    with open(catalog, "r+b") as f:
        f.seek((page - 1) * page_size)
        f.write(random.Random(seed).randbytes(page_size))


def damage(catalog, how: str) -> None:
    data = catalog.read_bytes()
    if how == "garbage":
        catalog.write_bytes(os.urandom(len(data)))
    elif how == "not-a-database":
        catalog.write_bytes(b"this is a shopping list, not an index\n" * 200)
    elif how == "truncated":
        catalog.write_bytes(data[:len(data) // 2])
    elif how == "emptied":
        catalog.write_bytes(b"")
    elif how == "pages":
        overwrite_pages(catalog)
    elif how == "index-page":  # an SQL index the commands below do not read: only a check finds it
        overwrite_leaf(catalog, "ix_items_origin")
    else:  # a page of the items table, at which quick_check stops without listing anything
        overwrite_leaf(catalog, "items")


def one_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.mark.parametrize("how", ["garbage", "not-a-database", "truncated", "emptied", "pages"])
def test_every_command_on_a_damaged_catalog_ends_with_one_line(invoke, indexed, photo_dir, tmp_path, how):
    catalog = indexed / "catalog.sqlite"
    damage(catalog, how)
    if how == "pages":  # the header still opens, and so does the start of the catalog
        with connected(catalog) as db:
            assert db.execute("SELECT model_name FROM index_meta").fetchone() == ("fake",)
    for command in CATALOG_COMMANDS:
        args = [a.format(photos=photo_dir, out=tmp_path / "out") for a in command]
        line = one_line(invoke(*args))
        assert f"the catalog {catalog} is damaged" in line, (command, line)
        assert "restore it from a backup" in line and "cannot rebuild it" in line, line


@pytest.mark.parametrize("how", ["garbage", "truncated", "pages", "index-page", "table-page"])
def test_verify_reports_a_damaged_catalog_and_repair_leaves_it_alone(invoke, indexed, how):
    catalog = indexed / "catalog.sqlite"
    damage(catalog, how)
    damaged = catalog.read_bytes()
    for args in ((), ("--repair",)):
        result = invoke("verify", *args)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        last = result.output.splitlines()[-1]
        assert last.startswith(f"the catalog {catalog} is damaged") and "restore it from a backup" in last, last
        assert catalog.read_bytes() == damaged  # what is left of the source is not written over
    result = invoke("verify", "--json")
    report = json.loads(result.output)
    assert result.exit_code == 1 and not report["ok"] and report["catalog_damaged"], report
    assert report["catalog_problems"] and all(isinstance(p, str) and p for p in report["catalog_problems"])
    assert len(report["catalog_problems"]) <= 5
    problems = report["catalog_problems"]
    if how in ("pages", "index-page"):  # quick_check's own lines, e.g. "Page 25: btreeInitPage() returns error code 11"
        assert "btreeInitPage" in problems[0], problems
    if how == "table-page":  # checked table by table, to say which
        assert problems == ["table items: database disk image is malformed"], problems


def test_damage_only_a_check_can_find_is_found_by_verify(invoke, indexed):
    damage(indexed / "catalog.sqlite", "index-page")
    assert invoke("search", "a first caption").exit_code == 0  # what search reads is intact
    result = invoke("verify", "--json")
    assert result.exit_code == 1 and json.loads(result.output)["catalog_damaged"]


def test_a_sound_catalog_passes_quick_check(invoke, indexed):
    result = invoke("verify", "--json")
    report = json.loads(result.output)
    assert result.exit_code == 0 and report["catalog_problems"] == [] and report["catalog_damaged"] is None


# -- vector files ------------------------------------------------------------------------------------------------

def cut(path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:len(data) // 2], "empty": b"", "garbage": os.urandom(len(data))}[how])


def ranked(result) -> tuple[list[int], list[float]]:
    hits = json.loads(result.stdout)
    return [hit["id"] for hit in hits], [hit["score"] for hit in hits]


@pytest.mark.parametrize("kind", ["flat", "hnsw", "lsh"])
@pytest.mark.parametrize("how", ["truncated", "empty", "garbage"])
def test_a_damaged_vector_file_is_named_searched_around_and_repaired(invoke, photo_dir, tmp_path, kind, how):
    invoke("index", photo_dir, "--workers", "0", "--no-progress", "--index-type", kind, ok=True)
    path = tmp_path / "idx" / "image.faiss"
    expected = ranked(invoke("search", "a first caption", "--json", ok=True))
    cut(path, how)
    message = f"the vector file {path} is damaged"

    result = invoke("verify")  # a problem of the report, not a crash
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    image_line = next(line for line in result.output.splitlines() if line.startswith("image:"))
    assert message in image_line and "`crossmodal verify --repair` rebuilds it" in image_line, image_line
    assert "(Success)" not in result.output and "No such file" not in result.output
    assert result.output.splitlines()[-1] == "problems found; run with --repair"

    # The catalog is the source of truth and vector files are derived: search answers from its vectors, and says so.
    result = invoke("search", "a first caption", "--json")
    assert result.exit_code == 0, result.output
    ids, scores = ranked(result)
    assert ids == expected[0] and scores == pytest.approx(expected[1], abs=1e-5)  # lsh: exact now, re-ranked before
    assert message in result.stderr and "this search used the catalog's vectors" in result.stderr
    result = invoke("info")
    assert result.exit_code == 0 and message in result.stderr and "vectors:  6 image" in result.stdout

    result = invoke("verify", "--repair")
    assert result.exit_code == 0 and "repaired: rebuilt image.faiss" in result.output, result.output
    assert invoke("verify").exit_code == 0
    assert invoke("search", "a first caption").stderr == ""


def test_an_index_run_replaces_a_damaged_vector_file(invoke, photo_dir, tmp_path):
    invoke("index", photo_dir, "--workers", "0", "--no-progress", ok=True)
    cut(tmp_path / "idx" / "image.faiss", "truncated")
    invoke("index", photo_dir, "--workers", "0", "--no-progress", ok=True)
    assert invoke("verify").exit_code == 0
