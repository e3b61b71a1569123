"""Build or update an index from a folder: walk -> plan -> decode -> encode -> write.

Each stage passes typed values to the next and is timed. Decoding runs in decoder processes
(indexer.decoders) while the main process encodes and writes, so on a GPU the model never waits
for JPEGs.
The catalog is committed after every batch and the FAISS files are flushed every few seconds and
at the end; an interrupted run keeps every committed batch, and the next run re-syncs the FAISS
files from the catalog and carries on with what is left.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .build import check_trainable, finish
from .catalog import CAPTION, TEXT, ImageState, ImageWrite, TextWrite
from .decode import DEFAULT_DECODE_TIMEOUT, DEFAULT_MAX_MEGAPIXELS, Decoded, DecodedBatch, DecodeTask
from .decoders import iter_decoded
from .encoder import Encoder, sha256_file
from .errors import CrossmodalError, Interrupted, SourceError
from .photometa import META_VERSION, read_photo_meta
from .plan import EncodeJob, ImagePlan, plan_images, plan_texts
from .skips import NOT_REGULAR, VANISHED, RetrySettings, skip_info
from .sources import (
    ImageFile,
    Problem,
    TextRecord,
    WalkReport,
    catalog_name,
    file_origin,
    read_captions_file,
    read_texts_file,
    sidecar_captions,
    walk_images,
)
from .spec import IndexSpec, TooFewVectors
from .store import IndexStore
from .vectors import VectorStore, gpu_wanted

METADATA_BATCH = 500  # images whose metadata is read per catalog transaction (and between Ctrl-C checks)


def default_workers() -> int:
    # One decoder per core: on a GPU decoding is the bottleneck; on a CPU measured runs with one
    # decoder per core kept the model busier than fewer (bench/index_throughput.py).
    return min(16, os.cpu_count() or 1)


@dataclass(frozen=True)
class IndexOptions:
    captions: tuple[Path, ...] = ()
    texts: tuple[Path, ...] = ()
    include_hidden: bool = False
    exclude: tuple[str, ...] = ()
    batch_size: int = 32
    workers: int | None = None  # None: default_workers(device)
    spec: IndexSpec | None = None  # a new index's type (None: flat); an existing index keeps its own
    flush_seconds: float = 30.0
    # called with (stage, done, total) as a run goes: "indexing", "metadata", "encoding" (ray), and
    # "stopping" (0, 0) after a first Ctrl-C; None (or False) reports nothing
    progress: Callable[[str, int, int], None] | None = None
    engine: str = "local"  # "ray": decode and encode on a Ray cluster (indexer.distributed)
    ray_address: str | None = None  # with engine "ray": the cluster's address (None: a local Ray)
    use_draft: bool = True
    # where JPEGs are decoded: "cpu" (decoder processes), "device" (in batches on the model's device:
    # nvJPEG on a GPU; indexer.devicedecode), "auto" (device for a model on CUDA, cpu otherwise)
    decode: str = "auto"
    max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS  # larger images are skipped, not decoded
    decode_timeout: float = DEFAULT_DECODE_TIMEOUT  # seconds a decoder process may spend on one file
    sidecars: bool = True  # read NAME.txt captions beside images
    retry_skipped: bool = False  # try every skipped file again, not only those a changed setting may help
    allow_empty: bool = False  # a root with no images left may lose every image indexed from it
    only: frozenset[str] | None = None  # index just these root-relative paths (one split of a benchmark)


@dataclass
class IndexSummary:
    index: str
    root: str
    added: int = 0
    updated: int = 0
    removed: int = 0
    moved: int = 0
    unchanged: int = 0
    skipped: int = 0
    retried: int = 0  # skipped before and tried again (changed settings or --retry-skipped)
    duplicates: int = 0  # images or texts whose vector was reused instead of encoded again
    texts_added: int = 0
    texts_removed: int = 0
    texts_unchanged: int = 0
    encoded_images: int = 0
    from_shards: int = 0  # images taken from embedding shards an interrupted --engine ray run had written
    encoded_texts: int = 0
    precision: str = ""  # what this run's encoder computed in (fp32, bf16): the catalog records it per vector
    metadata_filled: int = 0  # kept images whose photo metadata was read this run (indexed before it was recorded)
    seconds: float = 0.0
    images_per_second: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    unreadable: int = 0  # folders and files the walk could not read: what was indexed there is kept
    kept_unread: int = 0  # images kept because the walk could not look at them
    other_types: dict[str, int] = field(default_factory=dict)  # extension -> files not indexed, most first
    special_files: dict[str, int] = field(default_factory=dict)  # kind -> FIFOs, sockets, devices not read
    problems: list[str] = field(default_factory=list)
    warned: dict[str, list[str]] = field(default_factory=dict)  # file -> what the image libraries said decoding it
    build: dict | None = None  # what training and tuning did (indexer.build.BuildReport)

    def as_dict(self) -> dict:
        return asdict(self)


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class _Run:
    """State of one indexing run: the open store, the in-memory vector files, counters."""

    def __init__(self, store: IndexStore, encoder: Encoder, options: IndexOptions, summary: IndexSummary,
                 problems: list[Problem]):
        self.store, self.encoder, self.options, self.summary = store, encoder, options, summary
        self.problems = problems
        self.timer = _Timer()
        self.vectors: dict[str, VectorStore] = {}
        self.dirty: set[str] = set()
        self.last_flush = time.monotonic()
        self.stop_requested = False  # set by the first Ctrl-C: stop once the batch in hand is committed
        self.retry = RetrySettings(options.max_megapixels, options.decode_timeout,
                                   retry_all=options.retry_skipped)

    def report(self, stage: str, done: int, total: int) -> None:
        if self.options.progress:
            self.options.progress(stage, done, total)

    def check_stop(self) -> None:
        if self.stop_requested:
            s = self.summary
            raise Interrupted(f"stopped: {s.added + s.updated} images and {s.texts_added} texts of this run are "
                              "committed and kept; run the same command again to go on from there")

    def load(self) -> None:
        for modality in ("image", "text"):
            vectors, report = self.store.load_vectors(modality)
            vectors.use_gpu = self.encoder.device.type == "cuda" and gpu_wanted("cuda")
            self.vectors[modality] = vectors
            if report.added or report.removed:
                self.dirty.add(modality)  # caught up after an interrupted run: persist that

    def put(self, modality: str, ids: list[int], vectors: np.ndarray) -> None:
        self.vectors[modality].add(np.asarray(ids, dtype=np.int64), vectors)
        self.dirty.add(modality)

    def drop(self, modality: str, ids: list[int]) -> None:
        if ids and self.vectors[modality].remove(np.asarray(ids, dtype=np.int64)):
            self.dirty.add(modality)

    def flush(self, force: bool = False) -> None:
        if not force and time.monotonic() - self.last_flush < self.options.flush_seconds:
            return
        with self.timer.stage("flush"):
            for modality in sorted(self.dirty):
                if self.vectors[modality].on_disk and not force:
                    continue  # each save rewrites the list file: once, at the end (the catalog has every vector)
                self.store.save_vectors(modality, self.vectors[modality])
                self.dirty.discard(modality)
            self.last_flush = time.monotonic()


def _stop_after_batch(run: _Run) -> Callable[[], None]:
    """Make the first Ctrl-C ask the run to stop once the batch in hand is committed (a second one stops
    at once); returns what puts the previous handler back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_interrupt(_signum, _frame):
        if run.stop_requested:
            raise KeyboardInterrupt
        run.stop_requested = True
        run.report("stopping", 0, 0)  # the CLI says: stopping after this batch (Ctrl-C again to stop at once)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    return lambda: signal.signal(signal.SIGINT, previous)


