"""The early-fusion backend against the LMMBackend contract, on a tiny random checkpoint (built offline).

Random tiny models answer nothing meaningfully, so these tests check shapes, determinism, invariants and exact
equalities with independent computations: one plain full forward of ``backend.model`` (no KV cache, no padding)
on a token sequence built by hand from the tokenizer, never the backend's own sequence helpers.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.generation import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from silmm.backends.base import CheckpointError
from silmm.backends.common import image_code_logprobs
from silmm.backends.fusion import FusionBackend, build_tiny_fusion
from silmm.config import Dtype, LogprobMode, LoraConfig, ModelConfig, SamplingConfig
from silmm.toy import world
from tests.helpers import (
    assert_checkpointing_keeps_loss_and_grads,
    assert_chunked_logprobs_match,
    full_logits_reference,
)

PROMPTS = ["a red circle", "two blue squares on the left of a green triangle"]
QUESTIONS = [
    ["Is there a red circle?", "Are there two blue squares?", "Is the triangle above the circle?"],
    ["Is there a yellow square?"],
    [],
    ["Are there three purple circles?", "Is the square on the right of the triangle?"],
]
LORA = LoraConfig(r=4, alpha=8, dropout=0.0,
                  target_regex=r".*model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)")
LAYOUT = {"config.json", "model.safetensors", "tokenizer.json", "fusion_config.json",
          "image_codec/codec.json", "image_codec/codebook.safetensors"}
NUM_CODES = len(world.codebook())  # code 0 is the empty cell
NUM_TOKENS = world.GRID * world.GRID


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoints) -> Path:
    return tiny_checkpoints("fusion")


def load(path: Path, **sampling) -> FusionBackend:
    return FusionBackend.load(ModelConfig(path=str(path)), SamplingConfig(**sampling))


@pytest.fixture(scope="module")
def backend(ckpt) -> FusionBackend:
    return load(ckpt, guidance_scale=1.0)


@pytest.fixture(scope="module")
def cfg_backend(ckpt) -> FusionBackend:
    return load(ckpt, guidance_scale=3.0)


@pytest.fixture(scope="module")
def codes(backend) -> torch.Tensor:
    """Image codes of the four images the yes/no tests score."""
    return backend.sample([PROMPTS[0]] * len(QUESTIONS), [10, 11, 12, 13])


@pytest.fixture(scope="module")
def images(backend, codes) -> np.ndarray:
    return backend.decode(codes)


# ------------------------------------------------------------------------------------ independent pieces
def vocab(backend: FusionBackend) -> dict[str, int | list[int]]:
    """Token ids straight from the tokenizer's vocabulary (not the backend's attributes)."""
    tok = backend.tokenizer
    ids = tok.convert_tokens_to_ids
    return {"bos": ids("<s>"), "eos": ids("</s>"), "pad": ids("<pad>"), "boi": ids("<boi>"), "eoi": ids("<eoi>"),
            "images": ids([f"<img_{i}>" for i in range(NUM_CODES)])}


def words(backend: FusionBackend, text: str) -> list[int]:
    return backend.tokenizer(text, add_special_tokens=False)["input_ids"]


def full_logits(backend: FusionBackend, ids: list[int]) -> torch.Tensor:
    """One plain forward over the whole unpadded sequence: logits [L, V] (float32)."""
    with torch.no_grad():
        return backend.model(input_ids=torch.tensor([ids])).logits[0].float()


def reference_logprob(backend: FusionBackend, prompt: str, row: torch.Tensor, guidance: float = 1.0) -> float:
    """sum_t log softmax over the image tokens at <s> prompt <boi> z_<t, CFG-mixed with <s> <boi> z_<t."""
    v = vocab(backend)
    image_ids = torch.tensor(v["images"])
    img = image_ids[row].tolist()

    def image_logits(prefix: list[int]) -> torch.Tensor:
        logits = full_logits(backend, prefix + img)
        return logits[len(prefix) - 1:len(prefix) - 1 + len(img)][:, image_ids]  # the last of `prefix` predicts z_1

    logits = image_logits([v["bos"], *words(backend, prompt), v["boi"]])
    if guidance != 1.0:
        uncond = image_logits([v["bos"], v["boi"]])
        logits = uncond + guidance * (logits - uncond)
    return float(logits.log_softmax(-1).gather(-1, row[:, None]).sum())


def reference_yes_no(backend: FusionBackend, row: torch.Tensor, question: str) -> tuple[float, float]:
    v = vocab(backend)
    ids = [v["bos"], v["boi"], *[v["images"][c] for c in row.tolist()], v["eoi"],
           *words(backend, question + " Answer:")]
    probs = full_logits(backend, ids)[-1].softmax(-1)
    tok = backend.tokenizer
    yes = [i for i in tok.convert_tokens_to_ids(["yes", "Yes", "YES"]) if i != tok.unk_token_id]
    no = [i for i in tok.convert_tokens_to_ids(["no", "No", "NO"]) if i != tok.unk_token_id]
    assert sorted(yes) == backend.yes_ids.tolist() and sorted(no) == backend.no_ids.tolist()
    return float(probs[yes].sum()), float(probs[no].sum())


def banned_text_ids(backend: FusionBackend) -> list[int]:
    v = vocab(backend)
    return [*v["images"], v["boi"], v["eoi"], v["bos"], v["pad"]]


def reference_text(backend: FusionBackend, prompt: str, max_new_tokens: int, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int = 0) -> tuple[str, list[str]]:
    """Greedy or sampled continuation of <s> prompt, one full forward per token (no cache), banned tokens
    masked; returns the text as the backend should clean it and the raw written word tokens."""
    v = vocab(backend)
    ids = [v["bos"], *words(backend, prompt)]
    banned = banned_text_ids(backend)
    gen = torch.Generator().manual_seed(seed)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)] if temperature > 0 else [])
    if temperature > 0 and top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    written: list[int] = []
    for _ in range(max_new_tokens):
        logits = full_logits(backend, ids + written)[-1]
        logits[banned] = float("-inf")
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            probs = warpers(None, logits[None])[0].softmax(-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        written.append(nxt)
        if nxt == v["eos"]:
            break
    tokens = [t for t in backend.tokenizer.convert_ids_to_tokens(written) if t not in ("</s>", "<unk>")]
    text = re.sub(r"\s+([?.,:;!)])", r"\1", " ".join(tokens)).strip()
    return text, tokens


# ------------------------------------------------------------------------------------ checkpoints
def test_build_tiny_is_deterministic(ckpt, tmp_path):
    # the generic builder given the toy's codec and words writes what build_tiny("fusion") (the toy plug-in) did
    again = build_tiny_fusion(tmp_path / "again", world.codec(), world.VOCAB_TEXT, seed=0)
    twice = build_tiny_fusion(tmp_path / "twice", world.codec(), world.VOCAB_TEXT, seed=0)
    other = build_tiny_fusion(tmp_path / "other", world.codec(), world.VOCAB_TEXT, seed=1)
    for name in sorted(LAYOUT):
        assert (again / name).read_bytes() == (twice / name).read_bytes() == (ckpt / name).read_bytes(), name
    assert (again / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()
    assert {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()} >= LAYOUT


def test_checkpoint_tokens(backend):
    v = vocab(backend)
    assert backend.image_ids.tolist() == v["images"] and len(set(v["images"])) == NUM_CODES
    assert (backend.bos_id, backend.eos_id, backend.pad_id, backend.boi_id, backend.eoi_id) == (
        v["bos"], v["eos"], v["pad"], v["boi"], v["eoi"])
    assert backend.codec.num_codes == NUM_CODES and backend.num_image_tokens == NUM_TOKENS
    assert backend.tokenizer.unk_token_id not in words(backend, " ".join(PROMPTS + sum(QUESTIONS, [])) + " Answer:")
    banned = torch.isinf(backend.text_bias).nonzero().flatten().tolist()
    assert sorted(banned) == sorted(banned_text_ids(backend))


@pytest.mark.parametrize("breakage, message", [
    ("missing_dir", "does not exist"),
    ("no_fusion_config", "fusion_config.json"),
    ("no_image_codec", "image_codec"),
    ("no_codebook", "image codec"),
    ("no_weights", "no weights"),
    ("no_tokenizer", "tokenizer.json"),
])
def test_broken_checkpoint_errors_name_the_problem(ckpt, tmp_path, breakage, message):
    bad = tmp_path / "bad"
    if breakage != "missing_dir":
        shutil.copytree(ckpt, bad)
    if breakage == "no_fusion_config":
        (bad / "fusion_config.json").unlink()
    elif breakage == "no_image_codec":
        shutil.rmtree(bad / "image_codec")
    elif breakage == "no_codebook":
        (bad / "image_codec" / "codebook.safetensors").unlink()
    elif breakage == "no_weights":
        (bad / "model.safetensors").unlink()
    elif breakage == "no_tokenizer":
        (bad / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError) as err:
        load(bad)
    assert str(bad) in str(err.value) and message in str(err.value)


# ------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("which", ["backend", "cfg_backend"])
def test_sample_shapes_and_determinism(request, which):
    backend: FusionBackend = request.getfixturevalue(which)
    prompts, seeds = PROMPTS + PROMPTS[:1], [1, 2, 3]
    state = torch.get_rng_state()
    a = backend.sample(prompts, seeds)
    assert a.dtype == torch.int64 and a.device.type == "cpu" and a.shape == (3, NUM_TOKENS)
    assert int(a.min()) >= 0 and int(a.max()) < NUM_CODES
    assert torch.equal(a, backend.sample(prompts, seeds))
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is never used
    b = backend.sample(prompts, [1, 2, 4])
    assert torch.equal(a[:2], b[:2]) and not torch.equal(a[2], b[2])  # rows use their own generator
    assert not torch.equal(a[0], a[2])  # same prompt, other seed
    with pytest.raises(ValueError):
        backend.sample(prompts, seeds[:2])


@pytest.mark.parametrize("which", ["backend", "cfg_backend"])
def test_sample_independent_of_batch_companions(request, which):
    backend: FusionBackend = request.getfixturevalue(which)
    # a fixed batch size; the companion prompt differs in length, so the left padding differs
    short = backend.sample([PROMPTS[0], "a circle"], [1, 2])
    long = backend.sample([PROMPTS[1] + " and three yellow circles", PROMPTS[0]], [9, 1])
    assert torch.equal(short[0], long[1])


def test_sampling_logprobs_equal_teacher_forcing(ckpt):
    unwarped = load(ckpt, guidance_scale=1.0, temperature=1.0, top_p=1.0)
    drawn = unwarped.sample_with_logprobs(PROMPTS, [3, 4])
    torch.testing.assert_close(drawn.logp_sampling, drawn.logp_conditional)
    torch.testing.assert_close(drawn.logp_cfg, drawn.logp_conditional)  # no guidance: the same logits

    nucleus = load(ckpt, guidance_scale=1.0, temperature=0.8, top_p=0.9)
    drawn = nucleus.sample_with_logprobs(PROMPTS, [3, 4])
    assert torch.all(drawn.logp_sampling > drawn.logp_conditional)  # truncation + sharpening concentrate mass
    teacher = nucleus.sequence_logprobs(PROMPTS, drawn.tokens)
    assert teacher.shape == (2,) and teacher.dtype == torch.float32
    torch.testing.assert_close(teacher, drawn.logp_conditional, atol=1e-4, rtol=0)
    ref = torch.tensor([reference_logprob(nucleus, p, row) for p, row in zip(PROMPTS, drawn.tokens, strict=True)])
    torch.testing.assert_close(teacher, ref, atol=1e-4, rtol=0)


def test_cfg_logprobs_equal_teacher_forcing(ckpt):
    backend = load(ckpt, guidance_scale=3.0, temperature=0.9, top_p=0.95)
    drawn = backend.sample_with_logprobs(PROMPTS, [5, 6])
    assert not torch.allclose(drawn.logp_cfg, drawn.logp_conditional, atol=1e-3)
    for mode, expected, guidance in ((LogprobMode.cfg, drawn.logp_cfg, 3.0),
                                     (LogprobMode.conditional, drawn.logp_conditional, 1.0)):
        backend.logprob_mode = mode
        teacher = backend.sequence_logprobs(PROMPTS, drawn.tokens)
        torch.testing.assert_close(teacher, expected, atol=1e-4, rtol=0)
        ref = torch.tensor([reference_logprob(backend, p, row, guidance)
                            for p, row in zip(PROMPTS, drawn.tokens, strict=True)])
        torch.testing.assert_close(teacher, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", list(LogprobMode))
def test_sequence_logprobs_of_any_codes(cfg_backend, mode):
    """Arbitrary (not sampled) codes, prompts of different lengths: batched == alone == full forward."""
    cfg_backend.logprob_mode = mode
    try:
        tokens = torch.randint(0, NUM_CODES, (2, NUM_TOKENS), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            batched = cfg_backend.sequence_logprobs(PROMPTS, tokens)
            alone = cfg_backend.sequence_logprobs(PROMPTS[1:], tokens[1:])
        torch.testing.assert_close(alone, batched[1:], atol=1e-5, rtol=0)
        guidance = 3.0 if mode is LogprobMode.cfg else 1.0
        ref = torch.tensor([reference_logprob(cfg_backend, p, row, guidance)
                            for p, row in zip(PROMPTS, tokens, strict=True)])
        torch.testing.assert_close(batched, ref, atol=1e-4, rtol=0)
    finally:
        cfg_backend.logprob_mode = LogprobMode.conditional


# ------------------------------------------------------------------------------------ decode
def test_decode_pastes_codebook_cells(backend, codes):
    images = backend.decode(codes, [0] * len(codes))
    assert images.dtype == np.uint8 and images.shape == (len(codes), world.SIZE, world.SIZE, 3)
    assert np.array_equal(images, backend.codec.decode(codes))
    assert np.array_equal(images, backend.decode(codes))  # seeds unused
    book, cell = world.codebook(), world.CELL
    for image, row in zip(images, codes, strict=True):
        for k, code in enumerate(row.tolist()):
            r, c = divmod(k, world.GRID)
            assert np.array_equal(image[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell], book[code])
        objects = world.parse(image)
        assert all(o.colour != world.UNKNOWN and o.shape != world.UNKNOWN for o in objects)
        assert len(objects) == int((row != 0).sum())  # code 0 is the empty cell
    assert torch.equal(backend.codec.encode(images), codes)


# ------------------------------------------------------------------------------------ yes / no
def test_yes_no_equals_one_at_a_time(backend, codes, images):
    reference = [[reference_yes_no(backend, row, q) for q in qs] for row, qs in zip(codes, QUESTIONS, strict=True)]
    for batch_size in (None, 1, 2, 4):  # padding and grouping must not change anything
        out = backend.yes_no(images, QUESTIONS, batch_size=batch_size)
        assert len(out) == len(QUESTIONS)
        for (p_yes, p_no), qs, ref in zip(out, QUESTIONS, reference, strict=True):
            assert p_yes.dtype == p_no.dtype == np.float32 and p_yes.shape == p_no.shape == (len(qs),)
            assert np.all(p_yes > 0) and np.all(p_no > 0) and np.all(p_yes + p_no <= 1)
            for j, (ref_yes, ref_no) in enumerate(ref):
                assert abs(p_yes[j] - ref_yes) < 1e-5 and abs(p_no[j] - ref_no) < 1e-5
    alone = backend.yes_no(images[3:4], QUESTIONS[3:4])[0]
    np.testing.assert_allclose(alone[0], [r[0] for r in reference[3]], atol=1e-5)
    assert [len(y) for y, _ in backend.yes_no(images[:2], [[], []])] == [0, 0]
    with pytest.raises(ValueError):
        backend.yes_no(images, QUESTIONS[:2])


# ------------------------------------------------------------------------------------ text
def test_write_text_greedy_equals_full_forward_loop(backend):
    prompts = [PROMPTS[0], "is there", PROMPTS[1]]  # different lengths: left padding
    greedy = backend.write_text(prompts, [0, 1, 2], max_new_tokens=8, temperature=0.0)
    assert greedy == [reference_text(backend, p, 8)[0] for p in prompts]
    assert greedy == backend.write_text(prompts, [7, 8, 9], max_new_tokens=8, temperature=0.0)
    assert backend.write_text([], [], max_new_tokens=8) == []


def test_write_text_never_writes_banned_tokens(backend):
    """Push every banned token (image codes, <boi>, <eoi>, <s>, <pad>) far above the rest: the output is unchanged."""
    expected = backend.write_text(PROMPTS, [0, 1], max_new_tokens=8, temperature=0.0)
    boost = torch.zeros(len(backend.tokenizer))
    boost[banned_text_ids(backend)] = 1e4
    handle = backend.model.lm_head.register_forward_hook(lambda _m, _i, out: out + boost.to(out))
    try:
        assert backend.write_text(PROMPTS, [0, 1], max_new_tokens=8, temperature=0.0) == expected
        sampled = backend.write_text(PROMPTS, [0, 1], max_new_tokens=8, temperature=1.0)
    finally:
        handle.remove()
    assert sampled == backend.write_text(PROMPTS, [0, 1], max_new_tokens=8, temperature=1.0)
    for text in expected + sampled:
        assert "<img_" not in text and "<boi>" not in text and "<eoi>" not in text and "<s>" not in text


def test_write_text_sampling(backend):
    seeds = list(range(8))
    prompts = [PROMPTS[i % 2] for i in seeds]
    state = torch.get_rng_state()
    sampled = backend.write_text(prompts, seeds, max_new_tokens=12, temperature=1.0, top_p=0.9)
    assert torch.equal(state, torch.get_rng_state())
    assert sampled == backend.write_text(prompts, seeds, max_new_tokens=12, temperature=1.0, top_p=0.9)
    other = backend.write_text(prompts, seeds[:-1] + [100], max_new_tokens=12, temperature=1.0, top_p=0.9)
    assert other[:-1] == sampled[:-1] and other[-1] != sampled[-1]
    assert len(set(sampled)) > 1
    punct = 0
    for text, prompt, seed in zip(sampled, prompts, seeds, strict=True):
        ref, tokens = reference_text(backend, prompt, 12, temperature=1.0, top_p=0.9, seed=seed)
        assert text == ref  # per-row generator, same warping as transformers
        assert "<img_" not in text and not re.search(r"\s[?.]", text)
        punct += sum(t in ("?", ".") for t in tokens[1:])
    assert punct > 0  # a space before '?' / '.' was really removed somewhere


def test_write_text_zero_new_tokens(backend):
    assert backend.write_text(PROMPTS, [0, 1], max_new_tokens=0) == ["", ""]


def test_write_text_needs_one_seed_per_prompt(backend):
    with pytest.raises(ValueError):
        backend.write_text(PROMPTS, [0], max_new_tokens=3, temperature=1.0)


# ------------------------------------------------------------------------------------ LoRA
def perturb_lora(backend: FusionBackend, seed: int = 0) -> None:
    """Seeded A and B (peft initialises A from the global RNG and B at zero, a no-op adapter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in backend.peft.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "lora_B" in name else 0.2))


