"""What the serving benchmarks share: a generated demo index built through the CLI, and a free port."""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from pathlib import Path


def build_index(folder: Path, n: int, seed: int, run: Callable[..., object], model: str = "crossmodal-demo",
                pretrained: str | None = None) -> Path:
    """``n`` generated images indexed with ``model`` (the bundled demo model unless told otherwise);
    ``run(*args)`` runs one crossmodal command."""
    print(f"building an index of {n} generated images with {model} in {folder} ...", file=sys.stderr)
    run("data", "synth", "--out", folder / "corpus", "--n", n, "--seed", seed, "--test", n, "--val", 0)
    weights = ("--pretrained", pretrained) if pretrained else ()
    run("index", folder / "corpus" / "test", "--index", folder / "index", "--model", model, *weights,
        "--no-progress")
    return folder / "index"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
