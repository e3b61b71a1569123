"""From stored vectors to trained, tuned vector indexes: at the end of an indexing run, and ``reindex``.

The catalog holds every vector, so the vector files can be rebuilt as any kind without encoding
again. :func:`finish` resolves ``auto`` to a kind, trains the modalities whose index learns from
data, and tunes the search setting when the spec has a target recall; :func:`reindex` rebuilds an
index as another kind.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .spec import LEARNED, MIN_TRAIN, IndexSpec, TooFewVectors
from .store import MODALITIES, IndexStore
from .tuning import SEARCH_SETTING, TUNING_K, choose, tune, tuning_queries
from .vectors import VectorStore, exact_top_k, gpu_wanted

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
    """Tune each modality with queries from the other one; the spec takes the largest value needed."""
    target = spec.params["target_recall"]
    full = {m: in_memory[m] if m in in_memory else _stored(store, v) for m, v in vectors.items()}
    values = []
    for modality, held in vectors.items():
        if counts[modality] <= TUNING_K or not held.trained:  # too small to train: it is searched exactly
            continue
        other = "text" if modality == "image" else "image"
        own_ids, own = full[modality]
        queries, exclude = tuning_queries(own, own_ids, full[other][1])
        truth = exact_top_k(queries, own, own_ids, TUNING_K, exclude)[1]
        tuning = tune(held, queries, truth, target, exclude)
        report.tuning[modality] = {**asdict(tuning), "queries_from": other if exclude is None else modality}
        values.append(tuning.value)
    if not values:
        return spec
    setting = SEARCH_SETTING[spec.kind]
    recall = {m: t["recall"] for m, t in report.tuning.items()}
    return spec.with_params(**{setting: max(values)}, tuned={"for": max(counts.values()), "recall": recall})


def _stored(store: IndexStore, held: VectorStore) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of a trained side, read from the catalog."""
    ids = np.sort(held.ids())
    return ids, store.fetch_vectors(ids)


def reindex(index_dir: Path, spec: IndexSpec, device: str = "auto") -> BuildReport:
    """Rebuild the vector files of the index at ``index_dir`` as ``spec``, from stored vectors.

    ``device`` auto or cuda trains IVF on the GPU where faiss has one.
    """
    started = time.perf_counter()
    with IndexStore.open_locked(Path(index_dir)) as store:
        dim = store.meta.embed_dim
        counts = {m: len(store.catalog.vector_ids(m)) for m in MODALITIES}
        check_trainable(spec, counts)
        vectors = {}
        for modality in MODALITIES:
            held = VectorStore.empty(spec, dim)
            held.exact, held.use_gpu = store.fetch_vectors, gpu_wanted(device)
            ids = store.catalog.vector_ids(modality)
            for start in range(0, len(ids), ADD_CHUNK):
                held.add(ids[start:start + ADD_CHUNK], store.fetch_vectors(ids[start:start + ADD_CHUNK]))
            vectors[modality] = held
        previous = store.spec
        store.set_spec(spec)  # first the catalog: an older file left by a crash is then ignored as stale
        try:
            report = finish(store, vectors, retune=True) or BuildReport(spec.describe(), 0.0)
        except BaseException:
            store.set_spec(previous)
            raise
        for modality in MODALITIES:
            store.save_vectors(modality, vectors[modality])
    report.seconds = round(time.perf_counter() - started, 3)
    return report
