"""The bundled crossmodal-demo model: loads with no network and retrieves generated scenes it never saw."""

import json
import os
import subprocess
import sys

import pytest

from indexer.encoder import BUNDLED_WEIGHTS, default_pretrained

pytestmark = pytest.mark.slow

# Floors for a 200-image gallery (the 1,000-image floors are R@1 0.60 / R@5 0.95 / R@10 0.99;
# a smaller gallery has fewer look-alikes, so the bar here is higher). Measured values: README.
FLOORS = {"R@1": 0.70, "R@5": 0.97, "R@10": 0.99}


def crossmodal(*args, env):
    proc = subprocess.run([sys.executable, "-m", "retrieval", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_bundled_weights_ship_with_the_package():
    weights = BUNDLED_WEIGHTS["crossmodal-demo"]
    assert weights.is_file() and weights.stat().st_size <= 20 * 2**20
    assert default_pretrained("crossmodal-demo") == str(weights)


def test_demo_model_offline_reaches_the_recall_floors(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CROSSMODAL_INDEX": str(tmp_path / "i")}
    crossmodal("data", "synth", "--out", tmp_path / "c", "--n", 200, "--seed", 4242, "--test", 200, "--val", 0, env=env)
    summary = json.loads(crossmodal("index", tmp_path / "c" / "test", "--model", "crossmodal-demo", "--no-progress",
                                    "--json", env=env))
    assert summary["encoded_images"] == 200
    result = json.loads(crossmodal("eval", "--json", env=env))
    assert result["model"].startswith("crossmodal-demo")
    for direction in ("text_to_image", "image_to_text"):
        for key, floor in FLOORS.items():
            assert result[direction]["index"][key] >= floor, (direction, key, result[direction]["index"])
