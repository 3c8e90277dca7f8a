"""The Emu3 backend against the LMMBackend contract, on a tiny random checkpoint (built offline;
conftest.py sets HF_HUB_OFFLINE).

Random weights would write anything, so the grid tests are the constraint's real test: every sample must
still be exactly the token grid the VQ decoder needs. Other checks are equalities with independent
computations (transformers' own generate, multimodal forward and full-vocabulary logits).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from silmm import config as C
from silmm.backends.base import CheckpointError
from silmm.backends.common import lora_target_modules, yes_no_token_ids
from silmm.backends.emu3 import NEGATIVE_PROMPT, Emu3Backend, build_tiny_emu3, plan_groups
from silmm.config import Dtype, LogprobMode, LoraConfig, ModelConfig, SamplingConfig
from tests.helpers import (
    assert_checkpointing_keeps_loss_and_grads,
    assert_chunked_logprobs_match,
    full_logits_reference,
    tiny_run,
)

PROMPTS = ["a red cube", "two green spheres to the left of a wooden table"]
QUESTIONS = [
    ["Is there a red cube?", "Is the cube above the sphere?", "Are there two dogs?"],
    ["Is the table wooden?"],
    [],
    ["Are there two green spheres?", "Is the sphere left of the table?"],
]
GRID = {"image_height": 4, "image_width": 4}
LORA = LoraConfig(r=4, alpha=8, dropout=0.0)
NUM_CODES = 64  # build_tiny_emu3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return build_tiny_emu3(tmp_path_factory.mktemp("emu3") / "tiny", seed=0)


def load(path: Path, dtype: Dtype = Dtype.float32, mode: LogprobMode = LogprobMode.conditional,
         **sampling) -> Emu3Backend:
    sampling = {**GRID, "guidance_scale": 3.0, **sampling}
    return Emu3Backend.load(ModelConfig(path=str(path), dtype=dtype), SamplingConfig(**sampling), logprob_mode=mode)


@pytest.fixture(scope="module")
def backend(ckpt) -> Emu3Backend:
    return load(ckpt)


@pytest.fixture(scope="module")
def images(backend) -> np.ndarray:
    seeds = [10, 11, 12, 13]
    return backend.decode(backend.sample([PROMPTS[0]] * len(QUESTIONS), seeds), seeds)


def perturb_lora(backend: Emu3Backend, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in backend.peft.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "lora_B" in name else 0.2))


def random_codes(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, NUM_CODES, (n, 16), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ checkpoints
def test_build_tiny_is_deterministic_in_the_released_layout(ckpt, tmp_path):
    again = build_tiny_emu3(tmp_path / "again", seed=0)
    other = build_tiny_emu3(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert (ckpt / name).read_bytes() == (again / name).read_bytes(), name
    assert (ckpt / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model_type"] == "emu3" and config["architectures"] == ["Emu3ForConditionalGeneration"]
    vocab = config["vocabulary_map"]
    assert "<|extra_200|>" in vocab and "<image>" in vocab and "<|visual token 000063|>" in vocab


@pytest.mark.parametrize("breakage, message", [
    ("missing_dir", "does not exist"),
    ("no_config", "no config.json"),
    ("bad_config", "not a valid JSON"),
    ("wrong_type", "model_type is 'janus'"),
    ("no_weights", "no weights"),
    ("truncated_weights", "cannot load"),
    ("no_tokenizer", "no tokenizer"),
    ("no_processor", "no processor"),
])
def test_broken_checkpoint_errors_name_the_path(ckpt, tmp_path, breakage, message):
    bad = tmp_path / "bad"
    if breakage != "missing_dir":
        shutil.copytree(ckpt, bad)
    if breakage == "no_config":
        (bad / "config.json").unlink()
    elif breakage == "bad_config":
        (bad / "config.json").write_text("{not json")
    elif breakage == "wrong_type":
        config = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**config, "model_type": "janus"}))
    elif breakage == "no_weights":
        (bad / "model.safetensors").unlink()
    elif breakage == "truncated_weights":
        data = (bad / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif breakage == "no_tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (bad / name).unlink()
    elif breakage == "no_processor":
        (bad / "processor_config.json").unlink()
    with pytest.raises(CheckpointError, match=message) as err:
        load(bad)
    assert str(bad) in str(err.value)


def test_grid_too_long_for_the_model_is_refused(ckpt):
    with pytest.raises(ValueError, match="set sampling.image_height/image_width smaller"):
        load(ckpt, image_height=30, image_width=30)


def test_config_validates_the_grid(ckpt):
    path = f"model.path={ckpt}"
    with pytest.raises(C.ConfigError, match="sampling.image_height"):
        C.load(None, ["model.backend=emu3", path, "sampling.image_height=4"])
    with pytest.raises(C.ConfigError, match="sets the Emu3 image grid"):
        C.load(None, ["model.backend=janus", path, "sampling.image_height=4", "sampling.image_width=4"])
    cfg = C.load(None, ["model.backend=emu3", path, "sampling.image_height=4", "sampling.image_width=4"])
    assert cfg.discrete


# ------------------------------------------------------------------------------------ sampling: the grid
def fed_image_ids(backend: Emu3Backend, prompts: list[str], seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample while recording every token id fed to the text model after the prompt: (codes, fed ids)."""
    fed: list[torch.Tensor] = []
    handle = backend._lm.register_forward_pre_hook(
        lambda _m, _a, kwargs: fed.append(kwargs["input_ids"]), with_kwargs=True)
    try:
        codes = backend.sample(prompts, seeds)
    finally:
        handle.remove()
    return codes, torch.cat(fed[1:], dim=1)  # fed[0] is the prompt


