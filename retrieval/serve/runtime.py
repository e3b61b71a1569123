"""Where running servers say which indexes they serve, so that ``crossmodal search`` can ask one.

One small JSON file per server process in a folder only this user can read (``$XDG_RUNTIME_DIR``,
or the temp folder): the server never writes into an index folder.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from indexer.processes import alive


@dataclass(frozen=True)
class ServerRecord:
    pid: int
    url: str  # http://host:port, a loopback address when the server listens on all of them
    indexes: dict[str, str]  # name -> resolved index folder
    token: str | None = None

    def name_for(self, index_dir: Path) -> str | None:
        folder = str(Path(index_dir).resolve())
        return next((name for name, path in self.indexes.items() if path == folder), None)


def runtime_dir() -> Path:
    if os.environ.get("CROSSMODAL_RUNTIME_DIR"):
        return Path(os.environ["CROSSMODAL_RUNTIME_DIR"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "crossmodal"
    return Path(tempfile.gettempdir()) / f"crossmodal-{os.getuid()}"


def register(record: ServerRecord) -> Path:
    folder = runtime_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / f"server-{record.pid}.json"
    part = path.with_suffix(".part")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it may hold the token
    with os.fdopen(fd, "w") as out:
        json.dump(record.__dict__, out)
    os.replace(part, path)
    return path


def unregister(path: Path) -> None:
    path.unlink(missing_ok=True)


def server_for(index_dir: Path) -> tuple[ServerRecord, str] | None:
    """A live server of this user that serves ``index_dir``, and the index's name there."""
    folder = runtime_dir()
    if not folder.is_dir() or folder.stat().st_uid != os.getuid():
        return None
    for path in sorted(folder.glob("server-*.json")):
        try:
            record = ServerRecord(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if not alive(record.pid):
            path.unlink(missing_ok=True)  # left by a server that was killed
            continue
        name = record.name_for(index_dir)
        if name is not None:
            return record, name
    return None
