"""Why a file was skipped, and when it is worth trying again.

A skipped file's row keeps, as JSON in ``skip_info``, the cause and the settings or library versions
the outcome depended on. A later run tries the file again once one of those has changed in its
favour, without waiting for the file itself to change: a higher ``--max-megapixels``, a longer
``--decode-timeout``, another Pillow. Plain values only, so the planner stays a pure function.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from PIL import __version__ as PILLOW_VERSION

# Values of decode.Decoded.cause, plus NOT_REGULAR which the walk finds without reading anything.
UNREADABLE = "unreadable"  # the read failed (permissions, I/O error)
VANISHED = "vanished"  # deleted between the walk and the read: never written as a row
TOO_LARGE = "too_large"  # over --max-megapixels, from the header
UNDECODABLE = "undecodable"  # the image library refused it
TIMEOUT = "timeout"  # the decoder process took over --decode-timeout
CRASHED = "crashed"  # the decoder process died on it
NOT_REGULAR = "not_regular"  # a FIFO, socket or device named like an image: never opened


@dataclass(frozen=True)
class RetrySettings:
    """The settings of this run that a skip may have depended on."""

    max_megapixels: float | None
    decode_timeout: float
    pillow: str = PILLOW_VERSION
    retry_all: bool = False  # --retry-skipped


def skip_info(cause: str | None, settings: RetrySettings, **details: object) -> str:
    """The JSON recorded with a skip: its cause and what a retry would have to change."""
    info: dict[str, object] = {"cause": cause or UNDECODABLE}
    if cause == TOO_LARGE:
        info["max_megapixels"] = settings.max_megapixels
    elif cause == TIMEOUT:
        info["timeout"] = settings.decode_timeout
    if info["cause"] in (UNDECODABLE, CRASHED, TIMEOUT):
        info["pillow"] = settings.pillow
    info.update(details)
    return json.dumps(info, sort_keys=True)


def cause_of(info_json: str | None) -> str | None:
    """The cause recorded in a skip's ``skip_info`` (None for rows from before it was recorded)."""
    try:
        return json.loads(info_json)["cause"] if info_json else None
    except (ValueError, TypeError, KeyError):
        return None


def worth_retrying(info_json: str | None, settings: RetrySettings) -> bool:
    """Whether a file skipped with ``info_json``, unchanged on disk since, should be tried again now.

    Rows from before skip_info existed (None) wait for the file to change, as they always did,
    unless ``--retry-skipped`` asks for every skipped file.
    """
    if settings.retry_all:
        return True
    if info_json is None:
        return False
    try:
        info = json.loads(info_json)
        cause = info["cause"]
    except (ValueError, TypeError, KeyError):
        return True  # unreadable bookkeeping: one retry writes it again
    if cause in (UNREADABLE, NOT_REGULAR):
        # A read error costs little to retry; a not-regular file handed to the planner is a regular one now.
        return True
    if cause == TOO_LARGE:
        bound = info.get("max_megapixels")
        return settings.max_megapixels is None or bound is None or settings.max_megapixels > bound
    if cause == TIMEOUT and settings.decode_timeout > (info.get("timeout") or 0):
        return True
    return info.get("pillow") != settings.pillow
