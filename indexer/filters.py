"""Metadata filters: which images (and captions of images) a search may return, as SQL over the catalog.

A :class:`Filters` is plain data (parsed and checked here, so the CLI and the HTTP API refuse the
same values with the same words); :func:`filtered_ids` turns it into the catalog ids the vector
search may return (passed to faiss as an id selector), and :func:`filter_sql` into a clause the
keyword search adds to its own SQL. The columns are the catalog's (migration v5 for the photo
metadata read from each file's header at indexing time).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import astuple, dataclass, fields

import numpy as np

from .catalog import Catalog
from .errors import QueryError

ORIENTATIONS = ("landscape", "portrait", "square")
FORMAT_ALIASES = {"jpg": "JPEG", "jpeg": "JPEG", "tif": "TIFF", "tiff": "TIFF", "heic": "HEIF", "heif": "HEIF"}


@dataclass(frozen=True)
class Filters:
    """What a result must be; every field given must hold (AND), a tuple's values are alternatives (OR).

    ``paths``: globs (``*``, ``?``, ``[...]``) on an image's path under its indexed folder or its
    absolute path; a value without glob characters is that file or folder (``2023/trips`` also admits
    ``2023/trips/*``).
    ``taken`` / ``modified``: ``(from, to)`` ISO dates or date-times, inclusive (a date ``to`` runs to
    the end of that day), either end None; ``taken`` is the EXIF date (camera time). ``camera``: words
    found in the camera's make and model (case-insensitive). ``min_width`` / ``min_height``: pixels.
    ``orientation``: one of :data:`ORIENTATIONS` (as shown, after the EXIF rotation). ``bbox``:
    ``(south, west, north, east)`` in degrees, crossing the antimeridian when ``west > east``.
    """

    paths: tuple[str, ...] = ()
    formats: tuple[str, ...] = ()
    taken: tuple[str | None, str | None] | None = None
    modified: tuple[str | None, str | None] | None = None
    camera: str | None = None
    min_width: int | None = None
    min_height: int | None = None
    orientation: str | None = None
    has_caption: bool | None = None
    bbox: tuple[float, float, float, float] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "paths", tuple(str(p).strip() for p in self.paths if str(p).strip()))
        object.__setattr__(self, "formats", tuple(_format(f) for f in self.formats))
        for name in ("taken", "modified"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _range(name, value))
        for name in ("min_width", "min_height"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise QueryError(f"{name} must be a positive number of pixels, got {value!r}")
        if self.orientation is not None and self.orientation not in ORIENTATIONS:
            raise QueryError(f"unknown orientation {self.orientation!r}: use {', '.join(ORIENTATIONS)}")
        if self.has_caption is not None and not isinstance(self.has_caption, bool):
            raise QueryError(f"has_caption is true or false, got {self.has_caption!r}")
        if self.camera is not None and not str(self.camera).strip():
            object.__setattr__(self, "camera", None)
        if self.bbox is not None:
            object.__setattr__(self, "bbox", _bbox(self.bbox))

    @classmethod
    def from_dict(cls, values) -> Filters:
        """From JSON (the HTTP API's ``filters``): the field names, lists for tuples; unknown names refused."""
        if not isinstance(values, dict):
            raise QueryError("filters must be a JSON object such as {\"camera\": \"canon\", \"taken\": "
                             "\"2023-01-01..2023-12-31\"}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise QueryError(f"unknown filter {unknown[0]!r}: use {', '.join(sorted(names))}")
        given = dict(values)
        for name in ("paths", "formats"):
            if isinstance(given.get(name), str):
                given[name] = [given[name]]
            if name in given and not isinstance(given[name], list):
                raise QueryError(f"filter {name} is a list of strings, got {given[name]!r}")
            given[name] = tuple(given.get(name) or ())
        for name in ("taken", "modified", "bbox"):
            if isinstance(given.get(name), list):
                given[name] = tuple(given[name])
        return cls(**given)

    def as_dict(self) -> dict:
        """The JSON form :meth:`from_dict` reads; only the fields given."""
        return {f.name: list(v) if isinstance(v, tuple) else v for f in fields(self)
                if (v := getattr(self, f.name)) not in (None, ())}

    @property
    def active(self) -> bool:
        return any(v not in (None, ()) for v in astuple(self))

    def describe(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                         if getattr(self, f.name) not in (None, ()))


def _format(value: str) -> str:
    value = str(value).strip().lstrip(".")
    if not value:
        raise QueryError("an empty file type: give one such as jpg, png or webp")
    return FORMAT_ALIASES.get(value.lower(), value.upper())


def _moment(name: str, value: str | None, end: bool) -> str | None:
    """An ISO text comparable with the catalog's (``YYYY-MM-DDTHH:MM:SS``); a date ``to`` ends its day."""
    if value is None or str(value).strip() == "":
        return None
    raw = str(value).strip()
    try:
        if len(raw) == 10:
            day = dt.date.fromisoformat(raw)
            return f"{day.isoformat()}T23:59:59" if end else f"{day.isoformat()}T00:00:00"
        return dt.datetime.fromisoformat(raw).replace(tzinfo=None).isoformat(timespec="seconds")
    except ValueError:
        raise QueryError(f"{name}: {raw!r} is not a date; use YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS") from None


def _range(name: str, value) -> tuple[str | None, str | None]:
    if isinstance(value, str):
        value = value.split("..", 1) if ".." in value else (value, value)
    try:
        start, stop = value
    except (TypeError, ValueError):
        raise QueryError(f"{name} is a range FROM..TO (either end may be left out), got {value!r}") from None
    start, stop = _moment(name, start, False), _moment(name, stop, True)
    if start and stop and start > stop:
        raise QueryError(f"{name}: the range {start}..{stop} ends before it starts")
    return start, stop


def _bbox(value) -> tuple[float, float, float, float]:
    if isinstance(value, str):
        value = value.split(",")
    try:
        south, west, north, east = (float(v) for v in value)
    except (TypeError, ValueError):
        raise QueryError(f"a bounding box is SOUTH,WEST,NORTH,EAST in degrees, got {value!r}") from None
    if not (-90 <= south <= north <= 90) or not (-180 <= west <= 180 and -180 <= east <= 180):
        raise QueryError(f"bounding box {south},{west},{north},{east}: latitudes run -90..90 (south <= north), "
                         "longitudes -180..180")
    return south, west, north, east


def _local_ns(moment: str) -> int:
    """File times are compared in this machine's local time, as a file manager shows them."""
    return int(dt.datetime.fromisoformat(moment).timestamp() * 1e9)


def filter_sql(filters: Filters, dialect, image: str = "i", root: str = "r") -> tuple[str, dict]:
    """A SQL condition on an image row ``image`` joined to its root ``root``, and its parameters, in the
    catalog's ``dialect`` (:mod:`indexer.dialects`: globs and substrings are spelt differently)."""
    parts: list[str] = []
    params: dict = {}
    if filters.paths:
        alternatives = []
        for n, pattern in enumerate(filters.paths):
            globs = [pattern] if any(c in pattern for c in "*?[") else [pattern.rstrip("/"), pattern.rstrip("/") + "/*"]
            for m, glob in enumerate(globs):  # a plain name: that file, or everything under that folder
                params[f"path{n}_{m}"] = dialect.glob_value(glob)
                alternatives.append(dialect.glob(f"{image}.path", f"path{n}_{m}"))
                if glob.startswith(("/", "*", "?", "[")):  # may name the root too: match the absolute path
                    alternatives.append(dialect.glob(f"({root}.path || '/' || {image}.path)", f"path{n}_{m}"))
        parts.append("(" + " OR ".join(alternatives) + ")")
    if filters.formats:
        names = ", ".join(f":format{n}" for n in range(len(filters.formats)))
        params.update({f"format{n}": f for n, f in enumerate(filters.formats)})
        parts.append(f"{image}.format IN ({names})")
    for name, column, convert in (("taken", "taken_at", str), ("modified", "mtime_ns", _local_ns)):
        bounds = getattr(filters, name)
        if bounds is not None:
            if bounds[0] is not None:
                parts.append(f"{image}.{column} >= :{name}_from")
                params[f"{name}_from"] = convert(bounds[0])
            if bounds[1] is not None:
                parts.append(f"{image}.{column} <= :{name}_to")
                params[f"{name}_to"] = convert(bounds[1]) + (999_999_999 if name == "modified" else "")
    if filters.camera:
        for n, word in enumerate(filters.camera.lower().split()):
            maker = f"lower(coalesce({image}.camera_make, '') || ' ' || coalesce({image}.camera_model, ''))"
            parts.append(dialect.contains(maker, f"camera{n}"))
            params[f"camera{n}"] = word
    for name in ("min_width", "min_height"):
        if getattr(filters, name) is not None:
            parts.append(f"{image}.{name[4:]} >= :{name}")
            params[name] = getattr(filters, name)
    if filters.orientation is not None:
        sign = {"landscape": ">", "portrait": "<", "square": "="}[filters.orientation]
        parts.append(f"{image}.width {sign} {image}.height")
    if filters.has_caption is not None:
        exists = f"EXISTS (SELECT 1 FROM items AS cap WHERE cap.image_id = {image}.id AND cap.kind = 'caption')"
        parts.append(exists if filters.has_caption else f"NOT {exists}")
    if filters.bbox is not None:
        south, west, north, east = filters.bbox
        params.update(south=south, west=west, north=north, east=east)
        parts.append(f"{image}.gps_lat BETWEEN :south AND :north")
        parts.append(f"{image}.gps_lon BETWEEN :west AND :east" if west <= east else
                     f"({image}.gps_lon >= :west OR {image}.gps_lon <= :east)")
    return " AND ".join(parts) or "1 = 1", params


def admitted_images_sql(filters: Filters, dialect, image: str = "i", root: str = "r") -> tuple[str, dict]:
    """A SELECT of the ids of the indexed images ``filters`` admit, and its parameters (for the vector
    search's ids and as a subquery of the keyword search's)."""
    condition, params = filter_sql(filters, dialect, image, root)
    roots = f"JOIN roots AS {root} ON {root}.id = {image}.root_id " if filters.paths else ""  # only globs need it
    return (f"SELECT {image}.id FROM items AS {image} {roots}WHERE {image}.kind = 'image' AND {image}.error IS NULL "
            f"AND {condition}"), params


def filtered_ids(catalog: Catalog, filters: Filters, to: str) -> np.ndarray:
    """The sorted ids of the ``to`` items that ``filters`` admit: images that match, or for ``to="text"``
    the captions of images that match (a text not tied to an image matches no image filter)."""
    matching, params = admitted_images_sql(filters, catalog.dialect)
    if to == "text":
        matching = f"SELECT c.id FROM items AS c WHERE c.kind = 'caption' AND c.image_id IN ({matching})"
    with catalog.engine.connect() as conn:
        return catalog.dialect.fetch_ids(conn, matching + " ORDER BY 1", params)
