"""--index-type, reindex, and clip-retrieval embeddings through the CLI, with the fake encoder (32-d)."""

import json

import numpy as np
import pytest
from conftest import FAKE_DIM, write_embeddings

from indexer.store import IndexStore
from indexer.vectors import VectorStore
from retrieval.searcher import Searcher


@pytest.fixture
def invoke(invoke):
    """The shared CLI runner, asserting success unless told ``ok=False``."""
    return lambda *args, ok=True: invoke(*args, ok=ok)


def held_ids(index):
    with IndexStore.open(index) as store:
        return {m: sorted(store.load_vectors(m)[0].ids().tolist()) for m in ("image", "text")}, store.spec


def test_import_embeddings_then_reindex_through_every_kind(invoke, tmp_path):
    images, texts = write_embeddings(tmp_path / "emb", 2_000)
    summary = json.loads(invoke("index", "--embeddings", tmp_path / "emb", "--json").output)
    assert (summary["added"], summary["texts_added"], summary["problems"]) == (2_000, 2_000, [])
    index = tmp_path / "idx"
    expected, spec = held_ids(index)
    assert spec.kind == "flat" and len(expected["image"]) == 2_000

    with Searcher.open(index) as searcher:
        exact = [h.path for h in searcher.search_vectors(texts[:20], to="image", k=5)[0]]
    result = invoke("reindex", "--index-type", "itq", "--bits", "64", ok=False)
    assert "itq learns at most 32 bits from 32-d vectors; use --index-type lsh" in result.output
    for kind, extra in (("hnsw", []), ("ivf", ["--target-recall", "0.95"]), ("lsh", ["--bits", "128"]),
                        ("auto", []), ("flat", [])):
        report = json.loads(invoke("reindex", "--index-type", kind, *extra, "--json").output)
        ids, spec = held_ids(index)
        assert ids == expected, kind  # same vectors, nothing encoded again, nothing lost or doubled
        assert spec.kind == ("flat" if kind == "auto" else kind)  # auto: 2,000 vectors are best searched exactly
        with Searcher.open(index) as searcher:
            found = [h.path for h in searcher.search_vectors(texts[:20], to="image", k=5)[0]]
        assert len(set(found) & set(exact)) >= 3, kind
        if kind == "ivf":
            assert report["tuning"]["image"]["queries_from"] == "text" and report["tuning"]["image"]["reached"]
            assert spec.params["tuned"]["recall"]["image"] >= 0.95


def test_a_kind_that_cannot_train_on_the_corpus_is_refused_and_the_index_is_unchanged(invoke, tmp_path, photo_dir):
    result = invoke("index", photo_dir, "--index-type", "ivf", ok=False)
    assert result.exit_code == 1 and "at least 1,000 vectors" in result.output and "auto" in result.output
    invoke("index", photo_dir)
    before = held_ids(tmp_path / "idx")
    result = invoke("reindex", "--index-type", "ivfpq", ok=False)
    assert result.exit_code == 1 and "at least 10,000 vectors" in result.output
    assert held_ids(tmp_path / "idx") == before
    result = invoke("index", photo_dir, "--index-type", "hnsw", ok=False)
    assert "crossmodal reindex" in result.output  # an existing index keeps its type until reindexed


def test_auto_on_a_small_folder_falls_back_to_flat_and_says_so(invoke, tmp_path, photo_dir):
    summary = json.loads(invoke("index", photo_dir, "--index-type", "auto", "--no-progress", "--json").output)
    assert summary["build"]["spec"] == "flat"
    _, spec = held_ids(tmp_path / "idx")
    assert spec.kind == "flat" and spec.params["auto"]["chosen_for"] == 6
    invoke("index", photo_dir, "--index-type", "auto")  # asking for auto again is fine


