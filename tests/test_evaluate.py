"""crossmodal eval: figures from the catalog and FAISS match a brute-force computation done independently."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FakeEncoder, make_image
from PIL import Image

from indexer import IndexOptions, update_index
from indexer.errors import CrossmodalError
from retrieval.cli import cli
from retrieval.evaluate import evaluate_index


@pytest.fixture
def captioned(tmp_path):
    root = tmp_path / "photos"
    for i in range(12):
        make_image(root / f"p{i:02d}.png", seed=i)
        if i < 10:  # two images without captions stay in the gallery as distractors
            (root / f"p{i:02d}.txt").write_text(f"photo {i}\nanother line {i}\n")
    texts = tmp_path / "notes.txt"
    texts.write_text("a standalone note\nanother note\n")
    encoder = FakeEncoder()
    update_index(root, tmp_path / "idx", encoder, IndexOptions(texts=(texts,), workers=0, progress=False))
    return root, texts, encoder, tmp_path / "idx"


def brute_force(root, texts_file, encoder, k):
    images = sorted(root.glob("*.png"))
    image_vectors = encoder.encode_pil([Image.open(p) for p in images])
    captions, owners = [], []
    for row, path in enumerate(images):
        sidecar = path.with_suffix(".txt")
        for line in sidecar.read_text().splitlines() if sidecar.exists() else []:
            captions.append(line)
            owners.append(row)
    gallery_texts = captions + texts_file.read_text().splitlines()
    text_vectors = encoder.encode_texts(gallery_texts)
    t2i = [owners[t] in np.argsort(-(image_vectors @ text_vectors[t]), kind="stable")[:k]
           for t in range(len(captions))]
    i2t = []
    for row in sorted(set(owners)):
        top = np.argsort(-(text_vectors @ image_vectors[row]), kind="stable")[:k]
        i2t.append(any(owners[t] == row for t in top if t < len(captions)))
    return float(np.mean(t2i)), float(np.mean(i2t))


def test_eval_matches_brute_force(captioned):
    root, texts, encoder, index = captioned
    result = evaluate_index(index, (1, 3, 5))
    assert result.counts["caption_queries"] == 20 and result.counts["image_queries"] == 10
    assert result.counts["images_without_captions"] == 2 and result.counts["texts_without_image"] == 2
    assert result.counts["duplicate_captions"] == 0
    for k in (1, 3, 5):
        t2i, i2t = brute_force(root, texts, FakeEncoder(), k)
        for direction, expected in (("text_to_image", t2i), ("image_to_text", i2t)):
            figures = getattr(result, direction)
            assert figures["exact"][f"R@{k}"] == pytest.approx(expected)
            assert figures["index"][f"R@{k}"] == pytest.approx(expected)  # flat index: same answer
            assert figures["ann_agreement"][f"@{k}"] == pytest.approx(1.0)


def test_eval_command_table_and_json(captioned, monkeypatch):
    index = captioned[3]
    runner = CliRunner()
    table = runner.invoke(cli, ["eval", "--index", str(index)])
    assert table.exit_code == 0, table.output
    assert "text->image" in table.output and "R@10" in table.output and "2 images without captions" in table.output
    data = json.loads(runner.invoke(cli, ["eval", "--index", str(index), "--k", "1,2", "--json"]).output)
    assert set(data["text_to_image"]["exact"]) >= {"R@1", "R@2", "mean_rank", "median_rank"}
    assert 0 <= data["image_to_text"]["index"]["R@2"] <= 1
    bad = runner.invoke(cli, ["eval", "--index", str(index), "--k", "one"])
    assert bad.exit_code == 2 and "--k" in bad.output


def test_duplicate_captions_are_counted(tmp_path):
    for i in range(3):
        make_image(tmp_path / "p" / f"{i}.png", seed=i)
        (tmp_path / "p" / f"{i}.txt").write_text("the same words\n")
    update_index(tmp_path / "p", tmp_path / "idx", FakeEncoder(), IndexOptions(workers=0, progress=False))
    assert evaluate_index(tmp_path / "idx").counts["duplicate_captions"] == 2


def test_eval_without_captions_is_a_clear_error(tmp_path):
    make_image(tmp_path / "p" / "a.png", seed=1)
    update_index(tmp_path / "p", tmp_path / "idx", FakeEncoder(), IndexOptions(workers=0, progress=False))
    with pytest.raises(CrossmodalError, match="no captions"):
        evaluate_index(tmp_path / "idx")


def test_plot_save_run_and_history(captioned, tmp_path):
    index = captioned[3]
    runner = CliRunner()
    first = runner.invoke(cli, ["eval", "--index", str(index), "--plot", str(tmp_path / "r.png"), "--save-run"])
    assert first.exit_code == 0, first.output
    with Image.open(tmp_path / "r.png") as png:
        assert png.format == "PNG" and png.size[0] > 400
    runner.invoke(cli, ["eval", "--index", str(index), "--save-run", "--k", "1"])
    runs = json.loads(runner.invoke(cli, ["eval", "--index", str(index), "--history", "--json"]).output)
    assert [r["id"] for r in runs] == [1, 2] and runs[0]["model"].startswith("fake")
    assert json.loads(runs[0]["index_spec"])["kind"] == "flat" and "R@10" in runs[0]["result"]["text_to_image"]["index"]
    table = runner.invoke(cli, ["eval", "--index", str(index), "--history"]).output
    assert "t2i R@1" in table and len(table.strip().splitlines()) == 3


def test_karpathy_split_is_indexed_alone_then_reused(tmp_path):
    from indexer.synth import write_corpus
    from retrieval.benchmark import evaluate_karpathy

    write_corpus(tmp_path / "c", 16, seed=2, test=6, val=4, side=32)
    (tmp_path / "c" / "test" / "000012.jpg").unlink()  # a missing file is reported, not fatal
    first = evaluate_karpathy(tmp_path / "c" / "dataset_synth.json", FakeEncoder(), split="test",
                              index_dir=tmp_path / "idx", progress=False)
    assert first.missing_images == 1 and first.encoded_images == 5
    counts = first.evaluation.counts
    # only the split's images, with the JSON's captions and not the sidecars beside them as well
    assert (counts["images"], counts["caption_queries"], counts["duplicate_captions"]) == (5, 15, 0)
    again = evaluate_karpathy(tmp_path / "c" / "dataset_synth.json", FakeEncoder(), split="test",
                              index_dir=tmp_path / "idx", progress=False)
    assert again.encoded_images == 0
    for key in ("index", "exact"):
        assert again.evaluation.text_to_image[key] == first.evaluation.text_to_image[key]
