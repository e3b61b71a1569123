"""The HTTP layer of ``crossmodal serve``: each route parses, calls :class:`~.service.Service`, answers JSON.

Errors are JSON ``{"error": "..."}``: 4xx for what the request got wrong, 5xx only for our faults,
never a stack trace. When the server has a token, the API, thumbnails, files and metrics need it as
``Authorization: Bearer TOKEN`` or the cookie that ``POST /api/login`` sets.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from indexer.errors import CrossmodalError, QueryError
from indexer.filters import Filters

from ..hybrid import MODES
from ..terms import json_values, terms_from_json
from .files import MAX_THUMB_SIZE, THUMB_SIZE, Forbidden, NotFound
from .guard import COOKIE, JSON, Guard, error
from .metrics import Metrics
from .service import SETTING_MAX, Busy, Query, Service, UploadTooLarge

STATIC = Path(__file__).with_name("static")
# The page loads only its own files; images may also be blobs (a dropped query image shown back).
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
log = logging.getLogger("crossmodal.serve")


def status_of(exc: CrossmodalError) -> int:
    for kind, status in ((UploadTooLarge, 413), (QueryError, 400), (NotFound, 404), (Forbidden, 403), (Busy, 503)):
        if isinstance(exc, kind):
            return status
    return 500


def create_app(service: Service) -> FastAPI:
    settings = service.settings
    app = FastAPI(title="crossmodal", summary="Cross-modal search over image folders and captions",
                  docs_url="/docs", redoc_url=None)
    metrics = Metrics(lambda: service.in_flight)
    app.add_middleware(Guard, token=settings.token, metrics=metrics)
    if settings.cors:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], allow_credentials=True)

    @app.exception_handler(CrossmodalError)
    async def domain_error(_request: Request, exc: CrossmodalError):
        status = status_of(exc)
        if status == 500:
            log.error("%s", exc)
        return error(status, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = "no such page or API route" if exc.status_code == 404 else str(exc.detail)
        return error(exc.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path"))
        return error(400, f"{where or 'request'}: {first.get('msg', 'invalid')}")

    # -- the page ------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html",
                            headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz", summary="Liveness: answers while the server runs")
    def healthz():
        return {"status": "ok", "indexes": list(service.indexes)}

    @app.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    def prometheus():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/api/login", summary="Exchange the token for a cookie (the page's login prompt)")
    async def login(request: Request):
        body = await _json(request)
        token = body.get("token") if isinstance(body, dict) else None
        if not settings.token:
            return {"ok": True, "needed": False}
        if not isinstance(token, str) or not hmac.compare_digest(token.encode(), settings.token.encode()):
            return error(401, "wrong token", login=True)
        response = JSON({"ok": True})
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    # -- the API -------------------------------------------------------------------------------
    @app.get("/api/indexes", summary="The served indexes: model, counts, type and search settings")
    def indexes():
        return {"indexes": [served.describe() for served in service.indexes.values()]}

    async def answer(name: str | None, query: Query) -> JSON:
        result = await asyncio.wrap_future(service.submit(service.search, name, query))
        metrics.query(result["timings_ms"])
        return JSON(result)

    @app.post("/api/search", summary="Search by text, uploaded image, item id or vector",
              openapi_extra={"requestBody": SEARCH_BODY})
    async def search(request: Request):
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):
            name, query = await _form_query(request, settings.max_upload_bytes)
        else:
            body = await _json(request)
            if not isinstance(body, dict):
                raise QueryError("send a JSON object such as {\"text\": \"a dog on a beach\"}, or an image as "
                                 "multipart/form-data field 'image'")
            name, query = body.get("index"), _json_query(body)
        return await answer(name, query)

    @app.get("/api/items/{item_id}", summary="An item: path, size, captions, source")
    def item(item_id: int, index: str | None = None):
        return JSON(service.index(index).item(item_id))

    @app.get("/api/items/{item_id}/similar", summary="More like an indexed item")
    async def similar(item_id: int, index: str | None = None, to: str = "image", k: int = 24, offset: int = 0):
        return await answer(index, Query(item=item_id, to=to, k=k, offset=offset))

    @app.get("/thumbs/{item_id}", summary="A JPEG thumbnail of an indexed image")
    def thumb(request: Request, item_id: int, index: str | None = None, size: int = THUMB_SIZE,
              v: str | None = None):
        if not 16 <= size <= MAX_THUMB_SIZE:
            raise QueryError(f"size must be between 16 and {MAX_THUMB_SIZE}, got {size}")
        path, etag = service.index(index).thumbnail(item_id, size)
        caching = "private, max-age=31536000, immutable" if v else "private, no-cache"
        headers = {"ETag": f'"{etag}"', "Cache-Control": caching}
        if request.headers.get("if-none-match") == f'"{etag}"':
            return Response(status_code=304, headers=headers)
        return FileResponse(path, media_type="image/jpeg", headers=headers)

    @app.get("/files/{item_id}", summary="The original file of an indexed image")
    def original(item_id: int, index: str | None = None):
        return FileResponse(service.index(index).file(item_id), headers={"Cache-Control": "private, no-cache"})

    return app


async def _json(request: Request):
    try:
        return json.loads(await request.body() or b"null")
    except (ValueError, UnicodeDecodeError):
        raise QueryError("the request body is not valid JSON") from None


def _json_query(body: dict) -> Query:
    unknown = set(body) - {"index", "text", "item", "vector", "terms", "mode", "hide_duplicates", "filters", "to",
                           "k", "offset"} - set(SETTING_MAX)
    if unknown:
        raise QueryError(f"unknown field {sorted(unknown)[0]!r} in the search request")
    text, item, vector = json_values(body)
    terms = tuple(terms_from_json(body["terms"])) if "terms" in body else None
    mode = body.get("mode", "vector")
    if not isinstance(mode, str):
        raise QueryError(f"mode must be one of {', '.join(MODES)}")
    hide = body.get("hide_duplicates", False)
    if not isinstance(hide, bool):
        raise QueryError("hide_duplicates must be true or false")
    filters = Filters.from_dict(body["filters"]) if body.get("filters") is not None else None
    return Query(text=text, item=item, vector=vector, terms=terms, mode=mode, hide_duplicates=hide, filters=filters,
                 to=body.get("to"), k=body.get("k", 24),
                 offset=body.get("offset", 0), settings={n: body[n] for n in SETTING_MAX if n in body} or None)


async def _form_query(request: Request, limit: int) -> tuple[str | None, Query]:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + 65536:
        raise UploadTooLarge(f"the upload has {int(declared):,} bytes, over the {limit:,}-byte limit for query "
                             "images")
    form = await request.form(max_files=1, max_fields=16)
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise QueryError("send the query image as the multipart field 'image'")
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise UploadTooLarge(f"the uploaded image is over the {limit:,}-byte limit for query images")
    if not data:
        raise QueryError("the uploaded image is empty")

    def number(name: str, default: int) -> int:
        value = form.get(name)
        if value is None or value == "":
            return default
        if not isinstance(value, str) or not value.strip().isdigit():
            raise QueryError(f"{name} must be a whole number, got {value!r}")
        return int(value)

    settings = {n: number(n, 0) for n in SETTING_MAX if form.get(n)}
    to, raw_terms = form.get("to") or None, form.get("terms") or None
    terms = None
    if raw_terms is not None:  # more terms with the image, as JSON (the page's "less like this")
        try:
            terms = tuple(terms_from_json(json.loads(raw_terms)))
        except (TypeError, ValueError):
            raise QueryError("terms must be a JSON list such as [{\"text\": \"a cat\", \"weight\": -1}]") from None
    hide = form.get("hide_duplicates") in ("true", "1", "on")
    filters = None
    if form.get("filters"):
        try:
            raw_filters = json.loads(form.get("filters"))
        except (TypeError, ValueError):
            raise QueryError("filters must be a JSON object such as {\"camera\": \"canon\"}") from None
        filters = Filters.from_dict(raw_filters)  # says which filter or value is wrong
    return form.get("index") or None, Query(image=data, terms=terms, hide_duplicates=hide, filters=filters,
                                            to=to if isinstance(to, str) else None,
                                            k=number("k", 24), offset=number("offset", 0), settings=settings or None)


FILTERS_SCHEMA = {"type": "object", "description": "only results that match all of these (indexer.filters)",
                  "properties": {
                      "paths": {"type": "array", "items": {"type": "string"}, "description": "folders or path globs"},
                      "formats": {"type": "array", "items": {"type": "string"}, "description": "jpg, png, ..."},
                      "taken": {"type": "string", "description": "EXIF date range FROM..TO (ISO dates)"},
                      "modified": {"type": "string", "description": "file time range FROM..TO"},
                      "camera": {"type": "string"}, "min_width": {"type": "integer"},
                      "min_height": {"type": "integer"},
                      "orientation": {"type": "string", "enum": ["landscape", "portrait", "square"]},
                      "has_caption": {"type": "boolean"},
                      "bbox": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4,
                               "description": "south, west, north, east"}},
                  "example": {"taken": "2023-06-01..2023-08-31", "camera": "canon"}}

SEARCH_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": {"type": "object", "properties": {
            "index": {"type": "string"}, "text": {"type": "string"}, "item": {"type": "integer"},
            "vector": {"type": "array", "items": {"type": "number"}},
            "terms": {"type": "array", "description": "a fused query: sum of weight * term, each term one of "
                      "text, item or vector", "items": {"type": "object", "properties": {
                          "text": {"type": "string"}, "item": {"type": "integer"},
                          "vector": {"type": "array", "items": {"type": "number"}},
                          "weight": {"type": "number", "default": 1}}}},
            "mode": {"type": "string", "enum": list(MODES), "default": "vector",
                     "description": "for a text query: the model, the words of captions and file names, both "
                                    "rankings fused, or (to images) each image with its captions as one"},
            "hide_duplicates": {"type": "boolean", "default": False,
                                "description": "show one of each group of near-identical hits"},
            "filters": FILTERS_SCHEMA,
            "to": {"type": "string", "enum": ["image", "text"]},
            "k": {"type": "integer", "minimum": 1, "maximum": 200, "default": 24},
            "offset": {"type": "integer", "minimum": 0, "default": 0},
            "nprobe": {"type": "integer"}, "ef_search": {"type": "integer"}, "rerank": {"type": "integer"}},
            "example": {"text": "a dog on a beach", "to": "image", "k": 24}}},
        "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary"}, "index": {"type": "string"},
            "terms": {"type": "string", "description": "more terms, as the JSON list of the JSON body's terms"},
            "filters": {"type": "string", "description": "the JSON body's filters, as JSON"},
            "to": {"type": "string"}, "k": {"type": "integer"}, "offset": {"type": "integer"}}}},
    },
}
