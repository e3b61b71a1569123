"""From stored vectors to trained, tuned vector indexes: at the end of an indexing run, and ``reindex``.

The catalog holds every vector, so the vector files can be rebuilt as any kind without encoding
again. :func:`finish` resolves ``auto`` to a kind, trains the modalities whose index learns from
data, and tunes the search setting when the spec has a target recall; :func:`reindex` rebuilds an
index as another kind.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .ondisk import find_sorted
from .spec import LEARNED, MIN_TRAIN, TRAIN_SAMPLE, IndexSpec, TooFewVectors
from .store import MODALITIES, IndexStore
from .tuning import SEARCH_SETTING, TUNING_K, choose, tune, tuning_picks
from .vectors import VectorStore, exact_top_k, gpu_wanted, streamed_top_k

RETUNE_GROWTH = 2.0  # tune again once a modality holds this many times the vectors it was tuned for
ADD_CHUNK = 50_000


@dataclass
class BuildReport:
    spec: str
    seconds: float
    trained: dict[str, int] = field(default_factory=dict)  # modality -> vectors trained on
    tuning: dict[str, dict] = field(default_factory=dict)  # modality -> Tuning as a dict
    exact: dict[str, int] = field(default_factory=dict)  # modality -> vectors, too few to train: searched exactly

    def as_dict(self) -> dict:
        return asdict(self)


def check_trainable(spec: IndexSpec, counts: dict[str, int]) -> list[str]:
    """The modalities with too few vectors for a kind that learns; refused when that is all of them.

    A side that is too small (500 captions beside 100,000 images) is searched exactly until it
    grows, rather than failing a run whose other side trains fine.
    """
    if spec.kind not in LEARNED or spec.kind == "auto":
        return []
    small = [m for m, n in counts.items() if 0 < n < MIN_TRAIN[spec.kind]]
    if small and len(small) == sum(1 for n in counts.values() if n):
        raise TooFewVectors.for_kind(spec.kind, counts[small[0]], small[0])
    return small


def finish(store: IndexStore, vectors: dict[str, VectorStore], retune: bool = False) -> BuildReport | None:
    """Resolve auto, train what waits for training, tune; records the resulting spec in the catalog.

    ``vectors`` are changed in place (an auto store is replaced by one of the chosen kind).
    Returns None when there was nothing to do.
    """
    started = time.perf_counter()
    spec = store.spec
    counts = {m: len(v) for m, v in vectors.items()}
    if not any(counts.values()):
        return None
    if spec.kind == "auto":
        auto = spec.params
        spec = choose(max(counts.values()), store.meta.embed_dim, auto["memory_budget"], auto["target_recall"])
        for modality, held in list(vectors.items()):
            vectors[modality] = _moved(held, spec)
    for held in vectors.values():  # a store trained before (a sharded build) has learned the code size
        if held.trained and held.spec.kind == spec.kind and held.spec.params.get("m") and not spec.params.get("m"):
            spec = spec.with_params(m=held.spec.params["m"])
    small = check_trainable(spec, {m: n for m, n in counts.items() if not vectors[m].trained})
    report = BuildReport(spec.describe(), 0.0, exact={m: counts[m] for m in small})
    # Vectors held aside until training are all of that side's: tuning needs them, not read again.
    in_memory = {m: held.held_aside() for m, held in vectors.items() if not held.trained}
    for modality, held in vectors.items():
        if not held.trained and len(held) and modality not in small:
            sample = held.held_aside()[1]
            held.train(sample, n=len(held))
            report.trained[modality] = len(sample)
            spec = held.spec  # training may fix learned sizes (PQ bytes)
    if _wants_tuning(spec, counts, retune or bool(report.trained)):
        spec = _tune(store, vectors, spec, counts, report, in_memory)
    for held in vectors.values():
        held.spec = spec
    if not report.trained and not report.tuning and spec == store.spec:
        return report if report.exact else None
    store.set_spec(spec)
    report.spec, report.seconds = spec.describe(), round(time.perf_counter() - started, 3)
    return report


def _moved(held: VectorStore, spec: IndexSpec) -> VectorStore:
    """The vectors of an unresolved auto store in a store of the chosen ``spec``."""
    moved = VectorStore.empty(spec, held.dim)
    moved.exact, moved.use_gpu = held.exact, held.use_gpu
    moved.add(*held.held_aside())
    return moved


def _wants_tuning(spec: IndexSpec, counts: dict[str, int], rebuilt: bool) -> bool:
    if spec.kind not in SEARCH_SETTING or not spec.params.get("target_recall"):
        return False
    tuned = spec.params.get("tuned")
    return rebuilt or tuned is None or max(counts.values()) >= RETUNE_GROWTH * tuned["for"]


def _tune(store: IndexStore, vectors: dict[str, VectorStore], spec: IndexSpec, counts: dict[str, int],
          report: BuildReport, in_memory: dict[str, tuple[np.ndarray, np.ndarray]]) -> IndexSpec:
    """Tune each modality with queries from the other one; the spec takes the largest value needed.

    Queries are a sample; their exact answers come from a pass over the stored vectors in batches, so
    tuning an index bigger than RAM needs memory for a batch, not for every vector.
    """
    target = spec.params["target_recall"]
    ids = {m: in_memory[m][0] if m in in_memory else np.sort(v.ids()) for m, v in vectors.items()}
    values = []
    for modality, held in vectors.items():
        if counts[modality] <= TUNING_K or not held.trained:  # too small to train: it is searched exactly
            continue
        other = "text" if modality == "image" else "image"
        source = other if len(ids[other]) >= 100 else modality
        picked = tuning_picks(len(ids[source]))
        query_ids = ids[source][picked]
        queries = in_memory[source][1][picked] if source in in_memory else store.fetch_vectors(query_ids)
        exclude = None if source == other else query_ids
        if modality in in_memory:  # held aside for training: blockwise, a (queries, block) matrix at a time
            truth = exact_top_k(queries, in_memory[modality][1], in_memory[modality][0], TUNING_K, exclude)[1]
        else:
            truth = streamed_top_k(queries, _batches(store, modality, held), TUNING_K, exclude)[1]
        tuning = tune(held, queries, truth, target, exclude)
        report.tuning[modality] = {**asdict(tuning), "queries_from": source}
        values.append(tuning.value)
    if not values:
        return spec
    setting = SEARCH_SETTING[spec.kind]
    recall = {m: t["recall"] for m, t in report.tuning.items()}
    return spec.with_params(**{setting: max(values)}, tuned={"for": max(counts.values()), "recall": recall})


def _batches(store: IndexStore, modality: str, held: VectorStore) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The stored vectors of the ids a trained side holds, in batches (ids the file lacks are left out)."""
    wanted = np.sort(held.ids())
    for ids, batch in store.iter_vectors(modality, ADD_CHUNK):
        keep = find_sorted(wanted, ids)[1]
        yield ids[keep], batch[keep]


