"""Each index type against exact search on text-like queries: build time, bytes/vector, recall@10, queries/s.

Corpus: clustered synthetic vectors of low intrinsic dimension (as CLIP embeddings are), 512-d.
Queries: a shifted distribution, as text queries are to image vectors: the same topics, their own
noise and a constant offset (the modality gap). With ``--index DIR`` the corpus is a real index's
image vectors and the queries its captions.

Each kind's search setting (nprobe, ef_search, rerank) is tuned on 1,000 queries to the smallest value
reaching the target recall@10 (0.95; 0.90 for binary codes), then everything is measured on 1,000
other queries. Re-ranking reads full vectors from memory here (from SQLite in an index). Last line: JSON.

    python bench/ann.py                      # 100,000 vectors, a few minutes
    python bench/ann.py --n 1000000          # the scale of the targets (about an hour on 2 cores)
    python bench/ann.py --index .demo/index  # real vectors: captions against images
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from indexer.errors import CrossmodalError  # noqa: E402
from indexer.spec import IndexSpec  # noqa: E402
from indexer.tuning import SEARCH_SETTING, tune  # noqa: E402
from indexer.vectors import VectorStore, exact_top_k  # noqa: E402

TARGETS = {"ivf": 0.95, "hnsw": 0.95, "ivfpq": 0.95, "lsh": 0.90, "itq": 0.90}
K = 10


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic(n: int, dim: int, queries: int, seed: int = 0, spread: float = 0.8,
              query_spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Corpus vectors from 48 latent dimensions around 2,000 overlapping topics; queries shifted off them."""
    rng = np.random.default_rng(seed)
    latent, topics = 48, 2_000
    basis = np.linalg.qr(rng.standard_normal((dim, latent + 2)))[0]  # orthonormal columns
    lift, image_gap, text_gap = basis[:, :latent].T, basis[:, latent], basis[:, latent + 1]
    centres = rng.standard_normal((topics, latent)).astype(np.float32)
    base = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # in chunks: the latent draw for 1M rows is small, the lift is not
        rows = min(100_000, n - start)
        z = centres[rng.integers(0, topics, rows)] + spread * rng.standard_normal((rows, latent), dtype=np.float32)
        x = z @ lift + 0.05 * rng.standard_normal((rows, dim), dtype=np.float32) + 3.0 * image_gap
        base[start:start + rows] = unit(x)
    zq = centres[rng.integers(0, topics, queries)] + query_spread * rng.standard_normal((queries, latent),
                                                                                         dtype=np.float32)
    q = zq @ lift + 0.12 * rng.standard_normal((queries, dim), dtype=np.float32) + 3.0 * text_gap
    return base, unit(q)


def real(index_dir: Path, queries: int) -> tuple[np.ndarray, np.ndarray]:
    from indexer.store import IndexStore

    with IndexStore.open(index_dir) as store:
        image_ids, text_ids = store.catalog.vector_ids("image"), store.catalog.vector_ids("text")
        pick = np.random.default_rng(0).choice(len(text_ids), min(queries, len(text_ids)), replace=False)
        return store.fetch_vectors(image_ids), store.fetch_vectors(text_ids[np.sort(pick)])


def spec_for(kind: str, args) -> IndexSpec:
    params = {"hnsw": {"M": args.hnsw_m, "ef_construction": args.ef_construction},
              "ivfpq": {"m": args.pq_bytes, "opq": args.opq}, "lsh": {"bits": args.bits},
              "itq": {"bits": args.bits}}.get(kind, {})
    return IndexSpec(kind, params=params)


def queries_per_second(store: VectorStore, queries: np.ndarray, batch: int, budget_s: float = 10.0) -> float:
    done, start = 0, time.perf_counter()
    while done < len(queries) and (done == 0 or time.perf_counter() - start < budget_s):
        store.search(queries[done:done + batch], K)
        done += len(queries[done:done + batch])
    return done / (time.perf_counter() - start)


