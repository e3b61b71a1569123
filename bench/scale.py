"""An index bigger than RAM would allow: IVF-PQ built in shards, merged on disk, searched memory-mapped.

5M synthetic 128-d vectors (clustered, of low intrinsic dimension, as CLIP embeddings are; the corpus
model of bench/ann.py) are written to a file in chunks, then:

- build (its own process): train on a 200,000-vector sample, add the vectors shard by shard, merge the
  lists into one list file (``VectorStore.build_sharded``, what ``reindex --shards`` does from the catalog);
- search (its own process, so that its peak RSS is the search's alone): load the index mapped, search
  1,000 queries, re-rank each query's candidates with full vectors read from the vector file by
  ``pread`` (as the catalog is read in an index: the page cache, not this process's memory);
- exact top-10 for the same queries, streamed over the file, as ground truth.

Figures: build seconds and peak RSS, index bytes, search peak RSS against the full vectors' size
(target <= 25 %), recall@10 (target >= 0.9) and queries/s for each nprobe. Last line: JSON.

    python bench/scale.py                          # 5M x 128-d: about 5 minutes on 2 cores, 3 GB of disk
    python bench/scale.py --n 200000 --nlist 512   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from indexer.spec import IndexSpec  # noqa: E402
from indexer.vectors import VectorStore, streamed_top_k  # noqa: E402

K, CHUNK = 10, 250_000


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def generate(path: Path, n: int, dim: int, queries: int, seed: int = 0) -> np.ndarray:
    """Write n corpus vectors to ``path`` (.npy) chunk by chunk; return the queries (bench/ann.py's model)."""
    rng = np.random.default_rng(seed)
    latent, topics = 48, 2_000
    basis = np.linalg.qr(rng.standard_normal((dim, latent + 2)))[0]
    lift, image_gap, text_gap = basis[:, :latent].T, basis[:, latent], basis[:, latent + 1]
    centres = rng.standard_normal((topics, latent)).astype(np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for start in range(0, n, CHUNK):
        rows = min(CHUNK, n - start)
        z = centres[rng.integers(0, topics, rows)] + 0.8 * rng.standard_normal((rows, latent), dtype=np.float32)
        out[start:start + rows] = unit(z @ lift + 0.05 * rng.standard_normal((rows, dim), dtype=np.float32)
                                       + 3.0 * image_gap)
    out.flush()
    del out
    zq = centres[rng.integers(0, topics, queries)] + rng.standard_normal((queries, latent), dtype=np.float32)
    return unit(zq @ lift + 0.12 * rng.standard_normal((queries, dim), dtype=np.float32) + 3.0 * text_gap)


def memory() -> dict:
    """This process's peak and current resident memory (MiB), anonymous and file-backed (mapped) apart."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[name] = round(int(value.split()[0]) / 1024, 1)
    return fields


def spec_of(args) -> IndexSpec:
    return IndexSpec("ivfpq", params={"shards": args.shards, "nlist": args.nlist, "m": args.pq_bytes,
                                      "opq": False, "rerank": args.rerank})


def build(args) -> dict:
    base = np.load(args.work / "base.npy", mmap_mode="r")
    rng = np.random.default_rng(1)
    sample = np.asarray(base[np.sort(rng.choice(len(base), min(len(base), 200_000), replace=False))])
    store = VectorStore.empty(spec_of(args), base.shape[1])
    parts = np.array_split(np.arange(len(base)), args.shards)
    shards = ([(np.arange(s, min(s + CHUNK, p[-1] + 1)), np.asarray(base[s:min(s + CHUNK, p[-1] + 1)]))
               for s in range(p[0], p[-1] + 1, CHUNK)] for p in parts)  # lists built one shard at a time
    started = time.perf_counter()
    store.build_sharded(sample, len(base), (iter(s) for s in shards), args.work / "vectors.faiss")
    store.save(args.work / "vectors.faiss")
    files = [args.work / "vectors.faiss", *args.work.glob("vectors.*.ivfdata")]
    return {"seconds": round(time.perf_counter() - started, 1), "index_bytes": sum(f.stat().st_size for f in files),
            "memory_mib": memory()}


def search(args) -> dict:
    queries = np.load(args.work / "queries.npy")
    truth = np.load(args.work / "truth.npy")
    header = np.load(args.work / "base.npy", mmap_mode="r")
    dim, offset = header.shape[1], header.offset
    del header
    fd = os.open(args.work / "base.npy", os.O_RDONLY)

    def full_vectors(ids: np.ndarray) -> np.ndarray:  # the candidates' rows only, not a map of the whole file
        row = dim * 4
        return np.stack([np.frombuffer(os.pread(fd, row, offset + int(i) * row), np.float32) for i in ids])

    store = VectorStore.load(args.work / "vectors.faiss", spec_of(args), dim)
    store.exact = full_vectors
    loaded = memory()
    results = []
    for nprobe in args.nprobe:
        started = time.perf_counter()
        found = np.concatenate([store.search(queries[i:i + 100], K, nprobe=nprobe)[1]
                                for i in range(0, len(queries), 100)])
        seconds = time.perf_counter() - started
        recall = float(np.mean([len(np.intersect1d(f, t)) / K for f, t in zip(found, truth)]))
        results.append({"nprobe": nprobe, "recall_at_10": round(recall, 4),
                        "queries_per_s": round(len(queries) / seconds, 1)})
    os.close(fd)
    return {"after_load_mib": loaded, "memory_mib": memory(), "runs": results}


def stage(name: str, args) -> dict:
    """Run one stage in a fresh process: its peak RSS is that stage's alone."""
    command = [sys.executable, __file__, "--stage", name, "--work", str(args.work), "--shards", str(args.shards),
               "--nlist", str(args.nlist), "--pq-bytes", str(args.pq_bytes), "--rerank", str(args.rerank),
               "--nprobe", *map(str, args.nprobe)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--nlist", type=int, default=4096)
    parser.add_argument("--pq-bytes", type=int, default=32)
    parser.add_argument("--rerank", type=int, default=100)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--work", type=Path, default=None, help="folder for the vectors and the index [a temp dir]")
    parser.add_argument("--stage", choices=("build", "search"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(build(args) if args.stage == "build" else search(args)))
        return
    with tempfile.TemporaryDirectory(prefix="crossmodal-scale-", dir=args.work) as tmp:
        args.work = Path(tmp)
        started = time.perf_counter()
        queries = generate(args.work / "base.npy", args.n, args.dim, args.queries)
        np.save(args.work / "queries.npy", queries)
        generated = time.perf_counter() - started
        base = np.load(args.work / "base.npy", mmap_mode="r")
        batches = ((np.arange(s, min(s + CHUNK, args.n)), np.asarray(base[s:s + CHUNK]))
                   for s in range(0, args.n, CHUNK))
        started = time.perf_counter()
        np.save(args.work / "truth.npy", streamed_top_k(queries, batches, K)[1])
        exact_seconds = time.perf_counter() - started
        built = stage("build", args)
        searched = stage("search", args)
    full_mib = args.n * args.dim * 4 / 2**20
    peak = searched["memory_mib"]["VmHWM"]
    report = {"n": args.n, "dim": args.dim, "spec": spec_of(args).describe(), "full_vectors_mib": round(full_mib),
              "generate_s": round(generated, 1), "exact_s": round(exact_seconds, 1), "build": built,
              "search": searched, "search_peak_share": round(peak / full_mib, 3)}
    print(f"{args.n:,} x {args.dim}-d vectors = {full_mib:,.0f} MiB of full vectors; {report['spec']}")
    print(f"build: {built['seconds']} s, peak RSS {built['memory_mib']['VmHWM']:,.0f} MiB "
          f"(anonymous {built['memory_mib']['RssAnon']:,.0f} MiB; the rest is the mapped vector file read), "
          f"index {built['index_bytes'] / 2**20:,.0f} MiB on disk")
    print(f"search: peak RSS {peak:,.0f} MiB = {peak / full_mib:.1%} of the full vectors (target <= 25 %); "
          f"after load {searched['after_load_mib']['VmRSS']:,.0f} MiB")
    for run in searched["runs"]:
        print(f"  nprobe {run['nprobe']:>3}: recall@10 {run['recall_at_10']:.3f}, "
              f"{run['queries_per_s']:,.0f} queries/s")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
