"""Asking a running ``crossmodal serve`` from the command line: an HTTP round trip instead of a model load.

Standard library only. Anything but a clean answer returns None and the caller searches in-process,
so a server that is gone, busy or of another token never makes a search fail, and a bad query gets
the same message either way.
"""

from __future__ import annotations

import json
import os
import stat
import urllib.request
import uuid
from pathlib import Path

from ..hits import Answer, Hit
from ..terms import Term
from .runtime import ServerRecord

TIMEOUT_S = 30


def ask(record: ServerRecord, name: str, *, terms: list[Term], to: str, k: int, settings: dict,
        mode: str = "vector", hide_duplicates: bool = False, filters=None) -> Answer | None:
    """The server's answer to ``terms`` (one image, or any number of texts, items and vectors), or None."""
    fields = {"index": name, "to": to, "k": k, **{n: v for n, v in settings.items() if v is not None}}
    if mode != "vector":
        fields["mode"] = mode
    if hide_duplicates:
        fields["hide_duplicates"] = True
    if filters is not None:  # an indexer.filters.Filters
        fields["filters"] = filters.as_dict()
    if len(terms) == 1 and terms[0].weight <= 0:
        return None  # not a query: the in-process search says why
    image = terms[0].image if len(terms) == 1 else None
    if image is None:
        if any(term.image is not None for term in terms):
            return None  # image files among other terms: asked in-process
        query = {"text": terms[0].text} if len(terms) == 1 and terms[0].text is not None and terms[0].weight == 1 \
            else {"terms": [_term(term) for term in terms]}
        body, kind = json.dumps({**fields, **query}).encode(), "application/json"
    else:
        data = _regular_file(image)
        if data is None:  # missing, a FIFO, a device: the in-process search says what is wrong with it
            return None
        body, kind = _multipart(fields, data, image.name)
    request = urllib.request.Request(record.url + "/api/search", body, {"Content-Type": kind}, method="POST")
    if record.token:
        request.add_header("Authorization", f"Bearer {record.token}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            answer = json.load(response)
    except (OSError, ValueError):  # refused, reset, timed out, not JSON; an HTTP error is an OSError too:
        return None  # busy, another token, or a query the in-process search explains in its own words
    timings = {stage: ms / 1000 for stage, ms in answer.get("timings_ms", {}).items()}
    return Answer([_hit(h) for h in answer["hits"]], answer.get("notes", []), timings, answer.get("has_more", False))


def _term(term: Term) -> dict:
    value = {"text": term.text} if term.text is not None else {"item": term.item} if term.item is not None \
        else {"vector": [float(x) for x in term.vector]}
    return {**value, "weight": term.weight}


def _hit(h: dict) -> Hit:
    path = h["path"] if h["root"] is None or h["path"] is None else str(Path(h["root"]) / h["path"])
    return Hit(h["rank"], h["score"], h["id"], h["kind"], path, h["text"],
               None if h["kind"] == "image" else h["image_id"], h["source"])


def _regular_file(path: Path) -> bytes | None:
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        return Path(path).read_bytes()
    except OSError:
        return None


def _multipart(fields: dict, data: bytes, filename: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    text = {key: str(value).lower() if isinstance(value, bool) else json.dumps(value) if isinstance(value, dict)
            else value for key, value in fields.items()}
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
             for key, value in text.items()]
    safe = filename.encode("ascii", "replace").decode().replace('"', "_")
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{safe}"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"

