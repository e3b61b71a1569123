"""recall@k on a COCO-5k-sized gallery (5,000 images x 25,000 captions, 512-d): time and peak memory.

The similarity matrix (500 MB as float32) is never built whole; this prints how long the metric
takes and the process's peak RSS, so a change that materialises it shows up. Last line: JSON.

    python bench/eval_scale.py [--images 5000 --captions-per-image 5 --dim 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from indexer.metrics import recall_at_k  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.images, args.dim), dtype=np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    owners = np.repeat(np.arange(args.images), args.captions_per_image)
    texts = images[owners] + 0.08 * rng.standard_normal((len(owners), args.dim), dtype=np.float32)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    result = recall_at_k(images, texts, owners)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    full_matrix_mb = args.images * len(owners) * 4 / 2**20
    print(f"{len(owners)} captions x {args.images} images: {seconds:.1f}s, peak RSS {peak:.0f} MB "
          f"(inputs loaded: {before:.0f} MB; a full similarity matrix alone would be {full_matrix_mb:.0f} MB)")
    print(json.dumps({"images": args.images, "captions": len(owners), "seconds": round(seconds, 2),
                      "peak_rss_mb": round(peak), "full_matrix_mb": round(full_matrix_mb),
                      "t2i_R@1": round(result["text_to_image"]["R@1"], 4),
                      "i2t_R@1": round(result["image_to_text"]["R@1"], 4)}))


if __name__ == "__main__":
    main()
