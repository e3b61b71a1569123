"""The ``crossmodal`` command: a thin layer that parses, validates and calls the library.

Every command turns :class:`indexer.errors.CrossmodalError` into one line on stderr and exit code 1.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

# Decoder processes share the CPU with torch's OpenMP threads. Threads that sleep at barriers
# instead of spinning leave those cycles to the decoders: +7% end-to-end on 2 cores
# (bench/index_throughput.py). libgomp reads this when torch is first imported, so it goes first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click  # noqa: E402

from indexer import DEFAULT_INDEX_DIR, IndexOptions, IndexSpec, update_index  # noqa: E402
from indexer.errors import CrossmodalError  # noqa: E402
from indexer.store import IndexStore, open_encoder  # noqa: E402

from .searcher import Hit, Searcher  # noqa: E402


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="crossmodal-search")
def cli() -> None:
    """Cross-modal search over image folders and captions with OpenCLIP, FAISS and SQLite."""


@cli.command("index")
@click.argument("root", type=click.Path(path_type=Path, file_okay=False))
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
@click.option("--index-type", type=click.Choice(["flat"]), default="flat", show_default=True,
              help="FAISS index kind for a new index.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@json_option
@domain_errors
def index_cmd(root, index_dir, model, pretrained, device, captions, texts, include_hidden, exclude,
              batch_size, workers, index_type, progress, as_json):
    """Index the images (and captions) under ROOT; re-run to update incrementally.

    \b
    crossmodal index ~/Pictures
    crossmodal index photos/ --captions captions.jsonl --texts notes.txt
    """
    encoder = open_encoder(index_dir, model, pretrained, device)
    options = IndexOptions(captions=tuple(captions), texts=tuple(texts), include_hidden=include_hidden,
                           exclude=tuple(exclude), batch_size=batch_size, workers=workers,
                           spec=IndexSpec(kind=index_type), progress=progress)
    summary = update_index(root, index_dir, encoder, options)
    if as_json:
        click.echo(json.dumps(summary.as_dict(), indent=2))
        return
    for problem in summary.problems:
        click.echo(f"warning: {problem}", err=True)
    click.echo(f"indexed {summary.root} into {summary.index}")
    click.echo(f"  images: {summary.added} added, {summary.updated} updated, {summary.moved} moved, "
               f"{summary.removed} removed, {summary.unchanged} unchanged, {summary.skipped} skipped")
    click.echo(f"  texts:  {summary.texts_added} added, {summary.texts_removed} removed, "
               f"{summary.texts_unchanged} unchanged")
    click.echo(f"  encoded {summary.encoded_images} images, {summary.encoded_texts} texts; "
               f"{summary.duplicates} duplicates reused")
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in summary.stages.items())
    rate = f" ({summary.images_per_second:.1f} images/s)" if summary.images_per_second else ""
    click.echo(f"  {summary.seconds:.2f}s{rate}: {stages}")


@cli.command("search")
@click.argument("query", required=False)
@click.option("--image", "image", type=click.Path(path_type=Path, dir_okay=False),
              help="Search with this image instead of text.")
@click.option("--to", "target", type=click.Choice(["image", "text"]), default=None,
              help="What to find [default: images for a text query, texts for an image query].")
@click.option("-k", "--top-k", "k", type=int, default=10, show_default=True, help="Number of results.")
@index_option
@model_options
@json_option
@domain_errors
def search_cmd(query, image, target, k, index_dir, model, pretrained, device, as_json):
    """Search the index by text (QUERY) or by --image.

    \b
    crossmodal search "a dog on a beach"
    crossmodal search "a dog on a beach" --to text
    crossmodal search --image query.jpg --to image -k 5
    """
    if (query is None) == (image is None):
        raise click.UsageError("give either a text QUERY or --image PATH")
    with Searcher.open(index_dir, model=model, pretrained=pretrained, device=device) as searcher:
        if image is not None:
            hits = searcher.search_image(image, to=target or "text", k=k)
        else:
            hits = searcher.search_text(query, to=target or "image", k=k)
    if as_json:
        click.echo(json.dumps([h.as_dict() for h in hits], indent=2, ensure_ascii=False))
    else:
        _print_hits(hits)


def _print_hits(hits: list[Hit]) -> None:
    if not hits:
        click.echo("no results: the index holds nothing of that kind")
        return
    click.echo(f"{'rank':>4}  {'score':>6}  result")
    for hit in hits:
        if hit.kind == "image":
            line = hit.path
        else:
            line = f"{hit.text!r}" + (f"  [{hit.path}]" if hit.path else "")
        click.echo(f"{hit.rank:>4}  {hit.score:6.3f}  {line}")


@cli.command("info")
@index_option
@click.option("--skipped", is_flag=True, help="List the files that could not be indexed, with the reason.")
@json_option
@domain_errors
def info_cmd(index_dir, skipped, as_json):
    """Show the model, counts, index type and sizes of an index."""
    with IndexStore.open(index_dir) as store:
        info = store.info()
        skipped_items = [{"path": v.path, "error": v.error} for v in store.catalog.skipped()] if skipped else None
    if skipped_items is not None:
        info["skipped"] = skipped_items
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    m, c = info["model"], info["counts"]
    weights = m["pretrained"] + (f" (sha256 {m['checkpoint_sha256'][:12]})" if m["checkpoint_sha256"] else "")
    click.echo(f"index:    {info['index']} (schema v{info['schema_version']})")
    click.echo(f"model:    {m['name']} / {weights}, {m['embed_dim']}-d, open_clip {m['open_clip_version']}")
    click.echo(f"type:     {info['index_spec']['kind']} ({info['index_spec']['metric']})")
    click.echo(f"items:    {c['image']} images, {c['caption']} captions, {c['text']} texts, {c['skipped']} skipped")
    click.echo(f"vectors:  {info['vectors']['image']} image, {info['vectors']['text']} text")
    click.echo(f"roots:    {', '.join(info['roots']) or '-'}")
    click.echo("disk:     " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in info["disk_bytes"].items()))
    for item in skipped_items or []:
        click.echo(f"skipped:  {item['path']}: {item['error']}")


@cli.group("data")
def data_group() -> None:
    """Generated corpora."""


@data_group.command("synth")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True, help="Folder to write.")
@click.option("--n", "n", type=click.IntRange(1), default=2000, show_default=True, help="Number of images.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--test", type=click.IntRange(0), default=None, help="Test images [default: min(1000, n/5)].")
@click.option("--val", type=click.IntRange(0), default=None, help="Validation images [default: min(500, n/10)].")
@click.option("--size", type=click.IntRange(32, 1024), default=128, show_default=True, help="Image side in pixels.")
@json_option
@domain_errors
def synth_cmd(out, n, seed, test, val, size, as_json):
    """Write a deterministic corpus of shape scenes with sidecar captions and a Karpathy JSON."""
    from indexer.synth import write_corpus

    try:
        summary = write_corpus(out, n, seed, test=test, val=val, side=size)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if as_json:
        click.echo(json.dumps(summary.__dict__))
        return
    click.echo(f"wrote {n} images ({', '.join(f'{k} {v}' for k, v in summary.splits.items())}) and "
               f"{summary.captions} captions to {summary.out}")
    click.echo(f"karpathy json: {summary.karpathy_json}")
    if summary.ceiling_test is not None:
        click.echo(f"ceiling: {summary.ceiling_test:.3f} of test captions single out exactly one test image")


@cli.command("train")
@click.argument("source", type=click.Path(path_type=Path, exists=True))
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Run folder: checkpoint.pt and weights.safetensors.")
@click.option("--model", envvar="CROSSMODAL_MODEL", default="ViT-B-32", show_default=True, show_envvar=True,
              help="open_clip model name, or one of our configs (crossmodal-demo) to train from scratch.")
@click.option("--pretrained", envvar="CROSSMODAL_PRETRAINED", default=None, show_envvar=True,
              help="Weights to start from: tag, checkpoint file, or 'none' (random init).")
@click.option("--device", envvar="CROSSMODAL_DEVICE", default="auto", show_default=True, show_envvar=True)
@click.option("--split", default="train", show_default=True, help="Split of a Karpathy JSON SOURCE.")
@click.option("--val", "val_source", type=click.Path(path_type=Path, exists=True), default=None,
              help="Validation pairs (folder or JSON); default: the 'val' split of a JSON SOURCE.")
@click.option("--val-split", default="val", show_default=True)
@click.option("--images-root", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where a Karpathy JSON's images are [default: its folder].")
@click.option("--captions", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Captions file for a folder SOURCE (JSONL/CSV/TSV).")
@click.option("--epochs", type=click.IntRange(1), default=10, show_default=True)
@click.option("--max-steps", type=click.IntRange(1), default=None, help="Stop after this many steps.")
@click.option("--batch-size", type=click.IntRange(2), default=128, show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=5e-4, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(0), default=0.1, show_default=True)
@click.option("--warmup", "warmup_steps", type=click.IntRange(0), default=200, show_default=True)
@click.option("--grad-clip", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--val-every", type=click.IntRange(1), default=500, show_default=True, help="Steps.")
@click.option("--checkpoint-every", type=click.IntRange(1), default=500, show_default=True, help="Steps.")
@click.option("--lock-image", is_flag=True, help="Freeze the image tower.")
@click.option("--lock-text", is_flag=True, help="Freeze the text tower.")
@click.option("--fp16", "fp16_weights", is_flag=True, help="Save the final weights in float16.")
@click.option("--workers", type=click.IntRange(0, 64), default=2, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@json_option
@domain_errors
def train_cmd(source, out, model, pretrained, device, split, val_source, val_split, images_root, captions,
              resume, as_json, **settings):
    """Contrastive training (open_clip ClipLoss) on image-caption pairs; final weights load with --pretrained."""
    from indexer.encoder import default_pretrained, load_encoder
    from indexer.pairs import read_pairs
    from indexer.train import TrainOptions, train

    pairs = read_pairs(source, split=split, images_root=images_root, captions_file=captions)
    if val_source is None and source.suffix.lower() == ".json":
        val_source = source
    val = read_pairs(val_source, split=val_split, images_root=images_root) if val_source else []
    encoder = load_encoder(model, pretrained or default_pretrained(model), device)
    summary = train(encoder, pairs, val, TrainOptions(out=out, **settings), resume=resume)
    if as_json:
        click.echo(json.dumps(summary.__dict__))
        return
    click.echo(f"{summary.steps} steps ({summary.epochs} epochs) in {summary.seconds:.0f}s, "
               f"{summary.samples_per_second:.0f} samples/s, loss {summary.loss:.3f}")
    for direction, figures in summary.validation.items():
        click.echo(f"val {direction}: " + "  ".join(f"{k} {figures[k]:.3f}" for k in ("R@1", "R@5", "R@10")))
    click.echo(f"weights: {summary.weights}  (use with --model {model} --pretrained {summary.weights})")


def main() -> None:
    cli(prog_name="crossmodal")


if __name__ == "__main__":
    main()
