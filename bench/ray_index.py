"""`crossmodal index` with --engine local and --engine ray on the same generated images, side by side.

    python bench/ray_index.py [--n 200] [--model crossmodal-demo] [--rounds 1]

Each engine indexes the corpus into a fresh index; the figure is images per second of the whole run
(Ray's start-up included: it is what a user waits for) and of its encode stage alone (for Ray: from
the first task to the last shard back). On a GPU machine the Ray engine uses one actor per GPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer import IndexOptions, update_index  # noqa: E402
from indexer.encoder import default_pretrained, load_encoder  # noqa: E402
from indexer.synth import write_corpus  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--model", default="crossmodal-demo")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    encoder = load_encoder(args.model, default_pretrained(args.model), args.device)
    with tempfile.TemporaryDirectory() as tmp:
        write_corpus(Path(tmp) / "corpus", n=args.n, seed=3, test=args.n, val=0, side=256)
        root = Path(tmp) / "corpus" / "test"
        print(f"{args.n} images ({args.model}, {encoder.device}), whole run and encode stage, images/s")
        for round_ in range(args.rounds):
            for engine in ("local", "ray"):
                started = time.perf_counter()
                summary = update_index(root, Path(tmp) / f"{engine}-{round_}", encoder,
                                       IndexOptions(engine=engine, sidecars=False))
                whole = time.perf_counter() - started
                stage = summary.stages.get("encode", 0) + summary.stages.get("decode", 0)
                print(f"  {engine:6} {summary.encoded_images / whole:8.1f}  {summary.encoded_images / stage:8.1f}"
                      f"   ({whole:.1f} s)")


if __name__ == "__main__":
    main()
