"""``crossmodal data synth`` and ``crossmodal train``: the commands that make corpora and models."""

from __future__ import annotations

import json
from pathlib import Path

import click

from indexer.layout import DATA_ENV, data_dir

from .options import domain_errors, json_option


@click.group("data")
def data_group() -> None:
    """Generated corpora."""


@data_group.command("synth")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder to write [default: synth-N-seedSEED in the data folder: $CROSSMODAL_DATA, or data/ "
                   "of the source checkout].")
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

    if out is None:
        data = data_dir()
        if data is None:
            raise click.UsageError("no --out given and no data folder to default to (not running from a source "
                                   f"checkout, and {DATA_ENV} is unset): pass --out DIR")
        # n and seed in the name so that corpora of other sizes or seeds do not overwrite each other
        out = data / f"synth-{n}-seed{seed}"
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


@click.command("train")
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
    # fp32 weights: bf16 ones would round away the small updates that training makes
    encoder = load_encoder(model, pretrained or default_pretrained(model), device, precision="fp32")
    summary = train(encoder, pairs, val, TrainOptions(out=out, **settings), resume=resume)
    if as_json:
        click.echo(json.dumps(summary.__dict__))
        return
    click.echo(f"{summary.steps} steps ({summary.epochs} epochs) in {summary.seconds:.0f}s, "
               f"{summary.samples_per_second:.0f} samples/s, loss {summary.loss:.3f}")
    for direction, figures in summary.validation.items():
        click.echo(f"val {direction}: " + "  ".join(f"{k} {figures[k]:.3f}" for k in ("R@1", "R@5", "R@10")))
    click.echo(f"weights: {summary.weights}  (use with --model {model} --pretrained {summary.weights})")