def update_index(root: Path, index_dir: Path, encoder: Encoder, options: IndexOptions | None = None) -> IndexSummary:
    """Index ``root`` into ``index_dir`` (created if needed), encoding only what is new or changed."""
    options = options or IndexOptions()
    root = Path(root).expanduser()
    if not root.is_dir():
        raise SourceError(f"folder not found: {root}")
    root = root.resolve()
    started = time.perf_counter()
    summary = IndexSummary(index=str(Path(index_dir).resolve()), root=str(root),
                           precision=encoder.precision)
    problems: list[Problem] = []
    # Read captions/texts files first: a broken file should stop the run before any encoding.
    extra_records: list[TextRecord] = []
    for path in options.captions:
        extra_records += read_captions_file(path, problems)
    for path in options.texts:
        extra_records += read_texts_file(path, problems)

    with IndexStore.open_for_writing(Path(index_dir), encoder.identity, options.spec) as store:
        run = _Run(store, encoder, options, summary, problems)
        restore_interrupts = _stop_after_batch(run)
        store.lock_root(root)
        root_id = store.catalog.root_id(root)
        try:
            with run.timer.stage("load"):
                run.load()
            known = store.catalog.image_states(root_id)
            with run.timer.stage("walk"):
                files, walked = _walk(run, root, known)
            with run.timer.stage("plan"):
                plan = plan_images(files, known, sha256_file, walked, run.retry)
                if not run.vectors["image"].trained:  # say so before encoding, not after
                    try:
                        check_trainable(store.spec, {"image": len(run.vectors["image"]) + len(plan.encode)})
                    except TooFewVectors:
                        if store.created:
                            store.catalog.clear_meta()
                        raise
                _apply_plan_without_encoding(run, root_id, plan)
            _encode_images(run, root_id, plan.encode)
            with run.timer.stage("metadata"):
                _fill_metadata(run, files, known, plan)
            with run.timer.stage("texts"):
                sidecars = [r for f in files for r in sidecar_captions(f, problems)] if options.sidecars else []
                records = sidecars + extra_records
                _sync_texts(run, root_id, root, records, {state.id for state in plan.kept_unseen})
            store.catalog.mark_root_indexed(root_id)
            with run.timer.stage("train"):
                report = finish(store, run.vectors)
            if report is not None:
                summary.build = report.as_dict()
                run.dirty.update(run.vectors)
        finally:
            restore_interrupts()
            run.flush(force=True)

    summary.problems = [str(p) for p in problems]
    summary.seconds = round(time.perf_counter() - started, 3)
    summary.stages = {k: round(v, 3) for k, v in run.timer.seconds.items()}
    encode_time = summary.stages.get("decode", 0) + summary.stages.get("encode", 0) + summary.stages.get("write", 0)
    if summary.encoded_images and encode_time:
        summary.images_per_second = round(summary.encoded_images / encode_time, 2)
    return summary


