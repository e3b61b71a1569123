"""The catalog on SQLite and on PostgreSQL side by side: writing image rows with their vectors in batches,
reading vectors back, a filter's ids and a keyword query.

    python bench/catalog.py --postgres postgresql://USER@HOST/DB [--n 100000] [--dim 512]

The database named is emptied first (its tables are dropped): give a scratch one. Without --postgres
a throwaway server is started with .ci/postgres (Debian's PostgreSQL 15). One process writes, as
`crossmodal index` does; the figures are rows per second and milliseconds per read.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.catalog import Catalog, ImageWrite  # noqa: E402
from indexer.filters import Filters, filtered_ids  # noqa: E402
from indexer.keywords import keyword_matches  # noqa: E402
from indexer.photometa import PhotoMeta  # noqa: E402

BATCH = 32  # what the pipeline commits per batch by default


def writes(n: int, dim: int, rng: np.random.Generator) -> list[ImageWrite]:
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    cameras = ["Canon", "Nikon", "Sony", "Apple"]
    return [ImageWrite(f"{i // 1000:04d}/IMG_{i:07d}.jpg", 1000 + i, i, f"h{i}", 4032, 3024, vector=vectors[i],
                       meta=PhotoMeta("JPEG", f"20{10 + i % 14}-06-01T12:00:00", cameras[i % 4], "X", 1))
            for i in range(n)]


def measure(location, rows: list[ImageWrite], dim: int) -> dict:
    catalog = Catalog(location)
    root = catalog.root_id("/photos")
    started = time.perf_counter()
    for start in range(0, len(rows), BATCH):
        catalog.write_images(root, rows[start:start + BATCH])
    write_s = time.perf_counter() - started
    ids = catalog.vector_ids("image")
    picks = np.random.default_rng(1).choice(ids, 1000, replace=False).tolist()
    started = time.perf_counter()
    catalog.vectors(picks, dim)
    fetch_ms = (time.perf_counter() - started) * 1e3
    started = time.perf_counter()
    admitted = filtered_ids(catalog, Filters(camera="canon", taken=("2015-01-01", "2019-12-31")), "image")
    filter_ms = (time.perf_counter() - started) * 1e3
    started = time.perf_counter()
    found = keyword_matches(catalog, "IMG_0000123", "image", 10)
    keyword_ms = (time.perf_counter() - started) * 1e3
    catalog.close()
    return {"rows/s written": len(rows) / write_s, "1,000 vectors read (ms)": fetch_ms,
            "filter ids (ms)": filter_ms, "admitted": len(admitted), "keyword query (ms)": keyword_ms,
            "keyword hits": len(found)}


def empty(url: str) -> None:
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", help="a scratch database (emptied); default: start a throwaway server")
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args()
    rows = writes(args.n, args.dim, np.random.default_rng(0))
    with tempfile.TemporaryDirectory() as tmp:
        server = None
        url = args.postgres
        if url is None:
            server = Path(tempfile.mkdtemp(prefix="crossmodal-bench-pg-"))  # in /tmp: the postgres user must reach it
            url = subprocess.run([str(Path(__file__).resolve().parents[1] / ".ci" / "postgres"), "start",
                                  str(server)], check=True, capture_output=True, text=True).stdout.strip()
        try:
            empty(url)
            results = {"sqlite": measure(Path(tmp) / "catalog.sqlite", rows, args.dim),
                       "postgresql": measure(url, rows, args.dim)}
        finally:
            if server is not None:
                subprocess.run([str(Path(__file__).resolve().parents[1] / ".ci" / "postgres"), "stop", str(server)])
                subprocess.run(["rm", "-rf", str(server)])
    print(f"{args.n:,} images, {args.dim}-d vectors, batches of {BATCH}, one writer"
          + ("; PostgreSQL: a throwaway server with fsync off" if args.postgres is None else ""))
    print(f"{'':28} {'sqlite':>12} {'postgresql':>12}")
    for key in results["sqlite"]:
        print(f"{key:28} {results['sqlite'][key]:12,.1f} {results['postgresql'][key]:12,.1f}")


if __name__ == "__main__":
    main()
