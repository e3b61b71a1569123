"""Indexing speed: `crossmodal index` versus rclip 3.x on the same folder of photo-like JPEGs, offline.

rclip (https://github.com/yurijmikhalevich/rclip) runs ONNX Runtime on ONNX exports of open_clip's
ViT-B-32-256 (datacomp_s34b_b86k) that it normally downloads from the Hugging Face hub. This benchmark
needs no hub: `--setup` makes a venv outside the repo, installs rclip from PyPI, and exports a randomly
initialised ViT-B-32-256 to ONNX the way rclip's own scripts/convert_model.py does (same file names,
input/output names, dynamic batch, opset 18). Random weights cost the same compute as trained ones. The
files go to `RCLIP_VENV/rclip-models`, and every rclip run gets its own RCLIP_DATADIR (symlinks to those
files plus a fresh database), so a real rclip install in ~/.local/share/rclip is never touched.

Each round times both tools from process start to exit on the same JPEGs (make_corpus from
bench/index_throughput.py: 12 MP, 1080p and 1024x768 in equal parts), in alternating order; the best
of the rounds counts, since noise on a shared machine only slows a run down. rclip has no index-only
command, so it runs as `rclip --top 1 photo` in the folder: index the current directory, then one text
query (which loads its text tower). Besides whole-process rates, it reports indexing time without
start-up: crossmodal's own `seconds`, and rclip's `ensure_index` timed in-process (its image ONNX
session loaded before the clock starts, as crossmodal's model load is outside `seconds`). Note that
crossmodal's default model here is ViT-B-32 at 224 px (50 tokens), rclip's is 256 px (65 tokens);
`--model ViT-B-32-256` compares the same network. The last line printed is JSON.

    python bench/vs_rclip.py --setup                        # once: venv, rclip, ONNX files (~2 min)
    python bench/vs_rclip.py                                # 300 images, 2 rounds
    python bench/vs_rclip.py --n 30 --rounds 1 --rclip-venv /work/rclip-venv
    python bench/vs_rclip.py --model ViT-B-32-256 --crossmodal-args="--precision auto"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.index_throughput import make_corpus, timed_index  # noqa: E402

RCLIP_VERSION = "3.3.0"
# Both as in rclip/model_download.py: rclip looks for RCLIP_DATADIR/MODEL_SUBDIR/{visual,textual}.onnx
# and RCLIP_DATADIR/TOKENIZER, and only goes to the hub for a file that is missing.
MODEL_SUBDIR = "ViT-B-32-256-datacomp_s34b_b86k"
TOKENIZER = "tokenizer/bpe_simple_vocab_16e6.txt.gz"
RCLIP_ARCH = "ViT-B-32-256"
# torch's ONNX exporter needs the onnx package, which crossmodal's venv does not have; installed
# --no-deps beside rclip's venv and put on PYTHONPATH only for the export, so neither venv changes.
EXPORT_DEPS = ["onnx", "ml_dtypes"]

# Stands in for the `rclip` console script (which calls rclip.main.main) and adds one stderr line
# with ensure_index's own time. Loading the session first moves no work, only the clock's start.
RCLIP_WRAPPER = """
import sys, time
from rclip import main as m
ensure_index = m.RClip.ensure_index
def timed(self, directory):
    self._model._session_visual_index
    start = time.perf_counter()
    ensure_index(self, directory)
    print(f"BENCH_INDEX_SECONDS {time.perf_counter() - start:.3f}", file=sys.stderr)
m.RClip.ensure_index = timed
m.main()
"""


def default_venv() -> Path:
    return Path(os.environ.get("CROSSMODAL_BENCH_RCLIP_VENV", "~/.cache/crossmodal-bench/rclip-venv")).expanduser()


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def models_dir(venv: Path) -> Path:
    return venv / "rclip-models"


def is_ready(venv: Path) -> bool:
    models = models_dir(venv)
    return (venv_python(venv).exists() and (models / TOKENIZER).is_file()
            and all((models / MODEL_SUBDIR / f).is_file() for f in ("visual.onnx", "textual.onnx")))


def rclip_env(datadir: Path) -> dict[str, str]:
    # HF_HUB_OFFLINE: should a file be missing, fail at once instead of waiting on the network.
    return {**os.environ, "RCLIP_DATADIR": str(datadir), "HF_HUB_OFFLINE": "1"}


class TextTower(torch.nn.Module):
    """The text side as its own module: rclip's textual.onnx maps tokens straight to features."""

    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(tokens)


