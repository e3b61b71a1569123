"""Commands that need no model start without torch and open_clip (issue 12, "A fast CLI").

Each command runs in a fresh interpreter, as a user's would, against a small index built here with the fake
encoder; the test reads which heavy modules that interpreter ended up importing.
"""

import json
import shutil
import subprocess
import sys

import click
import pytest
from conftest import FakeEncoder, make_image

from indexer.pipeline import IndexOptions, update_index
from retrieval.cli import cli
from retrieval.evaluate import evaluate_index, save_run

HEAVY = ("torch", "open_clip", "ray", "psycopg")  # ray: --engine ray only; psycopg: a PostgreSQL catalog only

# Runs the CLI as `python -m retrieval` does, then writes its exit status and which of the modules named it loaded.
RUN_CLI = """
import json, runpy, sys

result_file, watched, args = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
sys.argv = ["crossmodal", *args]
try:
    runpy.run_module("retrieval", run_name="__main__")
    status = 0
except SystemExit as exc:
    status = exc.code or 0
with open(result_file, "w") as fh:
    json.dump({"status": status, "loaded": [m for m in watched if m in sys.modules]}, fh)
"""


def command_paths(group: click.Group, prefix: tuple[str, ...] = ()):
    """Every command and subcommand, e.g. ("data",), ("data", "synth"); new ones are checked as they come."""
    for name, command in sorted(group.commands.items()):
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from command_paths(command, (*prefix, name))


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    """Six images (two captions, one undecodable file) indexed with the fake encoder, and one saved eval run."""
    base = tmp_path_factory.mktemp("light")
    photos = base / "photos"
    for i in range(6):
        make_image(photos / f"img{i}.png", seed=i)
    (photos / "img0.txt").write_text("a first caption\nanother caption for img0\n")
    (photos / "bad.png").write_bytes(b"not an image")
    update_index(photos, base / "idx", FakeEncoder(), IndexOptions(workers=0, progress=False))
    save_run(base / "idx", evaluate_index(base / "idx"), "index")
    return base / "idx"


def run_cli(tmp_path, *args, timeout: float = 120) -> tuple[subprocess.CompletedProcess, dict]:
    result_file = tmp_path / "result.json"
    done = subprocess.run([sys.executable, "-c", RUN_CLI, str(result_file), json.dumps(HEAVY),
                           json.dumps([str(a) for a in args])], capture_output=True, text=True, cwd=tmp_path,
                          timeout=timeout)
    assert done.returncode == 0 and result_file.exists(), done.stderr
    return done, json.loads(result_file.read_text())


def run_light(tmp_path, *args) -> None:
    """Run ``crossmodal ARGS`` in a new interpreter; assert it succeeded and imported no heavy module."""
    done, result = run_cli(tmp_path, *args)
    command = "crossmodal " + " ".join(map(str, args))
    assert result["status"] == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    assert result["loaded"] == [], f"{command} imported {result['loaded']}"


@pytest.mark.parametrize("path", [(), *command_paths(cli)], ids=lambda p: " ".join(p) or "crossmodal")
def test_help_is_light(tmp_path, path):
    run_light(tmp_path, *path, "--help")


@pytest.mark.parametrize("args", [
    ["info"],
    ["info", "--json", "--skipped", "--warnings"],
    ["verify"],
    ["verify", "--json", "--no-files"],
    ["eval"],
    ["eval", "--history"],
    ["eval", "--history", "--json"],
    ["--version"],
], ids=" ".join)
def test_reading_commands_are_light(tmp_path, index, args):
    run_light(tmp_path, *args, *(["--index", index] if args[0] != "--version" else []))


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_export_is_light(tmp_path, index, fmt):
    run_light(tmp_path, "export", tmp_path / "emb", "--index", index, "--format", fmt)
    assert (tmp_path / "emb" / "img_emb").is_dir()


@pytest.mark.parametrize("args", [
    ["reindex", "--index-type", "hnsw"],
    ["verify", "--repair"],
    ["eval", "--save-run"],
], ids=" ".join)
def test_writing_commands_are_light(tmp_path, index, args):
    copy = shutil.copytree(index, tmp_path / "idx")
    run_light(tmp_path, *args, "--index", copy)


def test_data_synth_is_light(tmp_path):
    run_light(tmp_path, "data", "synth", "--out", tmp_path / "corpus", "--n", "4", "--test", "2", "--val", "0",
              "--size", "32")
    assert (tmp_path / "corpus").is_dir()


def test_a_command_that_loads_a_model_is_seen(tmp_path, index):
    """The check itself works: search loads the model the index names (open_clip does not know the fake
    encoder's name, so the search then fails)."""
    _, result = run_cli(tmp_path, "search", "x", "--index", index, timeout=300)
    assert result["status"] != 0 and result["loaded"] == ["torch", "open_clip"]
