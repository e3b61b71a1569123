"""The only module that touches torch models and open_clip: load a model, encode images and texts.

A model is named the open_clip way (``ViT-B-32``) with its weights given as a pretrained tag
(``laion2b_s34b_b79k``, downloaded by open_clip on first use), a local checkpoint file
(``.safetensors``, ``.pt``/``.pth``/``.bin`` loaded with ``weights_only=True``) or ``none`` for a
random initialisation (benchmarks and tests). Embeddings come out L2-normalised float32, so inner
products are cosine similarities.

A model runs in one of :data:`PRECISIONS`. ``bf16`` casts weights and inputs to bfloat16 (not autocast:
on a CPU autocast re-casts every weight on every call and is slower than fp32). ``auto`` takes bf16 on a
GPU that has it and on a CPU with bf16 matrix units (:mod:`indexer.hardware`), fp32 elsewhere, where
emulated bf16 is slower. bf16 vectors agree with fp32 ones to a cosine of 0.9999 (README, Performance).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import threading
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from .errors import CrossmodalError, WeightsUnavailable
from .hardware import bf16_units
from .identity import ModelIdentity

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
RANDOM_INIT = "none"
PRECISIONS = ("auto", "fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# Our own architectures (the tiny test model, the demo model) are ordinary open_clip names.
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)
# Weights that ship with the package, used when such a model is named without --pretrained.
BUNDLED_WEIGHTS = {"crossmodal-demo": Path(__file__).parent / "weights" / "crossmodal-demo.safetensors"}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks the first CUDA device when torch sees one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise CrossmodalError(f"unknown device '{device}': use auto, cpu or cuda[:N]") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CrossmodalError(f"device '{device}' asked for, but torch sees no CUDA GPU; use --device cpu")
    if resolved.type not in ("cpu", "cuda"):
        raise CrossmodalError(f"unsupported device '{device}': use auto, cpu or cuda[:N]")
    return resolved


def resolve_precision(precision: str, device: torch.device) -> str:
    """``fp32`` or ``bf16`` for a ``--precision`` value on ``device`` (see the module docstring)."""
    if precision not in PRECISIONS:
        raise CrossmodalError(f"unknown precision '{precision}': use {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        # Ampere and later compute bf16; torch.cuda.is_bf16_supported() also says yes to emulating it (slow)
        supported = torch.cuda.get_device_capability(device)[0] >= 8
        if precision == "bf16" and not supported:
            raise CrossmodalError(f"{torch.cuda.get_device_name(device)} has no bf16; use --precision fp32")
        return "bf16" if precision == "bf16" or (precision == "auto" and supported) else "fp32"
    if precision == "auto":
        return "bf16" if bf16_units() else "fp32"
    return precision


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or "/" in pretrained or pretrained.lower().endswith(CHECKPOINT_SUFFIXES)


_CREATING = threading.Lock()


@contextmanager
def _init_skipped(skip: bool):
    """With ``skip``, torch.nn.init's fillers do nothing while a model is built whose every weight a
    checkpoint then overwrites (open_clip loads full checkpoints strictly, and is told to require them):
    ViT-B-32's random init is 1.4 s of a cold start. Process-wide, so model creation takes turns."""
    with _CREATING:
        if not skip:
            yield
            return
        fillers = {name: getattr(torch.nn.init, name) for name in dir(torch.nn.init)
                   if name.endswith("_") and not name.startswith("_")}
        for name in fillers:
            setattr(torch.nn.init, name, _unchanged)
        try:
            yield
        finally:
            for name, filler in fillers.items():
                setattr(torch.nn.init, name, filler)


def _unchanged(tensor, *_args, **_kwargs):
    return tensor


