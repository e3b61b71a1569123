"""A real ``crossmodal serve`` process on a loopback port: start-up, the CLI through it, live updates, stop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "CROSSMODAL_RUNTIME_DIR": str(tmp_path / "run")}


def crossmodal(env, *args, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "retrieval", *map(str, args)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert not check or result.returncode == 0, result.stderr
    return result


def build(env, folder: Path) -> Path:
    crossmodal(env, "data", "synth", "--out", folder / "corpus", "--n", 24, "--seed", 9, "--test", 24, "--val", 0)
    crossmodal(env, "index", folder / "corpus" / "test", "--index", folder / "index", "--model",
               "crossmodal-demo", "--workers", 0, "--no-progress")
    return folder / "index"


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """An index the tests only read: 24 demo images, 3 captions each."""
    return build({**os.environ, "HF_HUB_OFFLINE": "1"}, tmp_path_factory.mktemp("shared"))


@pytest.fixture
def index(shared) -> Path:
    return shared


class Server:
    def __init__(self, env, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-m", "retrieval", "serve", "--port", str(self.port),
                                         *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.communicate()[1]
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2):
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("the server did not answer /healthz within 120 s")

    def get(self, path: str, headers: dict | None = None):
        request = urllib.request.Request(self.url + path, headers=headers or {})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def search(self, **body) -> dict:
        request = urllib.request.Request(self.url + "/api/search", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def stop(self, how: int = signal.SIGINT) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(how)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(), self.process.stderr.read()


@pytest.fixture
def serve(env):
    started = []

    def start(*args) -> Server:
        started.append(Server(env, *args))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def test_cli_search_goes_through_a_running_server_and_answers_the_same(index, env, serve, tmp_path):
    server = serve("--index", f"shapes={index}", "--cache-dir", tmp_path / "thumbs")
    before = crossmodal(env, "search", "a red circle", "--index", index, "-k", 5, "--json", "--no-server").stdout
    image = sorted((index.parent / "corpus" / "test").glob("*.png"))[0]
    before_image = crossmodal(env, "search", "--image", image, "--index", index, "--json", "--no-server").stdout
    filtered = ("--type", "png", "--in", "*/00000?.*", "--to", "image")
    before_filtered = [crossmodal(env, "search", *query, *filtered, "--index", index, "--json", "--no-server").stdout
                       for query in (["a red circle"], ["--image", image])]
    assert json.loads(before_filtered[0]) and all(h["path"].endswith(".png") for h in json.loads(before_filtered[1]))
    [record] = (tmp_path / "run").glob("server-*.json")
    assert json.loads(record.read_text())["indexes"] == {"shapes": str(index.resolve())}

    started = time.monotonic()
    through = crossmodal(env, "search", "a red circle", "--index", index, "-k", 5, "--json")
    assert through.stdout == before
    assert crossmodal(env, "search", "--image", image, "--index", index, "--json").stdout == before_image
    assert [crossmodal(env, "search", *query, *filtered, "--index", index, "--json").stdout
            for query in (["a red circle"], ["--image", image])] == before_filtered  # filters travel: JSON, multipart
    # Proof that it was the server: a query it has answered shows in its metrics, and no model was loaded here.
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
        assert 'crossmodal_requests_total{route="/api/search",status="200"} 4.0' in response.read().decode()
    assert time.monotonic() - started < 60

    code, log = server.stop()
    assert code == 0, log
    assert "ready in" in log and "model loaded in" in log
    assert not list((tmp_path / "run").glob("server-*.json"))  # gone with the server
    assert crossmodal(env, "search", "a red circle", "--index", index, "-k", 5, "--json").stdout == before


def test_answers_follow_an_indexer_working_beside_the_server(env, serve, tmp_path):
    index = build(env, tmp_path)  # its own: this test changes it
    server = serve("--index", index, "--cache-dir", tmp_path / "thumbs")
    photos = tmp_path / "corpus" / "test"
    first = sorted(photos.glob("*.png"))[0]
    query = {"text": "anything", "k": 100}
    assert len(server.search(**query)["hits"]) == 24
    shutil.copy(first, photos / "copy.png")
    crossmodal(env, "index", photos, "--index", index, "--no-progress")
    deadline = time.monotonic() + 10
    while len(server.search(**query)["hits"]) != 25:
        assert time.monotonic() < deadline, "the new image did not appear within 10 s"
        time.sleep(0.2)
    assert "copy.png" in [h["path"] for h in server.search(**query)["hits"]]
    (photos / "copy.png").unlink()
    first.unlink()
    crossmodal(env, "index", photos, "--index", index, "--no-progress")
    deadline = time.monotonic() + 10
    while len(server.search(**query)["hits"]) != 23:
        assert time.monotonic() < deadline, "removed images still answered after 10 s"
        time.sleep(0.2)
    assert server.get("/api/indexes")["indexes"][0]["counts"]["image"] == 23


def test_a_public_address_needs_a_token(index, env, serve, tmp_path):
    refused = crossmodal(env, "serve", "--index", index, "--host", "0.0.0.0", "--port", free_port(), check=False)
    assert refused.returncode == 1 and "--token" in refused.stderr and "Traceback" not in refused.stderr
    server = serve("--index", index, "--host", "127.0.0.1", "--token", "tok", "--cache-dir", tmp_path / "thumbs")
    with pytest.raises(urllib.error.HTTPError) as denied:
        server.get("/api/indexes")
    assert denied.value.code == 401
    assert server.get("/api/indexes", {"Authorization": "Bearer tok"})["indexes"][0]["counts"]["image"] == 24
    # The CLI finds the token in the server's record (readable by this user only).
    [record] = (tmp_path / "run").glob("server-*.json")
    assert record.stat().st_mode & 0o077 == 0
    assert json.loads(crossmodal(env, "search", "a circle", "--index", index, "--json").stdout)
    code, log = server.stop(signal.SIGTERM)  # what service managers send: a clean stop too
    assert code == 0 and "stopped" in log, log
    assert not list((tmp_path / "run").glob("server-*.json"))


def test_a_missing_index_or_missing_web_stack_is_one_line(env, tmp_path):
    result = crossmodal(env, "serve", "--index", tmp_path / "nothing", "--port", free_port(), check=False)
    assert result.returncode == 1 and "no index at" in result.stderr and "Traceback" not in result.stderr