def test_lora_reference_and_merge(ckpt, images, tmp_path):
    backend = load(ckpt, guidance_scale=3.0)
    tokens = backend.sample(PROMPTS, [1, 2])
    qs = QUESTIONS[:2]
    with torch.no_grad():
        base_logp = backend.sequence_logprobs(PROMPTS, tokens)
    base_yes = backend.yes_no(images[:2], qs)
    base_text = backend.write_text(PROMPTS, [0, 1], max_new_tokens=8, temperature=1.0)
    with pytest.raises(RuntimeError):
        backend.trainable_parameters()
    with backend.reference():  # no adapter: a no-op
        assert torch.equal(backend.sequence_logprobs(PROMPTS, tokens), base_logp)

    backend.add_lora(LORA)
    trainable = {n for n, p in backend.model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 7 * 2 and all("lora_" in n and ".layers." in n for n in trainable)
    assert len(backend.trainable_parameters()) == len(trainable)
    with pytest.raises(RuntimeError):
        backend.add_lora(LORA)
    with torch.no_grad():  # B starts at zero: the fresh adapter adds exactly nothing
        assert torch.equal(backend.sequence_logprobs(PROMPTS, tokens), base_logp)

    perturb_lora(backend)
    policy = backend.sequence_logprobs(PROMPTS, tokens)
    assert not torch.allclose(policy, base_logp, atol=1e-3)
    policy_yes = backend.yes_no(images[:2], qs)
    assert not np.allclose(policy_yes[0][0], base_yes[0][0], atol=1e-4)
    with backend.reference():
        with torch.no_grad():
            assert torch.equal(backend.sequence_logprobs(PROMPTS, tokens), base_logp)
        for (a_yes, a_no), (b_yes, b_no) in zip(backend.yes_no(images[:2], qs), base_yes, strict=True):
            assert np.array_equal(a_yes, b_yes) and np.array_equal(a_no, b_no)
        assert torch.equal(backend.sample(PROMPTS, [1, 2]), tokens)
        assert backend.write_text(PROMPTS, [0, 1], max_new_tokens=8, temperature=1.0) == base_text
    with torch.no_grad():
        assert torch.equal(backend.sequence_logprobs(PROMPTS, tokens), policy.detach())  # adapter back on

    policy.sum().backward()  # differentiable for DPO
    grads = [p.grad for p in backend.trainable_parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)

    backend.save_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    policy_text = backend.write_text(PROMPTS, [0, 1], max_new_tokens=8, temperature=0.0)
    backend.merge_and_save(tmp_path / "merged")
    assert backend.peft is None
    merged = tmp_path / "merged"
    files = {str(p.relative_to(merged)) for p in merged.rglob("*") if p.is_file()}
    assert files == {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()} and files >= LAYOUT
    for name in ("fusion_config.json", "image_codec/codec.json", "image_codec/codebook.safetensors"):
        assert (merged / name).read_bytes() == (ckpt / name).read_bytes(), name

    reloaded = load(merged, guidance_scale=3.0)
    with torch.no_grad():
        merged_logp = reloaded.sequence_logprobs(PROMPTS, tokens)
    torch.testing.assert_close(merged_logp, policy.detach(), atol=1e-5, rtol=0)
    ref = torch.tensor([reference_logprob(reloaded, p, row) for p, row in zip(PROMPTS, tokens, strict=True)])
    torch.testing.assert_close(ref, policy.detach(), atol=1e-4, rtol=0)
    for (a_yes, a_no), (b_yes, b_no) in zip(reloaded.yes_no(images[:2], qs), policy_yes, strict=True):
        np.testing.assert_allclose(a_yes, b_yes, atol=1e-5)
        np.testing.assert_allclose(a_no, b_no, atol=1e-5)
    assert reloaded.write_text(PROMPTS, [0, 1], max_new_tokens=8, temperature=0.0) == policy_text
    with reloaded.reference():  # the merged model is the next iteration's reference: nothing to disable
        with torch.no_grad():
            torch.testing.assert_close(reloaded.sequence_logprobs(PROMPTS, tokens), policy.detach(), atol=1e-5,
                                       rtol=0)


def test_lora_regex_must_match(ckpt):
    backend = load(ckpt, guidance_scale=1.0)
    with pytest.raises(ValueError, match="matches no Linear"):
        backend.add_lora(replace(LORA, target_regex=r".*nothing_here\.proj"))
    assert backend.peft is None
    with pytest.raises(RuntimeError):
        backend.trainable_parameters()


# ------------------------------------------------------------------------------------ chunked image-code log-probs
@pytest.mark.parametrize("cfg", [False, True])
def test_image_code_logprobs_equal_full_logits(cfg):
    """Values, entropy and gradients (hidden states and head weights) equal the full-logits computation for
    chunks that divide T, do not, and cover it; with autograd the head runs again per chunk in the backward
    (checkpointed: no chunk's logits are kept), and no saved tensor spans the codes."""
    g = torch.Generator().manual_seed(0)
    b, t, d, v = 3, 10, 8, 37
    head = torch.nn.Linear(d, v)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, d, generator=g))
        head.bias.copy_(torch.randn(v, generator=g))
    hidden = tuple(torch.randn(b, t, d, generator=g, requires_grad=True) for _ in range(2 if cfg else 1))
    tokens = torch.randint(0, v, (b, t), generator=g)
    calls: list[int] = []
    saved: list[tuple[int, ...]] = []

    def logits_fn(*h: torch.Tensor) -> torch.Tensor:
        calls.append(h[0].shape[1])
        return head(h[1]) + 3.0 * (head(h[0]) - head(h[1])) if cfg else head(h[0])

    params = [*hidden, head.weight, head.bias]
    weights = torch.tensor([1.0, -2.0, 0.5])  # distinct per row: a row mix-up changes the gradients
    ref_logp, ref_ent = full_logits_reference(logits_fn(*hidden), tokens)
    ref_grads = torch.autograd.grad((ref_logp * weights).sum(), params)
    arg = hidden if cfg else hidden[0]
    for chunk in (1, 3, 5, t, t + 7):
        calls.clear()
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(tuple(x.shape)) or x, lambda x: x):
            logp, ent = image_code_logprobs(arg, logits_fn, tokens, chunk=chunk, entropy=True)
        n_chunks = -(-t // chunk)
        assert calls == [min(chunk, t - k * chunk) for k in range(n_chunks)]
        assert not any(s and s[-1] == v for s in saved), saved  # no logits kept for the backward
        assert logp.shape == ent.shape == (b,) and logp.dtype == ent.dtype == torch.float32
        assert logp.requires_grad and not ent.requires_grad
        torch.testing.assert_close(logp, ref_logp, atol=1e-4, rtol=1e-6)
        torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-6)
        grads = torch.autograd.grad((logp * weights).sum(), params)
        assert len(calls) == 2 * n_chunks  # recomputed chunk by chunk in the backward
        for got, want in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        plain = image_code_logprobs(arg, logits_fn, tokens, chunk=chunk)  # entropy=False: the tensor alone
        assert isinstance(plain, torch.Tensor) and torch.equal(plain.detach(), logp.detach())
        with torch.no_grad():
            calls.clear()
            torch.testing.assert_close(image_code_logprobs(arg, logits_fn, tokens, chunk=chunk), logp.detach())
            assert len(calls) == n_chunks