def export_models(out: Path) -> None:
    """Random-weight ViT-B-32-256 towers to ONNX, exactly as rclip's scripts/convert_model.py exports them."""
    import open_clip

    warnings.simplefilter("ignore")  # the legacy exporter's deprecation notes, which rclip's script silences too
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms(RCLIP_ARCH, pretrained=None)
    model.eval()
    towers = {"visual.onnx": (model.visual, torch.randn(1, 3, 256, 256)),
              "textual.onnx": (TextTower(model), torch.zeros(1, 77, dtype=torch.long))}
    (out / MODEL_SUBDIR).mkdir(parents=True, exist_ok=True)
    torch.backends.mha.set_fastpath_enabled(False)  # rclip's script does too: the fused path has no ONNX export
    for name, (tower, dummy) in towers.items():
        torch.onnx.export(tower, (dummy,), str(out / MODEL_SUBDIR / name), input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                          opset_version=18, dynamo=False)
    (out / TOKENIZER).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz", out / TOKENIZER)


def setup(venv: Path) -> None:
    py = venv_python(venv)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    if subprocess.run([py, "-c", f"import importlib.metadata as m; assert m.version('rclip') == '{RCLIP_VERSION}'"],
                      capture_output=True).returncode != 0:
        subprocess.run([py, "-m", "pip", "install", "-q", f"rclip=={RCLIP_VERSION}"], check=True)
    models = models_dir(venv)
    if not is_ready(venv):
        deps = venv / "export-deps"
        if not (deps / "onnx").is_dir():
            subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--target", str(deps), *EXPORT_DEPS],
                           check=True)
        # Export beside the target and rename, so an interrupted setup leaves no half-written .onnx
        # that rclip's "file exists" check would accept.
        partial = models.with_name(models.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(deps), os.environ.get("PYTHONPATH", "")])}
        subprocess.run([sys.executable, __file__, "--export-models", str(partial)], check=True, env=env, cwd=ROOT)
        shutil.rmtree(models, ignore_errors=True)
        partial.rename(models)
    # Smoke test through rclip's own loader: file names, tensor names and dtypes all as it expects.
    check = ("from rclip import model; import numpy as np; m = model.Model(); m.ensure_downloaded(); "
             "print(m.compute_text_features(['a dog']).shape, "
             "m.compute_preprocessed_image_features([np.zeros((3, 256, 256), np.float32)]).shape)")
    out = subprocess.run([py, "-c", check], env=rclip_env(models), capture_output=True, text=True, check=True)
    print(f"rclip {RCLIP_VERSION} ready in {venv} (random {RCLIP_ARCH} in {models}); features {out.stdout.strip()}")


