"""Metadata filters: parsing, the catalog's SQL against a predicate over the files made, and the CLI's
filtered search (every mode) returning only, and enough, matching results."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from indexer.errors import QueryError
from indexer.filters import Filters
from indexer.synth import stamp_photo_meta
from tests.conftest import make_image

pytestmark = pytest.mark.usefixtures("either_catalog")  # each test on SQLite and on PostgreSQL

CAMERAS = ("Canon EOS R5", "NIKON Z 6", "Apple iPhone 12")
PLACES = ((48.85, 2.35), (-33.87, 151.21), (40.71, -74.0))  # Paris, Sydney, New York


def photo(n: int) -> dict:
    """What image n is: its folder, format, size, camera, date and place (a seeded, varied corpus)."""
    folder = ("trips/2023", "trips/2024", "home")[n % 3]
    fmt = "png" if n % 5 == 0 else "jpg"
    size = (64, 48) if n % 4 else (40, 60)  # every fourth is portrait
    meta = {"folder": folder, "fmt": fmt, "size": size, "camera": None, "taken": None, "gps": None}
    if fmt == "jpg":
        meta["camera"] = CAMERAS[n % 3]
        meta["taken"] = f"2023-{1 + n % 12:02d}-{1 + n % 28:02d}T10:00:00"
        meta["gps"] = PLACES[n % 3] if n % 2 else None
    return meta


N = 36


@pytest.fixture
def corpus(tmp_path, invoke):
    root = tmp_path / "photos"
    truth = {}
    for n in range(N):
        meta = photo(n)
        path = root / meta["folder"] / f"p{n:02d}.{meta['fmt']}"
        make_image(path, seed=n, size=meta["size"], fmt="PNG" if meta["fmt"] == "png" else "JPEG")
        if meta["fmt"] == "jpg":
            make, model = meta["camera"].split(" ", 1)
            stamp_photo_meta(path, taken_at=meta["taken"], make=make, model=model, gps=meta["gps"])
        truth[str(path.relative_to(root))] = meta
    (root / "trips/2023/p00.txt").write_text("a sunny day\n")
    (root / "home/p02.txt").write_text("the kitchen\n")
    invoke("index", root, "--workers", 0, "--no-progress", ok=True)
    return root, truth


def found(invoke, *args) -> list[str]:
    result = invoke("search", *args, "-k", 100, "--json", ok=True)
    return sorted(Path(h["path"]).as_posix().split("/photos/", 1)[1] for h in json.loads(result.stdout))


def expect(truth, predicate) -> list[str]:
    return sorted(rel for rel, meta in truth.items() if predicate(rel, meta))


@pytest.mark.parametrize("options, predicate", [
    (["--in", "trips"], lambda rel, m: rel.startswith("trips/")),
    (["--in", "trips/2024", "--in", "home"], lambda rel, m: m["folder"] in ("trips/2024", "home")),
    (["--in", "*/p1?.jpg"], lambda rel, m: m["fmt"] == "jpg" and rel.split("/")[-1].startswith("p1")),
    (["--type", "png"], lambda rel, m: m["fmt"] == "png"),
    (["--camera", "canon"], lambda rel, m: (m["camera"] or "").startswith("Canon")),
    (["--camera", "iphone 12"], lambda rel, m: m["camera"] == "Apple iPhone 12"),
    (["--taken", "2023-03-01..2023-05-31"], lambda rel, m: m["taken"] and "2023-03" <= m["taken"][:7] <= "2023-05"),
    (["--taken", "2023-11-01.."], lambda rel, m: m["taken"] and m["taken"] >= "2023-11"),
    (["--orientation", "portrait"], lambda rel, m: m["size"] == (40, 60)),
    (["--min-size", "60x40"], lambda rel, m: m["size"] == (64, 48)),
    (["--captioned"], lambda rel, m: rel in ("trips/2023/p00.png", "home/p02.jpg")),
    (["--bbox", "40,-80,50,10"], lambda rel, m: m["gps"] in (PLACES[0], PLACES[2])),  # Paris and New York
    (["--bbox", "-40,150,-30,-170"], lambda rel, m: m["gps"] == PLACES[1]),  # across the antimeridian
    (["--type", "jpg", "--in", "home", "--orientation", "landscape"],
     lambda rel, m: m["fmt"] == "jpg" and m["folder"] == "home" and m["size"] == (64, 48)),
])
def test_each_filter_returns_exactly_the_images_it_describes(corpus, invoke, options, predicate):
    root, truth = corpus
    wanted = expect(truth, predicate)
    assert wanted, "the corpus must hold some of each"
    assert found(invoke, "a photo", *options) == wanted


def test_every_mode_and_target_honours_the_filter(corpus, invoke):
    root, truth = corpus
    pngs = expect(truth, lambda rel, m: m["fmt"] == "png")
    for mode in ("keyword", "hybrid", "fused"):
        got = found(invoke, "p00 p05 p11 photo", "--mode", mode, "--type", "png")
        assert set(got) <= set(pngs) and got, mode
    assert found(invoke, "p11", "--mode", "keyword", "--type", "png") == []  # p11 is a jpg
    texts = invoke("search", "kitchen", "--to", "text", "--in", "trips", "--json", ok=True)
    assert [h["text"] for h in json.loads(texts.stdout)] == ["a sunny day"]  # the captions of admitted images
    [first] = json.loads(invoke("search", "x", "--in", "trips/2023/p00.png", "--json", ok=True).stdout)
    assert found(invoke, "--like", first["id"], "--in", "home") == expect(truth, lambda rel, m: m["folder"] == "home")


def test_absolute_folders_and_globs_name_the_root_too(corpus, invoke):
    root, truth = corpus
    home = expect(truth, lambda rel, m: m["folder"] == "home")
    assert found(invoke, "a photo", "--in", root / "home") == home
    assert found(invoke, "a photo", "--in", f"{root}/home/*.png") == [r for r in home if r.endswith(".png")]
    assert found(invoke, "a photo", "--in", "*/photos/home") == []  # a glob is taken as written: no file has that path


def test_a_filter_that_matches_nothing_says_so(corpus, invoke):
    result = invoke("search", "a photo", "--camera", "hasselblad", ok=True)
    assert "no image matches the filters" in result.output and "camera='hasselblad'" in result.output


@pytest.mark.parametrize("options, says", [
    (["--taken", "2023-13-01.."], "'2023-13-01' is not a date"),
    (["--taken", "2024-01-01..2023-01-01"], "ends before it starts"),
    (["--bbox", "1,2,3"], "SOUTH,WEST,NORTH,EAST"),
    (["--bbox", "50,0,40,10"], "south <= north"),
    (["--min-size", "big"], "WIDTHxHEIGHT"),
    (["--type", ""], "an empty file type"),
])
def test_bad_filter_values_are_refused_with_the_value_named(corpus, invoke, options, says):
    result = invoke("search", "a photo", *options)
    assert result.exit_code != 0 and says in result.output, result.output


def test_filters_travel_as_json_and_refuse_unknown_names():
    filters = Filters(paths=("trips",), formats=("jpg",), taken=("2023-01-01", None), camera="canon",
                      min_width=100, orientation="portrait", has_caption=True, bbox=(1, 2, 3, 4))
    assert Filters.from_dict(json.loads(json.dumps(filters.as_dict()))) == filters
    assert filters.formats == ("JPEG",) and filters.taken == ("2023-01-01T00:00:00", None)
    assert Filters.from_dict({"taken": "2023-06-01..2023-06-30"}).taken == ("2023-06-01T00:00:00",
                                                                             "2023-06-30T23:59:59")
    assert not Filters().active and not Filters(paths=(" ",)).active
    with pytest.raises(QueryError, match="unknown filter 'colour'"):
        Filters.from_dict({"colour": "red"})
    with pytest.raises(QueryError, match="unknown orientation"):
        Filters(orientation="sideways")
    with pytest.raises(QueryError, match="min_width must be a positive"):
        Filters(min_width=0)


def test_modified_ranges_use_the_files_local_time(corpus, invoke):
    root, truth = corpus
    old = root / "home" / "p02.jpg"
    os.utime(old, (1_500_000_000, 1_500_000_000))  # 2017
    invoke("index", root, "--workers", 0, "--no-progress", ok=True)
    assert found(invoke, "a photo", "--modified", "..2018-01-01") == ["home/p02.jpg"]
    assert "home/p02.jpg" not in found(invoke, "a photo", "--modified", "2020-01-01..")
