"""Start the service, serve it with uvicorn, and say where it runs (for the page and ``crossmodal search``)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import uvicorn

from .app import create_app
from .runtime import ServerRecord, register, unregister
from .service import Service
from .settings import ServeSettings


def run(settings: ServeSettings, say: Callable[[str], None]) -> None:
    started = time.perf_counter()
    service = Service(settings, say)
    try:
        app = create_app(service)
        server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, access_log=False,
                                               log_level="warning", timeout_graceful_shutdown=5))
        local = "127.0.0.1" if settings.host in ("0.0.0.0", "", "::") else settings.host
        url = f"http://{f'[{local}]' if ':' in local else local}:{settings.port}"
        record = register(ServerRecord(os.getpid(), url, {n: str(Path(p).resolve()) for n, p in
                                                          settings.indexes.items()}, settings.token))
        try:
            say(f"ready in {time.perf_counter() - started:.1f}s: {url}  (API under /api, docs at /docs; "
                "Ctrl+C stops)")
            try:
                server.run()
            except KeyboardInterrupt:  # uvicorn shuts down on SIGINT/SIGTERM, then raises the signal again
                pass
            say("stopped")
        finally:
            unregister(record)
    finally:
        service.close()
