"""The SEED image tokenizer and its converter, on a tiny random checkpoint in the released layout.

The reference is an independent forward written here from the released architecture (AILab-CVC/SEED,
``qformer_quantizer.py``: EVA ViT with q/v biases, ln_vision, a BERT Q-Former whose 32 queries attend
causally with the release's additive -10000 mask, cross-attention every second layer, the VQ argmin, and the
code -> embedding decoder of timm blocks), in plain torch ops on the *released* key names. The converted
module must reproduce its codes exactly and its image embeddings to 1e-6.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from silmm.backends.base import CheckpointError
from silmm.backends.seed_tokenizer import (
    RELEASED_WEIGHTS_NAME,
    ConversionError,
    SeedImageTokenizer,
    SeedTokenizerConfig,
    convert_seed_tokenizer,
    convert_state_dict,
    expected_shapes,
    make_tiny_seed_tokenizer_released,
    released_shapes,
    tiny_config,
)

CFG = tiny_config()


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    return make_tiny_seed_tokenizer_released(tmp_path_factory.mktemp("seed_release"), seed=0)


@pytest.fixture(scope="module")
def converted(released, tmp_path_factory) -> Path:
    return convert_seed_tokenizer(released, tmp_path_factory.mktemp("seed_ours"))


@pytest.fixture(scope="module")
def model(converted) -> SeedImageTokenizer:
    return SeedImageTokenizer.from_pretrained(converted)


@pytest.fixture(scope="module")
def sd(released) -> dict[str, torch.Tensor]:
    return torch.load(released, map_location="cpu", weights_only=True)


def pixels(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, CFG.image_size, CFG.image_size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ independent reference
def lin(x, sd, p, bias=True):
    return x @ sd[p + ".weight"].t() + (sd[p + ".bias"] if bias else 0)


def ln(x, sd, p, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[p + ".weight"], sd[p + ".bias"], eps)


def attend(q, k, v, heads, additive_mask=None):
    b, lq, d = q.shape
    split = lambda t: t.view(b, t.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads)
    if additive_mask is not None:
        scores = scores + additive_mask
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, lq, d)


def ref_eva_vit(sd, x):
    """EVA ViT-g forward (eva_vit.py), then ln_vision (a default LayerNorm, eps 1e-5)."""
    p = CFG.patch_size
    h = F.conv2d(x, sd["visual_encoder.patch_embed.proj.weight"], sd["visual_encoder.patch_embed.proj.bias"], stride=p)
    h = h.flatten(2).transpose(1, 2)
    h = torch.cat([sd["visual_encoder.cls_token"].expand(len(x), -1, -1), h], 1) + sd["visual_encoder.pos_embed"]
    for i in range(CFG.vision_layers):
        b = f"visual_encoder.blocks.{i}."
        y = ln(h, sd, b + "norm1", 1e-6)
        bias = torch.cat([sd[b + "attn.q_bias"], torch.zeros_like(sd[b + "attn.v_bias"]), sd[b + "attn.v_bias"]])
        q, k, v = (y @ sd[b + "attn.qkv.weight"].t() + bias).chunk(3, dim=-1)
        h = h + lin(attend(q, k, v, CFG.vision_heads), sd, b + "attn.proj")
        y = ln(h, sd, b + "norm2", 1e-6)
        h = h + lin(F.gelu(lin(y, sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
    return ln(h, sd, "ln_vision", 1e-5)


def ref_bert_attention(sd, p, h, kv, mask):
    a = attend(lin(h, sd, p + "self.query"), lin(kv, sd, p + "self.key"), lin(kv, sd, p + "self.value"),
               CFG.qformer_heads, mask)
    return ln(lin(a, sd, p + "output.dense") + h, sd, p + "output.LayerNorm", 1e-12)


def ref_code_inputs(sd, x):
    """get_codebook_indices up to the quantizer: ViT -> causal Q-Former (32 queries) -> encode_task_layer."""
    image = ref_eva_vit(sd, x)
    n = CFG.num_queries
    causal = torch.ones(n, n).tril()
    mask = (1.0 - causal) * -10000.0  # the release's extended attention mask
    h = ln(sd["query_tokens"].expand(len(x), -1, -1), sd, "Qformer.bert.embeddings.LayerNorm", 1e-12)
    for i in range(CFG.qformer_layers):
        p = f"Qformer.bert.encoder.layer.{i}."
        h = ref_bert_attention(sd, p + "attention.", h, h, mask)
        if i % CFG.cross_attention_freq == 0:
            h = ref_bert_attention(sd, p + "crossattention.", h, image, None)
        y = F.gelu(lin(h, sd, p + "intermediate_query.dense"))
        h = ln(lin(y, sd, p + "output_query.dense") + h, sd, p + "output_query.LayerNorm", 1e-12)
    return lin(torch.tanh(lin(h, sd, "encode_task_layer.0")), sd, "encode_task_layer.2")


def ref_codes(sd, x):
    """The nearest codebook entry (squared L2 expanded as the release computes it) for each query."""
    z = ref_code_inputs(sd, x).reshape(-1, CFG.code_dim)
    e = sd["quantize.embedding.weight"]
    dist = (z**2).sum(1, keepdim=True) + (e**2).sum(1) - 2 * z @ e.t()
    return dist.argmin(1).view(len(x), CFG.num_queries)


def ref_embeds(sd, codes):
    """get_codebook_entry: codebook -> decode_task_layer -> + pos_embed_image -> timm blocks -> image_down
    -> flatten -> distill_image_proj."""
    h = sd["quantize.embedding.weight"][codes]
    h = lin(torch.tanh(lin(h, sd, "decode_task_layer.0")), sd, "decode_task_layer.2") + sd["pos_embed_image"]
    for i in range(CFG.decoder_layers):
        b = f"blocks_image.{i}."
        q, k, v = lin(ln(h, sd, b + "norm1", 1e-6), sd, b + "attn.qkv").chunk(3, dim=-1)
        h = h + lin(attend(q, k, v, CFG.decoder_heads), sd, b + "attn.proj")
        h = h + lin(F.gelu(lin(ln(h, sd, b + "norm2", 1e-6), sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
    for j in range(len(CFG.image_down)):
        h = lin(h, sd, f"image_down.{2 * j}", bias=False)
        if j < len(CFG.image_down) - 1:
            h = F.relu(h)
    return lin(h.flatten(1), sd, "distill_image_proj")


# ------------------------------------------------------------------------------ converter
def test_every_released_key_is_mapped_or_dropped_on_purpose(sd, converted, model):
    ours, origin, dropped = convert_state_dict(sd)
    used = {src.replace("q_bias/v_bias", name) for src in origin.values() for name in ("q_bias", "v_bias")}
    assert used | set(dropped) == set(sd) and not used & set(dropped)
    # dropped: exactly the training-only recon_s branch and the BERT position_ids buffer
    assert set(dropped) == ({"pos_embed", "Qformer.bert.embeddings.position_ids"}
                            | {k for k in sd if k.startswith("blocks.")})
    assert set(load_file(str(converted / "model.safetensors"))) == set(model.state_dict())


def test_released_sizes_convert_to_our_layout():
    """At SEED's released sizes (meta tensors, no memory), every released tensor maps to ours with the
    shape our module expects, and the parameter count is the release's (EVA ViT-g about 1.0 B)."""
    config = SeedTokenizerConfig()
    with torch.device("meta"):
        released = {k: torch.empty(s) for k, s in released_shapes(config).items()}
        model = SeedImageTokenizer(config)
    ours, _, dropped = convert_state_dict(released)
    assert {k: tuple(v.shape) for k, v in ours.items()} == expected_shapes(model)
    assert len([k for k in released if k.startswith("visual_encoder.blocks.")]) == 39 * 13
    vision = sum(v.numel() for k, v in ours.items() if k.startswith("vision."))
    assert 0.98e9 < vision < 1.0e9


