"""Start the service, serve it with uvicorn, and say where it runs (for the page and ``crossmodal search``)."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import uvicorn

from .app import create_app
from .runtime import ServerRecord, register, unregister
from .service import Service
from .settings import ServeError, ServeSettings


def run(settings: ServeSettings, say: Callable[[str], None]) -> None:
    """Serve until SIGINT or SIGTERM (either stops it cleanly, even while the models load)."""
    # uvicorn stops gracefully on both and then raises the signal again with the handler it found:
    # SIGTERM's default would end the process before the finally blocks below remove its record.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        _serve(settings, say)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    say("stopped")


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def _serve(settings: ServeSettings, say: Callable[[str], None]) -> None:
    started = time.perf_counter()
    listening = _listen(settings.host, settings.port)  # before the model loads: a taken port fails at once
    try:
        service = Service(settings, say)
        try:
            port = listening.getsockname()[1]
            server = uvicorn.Server(uvicorn.Config(create_app(service), host=settings.host, port=port,
                                                   access_log=False, log_level="warning",
                                                   timeout_graceful_shutdown=5))
            local = "127.0.0.1" if settings.host in ("0.0.0.0", "") else "::1" if settings.host == "::" \
                else settings.host
            url = f"http://{f'[{local}]' if ':' in local else local}:{port}"
            record = register(ServerRecord(os.getpid(), url, {n: str(Path(p).resolve()) for n, p in
                                                              settings.indexes.items()}, settings.token))
            try:
                # Connections wait in the socket's backlog until uvicorn takes them: ready means ready.
                say(f"ready in {time.perf_counter() - started:.1f}s: {url}  (API under /api, docs at /docs; "
                    "Ctrl+C stops)")
                server.run(sockets=[listening])
            finally:
                unregister(record)
        finally:
            service.close()
    finally:
        listening.close()


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # Named TCP explicitly: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose protocol says TCP,
    # and with it on, each response's body waited ~40 ms for the client's delayed ACK.
    listening = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind((host, port))
        listening.listen(2048)
    except OSError as exc:
        listening.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port "
                         "(or stop what uses it)") from None
    return listening
