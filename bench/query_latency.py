"""Query latency in-process, by part; and flat search of a million vectors against the memory floor.

1. Query latency: an index of generated images is built with ``--model`` (ViT-B-32 at random init by
   default: the default model's compute, no download), then a :class:`retrieval.Searcher` answers
   text queries and image queries one at a time, in fp32 and in the precision ``auto`` picks here.
   Each answer carries its own timings (encode, search, catalog); for image queries the encode part
   is split into decoding the file and the model by answering the same images already opened.
2. Flat search: ``--flat-n`` random unit vectors of 512 dimensions searched one query at a time,
   top 10, by faiss's own flat scan (``IndexFlatIP.search``) and through crossmodal's flat index
   (``VectorStore``: one BLAS product below 20 queries). The floor is the time to read the vectors
   once from memory on every core (a multi-threaded sum over them); ratios are to that floor.

Medians of the queries; the last line printed is JSON.

    python bench/query_latency.py                          # ViT-B-32, 200 images; 1M flat vectors
    python bench/query_latency.py --model crossmodal-demo --flat-n 100000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.demo_index import build_index  # noqa: E402
from indexer.encoder import resolve_device, resolve_precision  # noqa: E402
from indexer.hardware import bf16_units, cpu_name  # noqa: E402
from indexer.imageio import open_image  # noqa: E402
from indexer.spec import IndexSpec  # noqa: E402
from indexer.vectors import VectorStore  # noqa: E402
from retrieval.searcher import Searcher  # noqa: E402

TEXTS = ["a large red circle in the center on a gray background", "two shapes: a small blue star",
         "a green triangle at the top", "a photo of a dog on the beach", "yellow square", "sunset over mountains"]


def run_cli(*args) -> None:
    subprocess.run([sys.executable, "-m", "retrieval", *map(str, args)], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)


def median_ms(values: list[float]) -> float:
    return round(1e3 * statistics.median(values), 2)


def query_parts(index: Path, images: list[Path], precision: str, queries: int) -> dict:
    """Median ms of each part of text and image queries answered in this process."""
    with Searcher.open(index, precision=precision) as searcher:
        searcher.answer_text("warm up")  # loads the model and the vectors
        searcher.answer_image(images[0], to="image")
        text: dict[str, list[float]] = {"total": [], "encode": [], "search": [], "catalog": []}
        for i in range(queries):
            start = time.perf_counter()
            answer = searcher.answer_text(f"{TEXTS[i % len(TEXTS)]} {i}")
            text["total"].append(time.perf_counter() - start)
            for part in ("encode", "search", "catalog"):
                text[part].append(answer.timings.get(part, 0.0))
        image: dict[str, list[float]] = {"total": [], "decode": [], "encode": [], "search": [], "catalog": []}
        for i in range(queries):
            path = images[i % len(images)]
            opened = open_image(path, searcher.encoder.image_size)  # the model's share: the same image, opened
            start = time.perf_counter()
            answer = searcher.answer_image(path, to="image")
            image["total"].append(time.perf_counter() - start)
            model = searcher.answer_image(opened, to="image").timings["encode"]
            image["decode"].append(max(0.0, answer.timings["encode"] - model))
            image["encode"].append(model)
            for part in ("search", "catalog"):
                image[part].append(answer.timings.get(part, 0.0))
        precision_used = searcher.encoder.precision
    out = {}
    for name, parts in (("text", text), ("image", image)):
        medians = {part: median_ms(values) for part, values in parts.items()}
        total = medians["total"]
        out[name] = {"ms": medians, "share": {part: round(ms / total, 3) for part, ms in medians.items()
                                              if part != "total"}}
    out["precision"] = precision_used
    return out


def per_query_ms(search, queries: np.ndarray) -> float:
    search(queries[:1])  # warm-up
    times = []
    for q in queries[1:]:
        start = time.perf_counter()
        search(q[None])
        times.append(time.perf_counter() - start)
    return median_ms(times)


def flat_search(n: int, dim: int, queries: int, rounds: int) -> dict:
    import faiss

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    qs = rng.standard_normal((queries + 1, dim), dtype=np.float32)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    store = VectorStore.empty(IndexSpec(), dim)
    store.add(np.arange(n, dtype=np.int64), vectors)
    own = faiss.IndexFlatIP(dim)
    own.add(vectors)
    cores = os.cpu_count() or 1
    parts = np.array_split(vectors, cores)
    with ThreadPoolExecutor(cores) as pool:
        def read_once(_q) -> None:
            list(pool.map(lambda part: part.sum(dtype=np.float32), parts))

        ways = {"floor": read_once, "faiss_flat_scan": lambda q: own.search(q, 10),
                "crossmodal_flat": lambda q: store.search(q, 10)}
        measured: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(rounds):  # alternating, best of the rounds: noise only slows a run down
            for name, way in ways.items():
                measured[name].append(per_query_ms(way, qs))
    best = {name: min(values) for name, values in measured.items()}
    return {"vectors": n, "dim": dim, "bytes": int(vectors.nbytes), "ms": best,
            "read_gb_per_s": round(vectors.nbytes / best["floor"] / 1e6, 1),
            "ratio_to_floor": {name: round(ms / best["floor"], 2) for name, ms in best.items() if name != "floor"},
            "faiss_threads": faiss.omp_get_max_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default=None, help="default: 'none' for open_clip models, the bundled "
                                                           "weights for crossmodal-demo")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--flat-n", type=int, default=1_000_000, help="0 skips the flat search part")
    parser.add_argument("--flat-dim", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json-out", type=Path, help="also write the JSON line to this file")
    args = parser.parse_args()
    pretrained = args.pretrained or (None if args.model == "crossmodal-demo" else "none")
    auto = resolve_precision("auto", resolve_device("auto"))
    print(f"cpu: {cpu_name()}, {os.cpu_count()} cores, bf16 units: {', '.join(bf16_units()) or 'none'}; "
          f"auto precision: {auto}")
    result: dict = {"model": args.model, "cpu": cpu_name(), "auto_precision": auto}
    with tempfile.TemporaryDirectory() as tmp:
        index = build_index(Path(tmp), args.images, 5, run_cli, args.model, pretrained)
        images = sorted((Path(tmp) / "corpus" / "test").glob("*.jpg"))[:10]
        for precision in dict.fromkeys(("fp32", auto)):
            parts = query_parts(index, images, precision, args.queries)
            result[f"queries_{precision}"] = parts
            for name in ("text", "image"):
                shares = ", ".join(f"{p} {ms} ms ({parts[name]['share'][p]:.0%})"
                                   for p, ms in parts[name]["ms"].items() if p != "total")
                print(f"{precision} {name} query: {parts[name]['ms']['total']} ms = {shares}")
    if args.flat_n:
        flat = flat_search(args.flat_n, args.flat_dim, args.queries, args.rounds)
        result["flat"] = flat
        print(f"flat {args.flat_n} x {args.flat_dim}, one query at a time: floor {flat['ms']['floor']} ms "
              f"({flat['read_gb_per_s']} GB/s); faiss's scan {flat['ms']['faiss_flat_scan']} ms "
              f"({flat['ratio_to_floor']['faiss_flat_scan']}x); crossmodal {flat['ms']['crossmodal_flat']} ms "
              f"({flat['ratio_to_floor']['crossmodal_flat']}x)")
    print(json.dumps(result))
    if args.json_out:
        args.json_out.write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