def reindex(index_dir: Path, spec: IndexSpec, device: str = "auto", engine: str = "local",
            ray_address: str | None = None) -> BuildReport:
    """Rebuild the vector files of the index at ``index_dir`` as ``spec``, from stored vectors.

    ``device`` auto or cuda trains IVF on the GPU where faiss has one. A spec with ``shards`` is built in
    bounded memory (:func:`sharded`, its shards on Ray with ``engine="ray"``); any other holds the
    vectors in RAM while it trains.
    """
    started = time.perf_counter()
    with IndexStore.open_locked(Path(index_dir)) as store:
        counts = {m: store.catalog.vector_count(m) for m in MODALITIES}
        small = check_trainable(spec, counts)
        vectors = {m: rebuilt(store, m, spec, device, m not in small, engine, ray_address) for m in MODALITIES}
        previous = store.spec
        store.set_spec(spec)  # first the catalog: an older file left by a crash is then ignored as stale
        try:
            report = finish(store, vectors, retune=True) or BuildReport(spec.describe(), 0.0)
        except BaseException:
            store.set_spec(previous)
            raise
        for modality, held in vectors.items():
            if held.on_disk:  # trained by the sharded build, before finish
                report.trained.setdefault(modality, min(counts[modality], TRAIN_SAMPLE))
            store.save_vectors(modality, held)
    report.seconds = round(time.perf_counter() - started, 3)
    return report


def rebuilt(store: IndexStore, modality: str, spec: IndexSpec, device: str = "auto", trainable: bool = True,
            engine: str = "local", ray_address: str | None = None) -> VectorStore:
    """One side's stored vectors in a new store of ``spec``: built in shards on disk when the spec has
    ``shards`` and the side can train, else held in memory (to train, when the kind learns, in finish)."""
    if spec.params.get("shards") and trainable and store.catalog.vector_count(modality) >= MIN_TRAIN[spec.kind]:
        return sharded(store, modality, spec, device, engine, ray_address)
    held = VectorStore.empty(spec, store.meta.embed_dim)
    held.exact, held.use_gpu = store.fetch_vectors, gpu_wanted(device)
    for ids, batch in store.iter_vectors(modality, ADD_CHUNK):
        held.add(ids, batch)
    return held


def sharded(store: IndexStore, modality: str, spec: IndexSpec, device: str = "auto", engine: str = "local",
            ray_address: str | None = None) -> VectorStore:
    """One side's index built as ``spec["shards"]`` shards merged on disk: trained on a sample, then each
    shard (a range of ids) read from the catalog batch by batch and added, here one after another or in
    Ray tasks side by side (``engine="ray"``). Memory here: the training sample, one batch, one shard's
    codes; never every vector."""
    ids = store.catalog.vector_ids(modality)
    rng = np.random.default_rng(0)
    picked = ids if len(ids) <= TRAIN_SAMPLE else np.sort(rng.choice(ids, TRAIN_SAMPLE, replace=False))
    sample = np.concatenate([store.fetch_vectors(picked[i:i + ADD_CHUNK]) for i in range(0, len(picked), ADD_CHUNK)])
    held = VectorStore.empty(spec, store.meta.embed_dim)
    held.exact, held.use_gpu = store.fetch_vectors, gpu_wanted(device)
    ranges = [(int(part[0]), int(part[-1])) for part in np.array_split(ids, spec.params["shards"]) if len(part)]
    if engine == "ray":
        from .distributed import shards_on_ray

        def shards(trained, work):
            return shards_on_ray(store.catalog.location, store.meta.embed_dim, modality, trained, ranges, work,
                                 ray_address)
    else:
        shards = (store.iter_vectors(modality, ADD_CHUNK, first, last) for first, last in ranges)
    held.build_sharded(sample, len(ids), shards, store.vector_path(modality))
    return held
