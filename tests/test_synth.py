"""The generated corpus: deterministic, varied, every caption true of its image, retrieval well posed."""

import json

import pytest

from indexer.synth import (
    COLOURS,
    KINDS,
    POSITIONS,
    SIZES,
    Caption,
    Mention,
    Scene,
    Shape,
    ceiling,
    sample,
    scenes_of,
    split_sizes,
    write_corpus,
)


def test_vocabulary_is_as_wide_as_promised():
    assert len(KINDS) >= 6 and len(COLOURS) >= 8 and len(SIZES) == 3 and len(POSITIONS) == 9


def test_same_seed_same_sample_other_seed_other_sample():
    a, image_a = sample(3, 17)
    b, image_b = sample(3, 17)
    c, _ = sample(4, 17)
    assert a == b and image_a.tobytes() == image_b.tobytes()
    assert (a.scene, [x.text for x in a.captions]) != (c.scene, [x.text for x in c.captions])


def test_every_caption_fits_its_own_scene():
    for item in scenes_of(0, range(300)):
        assert item.captions
        for caption in item.captions:
            assert caption.fits(item.scene), caption.text


def test_captions_use_relations_and_counts():
    captions = [c for item in scenes_of(0, range(300)) for c in item.captions]
    assert any(c.relations for c in captions)
    assert any(" left of " in c.text or " right of " in c.text for c in captions)
    assert any(c.text.startswith(("two ", "three ")) or " two " in c.text for c in captions)


def test_fits_checks_every_stated_fact():
    red_left = Shape("circle", "red", "small", "left")
    blue_right = Shape("star", "blue", "large", "right")
    scene = Scene((red_left, blue_right), "gray")
    left_of = Caption("", (Mention("circle", "red"), Mention("star", "blue")), ((0, "left of", 1),))
    assert left_of.fits(scene)
    assert not Caption("", left_of.mentions, ((0, "right of", 1),)).fits(scene)
    assert not Caption("", left_of.mentions, background="teal").fits(scene)
    assert not Caption("", (Mention("circle", "red", "large"), Mention("star", "blue"))).fits(scene)
    assert not Caption("", (Mention("circle", "red"),)).fits(scene)  # a caption lists every shape


def test_ceiling_of_a_standard_gallery_is_at_least_095():
    assert ceiling(scenes_of(12345, range(1000))) >= 0.95


def test_ceiling_counts_ambiguous_captions():
    shape = Shape("circle", "red", "small", "left")
    vague = Caption("a red circle", (Mention("circle", "red"),))
    items = scenes_of(0, range(2))
    items[0].scene, items[1].scene = Scene((shape,), "gray"), Scene((shape,), "teal")
    items[0].captions, items[1].captions = [vague], [vague]
    assert ceiling(items) == 0.0


def test_split_sizes_defaults_and_errors():
    assert split_sizes(10_000, None, None) == {"train": 8500, "val": 500, "test": 1000}
    assert split_sizes(1000, 1000, 0) == {"train": 0, "val": 0, "test": 1000}
    with pytest.raises(ValueError):
        split_sizes(10, 8, 5)


def test_write_corpus_sidecars_and_karpathy_json_agree(tmp_path):
    summary = write_corpus(tmp_path / "c", 12, seed=5, test=4, val=2, side=48)
    assert summary.splits == {"train": 6, "val": 2, "test": 4}
    data = json.loads((tmp_path / "c" / "dataset_synth.json").read_text())
    assert len(data["images"]) == 12
    suffixes = set()
    for entry in data["images"]:
        image = tmp_path / "c" / entry["filepath"] / entry["filename"]
        suffixes.add(image.suffix)
        assert image.is_file() and entry["filepath"] == entry["split"]
        sidecar = image.with_suffix(".txt").read_text().splitlines()
        assert sidecar == [s["raw"] for s in entry["sentences"]]
    assert suffixes == {".jpg", ".png"}
    again = write_corpus(tmp_path / "d", 12, seed=5, test=4, val=2, side=48)
    assert (tmp_path / "d" / "dataset_synth.json").read_text() == (tmp_path / "c" / "dataset_synth.json").read_text()
    assert again.ceiling_test == summary.ceiling_test


def test_data_synth_command(tmp_path):
    from click.testing import CliRunner

    from retrieval.cli import cli

    result = CliRunner().invoke(cli, ["data", "synth", "--out", str(tmp_path / "s"), "--n", "20", "--test", "10",
                                      "--val", "0", "--size", "32", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["splits"] == {"train": 10, "val": 0, "test": 10} and 0 <= summary["ceiling_test"] <= 1
    assert len(list((tmp_path / "s" / "test").glob("*.txt"))) == 10
    bad = CliRunner().invoke(cli, ["data", "synth", "--out", str(tmp_path / "t"), "--n", "5", "--test", "9"])
    assert bad.exit_code == 2 and "do not fit" in bad.output
