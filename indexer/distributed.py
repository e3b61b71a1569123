"""``crossmodal index --engine ray``: decode and encode a run's new and changed images on a Ray cluster.

The driver walks and plans as the local engine does (:mod:`indexer.pipeline`); only the plan's
encode jobs go to Ray. Ray Data decodes them in CPU tasks, a pool of encoder actors (one per GPU,
``num_gpus=1``; on CPUs fewer cores than there are, since Ray hangs when actors hold every CPU,
ray-project/ray#44687) turns them into vectors, and the driver writes each result as an embedding
shard in clip-retrieval's layout under the index folder, then ingests it with the pipeline's own
write stage. A run that is killed leaves its finished shards behind: the next run ingests them
without encoding again (they are kept per file path, size and mtime, and per model), and deletes
the folder once everything in it is in the catalog.

``reindex --shards N --engine ray`` (and an import's sharded build) writes the shards of an on-disk
index in Ray tasks (:func:`shards_on_ray`), each reading its range of ids from the catalog itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .decode import DRAFT_FACTOR, Decoded, DecodeTask, decode_file
from .errors import CrossmodalError
from .identity import ModelIdentity
from .photometa import PhotoMeta

SHARDS_DIR = "ray-shards"
SHARD_IMAGES = 256  # images per Ray task and per shard file
_COLUMNS = ("rel", "size", "mtime_ns", "sha256", "width", "height", "error", "cause", "warnings", "meta")


@dataclass(frozen=True)
class EncodeSettings:
    """What a Ray worker needs to decode and encode as the driver would (picklable)."""

    identity: ModelIdentity
    device: str
    precision: str  # the driver's, resolved: every vector of a run is made as the driver would make it
    draft_size: int | None
    max_megapixels: float | None


def encode_with_ray(run, root_id: int, jobs: list) -> None:
    """The Ray engine's decode and encode stages for ``jobs`` (the plan's :class:`EncodeJob` list), written
    through :func:`indexer.pipeline.write_batch` as they come back."""
    from .pipeline import write_batch

    shards = ShardStore(run.store.directory / SHARDS_DIR, run.encoder.identity)
    keys = {(job.file.rel, job.file.size, job.file.mtime_ns): position for position, job in enumerate(jobs)}
    done = 0
    for number in shards.numbers():  # a killed run's shards: ingested, not encoded again
        ok, vectors, failed, precisions = shards.read(number, keys)
        if ok or failed:
            write_batch(run, root_id, jobs, ok, vectors, failed, precisions)
            taken = {d.key for d in ok + failed}
            keys = {k: v for k, v in keys.items() if v not in taken}
            done += len(ok) + len(failed)
            run.summary.from_shards += len(ok) + len(failed)
    todo = sorted(keys.values())
    settings = EncodeSettings(run.encoder.identity, run.encoder.device.type, run.encoder.precision,
                              run.encoder.image_size * DRAFT_FACTOR if run.options.use_draft else None,
                              run.options.max_megapixels)
    tasks = [{"shard": shards.next_number() + n, "keys": todo[i:i + SHARD_IMAGES],
              "paths": [str(jobs[k].file.path) for k in todo[i:i + SHARD_IMAGES]]}
             for n, i in enumerate(range(0, len(todo), SHARD_IMAGES))]
    results = _encoded_on_ray(tasks, settings, run.encoder.preprocess, run.options.ray_address)
    while True:
        with run.timer.stage("encode"):  # the driver waits for Ray's decode and encode stages here
            result = next(results, None)
        if result is None:
            break
        ok, vectors, failed = shards.write(result, jobs, settings.precision)
        run.summary.encoded_images += len(ok)
        write_batch(run, root_id, jobs, ok, vectors, failed, [settings.precision] * len(ok))  # timed inside
        done += len(ok) + len(failed)
        run.report("indexing", done, len(jobs))
        run.check_stop()
    shards.clear()  # everything is in the catalog now


def _encoded_on_ray(tasks: list[dict], settings: EncodeSettings, preprocess, address: str | None) -> Iterator[dict]:
    if not tasks:
        return
    with _session(address) as ray:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the CLI shows its own, from the run's progress reports
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        gpus = int(ray.cluster_resources().get("GPU", 0)) if settings.device == "cuda" else 0
        cpus = int(ray.cluster_resources().get("CPU", 1))
        if gpus:
            actors, pool = gpus, dict(num_gpus=1, num_cpus=1)
        else:  # fewer CPUs than the cluster has: the rest decode (and Ray needs one free not to hang)
            actors, pool = 1, dict(num_cpus=max(1, min(cpus - 1, cpus // 2)))
        data = ray.data.from_items(tasks, override_num_blocks=len(tasks))
        # Half a CPU per decode task: other resources than the actors' keep Ray from fusing decoding into
        # them (which would leave the cores beside them idle), and two decoders share a core's slot.
        data = data.map(_decode_shard, fn_kwargs={"settings": settings, "preprocess": preprocess}, num_cpus=0.5)
        data = data.map(_ShardEncoder, fn_constructor_kwargs={"settings": settings, "threads": pool["num_cpus"]},
                        compute=ray.data.ActorPoolStrategy(size=actors), **pool)
        yield from data.iter_rows()


def shards_on_ray(location: Path | str, dim: int, modality: str, trained: np.ndarray,
                  ranges: list[tuple[int, int]], work: Path, address: str | None = None) -> list[Path]:
    """Write one shard file per id range under ``work``, each in a Ray task that reads its vectors from the
    catalog at ``location`` and adds them to a copy of ``trained`` (a serialized, trained, empty index).

    Every task's node needs the catalog: a PostgreSQL URL, or the SQLite file on a shared file system.
    """
    with _session(address) as ray:
        task = ray.remote(num_cpus=1)(_write_shard)
        refs = [task.remote(location, dim, modality, trained, first, last, str(work / f"shard-{i}.index"))
                for i, (first, last) in enumerate(ranges)]
        return [Path(p) for p in ray.get(refs)]


def _write_shard(location, dim: int, modality: str, trained: np.ndarray, first: int, last: int, out: str) -> str:
    from . import ondisk
    from .build import ADD_CHUNK
    from .catalog import Catalog

    catalog = Catalog(location, read_only=True)
    try:
        # One thread: the task holds one CPU, and the cluster runs as many tasks as it has CPUs.
        ondisk.write_serialized_shard(trained, catalog.iter_vectors(modality, dim, ADD_CHUNK, first, last),
                                      Path(out), threads=1)
    finally:
        catalog.close()
    return out


@contextlib.contextmanager
def _session(address: str | None):
    """Ray, started for the block (a local one without ``address``) unless this process has it already."""
    ray = _ray()
    started_here = not ray.is_initialized()
    if started_here:
        cpus = os.cpu_count() or 1
        ray.init(address=address, num_cpus=None if address else cpus, include_dashboard=False,
                 log_to_driver=False, logging_level="ERROR", configure_logging=False)
    try:
        yield ray
    finally:
        if started_here:
            ray.shutdown()


def _decode_shard(task: dict, settings: EncodeSettings, preprocess) -> dict:
    """A Ray CPU task: decode one shard's files (decode_file never raises: failures come back as rows)."""
    import torch

    decoded = [decode_file(DecodeTask(key, Path(path)), preprocess, settings.draft_size, settings.max_megapixels)
               for key, path in zip(task["keys"], task["paths"])]
    ok = [d for d in decoded if d.pixels is not None]
    pixels = torch.stack([d.pixels for d in ok]).numpy() if ok else np.zeros((0,), np.float32)
    for d in decoded:
        d.pixels = None
    return {"shard": task["shard"], "pixels": pixels, "decoded": json.dumps([_row(d) for d in decoded])}