def run_rclip(venv: Path, folder: Path, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="rclip-data-") as datadir:
        models = models_dir(venv)
        for part in (MODEL_SUBDIR, Path(TOKENIZER).parent.name):  # shared model files, fresh database
            os.symlink(models / part, Path(datadir) / part)
        cmd = [str(venv_python(venv)), "-c", RCLIP_WRAPPER, *extra, "--top", "1", "photo"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=folder, env=rclip_env(Path(datadir)))
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"rclip failed:\n{proc.stderr}")
        with sqlite3.connect(Path(datadir) / "db.sqlite3") as db:
            images = db.execute("SELECT COUNT(*) FROM images WHERE deleted IS NULL").fetchone()[0]
    seconds = next(float(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("BENCH_INDEX"))
    return {"images": images, "wall": wall, "seconds": seconds}


def run_crossmodal(folder: Path, model: str, pretrained: str, extra: list[str]) -> dict:
    summary = timed_index(folder, ["--model", model, "--pretrained", pretrained, *extra])
    return {"images": summary["encoded_images"], "wall": summary["wall_seconds"], "seconds": summary["seconds"]}


def rate(run: dict, key: str) -> float:
    return run["images"] / run[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=300, help="number of JPEGs")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (best of each)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "crossmodal-bench-photos",
                        help="where the JPEGs are generated (kept and reused between runs)")
    parser.add_argument("--rclip-venv", type=Path, default=default_venv(),
                        help="rclip's own venv, outside the repo; made by --setup (or on first run) "
                             "[env var: CROSSMODAL_BENCH_RCLIP_VENV]")
    parser.add_argument("--setup", action="store_true", help="prepare the rclip venv and model files, then exit")
    parser.add_argument("--model", default="ViT-B-32", help="crossmodal's model (rclip's is ViT-B-32-256)")
    parser.add_argument("--pretrained", default="none", help="weights do not change the speed")
    parser.add_argument("--crossmodal-args", default="", help="extra flags for crossmodal index, one string")
    parser.add_argument("--rclip-args", default="", help="extra flags for rclip, e.g. '-b 32', one string")
    parser.add_argument("--export-models", type=Path, help=argparse.SUPPRESS)  # setup's export subprocess
    args = parser.parse_args()

    if args.export_models:
        return export_models(args.export_models)
    venv = args.rclip_venv.expanduser().absolute()
    if args.setup or not is_ready(venv):
        setup(venv)
        if args.setup:
            return

    folder = (args.dir / f"n{args.n}").absolute()
    corpus_bytes = make_corpus(folder, args.n)
    print(f"corpus: {args.n} JPEGs, {corpus_bytes / 1e6:.0f} MB in {folder}; cpus: {os.cpu_count()}")
    tools = {
        "rclip": lambda: run_rclip(venv, folder, shlex.split(args.rclip_args)),
        "crossmodal": lambda: run_crossmodal(folder, args.model, args.pretrained, shlex.split(args.crossmodal_args)),
    }
    runs: dict[str, list[dict]] = {name: [] for name in tools}
    for round_ in range(1, args.rounds + 1):
        # Swap the order every round so a drift in the machine's speed does not favour one tool.
        for name in list(tools) if round_ % 2 else list(tools)[::-1]:
            run = tools[name]()
            if run["images"] != args.n:
                sys.exit(f"{name} indexed {run['images']} of {args.n} images")
            runs[name].append(run)
            print(f"round {round_}: {name:10s} {rate(run, 'wall'):6.2f} images/s whole process "
                  f"({run['wall']:.1f}s), {rate(run, 'seconds'):6.2f} images/s indexing only ({run['seconds']:.1f}s)")
    best = {name: max(rate(r, "wall") for r in rs) for name, rs in runs.items()}
    best_indexing = {name: max(rate(r, "seconds") for r in rs) for name, rs in runs.items()}
    print(json.dumps({
        "images": args.n, "rounds": args.rounds, "rclip": f"{RCLIP_VERSION} {RCLIP_ARCH} onnxruntime",
        "crossmodal_model": args.model, "crossmodal_args": args.crossmodal_args,
        "rclip_images_per_s": round(best["rclip"], 2), "crossmodal_images_per_s": round(best["crossmodal"], 2),
        "ratio": round(best["crossmodal"] / best["rclip"], 3),
        "rclip_indexing_images_per_s": round(best_indexing["rclip"], 2),
        "crossmodal_indexing_images_per_s": round(best_indexing["crossmodal"], 2),
        "indexing_ratio": round(best_indexing["crossmodal"] / best_indexing["rclip"], 3),
        # Each round's own ratio too: neighbouring runs share the machine's mood of the minute.
        "round_ratios": [round(rate(c, "wall") / rate(r, "wall"), 3)
                         for c, r in zip(runs["crossmodal"], runs["rclip"])],
    }))


if __name__ == "__main__":
    main()