def _walk(run: _Run, root: Path, known: dict[str, ImageState]) -> tuple[list[ImageFile], WalkReport]:
    """The root's image files and what else the walk saw; refuses a root emptied by an unmounted disk."""
    options, summary = run.options, run.summary
    report = WalkReport()
    files = list(walk_images(root, include_hidden=options.include_hidden, exclude=options.exclude,
                             problems=run.problems, report=report, not_counted=options.captions + options.texts))
    # An unmounted disk leaves an empty folder, which a walk cannot tell from one whose photos were deleted.
    indexed = sum(1 for rel, state in known.items() if state.error is None and not report.unseen(rel))
    if not files and not report.special and indexed and not options.allow_empty:
        raise SourceError(f"{root} holds no images now but the index has {indexed:,} from it; if they were "
                          "really deleted, run again with --allow-empty")
    if options.only is not None:
        files = [f for f in files if f.rel in options.only]
        report.special = [f for f in report.special if f.rel in options.only]
    summary.unreadable = len(report.unread_dirs - {f + "/" for f in report.unread_files}) + len(report.unread_files)
    summary.other_types = dict(sorted(report.other_types.items(), key=lambda kv: (-kv[1], kv[0])))
    summary.special_files = dict(sorted(report.other_special.items()))
    return files, report


def _apply_plan_without_encoding(run: _Run, root_id: int, plan: ImagePlan) -> None:
    catalog, summary = run.store.catalog, run.summary
    catalog.update_image_files((item_id, f.rel, f.size, f.mtime_ns) for item_id, f in plan.restat + plan.moved)
    if plan.gone:
        deleted = catalog.delete_items([s.id for s in plan.gone])
        run.drop("image", deleted)
        run.drop("text", deleted)
    if plan.not_regular:
        # Named like images but never opened (a FIFO would block the reader): recorded so info --skipped lists them.
        writes = [ImageWrite(f.rel, f.size, f.mtime_ns, None, error=f"not a regular file ({f.kind}); skipped",
                             id=item_id, skip_info=skip_info(NOT_REGULAR, run.retry, type=f.kind))
                  for f, item_id in plan.not_regular]
        catalog.write_images(root_id, writes)
        run.drop("image", [item_id for _, item_id in plan.not_regular if item_id is not None])
        run.problems += [Problem(catalog_name(str(f.path)), f"not a regular file ({f.kind}); skipped")
                         for f, _ in plan.not_regular]
    summary.unchanged = len(plan.unchanged) + len(plan.restat)
    summary.moved = len(plan.moved)
    summary.removed = len(plan.gone)
    summary.skipped = len(plan.still_failing) + len(plan.not_regular)
    summary.retried = plan.retried
    summary.kept_unread = len(plan.kept_unseen)