def test_converted_weights_are_the_released_tensors(sd, converted):
    ours = load_file(str(converted / "model.safetensors"))
    assert torch.equal(ours["codebook.weight"], sd["quantize.embedding.weight"])
    assert torch.equal(ours["vision.post_layernorm.weight"], sd["ln_vision.weight"])
    assert torch.equal(ours["qformer.encoder.layer.0.crossattention.attention.key.weight"],
                       sd["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"])
    q, k, v = ours["vision.encoder.layers.1.self_attn.qkv.bias"].chunk(3)
    assert torch.equal(q, sd["visual_encoder.blocks.1.attn.q_bias"]) and not k.any()
    assert torch.equal(v, sd["visual_encoder.blocks.1.attn.v_bias"])


def test_codes_and_embeds_equal_the_independent_released_forward(model, sd):
    x = pixels(3)
    codes = model.encode(x)
    with torch.no_grad():
        z = model.to_code(model.query_features(x))
        z_ref = ref_code_inputs(sd, x)
        expected = ref_codes(sd, x)
    assert torch.allclose(z, z_ref, rtol=0, atol=1e-6), (z - z_ref).abs().max()
    assert torch.equal(codes, expected)
    assert len(set(codes.flatten().tolist())) > 3  # the tiny weights spread the queries over several codes
    all_codes = torch.randint(0, CFG.codebook_size, (4, 32), generator=torch.Generator().manual_seed(2))
    for c in (codes, all_codes):
        got = model.codes_to_image_embeds(c)
        want = ref_embeds(sd, c)
        assert got.shape == (len(c), CFG.embed_dim)
        assert torch.allclose(got, want, rtol=0, atol=1e-6), (got - want).abs().max()


