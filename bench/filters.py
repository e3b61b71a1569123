"""Filtered search against unfiltered search, per index kind, at 50 %, 5 % and 0.1 % of the corpus admitted.

Corpus and queries as in ``bench/ann.py`` (clustered synthetic 512-d vectors, shifted text-like
queries). A filter admits a random share of the ids (as a folder or a date range would, uncorrelated
with the content). Each kind's search setting is first tuned, unfiltered, to recall@10 0.95 (0.90
for binary codes) on other queries, as ``crossmodal index`` tunes it; then for each share:
single-query latency (median and p95; the filter's bitmap is made once per filter, as a searcher
caches it) and recall@10 against the brute-force top 10 of the admitted vectors. At 0.1 % the
search is exact over the admitted vectors (``EXACT_SHARE`` = 2 %), read from memory here (from
SQLite in an index). Last line: JSON.

    python bench/filters.py                         # 1,000,000 vectors, flat ivf ivfpq lsh (~20 min on 2 cores)
    python bench/filters.py --n 100000 --kinds flat,ivf,hnsw,ivfpq,lsh
    python bench/filters.py --catalog-only          # the catalog's side: the SQL that finds the admitted ids

With ``--catalog-only``, a catalog of ``--n`` image rows with generated metadata is written and the
time the catalog takes to find the ids a filter admits is measured (a searcher does it once per
filter and catalog version, then reuses the bitmap).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ann import spec_for, synthetic  # noqa: E402

from indexer.tuning import SEARCH_SETTING, tune  # noqa: E402
from indexer.vectors import EXACT_SHARE, Allowed, VectorStore, exact_top_k, serial_in_this_thread  # noqa: E402

SHARES = (0.5, 0.05, 0.001)
TARGETS = {"ivf": 0.95, "hnsw": 0.95, "ivfpq": 0.95, "lsh": 0.90, "itq": 0.90}  # as bench/ann.py tunes
K = 10


def build(kind: str, args, base: np.ndarray, ids: np.ndarray) -> tuple[VectorStore, float]:
    started = time.perf_counter()
    store = VectorStore.empty(spec_for(kind, args), base.shape[1])
    store.exact = lambda wanted: base[np.asarray(wanted)]  # ids are row numbers
    for start in range(0, len(base), 100_000):
        store.add(ids[start:start + 100_000], base[start:start + 100_000])
    if not store.trained:
        store.train(base)
    return store, time.perf_counter() - started


def measure(store: VectorStore, queries: np.ndarray, allowed: Allowed | None) -> tuple[np.ndarray, list[float]]:
    found = np.empty((len(queries), K), dtype=np.int64)
    times = []
    for n, query in enumerate(queries):
        started = time.perf_counter()
        _, row = store.search(query[None, :], K, allowed)
        times.append(time.perf_counter() - started)
        found[n] = row[0]
    return found, times


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f[f >= 0], t[t >= 0])) / max(1, (t >= 0).sum())
                          for f, t in zip(found, truth)]))


def catalog_timings(n: int) -> None:
    import sqlite3
    import tempfile

    from indexer.catalog import Catalog
    from indexer.filters import Filters, filtered_ids

    rng = np.random.default_rng(2)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "catalog.sqlite"
        Catalog(path).close()
        started = time.perf_counter()
        con = sqlite3.connect(path)
        con.execute("INSERT INTO roots (id, path) VALUES (1, '/photos')")
        cameras = ["Canon", "NIKON", "Apple", "SONY", "FUJIFILM"]
        rows = ((f"{2000 + i % 25}/{i % 300:03d}/IMG_{i:07d}.jpg", i % 5_000_000, 1_600_000_000_000_000_000 + i,
                 f"{i:064x}", 4000, 3000 if i % 3 else 5000, "JPEG",
                 f"20{10 + i % 15}-{1 + i % 12:02d}-{1 + i % 28:02d}T12:00:00", cameras[i % 5], "X",
                 float(rng.uniform(-60, 70)), float(rng.uniform(-180, 180))) for i in range(n))
        con.executemany("INSERT INTO items (kind, root_id, path, size, mtime_ns, sha256, width, height, format, "
                        "taken_at, camera_make, camera_model, gps_lat, gps_lon, meta_version, updated_at) "
                        "VALUES ('image', 1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, '')", rows)
        con.commit()
        con.close()
        print(f"catalog of {n:,} images written in {time.perf_counter() - started:.0f}s", flush=True)
        catalog = Catalog(path, read_only=True)
        cases = {"folder 2003/ (4 %)": Filters(paths=("2003",)),
                 "taken in 2015 (7 %)": Filters(taken=("2015-01-01", "2015-12-31")),
                 "camera canon, portrait (7 %)": Filters(camera="canon", orientation="portrait"),
                 "GPS box 10x10 degrees (~0.2 %)": Filters(bbox=(40, 0, 50, 10)),
                 "landscape (67 %)": Filters(orientation="landscape")}
        timings = {}
        for label, filters in cases.items():
            filtered_ids(catalog, filters, "image")
            started = time.perf_counter()
            ids = filtered_ids(catalog, filters, "image")
            timings[label] = {"ms": round(1000 * (time.perf_counter() - started), 1), "admitted": len(ids)}
            print(f"{label:32s} {timings[label]['ms']:8.1f} ms  {len(ids):>9,} ids", flush=True)
        catalog.close()
        print(json.dumps({"n": n, "catalog": timings}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--kinds", default="flat,ivf,ivfpq,lsh")
    parser.add_argument("--threads", type=int, default=1, help="FAISS threads (1: as a server's query thread).")
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--pq-bytes", type=int, default=64)
    parser.add_argument("--opq", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--bits", type=int, default=256)
    parser.add_argument("--catalog-only", action="store_true", help="Time the catalog's filter SQL instead.")
    args = parser.parse_args()
    if args.catalog_only:
        catalog_timings(args.n)
        return

    started = time.perf_counter()
    base, queries = synthetic(args.n, args.dim, 2 * args.queries)
    queries, tune_q = queries[:args.queries], queries[args.queries:]
    ids = np.arange(len(base), dtype=np.int64)
    rng = np.random.default_rng(1)
    filters = {share: np.flatnonzero(rng.random(len(base)) < share) for share in SHARES}
    truths = {share: exact_top_k(queries, base[allowed], allowed, K)[1] for share, allowed in filters.items()}
    truths[1.0] = exact_top_k(queries, base, ids, K)[1]
    tune_truth = exact_top_k(tune_q, base, ids, K)[1]
    bitmaps = {share: Allowed(allowed) for share, allowed in filters.items()}
    print(f"{len(base):,} vectors of {args.dim}-d, {len(queries)} queries, filters admit "
          + ", ".join(f"{len(a):,}" for a in filters.values())
          + f" (exact below {EXACT_SHARE:.0%}); ground truth in {time.perf_counter() - started:.0f}s", flush=True)
    rows = []
    for kind in args.kinds.split(","):
        store, build_s = build(kind, args, base, ids)
        if args.threads == 1:
            serial_in_this_thread()
        row = {"kind": kind, "build_s": round(build_s, 1), "by_share": {}}
        if kind in SEARCH_SETTING:
            tuning = tune(store, tune_q, tune_truth, TARGETS[kind])
            store.spec = store.spec.with_params(**{tuning.setting: tuning.value})
            row["setting"] = {tuning.setting: tuning.value}
        measure(store, queries[:10], None)  # warm up
        for share in (1.0, *SHARES):
            found, times = measure(store, queries, None if share == 1.0 else bitmaps[share])
            full = float(np.mean((found >= 0).all(axis=1)))
            row["by_share"][str(share)] = {"p50_ms": round(1000 * float(np.median(times)), 3),
                                           "p95_ms": round(1000 * float(np.percentile(times, 95)), 3),
                                           "recall@10": round(recall(found, truths[share]), 4),
                                           "queries_with_k_results": full}
        unfiltered = row["by_share"]["1.0"]["p50_ms"]
        for share in SHARES:
            cell = row["by_share"][str(share)]
            cell["vs_unfiltered"] = round(cell["p50_ms"] / unfiltered, 2)
        rows.append(row)
        print(f"{kind:6s} build {build_s:6.1f}s {row.get('setting', '')}  " + "  ".join(
            f"{float(s):>6.1%}: {c['p50_ms']:7.2f} ms ({c.get('vs_unfiltered', 1.0):4.2f}x) R@10 {c['recall@10']:.3f}"
            for s, c in row["by_share"].items()), flush=True)
        del store
        gc.collect()
    print(json.dumps({"n": len(base), "dim": args.dim, "queries": len(queries), "threads": args.threads,
                      "results": rows, "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