@pytest.mark.parametrize("sampling", [
    {}, {"top_k": 5, "temperature": 1.7}, {"top_p": 0.3}, {"guidance_scale": 1.0}, {"image_height": 3, "image_width": 5},
])
def test_every_sample_obeys_the_grid(ckpt, sampling):
    backend = load(ckpt, **sampling)
    h, w = backend.grid
    prompts = [PROMPTS[i % 2] for i in range(6)]
    codes, fed = fed_image_ids(backend, prompts, list(range(6)))
    assert codes.shape == (6, h * w) and codes.dtype == torch.int64
    assert codes.min() >= 0 and codes.max() < NUM_CODES
    # what the model saw: rows of w visual tokens, each closed by <eol> (the last code and <eol> need no forward)
    expected = backend.grid_sequence(codes, closing=False)[:, :-2]
    rows = len(prompts) * (1 if sampling.get("guidance_scale") == 1.0 else 2)
    assert fed.shape == (rows, h * (w + 1) - 2)
    assert torch.equal(fed[:6], expected) and torch.equal(fed[6:], expected[: rows - 6])
    full = backend.grid_sequence(codes)
    grid = full[:, :-3].view(6, h, w + 1)
    assert torch.isin(grid[:, :, :w], backend.code_ids).all() and (grid[:, :, w] == backend.eol_id).all()
    assert full[:, -3:].tolist() == [[backend.eof_id, backend.eoi_id, backend.eos_id]] * 6
    images = backend.decode(codes)  # every sample decodes
    assert images.shape == (6, 8 * h, 8 * w, 3) and images.dtype == np.uint8


def test_unconstrained_random_model_breaks_the_grid(backend):
    h, w = backend.grid
    free = backend.sample_unconstrained(PROMPTS, [0, 1]).view(2, h, w + 1)
    ok = torch.isin(free[:, :, :w], backend.code_ids).all() and (free[:, :, w] == backend.eol_id).all()
    assert not ok  # what the constraint prevents


def test_greedy_sampling_matches_transformers_generate_with_emu3s_recipe(ckpt):
    """transformers' model-card recipe: generate() with a prefix-constrained logits processor and CFG
    against the negative prompt (UnbatchedClassifierFreeGuidanceLogitsProcessor)."""
    backend = load(ckpt, top_k=1)
    h, w = backend.grid
    for prompt in PROMPTS:
        row = torch.tensor([backend.generation_row(prompt)])
        neg = torch.tensor([backend.generation_row(NEGATIVE_PROMPT)])
        visual, start = backend.code_ids.tolist(), row.shape[1]

        def allowed(_batch_id, input_ids, visual=visual, start=start):
            off = input_ids.shape[0] - start
            if off < h * (w + 1):
                return [backend.eol_id] if off % (w + 1) == w else visual
            return [[backend.eof_id], [backend.eoi_id], [backend.eos_id]][min(off - h * (w + 1), 2)]

        out = backend.model.generate(
            input_ids=row, attention_mask=torch.ones_like(row), max_new_tokens=h * (w + 1) + 3, do_sample=False,
            prefix_allowed_tokens_fn=allowed, guidance_scale=3.0, negative_prompt_ids=neg,
            negative_prompt_attention_mask=torch.ones_like(neg))
        assert torch.equal(out[:, start:], backend.grid_sequence(backend.sample([prompt], [0])))