def test_settings_without_a_type_or_for_another_type_are_usage_errors(invoke, photo_dir):
    assert "without --index-type" in invoke("index", photo_dir, "--nprobe", "4", ok=False).output
    assert "has no setting nprobe" in invoke("index", photo_dir, "--index-type", "hnsw", "--nprobe", "4",
                                             ok=False).output
    assert "multiple of 8" in invoke("index", photo_dir, "--index-type", "lsh", "--bits", "100", ok=False).output


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_export_writes_what_import_reads_back(invoke, tmp_path, photo_dir, fmt):
    invoke("index", photo_dir)
    out = tmp_path / "exported"
    result = json.loads(invoke("export", out, "--format", fmt, "--json").output)
    assert result["images"] == 6 and result["texts"] == 2
    assert result["rows"] == 2 + 5  # img0's two captions, then the five images without one
    assert np.load(out / "img_emb" / "img_emb_0.npy").shape == (7, FAKE_DIM)

    copy = tmp_path / "copy"
    invoke("index", "--embeddings", out, "--index", copy)
    with Searcher.open(tmp_path / "idx") as original, Searcher.open(copy) as imported:
        for modality in ("image", "text"):
            a, b = original.vectors(modality), imported.vectors(modality)
            assert len(a) == len(b)
            probe = np.random.default_rng(0).standard_normal((3, FAKE_DIM)).astype(np.float32)
            np.testing.assert_allclose(np.sort(a.search(probe, 5)[0]), np.sort(b.search(probe, 5)[0]), rtol=1e-5)
        hits = imported.search_vectors(probe[:1], to="text", k=2)[0]
        assert {h.path for h in hits} == {str(photo_dir / "img0.png")}  # captions keep their image's path


def test_reimport_adds_replaces_and_removes_to_match_the_folder(invoke, tmp_path):
    write_embeddings(tmp_path / "emb", 40, shards=1, fmt="jsonl")
    invoke("index", "--embeddings", tmp_path / "emb")
    again = json.loads(invoke("index", "--embeddings", tmp_path / "emb", "--json").output)
    assert (again["added"], again["unchanged"], again["texts_added"], again["texts_unchanged"]) == (0, 40, 0, 40)
    write_embeddings(tmp_path / "emb", 30, seed=1, shards=1, fmt="jsonl")  # 30 rows, new vectors
    changed = json.loads(invoke("index", "--embeddings", tmp_path / "emb", "--json").output)
    assert (changed["updated"], changed["removed"]) == (30, 10)
    # 10 captions leave with their images; 30 keep their text but have new vectors, so are replaced.
    assert (changed["texts_removed"], changed["texts_added"], changed["texts_unchanged"]) == (40, 30, 0)
    ids, _ = held_ids(tmp_path / "idx")
    assert len(ids["image"]) == 30 and len(ids["text"]) == 30


def test_unusable_rows_and_shards_are_reported_not_fatal(invoke, tmp_path):
    write_embeddings(tmp_path / "emb", 20, shards=2, fmt="jsonl")
    vectors = np.load(tmp_path / "emb" / "img_emb" / "img_emb_0.npy")
    vectors[3] = 0
    np.save(tmp_path / "emb" / "img_emb" / "img_emb_0.npy", vectors)
    (tmp_path / "emb" / "metadata" / "metadata_1.jsonl").write_text('{"image_path": "/x.jpg", "caption": "c"}\n')
    summary = json.loads(invoke("index", "--embeddings", tmp_path / "emb", "--json").output)
    assert summary["added"] == 9
    assert any("img_emb_1.npy" in p and "row counts differ" in p for p in summary["problems"])
    assert any("metadata_0.jsonl:3" in p and "zero" in p for p in summary["problems"])
    result = invoke("index", "--embeddings", tmp_path / "nothing-here", ok=False)
    assert result.exit_code != 0


