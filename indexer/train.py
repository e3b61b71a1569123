"""Contrastive training and fine-tuning of open_clip models on image–caption pairs.

The loss is open_clip's own ``ClipLoss`` (symmetric InfoNCE with a learnable temperature), the
optimiser AdamW with linear warm-up then cosine decay, gradients clipped, AMP on GPU. The batch
order is a function of (seed, epoch), so ``resume`` continues exactly where a checkpoint stopped.
Final weights are a safetensors state_dict in open_clip's format: ``--pretrained PATH`` loads them.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from open_clip import image_transform
from open_clip.loss import ClipLoss
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .decode import open_image
from .encoder import Encoder
from .errors import CrossmodalError
from .metrics import recall_at_k
from .pairs import PairedImage


@dataclass(frozen=True)
class TrainOptions:
    out: Path
    epochs: int = 10
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 200
    grad_clip: float = 1.0
    seed: int = 0
    val_every: int = 500  # steps; also at the end
    checkpoint_every: int = 500
    lock_image: bool = False
    lock_text: bool = False
    workers: int = 2
    fp16_weights: bool = False  # save the final weights as float16 (half the size)
    max_steps: int | None = None  # stop early (tests, quick runs)
    progress: bool = True


@dataclass
class TrainSummary:
    steps: int
    epochs: float
    seconds: float
    samples_per_second: float
    loss: float
    weights: str
    validation: dict = field(default_factory=dict)


class _PairDataset(Dataset):
    """One sample per image per epoch, with one of its captions chosen by (seed, epoch, index)."""

    def __init__(self, pairs: list[PairedImage], transform, tokenizer, seed: int):
        self.pairs, self.transform, self.tokenizer, self.seed = pairs, transform, tokenizer, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        pair = self.pairs[index]
        rng = random.Random(hash((self.seed, self.epoch, index)))
        caption = pair.captions[rng.randrange(len(pair.captions))]
        return self.transform(open_image(pair.path)), self.tokenizer([caption])[0]


def _lr_at(step: int, total: int, options: TrainOptions) -> float:
    if step < options.warmup_steps:
        return options.lr * (step + 1) / options.warmup_steps
    progress = (step - options.warmup_steps) / max(1, total - options.warmup_steps)
    return options.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]  # full batches only


def validate(encoder: Encoder, pairs: list[PairedImage], batch_size: int = 256) -> dict:
    """Recall@1/5/10 both ways over ``pairs`` (every caption a query; images the gallery)."""
    model_was_training = encoder.model.training
    encoder.model.eval()
    images = []
    for start in range(0, len(pairs), batch_size):
        images.append(encoder.encode_pil([open_image(p.path) for p in pairs[start:start + batch_size]]))
    texts = [c for p in pairs for c in p.captions]
    owners = [i for i, p in enumerate(pairs) for _ in p.captions]
    result = recall_at_k(np.concatenate(images), encoder.encode_texts(texts), owners)
    encoder.model.train(model_was_training)
    return result


def save_checkpoint(path: Path, model, optimizer, scaler, step: int, options: TrainOptions) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "options": {k: str(v) for k, v in asdict(options).items()}}, tmp)
    tmp.replace(path)


def export_weights(model, path: Path, fp16: bool = False) -> Path:
    """The model's state_dict as safetensors, which open_clip's ``pretrained=PATH`` loads."""
    state = {k: (v.half() if fp16 and v.is_floating_point() else v).contiguous().cpu()
             for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return path


def train(encoder: Encoder, train_pairs: list[PairedImage], val_pairs: list[PairedImage],
          options: TrainOptions, resume: bool = False) -> TrainSummary:
    """Train ``encoder.model`` in place on ``train_pairs``; checkpoints and weights go to ``options.out``."""
    if encoder.precision != "fp32":  # bf16 weights round away the small updates training makes
        raise CrossmodalError(f"training needs fp32 weights, not {encoder.precision}: load the model with "
                              "precision='fp32'")
    if len(train_pairs) < options.batch_size:
        raise CrossmodalError(f"{len(train_pairs)} training images is fewer than one batch of {options.batch_size}")
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    _seed_everything(options.seed)
    model, device = encoder.model, encoder.device
    model.train()
    if options.lock_image:
        model.visual.requires_grad_(False)
    if options.lock_text:
        for name, param in model.named_parameters():
            if not name.startswith("visual.") and name != "logit_scale":
                param.requires_grad_(False)
    # No weight decay on gains, biases, embeddings and the temperature, as in open_clip's training.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            plain = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
            (no_decay if plain or "embedding" in name else decay).append(param)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": options.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=options.lr, betas=(0.9, 0.98),
                                  eps=1e-6)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    loss_fn = ClipLoss()

    steps_per_epoch = len(train_pairs) // options.batch_size
    total = steps_per_epoch * options.epochs
    if options.max_steps is not None:
        total = min(total, options.max_steps)
    step = 0
    latest = out / "checkpoint.pt"
    if resume:
        if not latest.is_file():
            raise CrossmodalError(f"nothing to resume: {latest} does not exist")
        state = torch.load(latest, map_location=device, weights_only=True)
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step = int(state["step"])

    transform = image_transform(encoder.image_size, is_train=True)
    dataset = _PairDataset(train_pairs, transform, encoder.tokenizer, options.seed)
    bar = tqdm(total=total, initial=step, unit="step", desc="training", disable=not options.progress)
    validation: dict = {}
    losses: list[float] = []
    start, samples = time.perf_counter(), 0
    while step < total:
        epoch, skip = divmod(step, steps_per_epoch)
        dataset.epoch = epoch
        batches = _batches(len(train_pairs), options.batch_size, options.seed, epoch)[skip:]
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=options.workers,
                            persistent_workers=False)
        for images, tokens in loader:
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, total, options)
            with torch.autocast(device.type, enabled=device.type == "cuda"):
                image_features = model.encode_image(images.to(device, non_blocking=True), normalize=True)
                text_features = model.encode_text(tokens.to(device, non_blocking=True), normalize=True)
                loss = loss_fn(image_features, text_features, model.logit_scale.exp())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            with torch.no_grad():  # open_clip caps the temperature at 100
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            samples += len(images)
            losses.append(loss.item())
            if step % options.checkpoint_every == 0 or step == total:
                save_checkpoint(latest, model, optimizer, scaler, step, options)
            if val_pairs and (step % options.val_every == 0 or step == total):
                validation = validate(encoder, val_pairs)
                model.train()
            bar.set_postfix(_postfix(losses, validation, samples, start))
            bar.update(1)
            if step >= total:
                break
    bar.close()
    seconds = time.perf_counter() - start
    model.eval()
    weights = export_weights(model, out / "weights.safetensors", options.fp16_weights)
    return TrainSummary(step, round(step / max(1, steps_per_epoch), 2), round(seconds, 1),
                        round(samples / max(seconds, 1e-9), 1), round(float(np.mean(losses[-20:])), 4) if losses
                        else float("nan"), str(weights), validation)


def _postfix(losses: list[float], validation: dict, samples: int, start: float) -> dict:
    post = {"loss": f"{np.mean(losses[-20:]):.3f}", "samples/s": f"{samples / (time.perf_counter() - start):.0f}"}
    for direction, short in (("text_to_image", "t2i"), ("image_to_text", "i2t")):
        if direction in validation:
            post[short] = "/".join(f"{validation[direction][f'R@{k}']:.2f}" for k in (1, 5, 10))
    return post