class _ShardEncoder:
    """A Ray actor holding one model: pixels in, vectors out (the encoder's stateless batch function)."""

    def __init__(self, settings: EncodeSettings, threads: int):
        import torch

        from .encoder import load_encoder_for

        torch.set_num_threads(max(1, threads))
        self.encoder = load_encoder_for(settings.identity, settings.device, precision=settings.precision)

    def __call__(self, shard: dict) -> dict:
        import torch

        pixels = shard["pixels"]
        vectors = (self.encoder.encode_images(torch.from_numpy(np.ascontiguousarray(pixels))) if len(pixels)
                   else np.zeros((0, self.encoder.identity.embed_dim), np.float32))
        return {"shard": shard["shard"], "vectors": np.asarray(vectors, np.float32), "decoded": shard["decoded"]}


def _row(d: Decoded) -> dict:
    return {"key": d.key, "sha256": d.sha256, "width": d.width, "height": d.height, "error": d.error,
            "cause": d.cause, "warnings": d.warnings, "meta": asdict(d.meta) if d.meta is not None else None}


def _decoded(row: dict, key: int) -> Decoded:
    meta = json.loads(row["meta"]) if isinstance(row["meta"], str) else row["meta"]
    warnings = json.loads(row["warnings"]) if isinstance(row["warnings"], str) else row["warnings"]
    return Decoded(key, row["sha256"], row["width"], row["height"], error=row["error"], cause=row["cause"],
                   warnings=list(warnings or []), meta=PhotoMeta(**meta) if meta else None)


