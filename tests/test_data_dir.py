"""The checkout's data/ folder (issue 14): where datasets, generated corpora and the eval cache go."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import FakeEncoder

import indexer
import indexer.layout
from indexer.layout import checkout_data_dir, data_dir, eval_cache_dir
from retrieval.cli import cli

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "data" / "fixtures" / "karpathy-tiny"


def fake_checkout(root: Path, name: str = "crossmodal-search", readme: bool = True) -> Path:
    """A folder laid out as our checkout is; returns its package directory."""
    (root / "indexer").mkdir(parents=True)
    (root / "setup.cfg").write_text(f"[metadata]\nname = {name}\nversion = 0.1.0\n")
    if readme:
        (root / "data").mkdir()
        (root / "data" / "README.md").write_text("# data/\n")
    return root / "indexer"


@pytest.fixture
def no_data_env(monkeypatch):
    monkeypatch.delenv("CROSSMODAL_DATA", raising=False)
    monkeypatch.delenv("CROSSMODAL_CACHE", raising=False)


@pytest.fixture
def installed(monkeypatch, no_data_env):
    """As from a wheel: no checkout, no environment variables."""
    monkeypatch.setattr(indexer.layout, "checkout_data_dir", lambda package_dir=None: None)


def test_a_checkout_has_its_data_folder(tmp_path):
    assert checkout_data_dir(fake_checkout(tmp_path / "repo")) == (tmp_path / "repo" / "data").resolve()


def test_not_a_checkout_of_ours_or_without_the_readme(tmp_path):
    assert checkout_data_dir(fake_checkout(tmp_path / "other", name="some-other-project")) is None
    assert checkout_data_dir(fake_checkout(tmp_path / "bare", readme=False)) is None
    (tmp_path / "broken" / "indexer").mkdir(parents=True)
    (tmp_path / "broken" / "setup.cfg").write_text("not [an ini file\n")
    assert checkout_data_dir(tmp_path / "broken" / "indexer") is None


def test_a_wheel_in_site_packages_has_none_even_inside_a_checkout(tmp_path):
    # a virtualenv inside a checkout: walking up from site-packages would reach the checkout's setup.cfg
    fake_checkout(tmp_path / "repo")
    package = tmp_path / "repo" / ".venv" / "lib" / "python3.11" / "site-packages" / "indexer"
    package.mkdir(parents=True)
    assert checkout_data_dir(package) is None


def test_this_checkout_is_found():
    if Path(indexer.__file__).resolve().parent.parent != REPO:
        pytest.skip("indexer is imported from an installed wheel, not from this checkout")
    assert checkout_data_dir() == REPO / "data"


def test_environment_names_another_data_folder(tmp_path, monkeypatch):
    assert data_dir({"CROSSMODAL_DATA": str(tmp_path / "d")}) == tmp_path / "d"
    monkeypatch.setattr(indexer.layout, "checkout_data_dir", lambda package_dir=None: tmp_path / "checkout")
    assert data_dir({"CROSSMODAL_DATA": ""}) == tmp_path / "checkout"  # set but empty: as unset
    monkeypatch.setenv("CROSSMODAL_DATA", str(tmp_path / "env"))
    assert data_dir() == tmp_path / "env"


def synth(*args):
    return CliRunner().invoke(cli, ["data", "synth", "--n", "4", "--test", "2", "--val", "0", "--size", "32",
                                    *map(str, args)], catch_exceptions=False)


def test_synth_without_out_writes_into_the_data_folder(tmp_path, monkeypatch, no_data_env):
    monkeypatch.setenv("CROSSMODAL_DATA", str(tmp_path / "data"))
    result = synth("--seed", 3)
    assert result.exit_code == 0, result.output
    corpus = tmp_path / "data" / "synth-4-seed3"
    assert len(json.loads((corpus / "dataset_synth.json").read_text())["images"]) == 4
    assert f"to {corpus}" in result.output  # says where it wrote
    again = synth("--seed", 4, "--json")
    assert json.loads(again.output)["out"] == str(tmp_path / "data" / "synth-4-seed4")


def test_synth_out_still_wins_over_the_data_folder(tmp_path, monkeypatch, no_data_env):
    monkeypatch.setenv("CROSSMODAL_DATA", str(tmp_path / "data"))
    result = synth("--out", tmp_path / "mine")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "mine" / "dataset_synth.json").is_file() and not (tmp_path / "data").exists()


def test_synth_without_out_or_data_folder_asks_for_out(tmp_path, monkeypatch, installed):
    monkeypatch.chdir(tmp_path)
    result = synth()
    assert result.exit_code == 2 and "--out" in result.output and "CROSSMODAL_DATA" in result.output
    assert list(tmp_path.iterdir()) == []


def test_eval_cache_prefers_its_variable_then_the_data_folder_then_home(tmp_path, monkeypatch, installed):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert eval_cache_dir() == tmp_path / "home" / ".cache" / "crossmodal" / "eval"
    monkeypatch.setattr(indexer.layout, "checkout_data_dir", lambda package_dir=None: tmp_path / "checkout")
    assert eval_cache_dir() == tmp_path / "checkout" / "cache" / "eval"
    monkeypatch.setenv("CROSSMODAL_DATA", str(tmp_path / "data"))
    assert eval_cache_dir() == tmp_path / "data" / "cache" / "eval"
    monkeypatch.setenv("CROSSMODAL_CACHE", str(tmp_path / "cache"))
    assert eval_cache_dir() == tmp_path / "cache" / "eval"


def test_eval_karpathy_caches_its_index_in_the_data_folder(tmp_path, monkeypatch, no_data_env):
    """The fixture, evaluated as data/README.md shows, leaves its index under <data>/cache/eval."""
    import indexer.pipeline
    import indexer.store
    from retrieval.benchmark import default_eval_index

    encoder = FakeEncoder()
    monkeypatch.setattr(indexer.store, "encoder_for", lambda *a, **k: encoder)
    monkeypatch.setattr(indexer.pipeline, "default_workers", lambda: 0)  # no decoder processes for 2 images
    monkeypatch.setenv("CROSSMODAL_DATA", str(tmp_path / "data"))
    karpathy = shutil.copytree(FIXTURE, tmp_path / "tiny") / "dataset_tiny.json"
    args = ["eval", "--karpathy", karpathy, "--images-root", karpathy.parent / "images", "--json"]
    result = CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    expected = tmp_path / "data" / "cache" / "eval" / "dataset_tiny-test-fake-none"
    assert default_eval_index(karpathy, "test", encoder) == expected
    assert (expected / "catalog.sqlite").is_file()
    assert json.loads(result.output)["counts"]["images"] == 2  # the fixture's test split


def test_data_is_ignored_but_its_readme_and_fixtures(tmp_path):
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["data/README.md", "data/fixtures/karpathy-tiny/dataset_tiny.json", "data/synth-4-seed0/x.jpg",
             "data/flickr30k/dataset_flickr30k.json", "data/cache/eval/x/catalog.sqlite"]
    done = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=REPO, capture_output=True, text=True)
    assert done.stdout.split() == paths[2:]
    assert (REPO / "data" / "README.md").is_file()
    assert sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file()) < 64 * 1024  # fixtures stay small
