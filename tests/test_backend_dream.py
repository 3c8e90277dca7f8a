"""The continuous (DreamLLM-style) backend on a tiny random checkpoint.

Random tiny models have flat outputs, so these tests check shapes, determinism, invariants and exact
equalities against independent computations, never output quality.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from silmm.backends.base import CheckpointError
from silmm.backends.dream import DreamBackend, build_tiny_dream, dropdiv_layer_indices
from silmm.config import Backend, Device, Diversity, DropDivPlacement, LoraConfig, ModelConfig, SamplingConfig
from tests.helpers import assert_checkpointing_keeps_loss_and_grads

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["a red cube", "two cats on a wooden table next to a small yellow bird", "a dog"]
QUESTIONS = [["Is there a cat?", "Is the cube red?", "Are there two dogs on the table?"], [],
             ["Is the ball blue?"]]
ATOL = 1e-5


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_dream(tmp_path_factory.mktemp("dream") / "ckpt", seed=0)


def load(path: Path, **sampling) -> DreamBackend:
    model = ModelConfig(backend=Backend.dream, path=str(path), device=Device.cpu)
    return DreamBackend.load(model, SamplingConfig(decoder_steps=3, **sampling))


@pytest.fixture(scope="module")
def backend(ckpt: Path) -> DreamBackend:
    """Shared and never mutated; tests that change weights or settings load their own."""
    return load(ckpt)


@pytest.fixture(scope="module")
def images(backend: DreamBackend) -> np.ndarray:
    return backend.decode(backend.sample(PROMPTS, [1, 2, 3]), [1, 2, 3])


def perturb(b: DreamBackend, seed: int = 0) -> None:
    """Move every trainable weight away from its loaded value (LoRA B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in b.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------------------------- contracts
def test_shapes_and_dtypes(backend: DreamBackend, images: np.ndarray) -> None:
    num_q, hidden = backend.head_cfg.num_queries, backend.head_cfg.hidden_size
    features = backend.features(PROMPTS)
    samples = backend.sample(PROMPTS, [1, 2, 3])
    assert backend.family == "continuous"
    assert features.shape == samples.shape == (3, num_q, hidden)
    assert features.dtype == samples.dtype == torch.float32 and samples.device.type == "cpu"
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    result = backend.yes_no(images, QUESTIONS)
    assert [len(p) for p, _ in result] == [3, 0, 1]
    for p_yes, p_no in result:
        assert p_yes.dtype == p_no.dtype == np.float32
        assert np.all(p_yes >= 0) and np.all(p_no >= 0) and np.all(p_yes + p_no <= 1 + 1e-6)
    with pytest.raises(TypeError):
        backend.sequence_logprobs(PROMPTS, torch.zeros(3, 4, dtype=torch.long))


def test_global_rng_untouched(backend: DreamBackend) -> None:
    state = torch.get_rng_state()
    backend.sample(PROMPTS[:1], [5])
    backend.decode(backend.features(PROMPTS[:1]).detach(), [5])
    backend.write_text(PROMPTS[:1], [5], max_new_tokens=3)
    assert torch.equal(state, torch.get_rng_state())


# ------------------------------------------------------------------------------------- features
def test_features_deterministic_and_padding_free(backend: DreamBackend) -> None:
    batched = backend.features(PROMPTS)
    assert torch.equal(batched, backend.features(PROMPTS))
    for i, prompt in enumerate(PROMPTS):  # the prompts have different lengths: left padding is exact
        torch.testing.assert_close(backend.features([prompt])[0], batched[i], atol=ATOL, rtol=0)


def test_features_differentiable(backend: DreamBackend) -> None:
    features = backend.features(PROMPTS)
    assert features.requires_grad
    (grad,) = torch.autograd.grad(features.square().sum(), backend.head.queries)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# --------------------------------------------------------------------------------------- DropDiv
def test_sample_reproducible_per_seed(backend: DreamBackend) -> None:
    a = backend.sample(PROMPTS, [1, 2, 3])
    assert torch.equal(a, backend.sample(PROMPTS, [1, 2, 3]))
    assert not torch.allclose(a, backend.sample(PROMPTS, [4, 5, 6]))
    assert not torch.allclose(a[0], a[2])
    # a sample does not depend on its batch neighbours or their padding (masks use its own positions)
    for i, seed in enumerate([1, 2, 3]):
        torch.testing.assert_close(backend.sample([PROMPTS[i]], [seed])[0], a[i], atol=ATOL, rtol=0)


@pytest.mark.parametrize(("placement", "n", "k", "expected"), [
    (DropDivPlacement.last, 4, 1, [3]), (DropDivPlacement.last, 4, 2, [2, 3]), (DropDivPlacement.last, 4, 9, [0, 1, 2, 3]),
    (DropDivPlacement.first_half, 4, 1, [0, 1]), (DropDivPlacement.second_half, 4, 1, [2, 3]),
    (DropDivPlacement.first_half, 5, 1, [0, 1]), (DropDivPlacement.second_half, 5, 1, [2, 3, 4]),
    (DropDivPlacement.all, 4, 1, [0, 1, 2, 3]),
])
def test_dropdiv_layer_indices(placement: DropDivPlacement, n: int, k: int, expected: list[int]) -> None:
    assert dropdiv_layer_indices(placement, n, k) == expected


def _record_layers(b: DreamBackend, fn) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run ``fn`` and return, per decoder layer, (input of the MLP's residual branch h, layer output)."""
    records: list[dict[str, torch.Tensor]] = [{} for _ in b.layers]
    handles = []
    for i, layer in enumerate(b.layers):
        def pre(_m, args, i=i):
            records[i]["h"] = args[0].detach().clone()

        def post(_m, _args, out, i=i):
            records[i]["out"] = (out[0] if isinstance(out, tuple) else out).detach().clone()

        handles += [layer.post_attention_layernorm.register_forward_pre_hook(pre), layer.register_forward_hook(post)]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return [(r["h"], r["out"]) for r in records]


@pytest.mark.parametrize(("placement", "k"), [
    (DropDivPlacement.last, 1), (DropDivPlacement.last, 2), (DropDivPlacement.first_half, 1),
    (DropDivPlacement.second_half, 1), (DropDivPlacement.all, 1),
])
def test_dropdiv_acts_exactly_on_chosen_mlps(ckpt: Path, placement: DropDivPlacement, k: int) -> None:
    rate = 0.5
    b = load(ckpt, dropdiv_rate=rate, dropdiv_placement=placement, dropdiv_layers=k)
    chosen = dropdiv_layer_indices(placement, len(b.layers), k)
    clean = _record_layers(b, lambda: b.features(PROMPTS[:2]))
    noisy = _record_layers(b, lambda: b.sample(PROMPTS[:2], [7, 8]))
    dropped = []
    with torch.no_grad():
        for i, (layer, (h, out)) in enumerate(zip(b.layers, noisy, strict=True)):
            mlp_clean = layer.mlp(layer.post_attention_layernorm(h))  # outside sampling: no hooks
            mlp_seen = out - h  # what the residual stream received from the MLP
            if not torch.allclose(mlp_seen, mlp_clean, atol=1e-6):
                dropped.append(i)
                ratio = (mlp_seen / mlp_clean)[mlp_clean.abs() > 1e-3]
                near_zero = ratio.abs() < 1e-3
                near_scale = (ratio - 1 / (1 - rate)).abs() < 1e-3
                assert bool((near_zero | near_scale).all()), "not inverted dropout"
                assert 0.3 < near_zero.float().mean() < 0.7
    assert dropped == chosen
    for i in range(chosen[0]):  # layers below the first chosen one see the deterministic forward
        assert torch.equal(noisy[i][1], clean[i][1])
    assert not torch.equal(noisy[chosen[0]][1], clean[chosen[0]][1])


def test_dropdiv_hooks_only_while_sampling(ckpt: Path) -> None:
    b = load(ckpt, dropdiv_rate=0.3)
    keys = list(b.lmm.state_dict())
    before = b.features(PROMPTS)
    sampled = b.sample(PROMPTS, [1, 2, 3])
    assert not torch.allclose(sampled, before.detach())
    assert torch.equal(b.features(PROMPTS), before)
    assert list(b.lmm.state_dict()) == keys
    assert all(len(layer.mlp._forward_hooks) == 0 for layer in b.layers)


def test_rate_zero_is_deterministic(ckpt: Path) -> None:
    b = load(ckpt, dropdiv_rate=0.0, dropdiv_placement=DropDivPlacement.all)
    assert torch.equal(b.sample(PROMPTS, [1, 2, 3]), b.features(PROMPTS).detach())


def test_noisy_queries(ckpt: Path) -> None:
    b = load(ckpt, diversity=Diversity.noisy_queries, query_noise_std=0.5)
    deterministic = b.features(PROMPTS).detach()
    a = b.sample(PROMPTS, [1, 2, 3])
    assert not torch.allclose(a, deterministic)
    assert torch.equal(a, b.sample(PROMPTS, [1, 2, 3]))
    assert not torch.allclose(a, b.sample(PROMPTS, [4, 5, 6]))
    b.sampling = dataclasses.replace(b.sampling, query_noise_std=0.0)
    assert torch.equal(b.sample(PROMPTS, [1, 2, 3]), deterministic)


@pytest.mark.parametrize("diversity", [Diversity.dropdiv, Diversity.noisy_queries])
def test_generate_draws_without_the_training_diversity(ckpt: Path, diversity: Diversity) -> None:
    """Evaluation's draws: the plain features whatever the seeds, while ``sample`` varies with them."""
    b = load(ckpt, diversity=diversity, dropdiv_rate=0.3, query_noise_std=0.5)
    plain = b.features(PROMPTS).detach()
    assert torch.equal(b.generate(PROMPTS, [1, 2, 3]), plain)
    assert torch.equal(b.generate(PROMPTS, [4, 5, 6]), plain)
    assert not torch.allclose(b.sample(PROMPTS, [1, 2, 3]), plain)
    assert not b.generate(PROMPTS, [1, 2, 3]).requires_grad
    repeated = [PROMPTS[1], PROMPTS[0], PROMPTS[1]]  # one forward per distinct prompt, rows in input order
    torch.testing.assert_close(b.generate(repeated, [1, 2, 3]), plain[[1, 0, 1]], atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------- decode
def test_decode_deterministic(backend: DreamBackend) -> None:
    features = backend.sample(PROMPTS, [1, 2, 3])
    a = backend.decode(features, [10, 11, 12])
    assert np.array_equal(a, backend.decode(features, [10, 11, 12]))
    assert not np.array_equal(a, backend.decode(features, [13, 14, 15]))
    alone = backend.decode(features[1:2], [11])[0]  # per-sample latents: the batch does not matter
    assert np.abs(alone.astype(int) - a[1].astype(int)).max() <= 1


def test_decode_uses_guidance(ckpt: Path) -> None:
    b = load(ckpt)
    features = b.features(PROMPTS[:1]).detach()
    guided = b.decode(features, [3])
    b.sampling = dataclasses.replace(b.sampling, decoder_guidance_scale=1.0)
    assert not np.array_equal(guided, b.decode(features, [3]))


def test_guidance_unconditional_branch_is_the_empty_prompt(backend: DreamBackend) -> None:
    """DreamLLM's CFG: the unconditional H is the empty prompt's. Decoding exactly that H makes both branches
    equal, so the guidance scale cannot matter; any other H it does (test_decode_uses_guidance)."""
    empty = backend.features([""]).detach()
    guided = backend.decode(empty, [5])
    plain = dataclasses.replace(backend.sampling, decoder_guidance_scale=1.0)
    live, backend.sampling = backend.sampling, plain
    try:
        assert np.abs(backend.decode(empty, [5]).astype(int) - guided.astype(int)).max() <= 1
    finally:
        backend.sampling = live


def _with_head(ckpt: Path, out: Path, **fields) -> Path:
    """A copy of ``ckpt`` whose dream head config sets ``fields`` (weights re-saved to fit the projector)."""
    from silmm.backends.dream import HEAD_DIR, DreamHead, load_head

    shutil.copytree(ckpt, out)
    head, cfg = load_head(out / HEAD_DIR)
    cfg = dataclasses.replace(cfg, **fields)
    new = DreamHead(cfg)
    new.load_state_dict({k: v for k, v in head.state_dict().items() if k in new.state_dict()})
    new.save(out / HEAD_DIR, cfg)
    return out


def test_dream_start_token_precedes_the_queries(ckpt: Path, tmp_path: Path) -> None:
    """H with a dream start token equals an independent forward of [prompt tokens, start token, queries]."""
    b = load(_with_head(ckpt, tmp_path / "start", dream_start_token="<image>", projector_bias=False))
    assert b.head.projector.bias is None and b.dream_start_id == b.tokenizer.convert_tokens_to_ids("<image>")
    prompt = PROMPTS[0]
    ids = b.tokenizer([b.head_cfg.prompt_template.format(prompt=prompt)], return_tensors="pt")["input_ids"]
    ids = torch.cat([ids, torch.tensor([[b.dream_start_id]])], dim=1)
    embeds = torch.cat([b.base.get_input_embeddings()(ids), b.head.queries[None]], dim=1)
    with torch.no_grad():
        want = b.language_model(inputs_embeds=embeds).last_hidden_state[0, -b.head.queries.shape[0]:]
        got = b.features([prompt])[0]
        without = load(ckpt).features([prompt])[0]
    assert torch.allclose(got, want, atol=ATOL)
    assert not torch.allclose(got, without, atol=1e-3)  # the start token is really there


def test_unknown_dream_start_token_is_named(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="dream_start_token"):
        load(_with_head(ckpt, tmp_path / "bad", dream_start_token="<not_a_token_here>"))


# --------------------------------------------------------------------------------------- scoring
def _one_at_a_time(b: DreamBackend, image: np.ndarray, question: str) -> tuple[float, float]:
    """Independent check: the full sequence in one plain forward, no cache, no batching.

    Compared in log space: a flat tiny model gives p ~ 1/vocab, where an absolute 1e-5 would hide
    errors such as a position offset of one."""
    prefix, suffix = b.question_parts()
    enc = b.processor(text=[prefix], images=[image], return_tensors="pt")
    q_ids = b.tokenizer(suffix.format(question=question), add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([enc["input_ids"], q_ids], dim=1)
    with torch.no_grad():
        logits = b.base(input_ids=ids, pixel_values=enc["pixel_values"], attention_mask=torch.ones_like(ids)).logits
    probs = torch.softmax(logits[0, -1].float(), dim=-1)
    return float(probs[b.yes_ids].sum().log()), float(probs[b.no_ids].sum().log())


def test_yes_no_equals_one_at_a_time(backend: DreamBackend, images: np.ndarray) -> None:
    result = backend.yes_no(images, QUESTIONS)
    for image, qs, (p_yes, p_no) in zip(images, QUESTIONS, result, strict=True):
        for j, q in enumerate(qs):
            log_y, log_n = _one_at_a_time(backend, image, q)
            assert abs(np.log(p_yes[j]) - log_y) < ATOL and abs(np.log(p_no[j]) - log_n) < ATOL


def test_yes_no_invariant_to_grouping(backend: DreamBackend, images: np.ndarray) -> None:
    together = backend.yes_no(images, QUESTIONS)
    for i, qs in enumerate(QUESTIONS):
        for j, q in enumerate(qs):
            ((y, n),) = backend.yes_no(images[i:i + 1], [[q]])
            np.testing.assert_allclose(np.log([y[0], n[0]]), np.log([together[i][0][j], together[i][1][j]]),
                                       atol=ATOL, rtol=0)
    # the same image repeated with its questions split differently
    split = backend.yes_no(np.stack([images[0], images[0]]), [QUESTIONS[0][:1], QUESTIONS[0][1:]])
    np.testing.assert_allclose(np.log(np.concatenate([split[0][0], split[1][0]])), np.log(together[0][0]),
                               atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------- LoRA
def test_lora_wraps_language_model_only(ckpt: Path) -> None:
    b = load(ckpt)
    assert [p is b.head.queries for p in b.trainable_parameters()] == [True, False, False]  # head only
    b.add_lora(LoraConfig(r=4, alpha=8))
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in b.lmm.named_modules() if n.endswith(".lora_A")}
    assert len(wrapped) == 7 * len(b.layers)
    assert all(".language_model.layers." in n for n in wrapped)
    trainable = {id(p) for p in b.trainable_parameters()}
    assert {id(p) for p in b.head.parameters()} <= trainable
    for module in (b.base.model.vision_tower, b.base.model.multi_modal_projector, b.unet, b.vae):
        assert not any(p.requires_grad for p in module.parameters())
    lora_names = [n for n, p in b.lmm.named_parameters() if p.requires_grad]
    assert lora_names and all("lora_" in n and ".language_model.layers." in n for n in lora_names)
    with pytest.raises(RuntimeError):
        b.add_lora(LoraConfig())


def test_reference_is_model_as_loaded(ckpt: Path, backend: DreamBackend) -> None:
    original_h = backend.features(PROMPTS).detach()
    original_img = backend.decode(original_h, [1, 2, 3])
    b = load(ckpt)
    b.add_lora(LoraConfig(r=4, alpha=8))
    perturb(b)
    h = b.features(PROMPTS).detach()
    assert not torch.allclose(h, original_h, atol=1e-3)
    with b.reference():
        assert torch.equal(b.features(PROMPTS), original_h)
        assert np.array_equal(b.decode(original_h, [1, 2, 3]), original_img)
    assert torch.equal(b.features(PROMPTS).detach(), h)  # the adapter and the live head are back


def test_save_adapter_roundtrip(ckpt: Path, tmp_path: Path) -> None:
    lora = LoraConfig(r=4, alpha=8)
    b = load(ckpt)
    b.add_lora(lora)
    perturb(b)
    b.save_adapter(tmp_path / "adapter")
    assert all(f.suffix != ".bin" for f in (tmp_path / "adapter").rglob("*"))
    c = load(ckpt)
    c.add_lora(lora)
    c.load_adapter(tmp_path / "adapter")
    h = b.features(PROMPTS).detach()
    assert torch.equal(c.features(PROMPTS).detach(), h)
    assert np.array_equal(c.decode(h, [4, 5, 6]), b.decode(h, [4, 5, 6]))


def test_merge_and_save_roundtrip(ckpt: Path, backend: DreamBackend, tmp_path: Path) -> None:
    b = load(ckpt)
    b.add_lora(LoraConfig(r=4, alpha=8))
    perturb(b)
    b.merge_and_save(tmp_path / "merged")
    merged = load(tmp_path / "merged")
    h = b.features(PROMPTS).detach()
    torch.testing.assert_close(merged.features(PROMPTS).detach(), h, atol=ATOL, rtol=0)
    # the same decoder up to one rounding level: about one run in three flipped one pixel by 1 (not yet
    # understood: repeated decodes of one model are identical, so the saved projector may differ by rounding)
    assert np.abs(merged.decode(h, [4, 5, 6]).astype(int) - b.decode(h, [4, 5, 6])).max() <= 1
    assert list(merged.base.state_dict()) == list(backend.base.state_dict())  # same keys, no LoRA left
    with merged.reference():  # the merged model is the next iteration's reference
        torch.testing.assert_close(merged.features(PROMPTS).detach(), h, atol=ATOL, rtol=0)
    with b.reference():  # saving left the live adapter and the reference alone
        assert torch.equal(b.features(PROMPTS).detach(), backend.features(PROMPTS).detach())


# ------------------------------------------------------------------------------------ checkpoints
def test_build_tiny_dream_deterministic(ckpt: Path, tmp_path: Path) -> None:
    again = build_tiny_dream(tmp_path / "again", seed=0)
    other = build_tiny_dream(tmp_path / "other", seed=1)
    files = sorted(p.relative_to(ckpt) for p in ckpt.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((ckpt / f).read_bytes() == (again / f).read_bytes() for f in files)
    weights = Path("lmm/model.safetensors")
    assert (ckpt / weights).read_bytes() != (other / weights).read_bytes()


@pytest.mark.parametrize("missing", ["lmm", "decoder", "dream_head", "decoder/unet", "dream_head/model.safetensors"])
def test_missing_part_is_named(ckpt: Path, tmp_path: Path, missing: str) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    target = broken / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(CheckpointError, match=missing):
        load(broken)


def test_malformed_head_is_reported(ckpt: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "dream_head" / "config.json").write_text('{"num_queries": 8}')
    with pytest.raises(CheckpointError, match="dream_head"):
        load(broken)
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------ text
def test_write_text(backend: DreamBackend) -> None:
    greedy = backend.write_text(PROMPTS, [1, 2, 3], max_new_tokens=6, temperature=0)
    assert greedy == backend.write_text(PROMPTS, [7, 8, 9], max_new_tokens=6, temperature=0)
    assert greedy[1] == backend.write_text(PROMPTS[1:2], [0], max_new_tokens=6, temperature=0)[0]
    sampled = backend.write_text(PROMPTS, [1, 2, 3], max_new_tokens=6, temperature=1.0, top_p=0.9)
    assert sampled == backend.write_text(PROMPTS, [1, 2, 3], max_new_tokens=6, temperature=1.0, top_p=0.9)
    assert all(isinstance(t, str) for t in sampled) and len(sampled) == 3


# ------------------------------------------------------------------------------ gradient checkpointing
def test_gradient_checkpointing_same_loss_and_grads(ckpt: Path) -> None:
    """LoRA and dream-query gradients; training mode is what the trainer switches on (the backend keeps
    its modules in eval mode)."""
    b = load(ckpt)
    b.add_lora(LoraConfig(r=4, alpha=4, dropout=0.0))
    perturb(b)
    params = [p for p in b.trainable_parameters() if p is not b.head.projector.weight and p is not b.head.projector.bias]
    assert len(params) == len(b.trainable_parameters()) - 2  # the projector acts in decode, not in features
    weights = torch.randn(b.head_cfg.num_queries, b.head_cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    assert_checkpointing_keeps_loss_and_grads(b, b.layers[0].mlp, lambda: (b.features(PROMPTS) * weights).sum(),
                                              params, b.lmm.train)