class ShardStore:
    """Embedding shards in clip-retrieval's layout (``img_emb/img_emb_N.npy``, ``metadata/metadata_N.parquet``)
    with the columns an ingest needs; a shard is complete once its parquet file is there (written last)."""

    def __init__(self, directory: Path, identity: ModelIdentity):
        self.directory = directory
        manifest = directory / "model.json"
        wanted = json.dumps(asdict(identity), sort_keys=True)
        if manifest.is_file() and manifest.read_text(encoding="utf-8") != wanted:
            shutil.rmtree(directory)  # made by another model: of no use to this one
        (directory / "img_emb").mkdir(parents=True, exist_ok=True)
        (directory / "metadata").mkdir(exist_ok=True)
        manifest.write_text(wanted, encoding="utf-8")

    def numbers(self) -> list[int]:
        return sorted(int(p.stem.rsplit("_", 1)[1]) for p in (self.directory / "metadata").glob("metadata_*.parquet"))

    def next_number(self) -> int:
        return max(self.numbers(), default=-1) + 1

    def write(self, result: dict, jobs: list, precision: str) -> tuple[list[Decoded], np.ndarray, list[Decoded]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        number, rows = result["shard"], json.loads(result["decoded"])
        decoded = [_decoded(row, row["key"]) for row in rows]
        ok, failed = [d for d in decoded if d.error is None], [d for d in decoded if d.error is not None]
        vectors, dim = np.asarray(result["vectors"], np.float32), result["vectors"].shape[-1]
        full = np.zeros((len(decoded), dim), np.float32)  # clip-retrieval's rows: failures as zero vectors
        full[[i for i, d in enumerate(decoded) if d.error is None]] = vectors
        np.save(self.directory / "img_emb" / f"img_emb_{number}.npy", full)
        files = [jobs[d.key].file for d in decoded]
        table = {"image_path": [str(f.path) for f in files], "rel": [f.rel for f in files],
                 "size": [f.size for f in files], "mtime_ns": [f.mtime_ns for f in files],
                 "precision": [precision] * len(files)}
        for column in _COLUMNS[3:]:
            values = [row[column] for row in rows]
            table[column] = [json.dumps(v) for v in values] if column in ("warnings", "meta") else values
        final = self.directory / "metadata" / f"metadata_{number}.parquet"
        pq.write_table(pa.table(table), final.with_suffix(".tmp"))
        os.replace(final.with_suffix(".tmp"), final)  # last: the shard is complete
        return ok, vectors, failed

    def read(self, number: int, keys: dict) -> tuple[list[Decoded], np.ndarray, list[Decoded], list[str | None]]:
        """The rows of shard ``number`` that are still jobs of this run (``keys``: (rel, size, mtime) -> job):
        decoded, their vectors, failed, and the precision of each vector."""
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(self.directory / "metadata" / f"metadata_{number}.parquet").to_pylist()
            vectors = np.load(self.directory / "img_emb" / f"img_emb_{number}.npy")
        except (OSError, ValueError) as exc:
            raise CrossmodalError(f"cannot read the embedding shard {number} in {self.directory}: {exc}; delete "
                                  "that folder and run again (its images are encoded again)") from None
        ok, kept, failed, precisions = [], [], [], []
        for row, vector in zip(rows, vectors):
            key = keys.get((row["rel"], row["size"], row["mtime_ns"]))
            if key is None:  # in the catalog already, or changed on disk since: encoded again
                continue
            item = _decoded(row, key)
            (failed if item.error is not None else ok).append(item)
            if item.error is None:
                kept.append(vector)
                precisions.append(row.get("precision"))  # shards written before it was recorded: None
        return ok, np.asarray(kept, np.float32).reshape(len(kept), vectors.shape[-1]), failed, precisions

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise CrossmodalError("--engine ray needs Ray: pip install 'crossmodal-search[distributed]'") from None
    return ray
