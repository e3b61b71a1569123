"""The ``crossmodal`` command: a thin layer that parses, validates and calls the library.

Every command turns :class:`indexer.errors.CrossmodalError` into one line on stderr and exit code 1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

# Decoder processes share the CPU with torch's OpenMP threads. Threads that sleep at barriers
# instead of spinning leave those cycles to the decoders: +7% end-to-end on 2 cores
# (bench/index_throughput.py). libgomp reads this when torch is first imported, so it goes first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click  # noqa: E402
from click.core import ParameterSource  # noqa: E402

from indexer.spec import IndexSpec  # noqa: E402

from .cli_filters import filter_options  # noqa: E402
from .cli_serve import serve_cmd  # noqa: E402
from .cli_train import data_group, train_cmd  # noqa: E402
from .cli_vectors import duplicates_cmd, echo_build, export_cmd, reindex_cmd, verify_cmd  # noqa: E402
from .options import (  # noqa: E402
    ProgressBars,
    domain_errors,
    engine_options,
    index_option,
    index_type_options,
    json_option,
    model_options,
    printable,
)

# What loads a model (torch, open_clip) or opens an index (SQLAlchemy, faiss) is imported inside the commands
# that do, so that --help and the commands that only read an index start fast.
if TYPE_CHECKING:
    from indexer.pipeline import IndexSummary

    from .searcher import Hit


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="crossmodal-search")
def cli() -> None:
    """Cross-modal search over image folders and captions with OpenCLIP, FAISS and SQLite."""


@cli.command("index")
@click.argument("root", type=click.Path(path_type=Path, file_okay=False), required=False)
@click.option("--embeddings", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Import precomputed vectors in clip-retrieval's layout (img_emb/, text_emb/, metadata/) "
                   "instead of encoding a folder; --model/--pretrained name the model that made them.")
@click.option("--images-root", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="With --embeddings: where relative image_path values point [default: the embeddings folder].")
@index_option
@model_options
@click.option("--captions", "captions", multiple=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Captions file: JSONL, CSV or TSV with image and caption columns. Repeatable.")
@click.option("--texts", "texts", multiple=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Standalone texts: one per line, or JSONL with a text field. Repeatable.")
@click.option("--include-hidden", is_flag=True, help="Also index hidden files and folders.")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Skip paths matching GLOB. Repeatable.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=32, show_default=True)
@click.option("--workers", type=click.IntRange(0, 64), default=None,
              help="Decoder processes (0 = decode in the main process) [default: one per core, max 16].")
@click.option("--decode", type=click.Choice(["auto", "cpu", "device"]), default="auto", show_default=True,
              help="Where JPEGs are decoded: CPU decoder processes, or in batches on the model's device "
                   "(nvJPEG on a GPU); auto: the device when the model runs on CUDA.")
@index_type_options()
@click.option("--max-megapixels", type=click.FloatRange(0, min_open=True), default=100.0, show_default=True,
              help="Skip images with more pixels than this (decompression bombs, huge scans), read from the header.")
@click.option("--decode-timeout", type=click.FloatRange(0, min_open=True), default=60.0, show_default=True,
              help="Seconds a decoder may spend on one file; a file that hangs or crashes it is skipped.")
@click.option("--retry-skipped", is_flag=True,
              help="Try every skipped file again [default: only those a changed setting or Pillow may help].")
@click.option("--allow-empty", is_flag=True,
              help="Let a ROOT that holds no images any more remove all its images from the index.")
@click.option("--flush-seconds", type=click.FloatRange(0), default=30.0, show_default=True,
              help="How often vector files are written during a run (the catalog commits every batch).")
@engine_options
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("-v", "--verbose", is_flag=True, help="After the run, list each file the image libraries warned "
                                                    "about, with what they said.")
@json_option
@domain_errors
def index_cmd(root, embeddings, images_root, index_dir, model, pretrained, device, precision, captions, texts,
              include_hidden, exclude, batch_size, workers, decode, spec, max_megapixels, decode_timeout,
              retry_skipped, allow_empty, flush_seconds, engine, ray_address, progress, verbose, as_json):
    """Index the images (and captions) under ROOT; re-run to update incrementally.

    \b
    crossmodal index ~/Pictures
    crossmodal index photos/ --captions captions.jsonl --texts notes.txt
    crossmodal index photos/ --index-type auto --memory-budget 4GB
    crossmodal index --embeddings laion_embeddings/ --model ViT-B-32 --index-type ivfpq
    crossmodal index photos/ --engine ray --ray-address head-node:6379
    """
    if (root is None) == (embeddings is None):
        raise click.UsageError("give a folder ROOT to index, or --embeddings DIR to import")
    from indexer.pipeline import IndexOptions, update_index
    from indexer.store import open_encoder

    encoder = open_encoder(index_dir, model, pretrained, device, precision)
    if embeddings is not None:
        from indexer.embeddings import import_embeddings

        summary = import_embeddings(embeddings, index_dir, encoder.identity, spec, images_root, engine, ray_address)
    else:
        options = IndexOptions(captions=tuple(captions), texts=tuple(texts), include_hidden=include_hidden,
                               exclude=tuple(exclude), batch_size=batch_size, workers=workers, decode=decode,
                               spec=spec, max_megapixels=max_megapixels, decode_timeout=decode_timeout,
                               retry_skipped=retry_skipped, allow_empty=allow_empty, flush_seconds=flush_seconds,
                               progress=ProgressBars(bars=progress and not as_json), engine=engine,
                               ray_address=ray_address)
        summary = update_index(root, index_dir, encoder, options)
    if as_json:
        click.echo(json.dumps(summary.as_dict(), indent=2))
        return
    _print_index_summary(summary, verbose)


def _counted(counts: dict[str, int], shown: int = 8) -> str:
    """"a 40, b 12, ..." for counts already ordered most first."""
    parts = [f"{printable(key or '(no extension)')} {n:,}" for key, n in list(counts.items())[:shown]]
    return ", ".join(parts + (["..."] if len(counts) > shown else []))


def _files(count: int, singular: str, plural: str | None = None) -> str:
    return f"{count:,} {singular if count == 1 else plural or singular + 's'}"


def _print_index_summary(summary: IndexSummary, verbose: bool = False) -> None:
    for problem in summary.problems:
        click.echo(f"warning: {printable(problem)}", err=True)
    click.echo(f"indexed {printable(summary.root)} into {printable(summary.index)}")
    click.echo(f"  images: {summary.added} added, {summary.updated} updated, {summary.moved} moved, "
               f"{summary.removed} removed, {summary.unchanged} unchanged, {summary.skipped} skipped")
    if summary.retried:
        click.echo(f"  retried {_files(summary.retried, 'skipped file')} (a setting they depended on changed, "
                   "or --retry-skipped)")
    if summary.unreadable:
        click.echo(f"  could not read {_files(summary.unreadable, 'folder or file', 'folders or files')} (see the "
                   f"warnings); kept {_files(summary.kept_unread, 'image')} indexed there")
    if summary.other_types:
        click.echo(f"  {_files(sum(summary.other_types.values()), 'file')} of other types not indexed: "
                   f"{_counted(summary.other_types)}")
    if summary.special_files:
        click.echo(f"  {_files(sum(summary.special_files.values()), 'special file')} (FIFO, socket, device) not "
                   f"read: {_counted(summary.special_files)}")
    click.echo(f"  texts:  {summary.texts_added} added, {summary.texts_removed} removed, "
               f"{summary.texts_unchanged} unchanged")
    click.echo(f"  encoded {summary.encoded_images} images, {summary.encoded_texts} texts; "
               f"{summary.duplicates} duplicates reused")
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in summary.stages.items())
    rate = f" ({summary.images_per_second:.1f} images/s)" if summary.images_per_second else ""
    click.echo(f"  {summary.seconds:.2f}s{rate}: {stages}")
    if summary.build:
        echo_build(summary.build)
    _echo_library_warnings(summary.warned, verbose)


def _echo_library_warnings(warned: dict[str, list[str]], verbose: bool) -> None:
    if not warned:
        return
    if not verbose:
        click.echo(f"  {len(warned)} file{'s' * (len(warned) != 1)} had library warnings "
                   "(see --verbose, or crossmodal info --warnings)")
        return
    click.echo(f"library warnings ({len(warned)} files):")
    for path, lines in warned.items():
        click.echo(f"  {printable(path)}")
        for line in lines:
            click.echo(f"      {printable(line)}")


@cli.command("search")
@click.argument("query", required=False)
@click.option("--image", "images", multiple=True, metavar="[W:]PATH",
              help="Search with this image (repeatable; terms add up, see below).")
@click.option("--text", "texts", multiple=True, metavar="[W:]TEXT", help="A text term (repeatable).")
@click.option("--like", "likes", multiple=True, metavar="[W:]ID",
              help="More like this indexed item (an id from search --json; repeatable).")
@click.option("--not", "nots", multiple=True, metavar="[W:]TEXT", help="Less like this text (repeatable).")
@click.option("--mode", type=click.Choice(["vector", "keyword", "hybrid", "fused"]), default="vector",
              show_default=True, help="For a text QUERY: the model; the words of captions, texts and file names; "
                                      "both rankings fused; or (to images) each image with its captions as one.")
@click.option("--hide-duplicates", is_flag=True, help="Show one of each group of near-identical results.")
@click.option("--to", "target", type=click.Choice(["image", "text"]), default=None,
              help="What to find [default: images for a text query, texts for an image query].")
@click.option("-k", "--top-k", "k", type=int, default=10, show_default=True, help="Number of results.")
@click.option("--nprobe", type=int, default=None, help="ivf/ivfpq: lists to search [default: the index's].")
@click.option("--ef-search", type=int, default=None, help="hnsw: search beam [default: the index's].")
@click.option("--rerank", type=int, default=None, help="ivfpq/lsh/itq: candidates re-scored exactly.")
@click.option("--no-server", is_flag=True, help="Search in this process even when `crossmodal serve` serves the index.")
@filter_options
@index_option
@model_options
@json_option
@domain_errors
def search_cmd(query, images, texts, likes, nots, mode, hide_duplicates, target, k, nprobe, ef_search, rerank,
               no_server, filters, index_dir, model, pretrained, device, precision, as_json):
    """Search the index by text (QUERY), by --image, or by several terms added up.

    \b
    crossmodal search "a dog on a beach"
    crossmodal search "a dog on a beach" --to text
    crossmodal search --image query.jpg --to image -k 5
    crossmodal search "a dog on a beach" --nprobe 64      # more recall from an ivf index, this once
    crossmodal search "a beach" --image dog.jpg --not "people"          # terms add up
    crossmodal search --text "2:a red car" --like 1234 --not 0.5:night  # W: weighs a term
    crossmodal search "IMG_1234.jpg" --mode keyword                      # words, not the model
    crossmodal search "a beach" --taken 2023-06-01..2023-08-31 --camera canon --in trips/

    Each term is encoded and made unit length, multiplied by its weight (1 unless W: says; --not
    negates it), and their sum, made unit length again, is the query. Items given with --like
    are left out of the results.
    """
    from .terms import Term, cli_terms

    terms = ([Term(text=query)] if query is not None else []) + cli_terms(texts, images, likes, nots)
    if not terms:
        raise click.UsageError("give a text QUERY, --image PATH, or terms (--text, --like, --not)")
    if mode != "vector" and (query is None or len(terms) > 1):
        raise click.UsageError(f"--mode {mode} takes a text QUERY alone")
    settings = {"nprobe": nprobe, "ef_search": ef_search, "rerank": rerank}
    to = target or ("text" if all(term.image is not None for term in terms) else "image")
    answer = None
    local = any(term.image is not None for term in terms) and len(terms) > 1  # image files + terms: in-process
    if not no_server and not local and model is None and pretrained is None:  # a server has the index's model
        from .serve.client import ask
        from .serve.runtime import server_for

        found = server_for(index_dir)
        if found:
            answer = ask(found[0], found[1], terms=terms, to=to, k=k, settings=settings, mode=mode,
                         hide_duplicates=hide_duplicates, filters=filters)
    if answer is None:
        from .searcher import Searcher

        with Searcher.open(index_dir, model=model, pretrained=pretrained, device=device, precision=precision,
                           settings=settings) as opened:
            searcher = opened.filtered(filters)

            def ask_here(depth: int):
                if mode != "vector":
                    return searcher.answer_text(query, to=to, k=depth, mode=mode)
                return searcher.answer_terms(terms, to=to, k=depth)

            if hide_duplicates:
                from .duplicates import without_duplicates

                answer = without_duplicates(searcher, ask_here, k)
            else:
                answer = ask_here(k)
    hits = answer.hits
    for note in answer.notes:
        click.echo(f"note: {printable(note)}", err=True)
    if as_json:
        click.echo(json.dumps([h.as_dict() for h in hits], indent=2, ensure_ascii=False))
    else:
        _print_hits(hits)


def _print_fusion(index_dir: Path, ks: list[int], as_json: bool) -> None:
    from .fusion import evaluate_fusion

    result = evaluate_fusion(index_dir, ks)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"text->image over {result['images']:,} images with 2+ captions, {result['queries']:,} caption queries "
               "(the first caption of each image is its text):")
    click.echo(f"{'':<20}" + "".join(f"{'R@' + str(k):>8}" for k in ks))
    best = max(result["table"], key=lambda label: result["table"][label][f"R@{ks[0]}"])
    for label, row in result["table"].items():
        mark = "  <- best" if label == best else ""
        click.echo(f"{label:<20}" + "".join(f"{row[f'R@{k}'] * 100:>8.1f}" for k in ks) + mark)


def _print_hits(hits: list[Hit]) -> None:
    if not hits:
        click.echo("no results: the index holds nothing of that kind")
        return
    click.echo(f"{'rank':>4}  {'score':>6}  result")
    for hit in hits:
        if hit.kind == "image":
            line = printable(hit.path)
        else:
            line = printable(repr(hit.text)) + (f"  [{printable(hit.path)}]" if hit.path else "")
        click.echo(f"{hit.rank:>4}  {hit.score:6.3f}  {line}")


@cli.command("info")
@index_option
@click.option("--skipped", is_flag=True, help="List the files that could not be indexed, with the reason.")
@click.option("--warnings", "warned", is_flag=True,
              help="List the files the image libraries warned about while decoding, with what they said.")
@json_option
@domain_errors
def info_cmd(index_dir, skipped, warned, as_json):
    """Show the model, counts, index type and sizes of an index."""
    from indexer.store import IndexStore

    with IndexStore.open(index_dir) as store:
        info = store.info()
        skipped_items = [{"path": v.path, "error": v.error} for v in store.catalog.skipped()] if skipped else None
        warned_items = [{"path": v.path, "warnings": v.warnings.splitlines()}
                        for v in store.catalog.images() if v.warnings] if warned else None
    if skipped_items is not None:
        info["skipped"] = skipped_items
    if warned_items is not None:
        info["warnings"] = warned_items
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for note in info["notes"]:
        click.echo(f"note: {note}", err=True)
    m, c = info["model"], info["counts"]
    weights = m["pretrained"] + (f" (sha256 {m['checkpoint_sha256'][:12]})" if m["checkpoint_sha256"] else "")
    click.echo(f"index:    {printable(info['index'])} (schema v{info['schema_version']})")
    click.echo(f"catalog:  {printable(info['catalog'])}")
    click.echo(f"model:    {printable(m['name'])} / {printable(weights)}, {m['embed_dim']}-d, "
               f"open_clip {m['open_clip_version']}")
    spec = IndexSpec(**info["index_spec"])
    tuned = spec.params.get("tuned")
    recall = f"; recall@10 {', '.join(f'{m} {r:.3f}' for m, r in tuned['recall'].items())}" if tuned else ""
    chosen = " (chosen by auto)" if "auto" in spec.params else ""
    click.echo(f"type:     {spec.describe()}{chosen}{recall}")
    click.echo(f"items:    {c['image']} images, {c['caption']} captions, {c['text']} texts, {c['skipped']} skipped")
    made_in = ", ".join(f"{n} {precision}" for precision, n in sorted(info["precisions"].items()))
    click.echo(f"vectors:  {info['vectors']['image']} image, {info['vectors']['text']} text"
               + (f" (made in {made_in})" if made_in else ""))
    click.echo(f"roots:    {printable(', '.join(info['roots'])) or '-'}")
    click.echo("disk:     " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in info["disk_bytes"].items()))
    for item in skipped_items or []:
        click.echo(f"skipped:  {printable(item['path'])}: {printable(item['error'])}")
    for item in warned_items or []:
        click.echo(f"warnings: {printable(item['path'])}")
        for line in item["warnings"]:
            click.echo(f"      {printable(line)}")


@cli.command("eval")
@index_option
@click.option("--karpathy", "karpathy_json", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              default=None, help="Karpathy split JSON (dataset_coco.json, dataset_flickr30k.json): index the "
                                 "split into its own index (reused when files and model match), then evaluate.")
@click.option("--images-root", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder of the JSON's images [default: the JSON's folder].")
@click.option("--split", default="test", show_default=True, help="Split of the Karpathy JSON.")
@model_options
@click.option("--k", "ks", default="1,5,10", show_default=True, help="Comma-separated k values.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write recall@k curves (k = 1..100, both directions, index vs exact) to this PNG.")
@click.option("--save-run", is_flag=True, help="Store the result in the index's catalog.")
@click.option("--history", is_flag=True, help="List the saved runs of this index instead of evaluating.")
@click.option("--fusion", is_flag=True,
              help="Text->image R@k of an image scored by its vector, its text, and fusions of both (one caption "
                   "per image is its text, the others are the queries).")
@json_option
@domain_errors
def eval_cmd(index_dir, karpathy_json, images_root, split, model, pretrained, device, precision, ks, plot_path,
             save_run,
             history, fusion, as_json):
    """Recall@k text->image and image->text, through the index and exact.

    Evaluates the captions of an index built by `crossmodal index`, or a split of a Karpathy JSON.
    """
    from .evaluate import evaluate_index, history_of
    from .evaluate import save_run as store_run
    from .plot import CURVE_K, plot_recall

    if history:
        _print_history(history_of(index_dir), as_json)
        return
    try:
        k_values = sorted({int(k) for k in ks.split(",") if k.strip()})
    except ValueError:
        raise click.BadParameter(f"'{ks}' is not a comma-separated list of integers", param_hint="--k") from None
    if fusion:
        _print_fusion(index_dir, k_values, as_json)
        return
    curve_k = CURVE_K if plot_path else 0
    source = "index"
    if karpathy_json:
        from indexer.store import encoder_for, open_encoder

        from .benchmark import evaluate_karpathy

        explicit = click.get_current_context().get_parameter_source("index_dir") != ParameterSource.DEFAULT
        encoder = open_encoder(index_dir, model, pretrained, device, precision) if explicit else \
            encoder_for(None, model, pretrained, device, precision)
        run = evaluate_karpathy(karpathy_json, encoder, images_root=images_root, split=split,
                                index_dir=index_dir if explicit else None, ks=k_values, curve_k=curve_k,
                                progress=None if as_json else ProgressBars())
        result, index_dir, source = run.evaluation, run.index_dir, f"karpathy:{karpathy_json.resolve()}:{split}"
        if run.missing_images:
            click.echo(f"note: {run.missing_images} images of split '{printable(split)}' not found under the images "
                       "root; evaluated without them", err=True)
    else:
        result = evaluate_index(index_dir, k_values, curve_k)
    if plot_path:
        plot_recall(result, plot_path)
    if save_run:
        store_run(index_dir, result, source)
    if as_json:
        click.echo(json.dumps(result.as_dict()))
        return
    _print_evaluation(result, k_values)
    click.echo(f"index: {printable(index_dir)}" + (f"   plot: {printable(plot_path)}" if plot_path else "")
               + ("   saved: see crossmodal eval --history" if save_run else ""))


def _print_evaluation(result, k_values: list[int]) -> None:
    counts = result.counts
    click.echo(f"model: {printable(result.model)}   index: {result.index_kind}")
    click.echo(f"{counts['caption_queries']} captions of {counts['image_queries']} images "
               f"(gallery: {counts['images']} images, {counts['texts']} texts)")
    for key in ("images_without_captions", "texts_without_image", "duplicate_captions"):
        if counts[key]:
            click.echo(f"note: {counts[key]} {key.replace('_', ' ')}")
    click.echo(f"{'direction':<15}{'search':<8}" + "".join(f"{'R@' + str(k):>8}" for k in k_values)
               + f"{'agree@' + str(k_values[-1]):>10}{'queries/s':>11}")
    for name, figures in (("text->image", result.text_to_image), ("image->text", result.image_to_text)):
        for search in ("index", "exact"):
            row = f"{name:<15}{search:<8}" + "".join(f"{figures[search][f'R@{k}']:>8.3f}" for k in k_values)
            if search == "index":
                row += f"{figures['ann_agreement'][f'@{k_values[-1]}']:>10.3f}{figures['queries_per_second']:>11.0f}"
            click.echo(row)
    true = result.image_to_text["exact"].get("true_recall")
    if true:
        click.echo(f"{'image->text':<15}{'true':<8}" + "".join(f"{true[f'R@{k}']:>8.3f}" for k in k_values)
                   + "   (share of each image's captions in the top k)")
    t2i, i2t = result.text_to_image["exact"], result.image_to_text["exact"]
    click.echo(f"rank of first hit (exact): text->image mean {t2i['mean_rank']:.1f} median {t2i['median_rank']:.0f}; "
               f"image->text mean {i2t['mean_rank']:.1f} median {i2t['median_rank']:.0f}")


def _print_history(runs, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([run.__dict__ for run in runs]))
        return
    if not runs:
        click.echo("no saved runs; evaluate with --save-run")
        return
    click.echo(f"{'id':>4}  {'when':<26}{'index':<8}{'t2i R@1':>8}{'R@5':>7}{'R@10':>7}{'i2t R@1':>9}{'R@5':>7}"
               f"{'R@10':>7}  model")
    for run in runs:
        t2i, i2t = run.result["text_to_image"]["index"], run.result["image_to_text"]["index"]
        cells = [t2i.get(k) for k in ("R@1", "R@5", "R@10")] + [i2t.get(k) for k in ("R@1", "R@5", "R@10")]
        text = "".join(f"{c:>7.3f} " if c is not None else f"{'-':>7} " for c in cells)
        click.echo(f"{run.id:>4}  {run.created_at:<26}{run.result.get('index_kind', '?'):<8}{text} "
                   f"{printable(run.model)}")


cli.add_command(data_group)
cli.add_command(train_cmd)
cli.add_command(reindex_cmd)
cli.add_command(export_cmd)
cli.add_command(verify_cmd)
cli.add_command(duplicates_cmd)
cli.add_command(serve_cmd)


def main() -> None:
    cli(prog_name="crossmodal")


if __name__ == "__main__":
    main()
