"""Evaluate on a Karpathy split (MSCOCO, Flickr30k, our generated corpus): index the split, then measure.

The split's images are indexed from ``images_root`` with the split's captions (sidecar files are
ignored) into an index of their own, named by the JSON, split and model so that a second run with
the same files and model reuses it: the incremental indexer then encodes nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from indexer import IndexOptions, update_index
from indexer.encoder import Encoder
from indexer.errors import SourceError
from indexer.layout import eval_cache_dir
from indexer.pairs import read_karpathy

from .evaluate import DEFAULT_KS, Evaluation, evaluate_index


@dataclass
class BenchmarkRun:
    index_dir: Path
    evaluation: Evaluation
    missing_images: int
    encoded_images: int


def default_eval_index(karpathy_json: Path, split: str, encoder: Encoder) -> Path:
    """Where a split's index lives by default: under :func:`indexer.layout.eval_cache_dir`."""
    identity = encoder.identity
    weights = identity.checkpoint_sha256[:12] if identity.checkpoint_sha256 else identity.pretrained
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{Path(karpathy_json).stem}-{split}-{identity.name}-{weights}")
    return eval_cache_dir() / name


def evaluate_karpathy(karpathy_json: Path, encoder: Encoder, *, images_root: Path | None = None,
                      split: str = "test", index_dir: Path | None = None, ks: Sequence[int] = DEFAULT_KS,
                      curve_k: int = 0, batch_size: int = 32, workers: int | None = None,
                      progress=None) -> BenchmarkRun:
    """``progress``: what :class:`indexer.IndexOptions` takes, a ``(stage, done, total)`` callable or None."""
    images_root = Path(images_root) if images_root else Path(karpathy_json).parent
    pairs = read_karpathy(Path(karpathy_json), images_root, split)
    present = [p for p in pairs if p.path.is_file()]
    if not present:
        raise SourceError(f"none of the {len(pairs)} images of split '{split}' exist under {images_root}; "
                          "pass the folder that holds them with --images-root")
    index_dir = Path(index_dir) if index_dir else default_eval_index(karpathy_json, split, encoder)
    index_dir.mkdir(parents=True, exist_ok=True)
    root = images_root.resolve()
    captions = index_dir / f"captions-{split}.jsonl"
    rels = [p.path.resolve().relative_to(root).as_posix() for p in present]
    new_text = "".join(json.dumps({"image": rel, "captions": list(p.captions)}) + "\n"
                       for rel, p in zip(rels, present))
    if not captions.is_file() or captions.read_text(encoding="utf-8") != new_text:
        captions.write_text(new_text, encoding="utf-8")
    options = IndexOptions(captions=(captions,), sidecars=False, only=frozenset(rels), batch_size=batch_size,
                           workers=workers, progress=progress)
    summary = update_index(root, index_dir, encoder, options)
    evaluation = evaluate_index(index_dir, ks, curve_k)
    return BenchmarkRun(index_dir, evaluation, len(pairs) - len(present), summary.encoded_images)
