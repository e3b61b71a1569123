"""``crossmodal serve``: parse, check, start. The web stack is imported only when the command runs."""

from __future__ import annotations

import os
from pathlib import Path

import click

from .options import domain_errors, precision_option

EXTRA_HINT = "pip install 'crossmodal-search[serve]'"


@click.command("serve")
@click.option("--index", "indexes", multiple=True, metavar="[NAME=]PATH",
              help="An index to serve, named NAME in the page and API [default: $CROSSMODAL_INDEX or .crossmodal]. "
                   "Repeatable.")
@click.option("--catalog", "catalog_url", metavar="URL", default=None,
              help="The PostgreSQL catalog of the served index folders that have none recorded yet.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; any but loopback needs --token or --insecure-no-token.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0 picks a free port.")
@click.option("--token", envvar="CROSSMODAL_TOKEN", show_envvar=True, default=None,
              help="Secret every API request must carry (bearer token, or the page's login).")
@click.option("--insecure-no-token", is_flag=True, help="Allow a non-loopback --host without a token.")
@click.option("--cors", multiple=True, metavar="ORIGIN", help="Let pages from ORIGIN call the API. Repeatable.")
@click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where thumbnails are kept [default: ~/.cache/crossmodal/thumbs].")
@click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Queries encoded at once.")
@click.option("--queue", type=click.IntRange(0, 10_000), default=32, show_default=True,
              help="Queries that may wait for a worker; more get 503 with Retry-After.")
@click.option("--max-upload-mb", type=click.FloatRange(0, min_open=True), default=20.0, show_default=True,
              help="Largest query image accepted.")
@click.option("--max-megapixels", type=click.FloatRange(0, min_open=True), default=100.0, show_default=True,
              help="Largest query image or thumbnail source decoded, read from its header.")
@click.option("--model", envvar="CROSSMODAL_MODEL", default=None, help="Model to load [default: each index's own].")
@click.option("--pretrained", envvar="CROSSMODAL_PRETRAINED", default=None,
              help="Where the model's weights are, if they moved since indexing.")
@click.option("--device", envvar="CROSSMODAL_DEVICE", default="auto", show_default=True,
              help="auto, cpu or cuda[:N].")
@precision_option
@domain_errors
def serve_cmd(indexes, catalog_url, host, port, token, insecure_no_token, cors, cache_dir, workers, queue,
              max_upload_mb, max_megapixels, model, pretrained, device, precision):
    """Serve indexes over HTTP: a search page at / and a JSON API under /api (OpenAPI at /docs).

    \b
    crossmodal serve --index .demo/index
    crossmodal serve --index photos=~/idx/photos --index shapes=.demo/index
    crossmodal serve --host 0.0.0.0 --token "$(openssl rand -hex 16)"
    """
    from .serve.settings import ServeSettings, check_exposure, parse_indexes

    default = os.environ.get("CROSSMODAL_INDEX", ".crossmodal")
    served = parse_indexes(indexes or (default,))
    if catalog_url:
        from indexer.location import bind_catalog

        for folder in served.values():
            bind_catalog(folder, catalog_url)
    settings = ServeSettings(served, host=host, port=port, token=token or None,
                             insecure_no_token=insecure_no_token, cors=tuple(cors), cache_dir=cache_dir,
                             device=device, precision=precision, workers=workers, queue=queue,
                             max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_megapixels=max_megapixels,
                             model=model, pretrained=pretrained)
    warning = check_exposure(settings)
    # The CLI asks OpenMP's threads to sleep at barriers (OMP_WAIT_POLICY=PASSIVE, which leaves the cores
    # to indexing's decoder processes, see cli.py). A server's encoding thread has the cores to itself,
    # and waking its threads at each of a query's ops made a demo text query's encode 2-3x as long.
    # An explicit spin count wins over the policy; this one is libgomp's default when no policy is set.
    # libgomp reads it once, when torch loads it.
    os.environ.setdefault("GOMP_SPINCOUNT", "300000")
    try:
        from .serve.server import run
    except ImportError as exc:
        raise click.ClickException(f"serving needs {exc.name}: {EXTRA_HINT}") from None
    if warning:
        click.echo(f"warning: {warning}", err=True)
    run(settings, say=lambda line: click.echo(line, err=True))
