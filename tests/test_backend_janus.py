"""The Janus backend against the LMMBackend contract, on a tiny random checkpoint (built offline;
conftest.py sets HF_HUB_OFFLINE).

Random tiny models answer nothing meaningfully, so these tests check shapes, determinism, invariants and exact
equalities with independent computations (transformers' own forward and generate), not answer quality.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.generation import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from silmm.backends.base import CheckpointError
from silmm.backends.common import (
    apply_lora,
    build_tiny_tokenizer,
    lora_target_modules,
    warp_logits,
    yes_no_token_ids,
)
from silmm.backends.janus import JanusBackend, build_tiny_janus
from silmm.config import Dtype, LogprobMode, LoraConfig, ModelConfig, SamplingConfig
from tests.helpers import (
    assert_checkpointing_keeps_loss_and_grads,
    assert_chunked_logprobs_match,
    full_logits_reference,
)

PROMPTS = ["a red cube", "two green spheres to the left of a wooden table"]
QUESTIONS = [
    ["Is there a red cube?", "Is the cube above the sphere?", "Are there two dogs?"],
    ["Is the table wooden?"],
    [],
    ["Are there two green spheres?", "Is the sphere left of the table?"],
]
LORA = LoraConfig(r=4, alpha=8, dropout=0.0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return build_tiny_janus(tmp_path_factory.mktemp("janus") / "tiny", seed=0)


def load(path: Path, **sampling) -> JanusBackend:
    return JanusBackend.load(ModelConfig(path=str(path)), SamplingConfig(**sampling))


@pytest.fixture(scope="module")
def backend(ckpt) -> JanusBackend:
    return load(ckpt)


@pytest.fixture(scope="module")
def images(backend) -> np.ndarray:
    tokens = backend.sample([PROMPTS[0]] * len(QUESTIONS), [10, 11, 12, 13])
    return backend.decode(tokens, [10, 11, 12, 13])


def perturb_lora(backend: JanusBackend, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in backend.peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


# ------------------------------------------------------------------------------------ checkpoints
def test_build_tiny_is_deterministic(ckpt, tmp_path):
    again = build_tiny_janus(tmp_path / "again", seed=0)
    other = build_tiny_janus(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "generation_config.json"):
        assert (ckpt / name).read_bytes() == (again / name).read_bytes(), name
    assert (ckpt / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()
    gen = json.loads((ckpt / "generation_config.json").read_text())
    assert gen["generation_kwargs"]["boi_token_id"] is not None


@pytest.mark.parametrize("breakage, message", [
    ("missing_dir", "does not exist"),
    ("no_config", "no config.json"),
    ("bad_config", "not a valid JSON"),
    ("wrong_type", "model_type is 'llava'"),
    ("no_weights", "no weights"),
    ("truncated_weights", "cannot load"),
    ("no_tokenizer", "no tokenizer"),
    ("no_processor", "no processor"),
])
def test_broken_checkpoint_errors_name_the_problem(ckpt, tmp_path, breakage, message):
    bad = tmp_path / "bad"
    if breakage != "missing_dir":
        shutil.copytree(ckpt, bad)
    if breakage == "no_config":
        (bad / "config.json").unlink()
    elif breakage == "bad_config":
        (bad / "config.json").write_text("{not json")
    elif breakage == "wrong_type":
        (bad / "config.json").write_text(json.dumps({"model_type": "llava"}))
    elif breakage == "no_weights":
        (bad / "model.safetensors").unlink()
    elif breakage == "truncated_weights":
        (bad / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes()[:5000])
    elif breakage == "no_tokenizer":
        (bad / "tokenizer.json").unlink()
        (bad / "tokenizer_config.json").unlink()
    elif breakage == "no_processor":
        (bad / "processor_config.json").unlink()
    with pytest.raises(CheckpointError) as err:
        load(bad)
    assert str(bad) in str(err.value) and message in str(err.value)


def test_tokenizer_helpers():
    tok = build_tiny_tokenizer(None, ["<image>"])
    yes, no = yes_no_token_ids(tok)
    assert {tok.convert_ids_to_tokens(i) for i in yes} >= {"yes", "Yes", "Ġyes", "ĠYes"}
    assert {tok.convert_ids_to_tokens(i) for i in no} >= {"no", "No", "Ġno", "ĠNo"}
    assert not set(yes) & set(no)
    assert len(tok("<image> a red cube")["input_ids"]) == 5  # bos, <image>, 3 whole words


# ------------------------------------------------------------------------------------ sampling
def test_sample_shapes_and_determinism(backend):
    seeds = [1, 2, 3]
    a = backend.sample(PROMPTS + PROMPTS[:1], seeds)
    assert a.dtype == torch.int64 and a.device.type == "cpu" and a.shape == (3, backend.num_image_tokens)
    assert int(a.min()) >= 0 and int(a.max()) < backend.model.config.vq_config.num_embeddings
    state = torch.get_rng_state()
    assert torch.equal(a, backend.sample(PROMPTS + PROMPTS[:1], seeds))
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is never used
    b = backend.sample(PROMPTS + PROMPTS[:1], [1, 2, 4])
    assert torch.equal(a[:2], b[:2]) and not torch.equal(a[2], b[2])  # rows use their own generator
    assert not torch.equal(a[0], a[2])  # same prompt, other seed


def test_sample_independent_of_batch_companions(backend):
    # promised for a fixed batch size: the companion prompt differs in length, so the padding differs
    short = backend.sample([PROMPTS[0], "a cat"], [1, 2])
    long = backend.sample([PROMPTS[0], PROMPTS[1] + " and three small dogs"], [1, 9])
    assert torch.equal(short[0], long[0])


def test_greedy_sampling_matches_transformers_generate(ckpt):
    backend = load(ckpt, top_k=1)
    ours = backend.sample(PROMPTS[:1], [0])
    inputs = backend.processor(text=backend._chat(PROMPTS[0], system=False), generation_mode="image")
    theirs = backend.model.generate(**inputs, generation_mode="image", do_sample=False, guidance_scale=5.0,
                                    generation_config=backend.generation_config)
    assert torch.equal(ours, theirs.cpu())


def test_warp_logits_matches_transformers():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    for temperature, top_k, top_p in [(1.0, 0, 0.9), (0.7, 10, 0.95), (1.3, 5, 1.0), (1.0, 0, 0.3)]:
        procs = [TemperatureLogitsWarper(temperature)]
        procs += [TopKLogitsWarper(top_k)] if top_k else []
        procs += [TopPLogitsWarper(top_p)] if top_p < 1 else []
        ref = LogitsProcessorList(procs)(None, logits.clone())
        torch.testing.assert_close(warp_logits(logits, temperature, top_k, top_p), ref)


def test_decode_shapes(backend):
    images = backend.decode(backend.sample(PROMPTS, [5, 6]), [5, 6])
    assert images.dtype == np.uint8 and images.shape == (2, 32, 32, 3)


# ------------------------------------------------------------------------------------ text
def test_write_text_needs_one_seed_per_prompt(backend):
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        backend.write_text(PROMPTS, [0], max_new_tokens=3, temperature=1.0)


def test_write_text(backend):
    state = torch.get_rng_state()
    greedy = backend.write_text(PROMPTS, [0, 1], max_new_tokens=6, temperature=0.0)
    assert greedy == backend.write_text(PROMPTS, [7, 8], max_new_tokens=6, temperature=0.0)
    sampled = backend.write_text(PROMPTS, [0, 1], max_new_tokens=6, temperature=1.0, top_p=0.9)
    assert all(isinstance(s, str) for s in greedy + sampled)
    assert sampled == backend.write_text(PROMPTS, [0, 1], max_new_tokens=6, temperature=1.0, top_p=0.9)
    other = backend.write_text(PROMPTS, [0, 2], max_new_tokens=6, temperature=1.0, top_p=0.9)
    assert other[0] == sampled[0]
    assert torch.equal(state, torch.get_rng_state())


# ------------------------------------------------------------------------------------ yes / no
def reference_yes_no(backend: JanusBackend, image: np.ndarray, question: str) -> tuple[float, float]:
    """One question at a time, whole prompt, through transformers' own multimodal forward."""
    ids = torch.tensor([backend.tokenizer(backend._chat(question, image=True))["input_ids"]])
    pixels = backend.processor.image_processor([image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = backend.model(input_ids=ids, pixel_values=pixels, logits_to_keep=1).logits[0, -1]
    probs = logits.float().softmax(-1)
    yes, no = yes_no_token_ids(backend.tokenizer)
    return float(probs[yes].sum()), float(probs[no].sum())


def test_yes_no_equals_one_at_a_time(backend, images):
    out = backend.yes_no(images, QUESTIONS)
    assert len(out) == len(QUESTIONS)
    for (p_yes, p_no), image, qs in zip(out, images, QUESTIONS, strict=True):
        assert p_yes.dtype == np.float32 and p_yes.shape == p_no.shape == (len(qs),)
        assert np.all(p_yes > 0) and np.all(p_no > 0) and np.all(p_yes + p_no <= 1)
        for j, q in enumerate(qs):
            ref_yes, ref_no = reference_yes_no(backend, image, q)
            assert abs(p_yes[j] - ref_yes) < 1e-5 and abs(p_no[j] - ref_no) < 1e-5


def test_yes_no_independent_of_grouping(backend, images):
    full = backend.yes_no(images, QUESTIONS, batch_size=64)
    for batch_size in (1, 2, 3):
        grouped = backend.yes_no(images, QUESTIONS, batch_size=batch_size)
        for (a_yes, a_no), (b_yes, b_no) in zip(full, grouped, strict=True):
            np.testing.assert_allclose(a_yes, b_yes, atol=1e-6)
            np.testing.assert_allclose(a_no, b_no, atol=1e-6)
    alone = backend.yes_no(images[3:4], QUESTIONS[3:4])[0]
    np.testing.assert_allclose(alone[0], full[3][0], atol=1e-6)


def test_yes_no_plan_encodes_each_image_once():
    groups = list(JanusBackend._plan([["a"] * 3, ["b"], [], ["c"] * 5, ["d"]], batch=4))
    assert groups == [([0, 1], [0, 1, 2, 3]), ([3], [4, 5, 6, 7, 8]), ([4], [9])]


# ------------------------------------------------------------------------------------ log-probs
def test_teacher_forcing_equals_sampling_logprobs(ckpt):
    unwarped = load(ckpt, temperature=1.0, top_p=1.0, top_k=0)
    drawn = unwarped.sample_with_logprobs(PROMPTS, [3, 4])
    torch.testing.assert_close(drawn.logp_sampling, drawn.logp_cfg)
    unwarped.logprob_mode = LogprobMode.cfg
    torch.testing.assert_close(unwarped.sequence_logprobs(PROMPTS, drawn.tokens), drawn.logp_sampling,
                               atol=1e-4, rtol=0)
    nucleus = load(ckpt, top_p=0.9, top_k=20, temperature=0.8)
    drawn = nucleus.sample_with_logprobs(PROMPTS, [3, 4])
    assert torch.all(drawn.logp_sampling > drawn.logp_cfg)  # truncation + sharpening concentrate mass
    for mode, expected in ((LogprobMode.cfg, drawn.logp_cfg), (LogprobMode.conditional, drawn.logp_conditional)):
        nucleus.logprob_mode = mode
        torch.testing.assert_close(nucleus.sequence_logprobs(PROMPTS, drawn.tokens), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", list(LogprobMode))
def test_sequence_logprobs_left_padding_invariance(backend, mode):
    backend.logprob_mode = mode
    try:
        tokens = backend.sample(PROMPTS, [1, 2])
        batched = backend.sequence_logprobs(PROMPTS, tokens)
        assert batched.shape == (2,) and batched.dtype == torch.float32
        alone = backend.sequence_logprobs(PROMPTS[:1], tokens[:1])
        torch.testing.assert_close(alone, batched[:1], atol=1e-5, rtol=0)
    finally:
        backend.logprob_mode = LogprobMode.conditional


# ------------------------------------------------------------------------------------ LoRA
def test_lora_reference_save_and_merge(ckpt, images, tmp_path):
    backend = load(ckpt)
    tokens = backend.sample(PROMPTS, [1, 2])
    base_logp = backend.sequence_logprobs(PROMPTS, tokens)
    base_yes = backend.yes_no(images[:1], QUESTIONS[:1])[0][0]
    with pytest.raises(RuntimeError):
        backend.trainable_parameters()
    with backend.reference():  # no adapter: a no-op
        assert torch.equal(backend.sequence_logprobs(PROMPTS, tokens), base_logp)

    backend.add_lora(LORA)
    names = backend.lora_module_names()
    assert len(names) == 2 * 7 and all(".language_model.layers." in n for n in names)
    trainable = {n for n, p in backend.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and ".language_model." in n for n in trainable)
    assert len(backend.trainable_parameters()) == len(trainable)

    perturb_lora(backend)
    policy = backend.sequence_logprobs(PROMPTS, tokens)
    assert not torch.allclose(policy, base_logp)
    with backend.reference():
        assert torch.equal(backend.sequence_logprobs(PROMPTS, tokens), base_logp)
        assert np.array_equal(backend.yes_no(images[:1], QUESTIONS[:1])[0][0], base_yes)
        assert torch.equal(backend.sample(PROMPTS, [1, 2]), tokens)
    assert torch.equal(backend.sequence_logprobs(PROMPTS, tokens), policy)  # adapter back on

    policy.sum().backward()  # differentiable for DPO
    grads = [p.grad for p in backend.trainable_parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)

    backend.save_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    resumed = load(ckpt)
    resumed.load_adapter(tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(resumed.sequence_logprobs(PROMPTS, tokens), policy.detach())

    policy_yes = backend.yes_no(images[:1], QUESTIONS[:1])[0][0]
    backend.merge_and_save(tmp_path / "merged")
    assert backend.peft is None and not backend.lora_module_names()
    with torch.no_grad():
        merged_logp = backend.sequence_logprobs(PROMPTS, tokens)
    torch.testing.assert_close(merged_logp, policy.detach(), atol=1e-4, rtol=0)  # W + BA vs Wx + BAx rounding
    reloaded = load(tmp_path / "merged")
    with torch.no_grad():
        assert torch.equal(reloaded.sequence_logprobs(PROMPTS, tokens), merged_logp)
    assert torch.equal(reloaded.sample(PROMPTS, [1, 2]), backend.sample(PROMPTS, [1, 2]))
    np.testing.assert_allclose(reloaded.yes_no(images[:1], QUESTIONS[:1])[0][0], policy_yes, atol=1e-5)
    saved = json.loads((tmp_path / "merged" / "generation_config.json").read_text())
    assert saved["generation_kwargs"] == json.loads((ckpt / "generation_config.json").read_text())["generation_kwargs"]


def test_lora_regex_must_match(backend):
    with pytest.raises(ValueError, match="matches no Linear"):
        apply_lora(backend.model, replace(LORA, target_regex=r".*nothing_here\.proj"))
    assert lora_target_modules(backend.model, LoraConfig().target_regex) == [
        f"model.language_model.layers.{i}.{m}" for i in range(2) for m in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


# ------------------------------------------------------------------------------------ chunked log-probs, memory
NUM_CODES = 64  # build_tiny_janus: vq num_embeddings


def reference_logprobs_full(backend: JanusBackend, prompts: list[str], tokens: torch.Tensor,
                            mode: LogprobMode) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable full-logits reference (the pre-chunking computation), per prompt and unpadded: chat
    ids + <begin_of_image>, then the image-generation embeddings, through the language model, the whole
    generation head in float32, CFG-mixed (unconditional: all but BOS and <begin_of_image> -> pad)."""
    model, tok = backend.model, backend.tokenizer
    boi = tok.convert_tokens_to_ids("<begin_of_image>")
    pad = backend.generation_config.pad_token_id
    logps, entropies = [], []
    for prompt, row in zip(prompts, tokens, strict=True):
        ids = torch.tensor([tok(backend._chat(prompt, system=False))["input_ids"] + [boi]])
        branches = [ids]
        if mode is LogprobMode.cfg:
            branches.append(torch.where((ids == boi) | (ids == tok.bos_token_id), ids, torch.full_like(ids, pad)))
        logits = []
        for x in branches:
            embeds = torch.cat([model.get_input_embeddings()(x),
                                model.prepare_embeddings_for_image_generation(row[None, :-1])], 1)
            hidden = model.model.language_model(inputs_embeds=embeds).last_hidden_state
            logits.append(model.model.generation_head(hidden[:, x.shape[1] - 1:])[0].float())
        mixed = logits[0] if len(logits) == 1 else logits[1] + 5.0 * (logits[0] - logits[1])
        logp, ent = full_logits_reference(mixed, row)
        logps.append(logp)
        entropies.append(ent)
    return torch.stack(logps), torch.stack(entropies)


@pytest.mark.parametrize("mode", list(LogprobMode))
def test_sequence_logprobs_chunked_equal_full_logits_with_lora_grads(ckpt, mode):
    backend = load(ckpt, guidance_scale=5.0)
    backend.logprob_mode = mode
    backend.add_lora(replace(LORA, alpha=4))
    perturb_lora(backend)
    params = backend.trainable_parameters()
    tokens = torch.randint(0, NUM_CODES, (2, backend.num_image_tokens), generator=torch.Generator().manual_seed(0))
    ref_logp, ref_ent = reference_logprobs_full(backend, PROMPTS, tokens, mode)
    assert_chunked_logprobs_match(backend, PROMPTS, tokens, (3, 5, backend.num_image_tokens, 64), ref_logp, ref_ent, params)


@pytest.mark.parametrize("mode", list(LogprobMode))
def test_training_forward_builds_no_kv_cache(backend, mode):
    backend.logprob_mode = mode
    seen: list = []
    handle = backend._lm.register_forward_pre_hook(
        lambda _m, _args, kwargs: seen.append(kwargs.get("use_cache")), with_kwargs=True)
    try:
        tokens = torch.randint(0, NUM_CODES, (2, backend.num_image_tokens), generator=torch.Generator().manual_seed(1))
        backend.sequence_logprobs(PROMPTS, tokens)
    finally:
        handle.remove()
        backend.logprob_mode = LogprobMode.conditional
    assert seen == [False] * (2 if mode is LogprobMode.cfg else 1)


def test_gradient_checkpointing_same_loss_and_grads(ckpt):
    backend = load(ckpt)
    backend.add_lora(LoraConfig(r=4, alpha=4, dropout=0.0))
    perturb_lora(backend)
    tokens = torch.randint(0, NUM_CODES, (2, backend.num_image_tokens), generator=torch.Generator().manual_seed(2))
    assert_checkpointing_keeps_loss_and_grads(
        backend, backend._lm.layers[0].mlp,
        lambda: (backend.sequence_logprobs(PROMPTS, tokens) * torch.tensor([1.0, -0.5])).sum(),
        backend.trainable_parameters(), backend.train)


@pytest.mark.parametrize("mode", list(LogprobMode))
def test_bfloat16_sequence_logprobs_and_backward(ckpt, mode):
    """The CUDA path's dtype (bf16 weights, float32 LoRA from peft) on CPU: float32 finite log-probs close
    to the float32 model's, and a backward."""
    tokens = torch.randint(0, NUM_CODES, (2, 16), generator=torch.Generator().manual_seed(3))
    out = {}
    for dtype in (Dtype.float32, Dtype.bfloat16):
        backend = JanusBackend.load(ModelConfig(path=str(ckpt), dtype=dtype), SamplingConfig(guidance_scale=5.0),
                                    logprob_mode=mode)
        assert backend.model.dtype == getattr(torch, dtype.value)
        backend.add_lora(LoraConfig(r=4, alpha=4, dropout=0.0))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # A and B seeded alike in both models (peft draws A from the global RNG)
            for name, p in backend.peft.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "lora_B" in name else 0.2))
        logp, ent = backend.sequence_logprobs(PROMPTS, tokens, entropy=True)
        assert logp.dtype == ent.dtype == torch.float32 and logp.shape == (2,)
        assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
        logp.sum().backward()
        grads = [p.grad for p in backend.trainable_parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
        out[dtype] = logp.detach(), ent
    torch.testing.assert_close(out[Dtype.bfloat16][0], out[Dtype.float32][0], rtol=0.03, atol=0)
    torch.testing.assert_close(out[Dtype.bfloat16][1], out[Dtype.float32][1], atol=0.05, rtol=0)