def test_seeds_reproduce_and_rows_are_independent(backend):
    state = torch.get_rng_state()
    a = backend.sample(PROMPTS, [1, 2])
    assert torch.equal(a, backend.sample(PROMPTS, [1, 2]))
    assert not torch.equal(a[1], backend.sample(PROMPTS, [1, 3])[1])
    assert torch.equal(a[0], backend.sample(PROMPTS, [1, 3])[0])
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is never used


def test_decode_batches_equal_single_decodes(backend):
    codes = backend.sample(PROMPTS * 3, list(range(6)))
    backend.decode_batch_size = 4
    batched = backend.decode(codes)
    backend.decode_batch_size = 1
    try:
        single = np.concatenate([backend.decode(codes[i:i + 1]) for i in range(6)])
    finally:
        backend.decode_batch_size = 4
    assert batched.shape == (6, 32, 32, 3) and batched.dtype == np.uint8
    assert np.array_equal(batched, single)


def test_write_text(backend):
    greedy = backend.write_text(PROMPTS, [0, 1], max_new_tokens=6, temperature=0.0)
    assert greedy == backend.write_text(PROMPTS, [7, 8], max_new_tokens=6, temperature=0.0)
    sampled = backend.write_text(PROMPTS, [0, 1], max_new_tokens=6, temperature=1.0, top_p=0.9)
    assert sampled == backend.write_text(PROMPTS, [0, 1], max_new_tokens=6, temperature=1.0, top_p=0.9)
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        backend.write_text(PROMPTS, [0], max_new_tokens=3)


# ------------------------------------------------------------------------------------ yes / no
def reference_yes_no(backend: Emu3Backend, image: np.ndarray, question: str) -> tuple[float, float]:
    """One question at a time, through Emu3's own processor (placeholder expansion) and multimodal forward."""
    proc = backend.processor
    inputs = proc(text=[backend._chat(question, image=True)], images=[image], return_tensors="pt")
    with torch.no_grad():
        logits = backend.model(**inputs, logits_to_keep=1).logits[0, -1]
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


def test_yes_no_prefills_each_image_once_and_grouping_does_not_matter(backend, images):
    calls: list[int] = []
    handle = backend.model.model.vqmodel.register_forward_pre_hook(lambda *_: calls.append(1))
    encodes: list[int] = []
    original = backend.model.model.get_image_tokens

    def counting(pixels, sizes):
        encodes.append(len(pixels))
        return original(pixels, sizes)

    backend.model.model.get_image_tokens = counting
    try:
        full = backend.yes_no(images, QUESTIONS, batch_size=64)
        assert sum(encodes) == 3  # the image without questions is not even encoded
        for batch_size in (1, 2, 3):
            grouped = backend.yes_no(images, QUESTIONS, batch_size=batch_size)
            for (a_yes, a_no), (b_yes, b_no) in zip(full, grouped, strict=True):
                np.testing.assert_allclose(a_yes, b_yes, atol=1e-6)
                np.testing.assert_allclose(a_no, b_no, atol=1e-6)
    finally:
        del backend.model.model.get_image_tokens
        handle.remove()
    assert list(plan_groups([["a"] * 3, ["b"], [], ["c"] * 5, ["d"]], batch=4)) == [
        ([0, 1], [0, 1, 2, 3]), ([3], [4, 5, 6, 7, 8]), ([4], [9])]


# ------------------------------------------------------------------------------------ log-probs
def test_teacher_forcing_equals_sampling_logprobs(ckpt):
    unwarped = load(ckpt, temperature=1.0, top_p=1.0, top_k=0)
    drawn = unwarped.sample_with_logprobs(PROMPTS, [3, 4])
    torch.testing.assert_close(drawn.logp_sampling, drawn.logp_cfg)
    nucleus = load(ckpt, top_p=0.9, top_k=20, temperature=0.8)
    drawn = nucleus.sample_with_logprobs(PROMPTS, [3, 4])
    assert torch.all(drawn.logp_sampling > drawn.logp_cfg)
    for mode, expected in ((LogprobMode.cfg, drawn.logp_cfg), (LogprobMode.conditional, drawn.logp_conditional)):
        nucleus.logprob_mode = mode
        torch.testing.assert_close(nucleus.sequence_logprobs(PROMPTS, drawn.tokens), expected, atol=1e-4, rtol=0)


