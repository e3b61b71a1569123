"""Building a model that a checkpoint then fills skips the random init (indexer.encoder._init_skipped):
the checkpoint's weights come out exactly, random init still works afterwards, and a checkpoint that
lacks weights is refused instead of leaving them unset."""

from __future__ import annotations

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from indexer.encoder import load_encoder
from indexer.errors import CrossmodalError

MODEL = "crossmodal-tiny"


def seeded_random_state() -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return open_clip.create_model(MODEL, pretrained=None).state_dict()


def test_checkpoint_weights_exactly_and_random_init_unharmed(tmp_path) -> None:
    state = {k: (v + 0.25).contiguous() for k, v in seeded_random_state().items()}
    path = tmp_path / "w.safetensors"
    save_file(state, path)
    loaded = load_encoder(MODEL, str(path), "cpu", "fp32").model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    # torch.nn.init is itself again: the random-init model is the seeded one, not left unfilled
    assert torch.nn.init.normal_(torch.zeros(1000)).std() > 0.5
    random = load_encoder(MODEL, "none", "cpu", "fp32").model.state_dict()
    for key, value in seeded_random_state().items():
        assert torch.equal(random[key], value), key


def test_a_checkpoint_missing_weights_is_refused(tmp_path) -> None:
    state = {k: v.contiguous() for k, v in seeded_random_state().items() if not k.startswith("visual.")}
    path = tmp_path / "half.safetensors"
    save_file(state, path)
    with pytest.raises(CrossmodalError, match="cannot load crossmodal-tiny with weights"):
        load_encoder(MODEL, str(path), "cpu")
    assert torch.nn.init.normal_(torch.zeros(1000)).std() > 0.5  # restored after a failure too