def test_vectors_of_another_dimension_are_refused_with_the_fix(invoke, tmp_path):
    out = tmp_path / "emb"
    for name in ("img_emb", "metadata"):
        (out / name).mkdir(parents=True)
    np.save(out / "img_emb" / "img_emb_0.npy", np.ones((2, 512), np.float32))
    (out / "metadata" / "metadata_0.jsonl").write_text('{"image_path": "a.jpg"}\n{"image_path": "b.jpg"}\n')
    result = invoke("index", "--embeddings", out, ok=False)
    assert result.exit_code == 1 and "512-d" in result.output and "--model" in result.output


def test_vector_file_of_an_interrupted_reindex_is_ignored(invoke, tmp_path):
    write_embeddings(tmp_path / "emb", 1_200, shards=1)
    invoke("index", "--embeddings", tmp_path / "emb", "--index-type", "hnsw")
    index = tmp_path / "idx"
    with IndexStore.open_locked(index) as store:  # as if reindex died after recording the new type
        store.set_spec(store.spec.__class__("ivf"))
    ids, spec = held_ids(index)
    assert spec.kind == "ivf" and len(ids["image"]) == 1_200  # the hnsw file is not read as ivf
    with IndexStore.open(index) as store:
        assert not store.load_vectors("image")[0].trained  # searched exactly until the next write trains it
    invoke("index", "--embeddings", tmp_path / "emb")
    with IndexStore.open(index) as store:
        held = store.load_vectors("image")[0]
        assert held.trained and isinstance(held, VectorStore) and len(held) == 1_200


def test_search_settings_override_the_stored_ones_for_one_query(invoke, tmp_path):
    write_embeddings(tmp_path / "emb", 1_500, shards=1)
    invoke("index", "--embeddings", tmp_path / "emb", "--index-type", "ivf", "--nprobe", "4")
    one = json.loads(invoke("search", "caption number 3", "--nprobe", "1", "-k", "50", "--json").output)
    every = json.loads(invoke("search", "caption number 3", "--nprobe", "4096", "-k", "50", "--json").output)
    assert len(every) == 50 and len(one) <= 50
    with Searcher.open(tmp_path / "idx") as searcher:  # exact search over the same vectors
        query = searcher.encoder.encode_texts(["caption number 3"])
        exact = searcher.store.fetch_vectors(searcher.store.catalog.vector_ids("image")) @ query[0]
    assert [h["score"] for h in every] == pytest.approx(sorted(exact, reverse=True)[:50], rel=1e-5)
    result = invoke("search", "caption number 3", "--ef-search", "64", ok=False)
    assert result.exit_code == 1 and "the index is ivf; ef_search applies to hnsw" in result.output


def test_a_side_too_small_to_train_is_searched_exactly_while_the_other_trains(invoke, tmp_path):
    write_embeddings(tmp_path / "emb", 2_000, shards=1, fmt="jsonl")
    meta = tmp_path / "emb" / "metadata" / "metadata_0.jsonl"
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    meta.write_text("".join(json.dumps({**r, "caption": r["caption"] if i < 300 else None}) + "\n"
                            for i, r in enumerate(rows)))
    result = invoke("index", "--embeddings", tmp_path / "emb", "--index-type", "ivf", "--target-recall", "0.9")
    assert "text: 300 vectors are too few to train this type; searched exactly" in result.output
    with IndexStore.open(tmp_path / "idx") as store:
        image, text = store.load_vectors("image")[0], store.load_vectors("text")[0]
        assert image.trained and not text.trained and len(text) == 300
        assert store.spec.params["tuned"]["recall"]["image"] >= 0.9


def test_memory_budgets_are_read_with_units():
    import click

    from retrieval.options import parse_bytes

    assert [parse_bytes(t) for t in ("1000", "512MB", "4GB", "4GiB", "1.5g", "64 kb")] == [
        1000, 512 * 2**20, 4 * 2**30, 4 * 2**30, int(1.5 * 2**30), 64 * 2**10]
    with pytest.raises(click.BadParameter, match="is not a size"):
        parse_bytes("lots")