def file_bytes(store: VectorStore) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        store.save(Path(tmp) / "v")
        return (Path(tmp) / "v").stat().st_size


def run_kind(kind: str, args, base, ids, tune_q, tune_truth, measure_q, measure_truth) -> dict:
    store = VectorStore.empty(spec_for(kind, args), base.shape[1])
    store.exact = lambda wanted: base[wanted]  # ids are row numbers
    start = time.perf_counter()
    store.add(ids, base)
    if not store.trained:
        store.train(base, n=len(base))
    build = time.perf_counter() - start
    row = {"kind": kind, "build_s": round(build, 1), "code_bytes": store.code_bytes(),
           "file_bytes_per_vector": round(file_bytes(store) / len(base), 1)}
    if kind in SEARCH_SETTING:
        tuning = tune(store, tune_q, tune_truth, TARGETS[kind])
        setting = {tuning.setting: tuning.value}
        store.spec = store.spec.with_params(**setting)
        row["setting"] = setting
    _, found = store.search(measure_q, K)
    row["recall@10"] = round(float(np.mean([len(np.intersect1d(f, t)) / K for f, t in zip(found, measure_truth)])), 4)
    row["qps_batch1"] = round(queries_per_second(store, measure_q, 1), 1)
    row["qps_batch1000"] = round(queries_per_second(store, measure_q, 1000), 1)
    row["spec"] = store.spec.describe()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--index", type=Path, default=None, help="Use a real index's vectors instead.")
    parser.add_argument("--kinds", default="flat,ivf,hnsw,ivfpq,lsh,itq")
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--pq-bytes", type=int, default=64)
    parser.add_argument("--opq", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--bits", type=int, default=256)
    parser.add_argument("--spread", type=float, default=0.8, help="Topic noise (overlap) of corpus vectors.")
    parser.add_argument("--query-spread", type=float, default=1.0, help="Topic noise of queries.")
    args = parser.parse_args()

    started = time.perf_counter()
    base, queries = real(args.index, 2_000) if args.index else synthetic(args.n, args.dim, 2_000, spread=args.spread,
                                                                          query_spread=args.query_spread)
    half = len(queries) // 2
    tune_q, measure_q = queries[:half], queries[half:]
    ids = np.arange(len(base), dtype=np.int64)
    truth = exact_top_k(queries, base, ids, K)[1]
    tune_truth, measure_truth = truth[:half], truth[half:]
    print(f"{len(base):,} vectors of {base.shape[1]}-d, {len(queries):,} queries "
          f"({'index ' + str(args.index) if args.index else 'synthetic, shifted'}); "
          f"ground truth in {time.perf_counter() - started:.0f}s", flush=True)
    rows = []
    for kind in args.kinds.split(","):
        try:
            row = run_kind(kind, args, base, ids, tune_q, tune_truth, measure_q, measure_truth)
        except CrossmodalError as exc:  # too few vectors to train, or more ITQ bits than dimensions
            print(f"{kind:6s} skipped: {exc}", flush=True)
            continue
        rows.append(row)
        print(f"{kind:6s} build {row['build_s']:7.1f}s  code {row['code_bytes']:5d} B  file "
              f"{row['file_bytes_per_vector']:7.1f} B/vec  recall@10 {row['recall@10']:.3f}  "
              f"qps b1 {row['qps_batch1']:8.1f}  b1000 {row['qps_batch1000']:8.1f}  {row.get('setting', '')}",
              flush=True)
        gc.collect()
    flat = next((r for r in rows if r["kind"] == "flat"), None)
    if flat:
        for row in rows:
            row["speedup_batch1"] = round(row["qps_batch1"] / flat["qps_batch1"], 1)
        print("single-query speed-up over flat: " + ", ".join(f"{r['kind']} {r['speedup_batch1']}x" for r in rows))
    print(json.dumps({"n": len(base), "dim": int(base.shape[1]), "queries": half,
                      "data": str(args.index) if args.index else "synthetic-shifted", "results": rows,
                      "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
