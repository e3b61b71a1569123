"""bench/vs_rclip.py's cheap parts: its rclip wrapper and readiness check, and (where a prepared rclip venv
exists) that the installed rclip still reads its model files and database where the benchmark puts them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import vs_rclip  # noqa: E402


def test_wrapper_compiles() -> None:
    compile(vs_rclip.RCLIP_WRAPPER, "<rclip wrapper>", "exec")


def test_ready_only_with_every_model_file(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").touch()
    models = vs_rclip.models_dir(tmp_path)
    (models / vs_rclip.MODEL_SUBDIR).mkdir(parents=True)
    (models / vs_rclip.TOKENIZER).parent.mkdir()
    for name in ("visual.onnx", "textual.onnx", vs_rclip.TOKENIZER):
        assert not vs_rclip.is_ready(tmp_path)
        (models / (name if "/" in name else f"{vs_rclip.MODEL_SUBDIR}/{name}")).touch()
    assert vs_rclip.is_ready(tmp_path)


def test_wrapper_reports_index_time(tmp_path: Path) -> None:
    """The wrapper against a stand-in rclip.main with the two attributes it relies on."""
    (tmp_path / "rclip").mkdir()
    (tmp_path / "rclip" / "__init__.py").touch()
    (tmp_path / "rclip" / "main.py").write_text(
        "class Model:\n    _session_visual_index = None\n"
        "class RClip:\n    _model = Model()\n    def ensure_index(self, directory): pass\n"
        "def main():\n    RClip().ensure_index('.')\n")
    proc = subprocess.run([sys.executable, "-c", vs_rclip.RCLIP_WRAPPER], cwd=tmp_path, capture_output=True,
                          text=True, check=True, env={"PYTHONPATH": str(tmp_path)})
    assert proc.stderr.startswith("BENCH_INDEX_SECONDS ")


@pytest.mark.skipif(not vs_rclip.is_ready(vs_rclip.default_venv()), reason="no rclip venv prepared by --setup")
def test_installed_rclip_matches_the_layout() -> None:
    """rclip's own constants: where it looks for the model files, and the hook the wrapper times."""
    check = (f"from rclip import main, model_download as d; assert d.MODEL_SUBDIR == {vs_rclip.MODEL_SUBDIR!r}; "
             f"assert d.TOKENIZER_VOCAB == {vs_rclip.TOKENIZER!r}; assert main.RClip.ensure_index")
    subprocess.run([str(vs_rclip.venv_python(vs_rclip.default_venv())), "-c", check], check=True)
