"""The metadata filter options of ``crossmodal search`` (see :class:`indexer.filters.Filters`)."""

from __future__ import annotations

import functools

import click


def filter_options(func):
    """Adds the filter options to a command and hands it one ``filters`` argument (None when none is given)."""
    options = [
        click.option("--in", "paths", multiple=True, metavar="GLOB",
                     help="Only images under this folder or matching this path glob (repeatable)."),
        click.option("--type", "formats", multiple=True, metavar="EXT", help="Only this file type: jpg, png... "
                     "(repeatable)."),
        click.option("--taken", metavar="FROM..TO", help="EXIF date taken in this range (YYYY-MM-DD; an end may "
                     "be left out: 2023-06-01..)."),
        click.option("--modified", metavar="FROM..TO", help="File modified in this range."),
        click.option("--camera", metavar="WORDS", help="Camera make or model holds these words."),
        click.option("--min-size", metavar="WxH", help="At least this many pixels wide and high (or W alone)."),
        click.option("--orientation", type=click.Choice(["landscape", "portrait", "square"])),
        click.option("--captioned/--uncaptioned", "has_caption", default=None, help="Only images with (without) "
                     "captions."),
        click.option("--bbox", metavar="S,W,N,E", help="GPS position inside this box (degrees)."),
    ]

    @functools.wraps(func)
    def wrapper(*args, paths, formats, taken, modified, camera, min_size, orientation, has_caption, bbox, **kwargs):
        from indexer.errors import QueryError
        from indexer.filters import Filters

        width, height = _size(min_size)
        try:
            filters = Filters(paths=paths, formats=formats, taken=taken, modified=modified, camera=camera,
                              min_width=width, min_height=height, orientation=orientation, has_caption=has_caption,
                              bbox=bbox)
        except QueryError as exc:  # a value of ours: refused before the index is opened
            raise click.UsageError(str(exc)) from None
        return func(*args, filters=filters if filters.active else None, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def _size(value: str | None) -> tuple[int | None, int | None]:
    if value is None:
        return None, None
    parts = value.lower().split("x")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 2) or min(numbers, default=0) < 1:
        raise click.BadParameter(f"{value!r}: give WIDTHxHEIGHT in pixels, such as 1920x1080, or a width alone",
                                 param_hint="--min-size")
    return numbers[0], numbers[-1] if len(numbers) == 2 else None
