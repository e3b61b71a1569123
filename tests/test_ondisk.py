"""Indexes bigger than RAM: IVF built in shards, merged on disk, served memory-mapped, changed copy-on-write.

Seeded synthetic vectors; an in-memory index trained on the same sample is the reference (IVF-Flat
built in shards must find exactly what it finds).
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import unit, write_embeddings

from indexer import ondisk
from indexer.spec import IndexSpec
from indexer.store import IndexStore
from indexer.vectors import StaleVectorFile, VectorStore, exact_top_k, streamed_top_k
from retrieval.searcher import Searcher

DIM, N = 32, 12_000


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((40, DIM))
    base = unit(centres[rng.integers(0, 40, N)] + rng.standard_normal((N, DIM)) * 0.5)
    queries = unit(centres[rng.integers(0, 40, 200)] + rng.standard_normal((200, DIM)) * 0.5)
    return base, np.arange(100, 100 + N, dtype=np.int64), queries


def chunks(base, ids, parts, size=700):
    return [[(ids[part][i:i + size], base[part][i:i + size]) for i in range(0, len(part), size)]
            for part in np.array_split(np.arange(len(ids)), parts)]


def sharded_store(base, ids, home, parts=4, kind="ivf", **params):
    store = VectorStore.empty(IndexSpec(kind, params={"nlist": 32, "shards": parts, **params}), DIM)
    store.build_sharded(base, len(base), chunks(base, ids, parts), home)
    return store


def list_files(folder):
    return sorted(p.name for p in folder.glob("*.ivfdata"))


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_ivf_built_in_shards_finds_what_the_same_index_built_in_memory_finds(data, tmp_path):
    base, ids, queries = data
    memory = VectorStore.empty(IndexSpec("ivf", params={"nlist": 32}), DIM)
    memory.add(ids, base)
    memory.train(base, len(base))
    disk = sharded_store(base, ids, tmp_path / "image.faiss")
    assert disk.on_disk and not memory.on_disk and len(disk) == N
    assert sorted(disk.ids()) == sorted(ids)
    for nprobe in (1, 8, 32):
        want, got = memory.search(queries, 10, nprobe=nprobe), disk.search(queries, 10, nprobe=nprobe)
        assert (got[1] == want[1]).all() and np.allclose(got[0], want[0], atol=1e-6)
    assert list_files(tmp_path) and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # shards gone


def test_a_saved_on_disk_index_is_mapped_read_only_and_survives_a_moved_folder(data, tmp_path):
    base, ids, queries = data
    folder = tmp_path / "a"
    folder.mkdir()
    store = sharded_store(base, ids, folder / "image.faiss", kind="ivfpq", m=4, opq=False)
    want = store.search(queries, 10)
    store.save(folder / "image.faiss")
    assert len(list_files(folder)) == 1
    shutil.move(folder, tmp_path / "b")  # the vector file names its list file; the folder is found anew
    spec = store.spec
    loaded = VectorStore.load(tmp_path / "b" / "image.faiss", spec, DIM)
    assert loaded.on_disk and ondisk.lists_of(loaded.backend.index).read_only
    assert ondisk.data_file(loaded.backend.index).parent == tmp_path / "b"
    got = loaded.search(queries, 10)
    assert (got[1] == want[1]).all()


def test_changes_go_to_a_new_list_file_and_leave_the_saved_index_whole_until_the_save(data, tmp_path):
    base, ids, queries = data
    home = tmp_path / "image.faiss"
    sharded_store(base[:10_000], ids[:10_000], home).save(home)
    (saved_lists,) = list_files(tmp_path)
    before = digest(tmp_path / saved_lists), digest(home)
    spec = IndexSpec("ivf", params={"nlist": 32, "shards": 4})
    reader = VectorStore.load(home, spec, DIM)
    writer = VectorStore.load(home, spec, DIM)
    writer.add(ids[10_000:], base[10_000:])
    assert writer.remove(ids[:100]) == 100
    assert (digest(tmp_path / saved_lists), digest(home)) == before  # a crash here loses nothing saved
    assert list_files(tmp_path) == [saved_lists] and len(writer) == N - 100  # the changes wait in memory
    writer.save(home)
    assert list_files(tmp_path) != [saved_lists] and len(list_files(tmp_path)) == 1  # the old one went
    assert len(reader.search(queries, 10)[1]) == 200  # a reader keeps the map it made of the removed file
    again = VectorStore.load(home, spec, DIM)
    assert sorted(again.ids()) == sorted(ids[100:])
    truth = exact_top_k(queries, base[100:], ids[100:], 10)[1]
    found = again.search(queries, 10, nprobe=32)[1]
    assert (found == truth).all()  # every list probed: IVF-Flat is exact


def test_a_save_removes_what_dead_writers_left_and_keeps_live_writers_and_users_files(data, tmp_path):
    base, ids, _ = data
    home = tmp_path / "image.faiss"
    sharded_store(base, ids, home, parts=2).save(home)
    dead = tmp_path / "image.999999999-0badc0de.ivfdata"
    dead.write_bytes(b"left by a crash")
    left = tmp_path / ".image-shards-999999999-abcdef"  # a build cut short
    left.mkdir()
    (left / "shard-0.index").write_bytes(b"half a shard")
    live = tmp_path / f"image.{os.getppid()}-00000000.ivfdata"
    live.write_bytes(b"another writer's copy in progress")
    users = tmp_path / "image.backup.ivfdata"  # not a name we give: not ours to delete
    users.write_bytes(b"a user's copy")
    VectorStore.load(home, IndexSpec("ivf", params={"nlist": 32, "shards": 2}), DIM).save(home)
    assert not dead.exists() and not left.exists() and live.exists() and users.exists()


def test_additions_past_the_memory_bound_go_to_a_new_list_file_before_the_save(data, tmp_path, monkeypatch):
    import indexer.backends

    base, ids, queries = data
    home = tmp_path / "image.faiss"
    spec = IndexSpec("ivf", params={"nlist": 32, "shards": 2})
    sharded_store(base[:10_000], ids[:10_000], home, parts=2).save(home)
    monkeypatch.setattr(indexer.backends, "FOLD_BYTES", 500 * (DIM * 4 + 8))  # 500 IVF-Flat entries
    writer = VectorStore.load(home, spec, DIM)
    writer.add(ids[10_000:10_400], base[10_000:10_400])
    assert len(list_files(tmp_path)) == 1  # 400 wait in memory
    writer.add(ids[10_400:11_000], base[10_400:11_000])
    assert len(list_files(tmp_path)) == 2 and writer.backend.changes.pending_bytes() == 0  # folded, unsaved
    writer.add(ids[11_000:], base[11_000:])
    assert len(list_files(tmp_path)) == 2  # folded again: the first fold's file went, the saved one stays
    writer.save(home)
    again = VectorStore.load(home, spec, DIM)
    assert sorted(again.ids()) == sorted(ids)
    assert (again.search(queries, 10, nprobe=32)[1] == exact_top_k(queries, base, ids, 10)[1]).all()


def test_every_vector_removed_leaves_an_empty_on_disk_index_that_saves_loads_and_grows(data, tmp_path):
    base, ids, queries = data
    home = tmp_path / "image.faiss"
    spec = IndexSpec("ivf", params={"nlist": 32, "shards": 2})
    sharded_store(base, ids, home, parts=2).save(home)
    emptied = VectorStore.load(home, spec, DIM)
    assert emptied.remove(ids) == N and len(emptied) == 0
    emptied.save(home)
    again = VectorStore.load(home, spec, DIM)
    assert len(again) == 0 and (again.search(queries[:3], 5)[1] == -1).all()
    again.add(ids[:50], base[:50])
    again.save(home)
    assert sorted(VectorStore.load(home, spec, DIM).ids()) == sorted(ids[:50])


def test_no_map_of_a_merged_shard_file_outlives_the_build(data, tmp_path):
    base, ids, _ = data
    sharded_store(base, ids, tmp_path / "image.faiss", parts=3).save(tmp_path / "image.faiss")
    maps = Path("/proc/self/maps").read_text()
    assert "shard-" not in maps  # deleted shard files would keep their disk space while mapped


def test_a_missing_list_file_is_named(data, tmp_path):
    base, ids, _ = data
    home = tmp_path / "image.faiss"
    sharded_store(base, ids, home, parts=2).save(home)
    (lists,) = tmp_path.glob("*.ivfdata")
    lists.unlink()
    from indexer.errors import VectorFileError
    with pytest.raises(VectorFileError, match=f"the list file .*{lists.name} that .*image.faiss names is missing"):
        VectorStore.load(home, IndexSpec("ivf", params={"nlist": 32, "shards": 2}), DIM)


def test_faiss_prints_nothing_to_stdout_which_carries_json(data, tmp_path, capfd):
    base, ids, _ = data
    home = tmp_path / "image.faiss"
    store = sharded_store(base, ids, home)
    store.save(home)
    loaded = VectorStore.load(home, store.spec, DIM)
    loaded.add(np.arange(10**6, 10**6 + 500), base[:500])
    loaded.save(home)
    assert capfd.readouterr().out == ""


def test_the_wrong_layout_for_the_spec_is_a_stale_file(data, tmp_path):
    base, ids, _ = data
    home = tmp_path / "image.faiss"
    memory = VectorStore.empty(IndexSpec("ivf", params={"nlist": 32}), DIM)
    memory.add(ids, base)
    memory.train(base, len(base))
    memory.save(home)
    with pytest.raises(StaleVectorFile, match="in memory"):
        VectorStore.load(home, IndexSpec("ivf", params={"nlist": 32, "shards": 2}), DIM)
    sharded_store(base, ids, home, parts=2).save(home)
    with pytest.raises(StaleVectorFile, match="on disk"):
        VectorStore.load(home, IndexSpec("ivf", params={"nlist": 32}), DIM)


@pytest.mark.parametrize("cells", [10_000, 4_000_000])  # batches scored in slices of 50 vectors, or whole
def test_streamed_top_k_over_batches_is_the_exact_top_k(data, monkeypatch, cells):
    import indexer.vectors

    monkeypatch.setattr(indexer.vectors, "TOP_K_CELLS", cells)
    base, ids, queries = data
    batches = [(ids[i:i + 333], base[i:i + 333]) for i in range(0, N, 333)]
    scores = queries @ base.T  # brute force, whole: the reference
    scores[np.arange(200), np.arange(200)] = -np.inf  # query i excludes ids[i]
    order = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    got = streamed_top_k(queries, iter(batches), 10, exclude=ids[:200])
    assert (got[1] == ids[order]).all() and np.allclose(got[0], np.take_along_axis(scores, order, 1))


# -- through the catalog and the CLI -------------------------------------------------------------------------

@pytest.fixture
def invoke(invoke):
    return lambda *args, ok=True: invoke(*args, ok=ok)


def test_reindex_in_shards_then_search_update_and_verify(invoke, tmp_path):
    images, texts = write_embeddings(tmp_path / "emb", 3_000, shards=3, fmt="jsonl")
    invoke("index", "--embeddings", tmp_path / "emb")
    index = tmp_path / "idx"
    with Searcher.open(index) as searcher:
        exact = [[h.path for h in hits] for hits in searcher.search_vectors(texts[:30], to="image", k=10)]
    report = json.loads(invoke("reindex", "--index-type", "ivf", "--shards", "3", "--target-recall", "0.95",
                               "--json").output)
    assert report["tuning"]["image"]["reached"] and report["tuning"]["image"]["queries_from"] == "text"
    assert report["trained"] == {"image": 3_000, "text": 3_000}
    assert {p.name.split(".")[0] for p in index.glob("*.ivfdata")} == {"image", "text"}
    with IndexStore.open(index) as store:
        assert store.spec.params["shards"] == 3 and store.load_vectors("image")[0].on_disk
        assert any(name.endswith(".ivfdata") for name in store.disk_usage())
    with Searcher.open(index) as searcher:
        found = [[h.path for h in hits] for hits in searcher.search_vectors(texts[:30], to="image", k=10)]
    overlap = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)])
    assert overlap >= 0.9
    # An update writes a new list file and removes the old one; verify finds the files in line with the catalog.
    shutil.rmtree(tmp_path / "emb")
    # The same folder again: changed vectors, 300 more pairs.
    write_embeddings(tmp_path / "emb", 3_300, seed=1, shards=3, fmt="jsonl")
    invoke("index", "--embeddings", tmp_path / "emb")
    assert len(list(index.glob("image.*.ivfdata"))) == 1
    with IndexStore.open(index) as store:
        held = store.load_vectors("image")[0]
        assert held.on_disk and len(held) == 3_300
    assert json.loads(invoke("verify", "--json").output)["ok"]
    invoke("reindex", "--index-type", "flat")
    assert not list(index.glob("*.ivfdata"))  # back in memory: the list files go


def test_shards_apply_to_ivf_kinds_only(invoke, tmp_path):
    write_embeddings(tmp_path / "emb", 1_200, shards=3, fmt="jsonl")
    invoke("index", "--embeddings", tmp_path / "emb")
    result = invoke("reindex", "--index-type", "hnsw", "--shards", "2", ok=False)
    assert result.exit_code == 2 and "index type hnsw has no setting shards" in result.output


def test_an_import_writes_chunk_by_chunk_instead_of_reading_every_row_first(invoke, tmp_path, monkeypatch):
    import indexer.embeddings as embeddings
    from indexer.catalog import Catalog

    write_embeddings(tmp_path / "emb", 1_000, shards=3, fmt="jsonl")
    monkeypatch.setattr(embeddings, "WRITE_CHUNK", 100)
    read, at_writes = [0], []
    original_rows, original_write = embeddings.read_pairs, Catalog.write_images

    def counted_rows(*args):
        for pair in original_rows(*args):
            read[0] += 1
            yield pair

    def noted_write(self, root_id, writes):
        at_writes.append(read[0])
        return original_write(self, root_id, writes)

    monkeypatch.setattr(embeddings, "read_pairs", counted_rows)
    monkeypatch.setattr(Catalog, "write_images", noted_write)
    summary = json.loads(invoke("index", "--embeddings", tmp_path / "emb", "--json").output)
    assert summary["added"] == 1_000 and summary["texts_added"] == 1_000
    assert len(at_writes) == 10 and at_writes[0] <= 101  # rows in memory: a chunk, not the import


def test_a_broken_later_shard_stops_the_import_before_anything_is_written(invoke, tmp_path):
    write_embeddings(tmp_path / "emb", 900, shards=3, fmt="jsonl")
    with open(tmp_path / "emb" / "metadata" / "metadata_2.jsonl", "a") as f:
        f.write("{not json\n")
    result = invoke("index", "--embeddings", tmp_path / "emb", ok=False)
    assert result.exit_code == 1 and "metadata_2.jsonl:301: not JSON" in result.output
    assert not (tmp_path / "idx" / "catalog.sqlite").exists()  # shards 0 and 1 were not written either