def _encode_images(run: _Run, root_id: int, jobs: list[EncodeJob]) -> None:
    if not jobs:
        return
    if run.options.engine == "ray":
        from .distributed import encode_with_ray  # imports ray: only for --engine ray

        encode_with_ray(run, root_id, jobs)
        return
    encoder, options = run.encoder, run.options
    workers = options.workers if options.workers is not None else default_workers()
    tasks = [DecodeTask(i, job.file.path) for i, job in enumerate(jobs)]

    def cpu_batches(tasks: Sequence[DecodeTask]) -> Iterator[DecodedBatch]:
        return iter_decoded(tasks, encoder.preprocess, encoder.image_size, batch_size=options.batch_size,
                            workers=workers, use_draft=options.use_draft, max_megapixels=options.max_megapixels,
                            timeout=options.decode_timeout)

    if decodes_on_device(options.decode, encoder.device):
        from .devicedecode import iter_decoded_on_device  # imports torchvision

        batches = iter_decoded_on_device(tasks, encoder.preprocess, encoder.device, cpu_batches,
                                         batch_size=options.batch_size, max_megapixels=options.max_megapixels)
    else:
        batches = cpu_batches(tasks)
    done = 0
    while True:
        with run.timer.stage("decode"):  # time the encoder spends waiting for decoded images
            batch = next(batches, None)
        if batch is None:
            break
        with run.timer.stage("encode"):
            vectors, precisions = _vectors_for_batch(run, batch)
        write_batch(run, root_id, jobs, batch.ok, vectors, batch.failed, precisions)
        done += len(batch.ok) + len(batch.failed)
        run.report("indexing", done, len(jobs))
        run.check_stop()


DECODE_PLACES = ("auto", "cpu", "device")


def decodes_on_device(decode: str, device) -> bool:
    """Whether ``--decode`` puts JPEG decoding on the model's ``device`` (see IndexOptions.decode)."""
    if decode not in DECODE_PLACES:
        raise CrossmodalError(f"unknown --decode '{decode}': use {', '.join(DECODE_PLACES)}")
    return decode == "device" or (decode == "auto" and device.type == "cuda")


def write_batch(run: _Run, root_id: int, jobs: list[EncodeJob], ok: list[Decoded], vectors,
                failed: list[Decoded], precisions: Sequence[str | None]) -> None:
    """The write stage, the same for every engine: a batch's decoded images (``ok``, with their vectors and
    the precisions those were made in, in order) and failures (``failed``, recorded as skipped) into the
    catalog, then the in-memory vector files."""
    summary, catalog = run.summary, run.store.catalog
    writes: list[ImageWrite] = []
    for item in failed:
        job = jobs[item.key]
        if item.cause == VANISHED:  # no row: a file never indexed must not be "removed" next run
            run.problems.append(Problem(str(job.file.path), "vanished before it could be read"))
            continue
        writes.append(ImageWrite(job.file.rel, job.file.size, job.file.mtime_ns, item.sha256,
                                 error=item.error, id=job.item_id, warnings=_warnings(run, job, item),
                                 skip_info=skip_info(item.cause, run.retry)))
        run.problems.append(Problem(str(job.file.path), item.error or "unreadable"))
    summary.skipped += len(writes)
    for item, vector, precision in zip(ok, vectors, precisions, strict=True):
        job = jobs[item.key]
        writes.append(ImageWrite(job.file.rel, job.file.size, job.file.mtime_ns, item.sha256,
                                 item.width, item.height, vector=vector, id=job.item_id,
                                 warnings=_warnings(run, job, item), meta=item.meta, precision=precision))
        if job.item_id is None:
            summary.added += 1
        else:
            summary.updated += 1
    with run.timer.stage("write"):
        ids = catalog.write_images(root_id, writes)
        run.drop("image", [w.id for w in writes if w.id is not None])
        with_vectors = [(i, w.vector) for i, w in zip(ids, writes) if w.vector is not None]
        if with_vectors:
            run.put("image", [i for i, _ in with_vectors], np.stack([v for _, v in with_vectors]))
    run.flush()


