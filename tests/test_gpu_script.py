"""bench/gpu.sh, the GPU machine's one prepared script, in its dry mode: the same steps on the CPU with the
tiny model, so that it is known to run (and to write its JSON) before a GPU machine is at hand."""

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_dry_run_writes_every_figure(tmp_path) -> None:
    proc = subprocess.run([str(ROOT / "bench" / "gpu.sh"), "--dry", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["dry"] is True and ("skipped" in result["tests"] or "passed" in result["tests"])
    index = result["index"]
    assert index["decode"] == "device"  # the nvJPEG path's code, on torchvision's CPU decoder here
    assert index["images"] == 12 and index["end_to_end_images_per_s"] > 0 and index["model_only_fp32_images_per_s"] > 0
    assert result["query"]["flat"]["ratio_to_floor"]["crossmodal_flat"] > 0
    assert result["query"]["queries_fp32"]["text"]["ms"]["total"] > 0