def test_sequence_logprobs_left_padding_invariance(backend):
    tokens = backend.sample(PROMPTS, [1, 2])
    batched = backend.sequence_logprobs(PROMPTS, tokens)
    assert batched.shape == (2,) and batched.dtype == torch.float32
    torch.testing.assert_close(backend.sequence_logprobs(PROMPTS[:1], tokens[:1]), batched[:1], atol=1e-5, rtol=0)


def reference_logprobs_full(backend: Emu3Backend, prompts: list[str], tokens: torch.Tensor,
                            mode: LogprobMode) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable full-vocabulary reference, per prompt and unpadded: Emu3ForConditionalGeneration's own
    forward over prompt + the whole image sequence (markers included), every position's logits over the
    whole vocabulary; then the constraint as a mask (visual positions only, visual tokens only), CFG-mixed
    against the negative prompt for ``cfg``."""
    h, w = backend.grid
    visual = backend.code_ids
    logps, entropies = [], []
    for prompt, codes in zip(prompts, tokens, strict=True):
        seq = backend.grid_sequence(codes[None])[0]
        branches = [prompt] + ([NEGATIVE_PROMPT] if mode is LogprobMode.cfg else [])
        logits = []
        for text in branches:
            row = torch.tensor(backend.generation_row(text))
            ids = torch.cat([row, seq])[None]
            out = backend.model(input_ids=ids).logits[0].float()
            # the logits at position p predict token p + 1; keep those predicting visual tokens
            targets = torch.arange(len(row), len(row) + len(seq))
            is_visual = torch.isin(seq, visual)
            assert int(is_visual.sum()) == h * w
            logits.append(out[targets[is_visual] - 1][:, visual])
        mixed = logits[0] if len(logits) == 1 else logits[1] + 3.0 * (logits[0] - logits[1])
        logp, ent = full_logits_reference(mixed, codes)
        logps.append(logp)
        entropies.append(ent)
    return torch.stack(logps), torch.stack(entropies)


@pytest.mark.parametrize("mode", list(LogprobMode))
def test_sequence_logprobs_chunked_equal_full_forward_with_lora_grads(ckpt, mode):
    backend = load(ckpt, mode=mode)
    backend.add_lora(replace(LORA, alpha=4))
    perturb_lora(backend)
    params = backend.trainable_parameters()
    tokens = random_codes(2, 0)
    ref_logp, ref_ent = reference_logprobs_full(backend, PROMPTS, tokens, mode)
    assert_chunked_logprobs_match(backend, PROMPTS, tokens, (3, 5, 16, 64), ref_logp, ref_ent, params)


@pytest.mark.parametrize("mode", list(LogprobMode))
def test_training_forward_builds_no_kv_cache(backend, mode):
    backend.logprob_mode = mode
    seen: list = []
    handle = backend._lm.register_forward_pre_hook(
        lambda _m, _args, kwargs: seen.append(kwargs.get("use_cache")), with_kwargs=True)
    try:
        backend.sequence_logprobs(PROMPTS, random_codes(2, 1))
    finally:
        handle.remove()
        backend.logprob_mode = LogprobMode.conditional
    assert seen == [False]


def test_gradient_checkpointing_same_loss_and_grads(ckpt):
    backend = load(ckpt)
    backend.add_lora(LoraConfig(r=4, alpha=4, dropout=0.0))
    perturb_lora(backend)
    tokens = random_codes(2, 2)
    assert_checkpointing_keeps_loss_and_grads(
        backend, backend._lm.layers[0].mlp,
        lambda: (backend.sequence_logprobs(PROMPTS, tokens) * torch.tensor([1.0, -0.5])).sum(),
        backend.trainable_parameters(), backend.train)


@pytest.mark.parametrize("mode", list(LogprobMode))
def test_bfloat16_sequence_logprobs_close_to_float32(ckpt, mode):
    """The CUDA path's dtype (bf16 weights, float32 LoRA) on CPU: finite float32 log-probs close to the
    float32 model's, and a backward."""
    tokens = random_codes(2, 3)
    out = {}
    for dtype in (Dtype.float32, Dtype.bfloat16):
        backend = load(ckpt, dtype=dtype, mode=mode)
        assert backend.model.dtype == getattr(torch, dtype.value)
        backend.add_lora(LoraConfig(r=4, alpha=4, dropout=0.0))
        perturb_lora(backend)
        logp, ent = backend.sequence_logprobs(PROMPTS, tokens, entropy=True)
        assert logp.dtype == ent.dtype == torch.float32 and torch.isfinite(logp).all()
        logp.sum().backward()
        grads = [p.grad for p in backend.trainable_parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        out[dtype] = logp.detach(), ent
    torch.testing.assert_close(out[Dtype.bfloat16][0], out[Dtype.float32][0], rtol=0.03, atol=0)
    torch.testing.assert_close(out[Dtype.bfloat16][1], out[Dtype.float32][1], atol=0.05, rtol=0)


# ------------------------------------------------------------------------------------ LoRA and export
def test_lora_on_the_text_model_reference_and_export(ckpt, images, tmp_path):
    backend = load(ckpt)
    tokens = backend.sample(PROMPTS, [1, 2])
    base_logp = backend.sequence_logprobs(PROMPTS, tokens)
    base_yes = backend.yes_no(images[:1], QUESTIONS[:1])[0][0]
    targets = lora_target_modules(backend.model, LoraConfig().target_regex)
    backend.add_lora(LORA)
    assert targets == [f"model.text_model.layers.{i}.{m}" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]  # nothing of the VQ model
    trainable = {n for n, p in backend.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and ".text_model.layers." in n for n in trainable)

    perturb_lora(backend)
    policy = backend.sequence_logprobs(PROMPTS, tokens)
    assert not torch.allclose(policy, base_logp)
    with backend.reference():
        assert torch.equal(backend.sequence_logprobs(PROMPTS, tokens), base_logp)
        assert np.array_equal(backend.yes_no(images[:1], QUESTIONS[:1])[0][0], base_yes)
        assert torch.equal(backend.sample(PROMPTS, [1, 2]), tokens)
    policy.sum().backward()
    assert any(p.grad.abs().sum() > 0 for p in backend.trainable_parameters())

    backend.merge_and_save(tmp_path / "merged")
    before, after = load_file(str(ckpt / "model.safetensors")), load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # only the LoRA-targeted weights, under the released checkpoint's key names (text_model.model.layers..)
    assert changed == {f"{t.replace('model.text_model.', 'text_model.model.')}.weight" for t in targets}
    for name in ("tokenizer.json", "processor_config.json"):
        assert (tmp_path / "merged" / name).is_file()
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["vocabulary_map"] == \
        json.loads((ckpt / "config.json").read_text())["vocabulary_map"]
    reloaded = load(tmp_path / "merged")
    with torch.no_grad():
        merged = reloaded.sequence_logprobs(PROMPTS, tokens)
    torch.testing.assert_close(merged, policy.detach(), atol=1e-4, rtol=0)
    assert torch.equal(reloaded.sample(PROMPTS, [1, 2]), backend.sample(PROMPTS, [1, 2]))


# ------------------------------------------------------------------------------------ through the driver
def test_an_iteration_runs_end_to_end_through_the_driver(tiny_checkpoints, tmp_path):
    from silmm import store as S
    from silmm.driver import STAGE_ORDER, Driver
    from silmm.inspection import verify_run
    from silmm.models import load_backend

    run = tiny_run(tmp_path, tiny_checkpoints("emu3"), "emu3", "executor.kind=debug", "executor.poll_interval_s=0.1")
    driver = Driver(run)
    for stage in STAGE_ORDER:
        driver.run_stage(1, stage)
    assert verify_run(run) == []
    samples = S.read_shard(run.shard_path(1, "samples", 0), stage="samples", config_hash=run.config_hash)
    assert samples["tokens"].shape[1] == 16 and samples["tokens"].max() < NUM_CODES
    start = load_backend(run, 1)
    n = run.config.sampling.samples_per_prompt
    prompts = S.read_shard(run.shard_path(1, "prompts", 0), stage="prompts", config_hash=run.config_hash)
    text = dict(zip(prompts["prompt_id"].tolist(), prompts["text"], strict=True))
    first = [text[int(p)] for p in samples["prompt_id"][:n]]
    with torch.no_grad():
        ref = start.sequence_logprobs(first, torch.from_numpy(samples["tokens"][:n])).numpy()
    np.testing.assert_allclose(samples["ref_logprob"][:n], ref, rtol=1e-5, atol=1e-4)  # stored reference values
    trained = load_backend(run, 2)  # iteration 1's merged model, through the same code
    assert isinstance(trained, Emu3Backend)
    with torch.no_grad():
        moved = trained.sequence_logprobs(first, torch.from_numpy(samples["tokens"][:n])).numpy()
    assert not np.allclose(moved, ref)
