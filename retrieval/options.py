"""Options and error handling shared by every ``crossmodal`` command."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from indexer import DEFAULT_INDEX_DIR
from indexer.errors import CrossmodalError


def domain_errors(func):
    """Turn our errors into click's one-line error, leaving real bugs their traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except CrossmodalError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            raise click.ClickException("interrupted; what was committed is kept, run the same command to resume") \
                from None

    return wrapper


def index_option(func):
    return click.option("--index", "index_dir", type=click.Path(path_type=Path), envvar="CROSSMODAL_INDEX",
                        default=DEFAULT_INDEX_DIR, show_default=True, show_envvar=True,
                        help="Index directory.")(func)


def model_options(func):
    func = click.option("--device", envvar="CROSSMODAL_DEVICE", default="auto", show_default=True,
                        show_envvar=True, help="auto, cpu or cuda[:N].")(func)
    func = click.option("--pretrained", envvar="CROSSMODAL_PRETRAINED", show_envvar=True,
                        help="Pretrained tag, local checkpoint (.safetensors/.pt/.bin) or 'none'. "
                             "Default: laion2b_s34b_b79k for ViT-B-32, or the index's own weights.")(func)
    func = click.option("--model", envvar="CROSSMODAL_MODEL", show_envvar=True,
                        help="open_clip model name. Default: ViT-B-32, or the model the index was built with.")(func)
    return func


def json_option(func):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(func)