def test_encode_shapes_range_determinism_and_batch_independence(model):
    x = pixels(4, seed=3)
    codes = model.encode(x)
    assert codes.shape == (4, 32) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < 8192 == model.codebook_size
    assert torch.equal(model.encode(x), codes)
    assert torch.equal(model.encode(x[2:3]), codes[2:3])
    embeds = model.codes_to_image_embeds(codes)
    assert embeds.shape == (4, model.embed_dim) and embeds.dtype == torch.float32
    assert torch.equal(model.codes_to_image_embeds(codes), embeds)
    assert (model.image_size, model.num_queries) == (CFG.image_size, 32)


def test_query_attention_is_causal(model):
    """Query i sees queries 0..i only: changing query 20 leaves the features of queries 0..19 unchanged."""
    x = pixels(2, seed=4)
    with torch.no_grad():
        before = model.query_features(x)
        saved = model.query_tokens.detach().clone()
        model.query_tokens.data[:, 20] += 1.0
        try:
            after = model.query_features(x)
        finally:
            model.query_tokens.data.copy_(saved)
    assert torch.equal(after[:, :20], before[:, :20])
    assert not torch.allclose(after[:, 20:], before[:, 20:])


def test_layer_norm_eps_as_released(model):
    """Random-weight features are too large for eps to show in the outputs; check each norm on small inputs:
    ln_vision is a default LayerNorm (1e-5), EVA and the timm blocks use 1e-6, the BERT Q-Former 1e-12."""
    norms = {model.vision.post_layernorm: 1e-5, model.vision.encoder.layers[0].layer_norm1: 1e-6,
             model.decoder_blocks[0].layer_norm2: 1e-6, model.qformer.layernorm: 1e-12,
             model.qformer.encoder.layer[0].crossattention.output.LayerNorm: 1e-12}
    for norm, eps in norms.items():
        x = 1e-3 * torch.randn(2, 5, norm.normalized_shape[0], generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            assert torch.allclose(norm(x), F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, eps),
                                  rtol=0, atol=1e-6)


def test_save_and_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    again = SeedImageTokenizer.from_pretrained(tmp_path)
    x = pixels(2, seed=5)
    assert torch.equal(again.encode(x), model.encode(x))
    assert json.loads((tmp_path / "config.json").read_text())["num_queries"] == 32


