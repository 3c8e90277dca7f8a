"""ClipJudge on a tiny offline CLIP: CLIPScore and zero-shot classification against independent computations
from the model's own embeddings, batching, and missing checkpoints."""

import numpy as np
import pytest
import torch

from silmm.backends.base import CheckpointError
from silmm.eval.scorers.clip import CLASSIFY_SCALE, ClipJudge, build_tiny_clip


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    return ClipJudge.load(build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny", seed=0), device="cpu")


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (int(rng.integers(20, 60)), int(rng.integers(20, 60)), 3), dtype=np.uint8)
            for _ in range(n)]


def _embed_image(judge, im):
    px = judge.processor(images=[im], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = judge.model.get_image_features(pixel_values=px)
    f = (out if isinstance(out, torch.Tensor) else out.pooler_output)[0].double()
    return f / f.norm()


def _embed_text(judge, text):
    enc = judge.processor(text=[text], return_tensors="pt")
    with torch.no_grad():
        out = judge.model.get_text_features(**enc)
    f = (out if isinstance(out, torch.Tensor) else out.pooler_output)[0].double()
    return f / f.norm()


def test_round_trip_and_layout(judge):
    assert (judge.path / "config.json").is_file()
    assert judge.model.dtype == torch.float32
    ids = judge.processor.tokenizer("a photo of a red dog").input_ids
    assert ids[0] == judge.processor.tokenizer.bos_token_id and ids[-1] == judge.processor.tokenizer.eos_token_id
    # byte-level: an unseen word encodes without unknown tokens
    assert judge.processor.tokenizer.unk_token_id not in judge.processor.tokenizer("zqxj!").input_ids[1:-1]


def test_similarity_is_the_plain_cosine(judge):
    images = _images(3)
    texts = ["a red dog", "two cats on a table", "a red dog"]
    got = judge.similarity(images, texts)
    want = [float(_embed_image(judge, im) @ _embed_text(judge, t)) for im, t in zip(images, texts, strict=True)]
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.all(np.abs(got) <= 1)  # no x100, no 2.5 scaling


def test_similarity_batching_equals_one_at_a_time(judge):
    images = _images(5, seed=1)
    texts = ["a red dog", "a blue cup with a very long description of the cup", "cat", "a red dog", "bus"]
    batched = judge.similarity(images, texts, batch_size=4)
    single = np.array([judge.similarity([im], [t], batch_size=1)[0] for im, t in zip(images, texts, strict=True)])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_long_text_is_truncated(judge):
    text = " ".join(["red dog"] * 200)
    assert np.isfinite(judge.similarity(_images(1), [text])).all()


def test_classify_is_zero_shot_over_mean_template_embeddings(judge):
    images = _images(4, seed=2)
    labels = ["red", "green", "blue"]
    templates = ["a photo of a {c} cup", "a photo of a {c}-colored cup", "a photo of a {c} object"]
    got = judge.classify(images, labels, templates, batch_size=3)
    cols = []
    for lab in labels:
        e = torch.stack([_embed_text(judge, t.replace("{c}", lab)) for t in templates]).mean(0)
        cols.append(e / e.norm())
    clf = torch.stack(cols, 1)
    logits = CLASSIFY_SCALE * torch.stack([_embed_image(judge, im) for im in images]) @ clf
    want = torch.softmax(logits, -1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(got.sum(1), 1.0)
    single = np.concatenate([judge.classify([im], labels, templates) for im in images])
    np.testing.assert_allclose(got, single, atol=1e-5)
    # a single template with "{}" works too
    assert judge.classify(images[:1], labels, "a {} thing").shape == (1, 3)


def test_mismatched_lengths_and_empty(judge):
    with pytest.raises(ValueError):
        judge.similarity(_images(2), ["a"])
    assert judge.similarity([], []).shape == (0,)


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path / "nowhere")):
        ClipJudge.load(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        ClipJudge.load(tmp_path / "half")
