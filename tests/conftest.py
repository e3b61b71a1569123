from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from indexer.encoder import ModelIdentity

FAKE_DIM = 32


class FakePreprocess:
    """Picklable stand-in for open_clip's transform: 8x8 RGB thumbnail as a tensor."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        small = image.convert("RGB").resize((8, 8), Image.BILINEAR)
        return torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class FakeEncoder:
    """Deterministic encoder for storage/search/CLI tests: a fixed projection of an 8x8 thumbnail for
    images, a hash-seeded vector for texts. Counts what it encodes so tests can check encode-once."""

    def __init__(self, name: str = "fake", dim: int = FAKE_DIM):
        self.identity = ModelIdentity(name=name, pretrained="none", embed_dim=dim)
        self.device = torch.device("cpu")
        self.image_size = 8
        self.precision = "fp32"
        self.preprocess = FakePreprocess()
        self.projection = np.random.default_rng(0).standard_normal((3 * 8 * 8, dim)).astype(np.float32)
        self.images_encoded = 0
        self.texts_encoded = 0

    @staticmethod
    def _unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        self.images_encoded += pixels.shape[0]
        flat = pixels.reshape(pixels.shape[0], -1).numpy() - 0.5
        return self._unit(flat @ self.projection)

    def encode_pil(self, images) -> np.ndarray:
        return self.encode_images(torch.stack([self.preprocess(im) for im in images]))

    def text_overflow(self, text: str) -> int:
        return max(0, len(text.split()) - 20)  # a 20-word "context"

    def encode_texts(self, texts) -> np.ndarray:
        self.texts_encoded += len(texts)
        rows = [np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:12], 16))
                .standard_normal(self.identity.embed_dim) for t in texts]
        return self._unit(np.array(rows).reshape(len(texts), self.identity.embed_dim))


@pytest.fixture
def fake_encoder() -> FakeEncoder:
    return FakeEncoder()


def make_image(path: Path, seed: int, size: tuple[int, int] = (40, 30), fmt: str | None = None) -> Path:
    """A distinct image per seed: blocks of random colour, so thumbnails differ clearly."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(blocks).resize(size, Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


@pytest.fixture
def photo_dir(tmp_path: Path) -> Path:
    """Six images in two folders, one with a sidecar caption file."""
    root = tmp_path / "photos"
    for i in range(4):
        make_image(root / f"img{i}.png", seed=i)
    make_image(root / "sub" / "deep.jpg", seed=10)
    make_image(root / "sub" / "other.jpg", seed=11)
    (root / "img0.txt").write_text("a first caption\nanother caption for img0\n")
    return root


@pytest.fixture
def invoke(monkeypatch, tmp_path):
    """Run the CLI with the fake encoder and CROSSMODAL_INDEX=tmp_path/idx; ``ok=True`` asserts success."""
    import indexer.store
    import retrieval.searcher
    from retrieval.cli import cli

    encoder = FakeEncoder()
    monkeypatch.setattr(indexer.store, "open_encoder", lambda *a, **k: encoder)  # the CLI imports it when it runs
    monkeypatch.setattr(retrieval.searcher, "encoder_for", lambda *a, **k: encoder)
    monkeypatch.setenv("CROSSMODAL_INDEX", str(tmp_path / "idx"))
    runner = CliRunner()

    def _invoke(*args, ok: bool = False):
        result = runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return _invoke


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# -- a real index of generated images with the bundled demo model (one per session: tests only read it) --
@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    """80 generated images with 3 captions each, indexed with the demo model."""
    root = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for args in (("data", "synth", "--out", root / "corpus", "--n", 80, "--seed", 11, "--test", 80, "--val", 0),
                 ("index", root / "corpus" / "test", "--index", root / "index", "--model", "crossmodal-demo",
                  "--workers", 0, "--no-progress")):
        done = subprocess.run([sys.executable, "-m", "retrieval", *map(str, args)], capture_output=True, text=True,
                              env=env)
        assert done.returncode == 0, done.stderr
    return root


@pytest.fixture(scope="session")
def shapes_searcher(shapes):
    from retrieval.searcher import Searcher

    with Searcher.open(shapes / "index", read_only=True) as searcher:
        yield searcher


# -- PostgreSQL: the catalog suites run against SQLite and a real server --------------------------------
# .ci/run starts a server (.ci/postgres) and names it here; locally: export CROSSMODAL_TEST_POSTGRES=$(.ci/postgres
# start /tmp/pg). Tests that need it skip without one, and fail when CI is set.
POSTGRES_ENV = "CROSSMODAL_TEST_POSTGRES"


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The admin URL of the test server (databases are created on it per test)."""
    url = os.environ.get(POSTGRES_ENV, "").strip()
    if not url:
        message = f"no PostgreSQL server: set {POSTGRES_ENV} (`.ci/postgres start DIR` starts one and prints it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return url


@pytest.fixture
def postgres_catalog(postgres_server) -> str:
    """The URL of a fresh, empty database on the test server, dropped after the test."""
    import uuid

    import psycopg

    name = "t_" + uuid.uuid4().hex[:16]
    admin = postgres_server.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield postgres_server.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def pytest_generate_tests(metafunc):
    # `either_catalog`: the test runs once on SQLite and once on PostgreSQL, except those marked sqlite_only
    # (they look at the SQLite file itself).
    if "either_catalog" in metafunc.fixturenames:
        only_sqlite = metafunc.definition.get_closest_marker("sqlite_only") is not None
        metafunc.parametrize("either_catalog", ["sqlite"] if only_sqlite else ["sqlite", "postgresql"],
                             indirect=True)


@pytest.fixture
def either_catalog(request, monkeypatch) -> str | None:
    """None for SQLite (each index folder's own file); for PostgreSQL a fresh database's URL, which every new
    index folder of the test is bound to (CROSSMODAL_CATALOG, inherited by the CLI in subprocesses)."""
    if request.param == "sqlite":
        monkeypatch.delenv("CROSSMODAL_CATALOG", raising=False)
        return None
    url = request.getfixturevalue("postgres_catalog")
    monkeypatch.setenv("CROSSMODAL_CATALOG", url)
    return url


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1, as float32."""
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_embeddings(out, n, seed=0, shards=2, fmt="parquet"):
    """clip-retrieval's layout: n image-caption pairs split over shards; text vectors near their image's."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((30, FAKE_DIM))
    images = unit(centres[rng.integers(0, 30, n)] + rng.standard_normal((n, FAKE_DIM)) * 0.4)
    texts = unit(images + rng.standard_normal((n, FAKE_DIM)) * 0.3 + 0.2)
    for name in ("img_emb", "text_emb", "metadata"):
        (out / name).mkdir(parents=True, exist_ok=True)
    for shard, rows in enumerate(np.array_split(np.arange(n), shards)):
        np.save(out / "img_emb" / f"img_emb_{shard}.npy", images[rows].astype(np.float16))
        np.save(out / "text_emb" / f"text_emb_{shard}.npy", texts[rows])
        meta = [{"image_path": f"/data/img{i}.jpg", "caption": f"caption number {i}"} for i in rows]
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(meta), out / "metadata" / f"metadata_{shard}.parquet")
        else:
            (out / "metadata" / f"metadata_{shard}.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    return images, texts