def test_tiny_release_is_deterministic(tmp_path):
    a = torch.load(make_tiny_seed_tokenizer_released(tmp_path / "a", seed=7), weights_only=True)
    b = torch.load(make_tiny_seed_tokenizer_released(tmp_path / "b", seed=7), weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def write_release(tmp_path: Path, state: dict) -> Path:
    path = make_tiny_seed_tokenizer_released(tmp_path / "rel")
    torch.save(state, path)
    return path


def test_missing_key_is_refused_by_name(sd, tmp_path):
    for key in ("Qformer.bert.encoder.layer.1.output_query.dense.weight", "visual_encoder.blocks.0.attn.v_bias"):
        src = write_release(tmp_path, {k: v for k, v in sd.items() if k != key})
        with pytest.raises(ConversionError, match=re.escape(key)):
            convert_seed_tokenizer(src, tmp_path / "out")


def test_unexpected_key_is_refused_by_name(sd, tmp_path):
    src = write_release(tmp_path, {**sd, "Qformer.bert.encoder.layer.0.attention.self.extra": torch.zeros(2)})
    with pytest.raises(ConversionError, match=re.escape("Qformer.bert.encoder.layer.0.attention.self.extra")):
        convert_seed_tokenizer(src, tmp_path / "out")
    deeper = {**sd, "image_down.6.weight": torch.zeros(2, 4)}
    with pytest.raises(ConversionError, match=re.escape("image_down.6.weight")):
        convert_seed_tokenizer(write_release(tmp_path, deeper), tmp_path / "out")


def test_wrong_shape_and_sizes_are_refused_by_name(sd, tmp_path):
    src = write_release(tmp_path, {**sd, "quantize.embedding.weight": torch.zeros(100, CFG.code_dim)})
    with pytest.raises(ConversionError, match=re.escape("quantize.embedding.weight")):
        convert_seed_tokenizer(src, tmp_path / "out")
    # the released sizes (no sidecar config) do not fit the tiny file: named, not a crash
    with pytest.raises(ConversionError, match="visual_encoder"):
        convert_seed_tokenizer(write_release(tmp_path, sd), tmp_path / "out", config=SeedTokenizerConfig())


class NotWeights:
    pass


def test_non_weight_files_are_refused(tmp_path):
    path = tmp_path / RELEASED_WEIGHTS_NAME
    torch.save({"model": NotWeights()}, path)  # unpickling it would need code: weights_only refuses
    with pytest.raises(ConversionError, match=RELEASED_WEIGHTS_NAME):
        convert_seed_tokenizer(path, tmp_path / "out")
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ConversionError, match="flat state dict"):
        convert_seed_tokenizer(path, tmp_path / "out")
    with pytest.raises(CheckpointError, match="config.json"):
        SeedImageTokenizer.from_pretrained(tmp_path / "nothing")


def test_preprocess_and_input_checks(model):
    images = [np.full((40, 50, 3), 200, np.uint8), np.zeros((28, 28, 3), np.uint8)]
    pix = model.preprocess(images)
    assert pix.shape == (2, 3, CFG.image_size, CFG.image_size) and pix.dtype == torch.float32
    mean, std = torch.tensor(CFG.pixel_mean), torch.tensor(CFG.pixel_std)
    # a constant image stays constant under bicubic resizing: (value / 255 - mean) / std per channel
    assert torch.allclose(pix[0, :, 5, 7], (200 / 255 - mean) / std, atol=1e-6)
    assert torch.allclose(pix[1, :, 0, 0], -mean / std, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        model.preprocess([np.zeros((4, 4, 3), np.float32)])
    with pytest.raises(ValueError, match="codes must lie"):
        model.codes_to_image_embeds(torch.full((1, 32), 8192))
    with pytest.raises(ValueError, match="pixel_values"):
        model.encode(torch.zeros(1, 3, 10, 10))
