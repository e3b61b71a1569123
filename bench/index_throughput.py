"""Indexing throughput: `crossmodal index` end to end versus the model alone.

Generates a folder of phone-sized JPEGs (12 MP, 1080p and 1024x768 in equal parts), runs
`crossmodal index` on it in a subprocess, then times the same model on already-preprocessed tensors
with the same batch size. End-to-end throughput is the number of images encoded divided by the
run's own indexing time (walk to final flush: everything but interpreter start and model load,
which `wall_seconds` includes). The last line printed is JSON.

    python bench/index_throughput.py                      # ViT-B-32 at random init, 300 images
    python bench/index_throughput.py --n 600 --device cuda --batch-size 256
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from indexer.encoder import load_encoder  # noqa: E402

SIZES = [(4032, 3024), (1920, 1080), (1024, 768)]


def photo_like(width: int, height: int, rng: np.random.Generator) -> bytes:
    """Smooth colour field plus sensor-like noise, so JPEG sizes resemble real photos (~3-4 MB at 12 MP)."""
    field = Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    noisy = np.asarray(field).astype(np.int16) + rng.integers(-20, 20, (height, width, 3), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_corpus(folder: Path, n: int, seed: int = 0) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(n):
        path = folder / f"photo_{i:05d}.jpg"
        if not path.exists():
            path.write_bytes(photo_like(*SIZES[i % len(SIZES)], rng))
        total += path.stat().st_size
    return total


def model_only(model: str, pretrained: str, device: str, batch_size: int, n: int) -> float:
    encoder = load_encoder(model, pretrained, device)
    pixels = torch.randn(batch_size, 3, encoder.image_size, encoder.image_size)
    encoder.encode_images(pixels)  # warm-up: allocations, cuDNN/oneDNN kernel choice
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    batches = max(1, n // batch_size)
    start = time.perf_counter()
    for _ in range(batches):
        encoder.encode_images(pixels)  # returns numpy, so each batch is synchronised
    return batches * batch_size / (time.perf_counter() - start)


def end_to_end(folder: Path, model: str, pretrained: str, device: str, batch_size: int,
               workers: int | None) -> dict:
    with tempfile.TemporaryDirectory() as index:
        cmd = [sys.executable, "-m", "retrieval", "index", str(folder), "--index", index, "--model", model,
               "--pretrained", pretrained, "--device", device, "--batch-size", str(batch_size), "--no-progress",
               "--json"]
        if workers is not None:
            cmd += ["--workers", str(workers)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"crossmodal index failed:\n{proc.stderr}")
    summary = json.loads(proc.stdout)
    summary["wall_seconds"] = round(wall, 2)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=300, help="number of JPEGs")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default="none",
                        help="weights do not change the speed; 'none' needs no download")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=2, help="alternating measurement rounds (best of each)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "crossmodal-bench-photos",
                        help="where the JPEGs are generated (kept and reused between runs)")
    args = parser.parse_args()

    folder = args.dir / f"n{args.n}"
    start = time.perf_counter()
    corpus_bytes = make_corpus(folder, args.n)
    print(f"corpus: {args.n} JPEGs, {corpus_bytes / 1e6:.0f} MB in {folder} ({time.perf_counter() - start:.1f}s)")
    print(f"cpus: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, cuda: {torch.cuda.is_available()}")

    # Shared machines drift by 10-20% from minute to minute. Alternate the two measurements and keep
    # the best of each: noise only ever slows a run down, so best-of compares like with like.
    e2e_rates, model_rates, summaries = [], [], []
    for round_ in range(1, args.rounds + 1):
        model_rates.append(model_only(args.model, args.pretrained, args.device, args.batch_size, args.n))
        summary = end_to_end(folder, args.model, args.pretrained, args.device, args.batch_size, args.workers)
        summaries.append(summary)
        e2e_rates.append(summary["encoded_images"] / summary["seconds"])
        print(f"round {round_}: model only {model_rates[-1]:.2f} images/s (batch {args.batch_size}); "
              f"crossmodal index {summary['encoded_images']} images in {summary['seconds']:.2f}s = "
              f"{e2e_rates[-1]:.2f} images/s (wall {summary['wall_seconds']:.2f}s with start-up); "
              f"stages {summary['stages']}")
    e2e, model_rate = max(e2e_rates), max(model_rates)
    summary = summaries[e2e_rates.index(e2e)]
    # Each round's own ratio too: neighbouring measurements share the machine's mood of the minute.
    round_ratios = sorted(e / m for e, m in zip(e2e_rates, model_rates))
    print(json.dumps({
        "model": args.model, "device": args.device, "images": summary["encoded_images"],
        "batch_size": args.batch_size, "end_to_end_images_per_s": round(e2e, 2),
        "model_only_images_per_s": round(model_rate, 2), "ratio": round(e2e / model_rate, 3),
        "round_ratios": [round(r, 3) for r in round_ratios],
        "median_round_ratio": round(float(np.median(round_ratios)), 3),
    }))


if __name__ == "__main__":
    main()
