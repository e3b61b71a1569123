"""``crossmodal reindex``, ``export`` and ``verify``: the commands that rebuild, write out or check stored vectors."""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path

import click

from .options import domain_errors, engine_options, index_option, index_type_options, json_option


def echo_build(build: dict) -> None:
    trained = ", ".join(f"{m} on {n:,} vectors" for m, n in build["trained"].items())
    click.echo(f"  index type: {build['spec']}" + (f"; trained {trained}" if trained else ""))
    for modality, count in build.get("exact", {}).items():
        click.echo(f"  {modality}: {count:,} vectors are too few to train this type; searched exactly until there "
                   "are enough")
    for modality, t in build["tuning"].items():
        state = "reaches" if t["reached"] else "stays below"
        click.echo(f"  tuned {modality}: {t['setting']}={t['value']} {state} the target, recall@10 {t['recall']:.3f} "
                   f"over {t['queries']} {t['queries_from']} queries")


@click.command("export")
@click.argument("out", type=click.Path(path_type=Path, file_okay=False))
@index_option
@click.option("--format", "fmt", type=click.Choice(["parquet", "jsonl"]), default="parquet", show_default=True,
              help="Metadata file format.")
@json_option
@domain_errors
def export_cmd(out, index_dir, fmt, as_json):
    """Write the index's vectors as clip-retrieval's embeddings layout (readable by index --embeddings).

    \b
    crossmodal export embeddings/ --index photos.idx
    """
    from indexer.embeddings import export_embeddings

    result = export_embeddings(index_dir, out, fmt)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"wrote {result['rows']:,} rows ({result['images']:,} images, {result['texts']:,} texts) in "
               f"{result['shards']} shard(s) to {result['out']}")


@click.command("reindex")
@index_option
@index_type_options(required=True)
@click.option("--device", envvar="CROSSMODAL_DEVICE", default="auto", show_default=True, show_envvar=True,
              help="auto, cpu or cuda: where faiss trains IVF (GPU only with faiss-gpu installed).")
@engine_options
@json_option
@domain_errors
def reindex_cmd(index_dir, spec, device, engine, ray_address, as_json):
    """Rebuild the vector index as another type from the stored vectors (nothing is encoded again).

    \b
    crossmodal reindex --index-type hnsw
    crossmodal reindex --index-type ivfpq --pq-bytes 32 --target-recall 0.95
    crossmodal reindex --index-type auto --memory-budget 2GB
    crossmodal reindex --index-type ivfpq --shards 16 --engine ray   # bigger than RAM, shards on Ray
    """
    from indexer.build import reindex

    report = reindex(index_dir, spec, device, engine, ray_address)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
        return
    click.echo(f"rebuilt {index_dir} in {report.seconds:.1f}s")
    echo_build(report.as_dict())


@click.command("verify")
@index_option
@click.option("--repair", is_flag=True, help="Rebuild vector files from the catalog and remove leftovers.")
@click.option("--files/--no-files", "check_files", default=True, show_default=True,
              help="Also check that indexed image files are still on disk.")
@json_option
@domain_errors
def verify_cmd(index_dir, repair, check_files, as_json):
    """Check that catalog and vector files agree (and repair them from stored vectors); exit 1 if not.

    \b
    crossmodal verify
    crossmodal verify --repair
    """
    from indexer.verify import verify

    report = verify(index_dir, repair, check_files)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    elif report.catalog_damaged:
        click.echo(f"index:   {report.index}")
        for problem in report.catalog_problems:
            click.echo(f"catalog: {problem}")
        click.echo(report.catalog_damaged)
    else:
        state = "current" if report.schema_version == report.schema_expected else f"expected {report.schema_expected}"
        click.echo(f"index:   {report.index} (schema v{report.schema_version}, {state})")
        for modality, check in report.vectors.items():
            held = "-" if check.file is None else f"{check.file:,}"
            verdict = "ok" if check.ok else (check.problem or f"{check.missing:,} missing, {check.extra:,} extra, "
                                                               f"{check.duplicates:,} duplicated")
            click.echo(f"{modality + ':':8s} catalog {check.catalog:,}, file {held}: {verdict}")
        for name in report.temp_files:
            click.echo(f"leftover: {name}")
        for action in report.repaired:
            click.echo(f"repaired: {action}")
        if report.missing_files:
            click.echo(f"{len(report.missing_files):,} indexed images are no longer on disk, e.g. "
                       f"{report.missing_files[0]}; run `crossmodal index` on their folder to drop them")
        click.echo("ok" if report.ok else "problems found" + ("" if repair else "; run with --repair"))
    if not report.ok:
        raise SystemExit(1)


@click.command("duplicates")
@index_option
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Cosine similarity from which two images are copies [default: 0.98, chosen for the demo model; "
                   "measure yours with bench/duplicates.py].")
@click.option("--progress/--no-progress", default=True, show_default=True)
@json_option
@domain_errors
def duplicates_cmd(index_dir, threshold, progress, as_json):
    """Groups of near-identical images: re-encoded, resized, lightly cropped or brightened copies.

    \b
    crossmodal duplicates --index photos.idx
    crossmodal duplicates --threshold 0.95 --json > groups.json
    """
    from indexer.store import IndexStore

    from .duplicates import DEFAULT_THRESHOLD, find_groups

    with IndexStore.open(index_dir, read_only=True) as store:
        shown = progress and not as_json
        bar = click.progressbar(length=max(1, store.catalog.counts()["vectors"]), label="comparing", file=sys.stderr)
        with bar if shown else nullcontext():
            done = [0]

            def on_progress(finished: int, _total: int) -> None:
                bar.update(finished - done[0])
                done[0] = finished

            groups = find_groups(store, threshold or DEFAULT_THRESHOLD, on_progress=on_progress if shown else None)
    if as_json:
        click.echo(json.dumps([{"ids": list(g.ids), "keep": g.keep, "exact": g.exact, "min_score": g.min_score,
                                "paths": [g.paths.get(i) for i in g.ids]} for g in groups], indent=2))
        return
    if not groups:
        click.echo("no near-duplicates")
        return
    copies = sum(len(g.ids) - 1 for g in groups)
    click.echo(f"{len(groups)} groups, {copies} copies beyond the one to keep:")
    for group in groups:
        kind = "exact" if group.exact else f"similarity >= {group.min_score:.3f}"
        click.echo(f"  {len(group.ids)} images ({kind}):")
        for item_id in group.ids:
            mark = "keep" if item_id == group.keep else "    "
            click.echo(f"    {mark} {item_id:>7}  {group.paths.get(item_id)}")