@contextmanager
def _quiet_loading():
    """open_clip and huggingface_hub log every retry and random init at WARNING; we report ourselves."""
    loggers = [logging.getLogger(), logging.getLogger("huggingface_hub")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _check_model_name(name: str) -> None:
    if name.startswith(("hf-hub:", "local-dir:")) or name in open_clip.list_models():
        return
    close = [m for m in open_clip.list_models() if name.lower().replace("/", "-") in m.lower()][:8]
    hint = f" Did you mean: {', '.join(close)}?" if close else " List them with open_clip.list_models()."
    raise CrossmodalError(f"unknown open_clip model '{name}'.{hint}")


def _resolve_weights(name: str, pretrained: str | None) -> tuple[str | None, str, str | None, str | None]:
    """Return (value for open_clip, identity tag, checkpoint sha256, checkpoint path)."""
    if pretrained is None or pretrained.lower() in ("", RANDOM_INIT):
        return None, RANDOM_INIT, None, None
    path = Path(pretrained).expanduser()
    if path.is_file():
        if path.suffix.lower() not in CHECKPOINT_SUFFIXES + (".npz",):
            raise CrossmodalError(
                f"checkpoint {path}: unsupported file type; use .safetensors, .pt, .pth or .bin"
            )
        resolved = path.resolve()
        return str(resolved), path.name, sha256_file(resolved), str(resolved)
    if _looks_like_path(pretrained):
        raise WeightsUnavailable(f"checkpoint file not found: {pretrained}")
    if not name.startswith(("hf-hub:", "local-dir:")) and open_clip.get_pretrained_cfg(name, pretrained) == {}:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise CrossmodalError(
            f"'{pretrained}' is neither a pretrained tag of {name} nor an existing checkpoint file. "
            f"Known tags: {', '.join(tags) or 'none'}."
        )
    return pretrained, pretrained, None, None


def default_pretrained(name: str) -> str:
    """The weights to use when only a model name is given: the default tag, bundled weights, else ask."""
    if name == DEFAULT_MODEL:
        return DEFAULT_PRETRAINED
    if name in BUNDLED_WEIGHTS and BUNDLED_WEIGHTS[name].is_file():
        return str(BUNDLED_WEIGHTS[name])
    tags = open_clip.list_pretrained_tags_by_model(name)
    choices = f"a tag ({', '.join(tags)}), " if tags else ""
    raise CrossmodalError(
        f"choose weights for {name} with --pretrained: {choices}a checkpoint file, or 'none' for random init"
    )


class Encoder:
    """An open_clip model in eval mode, ready to turn images and texts into unit vectors."""

    def __init__(self, model: torch.nn.Module, preprocess: Callable, tokenizer: Callable,
                 identity: ModelIdentity, device: torch.device, image_size: int, precision: str = "fp32"):
        self.model = model.to(DTYPES[precision])
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.identity = identity
        self.device = device
        self.image_size = image_size
        self.precision = precision  # what the catalog records with each vector this encoder makes

    def _finish(self, features: torch.Tensor) -> np.ndarray:
        features = torch.nn.functional.normalize(features.float(), dim=-1)
        return features.cpu().numpy().astype(np.float32, copy=False)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        """Encode a batch of preprocessed images (N, 3, H, W) into (N, dim) unit vectors."""
        if pixels.shape[0] == 0:
            return np.zeros((0, self.identity.embed_dim), dtype=np.float32)
        pixels = pixels.to(self.device, DTYPES[self.precision], non_blocking=True)
        return self._finish(self.model.encode_image(pixels))

    def encode_pil(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.encode_images(torch.stack([self.preprocess(im) for im in images]))

    def text_overflow(self, text: str) -> int:
        """How many tokens of ``text`` the model will not see (the tokenizer cuts at its context length)."""
        length, encode = getattr(self.tokenizer, "context_length", None), getattr(self.tokenizer, "encode", None)
        if not length or encode is None:
            return 0
        return max(0, len(encode(text)) + 2 - length)  # + start and end tokens

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Encode raw strings (no prompt template) into (N, dim) unit vectors."""
        chunks = [np.zeros((0, self.identity.embed_dim), dtype=np.float32)]
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start : start + batch_size])).to(self.device)
            chunks.append(self._finish(self.model.encode_text(tokens)))
        return np.concatenate(chunks)


def load_encoder(name: str = DEFAULT_MODEL, pretrained: str | None = DEFAULT_PRETRAINED,
                 device: str = "auto", precision: str = "auto") -> Encoder:
    """Create an open_clip model with its eval transform and tokenizer, in ``precision`` (:data:`PRECISIONS`).

    Raises :class:`WeightsUnavailable` with instructions when weights cannot be downloaded.
    """
    _check_model_name(name)
    torch_device = resolve_device(device)
    precision = resolve_precision(precision, torch_device)
    value, tag, digest, ckpt_path = _resolve_weights(name, pretrained)
    try:
        # Random init is seeded so that 'none' names the same weights in every process (index, then search).
        # Checkpoints in open_clip's format overwrite every weight (OpenAI's .npz layout is another path)
        skip_init = value is not None and not value.lower().endswith(".npz")
        with _quiet_loading(), torch.random.fork_rng(devices=[]), _init_skipped(skip_init):
            torch.manual_seed(0)
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=value, device=torch_device, weights_only=True,
                **({"require_pretrained": True} if skip_init else {})
            )
    except pickle.UnpicklingError as exc:
        raise CrossmodalError(
            f"refusing to load {pretrained}: it holds pickled objects other than tensors, and .pt files are only "
            "read with torch.load(weights_only=True). Save its state_dict as .safetensors instead."
        ) from exc
    except Exception as exc:  # open_clip/torch/safetensors raise many types for an unusable checkpoint
        if ckpt_path is None and value is not None:
            raise WeightsUnavailable(
                f"could not obtain pretrained weights '{value}' for {name} ({str(exc).split('. ')[0]}). "
                f"Without internet access, download the checkpoint elsewhere and pass it with "
                f"--pretrained /path/to/open_clip_model.safetensors (or set CROSSMODAL_PRETRAINED)."
            ) from exc
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CrossmodalError(f"cannot load {name} with weights {pretrained}: {reason}") from exc
    model.eval()
    if torch_device.type == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, tuple | list) else int(image_size)
    embed_dim = int(getattr(model, "embed_dim", 0) or model.text_projection.shape[-1])
    identity = ModelIdentity(name=name, pretrained=tag, embed_dim=embed_dim,
                             checkpoint_sha256=digest, checkpoint_path=ckpt_path)
    return Encoder(model, preprocess, open_clip.get_tokenizer(name), identity, torch_device, image_size, precision)


def load_encoder_for(identity: ModelIdentity, device: str = "auto",
                     pretrained_override: str | None = None, precision: str = "auto") -> Encoder:
    """Load the model an index was built with (optionally from a checkpoint at a new path)."""
    pretrained = pretrained_override
    if pretrained is None:
        pretrained = identity.checkpoint_path if identity.checkpoint_sha256 else identity.pretrained
        if identity.checkpoint_sha256 and not (pretrained and Path(pretrained).is_file()):
            raise WeightsUnavailable(
                f"the index was built with checkpoint {identity.pretrained} from {identity.checkpoint_path}, "
                "which is no longer there; pass its new location with --pretrained PATH"
            )
    encoder = load_encoder(identity.name, pretrained, device, precision)
    identity.require_same(encoder.identity, "query this index")
    return encoder
