"""Training: the loss goes down, checkpoints load back exactly, --resume continues, weights load via open_clip."""

import json

import pytest
import torch
from click.testing import CliRunner
from open_clip.loss import ClipLoss
from PIL import Image
from safetensors.torch import load_file

from indexer.encoder import load_encoder
from indexer.pairs import read_pairs
from indexer.synth import write_corpus
from indexer.train import TrainOptions, train
from retrieval.cli import cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    write_corpus(out, 48, seed=9, test=0, val=16, side=32)
    return out / "dataset_synth.json"


def fixed_batch_loss(encoder, pairs):
    images = torch.stack([encoder.preprocess(Image.open(p.path).convert("RGB")) for p in pairs])
    tokens = encoder.tokenizer([p.captions[0] for p in pairs])
    model = encoder.model
    with torch.no_grad():
        return float(ClipLoss()(model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True),
                                model.logit_scale.exp()))


def options(tmp_path, **kw):
    base = dict(out=tmp_path / "run", batch_size=16, lr=3e-3, warmup_steps=2, val_every=100, checkpoint_every=2,
                workers=0, progress=False, epochs=20)
    return TrainOptions(**{**base, **kw})


def test_training_lowers_the_loss_and_checkpoints_load_back_exactly(tmp_path, corpus):
    pairs = read_pairs(corpus, split="train")
    encoder = load_encoder("crossmodal-tiny", "none", "cpu", "fp32")
    before = fixed_batch_loss(encoder, pairs[:16])
    summary = train(encoder, pairs, [], options(tmp_path, max_steps=12))
    encoder.model.eval()
    assert summary.steps == 12
    assert fixed_batch_loss(encoder, pairs[:16]) < before - 0.05

    trained = encoder.model.state_dict()
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 12
    assert all(torch.equal(checkpoint["state_dict"][k], v) for k, v in trained.items())
    exported = load_file(tmp_path / "run" / "weights.safetensors")
    assert all(torch.equal(exported[k], v) for k, v in trained.items())
    reloaded = load_encoder("crossmodal-tiny", str(tmp_path / "run" / "weights.safetensors"), "cpu", "fp32")
    assert all(torch.equal(reloaded.model.state_dict()[k], v) for k, v in trained.items())
    assert reloaded.identity.checkpoint_sha256  # vectors of trained weights are told apart from random init


def test_resume_continues_from_the_saved_step(tmp_path, corpus):
    pairs = read_pairs(corpus, split="train")
    first = train(load_encoder("crossmodal-tiny", "none", "cpu", "fp32"), pairs, [], options(tmp_path, max_steps=4))
    assert first.steps == 4
    encoder = load_encoder("crossmodal-tiny", "none", "cpu", "fp32")
    resumed = train(encoder, pairs, [], options(tmp_path, max_steps=6), resume=True)
    assert resumed.steps == 6
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 6


def test_train_command_reports_validation_recall(tmp_path, corpus):
    result = CliRunner().invoke(cli, [
        "train", str(corpus), "--model", "crossmodal-tiny", "--pretrained", "none", "--out", str(tmp_path / "r"),
        "--max-steps", "2", "--batch-size", "16", "--warmup", "1", "--workers", "0", "--no-progress", "--fp16",
        "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["steps"] == 2 and summary["validation"]["text_to_image"]["queries"] == 48  # 16 images x 3
    assert {v.dtype for v in load_file(summary["weights"]).values() if v.is_floating_point()} == {torch.float16}


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, corpus):
    result = CliRunner().invoke(cli, [
        "train", str(corpus), "--model", "crossmodal-tiny", "--pretrained", "none", "--out", str(tmp_path / "r"),
        "--batch-size", "16", "--resume", "--no-progress"])
    assert result.exit_code == 1 and "nothing to resume" in result.output
