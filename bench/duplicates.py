"""Near-duplicate groups: precision and recall per threshold, and the time of the self-join at scale.

1. Quality: `--n` generated images plus one altered copy of each (resized, re-encoded, cropped or
   brightened, in turn; `indexer.synth.write_near_copies`), indexed with `--model` in a temp
   folder. For each threshold, over pairs of images: precision = true copy pairs among the pairs
   grouped together, recall = copy pairs grouped together among all copy pairs.
2. Speed: `--vectors` random unit vectors of `--dim` dimensions grouped by `linked_rows` (the exact
   k-nearest-neighbour self-join and union-find of `crossmodal duplicates`), timed.

    python bench/duplicates.py
    python bench/duplicates.py --model ViT-B-32 --pretrained laion2b_s34b_b79k --n 400 --vectors 0
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from indexer.store import IndexStore  # noqa: E402
from indexer.synth import write_near_copies  # noqa: E402
from retrieval.duplicates import find_groups, linked_rows  # noqa: E402

THRESHOLDS = (0.85, 0.9, 0.93, 0.95, 0.96, 0.97, 0.98, 0.99)


def crossmodal(*args) -> None:
    done = subprocess.run([sys.executable, "-m", "retrieval", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True)
    if done.returncode:
        sys.exit(f"crossmodal {' '.join(map(str, args))} failed:\n{done.stderr[-2000:]}")


def quality(n: int, model: str, pretrained: str | None, seed: int) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="crossmodal-dups-") as scratch:
        scratch = Path(scratch)
        crossmodal("data", "synth", "--out", scratch / "corpus", "--n", n, "--seed", seed, "--test", n, "--val", 0)
        photos = scratch / "photos"
        photos.mkdir()
        originals = sorted(p for p in (scratch / "corpus" / "test").iterdir() if p.suffix in (".jpg", ".png"))
        for path in originals:
            (photos / path.name).write_bytes(path.read_bytes())
        truth = {(o.name, c.name) for o, c, _ in write_near_copies(originals, photos / "copies", seed)}
        crossmodal("index", photos, "--index", scratch / "index", "--model", model,
                   *(("--pretrained", pretrained) if pretrained else ()), "--no-progress")
        rows = []
        with IndexStore.open(scratch / "index", read_only=True) as store:
            for threshold in THRESHOLDS:
                grouped = set()
                for group in find_groups(store, threshold):
                    names = sorted(Path(p).name for p in group.paths.values())
                    grouped.update(itertools.combinations(names, 2))
                found = {pair for pair in grouped if pair in truth or pair[::-1] in truth}
                rows.append({"threshold": threshold, "pairs": len(grouped),
                             "precision": len(found) / len(grouped) if grouped else 1.0,
                             "recall": len(found) / len(truth)})
        return rows


def speed(count: int, dim: int, seed: int) -> tuple[float, int]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    copies = rng.choice(count, count // 100, replace=False)  # 1% near-copies of other rows
    vectors[copies] = vectors[(copies + 1) % count] + 0.005 * rng.standard_normal((len(copies), dim))  # cos ~0.99
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    started = time.perf_counter()
    groups = linked_rows(vectors, [None] * count, 0.97)
    return time.perf_counter() - started, len(groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="Generated originals (each gets one copy).")
    parser.add_argument("--model", default="crossmodal-demo")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--vectors", type=int, default=100_000, help="Random vectors for the timing (0: skip).")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("command: python " + " ".join(sys.argv))
    if args.n:
        print(f"\n{args.n} generated images + {args.n} altered copies, {args.model}:")
        print(f"{'threshold':>10} {'pairs':>7} {'precision':>10} {'recall':>8}")
        for row in quality(args.n, args.model, args.pretrained, args.seed):
            print(f"{row['threshold']:>10.2f} {row['pairs']:>7} {row['precision']:>10.3f} {row['recall']:>8.3f}")
    if args.vectors:
        seconds, groups = speed(args.vectors, args.dim, args.seed)
        print(f"\nself-join of {args.vectors:,} random {args.dim}-d vectors (1% near-copies): {seconds:.1f} s, "
              f"{groups:,} groups")


if __name__ == "__main__":
    main()
