"""What ``crossmodal serve`` is asked to do, checked before anything heavy is loaded."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from indexer.errors import CrossmodalError
from indexer.imageio import DEFAULT_MAX_MEGAPIXELS

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ServeError(CrossmodalError):
    """A serve setting that cannot work (two indexes of one name, a public address without a token)."""


@dataclass(frozen=True)
class ServeSettings:
    indexes: dict[str, Path]  # name -> index folder; the first is the default
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    insecure_no_token: bool = False
    cors: tuple[str, ...] = ()
    cache_dir: Path | None = None  # thumbnails; None: the user's cache folder
    device: str = "auto"
    precision: str = "auto"
    workers: int = 2  # queries encoded at once
    queue: int = 32  # queries waiting for a worker before 503
    max_upload_bytes: int = 20 * 1024 * 1024
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    decode_timeout: float = 10.0
    refresh_seconds: float = 1.0  # how often the catalogs are checked for commits of other processes
    model: str | None = None
    pretrained: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def public(self) -> bool:
        """Whether the address is reachable from other machines (anything but loopback)."""
        if self.host in ("localhost", ""):
            return self.host == ""
        try:
            return not ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name: it resolves to who knows what
            return True


def parse_indexes(values: tuple[str, ...] | list[str]) -> dict[str, Path]:
    """``--index`` values, each ``PATH`` or ``NAME=PATH``; a bare path is named after its folder."""
    indexes: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or "/" in name or not NAME.match(name):
            name, path = "", value
        folder = Path(path).expanduser()
        if not name:
            base = folder.resolve().name or "index"
            name = re.sub(r"[^A-Za-z0-9_.-]", "-", base).lstrip("-_.")[:64] or "index"
        if name in indexes:
            raise ServeError(f"two indexes are named '{name}': name them with --index NAME=PATH")
        indexes[name] = folder
    if not indexes:
        raise ServeError("give at least one --index PATH (or NAME=PATH)")
    return indexes


def check_exposure(settings: ServeSettings) -> str | None:
    """Refuse a public address without a token unless explicitly allowed; the warning to print, if any."""
    if not settings.public:
        return None
    if settings.token:
        return (f"serving on {settings.host}, reachable from other machines: every API request needs the token "
                "(use https in front of it if the network is not yours)")
    if not settings.insecure_no_token:
        raise ServeError(f"{settings.host} is reachable from other machines: give --token (or CROSSMODAL_TOKEN), "
                         "or --insecure-no-token to serve every file of the index to anyone who can connect")
    return f"serving on {settings.host} WITHOUT a token: anyone who can connect can search and read the indexed images"
