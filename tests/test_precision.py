"""Precision: ``auto`` follows the CPU's flags, bf16 vectors stay within the stated tolerance of fp32 ones,
and the catalog records what each vector was made in, mixing allowed."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from conftest import make_image
from test_e2e import crossmodal

from indexer import hardware
from indexer.encoder import default_pretrained, load_encoder, resolve_precision
from indexer.errors import CrossmodalError
from indexer.pipeline import IndexOptions, update_index
from retrieval.searcher import Searcher

CPU = torch.device("cpu")
# The README's promise (Performance): a bf16 vector's cosine to the fp32 vector of the same input.
MIN_COSINE = 0.999


def test_cpu_flags_are_read_and_bf16_units_named() -> None:
    flags = hardware.cpu_flags()
    if sys.platform.startswith("linux"):
        assert flags, "a Linux CPU reports its flags in /proc/cpuinfo"
    assert hardware.bf16_units(frozenset({"avx2", "amx_bf16", "avx512_bf16"})) == ["amx_bf16", "avx512_bf16"]
    assert hardware.bf16_units(frozenset({"avx2", "fma"})) == []


@pytest.mark.parametrize(("units", "expected"), [(["amx_bf16"], "bf16"), ([], "fp32")])
def test_auto_takes_bf16_only_where_the_cpu_has_units(monkeypatch, units, expected) -> None:
    monkeypatch.setattr("indexer.encoder.bf16_units", lambda: units)
    assert resolve_precision("auto", CPU) == expected
    # An explicit choice holds on any CPU: bf16 without units is slow, not wrong.
    assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("bf16", CPU) == "bf16"


def test_unknown_precision_is_one_clear_error() -> None:
    with pytest.raises(CrossmodalError, match="unknown precision 'fp16': use auto, fp32, bf16"):
        resolve_precision("fp16", CPU)


def _scenes(n: int) -> list:
    from PIL import Image

    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)).resize((160, 120)) for _ in range(n)]


@pytest.mark.parametrize("model", ["crossmodal-tiny", "crossmodal-demo"])
def test_bf16_vectors_match_fp32_within_the_stated_cosine(model) -> None:
    pretrained = "none" if model == "crossmodal-tiny" else default_pretrained(model)  # the demo: trained weights
    fp32 = load_encoder(model, pretrained, "cpu", "fp32")
    bf16 = load_encoder(model, pretrained, "cpu", "bf16")
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    images = _scenes(12)
    texts = ["a red circle", "two blue stars on a gray background", "a photo of a dog", "x"]
    for a, b in ((fp32.encode_pil(images), bf16.encode_pil(images)),
                 (fp32.encode_texts(texts), bf16.encode_texts(texts))):
        assert a.dtype == b.dtype == np.float32  # vectors are stored fp32 whatever the model computed in
        cosine = np.sum(a * b, axis=1)
        assert cosine.min() >= MIN_COSINE, cosine
        assert np.abs(cosine - 1).max() > 0  # bf16 really ran: not bit-equal to fp32


def test_catalog_records_precision_and_allows_mixing(tmp_path) -> None:
    root, index = tmp_path / "photos", tmp_path / "idx"
    for i in range(4):
        make_image(root / f"a{i}.png", seed=i)
    options = IndexOptions(workers=0, progress=False, batch_size=4)
    bf16 = load_encoder("crossmodal-tiny", "none", "cpu", "bf16")
    assert update_index(root, index, bf16, options).precision == "bf16"
    for i in range(4, 6):
        make_image(root / f"b{i}.png", seed=i)
    fp32 = load_encoder("crossmodal-tiny", "none", "cpu", "fp32")
    summary = update_index(root, index, fp32, options)
    assert (summary.added, summary.encoded_images, summary.precision) == (2, 2, "fp32")
    # bf16 and fp32 vectors search together: a bf16 query finds the fp32-encoded image, and back.
    for query_encoder, image in ((bf16, "b5.png"), (fp32, "a1.png")):
        with Searcher.open(index, encoder=query_encoder) as searcher:
            hits = searcher.search_image(root / image, to="image", k=1)
        assert hits[0].path == str((root / image).resolve()) and hits[0].score > 0.999
    info = crossmodal("info", "--index", index)
    assert "(made in 4 bf16, 2 fp32)" in info.stdout, info.stdout + info.stderr
    assert json.loads(crossmodal("info", "--index", index, "--json").stdout)["precisions"] == {"bf16": 4, "fp32": 2}


def test_precision_flag_and_env_var_reach_the_index_command(tmp_path) -> None:
    root = tmp_path / "photos"
    for i in range(3):
        make_image(root / f"p{i}.png", seed=i)
    base = ["index", root, "--model", "crossmodal-tiny", "--pretrained", "none", "--device", "cpu", "--no-progress",
            "--json", "--index"]
    assert json.loads(crossmodal(*base, tmp_path / "a", "--precision", "bf16").stdout)["precision"] == "bf16"
    assert json.loads(crossmodal(*base, tmp_path / "b", env={"CROSSMODAL_PRECISION": "fp32"}).stdout)["precision"] \
        == "fp32"
    bad = crossmodal(*base, tmp_path / "c", "--precision", "fp8")
    assert bad.returncode != 0 and "fp8" in bad.stderr and "fp32" in bad.stderr


@pytest.mark.slow
def test_demo_eval_moves_at_most_half_a_point_in_bf16(tmp_path) -> None:
    """The README's promise: recall@k on the demo corpus in bf16 within 0.5 points of fp32."""
    corpus = tmp_path / "demo"
    made = crossmodal("data", "synth", "--out", corpus, "--n", 300, "--seed", 77, "--test", 300, "--val", 0)
    assert made.returncode == 0, made.stderr
    runs = {}
    for precision in ("fp32", "bf16"):
        proc = crossmodal("eval", "--karpathy", corpus / "dataset_synth.json", "--model", "crossmodal-demo",
                          "--precision", precision, "--json")
        assert proc.returncode == 0, proc.stderr
        runs[precision] = json.loads(proc.stdout)
    recalls = {p: _recalls(run) for p, run in runs.items()}
    assert recalls["fp32"].keys() == recalls["bf16"].keys() and len(recalls["fp32"]) >= 6
    for key, value in recalls["fp32"].items():
        assert abs(recalls["bf16"][key] - value) <= 0.005, (key, value, recalls["bf16"][key])


def _recalls(run: dict) -> dict[str, float]:
    """Exact-search R@k of both directions, keyed like 'text_to_image R@5'."""
    return {f"{direction} {key}": value for direction in ("text_to_image", "image_to_text")
            for key, value in run[direction]["exact"].items() if key.startswith("R@")}