def test_image_code_logprobs_checks_shapes():
    hidden = torch.zeros(2, 5, 4)
    with pytest.raises(ValueError, match="do not match"):
        image_code_logprobs(hidden, lambda h: h, torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk"):
        image_code_logprobs(hidden, lambda h: h, torch.zeros(2, 5, dtype=torch.long), chunk=0)


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
def test_image_head_uses_only_the_image_code_rows(ckpt):
    """The restricted head equals the full head then the image columns, without running the full head;
    a peft-wrapped head falls back to the full head (with its adapter), a biased head keeps its bias rows."""
    backend = load(ckpt, guidance_scale=1.0)
    lm_head = backend.model.lm_head
    assert lm_head.weight is backend.model.get_input_embeddings().weight  # the toy model ties them
    ids = torch.tensor(vocab(backend)["images"])
    hidden = torch.randn(2, 5, backend.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    fired: list[int] = []
    handle = lm_head.register_forward_hook(lambda *_: fired.append(1))
    try:
        restricted = backend._image_head(hidden)
        backend._image_rows = None  # image ids that are not one contiguous range: rows gathered by index
        indexed = backend._image_head(hidden)
        with torch.no_grad():  # tied weights, changed in place: the head reads the current rows
            backend.model.get_input_embeddings().weight[ids[3]] += 1.0
        changed = backend._image_head(hidden)
    finally:
        handle.remove()
    assert not fired  # the full-vocabulary head never ran
    full = lm_head(hidden)
    assert restricted.shape == (2, 5, NUM_CODES) and restricted.dtype == hidden.dtype
    torch.testing.assert_close(indexed, restricted, atol=0, rtol=0)
    torch.testing.assert_close(changed, full[..., ids], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(changed[..., 3], restricted[..., 3])
    torch.testing.assert_close(backend._image_logits(hidden[:, -1]), full[:, -1, ids].float(), atol=1e-5, rtol=1e-5)

    biased = torch.nn.Linear(hidden.shape[-1], len(backend.tokenizer), bias=True)
    backend.model.lm_head = biased
    torch.testing.assert_close(backend._image_head(hidden), biased(hidden)[..., ids], atol=1e-5, rtol=1e-5)

    wrapped = load(ckpt, guidance_scale=1.0)
    plain = wrapped._image_head(hidden)
    wrapped.add_lora(replace(LORA, target_regex="lm_head"))
    perturb_lora(wrapped)
    assert not isinstance(wrapped.model.lm_head, torch.nn.Linear)
    adapted = wrapped._image_head(hidden)
    torch.testing.assert_close(adapted, wrapped.model.lm_head(hidden)[..., ids], atol=0, rtol=0)
    assert not torch.allclose(adapted, plain, atol=1e-3)  # the adapter's term is there


def reference_logprobs_full(backend: FusionBackend, prompts: list[str], tokens: torch.Tensor,
                            guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable full-logits reference (the pre-chunking computation): per prompt, unpadded, one
    plain forward with the whole-vocabulary head, image columns selected, CFG-mixed, full log-softmax."""
    v = vocab(backend)
    image_ids = torch.tensor(v["images"])
    logps, entropies = [], []
    for prompt, row in zip(prompts, tokens, strict=True):
        img = image_ids[row[:-1]].tolist()

        def image_logits(prefix: list[int], img: list[int] = img) -> torch.Tensor:
            logits = backend.model(input_ids=torch.tensor([prefix + img])).logits[0]
            return logits[len(prefix) - 1:][:, image_ids].float()

        logits = image_logits([v["bos"], *words(backend, prompt), v["boi"]])
        if guidance != 1.0:
            uncond = image_logits([v["bos"], v["boi"]])
            logits = uncond + guidance * (logits - uncond)
        logp, ent = full_logits_reference(logits, row)
        logps.append(logp)
        entropies.append(ent)
    return torch.stack(logps), torch.stack(entropies)


@pytest.mark.parametrize("mode", list(LogprobMode))
def test_sequence_logprobs_chunked_equal_full_logits_with_lora_grads(ckpt, mode):
    backend = load(ckpt, guidance_scale=3.0)
    backend.logprob_mode = mode
    backend.add_lora(replace(LORA, alpha=4, dropout=0.0))
    perturb_lora(backend)
    params = backend.trainable_parameters()
    tokens = torch.randint(0, NUM_CODES, (2, NUM_TOKENS), generator=torch.Generator().manual_seed(0))
    ref_logp, ref_ent = reference_logprobs_full(backend, PROMPTS, tokens, 3.0 if mode is LogprobMode.cfg else 1.0)
    assert_chunked_logprobs_match(backend, PROMPTS, tokens, (3, NUM_TOKENS, 64), ref_logp, ref_ent, params)


def test_training_forward_builds_no_kv_cache(cfg_backend):
    cfg_backend.logprob_mode = LogprobMode.cfg
    seen: list = []
    handle = cfg_backend.model.model.register_forward_pre_hook(
        lambda _m, _args, kwargs: seen.append(kwargs.get("use_cache")), with_kwargs=True)
    try:
        tokens = torch.randint(0, NUM_CODES, (2, NUM_TOKENS), generator=torch.Generator().manual_seed(1))
        cfg_backend.sequence_logprobs(PROMPTS, tokens)
    finally:
        handle.remove()
        cfg_backend.logprob_mode = LogprobMode.conditional
    assert seen == [False]  # one forward (cond + uncond rows together), without a KV cache


def test_gradient_checkpointing_same_loss_and_grads(ckpt):
    backend = load(ckpt, guidance_scale=3.0)
    backend.logprob_mode = LogprobMode.cfg
    backend.add_lora(replace(LORA, alpha=4, dropout=0.0))
    perturb_lora(backend)
    tokens = torch.randint(0, NUM_CODES, (2, NUM_TOKENS), generator=torch.Generator().manual_seed(2))
    assert_checkpointing_keeps_loss_and_grads(
        backend, backend.model.model.layers[0].mlp,
        lambda: (backend.sequence_logprobs(PROMPTS, tokens) * torch.tensor([1.0, -0.5])).sum(),
        backend.trainable_parameters(), backend.model.train)


@pytest.mark.parametrize("mode", list(LogprobMode))
def test_bfloat16_sequence_logprobs_and_backward(ckpt, mode):
    """The CUDA path's dtype (bf16 weights, float32 LoRA from peft) on CPU: float32 finite log-probs close
    to the float32 model's, a backward, and sampling through the restricted head."""
    tokens = torch.randint(0, NUM_CODES, (2, NUM_TOKENS), generator=torch.Generator().manual_seed(3))
    out = {}
    for dtype in (Dtype.float32, Dtype.bfloat16):
        backend = FusionBackend.load(ModelConfig(path=str(ckpt), dtype=dtype), SamplingConfig(guidance_scale=3.0),
                                     logprob_mode=mode)
        assert backend.model.dtype == getattr(torch, dtype.value)
        backend.add_lora(replace(LORA, alpha=4, dropout=0.0))
        perturb_lora(backend)
        logp, ent = backend.sequence_logprobs(PROMPTS, tokens, entropy=True)
        assert logp.dtype == ent.dtype == torch.float32 and logp.shape == (2,)
        assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
        logp.sum().backward()
        grads = [p.grad for p in backend.trainable_parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
        drawn = backend.sample_with_logprobs(PROMPTS, [1, 2])
        assert drawn.tokens.shape == (2, NUM_TOKENS) and torch.isfinite(drawn.logp_cfg).all()
        out[dtype] = logp.detach(), ent
    torch.testing.assert_close(out[Dtype.bfloat16][0], out[Dtype.float32][0], rtol=0.03, atol=0)
    torch.testing.assert_close(out[Dtype.bfloat16][1], out[Dtype.float32][1], atol=0.05, rtol=0)