def _fill_metadata(run: _Run, files: list[ImageFile], known: dict[str, ImageState], plan: ImagePlan) -> None:
    """Read the photo metadata of the images the plan keeps that have none yet (indexed before it was
    recorded, or by an older photometa), from their headers: nothing is decoded or encoded again."""
    paths = {f.rel: f.path for f in files}
    states = {state.id: state for state in known.values()}
    todo = [(state.id, paths[state.rel]) for state in plan.unchanged if _meta_stale(state)]
    todo += [(item_id, f.path) for item_id, f in plan.restat + plan.moved if _meta_stale(states[item_id])]
    if not todo:
        return
    for start in range(0, len(todo), METADATA_BATCH):
        chunk = todo[start : start + METADATA_BATCH]
        run.summary.metadata_filled += run.store.catalog.update_image_meta(
            (item_id, read_photo_meta(path)) for item_id, path in chunk)
        run.report("metadata", start + len(chunk), len(todo))
        run.check_stop()


def _meta_stale(state: ImageState) -> bool:
    return state.meta_version is None or state.meta_version < META_VERSION


def _warnings(run: _Run, job: EncodeJob, item: Decoded) -> str | None:
    """The file's library warnings as the catalog keeps them (one per line), noted in the summary too."""
    if not item.warnings:
        return None
    run.summary.warned[str(job.file.path)] = item.warnings
    return "\n".join(item.warnings)


def _reuse_or_encode(run: _Run, modality: str, hashes: list[str], encode: Callable[[list[int]], np.ndarray]
                     ) -> tuple[list[np.ndarray], list[str | None]]:
    """Vectors for items given by content hash, with the precision each was made in: stored ones are
    reused, each new hash is encoded once.

    ``encode`` gets the positions (in ``hashes``) of the first item of every new hash.
    """
    found = run.store.catalog.vectors_for_hashes(modality, hashes)
    first: dict[str, int] = {}
    for position, digest in enumerate(hashes):
        if digest not in found:
            first.setdefault(digest, position)
    if first:
        found.update((digest, (vector, run.encoder.precision))
                     for digest, vector in zip(first, encode(list(first.values()))))
    run.summary.duplicates += len(hashes) - len(first)
    return [found[digest][0] for digest in hashes], [found[digest][1] for digest in hashes]


def _vectors_for_batch(run: _Run, batch: DecodedBatch) -> tuple[list[np.ndarray], list[str | None]]:
    """Encode the batch, except images whose content already has a vector (identical files)."""

    def encode(rows: list[int]) -> np.ndarray:
        run.summary.encoded_images += len(rows)
        return run.encoder.encode_images(batch.pixels[rows])

    return _reuse_or_encode(run, "image", [item.sha256 for item in batch.ok], encode)


def _sync_texts(run: _Run, root_id: int, root: Path, records: list[TextRecord], unread_images: set[int]) -> None:
    catalog, summary = run.store.catalog, run.summary
    known = catalog.text_states(root_id)
    # The sidecars of images the walk could not look at were not read either: their captions stay as they are.
    untouched = [t for t in known if t.image_id in unread_images and (t.origin or "").startswith("sidecar:")]
    if untouched:
        skip = {t.id for t in untouched}
        known = [t for t in known if t.id not in skip]
    # Files passed this run are synced (their removed lines leave the index); others are left alone.
    passed = {file_origin("captions", p) for p in run.options.captions}
    passed |= {file_origin("texts", p) for p in run.options.texts}
    image_ids = {rel: state.id for rel, state in catalog.image_states(root_id).items()}
    plan = plan_texts(records, known,
                      lambda origin: origin.startswith("sidecar:") or origin in passed,
                      image_ids, root, run.problems)
    if plan.remove:
        run.drop("text", catalog.delete_items(plan.remove))
    summary.texts_removed = len(plan.remove)
    summary.texts_unchanged = plan.kept + len(untouched)
    batch_size = 256
    for start in range(0, len(plan.add), batch_size):
        chunk = plan.add[start : start + batch_size]
        vectors, precisions = _text_vectors(run, [record.text for record, _ in chunk])
        writes = [TextWrite(CAPTION if image_id is not None else TEXT, record.text, text_sha256(record.text),
                            record.origin, record.line, image_id, vector, precision)
                  for (record, image_id), vector, precision in zip(chunk, vectors, precisions)]
        ids = catalog.write_texts(root_id, writes)
        run.put("text", ids, np.stack(vectors))
        summary.texts_added += len(ids)
        run.check_stop()
        run.flush()


def _text_vectors(run: _Run, texts: list[str]) -> tuple[list[np.ndarray], list[str | None]]:
    def encode(positions: list[int]) -> np.ndarray:
        run.summary.encoded_texts += len(positions)
        return run.encoder.encode_texts([texts[p] for p in positions])

    return _reuse_or_encode(run, "text", [text_sha256(t) for t in texts], encode)
